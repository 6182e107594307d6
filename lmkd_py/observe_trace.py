"""The tracefs side of observe mode: two private instances, read without ever turning them off.

Observe mode traces every SIGKILL on the system for as long as it runs, so the cost of the events that
fire for *every* process matters more than anything else. The events are split by rate:

- ``lmkd-py-<pid>-observe`` (the *signal* instance) holds the rare events: ``signal_generate``
  narrowed in the kernel by the filter ``sig == 9``, the OOM killer's ``mark_victim`` and the
  oom_reaper's ``wake_reaper`` / ``start|finish|skip_task_reaping``, and
  ``sys_enter|exit_process_mrelease`` (optional: ``MRELEASE_EVENTS`` says what they cost). Its
  ``buffer_percent`` is 0, so a ``poll()`` on its per-CPU ``trace_pipe_raw`` wakes the loop as soon as
  one of them fires (~25 µs measured here): the loop must read the killer's ``/proc/TID/fdinfo/FD``
  while the pidfd is still open.
- ``lmkd-py-<pid>-observe-exit`` (the *exit* instance) is a flight recorder of
  ``sched_process_exit`` and ``exit_mmap``, which fire for every exiting process (``exit_mmap`` also
  for every exec), and of ``signal_deliver`` (``sig == 9``; ``EXIT_FILTERS`` says why it is here).
  They cannot be narrowed in the kernel: the victim is known only after the kill, and a filter set
  then would come too late for a fast exit (and replacing a filter costs a ~20 ms grace period, see
  ``lmkd_py.tracing``). So they are recorded (a ring-buffer write each) and *not decoded* while no
  kill is pending: the loop reads the raw sub-buffers once a second, keeps the last few whose events
  may still matter (``keep_pages``) and drops the rest unread. Only when a SIGKILL is pending are the
  kept pages decoded. benchmarks/observe_overhead.py measures what this costs a fork/exit-heavy load.

Both instances use ``trace_clock`` = ``mono`` (timestamps comparable with ``time.monotonic_ns()``) and
are removed by ``close()``, which atexit also runs; a crashed run's instances are removed by the next
run's ``remove_stale_instances`` (their names carry the dead pid).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmkd_py.tracing_instance import INSTANCE_PREFIX, TracingUnavailable, remove_stale_instances
from lmkd_py.tracing_proc import ProcConnector, ProcExit
from lmkd_py.tracing_ringbuf import (
    EventFormat,
    FormatError,
    PageLayout,
    TraceEvent,
    parse_cpu_stats,
    parse_event_format,
    parse_header_page,
    parse_subbuffer,
)

SIGNAL_EVENTS = (
    ("signal", "signal_generate"),
    ("oom", "mark_victim"),
    ("oom", "wake_reaper"),
    ("oom", "start_task_reaping"),
    ("oom", "finish_task_reaping"),
    ("oom", "skip_task_reaping"),
)
# The one system-wide cost that is not per exit: enabling any syscall event makes *every* syscall of every
# task take the kernel's syscall-tracing slow path (measured here: +85 ns per getppid()). Optional for
# that reason (``mrelease=False``); without it process_mrelease calls are not seen.
MRELEASE_EVENTS = (("syscalls", "sys_enter_process_mrelease"), ("syscalls", "sys_exit_process_mrelease"))
EXIT_EVENTS = (("signal", "signal_deliver"), ("sched", "sched_process_exit"), ("mmap", "exit_mmap"))
# Without it every signal on the system would wake the loop.
SIGNAL_FILTERS = {"signal/signal_generate": "sig == 9"}
# signal_deliver of SIGKILL also fires for the other threads of every multi-threaded process that calls
# exit_group (the kernel ends them with an internal SIGKILL, with no signal_generate): frequent enough on a
# busy system to stay out of the waking instance.
EXIT_FILTERS = {"signal/signal_deliver": "sig == 9"}
REQUIRED = frozenset({"signal:signal_generate"})

RawPage = tuple[int, bytes]  # (start timestamp of the sub-buffer, its bytes)


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def keep_pages(pages: Sequence[RawPage], horizon_ns: int) -> list[RawPage]:
    """The sub-buffers of one CPU (in read order) that may hold an event at or after ``horizon_ns``.

    A sub-buffer's events lie between its own start timestamp and the next one's, so every page whose
    successor starts before the horizon is dropped; the last page is always kept (its end is unknown).
    """
    kept = []
    for i, page in enumerate(pages):
        if i + 1 < len(pages) and pages[i + 1][0] < horizon_ns:
            continue
        kept.append(page)
    return kept


class Instance:
    """One private tracefs instance with its events enabled and its per-CPU pipes held open.

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
    ) -> None:
        self.path = root / "instances" / name
        self.notes: list[str] = []
        self.enabled: frozenset[str] = frozenset()
        self._formats: dict[int, EventFormat] = {}
        self._layout = PageLayout()
        self._subbuf_bytes = os.sysconf("SC_PAGE_SIZE")
        self._fds: dict[int, int] = {}  # cpu -> fd of per_cpu/cpuN/trace_pipe_raw
        self._stats: dict[int, Path] = {}
        self._lost: dict[int, int] = {}
        self._removed = False
        try:
            self.path.mkdir()
        except FileExistsError:
            raise TracingUnavailable(f"tracefs instance {self.path} already exists") from None
        except OSError as exc:
            raise TracingUnavailable(f"cannot create tracefs instance {self.path}: {exc.strerror}") from None
        try:
            self._setup(events, filters, buffer_kib_per_cpu, overwrite, wake_on_any)
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
    ) -> None:
        p = self.path
        if "mono" not in (p / "trace_clock").read_text().replace("[", " ").replace("]", " ").split():
            raise TracingUnavailable("tracefs offers no 'mono' trace clock")
        _write(p / "trace_clock", "mono")
        _write(p / "buffer_size_kb", str(buffer_kib))
        if (p / "options/overwrite").exists():
            _write(p / "options/overwrite", "1" if overwrite else "0")
        if wake_on_any and (p / "buffer_percent").exists():
            _write(p / "buffer_percent", "0")  # poll() wakes on the first event, not when half full
        enabled = set()
        for system, event in events:
            d = p / "events" / system / event
            try:
                fmt = parse_event_format(system, (d / "format").read_text())
                flt = filters.get(f"{system}/{event}")
                if flt is not None:
                    _write(d / "filter", flt)  # before enabling: no unfiltered burst
                _write(d / "enable", "1")
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
            try:
                self._fds[cpu] = os.open(cpu_dir / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.ENODEV:  # an offline CPU
                    continue
                raise
            self._stats[cpu] = cpu_dir / "stats"
        self.lost_events([])

    def fds(self) -> list[int]:
        """The per-CPU pipes, for ``poll(POLLIN)``."""
        return list(self._fds.values())

    def read_raw(self) -> dict[int, list[RawPage]]:
        """Everything recorded since the last read, as raw sub-buffers per CPU (consumed)."""
        out: dict[int, list[RawPage]] = {}
        ts_at = self._layout.timestamp_offset
        for cpu, fd in self._fds.items():
            pages: list[RawPage] = []
            while True:
                try:
                    data = os.read(fd, self._subbuf_bytes)
                except BlockingIOError:
                    break
                if len(data) < self._layout.data_offset:
                    break
                pages.append((struct.unpack_from("=Q", data, ts_at)[0], data))
            if pages:
                out[cpu] = pages
        return out

    def decode(self, cpu: int, pages: Iterable[RawPage], notes: list[str]) -> list[TraceEvent]:
        """Decode raw sub-buffers of one CPU; trouble goes to ``notes``, never raised."""
        events: list[TraceEvent] = []
        for _ts, data in pages:
            try:
                page = parse_subbuffer(data, cpu, self._layout, self._formats)
            except FormatError as exc:
                notes.append(f"{self.path.name} cpu{cpu}: undecodable sub-buffer skipped ({exc})")
                continue
            if page.missed_events:
                lost = "some" if page.missed_count is None else str(page.missed_count)
                notes.append(f"{self.path.name} cpu{cpu}: trace buffer lost {lost} events")
            events.extend(page.events)
        return events

    def read_events(self, notes: list[str]) -> list[TraceEvent]:
        """Read and decode everything recorded since the last read."""
        events: list[TraceEvent] = []
        for cpu, pages in self.read_raw().items():
            events.extend(self.decode(cpu, pages, notes))
        return events

    def lost_events(self, notes: list[str]) -> None:
        """Note events the kernel dropped or overwrote since the last look (``per_cpu/cpuN/stats``)."""
        for cpu, path in self._stats.items():
            try:
                stats = parse_cpu_stats(path.read_text())
            except OSError:
                continue
            lost = stats.get("dropped events", 0) + stats.get("overrun", 0)
            before = self._lost.get(cpu, lost)
            if lost > before:
                notes.append(f"{self.path.name} cpu{cpu}: {lost - before} events lost (buffer full)")
            self._lost[cpu] = lost

    def close(self) -> str | None:
        """Close the pipes and remove the instance (idempotent). Returns why it could not be removed."""
        if self._removed:
            return None
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        with contextlib.suppress(OSError):
            _write(self.path / "tracing_on", "0")
        for attempt in range(10):
            try:
                self.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY while a reader still holds a file of it (an interrupted read on another thread).
                if exc.errno != errno.EBUSY or attempt == 9:
                    return f"{self.path}: {exc.strerror}"
                time.sleep(0.02)
        self._removed = True
        return None


class ObserveTrace:
    """The signal instance and the exit flight recorder (module docstring). Raises TracingUnavailable."""

    def __init__(
        self,
        root: Path,
        log: Any,
        *,
        owner_pid: int | None = None,
        mrelease: bool = True,
        signal_kib_per_cpu: int = 256,
        exit_kib_per_cpu: int = 512,
    ) -> None:
        self.log = log
        pid = owner_pid if owner_pid is not None else os.getpid()
        remove_stale_instances(root, log)
        events = SIGNAL_EVENTS + (MRELEASE_EVENTS if mrelease else ())
        self.signal = Instance(
            root, f"{INSTANCE_PREFIX}{pid}-observe", events, filters=SIGNAL_FILTERS,
            buffer_kib_per_cpu=signal_kib_per_cpu, overwrite=False, wake_on_any=True,
        )
        self.exits: Instance | None = None
        atexit.register(self.close)
        if not self.signal.enabled >= REQUIRED:
            self.close()
            raise TracingUnavailable(f"trace event(s) {sorted(REQUIRED - self.signal.enabled)} missing")
        try:
            # Overwrite: when the loop falls behind, the oldest exits go, not the newest (the kill's).
            self.exits = Instance(
                root, f"{INSTANCE_PREFIX}{pid}-observe-exit", EXIT_EVENTS, filters=EXIT_FILTERS,
                buffer_kib_per_cpu=exit_kib_per_cpu, overwrite=True, wake_on_any=False,
            )
        except TracingUnavailable as exc:
            self.signal.notes.append(f"exit events not traced: {exc.reason}")
        if not mrelease:
            self.signal.notes.append("process_mrelease not traced (turned off: syscall tracing slows every syscall)")
        self.enabled = self.signal.enabled | (self.exits.enabled if self.exits else frozenset())
        self.mrelease_traced = {f"{s}:{e}" for s, e in MRELEASE_EVENTS} <= self.enabled
        self.notes = [*self.signal.notes, *(self.exits.notes if self.exits else [])]
        self._kept: dict[int, list[RawPage]] = {}

    def read_signal_events(self, notes: list[str]) -> list[TraceEvent]:
        return self.signal.read_events(notes)

    def read_exit_events(self, horizon_ns: int, decode: bool, notes: list[str]) -> list[TraceEvent]:
        """Exit events at or after ``horizon_ns`` when ``decode``; otherwise nothing is decoded and only
        the pages that may still matter are kept for a later call (module docstring)."""
        if self.exits is None:
            return []
        for cpu, pages in self.exits.read_raw().items():
            self._kept.setdefault(cpu, []).extend(pages)
        for cpu in list(self._kept):
            self._kept[cpu] = keep_pages(self._kept[cpu], horizon_ns)
        # Counted on every call, so that a loss while nothing was pending is not blamed on a kill.
        self.exits.lost_events(notes if decode else [])
        if not decode:
            return []
        events: list[TraceEvent] = []
        for cpu, pages in self._kept.items():
            events.extend(e for e in self.exits.decode(cpu, pages, notes) if e.ts_ns >= horizon_ns)
        self._kept.clear()
        return events

    def lost_signal_events(self, notes: list[str]) -> None:
        self.signal.lost_events(notes)

    def close(self) -> None:
        """Remove both instances (idempotent); a failure is logged and left for the next run's sweep."""
        for inst in (self.signal, self.exits):
            why = inst.close() if inst is not None else None
            if why is not None:
                self.log.warning("observe.instance_left", reason=why)
        atexit.unregister(self.close)


class ExitListener(ProcConnector):
    """The proc connector, listened to only while a kill is pending (an idle listener would be woken
    by every exit on the system). Adds the one thing the loop needs to ``ProcConnector``."""

    def drain(self) -> list[ProcExit]:
        """Exit events received so far (any process). Raises OSError on socket trouble."""
        return self._drain()
