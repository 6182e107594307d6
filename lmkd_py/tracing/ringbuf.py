"""Pure decoders for tracefs' binary ring buffer (``per_cpu/cpuN/trace_pipe_raw``).

Why binary and not the text ``trace`` file: the text output prints timestamps in microseconds
(``sec.usec``) even for nanosecond clocks, and lock contentions on a pte spinlock last well under a
microsecond, so summing rounded values would be meaningless. The raw sub-buffers carry the full
nanosecond timestamps of the instance's ``trace_clock`` and each event's fields at the offsets given
by its ``format`` file.

Layout (kernel/trace/ring_buffer.c, described by ``events/header_page`` and ``events/header_event``):
a sub-buffer starts with a u64 ``timestamp`` and a ``commit`` word whose low 27 bits are the number
of data bytes (bit 31: events were lost before this page; bit 30: their count is stored after the
data). Each entry starts with a u32 whose low 5 bits are ``type_len`` and upper 27 bits a time delta:
``type_len`` 1..28 is a data entry of ``type_len * 4`` bytes, 0 is a data entry whose length is in
the next u32, 29 padding, 30 a time extension (delta bits in the next u32, shifted by 27), 31 an
absolute time stamp (the top 5 bits come from the running time).

Nothing here does I/O; ``tracing.py`` reads the files and hands the bytes and texts in.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

TYPE_PADDING = 29
TYPE_TIME_EXTEND = 30
TYPE_TIME_STAMP = 31
TS_SHIFT = 27
# Absolute time stamps hold 59 bits; the 5 most significant come from the running time.
TS_MSB = 0xF8 << 56
COMMIT_MASK = (1 << 27) - 1
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30

_FIELD_RE = re.compile(
    r"field:\s*(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);"
)
_INT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}


class FormatError(ValueError):
    """A format file or sub-buffer that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class FieldFormat:
    """One field of an event record: byte offset and size within the record, signedness."""

    name: str
    offset: int
    size: int
    signed: bool
    is_array: bool


@dataclass(frozen=True, slots=True)
class EventFormat:
    """An event's numeric id, ``system:name`` and fields, parsed from its ``format`` file."""

    event_id: int
    name: str  # "system:event", e.g. "kmem:rss_stat"
    fields: tuple[FieldFormat, ...]


@dataclass(frozen=True, slots=True)
class PageLayout:
    """Where a sub-buffer keeps its timestamp, commit word and data (from ``events/header_page``)."""

    timestamp_offset: int = 0
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One decoded event: timestamp (ns of the trace clock), CPU, ``system:name``, the task that
    emitted it (``common_pid``, a thread id) and its scalar fields (arrays stay ``bytes``)."""

    ts_ns: int
    cpu: int
    name: str
    pid: int
    fields: dict[str, int | bytes]


@dataclass
class SubbufResult:
    """Events of one sub-buffer, and whether the kernel reported events lost before it."""

    events: list[TraceEvent] = field(default_factory=list)
    missed_events: bool = False
    missed_count: int | None = None  # None when lost but not counted
    unknown_ids: set[int] = field(default_factory=set)


def _parse_fields(text: str) -> list[FieldFormat]:
    fields = []
    for m in _FIELD_RE.finditer(text):
        decl = m.group("decl").strip()
        # "char comm[16]" and "__data_loc char[] comm" (a dynamic array carries the brackets on its type)
        is_array = "[" in decl
        name = re.sub(r"\[[^\]]*\]", "", decl).split()[-1].lstrip("*")
        fields.append(
            FieldFormat(
                name=name,
                offset=int(m.group("offset")),
                size=int(m.group("size")),
                signed=m.group("signed") == "1",
                is_array=is_array,
            )
        )
    return fields


def parse_event_format(system: str, text: str) -> EventFormat:
    """Parse ``events/<system>/<event>/format``.

    Returns the id, ``system:name`` and all fields (common ones included). Raises FormatError
    when there is no ``ID:`` or ``name:`` line.
    """
    name_m = re.search(r"^name:\s*(\S+)", text, re.MULTILINE)
    id_m = re.search(r"^ID:\s*(\d+)", text, re.MULTILINE)
    if name_m is None or id_m is None:
        raise FormatError(f"format of {system} has no name/ID line")
    return EventFormat(int(id_m.group(1)), f"{system}:{name_m.group(1)}", tuple(_parse_fields(text)))


def parse_header_page(text: str) -> PageLayout:
    """Parse ``events/header_page`` (offsets of timestamp, commit and data in a sub-buffer).

    Raises FormatError when a field is missing.
    """
    by_name = {f.name: f for f in _parse_fields(text)}
    try:
        return PageLayout(
            timestamp_offset=by_name["timestamp"].offset,
            commit_offset=by_name["commit"].offset,
            commit_size=by_name["commit"].size,
            data_offset=by_name["data"].offset,
        )
    except KeyError as exc:
        raise FormatError(f"header_page lacks field {exc.args[0]}") from None


def parse_cpu_stats(text: str) -> dict[str, int]:
    """Integer counters of ``per_cpu/cpuN/stats`` by name ("overrun", "dropped events", ...)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.strip().isdigit():
            out[key.strip()] = int(value)
    return out


def _decode_fields(fmt: EventFormat, payload: bytes) -> tuple[int, dict[str, int | bytes]]:
    values: dict[str, int | bytes] = {}
    pid = 0
    for f in fmt.fields:
        end = f.offset + f.size
        if end > len(payload):
            continue  # a truncated record: keep what is there
        if f.is_array or f.size not in _INT_CODES:
            values[f.name] = payload[f.offset : end]
            continue
        code = _INT_CODES[f.size]
        value = struct.unpack_from("=" + (code if f.signed else code.upper()), payload, f.offset)[0]
        values[f.name] = value
        if f.name == "common_pid":
            pid = value
    return pid, values


def parse_subbuffer(
    data: bytes, cpu: int, layout: PageLayout, formats: Mapping[int, EventFormat]
) -> SubbufResult:
    """Decode one sub-buffer as read from ``trace_pipe_raw``.

    ``formats`` maps event ids to formats; entries of other ids are skipped and their ids
    reported in ``unknown_ids``. Timestamps are the page timestamp plus the running deltas, in the
    units of the instance's trace clock (ns for ``mono``). Raises FormatError when the sub-buffer is
    shorter than its header or its commit size points past the end of the data.
    """
    if len(data) < layout.data_offset:
        raise FormatError(f"sub-buffer of {len(data)} bytes is shorter than its header")
    ts = struct.unpack_from("=Q", data, layout.timestamp_offset)[0]
    commit = struct.unpack_from("=Q" if layout.commit_size == 8 else "=I", data, layout.commit_offset)[0]
    size = commit & COMMIT_MASK
    start = layout.data_offset
    end = start + size
    if end > len(data):
        raise FormatError(f"commit size {size} runs past the sub-buffer ({len(data)} bytes)")
    result = SubbufResult(missed_events=bool(commit & MISSED_EVENTS))
    if commit & MISSED_STORED and end + 8 <= len(data):
        result.missed_count = struct.unpack_from("=Q", data, end)[0]
    off = start
    while off + 4 <= end:
        header = struct.unpack_from("=I", data, off)[0]
        type_len = header & 0x1F
        delta = header >> 5
        if type_len == TYPE_PADDING:
            if delta == 0:
                break  # a null event: the rest of the page is unused
            # A discarded event: its delta still counts (libtraceevent does the same).
            length = struct.unpack_from("=I", data, off + 4)[0] if off + 8 <= end else 0
            ts += delta
            off += 4 + max(length, 4)
            continue
        if type_len == TYPE_TIME_EXTEND:
            ts += (struct.unpack_from("=I", data, off + 4)[0] << TS_SHIFT) + delta
            off += 8
            continue
        if type_len == TYPE_TIME_STAMP:
            absolute = (struct.unpack_from("=I", data, off + 4)[0] << TS_SHIFT) | delta
            ts = (absolute & ~TS_MSB) | (ts & TS_MSB)
            off += 8
            continue
        if type_len == 0:
            if off + 8 > end:
                break
            length = struct.unpack_from("=I", data, off + 4)[0] - 4
            payload_start = off + 8
            off = payload_start + ((length + 3) & ~3)
        else:
            length = type_len * 4
            payload_start = off + 4
            off = payload_start + length
        ts += delta
        if off > end or length < 2:
            break
        payload = data[payload_start : payload_start + length]
        event_id = struct.unpack_from("=H", payload, 0)[0]
        fmt = formats.get(event_id)
        if fmt is None:
            result.unknown_ids.add(event_id)
            continue
        pid, values = _decode_fields(fmt, payload)
        result.events.append(TraceEvent(ts, cpu, fmt.name, pid, values))
    return result
