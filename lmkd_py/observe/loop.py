"""Observe mode: record the reap latency of kills that lmkd-py did not make. Never kills.

``lmkd-py observe`` watches every SIGKILL on the system (the kernel OOM killer's, Android lmkd's, a vendor
daemon's, systemd-oomd's, a shell's) and writes one ``KillRecord`` per killed process, in the format of
lmkd-py's own kills (``observed`` true, ``killer`` saying who), so ``report`` and ``compare`` read them
unchanged. It is meant to be left on in the field: the cost is the kernel's tracepoints (a ring-buffer
write per exit) plus one wake-up of this loop per second; see benchmarks/observe_overhead.py.

Modules: this one runs the loop (``run_observe``) and the command (``cmd_observe``);
``trace`` owns the two tracefs instances and the proc connector, ``track`` matches events
to victims, ``record`` builds the records, ``procs`` reads /proc.

The loop, per wake-up (a SIGKILL-related event wakes it at once; otherwise once a second, or every
``PENDING_TICK_NS`` while a kill is pending):

1. ``t`` = now; read the signal instance. For each ``process_mrelease`` entry read the caller's
   ``/proc/TID/fdinfo/FD`` (the pidfd's target, before the killer closes it); for each SIGKILL read the
   target's and the sender's /proc files.
2. Read the exit flight recorder (decoded only when a kill is pending) and, while a kill is pending,
   the proc connector (listened to only then).
3. Feed every event older than ``t`` to the tracker in timestamp order (later ones wait for the next
   round: an event of the other instance or the connector may still come before them), and write the
   records of the kills that are finished.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import structlog

from lmkd_py import __version__, provenance
from lmkd_py import log as logsetup
from lmkd_py.config import Config, ConfigError, load_config_isolated
from lmkd_py.journal import JournalSender
from lmkd_py.metrics import Metrics
from lmkd_py.observe.health import TRACEFS_RETRY_NS, keep_status, kill_summary, open_trace, waiting_state
from lmkd_py.observe.procs import MemSampler, WarmTable, read_pidfd_target, read_task_facts, read_victim_facts
from lmkd_py.observe.record import build_record
from lmkd_py.observe.trace import ExitListener, ObserveTrace
from lmkd_py.observe.track import GENERATE, MR_ENTER, ObservedKill, Tracker
from lmkd_py.procfs import ProcFs, ProcParseError, cgroup_v2_relpath, parse_pressure
from lmkd_py.records import KillRecord, RecordsPathError, open_writer
from lmkd_py.sdnotify import Notifier
from lmkd_py.status import StatusFile, runtime_dir
from lmkd_py.status import claim as claim_status
from lmkd_py.tracing import ProcExit, TraceEvent, parse_kernel_version

IDLE_TICK_NS = 1_000_000_000  # drain the exit recorder, sample MemAvailable
PENDING_TICK_NS = 20_000_000
WARM_REFRESH_NS = 5_000_000_000
WARM_MIN_RSS_KIB = 16 * 1024
HORIZON_MARGIN_NS = 2_000_000  # commit lag between an event's timestamp and its readability
FOREVER_NS = 1 << 62
MAX_STEP_FAILURES = 10


class Sink(Protocol):
    def write(self, record: KillRecord) -> bool: ...


class Observer:
    """The loop's state (module docstring). Built by ``run_observe``; ``step()`` is one wake-up."""

    def __init__(
        self,
        cfg: Config,
        trace: ObserveTrace,
        listener: ExitListener | None,
        *,
        sink: Sink,
        proc: ProcFs,
        scope_cgroup: str | None,
        scope_dir: Path | None,
        warm_min_rss_kib: int,
        warm_refresh_ns: int,
        log: Any,
        journal: JournalSender | None = None,
    ) -> None:
        self.trace = trace
        self.listener = listener
        self.sink = sink
        self.proc = proc
        self.log = log
        self.clock = time.monotonic_ns
        self.kernel_version = parse_kernel_version(os.uname().release)
        self.provenance = provenance.collect(cfg.digest())
        self.warm = WarmTable(proc, min_rss_kib=warm_min_rss_kib, scope_dir=scope_dir, clock=self.clock)
        self.warm_refresh_ns = warm_refresh_ns
        self.mem = MemSampler(proc)
        self.tracker = Tracker(
            timeout_ns=cfg.kill.exit_timeout_ms * 1_000_000,
            scope_cgroup=scope_cgroup,
            mem_before=self.mem.before,
            exit_traced=trace.exits is not None,
        )
        self.setup_notes = list(trace.notes)
        if listener is None:
            self.setup_notes.append("proc_exit_ns: proc connector unavailable")
        self._carry: list[TraceEvent] = []
        self._carry_proc: list[ProcExit] = []
        self._next_idle_ns = 0
        self._last_read_ns = 0  # nothing read yet: keep every exit event
        self._next_warm_ns = 0
        self.written = 0
        self.dropped = 0
        self.kills_seen = 0
        self.last_kills: deque[dict[str, Any]] = deque(maxlen=5)  # for lmkd-py status
        self.scope_dir = scope_dir
        # Fed from the records written (_write), so metrics and records never disagree.
        self.metrics = Metrics(cfg.metrics.textfile, mode="observe", read_pressure=self._read_avg10)
        # One structured journal entry per record written (journal.py); None or disabled off systemd.
        self.journal = journal

    def _read_avg10(self) -> tuple[float | None, float | None] | None:
        """For the metrics' slow rewrite: memory PSI avg10 (some, full) of the scope now, or None."""
        try:
            if self.scope_dir is not None:
                psi = parse_pressure((self.scope_dir / "memory.pressure").read_text())
            else:
                psi = self.proc.pressure()
        except (OSError, ProcParseError):
            return None
        return psi.some.avg10, psi.full.avg10 if psi.full is not None else None

    def housekeeping(self, now_ns: int) -> None:
        """Idle work: drain the exit recorder undecoded, sample MemAvailable, refresh the warm table."""
        if now_ns >= self._next_idle_ns:
            # Only what precedes the last read of the signal instance may go: a kill after it is not
            # known yet, and its exits must stay.
            self.trace.read_exit_events(self._last_read_ns - HORIZON_MARGIN_NS, False, [])
            self.mem.sample(self.clock())
            self._next_idle_ns = now_ns + IDLE_TICK_NS
        if now_ns >= self._next_warm_ns:
            self.warm.refresh()
            self._next_warm_ns = now_ns + self.warm_refresh_ns

    def timeout_ms(self, now_ns: int) -> int:
        if self.tracker.pending or self._carry or self._carry_proc:
            return PENDING_TICK_NS // 1_000_000
        due = min(self._next_idle_ns, self._next_warm_ns)
        return max(1, min(IDLE_TICK_NS, due - now_ns) // 1_000_000 + 1)

    def _enrich(self, events: list[TraceEvent], now_ns: int, notes: list[str]) -> None:
        """Read what only /proc knows, at once: first the pidfd targets (a killer closes its pidfd right
        after process_mrelease), then, after subscribing to exit events when a SIGKILL came (a small
        victim is gone within milliseconds), the SIGKILLs' targets and senders."""
        tr = self.tracker
        for ev in events:
            if ev.name == MR_ENTER:
                fd = ev.fields.get("pidfd")
                target = read_pidfd_target(self.proc, ev.pid, fd) if isinstance(fd, int) else None
                if target is not None:
                    tr.add_mrelease_target(ev.pid, ev.ts_ns, target)
                if tr.facts(ev.pid) is None:
                    caller = read_task_facts(self.proc, ev.pid)
                    if caller is not None:
                        tr.add_facts(caller, now_ns)
        listener = self.listener
        if listener is not None and not listener.listening and any(e.name == GENERATE for e in events):
            try:
                listener.listen()
            except OSError as exc:
                notes.append(f"proc connector listen failed ({exc.strerror})")
        for ev in events:
            if ev.name != GENERATE or ev.fields.get("result") != 0:
                continue
            target_field = ev.fields.get("pid")
            if not isinstance(target_field, int) or target_field in tr.pending:
                continue
            target = target_field
            raw = ev.fields.get("comm")
            comm = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else None
            facts = read_victim_facts(self.proc, self.warm, target, comm, now_ns)
            if facts is not None:
                tr.add_facts(facts, now_ns)
            if ev.pid != target and ev.pid > 0:
                sender = read_task_facts(self.proc, ev.pid)
                if sender is not None:
                    tr.add_facts(sender, now_ns)

    def step(self, final: bool = False) -> None:
        """Read what is there, feed what is final, write what is finished. ``final``: the last call
        before stopping: everything read is fed and every pending kill is written as it stands."""
        tr = self.tracker
        t = self.clock()
        notes: list[str] = []
        sig = self.trace.read_signal_events(notes)
        self._last_read_ns = t
        self._enrich(sig, t, notes)
        self._carry.extend(sig)
        gens = [e.ts_ns for e in self._carry if e.name == GENERATE]
        pending = bool(tr.pending or gens)
        listener = self.listener
        horizon = min([t, *gens, *([tr.oldest_ns] if tr.oldest_ns is not None else [])]) - HORIZON_MARGIN_NS
        self._carry.extend(self.trace.read_exit_events(horizon, pending, notes))
        if listener is not None and listener.listening:
            try:
                self._carry_proc.extend(listener.drain())
            except OSError as exc:
                notes.append(f"proc connector read failed ({exc.strerror})")
        self.trace.lost_signal_events(notes)
        cut = FOREVER_NS if final else t
        ready = sorted((e for e in self._carry if e.ts_ns < cut), key=lambda e: e.ts_ns)
        self._carry = [e for e in self._carry if e.ts_ns >= cut]
        exits = sorted((e for e in self._carry_proc if e.timestamp_ns < cut), key=lambda e: e.timestamp_ns)
        self._carry_proc = [e for e in self._carry_proc if e.timestamp_ns >= cut]
        i = 0
        for ev in ready:
            while i < len(exits) and exits[i].timestamp_ns < ev.ts_ns:
                tr.feed_proc_exit(exits[i])
                i += 1
            tr.feed(ev)
        for e in exits[i:]:
            tr.feed_proc_exit(e)
        for note in notes:
            tr.note_all(note)
            self.log.debug("observe.trace_note", note=note)
        for k in tr.due(cut):
            if final and k.timed_out:
                k.notes.append("observe was stopped before this kill's exit was complete")
            self._write(k)
        if listener is not None and listener.listening and not tr.pending and not self._carry:
            try:
                listener.ignore()
            except OSError as exc:
                self.log.debug("observe.proc_ignore_failed", error=str(exc))

    def _write(self, k: ObservedKill) -> None:
        record = build_record(
            k,
            kernel_version=self.kernel_version,
            end_ns=self.clock(),
            mem_after_kib=self.mem.read(),
            provenance=self.provenance,
            source="tracefs+proc_connector" if self.listener is not None else "tracefs",
            mrelease_traced=self.trace.mrelease_traced,
            extra_notes=self.setup_notes,
        )
        stored = self.sink.write(record)
        self.metrics.record(record, stored=stored)
        if self.journal is not None:
            self.journal.kill(record)  # never raises; a failure is logged once
        if stored:
            self.written += 1
        else:
            self.dropped += 1
        self.kills_seen += 1
        self.last_kills.appendleft(kill_summary(record))
        kt = record.kernel
        killer = record.killer
        self.log.info(
            "observe.kill",
            pid=record.victim.pid,
            comm=record.victim.comm,
            killer=killer.kind if killer else None,
            killer_pid=killer.pid if killer else None,
            killer_comm=killer.comm if killer else None,
            kill_to_exit_ms=_ms(record.kill_to_exit_ns),
            reaper_work_ms=_ms(kt.reaper_work_ns if kt else None),
            exit_mmap_ms=_ms(kt.exit_mmap_ns if kt else None),
            mrelease=record.mrelease.status.value,
        )


def _ms(ns: int | None) -> float | None:
    return round(ns / 1e6, 3) if ns is not None else None


def run_observe(
    cfg: Config,
    *,
    sink: Sink,
    duration_ns: int | None,
    cgroup: Path | None,
    stop: Callable[[], bool],
    wake_fd: int | None = None,
    tracefs_root: Path | None = None,
    procfs: ProcFs | None = None,
    warm_min_rss_kib: int = WARM_MIN_RSS_KIB,
    warm_refresh_ns: int = WARM_REFRESH_NS,
    trace_mrelease: bool = True,
    notifier: Notifier | None = None,
    status: StatusFile | None = None,
    tracefs_retry_ns: int | None = None,
    take_hup: Callable[[], bool] | None = None,
    journal: JournalSender | None = None,
) -> int:
    """Observe until ``stop()`` is true or ``duration_ns`` passed; pending kills are then written as
    they stand. Returns 0, or 1 when observing cannot start here (not root, no usable tracefs, ``cgroup``
    not a cgroup v2 directory; logged as ``observe.unavailable``) or reading the trace failed
    ``MAX_STEP_FAILURES`` times in a row. Logs ``observe.ready`` once every event is armed.
    ``wake_fd``: a file descriptor (e.g. a signal wake-up pipe) whose readability makes the loop check
    ``stop`` at once. The tracefs instances are removed on every way out (return, exception, atexit).
    ``trace_mrelease`` False leaves the syscall events off (they slow every syscall on the system a
    little, see ``trace.MRELEASE_EVENTS``): process_mrelease calls are then not recorded.
    ``status``: the status file to keep (``lmkd-py status``). ``tracefs_retry_ns``: as a service, wait
    for a usable tracefs, trying again this often, instead of returning 1 (see ``health``).
    ``take_hup``: whether a SIGHUP came since the last call (answered as a reload, see ``keep``).
    ``journal``: where each record also goes as a structured journal entry (closed on the way out).
    """
    log = structlog.get_logger("lmkd_py.observe")
    if os.geteuid() != 0:
        log.error("observe.unavailable", reason="needs root (tracefs instances, other processes' /proc)")
        return 1
    scope: str | None = None
    if cgroup is not None:
        found = _scope_of(cgroup)
        if isinstance(found, _Unavailable):
            log.error("observe.unavailable", reason=found.reason)
            return 1
        scope = found
    begun = time.monotonic_ns()

    def on_wait(why: str) -> None:
        if status is not None:
            status.update(waiting_state(why, cfg.digest(), __version__))

    opened = open_trace(
        tracefs_root, log, mrelease=trace_mrelease, retry_ns=tracefs_retry_ns, stop=stop,
        deadline_ns=begun + duration_ns if duration_ns is not None else None, wake_fd=wake_fd, notifier=notifier,
        on_wait=on_wait,
    )
    if opened.trace is None:
        if opened.stopped:
            return 0
        log.error("observe.unavailable", reason=opened.reason)
        return 1
    trace = opened.trace
    listener: ExitListener | None = None
    try:
        try:
            listener = ExitListener(parse_kernel_version(os.uname().release))
        except OSError as exc:
            log.warning("observe.proc_connector_unavailable", error=exc.strerror or str(exc))
        obs = Observer(
            cfg, trace, listener, sink=sink, proc=procfs or ProcFs(), scope_cgroup=scope,
            scope_dir=cgroup, warm_min_rss_kib=warm_min_rss_kib, warm_refresh_ns=warm_refresh_ns, log=log,
            journal=journal,
        )
        poller = select.poll()
        for fd in trace.signal.fds():
            poller.register(fd, select.POLLIN)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        start = obs.clock()
        obs.housekeeping(start)
        log.info("observe.ready", pid=os.getpid(), instance=str(trace.signal.path), events=sorted(trace.enabled),
                 warm_processes=len(obs.warm), scope=scope, proc_connector=listener is not None)
        if notifier is not None:
            notifier.ready("observing SIGKILLs")
        obs.metrics.write()  # lmkd_py_up 1 at once; an unwritable path is logged now (and retried)
        deadline = begun + duration_ns if duration_ns is not None else None
        def keep(seen: int) -> int:
            if take_hup is not None and take_hup() and notifier is not None:
                # systemctl reload: say it is done, so systemd never waits in "reloading"; observe reads
                # its config at start only (log line: the operator learns a restart is needed).
                notifier.reloading()
                log.info("observe.reload", effect="a changed config takes effect on restart in observe mode")
                notifier.ready("observing SIGKILLs")
            return keep_status(status, obs, scope, seen)

        if not _observe_until(obs, poller, stop, deadline, wake_fd, notifier, log, keep):
            obs.metrics.stop()
            return 1
        try:
            obs.step(final=True)
        except OSError as exc:
            log.error("observe.step_failed", error=str(exc), failures=1)
        obs.metrics.stop()
        if notifier is not None:
            notifier.stopping()
        log.info("observe.stop", written=obs.written, dropped=obs.dropped, pending=len(obs.tracker.pending),
                 out_of_scope=obs.tracker.skipped_out_of_scope)
        return 0
    finally:
        if listener is not None:
            listener.close()
        trace.close()
        if journal is not None:
            journal.close()


@dataclass(frozen=True)
class _Unavailable:
    reason: str


def _scope_of(cgroup: Path) -> str | _Unavailable:
    """The cgroup v2 path of the directory observe is scoped to, or why it cannot be."""
    if not (cgroup / "cgroup.procs").exists():
        return _Unavailable(f"{cgroup}: not a cgroup v2 directory (no cgroup.procs)")
    scope = cgroup_v2_relpath(cgroup, Path("/proc/self/mounts").read_text())
    return scope if scope is not None else _Unavailable(f"{cgroup}: not under a cgroup2 mount")


def _observe_until(
    obs: Observer,
    poller: select.poll,
    stop: Callable[[], bool],
    deadline: int | None,
    wake_fd: int | None,
    notifier: Notifier | None,
    log: Any,
    keep: Callable[[int], int],
) -> bool:
    """The loop: wait, step, ping the watchdog, keep the status file (``keep``). False when reading the
    trace failed too often."""
    last_ping: int | None = None  # the first completed step pings: systemd counts from READY=1
    failures = 0
    seen = keep(-1)
    while not stop():
        now = obs.clock()
        if deadline is not None and now >= deadline:
            break
        timeout = obs.timeout_ms(now)
        if notifier is not None and notifier.watchdog_interval_ns:
            timeout = min(timeout, notifier.watchdog_interval_ns // 1_000_000)
        if deadline is not None:
            timeout = max(0, min(timeout, (deadline - now) // 1_000_000 + 1))
        woken = poller.poll(timeout)
        if wake_fd is not None and any(fd == wake_fd for fd, _ in woken):
            with contextlib.suppress(OSError):
                os.read(wake_fd, 4096)
        try:
            obs.step()
            if not obs.tracker.pending:
                obs.housekeeping(obs.clock())
            obs.metrics.tick(obs.clock())
            failures = 0
            # Pinged only after a step completes: a stuck loop stops the pings (as the kill loop).
            wd = notifier.watchdog_interval_ns if notifier is not None else None
            if notifier is not None and wd and (last_ping is None or obs.clock() - last_ping >= wd):
                notifier.watchdog()
                last_ping = obs.clock()
            seen = keep(seen)
        except OSError as exc:
            # tracefs or /proc refusing a read (e.g. the instance removed under us): say so, retry a
            # few times, then give up rather than spin.
            failures += 1
            log.error("observe.step_failed", error=str(exc), failures=failures)
            if failures >= MAX_STEP_FAILURES:
                return False
            time.sleep(1.0)
    return True


def cmd_observe(args: argparse.Namespace) -> int:
    """``lmkd-py observe``: run until SIGTERM/SIGINT or ``--duration``; records to ``--records`` or the
    config's records file."""
    try:
        cfg = load_config_isolated(args.config)
    except ConfigError as exc:
        print(f"lmkd-py: invalid config:\n{exc}", file=sys.stderr)
        return 2
    logsetup.configure(args.log_format, args.log_level or cfg.log_level)
    return serve(cfg, records=args.records, duration_s=args.duration, cgroup=args.cgroup, status_dir=runtime_dir())


def serve(
    cfg: Config,
    *,
    records: Path | None,
    duration_s: float | None,
    cgroup: Path | None,
    status_dir: Path | None = None,
    wait_for_tracefs: bool = False,
) -> int:
    """Observe as a process: signals, sd_notify, records file, status file (in ``status_dir``); used by
    ``lmkd-py observe`` and by the daemon when the config says ``mode = "observe"`` (which passes
    ``wait_for_tracefs``: a service waits for tracefs rather than exit into a restart loop). Returns
    run_observe's exit code."""
    from lmkd_py.sdnotify import SdNotifier

    writer = open_writer(cfg, records)
    try:
        writer.check()  # before READY=1: a refused or unwritable records path is a start failure
    except RecordsPathError as exc:
        print(f"lmkd-py: {exc}", file=sys.stderr)
        return 2
    stopping: list[int] = []
    hups: list[int] = []

    def take_hup() -> bool:
        got = bool(hups)
        hups.clear()
        return got

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    old = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    # SIGHUP (systemctl reload) would otherwise end the process, and Restart=always restart it.
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, _frame: hups.append(signum))
    try:
        duration = int(duration_s * 1e9) if duration_s is not None else None
        status = claim_status(status_dir, structlog.get_logger("lmkd_py.observe"))
        try:
            rc = run_observe(
                cfg, sink=writer, duration_ns=duration, cgroup=cgroup, stop=lambda: bool(stopping), wake_fd=rfd,
                warm_min_rss_kib=cfg.observe.min_rss_kib,
                warm_refresh_ns=cfg.observe.refresh_interval_ms * 1_000_000,
                trace_mrelease=cfg.observe.trace_mrelease, notifier=SdNotifier.from_env(), status=status,
                tracefs_retry_ns=TRACEFS_RETRY_NS if wait_for_tracefs else None, take_hup=take_hup,
                journal=JournalSender.from_env(),
            )
        finally:
            if status is not None:
                status.close()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(rfd)
        os.close(wfd)
    if writer.stats.dropped:
        print(f"lmkd-py: {writer.stats.dropped} records NOT stored: {writer.stats.last_error}", file=sys.stderr)
    if rc == 0:
        print(f"{writer.stats.written} observed kill records appended to {writer.path}", file=sys.stderr)
    return rc
