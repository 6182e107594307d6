"""The kill tracer behind ``lmkd_py.tracing``: the kill window on a private tracefs instance.

The instance itself (set-up, binary reads, removal) is a ``raw.RawInstance``; this module adds
what a kill needs: recording off between kills, the per-kill ``common_pid`` filters and their clearing
off the kill path, the proc connector, and the timeline. See ``lmkd_py.tracing`` for the design and the
measured costs behind it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from lmkd_py.records import KernelTimeline
from lmkd_py.tracing.connector import ProcConnector
from lmkd_py.tracing.raw import INSTANCE_PREFIX, RawInstance, remove_stale_instances, write_control
from lmkd_py.tracing.timeline import KillWindow, build_timeline, parse_status_rss_kib, pid_filter

EVENTS = (
    ("signal", "signal_generate"),
    ("signal", "signal_deliver"),
    ("syscalls", "sys_enter_process_mrelease"),
    ("syscalls", "sys_exit_process_mrelease"),
    ("sched", "sched_process_exit"),
    ("mmap", "exit_mmap"),
    ("kmem", "rss_stat"),
    ("lock", "contention_begin"),
    ("lock", "contention_end"),
    ("mmap_lock", "mmap_lock_start_locking"),
    ("mmap_lock", "mmap_lock_acquire_returned"),
)
# Noisy events, narrowed per kill, one filter file each: a subsystem filter (events/lock/filter) would
# be one write, but the kernel walks every event of the instance for it (~200 us here, against
# ~15-50 us per event filter).
_NOISY = (
    "kmem:rss_stat",
    "lock:contention_begin",
    "lock:contention_end",
    "mmap_lock:mmap_lock_start_locking",
    "mmap_lock:mmap_lock_acquire_returned",
)
_STATIC_FILTERS = {
    "signal/signal_generate": "sig == 9",
    "signal/signal_deliver": "sig == 9",
}
PROC_EXIT_WAIT_NS = 20_000_000


def parse_kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a ``uname -r`` string such as ``6.18.44-fc``; (0, 0) when unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class TracefsTracer:
    """The real tracer (design and measured costs: the docstring of ``lmkd_py.tracing``).

    The instance ``instances/<name>`` (default ``lmkd-py-<pid>``) is made here and removed by
    ``close()``, which ``atexit`` also runs. Kernel buffers: ``buffer_kib_per_cpu`` per CPU (default
    16 MiB spread over the CPUs, 256 KiB to 2 MiB each). Raises TracingUnavailable from the
    constructor, after removing whatever it had made.
    """

    def __init__(
        self,
        root: Path,
        *,
        name: str | None = None,
        kernel_version: tuple[int, int] | None = None,
        proc_connector: bool = True,
        buffer_kib_per_cpu: int | None = None,
        log: Any = None,
    ) -> None:
        self.log = log if log is not None else structlog.get_logger()
        self.root = root
        self.name = name or f"{INSTANCE_PREFIX}{os.getpid()}"
        self.kernel_version = kernel_version or parse_kernel_version(os.uname().release)
        self.last_before_kill_ns: int | None = None  # cost of the last call, for benchmarks
        self.last_after_kill_ns: int | None = None
        self._window: KillWindow | None = None
        self._window_notes: list[str] = []
        # Filters are cleared off the kill path by one worker thread; ``_clean`` is set when no
        # filter of ours is set (see the module docstring for why clearing is slow).
        self._clean = threading.Event()
        self._clean.set()
        self._jobs: queue.SimpleQueue[list[Path] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._proc: ProcConnector | None = None
        self._warned = False
        self._closed = False
        self._removed = False
        remove_stale_instances(root, self.log)
        ncpu = os.cpu_count() or 1
        self._raw = RawInstance(
            root, self.name, EVENTS, filters=_STATIC_FILTERS,
            buffer_kib_per_cpu=buffer_kib_per_cpu or max(256, min(2048, 16384 // ncpu)),
            # Keep the start of a kill window when a buffer fills: the SIGKILL and the first
            # frees matter more than the last ones, and the loss is noted either way.
            overwrite=False,
            wake_on_any=False,
            tracing_on=False,  # on only inside a kill window (before_kill .. after_kill)
            hold_pipes=False,  # no file of it open between kills: whoever removes it may
            note_prefix="",
        )  # removes what it made and raises TracingUnavailable when it cannot be set up
        atexit.register(self.close)
        self.path = self._raw.path
        self.enabled = self._raw.enabled
        self.setup_notes: list[str] = list(self._raw.notes)
        self._noisy: list[Path] = [
            self.path / "events" / n.replace(":", "/") / "filter" for n in _NOISY if n in self.enabled
        ]
        if proc_connector:
            try:
                self._proc = ProcConnector(self.kernel_version)
            except OSError as exc:
                self.setup_notes.append(f"proc_exit_ns: proc connector unavailable ({exc.strerror or exc})")
        self.log.info("tracing.opened", instance=str(self.path), events=len(self.enabled), proc=bool(self._proc))

    def _warn_once(self, event: str, **kw: object) -> None:
        if not self._warned:
            self._warned = True
            self.log.warning(event, **kw)

    def _wait_janitor(self, timeout_s: float) -> None:
        # Waits only when kills come faster than the clearing (~50-100 ms); replacing a filter
        # that is still set would cost that grace period anyway. Bounded: the kill must go on.
        self._clean.wait(timeout_s)

    def _janitor(self) -> None:
        while True:
            paths = self._jobs.get()
            if paths is None:
                return
            for path in paths:
                try:
                    write_control(path, "0")
                except OSError as exc:
                    self.log.debug("tracing.filter_clear_failed", path=str(path), error=str(exc))
            self._clean.set()

    def before_kill(
        self, victim_pid: int, reaper_tid: int, *, rss_baseline_kib: Mapping[str, int] | None = None
    ) -> None:
        """Narrow the noisy events to the victim's threads and ``reaper_tid``, subscribe to exit
        events and turn tracing on. Never raises: trouble is noted in the coming timeline.

        ``rss_baseline_kib``: the victim's RSS by kind ("file", "anon", "swap", "shmem", KiB) as the
        caller just read it; when omitted, /proc/PID/status is read here (~30-110 us). Cost: ~0.2-0.4
        ms on this machine, most of it the five filter writes; see ``last_before_kill_ns``.
        """
        t0 = time.perf_counter_ns()
        if self._closed:
            return
        self._wait_janitor(1.0)
        notes: list[str] = []
        try:
            tids = frozenset(int(t) for t in os.listdir(f"/proc/{victim_pid}/task"))
        except OSError:
            tids = frozenset({victim_pid})
        baseline: dict[str, int] | None = dict(rss_baseline_kib) if rss_baseline_kib is not None else None
        if baseline is None:
            try:
                with open(f"/proc/{victim_pid}/status") as fh:
                    baseline = parse_status_rss_kib(fh.read())
            except OSError:
                baseline = None
        flt = pid_filter(tids | {reaper_tid})
        for path in self._noisy:
            try:
                write_control(path, flt)
            except OSError as exc:
                notes.append(f"filter of {path.parent.name} not set ({exc.strerror}); its events may be missing")
        if self._proc is not None:
            try:
                self._proc.listen()
            except OSError as exc:
                notes.append(f"proc connector listen failed ({exc.strerror})")
        start_ns = time.monotonic_ns()
        try:
            write_control(self.path / "tracing_on", "1")
        except OSError as exc:
            notes.append(f"tracing_on could not be set ({exc.strerror})")
            self._warn_once("tracing.kill_window_failed", instance=str(self.path), error=str(exc))
        self._window = KillWindow(victim_pid, tids, reaper_tid, start_ns, baseline)
        self._window_notes = notes
        self.last_before_kill_ns = time.perf_counter_ns() - t0

    def _lost_events(self, notes: list[str]) -> None:
        """Note events the kernel could not store since the last look. With ``overwrite`` = 0 a full
        buffer drops new events and counts them only in ``per_cpu/cpuN/stats``, not in the pages."""
        for cpu, n in self._raw.lost_counts().items():
            notes.append(f"cpu{cpu}: trace buffer full, {n} events lost")

    def after_kill(
        self, victim_pid: int, reaper_tid: int, rss_before_kib: int | None, mrelease_wall_ns: int | None
    ) -> KernelTimeline:
        """Stop tracing, read and parse the window, return the timeline with derived metrics.
        Never raises for read or parse trouble: fields stay None and ``unavailable_reason`` /
        ``notes`` say why (one warning per tracer, not one per kill)."""
        t0 = time.perf_counter_ns()
        if self._closed:
            return KernelTimeline(unavailable_reason="tracer closed")
        window, self._window = self._window, None
        notes = [*self.setup_notes, *self._window_notes]
        source = "tracefs+proc_connector" if self._proc is not None else "tracefs"
        try:
            write_control(self.path / "tracing_on", "0")
            events = self._raw.read_events(notes)
            self._lost_events(notes)
        except OSError as exc:
            self._warn_once("tracing.read_failed", instance=str(self.path), error=str(exc))
            self._finish_window()
            return KernelTimeline(source=source, unavailable_reason=f"reading the trace failed: {exc}", notes=notes)
        proc_exit_ns = None
        if self._proc is not None and self._proc.listening:
            try:
                exits = self._proc.exits_of(victim_pid, PROC_EXIT_WAIT_NS)
            except OSError as exc:
                exits = []
                notes.append(f"proc_exit_ns: proc connector read failed ({exc.strerror})")
            if exits:
                proc_exit_ns = max(e.timestamp_ns for e in exits)
            else:
                notes.append("proc_exit_ns: no exit event for the victim (still alive, or the event was lost)")
        self._finish_window()
        if window is None or window.victim_pid != victim_pid or window.reaper_tid != reaper_tid:
            return KernelTimeline(
                source=source, unavailable_reason="before_kill was not called for this victim", notes=notes
            )
        try:
            timeline = build_timeline(
                events,
                window,
                self.kernel_version,
                enabled=self.enabled,
                proc_exit_ns=proc_exit_ns,
                rss_before_kib=rss_before_kib,
                mrelease_wall_ns=mrelease_wall_ns,
                source=source,
                notes=notes,
            )
        except (ValueError, TypeError, KeyError) as exc:  # a kernel with unexpected field types
            self._warn_once("tracing.parse_failed", error=str(exc))
            timeline = KernelTimeline(source=source, unavailable_reason=f"parsing the trace failed: {exc}", notes=notes)
        self.last_after_kill_ns = time.perf_counter_ns() - t0
        return timeline

    def _finish_window(self) -> None:
        if self._proc is not None:
            try:
                self._proc.ignore()
            except OSError as exc:
                self.log.debug("tracing.proc_ignore_failed", error=str(exc))
        if self._noisy:
            if self._worker is None:
                self._worker = threading.Thread(target=self._janitor, name="lmkd-py-trace-clear", daemon=True)
                self._worker.start()
            self._clean.clear()
            self._jobs.put(list(self._noisy))

    def close(self) -> None:
        """Stop tracing and remove the instance. Idempotent; safe from the daemon's SIGTERM path and
        from atexit. When the instance is busy (a file in it still open on an interrupted frame), it
        is left for the atexit retry and, failing that, for the next run's stale-instance sweep."""
        if self._removed:
            return
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # the instance may be gone already; rmdir settles it
                write_control(self.path / "tracing_on", "0")
            if self._proc is not None:
                self._proc.close()
            if self._worker is not None:
                self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(5.0)
        why = self._raw.close()
        if why is not None:
            self.log.warning("tracing.instance_left", instance=str(self.path), error=why)
            return
        self._removed = True
        atexit.unregister(self.close)
        self.log.debug("tracing.closed", instance=str(self.path))

    def __enter__(self) -> TracefsTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
