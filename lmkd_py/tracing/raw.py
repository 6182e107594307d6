"""One private tracefs instance, read in binary: what the kill tracer and observe mode share.

``RawInstance`` makes ``instances/<name>``, sets ``trace_clock`` = ``mono`` (timestamps comparable with
``time.monotonic_ns()``), the buffer size and the overwrite option, enables the given events (each
filter written *before* its event is enabled, so no unfiltered burst is recorded), holds every online
CPU's ``per_cpu/cpuN/trace_pipe_raw`` open non-blocking (or opens them for each read), decodes what it reads with
``ringbuf``, counts what the kernel dropped, and removes the instance on ``close()`` (atexit
too). Instances whose names carry a dead pid are swept by ``remove_stale_instances``.

What to trace and when (filters per kill, ``tracing_on`` windows, flight recording) is left to the
users: ``instance.TracefsTracer`` and ``trace.ObserveTrace``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import re
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmkd_py.tracing.ringbuf import (
    EventFormat,
    FormatError,
    PageLayout,
    TraceEvent,
    parse_cpu_stats,
    parse_event_format,
    parse_header_page,
    parse_subbuffer,
)

INSTANCE_PREFIX = "lmkd-py-"
_STALE_RE = re.compile(r"lmkd-py-(\d+)(?:-.*)?")
_RMDIR_ATTEMPTS = 10

RawPage = tuple[int, bytes]  # (start timestamp of the sub-buffer in ns, its bytes)


class TracingUnavailable(Exception):
    """Tracing cannot run here; ``reason`` says why (for the daemon's message and the records)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def write_control(path: Path, text: str) -> None:
    """Write ``text`` to a tracefs control file in one ``write()``. Raises OSError."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _open_pipe(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def _owner_alive(pid: int, created_s: float, proc_root: Path) -> bool:
    """Whether process ``pid`` can be the one that made an instance created at ``created_s`` (wall
    clock): it exists and started no later than that. A pid reused by a younger process is not the
    owner (judging by /proc/PID alone kept a crashed daemon's instance for as long as its pid lived on)."""
    try:
        stat_text = (proc_root / str(pid) / "stat").read_text()
        btime = next(int(line.split()[1]) for line in (proc_root / "stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return (proc_root / str(pid)).exists()  # cannot tell: keep it
    fields = stat_text[stat_text.rfind(")") + 2:].split()
    try:
        started_s = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError):
        return True
    # Start times are whole clock ticks and btime whole seconds: allow a second of rounding.
    return started_s <= created_s + 1.0


def remove_stale_instances(root: Path, log: Any, proc_root: Path = Path("/proc")) -> list[str]:
    """Remove ``instances/lmkd-py-<pid>[-…]`` whose maker is gone: no process ``pid``, or one younger
    than the instance (tracefs stamps a directory with its creation time). Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list((root / "instances").iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _STALE_RE.fullmatch(entry.name)
        if m is None:
            continue
        try:
            created_s = entry.stat().st_mtime
        except OSError:
            continue
        if _owner_alive(int(m.group(1)), created_s, proc_root):
            continue
        try:
            entry.rmdir()
        except OSError as exc:
            log.warning("tracing.stale_instance_kept", instance=entry.name, error=str(exc))
            continue
        log.info("tracing.stale_instance_removed", instance=entry.name)
        removed.append(entry.name)
    return removed


class RawInstance:
    """One private tracefs instance with its events enabled and its per-CPU pipes ready to read.

    ``filters``: event filter text by ``"system/event"``. ``buffer_kib_per_cpu``: ``buffer_size_kb``.
    ``overwrite``: when a buffer is full, overwrite the oldest events (True) or drop new ones.
    ``wake_on_any``: ``buffer_percent`` = 0, so ``poll()`` on ``fds()`` wakes on the first event.
    ``tracing_on``: False turns recording off before anything is enabled (the user turns it on).
    ``hold_pipes``: keep the per-CPU pipes open (for ``poll()``); False opens them for each read only,
    so that between reads no file of the instance is open and anyone may remove it (``rmdir`` fails
    with EBUSY while one is).
    ``note_prefix``: starts every note about a CPU's buffer (default: the instance name and a space).
    Trouble with single events goes to ``notes`` (the event is then not traced).

    Raises TracingUnavailable from the constructor (after removing what it made) when the instance
    cannot be made or none of ``events`` exists.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        events: Iterable[tuple[str, str]],
        *,
        filters: Mapping[str, str],
        buffer_kib_per_cpu: int,
        overwrite: bool,
        wake_on_any: bool,
        tracing_on: bool = True,
        hold_pipes: bool = True,
        note_prefix: str | None = None,
    ) -> None:
        self.path = root / "instances" / name
        self.notes: list[str] = []
        self.enabled: frozenset[str] = frozenset()
        self._prefix = f"{name} " if note_prefix is None else note_prefix
        self._formats: dict[int, EventFormat] = {}
        self._layout = PageLayout()
        self._subbuf_bytes = os.sysconf("SC_PAGE_SIZE")
        self._pipes: dict[int, Path] = {}  # cpu -> per_cpu/cpuN/trace_pipe_raw
        self._fds: dict[int, int] = {}  # cpu -> its open pipe, when ``hold_pipes``
        self._stats: dict[int, Path] = {}
        self._lost: dict[int, int] = {}
        self._removed = False
        try:
            self.path.mkdir()
        except FileExistsError:
            raise TracingUnavailable(f"tracefs instance {self.path} already exists (another tracer?)") from None
        except OSError as exc:
            raise TracingUnavailable(f"cannot create tracefs instance {self.path}: {exc.strerror}") from None
        atexit.register(self.close)  # removed on normal interpreter exit too, even mid-setup
        try:
            self._setup(events, filters, buffer_kib_per_cpu, overwrite, wake_on_any, tracing_on, hold_pipes)
        except (OSError, FormatError, TracingUnavailable) as exc:
            self.close()
            reason = exc.reason if isinstance(exc, TracingUnavailable) else str(exc)
            raise TracingUnavailable(f"cannot set up tracefs instance {self.path}: {reason}") from None

    def _setup(
        self,
        events: Iterable[tuple[str, str]],
        filters: Mapping[str, str],
        buffer_kib: int,
        overwrite: bool,
        wake_on_any: bool,
        tracing_on: bool,
        hold_pipes: bool,
    ) -> None:
        p = self.path
        if not tracing_on:
            write_control(p / "tracing_on", "0")
        if "mono" not in (p / "trace_clock").read_text().replace("[", " ").replace("]", " ").split():
            raise TracingUnavailable("tracefs offers no 'mono' trace clock")
        write_control(p / "trace_clock", "mono")
        write_control(p / "buffer_size_kb", str(buffer_kib))
        if (p / "options/overwrite").exists():
            write_control(p / "options/overwrite", "1" if overwrite else "0")
        if wake_on_any and (p / "buffer_percent").exists():
            write_control(p / "buffer_percent", "0")  # poll() wakes on the first event, not when half full
        enabled = set()
        for system, event in events:
            d = p / "events" / system / event
            try:
                fmt = parse_event_format(system, (d / "format").read_text())
                flt = filters.get(f"{system}/{event}")
                if flt is not None:
                    write_control(d / "filter", flt)  # before enabling: no unfiltered burst
                write_control(d / "enable", "1")
            except (OSError, FormatError) as exc:
                self.notes.append(f"event {system}:{event} not traced ({exc})")
                continue
            self._formats[fmt.event_id] = fmt
            enabled.add(fmt.name)
        if not enabled:
            raise TracingUnavailable("none of its trace events exist on this kernel")
        self.enabled = frozenset(enabled)
        self._layout = parse_header_page((p / "events/header_page").read_text())
        if (p / "buffer_subbuf_size_kb").exists():
            self._subbuf_bytes = int((p / "buffer_subbuf_size_kb").read_text()) * 1024
        for cpu_dir in sorted(p.glob("per_cpu/cpu*"), key=lambda c: int(c.name[3:])):
            cpu = int(cpu_dir.name[3:])
            if hold_pipes:
                try:
                    self._fds[cpu] = _open_pipe(cpu_dir / "trace_pipe_raw")
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # an offline CPU
                        continue
                    raise
            self._pipes[cpu] = cpu_dir / "trace_pipe_raw"
            self._stats[cpu] = cpu_dir / "stats"
        self.lost_counts()  # the baseline: what was lost before now is nobody's business

    def fds(self) -> list[int]:
        """The per-CPU pipes, for ``poll(POLLIN)``."""
        return list(self._fds.values())

    def read_raw(self) -> dict[int, list[RawPage]]:
        """Everything recorded since the last read, as raw sub-buffers per CPU (consumed).
        Raises OSError when a pipe cannot be opened (not ``hold_pipes``: also when the instance is
        gone) or read."""
        out: dict[int, list[RawPage]] = {}
        for cpu, pipe in self._pipes.items():
            fd = self._fds.get(cpu)
            if fd is not None:
                pages = self._drain(fd)
            else:
                try:
                    fd = _open_pipe(pipe)
                except OSError as exc:
                    if exc.errno == errno.ENODEV:  # an offline CPU
                        continue
                    raise
                try:
                    pages = self._drain(fd)
                finally:
                    os.close(fd)
            if pages:
                out[cpu] = pages
        return out

    def _drain(self, fd: int) -> list[RawPage]:
        pages: list[RawPage] = []
        ts_at = self._layout.timestamp_offset
        while True:
            try:
                data = os.read(fd, self._subbuf_bytes)
            except BlockingIOError:
                break
            if len(data) < self._layout.data_offset:
                break
            pages.append((struct.unpack_from("=Q", data, ts_at)[0], data))
        return pages

    def decode(self, cpu: int, pages: Iterable[RawPage], notes: list[str]) -> list[TraceEvent]:
        """Decode raw sub-buffers of one CPU; trouble goes to ``notes``, never raised."""
        events: list[TraceEvent] = []
        for _ts, data in pages:
            try:
                page = parse_subbuffer(data, cpu, self._layout, self._formats)
            except FormatError as exc:
                notes.append(f"{self._prefix}cpu{cpu}: undecodable sub-buffer skipped ({exc})")
                continue
            if page.missed_events:
                lost = "some" if page.missed_count is None else str(page.missed_count)
                notes.append(f"{self._prefix}cpu{cpu}: trace buffer lost {lost} events")
            events.extend(page.events)
        return events

    def read_events(self, notes: list[str]) -> list[TraceEvent]:
        """Read and decode everything recorded since the last read. Raises OSError as ``read_raw``."""
        events: list[TraceEvent] = []
        for cpu, pages in self.read_raw().items():
            events.extend(self.decode(cpu, pages, notes))
        return events

    def lost_counts(self) -> dict[int, int]:
        """Events the kernel dropped (buffer full) or overwrote per CPU since the last call, from
        ``per_cpu/cpuN/stats``; CPUs with no loss are left out. With ``overwrite`` off a full buffer
        drops new events and counts them only there, never in the sub-buffers."""
        out: dict[int, int] = {}
        for cpu, path in self._stats.items():
            try:
                stats = parse_cpu_stats(path.read_text())
            except OSError:
                continue
            lost = stats.get("dropped events", 0) + stats.get("overrun", 0)
            before = self._lost.get(cpu, lost)
            if lost > before:
                out[cpu] = lost - before
            self._lost[cpu] = lost
        return out

    def lost_events(self, notes: list[str]) -> None:
        """Note ``lost_counts()`` in ``notes``."""
        for cpu, n in self.lost_counts().items():
            notes.append(f"{self._prefix}cpu{cpu}: {n} events lost (buffer full)")

    def close(self) -> str | None:
        """Close the pipes and remove the instance (idempotent). Returns why it could not be removed
        (then it is left for the atexit retry and, failing that, for the next run's stale sweep)."""
        if self._removed:
            return None
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        with contextlib.suppress(OSError):
            write_control(self.path / "tracing_on", "0")
        for attempt in range(_RMDIR_ATTEMPTS):
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY while a reader still holds a file of it (an interrupted read on another thread).
                if exc.errno != errno.EBUSY or attempt == _RMDIR_ATTEMPTS - 1:
                    return f"{self.path}: {exc.strerror}"
                time.sleep(0.02)
        self._removed = True
        atexit.unregister(self.close)
        return None
