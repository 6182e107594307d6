"""One kill as a sequence of timestamped steps (the reaper thread that signals and reaps: ``reaper.py``).

The steps (all CLOCK_MONOTONIC ns, recorded in ``records.Steps``):

    pidfd_open -> identity check (start time) -> sizes + free memory -> [reaper thread:
    pidfd_send_signal(SIGKILL) then process_mrelease at once] -> pidfd polls readable (exit)
    -> free memory back by the victim's anonymous + shmem RSS (or a timeout)

"Free memory" is ``ProcFs.free_memory_kib``: MemAvailable plus the per-CPU free lists. The record keeps
the historical field names ``mem_available_*_kib`` for it (schema version 1).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from lmkd_py import reaper as reaper_mod
from lmkd_py.config import KillConfig
from lmkd_py.procfs import ProcFs, ProcParseError, cgroup_v2_path
from lmkd_py.reaper import ReaperThread, ReapJob, poll_readable
from lmkd_py.records import (
    KernelTimeline,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Pressure,
    Provenance,
    Steps,
    Victim,
    errno_name,
)
from lmkd_py.syscalls import Syscalls

Clock = Callable[[], int]
log = structlog.get_logger("lmkd_py.killer")


class KillTracer(Protocol):
    """What the killer needs of the optional kernel tracer (``lmkd_py.tracing`` makes the real one);
    the one definition of this protocol."""

    def before_kill(
        self, victim_pid: int, reaper_tid: int, *, rss_baseline_kib: Mapping[str, int] | None = None
    ) -> None:
        """After the identity check, before SIGKILL. Cheap (~0.2-0.4 ms here); never raises.
        ``rss_baseline_kib``: the victim's RSS by kind as just read, saving a /proc read."""

    def after_kill(
        self, victim_pid: int, reaper_tid: int, rss_before_kib: int | None, mrelease_wall_ns: int | None
    ) -> KernelTimeline:
        """After the exit was observed (or timed out). Never raises for read or parse trouble."""

    def close(self) -> None:
        """Remove the instance; idempotent."""


@dataclass(frozen=True)
class KillOptions:
    """Knobs of one kill (the daemon fills them from the config)."""

    mrelease: bool = True  # call process_mrelease after SIGKILL (off: the benchmark's baseline)
    exit_timeout_ns: int = 3_000_000_000  # give up waiting for the exit after this long (config's default)
    mem_recovery_timeout_ns: int = 2_000_000_000  # after the exit, wait at most this long for MemAvailable
    mem_recovery_fraction: float = 0.9  # "back" = MemAvailable rose by this share of anon+shmem RSS
    mem_poll_interval_ns: int = 2_000_000  # MemAvailable sampling period while waiting

    @classmethod
    def from_config(cls, k: KillConfig) -> KillOptions:
        return cls(
            mrelease=k.mrelease,
            exit_timeout_ns=k.exit_timeout_ms * 1_000_000,
            mem_recovery_timeout_ns=k.mem_recovery_timeout_ms * 1_000_000,
            mem_recovery_fraction=k.mem_recovery_fraction,
        )


class Killer:
    """Makes kills and returns one KillRecord for each attempt. Never raises for a kill that failed:
    the record says what happened. Not thread-safe: one kill at a time (the daemon's rule too)."""

    def __init__(
        self,
        syscalls: Syscalls,
        procfs: ProcFs | None = None,
        *,
        clock: Clock = time.monotonic_ns,
        options: KillOptions | None = None,
        tracer: KillTracer | None = None,
        provenance: Provenance | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wait_exit: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.sys = syscalls
        self.proc = procfs or ProcFs()
        self.clock = clock
        self.sleep = sleep
        # (pidfd, timeout ms) -> whether the pidfd polls readable (the victim exited); a test's fake
        # clock and exits come in here.
        self.wait_exit = wait_exit or poll_readable
        self.options = options or KillOptions()
        self.tracer = tracer
        self.provenance = provenance or Provenance()
        self._mrelease_supported = True
        self._reaper: ReaperThread | None = None

    @property
    def reaper(self) -> ReaperThread:
        if self._reaper is None:
            self._reaper = ReaperThread(self.sys, self.clock)
        return self._reaper

    def close(self) -> None:
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper = None

    # -------------------------------------------------------------------------------------------
    def snapshot(self, pid: int) -> Victim:
        """What we know of ``pid`` now (identity and description). Raises FileNotFoundError if gone."""
        st = self.proc.stat(pid)
        victim = Victim(pid=pid, comm=st.comm, start_time_ticks=st.start_time_ticks)
        return self._describe(victim)

    def _describe(self, v: Victim) -> Victim:
        """Fill what a snapshot lacks (cmdline, cgroup, adj); each piece is optional."""
        update: dict[str, Any] = {}
        try:
            if v.cmdline is None:
                update["cmdline"] = " ".join(self.proc.cmdline(v.pid))[:512]
            if v.cgroup is None:
                update["cgroup"] = cgroup_v2_path(self.proc.cgroup(v.pid))
            if v.oom_score_adj is None:
                update["oom_score_adj"] = self.proc.oom_score_adj(v.pid)
        except (FileNotFoundError, ProcParseError) as exc:
            log.debug("kill.describe_failed", pid=v.pid, reason=str(exc))
        return dataclasses.replace(v, **update) if update else v

    def kill(
        self,
        expected: Victim,
        *,
        dry_run: bool = False,
        pressure: Pressure | None = None,
        pidfd: int | None = None,
    ) -> KillRecord:
        """Kill ``expected.pid`` if it is still the process ``expected`` describes.

        ``expected.start_time_ticks`` is the identity: when None the process found now is taken as is
        (the CLI's "kill this pid now"). ``pidfd``: one held since the victim was ranked (the candidate
        table's); the kill works on a duplicate and leaves it open. Returns the record; never raises
        for kill failures.
        """
        t_start = self.clock()
        notes: list[str] = []
        b = _RecordBuilder(expected, t_start, dry_run, pressure, notes)
        # 1. pidfd first, then the identity check: once the pidfd is open it names one process for
        #    good, so a start time read after opening it that matches proves the pidfd is our victim.
        try:
            pidfd = os.dup(pidfd) if pidfd is not None else self.sys.pidfd_open(expected.pid, 0)
        except OSError as exc:
            outcome = Outcome.GONE if exc.errno == errno.ESRCH else Outcome.SIGNAL_FAILED
            return self._finish(b, outcome, error=f"pidfd_open: {_err(exc)}")
        b.steps["pidfd_opened_ns"] = self.clock()
        try:
            early = self._prepare(b, expected)
            if early is not None:
                return early
            if dry_run:
                return self._finish(b, Outcome.DRY_RUN)
            return self._signal_and_wait(b, pidfd)
        finally:
            _close(pidfd)

    def _prepare(self, b: _RecordBuilder, expected: Victim) -> KillRecord | None:
        """With the pidfd open: the identity check, then sizes and free memory just before the kill.
        Returns the finished record when the kill must stop here, else None (ready to signal)."""
        try:
            st = self.proc.stat(expected.pid)
        except (FileNotFoundError, ProcParseError) as exc:
            return self._finish(b, Outcome.GONE, error=f"stat after pidfd_open: {exc}")
        b.steps["identity_checked_ns"] = self.clock()
        if expected.start_time_ticks is not None and st.start_time_ticks != expected.start_time_ticks:
            return self._finish(
                b,
                Outcome.REFUSED_IDENTITY,
                error=(
                    f"pid {expected.pid} now has start time {st.start_time_ticks}, expected "
                    f"{expected.start_time_ticks}: another process reuses the pid; nothing signalled"
                ),
            )
        victim = dataclasses.replace(expected, start_time_ticks=st.start_time_ticks, comm=st.comm)
        # 2. sizes by kind, just before the kill.
        try:
            victim = dataclasses.replace(victim, **self.proc.status(expected.pid).victim_fields())
        except (FileNotFoundError, ProcParseError) as exc:
            b.notes.append(f"status unreadable before the kill: {exc}")
        b.victim = self._describe(victim)
        b.free_before_kib = self._free_memory(b)
        b.steps["sizes_read_ns"] = self.clock()
        return None

    def kill_group(
        self,
        members: list[Victim],
        *,
        kill_file: Path | None,
        dry_run: bool = False,
        pressure: Pressure | None = None,
    ) -> list[KillRecord]:
        """Kill the members of one cgroup as one kill; one record per member, all with one ``kill_id``.

        Every member's pidfd is opened and its identity checked first; then ``kill_file`` (the cgroup's
        ``cgroup.kill``, Linux 5.14+) SIGKILLs them all at once, or — without one, or when writing it
        fails — each gets SIGKILL through its pidfd. process_mrelease follows for each on the reaper
        thread, and the kill waits for every exit and for the members' memory together. The kernel
        timeline follows one victim at a time, so a group kill is not traced (noted)."""
        kill_id = str(uuid.uuid4())
        records: list[KillRecord] = []
        ready: list[tuple[_RecordBuilder, int]] = []
        for v in members:
            b = _RecordBuilder(v, self.clock(), dry_run, pressure, [], kill_id=kill_id)
            try:
                pidfd = self.sys.pidfd_open(v.pid, 0)
            except OSError as exc:
                outcome = Outcome.GONE if exc.errno == errno.ESRCH else Outcome.SIGNAL_FAILED
                records.append(self._finish(b, outcome, error=f"pidfd_open: {_err(exc)}"))
                continue
            b.steps["pidfd_opened_ns"] = self.clock()
            early = self._prepare(b, v)
            if early is not None:
                _close(pidfd)
                records.append(early)
                continue
            ready.append((b, pidfd))
        try:
            if dry_run:
                return records + [self._finish(b, Outcome.DRY_RUN) for b, _ in ready]
            return records + self._signal_group(ready, kill_file)
        finally:
            for _, pidfd in ready:
                _close(pidfd)

    def _signal_group(self, ready: list[tuple[_RecordBuilder, int]], kill_file: Path | None) -> list[KillRecord]:
        opts = self.options
        reaper = self.reaper
        do_mrelease = opts.mrelease and self._mrelease_supported
        sent_ns: int | None = None
        why_not_file: str | None = None
        if kill_file is not None and ready:
            try:
                fd = os.open(kill_file, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.write(fd, b"1")
                finally:
                    os.close(fd)
                sent_ns = self.clock()
            except OSError as exc:
                why_not_file = f"{kill_file}: {exc.strerror or exc}; SIGKILL sent member by member"
        jobs = [(b, pidfd, reaper.submit(pidfd, do_mrelease, signal=sent_ns is None)) for b, pidfd in ready]
        out: list[KillRecord] = []
        pending: list[tuple[_RecordBuilder, int, ReapJob]] = []
        for b, pidfd, job in jobs:
            b.notes.append("whole-cgroup kill: " + (f"cgroup.kill at {kill_file}" if sent_ns else "one pidfd each"))
            if why_not_file:
                b.notes.append(why_not_file)
            if not job.signalled.wait(timeout=reaper_mod.HANDOFF_TIMEOUT_S) or job.signal_error is not None:
                err = job.signal_error
                outcome = Outcome.GONE if err is not None and err.errno == errno.ESRCH else Outcome.SIGNAL_FAILED
                b.mrelease = Mrelease(status=MreleaseStatus.NOT_ATTEMPTED, reaper_tid=reaper.tid)
                out.append(self._finish(b, outcome, error=f"pidfd_send_signal: {_err(err) if err else 'no hand-off'}"))
                continue
            b.steps["signal_sent_ns"] = sent_ns if sent_ns is not None else job.signal_sent_ns
            b.exit_timeout_ns = opts.exit_timeout_ns
            b.notes.append("kernel timeline: not traced for a whole-cgroup kill (one victim at a time)")
            pending.append((b, pidfd, job))
        return out + self._wait_group(pending)

    def _wait_group(self, pending: list[tuple[_RecordBuilder, int, ReapJob]]) -> list[KillRecord]:
        """Wait for every member's exit and for their memory together; then finish each record."""
        opts = self.options
        if not pending:
            return []
        targets = [self._recovery_target(b.victim) for b, _, _ in pending]
        target = sum(t for t in targets if t is not None) or None
        before = pending[0][0].free_before_kib
        first_sent = min(b.steps["signal_sent_ns"] or 0 for b, _, _ in pending)
        deadline = first_sent + opts.exit_timeout_ns
        recovered_ns: int | None = None
        while True:
            now = self.clock()
            for b, pidfd, _ in pending:
                if b.steps.get("exit_observed_ns") is None and self.wait_exit(pidfd, 0):
                    b.steps["exit_observed_ns"] = self.clock()
            if recovered_ns is None and before is not None:
                free = self._free_memory(pending[0][0])
                if free is not None and (target is None or free - before >= target):
                    recovered_ns = self.clock()
            exited = all(b.steps.get("exit_observed_ns") is not None for b, _, _ in pending)
            reaped = all(job.done.is_set() for _, _, job in pending)
            if exited and reaped and (recovered_ns is not None or before is None):
                break
            if now >= deadline + (opts.mem_recovery_timeout_ns if exited else 0):
                break
            self.sleep(opts.mem_poll_interval_ns / 1e9)
        out = []
        for (b, _pidfd, job), member_target in zip(pending, targets, strict=True):
            job.done.wait(timeout=opts.exit_timeout_ns / 1e9)
            b.mrelease = self._mrelease_result(job, opts.mrelease and self._mrelease_supported, self.reaper.tid)
            b.steps["mrelease_start_ns"] = job.mrelease_start_ns
            b.steps["mrelease_end_ns"] = job.mrelease_end_ns
            b.steps["mem_recovered_ns"] = recovered_ns
            b.recovery_target = member_target
            b.free_after_kib = self._free_memory(b)
            if b.steps.get("exit_observed_ns") is None:
                out.append(self._finish(b, Outcome.EXIT_TIMEOUT,
                                        error=f"no exit within {opts.exit_timeout_ns // 1_000_000} ms of SIGKILL"))
            else:
                out.append(self._finish(b, Outcome.KILLED))
        return out

    def _signal_and_wait(self, b: _RecordBuilder, pidfd: int) -> KillRecord:
        opts = self.options
        reaper = self.reaper
        do_mrelease = opts.mrelease and self._mrelease_supported
        if self.tracer is not None:
            v = b.victim
            # The sizes just read save the tracer a status read on the kill path.
            base = {k: x for k, x in (("anon", v.rss_anon_kib), ("file", v.rss_file_kib),
                                      ("shmem", v.rss_shmem_kib), ("swap", v.swap_kib)) if x is not None}
            self.tracer.before_kill(v.pid, reaper.tid, rss_baseline_kib=base or None)
        job = reaper.submit(pidfd, do_mrelease)
        handoff_s = reaper_mod.HANDOFF_TIMEOUT_S
        if not job.signalled.wait(timeout=handoff_s):
            # The reaper thread is stuck (e.g. in an earlier process_mrelease behind a D-state task's
            # mmap_lock). Leave it the job (its own pidfd names the victim for good) and start a new one.
            self._reaper = None
            b.mrelease = Mrelease(status=MreleaseStatus.NOT_ATTEMPTED, reaper_tid=reaper.tid)
            log.error("reap.handoff_timeout", pid=b.victim.pid, reaper_tid=reaper.tid, timeout_s=handoff_s)
            return self._finish(b, Outcome.SIGNAL_FAILED, error=(
                f"the reaper thread (tid {reaper.tid}) did not send SIGKILL within {handoff_s:g} s; "
                "a new reaper thread takes over"))
        if job.signal_error is not None:
            exc = job.signal_error
            outcome = Outcome.GONE if exc.errno == errno.ESRCH else Outcome.SIGNAL_FAILED
            b.mrelease = Mrelease(status=MreleaseStatus.NOT_ATTEMPTED, reaper_tid=reaper.tid)
            return self._finish(b, outcome, error=f"pidfd_send_signal: {_err(exc)}")
        assert job.signal_sent_ns is not None
        b.steps["signal_sent_ns"] = job.signal_sent_ns
        log.info("kill.sent", pid=b.victim.pid, comm=b.victim.comm, rss_kib=b.victim.rss_kib)

        target = self._recovery_target(b.victim)
        b.recovery_target = target
        b.exit_timeout_ns = opts.exit_timeout_ns
        exit_deadline = job.signal_sent_ns + opts.exit_timeout_ns
        recovery_deadline: int | None = None
        interval_ms = max(1, opts.mem_poll_interval_ns // 1_000_000)
        while True:
            now = self.clock()
            if b.steps.get("exit_observed_ns") is None and self.wait_exit(pidfd, interval_ms):
                exit_ns = self.clock()
                b.steps["exit_observed_ns"] = exit_ns
                recovery_deadline = exit_ns + opts.mem_recovery_timeout_ns
            if b.steps.get("mem_recovered_ns") is None and b.free_before_kib is not None:
                free = self._free_memory(b)
                if free is not None and (target is None or free - b.free_before_kib >= target):
                    b.steps["mem_recovered_ns"] = self.clock()
            exited = b.steps.get("exit_observed_ns") is not None
            recovered = b.steps.get("mem_recovered_ns") is not None or b.free_before_kib is None
            if exited and job.done.is_set() and recovered:
                break
            if not exited and now >= exit_deadline:
                break
            if exited and recovery_deadline is not None and now >= recovery_deadline and job.done.is_set():
                b.notes.append(
                    f"MemAvailable did not rise by the target {target} KiB within "
                    f"{opts.mem_recovery_timeout_ns // 1_000_000} ms of the exit"
                )
                break
            if exited:
                self.sleep(opts.mem_poll_interval_ns / 1e9)
        job.done.wait(timeout=opts.exit_timeout_ns / 1e9)
        b.mrelease = self._mrelease_result(job, do_mrelease, reaper.tid)
        b.steps["mrelease_start_ns"] = job.mrelease_start_ns
        b.steps["mrelease_end_ns"] = job.mrelease_end_ns
        if self.tracer is not None:
            b.kernel = self.tracer.after_kill(
                b.victim.pid, reaper.tid, b.victim.rss_kib, b.mrelease.wall_ns
            )
        b.free_after_kib = self._free_memory(b)
        if b.steps.get("exit_observed_ns") is None:
            return self._finish(
                b,
                Outcome.EXIT_TIMEOUT,
                error=f"no exit within {opts.exit_timeout_ns // 1_000_000} ms of SIGKILL",
            )
        return self._finish(b, Outcome.KILLED)

    def _recovery_target(self, v: Victim) -> int | None:
        """KiB MemAvailable must rise by to call the memory back: the freed anonymous and shmem pages.
        File pages stay in the page cache and were already counted as available; below 1 MiB the
        signal is lost in the noise, so the exit alone counts."""
        freeable = (v.rss_anon_kib or 0) + (v.rss_shmem_kib or 0)
        target = int(freeable * self.options.mem_recovery_fraction)
        return target if target >= 1024 else None

    def _mrelease_result(self, job: ReapJob, attempted: bool, tid: int) -> Mrelease:
        if not attempted:
            if not self.options.mrelease:
                return Mrelease(status=MreleaseStatus.DISABLED, reaper_tid=tid)
            return Mrelease(
                status=MreleaseStatus.UNSUPPORTED,
                reaper_tid=tid,
                note="process_mrelease gave ENOSYS earlier (kernel < 5.15): kill only",
            )
        wall = (
            job.mrelease_end_ns - job.mrelease_start_ns
            if job.mrelease_end_ns is not None and job.mrelease_start_ns is not None
            else None
        )
        common: dict[str, Any] = {
            "ret": job.mrelease_ret,
            "errno": job.mrelease_errno,
            "errno_name": errno_name(job.mrelease_errno),
            "wall_ns": wall,
            "thread_cpu_ns": job.thread_cpu_ns,
            "reaper_tid": tid,
        }
        retry_note = f"retried {job.retries}x after a transient error" if job.retries else None
        err = job.mrelease_errno
        if err is None:
            return Mrelease(status=MreleaseStatus.OK, note=retry_note, **common)
        if err == errno.ESRCH:
            note = "the victim dropped its mm before the reaper got to it (benign race on a fast exit)"
            return Mrelease(status=MreleaseStatus.ALREADY_RELEASED, note=note, **common)
        if err == errno.ENOSYS:
            self._mrelease_supported = False
            log.warning("reap.unsupported", reason="process_mrelease: ENOSYS (kernel < 5.15); kill only from now")
            return Mrelease(
                status=MreleaseStatus.UNSUPPORTED,
                note="ENOSYS: kernel < 5.15; kill only from now on",
                **common,
            )
        notes = {
            errno.EINVAL: "EINVAL: the task is not dying, or its mm is shared with a live process",
            errno.EBADF: "EBADF: not a pidfd",
            errno.EINTR: "EINTR: interrupted while taking mmap_lock",
            errno.EAGAIN: "EAGAIN: an MMU notifier refused",
            errno.EPERM: "EPERM: not permitted",
        }
        note = notes.get(err, f"process_mrelease failed: {errno_name(err)}")
        if retry_note:
            note = f"{note}; {retry_note}"
        log.warning("reap.failed", errno=errno_name(err), note=note)
        return Mrelease(status=MreleaseStatus.ERROR, note=note, **common)

    def _free_memory(self, b: _RecordBuilder) -> int | None:
        """Free memory (KiB) as ``ProcFs.free_memory_kib`` counts it — MemAvailable plus the per-CPU free
        lists, which MemAvailable misses (a 256 MiB kill showed as little as +23 MiB in MemFree while
        360 MiB sat on those lists) — or None when unreadable (noted once)."""
        try:
            return self.proc.free_memory_kib()
        except (OSError, ProcParseError) as exc:
            b.note_once(f"free memory unreadable: {exc}")
            return None

    def _finish(self, b: _RecordBuilder, outcome: Outcome, error: str | None = None) -> KillRecord:
        b.steps["end_ns"] = self.clock()
        record = b.build(outcome, error, self.provenance)
        level = "info" if outcome in (Outcome.KILLED, Outcome.DRY_RUN) else "warning"
        getattr(log, level)(
            "kill.done",
            outcome=outcome.value,
            pid=record.victim.pid,
            kill_to_exit_ms=_ms(record.kill_to_exit_ns),
            mrelease=record.mrelease.status.value,
            error=error,
        )
        return record


class _RecordBuilder:
    """Collects the pieces of one record as the kill proceeds."""

    def __init__(
        self, victim: Victim, t_start: int, dry_run: bool, pressure: Pressure | None, notes: list[str],
        kill_id: str | None = None,
    ) -> None:
        self.kill_id = kill_id
        self.victim = victim
        self.dry_run = dry_run
        self.pressure = pressure
        self.notes = notes
        self.steps: dict[str, Any] = {"start_ns": t_start}
        self.free_before_kib: int | None = None
        self.free_after_kib: int | None = None
        self.recovery_target: int | None = None
        self.mrelease = Mrelease(status=MreleaseStatus.NOT_ATTEMPTED)
        self.kernel: KernelTimeline | None = None
        self.exit_timeout_ns: int | None = None

    def note_once(self, msg: str) -> None:
        if msg not in self.notes:
            self.notes.append(msg)

    def build(self, outcome: Outcome, error: str | None, provenance: Provenance) -> KillRecord:
        steps = Steps(**self.steps)
        record_id = str(uuid.uuid4())
        sent = steps.signal_sent_ns
        free_after_kib = self.free_after_kib
        pressure = self.pressure
        if pressure is not None and pressure.event_ns is not None:
            decided = sent if sent is not None else steps.sizes_read_ns
            if decided is not None:
                pressure = dataclasses.replace(pressure, decision_latency_ns=decided - pressure.event_ns)
        return KillRecord(
            record_id=record_id,
            kill_id=self.kill_id or record_id,
            wall_time=datetime.now(UTC).isoformat(timespec="microseconds"),
            outcome=outcome,
            dry_run=self.dry_run,
            victim=self.victim,
            steps=steps,
            mrelease=self.mrelease,
            mem_available_before_kib=self.free_before_kib,
            mem_available_after_kib=free_after_kib,
            mem_recovered_kib=_diff(free_after_kib, self.free_before_kib),
            mem_recovery_target_kib=self.recovery_target,
            kill_to_exit_ns=_diff(steps.exit_observed_ns, sent),
            kill_to_mem_recovered_ns=_diff(steps.mem_recovered_ns, sent),
            exit_timeout_ns=self.exit_timeout_ns,
            error=error,
            notes=list(self.notes),
            pressure=pressure,
            kernel=self.kernel,
            provenance=provenance,
        )


def _diff(later: int | None, earlier: int | None) -> int | None:
    return later - earlier if later is not None and earlier is not None else None


def _ms(ns: int | None) -> float | None:
    return round(ns / 1e6, 3) if ns is not None else None


def _err(exc: OSError) -> str:
    return f"{errno_name(exc.errno)} ({exc.strerror})"


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError as exc:  # EBADF from a fake pidfd: nothing to release
        log.debug("kill.close_failed", fd=fd, reason=str(exc))
