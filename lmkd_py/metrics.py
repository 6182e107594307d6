"""Prometheus metrics for fleet dashboards, as a node_exporter textfile (``[metrics] textfile``).

The file is the text exposition format (version 0.0.4), written by hand with the standard library:
prometheus_client would cost the daemon resident memory it is being cut down from (issue 14). It is
replaced atomically (a temporary file in the same directory, then rename), so the collector never reads
half a file; the temporary name does not end in ``.prom``, so the collector never reads it either.

Every kill value comes from the ``KillRecord`` the daemon (or observe mode) has just written, through
``Metrics.record``, so the metrics and the records never disagree. Names follow Prometheus' conventions:
base units (seconds), ``_total`` counters, histograms as ``_bucket{le=...}``/``_sum``/``_count``. No
process name goes into a label (attacker-chosen text, unbounded cardinality): labels hold only the
outcome, the kill reason, the kernel release and the PSI level, all escaped.

Faults: a path that cannot be written (missing directory, read-only, permission, or refused by
``safepath`` because someone other than root or us owns or may write a directory on the way) is logged
once as ``metrics.write_failed`` and tried again at the next write. Nothing here raises into the kill path.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from lmkd_py import __version__, safepath

if TYPE_CHECKING:
    from lmkd_py.records import KillRecord

log = structlog.get_logger("lmkd_py.metrics")

PERIOD_NS = 30_000_000_000  # the slow rewrite: within node_exporter's usual 15-60 s scrape interval
FILE_MODE = 0o644  # node_exporter runs as its own user and must read the file
# From 100 us (a small victim's exit) to 10 s (past the longest exit timeout the config allows).
BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BUCKETS_NS = tuple(round(b * 1e9) for b in BUCKETS_S)
_REAPED = ("ok", "not_attempted")  # as report/data.py: an ESRCH call reaped nothing, its time is the race's


def _kernel(r: KillRecord) -> str:
    return r.provenance.kernel_release or "unknown"


def _mrelease_wall(r: KillRecord) -> int | None:
    return r.mrelease.wall_ns if r.mrelease.status.value in _REAPED else None


def _reaper_work(r: KillRecord) -> int | None:
    return r.kernel.reaper_work_ns if r.kernel is not None and r.mrelease.status.value in _REAPED else None


# (name, help, value in ns from a record or None)
HISTOGRAMS: tuple[tuple[str, str, Callable[[KillRecord], int | None]], ...] = (
    ("lmkd_py_kill_to_exit_seconds", "SIGKILL sent to the victim's exit observed.", lambda r: r.kill_to_exit_ns),
    ("lmkd_py_kill_to_memory_back_seconds", "SIGKILL sent to free memory back by the victim's anon+shmem RSS.",
     lambda r: r.kill_to_mem_recovered_ns),
    ("lmkd_py_mrelease_wall_seconds", "Wall time of process_mrelease calls that reaped.", _mrelease_wall),
    ("lmkd_py_kernel_reaper_work_seconds", "Kernel time inside process_mrelease (tracefs).", _reaper_work),
    ("lmkd_py_kernel_exit_mmap_seconds", "The victim's exit_mmap (tracefs).",
     lambda r: r.kernel.exit_mmap_ns if r.kernel is not None else None),
    ("lmkd_py_kernel_reap_total_seconds", "Reaper work plus exit_mmap (tracefs).",
     lambda r: r.kernel.reap_total_ns if r.kernel is not None else None),
)


def escape_label(value: str) -> str:
    """A label value as the exposition format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in pairs) + "}" if pairs else ""


def _num(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value) if isinstance(value, float) else str(value)


class _Histogram:
    __slots__ = ("count", "counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS_NS) + 1)  # per bucket, not cumulative; the last is +Inf only
        self.sum_ns = 0
        self.count = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(_BUCKETS_NS, ns)] += 1
        self.sum_ns += ns
        self.count += 1

    def lines(self, name: str, base: tuple[tuple[str, str], ...]) -> list[str]:
        out, cumulative = [], 0
        for le, n in zip((*(repr(b) for b in BUCKETS_S), "+Inf"), self.counts, strict=True):
            cumulative += n
            out.append(f"{name}_bucket{_labels((*base, ('le', le)))} {cumulative}")
        out.append(f"{name}_sum{_labels(base)} {_num(self.sum_ns / 1e9)}")
        out.append(f"{name}_count{_labels(base)} {self.count}")
        return out


class Metrics:
    """What the textfile shows, and its writer. ``path`` None: counts are kept, nothing is written.

    ``mode``: "kill" or "observe" (a label of ``lmkd_py_build_info``). ``read_pressure``: called at each
    slow rewrite, returns PSI (some avg10, full avg10) in percent, or None when it cannot tell.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        mode: str,
        version: str = __version__,
        kernel_release: str | None = None,
        read_pressure: Callable[[], tuple[float | None, float | None] | None] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        wall: Callable[[], float] = time.time,
        period_ns: int = PERIOD_NS,
    ) -> None:
        self.mode = mode
        self.version = version
        self.read_pressure = read_pressure
        self.clock = clock
        self.wall = wall
        self.period_ns = period_ns
        self.start_time_s = wall()
        self.kills: dict[tuple[str, str, str], int] = {}
        self.records_dropped = 0
        self.pressure_events: dict[str, int] = {}
        self.last_event_s: float | None = None
        self.last_kill_s: float | None = None
        self.avg10: dict[str, float] = {}
        # Seeded with this machine's kernel, so every histogram shows from the first write at zero.
        release = kernel_release if kernel_release is not None else os.uname().release
        self.hists: dict[tuple[str, str], _Histogram] = {(name, release): _Histogram() for name, _, _ in HISTOGRAMS}
        self.failing = False
        self.writes = 0
        self._next_ns = 0
        self.retarget(path)

    def retarget(self, path: Path | None) -> None:
        """Write to ``path`` from now on (a reload); None stops writing."""
        self.path = path
        # Pinned now: a later chdir (a daemon goes to /) must not move the file.
        self._dir = os.path.dirname(os.path.abspath(path)) if path is not None else ""
        self._name = path.name if path is not None else ""
        self.failing = False

    # -- what happened ----------------------------------------------------------------------------
    def record(self, rec: KillRecord, *, stored: bool = True) -> None:
        """Count one written record (``stored`` False: the records writer dropped it) and rewrite the
        file. Never raises."""
        try:
            key = (rec.outcome.value, _reason(rec), _kernel(rec))
            self.kills[key] = self.kills.get(key, 0) + 1
            if not stored:
                self.records_dropped += 1
            if not rec.dry_run:
                for name, _, value in HISTOGRAMS:
                    ns = value(rec)
                    if ns is not None:
                        self.hists.setdefault((name, _kernel(rec)), _Histogram()).observe(ns)
            if rec.steps.signal_sent_ns is not None or rec.observed:
                self.last_kill_s = _unix_time(rec.wall_time) or self.wall()
            if rec.pressure is not None:
                self._avg10(rec.pressure.some_avg10, rec.pressure.full_avg10)
        except Exception as exc:  # the metrics are a side channel: a bug here must never cost a kill
            log.error("metrics.error", error=repr(exc), exc_info=True)
            return
        self.write()

    def pressure_event(self, level: str, some_avg10: float | None, full_avg10: float | None) -> None:
        """One pressure event the loop handled (its level name and the PSI it read then)."""
        self.pressure_events[level] = self.pressure_events.get(level, 0) + 1
        self.last_event_s = self.wall()
        self._avg10(some_avg10, full_avg10)

    def _avg10(self, some: float | None, full: float | None) -> None:
        for line, value in (("some", some), ("full", full)):
            if value is not None:
                self.avg10[line] = value

    # -- when to write ----------------------------------------------------------------------------
    def due_in(self, now_ns: int) -> int | None:
        """Nanoseconds until the next slow rewrite (0: now), or None when nothing is written."""
        return None if self.path is None else max(0, self._next_ns - now_ns)

    def tick(self, now_ns: int) -> None:
        """The slow rewrite, when it is due. Never raises."""
        if self.path is None or now_ns < self._next_ns:
            return
        if self.read_pressure is not None:
            try:
                psi = self.read_pressure()
            except Exception as exc:  # a side channel: see record()
                log.error("metrics.error", error=repr(exc), exc_info=True)
                psi = None
            if psi is not None:
                self._avg10(*psi)
        self.write()

    def stop(self) -> None:
        """The last rewrite, with ``lmkd_py_up 0``: a dashboard then tells a stopped daemon from a stale file."""
        self.write(up=False)

    # -- the file ---------------------------------------------------------------------------------
    def render(self, up: bool = True) -> str:
        """The exposition text."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend((f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples))

        family("lmkd_py_up", "gauge", "1 while lmkd-py runs; 0 written when it stops cleanly.",
               [f"lmkd_py_up {int(up)}"])
        family("lmkd_py_start_time_seconds", "gauge", "When this lmkd-py started (unix seconds).",
               [f"lmkd_py_start_time_seconds {_num(self.start_time_s)}"])
        family("lmkd_py_build_info", "gauge", "Version and mode of this lmkd-py.",
               [f"lmkd_py_build_info{_labels((('version', self.version), ('mode', self.mode)))} 1"])
        family("lmkd_py_kills_total", "counter", "Kill records by outcome, kill reason and kernel release.",
               [f"lmkd_py_kills_total{_labels(tuple(zip(('outcome', 'reason', 'kernel_release'), k, strict=True)))}"
                f" {n}" for k, n in sorted(self.kills.items())])
        family("lmkd_py_records_dropped_total", "counter", "Kill records the records file could not take.",
               [f"lmkd_py_records_dropped_total {self.records_dropped}"])
        for name, help_, _ in HISTOGRAMS:
            samples: list[str] = []
            for (hname, release), h in sorted(self.hists.items()):
                if hname == name:
                    samples += h.lines(name, (("kernel_release", release),))
            family(name, "histogram", help_, samples)
        family("lmkd_py_pressure_events_total", "counter", "Pressure events the kill loop handled, by level.",
               [f"lmkd_py_pressure_events_total{_labels((('level', lv),))} {n}"
                for lv, n in sorted(self.pressure_events.items())])
        family("lmkd_py_memory_pressure_avg10_ratio", "gauge", "Memory PSI avg10 last read (0-1), by line.",
               [f"lmkd_py_memory_pressure_avg10_ratio{_labels((('line', ln),))} {_num(v / 100)}"
                for ln, v in sorted(self.avg10.items())])
        for name, help_, when in (
            ("lmkd_py_last_pressure_event_timestamp_seconds", "When the last pressure event came (unix seconds).",
             self.last_event_s),
            ("lmkd_py_last_kill_timestamp_seconds", "When the last kill was made or seen (unix seconds).",
             self.last_kill_s),
        ):
            family(name, "gauge", help_, [] if when is None else [f"{name} {_num(when)}"])
        return "\n".join(out) + "\n"

    def write(self, *, up: bool = True) -> bool:
        """Replace the file now. True when written; False when off or failed (logged once per failure
        streak, tried again at the next write). Never raises."""
        if self.path is None:
            return False
        self._next_ns = self.clock() + self.period_ns
        try:
            self._replace(self.render(up).encode())
        except OSError as exc:
            if not self.failing:
                self.failing = True
                log.error("metrics.write_failed", path=str(self.path), error=str(exc),
                          insecure=isinstance(exc, safepath.UntrustedPath), retry="at the next write")
            return False
        except Exception as exc:  # a side channel: see record()
            log.error("metrics.error", error=repr(exc), exc_info=True)
            return False
        if self.failing:
            self.failing = False
            log.info("metrics.write_recovered", path=str(self.path))
        self.writes += 1
        return True

    def _replace(self, data: bytes) -> None:
        # The directory is walked and checked by safepath (every component owned by root or us, not
        # writable by others), never created: node_exporter's directory is the operator's to make.
        dfd = safepath.open_trusted_dir(self._dir, create_mode=None)
        try:
            tmp = f".{self._name}.{os.getpid()}.tmp"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, FILE_MODE, dir_fd=dfd)
            except FileExistsError:  # left by a crash of this pid's predecessor: ours to replace
                os.unlink(tmp, dir_fd=dfd)
                fd = os.open(tmp, flags, FILE_MODE, dir_fd=dfd)
            try:
                try:
                    os.fchmod(fd, FILE_MODE)  # the umask may have taken the collector's read bit
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                # No fsync: the next write rebuilds the whole file, and a lost one costs one scrape.
                os.rename(tmp, self._name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        finally:
            os.close(dfd)


def _reason(rec: KillRecord) -> str:
    """The kill reason label: the record's ``pressure.kill_reason``; in observe mode who killed
    (``kernel_oom``, ``process``); else ``unknown``."""
    if rec.pressure is not None and rec.pressure.kill_reason:
        return rec.pressure.kill_reason
    if rec.killer is not None:
        return rec.killer.kind
    return "unknown"


def _unix_time(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None
