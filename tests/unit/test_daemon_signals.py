"""What the daemon does with a signal event (issue 12): the kill reason and values reach the record,
``still()`` replaces the PSI re-check, and ``victims`` limits the ranking. Uses the loop test's fakes."""

from __future__ import annotations

from lmkd_py.procfs import Psi, PsiLine
from lmkd_py.psi import PressureEvent
from lmkd_py.signals import signal_level
from tests.unit.test_daemon_loop import MEDIUM, ev, make

QUIET = Psi(PsiLine(0.0, 0, 0, 777), PsiLine(0.0, 0, 0, 5))  # no stall at all


def headroom_event(t: int, *, holds: list[bool], victims: frozenset[int] | None = None) -> PressureEvent:
    return PressureEvent(signal_level("cgroup_headroom", 0), t, "headroom", "memcg /a: headroom 8 MiB",
                         kill_reason="cgroup_headroom", signals={"usage_kib": 120, "limit_kib": 128},
                         still=lambda: holds[0], victims=victims)


def test_a_signal_event_kills_without_stall_and_records_why() -> None:
    d, (clock, _src, _t, killer, sink) = make(psi_seq=[QUIET, QUIET])
    d.handle([headroom_event(clock.t, holds=[True])])
    assert killer.killed == [11]  # the PSI re-check would have skipped it: no stall at all
    p = sink.records[0].pressure
    assert p is not None and p.kill_reason == "cgroup_headroom" and p.signals == {"usage_kib": 120, "limit_kib": 128}
    assert p.level == "cgroup_headroom" and p.mechanism == "headroom"


def test_still_false_skips_the_kill() -> None:
    d, (clock, _src, _t, killer, sink) = make()
    d.handle([headroom_event(clock.t, holds=[False])])
    assert killer.killed == [] and sink.records == [] and d.stats.skipped_recovered == 1


def test_victims_limit_the_ranking_to_the_memcg_that_runs_out() -> None:
    d, (clock, _src, _t, killer, _sink) = make()
    d.handle([headroom_event(clock.t, holds=[True], victims=frozenset({10}))])
    assert killer.killed == [10]  # not 12 (bigger) nor 11 (bigger, same adj): they are elsewhere


def test_a_psi_event_records_psi_level_as_its_reason() -> None:
    d, (clock, _src, _t, _killer, sink) = make()
    d.handle([ev(MEDIUM, clock)])
    p = sink.records[0].pressure
    assert p is not None and p.kill_reason == "psi_medium" and p.signals is None
