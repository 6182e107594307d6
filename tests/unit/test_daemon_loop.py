"""The loop's rules with fakes for the pressure source, the table and the killer; times are real
values on a FakeClock (cooldowns are tested at their configured lengths, not at zero)."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace
from typing import Any

import structlog

from lmkd_py.config import Config, KillConfig, Level
from lmkd_py.daemon import Daemon
from lmkd_py.policy import Candidate, Choice
from lmkd_py.procfs import Psi, PsiLine
from lmkd_py.psi import PressureEvent, TriggerUnavailable
from lmkd_py.records import KillRecord, ListSink, Mrelease, MreleaseStatus, Outcome, Pressure, Steps, Victim

MEDIUM = Level(name="medium", stall="some", threshold_us=200_000, window_us=2_000_000, min_oom_score_adj=800)
LOW = Level(name="low", stall="some", threshold_us=100_000, window_us=2_000_000, min_oom_score_adj=1001)
CRIT = Level(name="critical", stall="full", threshold_us=100_000, window_us=2_000_000, min_oom_score_adj=0)


class FakeClock:
    def __init__(self) -> None:
        self.t = 10**12

    def __call__(self) -> int:
        return self.t


class Source:
    description = "fake"

    def __init__(self, clock: FakeClock, psi_seq: list[Psi] | None = None) -> None:
        self.clock = clock
        self.script: list[Any] = []
        self.psi_seq = psi_seq or []
        self.closed = False

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        item = self.script.pop(0) if self.script else []
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    def read(self) -> Psi | None:
        if len(self.psi_seq) > 1:
            return self.psi_seq.pop(0)
        return self.psi_seq[0] if self.psi_seq else Psi(PsiLine(5.0, 1, 1, 1000), PsiLine(1.0, 0, 0, 10))

    def close(self) -> None:
        self.closed = True


class StillThere:
    """The table's ProcFs as the daemon uses it after a stuck kill: every victim still holds what it held."""

    def status(self, pid: int) -> SimpleNamespace:
        return SimpleNamespace(rss_anon_kib=1 << 20, rss_shmem_kib=0)


class Table:
    def __init__(self, cands: list[Candidate]) -> None:
        self.cands = cands
        self.refreshes = 0
        self.proc = StillThere()

    def __len__(self) -> int:
        return len(self.cands)

    def refresh(self) -> None:
        self.refreshes += 1

    def rank(self, min_adj: int, limit: int | None = None) -> list[Choice]:
        from lmkd_py.policy import Rules, rank_victims

        return rank_victims(self.cands, min_adj, Rules())[:limit]

    def recheck(self, choices: list[Choice], top: int, min_adj: int) -> list[Choice]:
        return choices

    def newcomers(self, min_adj: int) -> list[Choice]:
        from lmkd_py.policy import Rules, rank_victims

        return rank_victims(self.new, min_adj, Rules())

    def pidfd(self, pid: int, start_time_ticks: int) -> int | None:
        return None

    def close(self) -> None:
        pass

    def holds(self, pid: int, start_time_ticks: int) -> bool:
        return any(c.pid == pid and c.start_time_ticks == start_time_ticks for c in self.cands + self.new)

    new: list[Candidate] = []  # noqa: RUF012  # a plain fake: tests set it per instance
    last_refresh_cost_ns = 0


class FakeKiller:
    def __init__(self, clock: FakeClock, outcomes: list[Outcome], kill_ns: int = 50_000_000) -> None:
        self.clock = clock
        self.outcomes = outcomes
        self.kill_ns = kill_ns
        self.killed: list[int] = []
        self.tracer = None
        self.mem_back_ns: int | None = None  # kill->memory back of a kill that succeeds

    def kill(
        self, expected: Victim, *, dry_run: bool = False, pressure: Pressure | None = None, pidfd: int | None = None
    ) -> KillRecord:
        start = self.clock.t
        self.clock.t += self.kill_ns
        self.killed.append(expected.pid)
        outcome = Outcome.DRY_RUN if dry_run else (self.outcomes.pop(0) if self.outcomes else Outcome.KILLED)
        return KillRecord(record_id="x", wall_time="t", outcome=outcome, dry_run=dry_run, victim=expected,
                          steps=Steps(start_ns=start, end_ns=self.clock.t), pressure=pressure,
                          mrelease=Mrelease(status=MreleaseStatus.OK),
                          kill_to_mem_recovered_ns=self.mem_back_ns if outcome is Outcome.KILLED else None)

    def close(self) -> None:
        pass


def cand(pid: int, adj: int, rss: int) -> Candidate:
    return Candidate(pid=pid, start_time_ticks=1, comm=f"p{pid}", oom_score_adj=adj, rss_kib=rss)


def make(outcomes: list[Outcome] | None = None, cfg: Config | None = None, **kw: Any) -> tuple[Daemon, Any]:
    clock = FakeClock()
    src = Source(clock, kw.pop("psi_seq", None))
    table = Table(kw.pop("cands", [cand(10, 900, 5000), cand(11, 900, 9000), cand(12, 0, 99_000)]))
    killer = FakeKiller(clock, outcomes or [])
    sink = ListSink()
    d = Daemon(cfg or Config(), source=src, killer=killer, table=table, sink=sink, clock=clock)  # type: ignore[arg-type]
    return d, (clock, src, table, killer, sink)


def ev(level: Level, clock: FakeClock) -> PressureEvent:
    return PressureEvent(level, clock.t, "trigger", "fake")


def test_event_kills_first_choice_and_records_pressure() -> None:
    d, (clock, _src, _table, killer, sink) = make()
    d.handle([ev(MEDIUM, clock)])
    assert killer.killed == [11]  # adj 900 band, larger first; pid 12 (adj 0) is below the medium floor
    (rec,) = sink.records
    assert rec.pressure is not None and rec.pressure.level == "medium" and rec.pressure.rank == 0
    assert rec.pressure.some_avg10 == 5.0 and rec.pressure.reason


def test_most_severe_level_decides() -> None:
    d, (clock, _src, _t, killer, _s) = make()
    d.handle([ev(MEDIUM, clock), ev(CRIT, clock)])
    assert killer.killed == [11]  # still the adj-900 band first, but critical's floor (0) applied
    d2, (clock2, _s2, _t2, killer2, _k2) = make(cands=[cand(12, 0, 99_000)])
    d2.handle([ev(MEDIUM, clock2)])
    assert killer2.killed == []
    d2.handle([ev(CRIT, clock2)])
    assert killer2.killed == [12]


def test_failed_kill_falls_through_to_next_choice() -> None:
    d, (clock, _src, _t, killer, sink) = make([Outcome.REFUSED_IDENTITY, Outcome.SIGNAL_FAILED, Outcome.KILLED])
    d.handle([ev(CRIT, clock)])
    assert killer.killed == [11, 10, 12]
    assert [r.outcome for r in sink.records] == [Outcome.REFUSED_IDENTITY, Outcome.SIGNAL_FAILED, Outcome.KILLED]


def test_a_vanished_victim_ends_a_psi_event() -> None:
    """Issue 18 item 5: the victim was gone before the signal, so it freed its memory itself; a PSI
    stall cannot say at once whether that was enough, so the next event decides, not a second kill."""
    d, (clock, _src, _t, killer, sink) = make([Outcome.GONE, Outcome.KILLED])
    d.handle([ev(CRIT, clock)])
    assert killer.killed == [11] and [r.outcome for r in sink.records] == [Outcome.GONE]


def test_a_vanished_victim_is_followed_only_when_a_precise_recheck_says_so() -> None:
    for still_short, expected in ((True, [11, 10]), (False, [11])):
        d, (clock, _src, _t, killer, _sink) = make([Outcome.GONE, Outcome.KILLED])
        checks: list[bool] = []

        def still(answer: bool = still_short, checks: list[bool] = checks) -> bool:
            checks.append(answer)
            return answer

        floor = PressureEvent(CRIT, clock.t, "mem_floor", "free", kill_reason="mem_floor", still=still)
        # The first re-check (after choosing) must pass for any kill at all.
        d.cfg = Config(kill=KillConfig(recheck_pressure=False))
        d.handle([floor])
        assert killer.killed == expected and checks == [still_short]


def test_a_stuck_victim_is_remembered_and_the_next_one_killed_not_responding() -> None:
    """Issues 12 item 4 and 18 item 4: a victim that does not exit is never picked again."""
    d, (clock, _src, _t, killer, sink) = make([Outcome.EXIT_TIMEOUT, Outcome.KILLED, Outcome.KILLED])
    d.handle([ev(CRIT, clock)])
    assert killer.killed == [11, 10]
    reasons = [r.pressure.kill_reason for r in sink.records if r.pressure]
    assert reasons == ["psi_critical", "not_responding"]
    assert (11, 1) in d.stuck and d.stats.not_responding == 1
    clock.t += 10_000_000_000
    d.handle([ev(CRIT, clock)])
    assert killer.killed == [11, 10, 10], "the stuck pid 11 must not be picked again"


def test_a_stuck_victim_whose_memory_came_back_ends_the_event() -> None:
    d, (clock, _src, _t, killer, _sink) = make()

    def timed_out_but_reaped(
        expected: Victim, *, dry_run: bool = False, pressure: Pressure | None = None, pidfd: int | None = None
    ) -> KillRecord:
        killer.killed.append(expected.pid)
        return KillRecord(record_id="x", wall_time="t", outcome=Outcome.EXIT_TIMEOUT, victim=expected,
                          steps=Steps(start_ns=clock.t, mem_recovered_ns=clock.t + 5, end_ns=clock.t + 9),
                          pressure=pressure, mrelease=Mrelease(status=MreleaseStatus.OK))

    killer.kill = timed_out_but_reaped  # type: ignore[method-assign]
    d.handle([ev(CRIT, clock)])
    assert killer.killed == [11] and (11, 1) in d.stuck


def test_forgotten_stuck_victims_once_gone() -> None:
    d, (clock, _src, table, _killer, _sink) = make([Outcome.EXIT_TIMEOUT, Outcome.KILLED])
    d.handle([ev(CRIT, clock)])
    assert (11, 1) in d.stuck
    table.cands = [c for c in table.cands if c.pid != 11]
    d._refresh()
    assert d.stuck == set()


def test_max_attempts_bounds_the_fallthrough() -> None:
    cfg = Config(kill=KillConfig(max_attempts=2))
    d, (clock, _src, _t, killer, sink) = make([Outcome.SIGNAL_FAILED] * 5, cfg)
    d.handle([ev(CRIT, clock)])
    assert len(killer.killed) == 2 and len(sink.records) == 2


def test_cooldown_at_its_configured_length() -> None:
    cfg = Config(kill=KillConfig(min_interval_ms=1500))
    d, (clock, _src, _t, killer, _s) = make(cfg=cfg)
    d.handle([ev(CRIT, clock)])
    clock.t += 1_400_000_000
    d.handle([ev(CRIT, clock)])
    assert len(killer.killed) == 1 and d.stats.skipped_cooldown == 1
    clock.t += 100_000_001
    d.handle([ev(CRIT, clock)])
    assert len(killer.killed) == 2


def test_low_level_only_refreshes() -> None:
    d, (clock, _src, table, killer, _s) = make()
    d.handle([ev(LOW, clock)])
    assert killer.killed == [] and table.refreshes == 1


def test_recheck_skips_when_pressure_is_gone() -> None:
    quiet = Psi(PsiLine(0.0, 0, 0, 777), PsiLine(0.0, 0, 0, 5))
    d, (clock, _src, _t, killer, _s) = make(psi_seq=[quiet, quiet])
    d.handle([ev(CRIT, clock)])
    assert killer.killed == [] and d.stats.skipped_recovered == 1
    growing = [Psi(PsiLine(0.0, 0, 0, 777), PsiLine(0.0, 0, 0, 5)), Psi(PsiLine(0.0, 0, 0, 900), PsiLine(0.0, 0, 0, 9))]
    d2, (clock2, _s2, _t2, killer2, _k2) = make(psi_seq=growing)
    d2.handle([ev(CRIT, clock2)])
    assert killer2.killed == [11]


def test_no_candidate_is_logged_not_fatal() -> None:
    d, (clock, _src, _t, killer, sink) = make(cands=[])
    with structlog.testing.capture_logs() as logs:
        d.handle([ev(CRIT, clock)])
    assert killer.killed == [] and sink.records == []
    assert any(e["event"] == "kill.no_candidate" for e in logs)


def test_dry_run_records_would_be_victim() -> None:
    d, (clock, _src, _t, _killer, sink) = make(cfg=Config(dry_run=True))
    d.handle([ev(MEDIUM, clock)])
    (rec,) = sink.records
    assert rec.dry_run and rec.outcome is Outcome.DRY_RUN and rec.victim.pid == 11


def test_loop_survives_an_exception_and_a_lost_source() -> None:
    d, (clock, src, _t, killer, _s) = make()
    src.script = [RuntimeError("boom"), TriggerUnavailable(19, "gone"), [ev(CRIT, clock)]]
    reopened = []

    def reopen() -> Source:
        reopened.append(1)
        return src

    d.reopen_source = reopen  # type: ignore[assignment]
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            try:
                d.iterate(0)
            except RuntimeError:
                d.stats.loop_errors += 1  # run() does this; iterate lets it through to run's guard
    assert reopened == [1]
    assert killer.killed == [11]
    assert any(e["event"] == "psi.source_lost" for e in logs)


class FullDisk:
    def __init__(self) -> None:
        self.tries = 0

    def write(self, record: KillRecord) -> bool:
        self.tries += 1
        return False


def test_kills_go_on_when_records_cannot_be_written() -> None:
    d, (clock, _src, _t, killer, _s) = make()
    d.sink = FullDisk()
    with structlog.testing.capture_logs() as logs:
        d.handle([ev(CRIT, clock)])
        clock.t += 5_000_000_000
        d.handle([ev(CRIT, clock)])
    assert len(killer.killed) == 2 and d.stats.kills == 2
    assert d.stats.records_dropped == 2
    assert [e["dropped"] for e in logs if e["event"] == "records.dropped"] == [1, 2]


def test_a_process_newer_than_the_table_is_ranked_without_a_refresh() -> None:
    """Issue 12 item 0: a hog started after the last refresh outranks an older bystander."""
    d, (clock, _src, table, killer, _s) = make(cands=[cand(10, 900, 5000)])
    table.new = [cand(42, 900, 500_000)]
    d.handle([ev(MEDIUM, clock)])
    assert killer.killed == [42]
    assert table.refreshes == 1, "only the refresh after the kill: none to find the newcomer"


class Pings:
    watchdog_interval_ns = 1_000_000_000

    def __init__(self) -> None:
        self.count = 0

    def watchdog(self) -> None:
        self.count += 1


def test_watchdog_pinged_only_when_a_turn_completes() -> None:
    d, (clock, src, _t, _k, _s) = make()
    pings = Pings()
    d.notifier = pings  # type: ignore[assignment]
    src.script = [RuntimeError("stuck")] * 5
    for _ in range(5):
        clock.t += 2_000_000_000
        with contextlib.suppress(RuntimeError):
            d.iterate(0)
    assert pings.count == 0, "a failing loop must not tell systemd it is healthy"
    clock.t += 2_000_000_000
    d.iterate(0)
    assert pings.count == 1


def test_lost_source_that_cannot_reopen_is_retried() -> None:
    d, (clock, src, _t, _k, _s) = make()
    calls = []

    def reopen() -> Source:
        calls.append(1)
        if len(calls) < 2:
            raise FileNotFoundError("memory.pressure: gone")
        return src

    d.reopen_source = reopen  # type: ignore[assignment]
    src.script = [TriggerUnavailable(19, "lost")]
    d.iterate(0)
    assert calls == [1] and "lost" in d.source.description
    d.source._due = clock.t  # type: ignore[attr-defined]  # the retry period has passed
    d.iterate(0)
    assert calls == [1, 1] and d.source is src


def test_memory_floor_event_kills_even_without_stall() -> None:
    quiet = Psi(PsiLine(0.0, 0, 0, 777), PsiLine(0.0, 0, 0, 5))
    d, (clock, _src, _t, killer, sink) = make(psi_seq=[quiet, quiet])
    floor = Level(name="mem_floor", stall="some", threshold_us=1, window_us=2_000_000, min_oom_score_adj=0)
    event = PressureEvent(floor, clock.t, "mem_floor", "free 900000 KiB < 1048576 KiB", kill_reason="mem_floor",
                          signals={"free_kib": 900000, "floor_kib": 1048576}, still=lambda: True)
    d.handle([event])
    assert killer.killed == [11]  # the PSI re-check would have skipped it: no stall at all
    p = sink.records[0].pressure
    assert p is not None and p.mechanism == "mem_floor" and p.kill_reason == "mem_floor"
    assert p.signals == {"free_kib": 900000, "floor_kib": 1048576}


def test_memory_floor_event_skipped_when_its_own_recheck_says_recovered() -> None:
    d, (clock, _src, _t, killer, _sink) = make()
    floor = Level(name="mem_floor", stall="some", threshold_us=1, window_us=2_000_000, min_oom_score_adj=0)
    d.handle([PressureEvent(floor, clock.t, "mem_floor", "free", kill_reason="mem_floor", still=lambda: False)])
    assert killer.killed == [] and d.stats.skipped_recovered == 1


def test_a_kills_memory_back_time_reaches_the_floor_that_leads_by_it() -> None:
    d, (clock, src, _t, killer, _sink) = make([Outcome.SIGNAL_FAILED, Outcome.KILLED])
    learned: list[int] = []
    src.learn_recovery = learned.append
    killer.mem_back_ns = 320_000_000
    d.handle([ev(MEDIUM, clock)])
    assert killer.killed == [11, 10] and learned == [320_000_000]  # the failed attempt taught nothing
    del src.learn_recovery  # a source without the floor (PSI alone): nothing to tell, nothing breaks
    clock.t += 10**10
    d.handle([ev(MEDIUM, clock)])
    assert len(killer.killed) == 3


def test_the_refresh_waits_while_a_signal_may_fire_sooner_than_a_refresh_takes() -> None:
    d, (clock, src, table, _k, _sink) = make()
    ms = 1_000_000
    every = d.cfg.candidates.refresh_interval_ms * ms
    d._refresh_cost_ns = 300 * ms  # a refresh under emulation
    d._last_refresh, d._next_refresh = clock.t, clock.t + every
    clock.t += every  # the refresh is due ...
    src.last_period_ns = 20 * ms  # ... but the signals' next check is 20 ms away: memory is close
    with structlog.testing.capture_logs() as logs:
        d.iterate(0)
        clock.t += 300 * ms
        d.iterate(0)
    assert table.refreshes == 0 and [e["event"] for e in logs] == ["table.refresh_deferred"]  # logged once
    src.last_period_ns = 1000 * ms  # far from every threshold again
    clock.t += 300 * ms
    d.iterate(0)
    assert table.refreshes == 1 and d._refresh_cost_ns == 0  # the fake refresh takes no time on the fake clock
    # Close for good: put off at most one more interval.
    d._refresh_cost_ns = 300 * ms
    src.last_period_ns = 10 * ms
    clock.t += every
    d.iterate(0)
    assert table.refreshes == 1
    clock.t += every
    d.iterate(0)
    assert table.refreshes == 2
    del src.last_period_ns  # a source without adaptive signals: refresh on time
    clock.t += every
    d.iterate(0)
    assert table.refreshes == 3


def test_pressure_right_after_a_kill_is_named_so() -> None:
    cfg = Config(kill=KillConfig(min_interval_ms=500))
    d, (clock, _src, _t, _killer, sink) = make(cfg=cfg)
    d.handle([ev(CRIT, clock)])
    clock.t += 600_000_000
    d.handle([ev(CRIT, clock)])
    clock.t += 5_000_000_000
    d.handle([ev(CRIT, clock)])
    assert [r.pressure.kill_reason for r in sink.records if r.pressure] == [
        "psi_critical", "pressure_after_kill", "psi_critical"]


class Notes:
    watchdog_interval_ns = None

    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status: str | None = None) -> None:
        self.sent.append("READY")

    def reloading(self) -> None:
        self.sent.append("RELOADING")

    def status(self, text: str) -> None:
        pass

    def watchdog(self) -> None:
        pass

    def stopping(self) -> None:
        pass


def test_reload_always_ends_in_ready_so_systemd_never_hangs_in_reloading() -> None:
    """Issue 18 item 6: a bad file (ConfigError) and an unexpected failure alike are followed by READY=1."""
    from lmkd_py.config import ConfigError

    d, _ = make()
    notes = Notes()
    d.notifier = notes
    d.load_config = lambda: (_ for _ in ()).throw(ConfigError("cfg.toml: not UTF-8"))
    with structlog.testing.capture_logs() as logs:
        d._reload_from_file()
    assert notes.sent == ["RELOADING", "READY"]
    assert any(e["event"] == "config.reload_rejected" and "UTF-8" in e["reason"] for e in logs)

    def boom() -> Config:
        raise RuntimeError("unexpected")

    d.load_config = boom
    with contextlib.suppress(RuntimeError):  # run()'s guard logs it; what matters is the READY
        d._reload_from_file()
    assert notes.sent == ["RELOADING", "READY"] * 2


def test_reload_without_a_builder_is_rejected_not_half_applied() -> None:
    d, _ = make()
    old = d.cfg
    assert d.reload(Config(kill=KillConfig(min_interval_ms=5))) is not None
    assert d.cfg is old


def test_the_table_holds_pidfds_of_its_top_candidates(tmp_path: Any) -> None:
    """Issue 18 item 8: pidfds opened when ranked, checked against the start time just read, closed
    when the candidate leaves the top or the table closes."""
    import os

    from lmkd_py.candidates import CandidateTable
    from lmkd_py.policy import Rules
    from lmkd_py.procfs import ProcFs
    from tests.fakes import fake_proc

    for pid, rss, adj in ((10, 50_000, 900), (11, 90_000, 900), (12, 70_000, 100)):
        fake_proc(tmp_path, pid, f"p{pid}", rss, start=500, adj=adj)
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nSwapTotal: 0 kB\n")
    (tmp_path / "loadavg").write_text("0 0 0 1/1 12\n")
    opened: list[int] = []

    def pidfd_open(pid: int) -> int:
        if pid == 10:  # the process changed between the read and the open: its start time differs now
            fake_proc(tmp_path / "x", 10, "p10", 1, start=501)
            (tmp_path / "10" / "stat").write_text((tmp_path / "x" / "10" / "stat").read_text())
        fd = os.open("/dev/null", os.O_RDONLY)
        opened.append(fd)
        return fd

    table = CandidateTable(ProcFs(tmp_path), Rules(), clock=lambda: 0, pidfd_open=pidfd_open, hold=2)
    table.refresh()
    assert table.pidfd(11, 500) is not None
    assert table.pidfd(10, 500) is None, "a pidfd whose process changed under it is not held"
    assert table.pidfd(12, 500) is None, "only the top two"
    table.close()
    for fd in opened:
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"fd {fd} left open")


def test_a_cgroup_with_oom_group_is_killed_whole_and_never_the_root(tmp_path: Any) -> None:
    """Issue 12 item 3: memory.oom.group = 1 makes a whole-cgroup kill even with kill.unit = "process"."""
    from pathlib import Path

    from lmkd_py.builder import Builder
    from lmkd_py.candidates import CandidateTable
    from lmkd_py.policy import Rules
    from lmkd_py.procfs import ProcFs
    from tests.fakes import fake_proc

    proc, cgroot = tmp_path / "proc", tmp_path / "cg"
    for pid in (10, 11, 12):
        fake_proc(proc, pid, f"p{pid}", 50_000, adj=900)  # all in 0::/apps/x
    (proc / "meminfo").write_text("MemTotal: 100 kB\n")
    (proc / "loadavg").write_text("0 0 0 1/1 12\n")
    grp = cgroot / "apps" / "x"
    grp.mkdir(parents=True)
    (grp / "cgroup.procs").write_text("10\n11\n12\n")
    (grp / "cgroup.kill").write_text("")

    class FakeBuilder(Builder):
        def cgroup2_root(self) -> Path | None:
            return cgroot

    calls: list[tuple[list[int], Any]] = []

    class GroupKiller(FakeKiller):
        def kill_group(self, members: list[Victim], *, kill_file: Any, dry_run: bool = False,
                       pressure: Pressure | None = None) -> list[KillRecord]:
            calls.append(([m.pid for m in members], kill_file))
            return [KillRecord(record_id=str(m.pid), kill_id="k", wall_time="t", outcome=Outcome.KILLED, victim=m,
                               steps=Steps(start_ns=0, end_ns=1), mrelease=Mrelease(status=MreleaseStatus.OK))
                    for m in members]

    clock = FakeClock()
    table = CandidateTable(ProcFs(proc), Rules(), clock=clock)
    sink = ListSink()
    d = Daemon(Config(), source=Source(clock), killer=GroupKiller(clock, []), table=table,  # type: ignore[arg-type]
               sink=sink, clock=clock, builder=FakeBuilder(ProcFs(proc)))
    table.refresh()
    d.handle([ev(CRIT, clock)])
    assert calls == [], "memory.oom.group unset: one process"
    (grp / "memory.oom.group").write_text("1\n")
    clock.t += 10_000_000_000
    d.handle([ev(CRIT, clock)])
    assert calls == [([10, 11, 12], grp / "cgroup.kill")]
    assert {r.kill_id for r in sink.records[-3:]} == {"k"}
    for pid in (10, 11, 12):
        (proc / str(pid) / "cgroup").write_text("0::/\n")
    table.refresh()
    clock.t += 10_000_000_000
    with structlog.testing.capture_logs() as logs:
        d.cfg = Config(kill=KillConfig(unit="cgroup"))
        d.handle([ev(CRIT, clock)])
    assert len(calls) == 1 and any(e["event"] == "kill.group_refused" for e in logs)


def test_free_memory_from_elsewhere_does_not_pass_for_a_stuck_victim_reaped() -> None:
    """CI once saw it on a busy machine: a frozen victim timed out (no process_mrelease), others freed as
    much memory in that second, and the daemon took it for the victim's and spared the next candidate.
    What counts is the victim's own RSS: still held, so the next one dies as not_responding."""
    d, (clock, _src, _t, killer, _sink) = make()
    calls: list[str] = []

    def stuck_while_others_free(
        expected: Victim, *, dry_run: bool = False, pressure: Pressure | None = None, pidfd: int | None = None
    ) -> KillRecord:
        killer.killed.append(expected.pid)
        calls.append(pressure.kill_reason if pressure and pressure.kill_reason else "")
        held = dataclasses.replace(expected, rss_anon_kib=1 << 20)  # as the killer reads it before SIGKILL
        outcome = Outcome.EXIT_TIMEOUT if len(calls) == 1 else Outcome.KILLED
        return KillRecord(record_id="x", wall_time="t", outcome=outcome, victim=held,
                          steps=Steps(start_ns=clock.t, mem_recovered_ns=clock.t + 5, end_ns=clock.t + 9),
                          pressure=pressure, mrelease=Mrelease(status=MreleaseStatus.DISABLED))

    killer.kill = stuck_while_others_free  # type: ignore[method-assign]
    d.handle([ev(CRIT, clock)])
    assert len(killer.killed) == 2 and calls[1] == "not_responding"
