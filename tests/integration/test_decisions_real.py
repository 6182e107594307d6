"""The decision on real processes (issues 12 and 18): a newcomer outranks an older bystander without a
refresh, and a victim that cannot die (frozen by the v1 freezer) is remembered and passed over.

The daemon here is the real one (``Daemon.handle``) with the real table, killer and syscalls; only the
pressure event is scripted, so the outcome does not depend on how this machine's PSI feels today. Every
process is the test's own, inside a cgroup the test made (the daemon's scope), removed afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.candidates import CandidateTable
from lmkd_py.config import Config, KillConfig, Level
from lmkd_py.daemon import Daemon
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.policy import Rules
from lmkd_py.procfs import ProcFs, cgroup_v2_relpath
from lmkd_py.psi import PressureEvent
from lmkd_py.records import ListSink, Outcome
from lmkd_py.syscalls import LinuxSyscalls
from tests.conftest import needs_root
from tests.fakes import ScriptedSource, scoped_daemon

pytestmark = [needs_root]

V2 = Path("/sys/fs/cgroup/unified")
FREEZER = Path("/sys/fs/cgroup/freezer")
CRITICAL = Level(name="critical", stall="full", threshold_us=1, window_us=2_000_000, min_oom_score_adj=0)




def event() -> PressureEvent:
    # `still` answers like a precise source under real shortage: still needed.
    return PressureEvent(CRITICAL, time.monotonic_ns(), "signals", "test", kill_reason="low_mem_and_swap",
                         still=lambda: True)


@pytest.fixture
def scope() -> Iterator[object]:
    if not (V2 / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy at /sys/fs/cgroup/unified")
    from lmkd_py.stress import PressureCgroup

    with PressureCgroup(f"lmkd-py-test-dec-{uuid.uuid4().hex[:8]}", limit_mib=None) as cg:
        yield cg


def daemon_for(cg: object, *, exit_timeout_ms: int = 3000, mrelease: bool = True) -> tuple[Daemon, ListSink]:
    from lmkd_py.stress import PressureCgroup

    assert isinstance(cg, PressureCgroup)
    cfg = Config(kill=KillConfig(exit_timeout_ms=exit_timeout_ms, mrelease=mrelease, recheck_pressure=False,
                                 min_interval_ms=0))
    return scoped_daemon(cg, cfg)


def test_a_hog_started_after_the_refresh_is_killed_not_the_older_bystander(scope: object) -> None:
    """Issue 12 item 0, as the issue tried it: an adj-0 bystander, the table refreshed, then an adj-900 hog."""
    from lmkd_py.stress import PressureCgroup, VictimSpec, spawn_victim

    assert isinstance(scope, PressureCgroup)
    bystander = spawn_victim(VictimSpec(size_mib=96, adj=0), scope)
    bystander.wait_ready()
    d, sink = daemon_for(scope)
    with d:
        d.table.refresh()
        assert [c.candidate.pid for c in d.table.rank(0)] == [bystander.pid]
        assert d.table.pidfd(bystander.pid, d.table.rank(0)[0].candidate.start_time_ticks) is not None
        hog = spawn_victim(VictimSpec(size_mib=16, adj=900), scope)
        hog.wait_ready()
        d.handle([event()])
    (rec,) = sink.records
    assert rec.outcome is Outcome.KILLED and rec.victim.pid == hog.pid
    assert rec.pressure is not None and rec.pressure.kill_reason == "low_mem_and_swap"
    assert bystander.poll() is None, "the bystander must live"


def _freeze(pid: int) -> Path:
    cg = FREEZER / f"lmkd-py-test-frz-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    (cg / "cgroup.procs").write_text(str(pid))
    (cg / "freezer.state").write_text("FROZEN")
    for _ in range(200):
        if (cg / "freezer.state").read_text().strip() == "FROZEN":
            break
        time.sleep(0.01)
    return cg


def _thaw_and_remove(cg: Path) -> None:
    (cg / "freezer.state").write_text("THAWED")
    for _ in range(300):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.02)  # the killed task leaves once it runs again


@pytest.mark.parametrize("mrelease", [False, True])
def test_a_frozen_victim_is_remembered_and_passed_over(scope: object, mrelease: bool) -> None:
    """Issues 12 item 4 and 18 item 4. Without process_mrelease the frozen victim's memory stays, so the
    next candidate dies in the same event as not_responding; with it the kernel reaps the frozen task's
    memory all the same, so that event ends — and in both cases the next event never re-picks it."""
    if not (FREEZER / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 freezer at /sys/fs/cgroup/freezer")
    from lmkd_py.stress import PressureCgroup, VictimSpec, spawn_victim

    assert isinstance(scope, PressureCgroup)
    frozen = spawn_victim(VictimSpec(size_mib=64, adj=1000), scope)
    frozen.wait_ready()
    other = spawn_victim(VictimSpec(size_mib=16, adj=900), scope)
    other.wait_ready()
    spare = spawn_victim(VictimSpec(size_mib=8, adj=800), scope)
    spare.wait_ready()
    frz = _freeze(frozen.pid)
    try:
        d, sink = daemon_for(scope, exit_timeout_ms=1000, mrelease=mrelease)
        with d:
            d.table.refresh()
            d.handle([event()])
            first = [(r.victim.pid, r.outcome, r.pressure.kill_reason if r.pressure else None) for r in sink.records]
            assert first[0][:2] == (frozen.pid, Outcome.EXIT_TIMEOUT)
            if mrelease:
                assert sink.records[0].steps.mem_recovered_ns is not None, "process_mrelease reaps a frozen task"
                assert len(first) == 1
            else:
                assert first[1] == (other.pid, Outcome.KILLED, "not_responding")
            assert (frozen.pid, sink.records[0].victim.start_time_ticks) in d.stuck
            n = len(sink.records)
            d.handle([event()])
            later = [r.victim.pid for r in sink.records[n:]]
            assert frozen.pid not in later and later, "a stuck victim is never picked again"
    finally:
        _thaw_and_remove(frz)


@pytest.mark.parametrize("spare_one", [False, True])
def test_a_whole_cgroup_kill_takes_every_member_and_links_their_records(scope: object, spare_one: bool) -> None:
    """Issue 12 item 3: kill.unit = "cgroup" takes the victim's whole cgroup through cgroup.kill, reaps
    each member, and writes one record per member with one kill_id; a sibling cgroup is untouched. When a
    member may not be killed (here: counted as lmkd-py itself), cgroup.kill is not used and that member
    lives while the others die one by one."""
    from lmkd_py.builder import Builder
    from lmkd_py.stress import PressureCgroup, VictimSpec, spawn_victim

    assert isinstance(scope, PressureCgroup)
    app = scope.v2_path / "app"
    app.mkdir()
    victims = []
    try:
        members = [spawn_victim(VictimSpec(size_mib=24, adj=900), scope) for _ in range(3)]
        bystander = spawn_victim(VictimSpec(size_mib=8, adj=900), scope)
        victims = [*members, bystander]
        for v in victims:
            v.wait_ready()
        for m in members:
            (app / "cgroup.procs").write_text(str(m.pid))
        rel = cgroup_v2_relpath(scope.v2_path, Path("/proc/self/mounts").read_text())
        spared = members[2].pid if spare_one else None
        rules = Rules(scope_cgroup=rel, self_pids=frozenset({os.getpid(), *([spared] if spared else [])}))
        table = CandidateTable(ProcFs(), rules, scope_dir=scope.v2_path, clock=time.monotonic_ns)
        cfg = Config(kill=KillConfig(unit="cgroup", recheck_pressure=False, min_interval_ms=0))
        killer = Killer(LinuxSyscalls(), ProcFs(), options=KillOptions.from_config(cfg.kill))
        sink = ListSink()
        with Daemon(cfg, source=ScriptedSource(), killer=killer, table=table, sink=sink,
                    builder=Builder(ProcFs())) as d:
            d.table.refresh()
            d.handle([event()])
        expected = {m.pid for m in members} - {spared}
        assert {r.victim.pid for r in sink.records} == expected
        assert all(r.outcome is Outcome.KILLED for r in sink.records), [r.error for r in sink.records]
        assert len({r.kill_id for r in sink.records}) == 1 and sink.records[0].kill_id
        assert all(r.mrelease.status.value in ("ok", "already_released") for r in sink.records)
        via_file = any("cgroup.kill at" in n for r in sink.records for n in r.notes)
        assert via_file is not spare_one
        assert bystander.poll() is None, "the sibling cgroup's process must live"
        if spared:
            assert members[2].poll() is None, "a member that may not be killed must live"
    finally:
        for v in victims:
            if v.poll() is None:
                v.kill()
            v.wait_exit(10)
        for _ in range(200):
            try:
                app.rmdir()
                break
            except OSError:
                time.sleep(0.02)
