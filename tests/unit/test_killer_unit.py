"""The killer's every outcome on fakes: scripted syscalls, a fake /proc tree, a fake clock and fake exits.

The integration tests kill real processes; these pin down the decisions in between (identity, errno
handling, timeouts, memory recovery, the reaper hand-off) at their configured lengths, in milliseconds
of test time, without a real victim.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from lmkd_py.killer import Killer, KillOptions
from lmkd_py.procfs import ProcFs
from lmkd_py.records import MreleaseStatus, Outcome, Victim
from tests.fakes import fake_proc

PID = 4242
START = 777


class FakeClock:
    def __init__(self) -> None:
        self.t = 10**12
        self.lock = threading.Lock()

    def __call__(self) -> int:
        with self.lock:
            return self.t

    def advance(self, ns: int) -> None:
        with self.lock:
            self.t += ns


class FakeSyscalls:
    """pidfd_open gives a real fd (of /dev/null) so the killer may dup and close it; every call is logged;
    ``errors`` scripts an errno per call name; ``block_signal`` holds the reaper thread in the signal."""

    def __init__(self, errors: dict[str, int] | None = None, mrelease_ret: int = 0) -> None:
        self.errors = dict(errors or {})
        self.mrelease_ret = mrelease_ret
        self.calls: list[str] = []
        self.block_signal: threading.Event | None = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.errors:
            err = self.errors[name]
            raise OSError(err, os.strerror(err))

    def pidfd_open(self, pid: int, flags: int = 0) -> int:
        self._call("pidfd_open")
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    def pidfd_send_signal(self, pidfd: int, sig: int) -> None:
        if self.block_signal is not None:
            self.block_signal.wait(5)
        self._call("pidfd_send_signal")

    def process_mrelease(self, pidfd: int, flags: int = 0) -> int:
        self._call("process_mrelease")
        return self.mrelease_ret

    def mlockall(self, flags: int) -> None:
        self._call("mlockall")


class World:
    """A fake /proc with one victim whose free memory rises when it 'exits' after ``exit_after_ns``."""

    def __init__(self, root: Path, clock: FakeClock, *, exit_after_ns: int | None, freed_kib: int) -> None:
        self.root, self.clock = root, clock
        fake_proc(root, PID, "victim", 300 * 1024, start=START, adj=900)
        self.free_kib = 1_000_000
        self.freed_kib = freed_kib
        self.exit_after_ns = exit_after_ns
        self.signalled_at: int | None = None
        self._meminfo()
        (root / "zoneinfo").write_text("Node 0, zone Normal\n  pagesets\n    cpu: 0\n              count: 0\n")

    def _meminfo(self) -> None:
        (self.root / "meminfo").write_text(f"MemTotal: 4000000 kB\nMemAvailable: {self.free_kib} kB\n")

    def wait_exit(self, pidfd: int, timeout_ms: int) -> bool:
        """Advance the fake clock by the poll timeout; the victim 'exits' (and frees) on schedule."""
        if self.signalled_at is None:
            self.signalled_at = self.clock()
        self.clock.advance(timeout_ms * 1_000_000)
        if self.exit_after_ns is not None and self.clock() - self.signalled_at >= self.exit_after_ns:
            if self.free_kib == 1_000_000:
                self.free_kib += self.freed_kib
                self._meminfo()
            return True
        return False


def make(tmp_path: Path, *, exit_after_ms: int | None = 30, freed_kib: int = 290 * 1024,
         errors: dict[str, int] | None = None, **opts: object) -> tuple[Killer, FakeSyscalls, World, FakeClock]:
    clock = FakeClock()
    world = World(tmp_path, clock, exit_after_ns=None if exit_after_ms is None else exit_after_ms * 1_000_000,
                  freed_kib=freed_kib)
    sys_ = FakeSyscalls(errors)
    options = KillOptions(**opts)  # type: ignore[arg-type]
    killer = Killer(sys_, ProcFs(tmp_path), clock=clock, options=options,
                    sleep=lambda s: clock.advance(int(s * 1e9)), wait_exit=world.wait_exit)
    return killer, sys_, world, clock


def victim(start: int = START) -> Victim:
    return Victim(pid=PID, comm="victim", start_time_ticks=start)


def test_killed_with_exit_and_memory_back_at_fake_times(tmp_path: Path) -> None:
    killer, sys_, _world, _clock = make(tmp_path, exit_after_ms=30)
    try:
        rec = killer.kill(victim())
    finally:
        killer.close()
    assert rec.outcome is Outcome.KILLED and rec.mrelease.status is MreleaseStatus.OK
    assert sys_.calls == ["pidfd_open", "pidfd_send_signal", "process_mrelease"]
    assert rec.kill_to_exit_ns is not None and 30_000_000 <= rec.kill_to_exit_ns <= 40_000_000
    assert rec.mem_recovered_kib == 290 * 1024 and rec.kill_to_mem_recovered_ns is not None
    assert rec.victim.oom_score_adj == 900 and rec.victim.rss_kib == 300 * 1024


def test_exit_timeout_at_its_configured_length(tmp_path: Path) -> None:
    killer, _sys, _world, _clock = make(tmp_path, exit_after_ms=None, exit_timeout_ns=3_000_000_000)
    try:
        rec = killer.kill(victim())
    finally:
        killer.close()
    assert rec.outcome is Outcome.EXIT_TIMEOUT and rec.exit_timeout_ns == 3_000_000_000
    assert rec.steps.exit_observed_ns is None and "3000 ms" in (rec.error or "")
    assert rec.steps.end_ns - (rec.steps.signal_sent_ns or 0) >= 3_000_000_000


def test_memory_not_back_is_noted_after_its_timeout(tmp_path: Path) -> None:
    killer, _sys, _world, _clock = make(tmp_path, exit_after_ms=10, freed_kib=0, mem_recovery_timeout_ns=500_000_000)
    try:
        rec = killer.kill(victim())
    finally:
        killer.close()
    assert rec.outcome is Outcome.KILLED and rec.steps.mem_recovered_ns is None
    assert any("did not rise" in n for n in rec.notes)


def test_pid_reused_is_refused_before_any_signal(tmp_path: Path) -> None:
    killer, sys_, _world, _clock = make(tmp_path)
    rec = killer.kill(victim(start=START + 1))
    assert rec.outcome is Outcome.REFUSED_IDENTITY and sys_.calls == ["pidfd_open"]


@pytest.mark.parametrize(("call", "err", "outcome"), [
    ("pidfd_open", errno.ESRCH, Outcome.GONE),
    ("pidfd_open", errno.EPERM, Outcome.SIGNAL_FAILED),
    ("pidfd_send_signal", errno.ESRCH, Outcome.GONE),
    ("pidfd_send_signal", errno.EPERM, Outcome.SIGNAL_FAILED),
])
def test_signal_path_errors(tmp_path: Path, call: str, err: int, outcome: Outcome) -> None:
    killer, sys_, _world, _clock = make(tmp_path, errors={call: err})
    try:
        rec = killer.kill(victim())
    finally:
        killer.close()
    assert rec.outcome is outcome and "process_mrelease" not in sys_.calls
    assert rec.mrelease.status is MreleaseStatus.NOT_ATTEMPTED


@pytest.mark.parametrize(("err", "status"), [
    (errno.ESRCH, MreleaseStatus.ALREADY_RELEASED),
    (errno.EINVAL, MreleaseStatus.ERROR),
    (errno.ENOSYS, MreleaseStatus.UNSUPPORTED),
    (errno.EAGAIN, MreleaseStatus.ERROR),
])
def test_mrelease_errors_are_recorded_and_the_kill_still_counts(
    tmp_path: Path, err: int, status: MreleaseStatus
) -> None:
    killer, sys_, _world, _clock = make(tmp_path, errors={"process_mrelease": err})
    try:
        rec = killer.kill(victim())
        assert rec.outcome is Outcome.KILLED and rec.mrelease.status is status
        assert rec.mrelease.errno == err
        if err == errno.EAGAIN:  # transient: exactly one retry
            assert sys_.calls.count("process_mrelease") == 2
        if err == errno.ENOSYS:  # never tried again
            fake_proc(tmp_path, PID + 1, "second", 10 * 1024, start=START)
            rec2 = killer.kill(Victim(pid=PID + 1, start_time_ticks=START))
            assert rec2.mrelease.status is MreleaseStatus.UNSUPPORTED and sys_.calls.count("process_mrelease") == 1
    finally:
        killer.close()


def test_dry_run_signals_nothing(tmp_path: Path) -> None:
    killer, sys_, _world, _clock = make(tmp_path)
    rec = killer.kill(victim(), dry_run=True)
    assert rec.outcome is Outcome.DRY_RUN and "pidfd_send_signal" not in sys_.calls


def test_mrelease_disabled_by_options(tmp_path: Path) -> None:
    killer, sys_, _world, _clock = make(tmp_path, mrelease=False)
    try:
        rec = killer.kill(victim())
    finally:
        killer.close()
    assert rec.outcome is Outcome.KILLED and rec.mrelease.status is MreleaseStatus.DISABLED
    assert "process_mrelease" not in sys_.calls


def test_a_stuck_reaper_thread_does_not_stall_the_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18 item 8: the hand-off to the reaper thread has a timeout, and a new thread takes over."""
    import lmkd_py.reaper as reaper_mod

    monkeypatch.setattr(reaper_mod, "HANDOFF_TIMEOUT_S", 0.05)
    killer, sys_, _world, _clock = make(tmp_path)
    stuck = threading.Event()
    sys_.block_signal = stuck
    try:
        first_tid = killer.reaper.tid
        rec = killer.kill(victim())
        assert rec.outcome is Outcome.SIGNAL_FAILED and "did not send SIGKILL" in (rec.error or "")
        sys_.block_signal = None
        stuck.set()  # the old thread finishes its job (on its own duplicate of the pidfd) and idles
        rec2 = killer.kill(victim())
        assert rec2.outcome is Outcome.KILLED and killer.reaper.tid != first_tid
    finally:
        stuck.set()
        killer.close()


def test_a_group_kill_signals_through_cgroup_kill_and_links_the_records(tmp_path: Path) -> None:
    """Issue 12 item 3 on the fakes: one write to cgroup.kill instead of a signal per member, a reap per
    member, one kill_id; without a usable cgroup.kill, one pidfd signal each."""
    killer, sys_, world, _clock = make(tmp_path / "proc", exit_after_ms=20)
    fake_proc(tmp_path / "proc", PID + 1, "second", 100 * 1024, start=START, adj=900)
    kill_file = tmp_path / "cgroup.kill"
    kill_file.write_text("")
    members = [victim(), Victim(pid=PID + 1, comm="second", start_time_ticks=START)]
    try:
        recs = killer.kill_group(members, kill_file=kill_file)
        assert kill_file.read_text() == "1"
        assert [r.outcome for r in recs] == [Outcome.KILLED, Outcome.KILLED]
        assert len({r.kill_id for r in recs}) == 1 and recs[0].kill_id
        assert "pidfd_send_signal" not in sys_.calls and sys_.calls.count("process_mrelease") == 2
        assert all(r.steps.signal_sent_ns == recs[0].steps.signal_sent_ns for r in recs)
        sys_.calls.clear()
        world.signalled_at = None
        recs = killer.kill_group(members, kill_file=tmp_path)  # a directory: the write fails
        assert sys_.calls.count("pidfd_send_signal") == 2
        assert all(any("member by member" in n for n in r.notes) for r in recs)
    finally:
        killer.close()


def test_a_group_member_that_changed_identity_is_refused_alone(tmp_path: Path) -> None:
    killer, sys_, _world, _clock = make(tmp_path / "proc")
    fake_proc(tmp_path / "proc", PID + 1, "second", 100 * 1024, start=START, adj=900)
    try:
        recs = killer.kill_group([victim(), Victim(pid=PID + 1, start_time_ticks=START + 7)], kill_file=None)
    finally:
        killer.close()
    assert sorted(r.outcome.value for r in recs) == ["killed", "refused_identity"]
    assert sys_.calls.count("pidfd_send_signal") == 1
