"""The adaptive period, the free-memory floor and cgroup headroom (signals.py, headroom.py) on fake
trees: a recorded /proc and v1/v2 cgroup files under tmp_path."""

from __future__ import annotations

import os
import select
from collections.abc import Mapping, Sequence
from pathlib import Path

from structlog.testing import capture_logs

from lmkd_py.builder import wrap_sources
from lmkd_py.config import Config, PressureConfig, SignalsConfig
from lmkd_py.headroom import HeadroomCheck, Reading, headroom, threshold_kib
from lmkd_py.procfs import ProcFs
from lmkd_py.psi import PressureEvent
from lmkd_py.signals import AdaptiveSource, CheckResult, FloorCheck, period_ns, signal_level

MS = 1_000_000
MIB_KIB = 1024


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000_000_000

    def __call__(self) -> int:
        return self.t


class Inner:
    """A PSI source that never fires; its wait advances the clock by the time it was given."""

    description = "fake PSI"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waited: list[int | None] = []
        self.fds: dict[int, int] = {}

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        self.waited.append(timeout_ns)
        self.clock.t += timeout_ns or 0
        return []

    def add_wake_fd(self, fd: int, events: int = select.POLLIN) -> None:
        self.fds[fd] = events

    def remove_wake_fd(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def read(self) -> None:
        return None

    def close(self) -> None:
        pass


class Scripted:
    name = "scripted"

    def __init__(self, margins: list[int | None], fds: Sequence[int] = ()) -> None:
        self.margins = margins
        self.calls = 0
        self.fds = list(fds)
        self.events: list[PressureEvent] = []

    def check(self, now_ns: int) -> CheckResult:
        m = self.margins[min(self.calls, len(self.margins) - 1)]
        self.calls += 1
        return CheckResult(list(self.events), margin_kib=m)

    def wake_fds(self) -> Mapping[int, int]:
        return {fd: select.POLLIN for fd in self.fds}

    def close(self) -> None:
        pass


def test_period_never_outlasts_the_margin_at_the_allocation_rate() -> None:
    rate = 1024 * MIB_KIB  # 1 GiB/s
    assert period_ns(512 * MIB_KIB, rate, 10 * MS, 1000 * MS) == 500 * MS
    assert period_ns(1 * MIB_KIB, rate, 10 * MS, 1000 * MS) == 10 * MS  # ~1 ms -> clamped up to 10 ms
    assert period_ns(8 * 1024 * MIB_KIB, rate, 10 * MS, 1000 * MS) == 1000 * MS
    assert period_ns(0, rate, 10 * MS, 1000 * MS) == 10 * MS
    assert period_ns(None, rate, 10 * MS, 1000 * MS) == 1000 * MS


def test_adaptive_source_follows_the_smallest_margin() -> None:
    clock = Clock()
    inner = Inner(clock)
    src = AdaptiveSource(inner, [Scripted([4096 * MIB_KIB]), Scripted([None, 256 * MIB_KIB, 0])],
                         rate_kib_s=1024 * MIB_KIB, min_ns=10 * MS, max_ns=1000 * MS, clock=clock)
    assert src.wait(None) == [] and inner.waited[-1] == 0  # first look at once
    assert src.last_period_ns == 1000 * MS  # 4 GiB margin and an unknown one
    src.wait(None)
    assert inner.waited[-1] == 1000 * MS and src.last_period_ns == 250 * MS
    src.wait(None)
    assert inner.waited[-1] == 250 * MS and src.last_period_ns == 10 * MS
    src.wait(3 * MS)  # the loop's shorter timeout wins; no look before its time
    assert inner.waited[-1] == 3 * MS
    assert "scripted" in src.description


def test_a_wake_fd_makes_the_check_run_at_once() -> None:
    clock = Clock()
    inner = Inner(clock)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        check = Scripted([4096 * MIB_KIB], fds=[efd])
        src = AdaptiveSource(inner, [check], rate_kib_s=1024 * MIB_KIB, min_ns=10 * MS, max_ns=1000 * MS,
                             clock=clock)
        src.wait(None)
        assert inner.fds == {efd: select.POLLIN} and check.calls == 1
        src.wait(0)  # not due yet, nothing ready
        assert check.calls == 1
        os.eventfd_write(efd, 1)  # the kernel crossed a memcg threshold
        src.wait(0)
        assert check.calls == 2
        check.fds = []
        os.eventfd_read(efd)
        src.wait(0)
        assert inner.fds == {}  # a memcg that went away: its fd leaves the poller
    finally:
        os.close(efd)


def test_a_condition_that_keeps_holding_is_reported_at_most_every_repeat_interval() -> None:
    clock = Clock()
    check = Scripted([0])
    check.events = [PressureEvent(signal_level("cgroup_headroom", 0), 0, "headroom", "x",
                                  kill_reason="cgroup_headroom")]
    src = AdaptiveSource(Inner(clock), [check], rate_kib_s=1024 * MIB_KIB, min_ns=10 * MS, max_ns=1000 * MS,
                         repeat_ns=100 * MS, clock=clock)
    reported = [len(src.wait(None)) for _ in range(25)]  # a look every 10 ms while it holds
    assert reported[0] == 1 and sum(reported) == 3  # at 0, 100 and 200 ms
    check.events = []
    assert src.wait(None) == []  # it cleared ...
    check.events = [PressureEvent(signal_level("cgroup_headroom", 0), 0, "headroom", "x",
                                  kill_reason="cgroup_headroom")]
    assert len(src.wait(None)) == 1  # ... so the next one goes out at once


def test_floor_fires_below_and_rechecks() -> None:
    free = [10_000_000]
    floor = FloorCheck(lambda: (free[0], 20 * 1024 * 1024), 5.0, signal_level("mem_floor", 0))
    got = floor.check(0)
    assert got.events == [] and got.margin_kib == 10_000_000 - 1_048_576
    free[0] = 900_000
    got = floor.check(1)
    assert [e.kill_reason for e in got.events] == ["mem_floor"] and got.margin_kib == 0
    ev = got.events[0]
    assert ev.signals == {"free_kib": 900_000, "floor_kib": 1_048_576} and ev.still is not None and ev.still()
    free[0] = 2_000_000
    assert not ev.still()
    with capture_logs() as logs:
        unreadable = FloorCheck(lambda: None, 5.0, signal_level("mem_floor", 0))
        assert unreadable.check(0).margin_kib is None and unreadable.check(1).events == []
    assert [e["event"] for e in logs] == ["signals.floor_unreadable"]


def test_floor_leads_a_fast_fall_by_the_time_a_kill_takes() -> None:
    total = 1024 * 1024  # 1 GiB: the percentage floor (5 %) is 52,429 KiB
    free = [600_000]
    floor = FloorCheck(lambda: (free[0], total), 5.0, signal_level("mem_floor", 0), lead_ms=250)
    ms = 1_000_000
    assert floor.check(0).margin_kib == 600_000 - 52_429  # one sample: no rate yet
    free[0] = 580_000  # 20 MiB in 100 ms: 200,000 KiB/s, whose 250 ms (50,000 KiB) stay under 5 %
    assert floor.check(100 * ms).margin_kib == 580_000 - 52_429
    free[0] = 20_000  # 560,000 KiB in the 500 ms since the last sample: 1,120,000 KiB/s -> 280,000, capped at 4x
    got = floor.check(600 * ms)
    assert got.margin_kib == 0 and [e.kill_reason for e in got.events] == ["mem_floor"]
    ev = got.events[0]
    assert ev.signals == {"free_kib": 20_000, "floor_kib": 4 * 52_429, "fall_kib_s": 1_120_000}
    assert ev.source.endswith("(falling 1093 MiB/s)")
    # The re-check before the kill holds the event's floor, whatever the fall's rate does meanwhile.
    free[0] = 150_000
    assert ev.still is not None and ev.still()
    free[0] = 4 * 52_429
    assert not ev.still()
    # Rising again: the floor is the percentage's at once, the event is over.
    free[0] = 300_000
    assert floor.check(700 * ms).events == [] and floor.check(800 * ms).margin_kib == 300_000 - 52_429


def test_floor_lead_learns_a_slow_recovery_and_off_means_off() -> None:
    total, ms = 1024 * 1024, 1_000_000
    free = [400_000]

    def falling(lead_ms: int, learned_ms: int | None) -> int:
        floor = FloorCheck(lambda: (free[0], total), 5.0, signal_level("mem_floor", 0), lead_ms=lead_ms)
        if learned_ms is not None:
            floor.learn_recovery(learned_ms * ms)
        free[0] = 400_000
        floor.check(0)
        free[0] = 380_000  # 200,000 KiB/s over 100 ms
        return floor.floor_kib(100 * ms, 380_000, total)[0]

    assert falling(250, None) == 52_429  # 50,000 KiB: under the percentage floor
    assert falling(250, 400) == 80_000  # the last kill took 400 ms to give memory back
    assert falling(250, 100) == 52_429  # a faster one does not lower the configured lead
    assert falling(0, 400) == 52_429  # no lead configured: a fixed floor whatever was learned
    src = AdaptiveSource(Inner(Clock()), [FloorCheck(lambda: None, 5.0, signal_level("mem_floor", 0), lead_ms=1)],
                         rate_kib_s=1024, min_ns=ms, max_ns=1000 * ms)
    src.learn_recovery(30_000 * ms)
    assert src.checks[0].learned_ns == 10_000 * ms  # forwarded, and not believed past 10 s  # type: ignore[attr-defined]


def test_wrap_sources_composes_what_applies(tmp_path: Path) -> None:
    clock = Clock()
    proc = ProcFs(tmp_path)
    plain = Config(pressure=PressureConfig(mem_floor_pct=None), signals=SignalsConfig(lmkd_reasons=False))
    inner = Inner(clock)
    assert wrap_sources(inner, plain, proc, scope_dir=None, clock=clock) is inner
    system = wrap_sources(inner, Config(), proc, scope_dir=None, clock=clock)
    assert isinstance(system, AdaptiveSource)
    assert [type(c).__name__ for c in system.checks] == ["FloorCheck", "LmkdCheck"]
    scoped = wrap_sources(inner, Config(), proc, scope_dir=tmp_path, clock=clock,
                          mounts_path=tmp_path / "mounts")
    assert [type(c).__name__ for c in scoped.checks] == ["HeadroomCheck", "LmkdCheck"]  # type: ignore[attr-defined]


# -- headroom -------------------------------------------------------------------------------------------

def test_headroom_counts_the_swap_the_memcg_may_still_use() -> None:
    r = Reading(usage_kib=120 * MIB_KIB, limit_kib=128 * MIB_KIB, swap_room_kib=64 * MIB_KIB, swap_used_kib=50)
    assert headroom(r, None, True) == (8 * MIB_KIB, 0)  # no swap on the system
    assert headroom(r, 500 * MIB_KIB, True) == (8 * MIB_KIB, 64 * MIB_KIB)  # its memsw allowance binds
    assert headroom(r, 10 * MIB_KIB, True) == (8 * MIB_KIB, 10 * MIB_KIB)  # the zram device is nearly full
    assert headroom(r, 500 * MIB_KIB, False) == (8 * MIB_KIB, 0)  # swappiness 0
    unlimited_swap = Reading(120 * MIB_KIB, 128 * MIB_KIB, None, 0)
    assert headroom(unlimited_swap, 500 * MIB_KIB, True) == (8 * MIB_KIB, 500 * MIB_KIB)
    cfg = SignalsConfig()
    assert threshold_kib(256 * MIB_KIB, cfg) == 32 * MIB_KIB  # the 32 MiB minimum
    assert threshold_kib(4096 * MIB_KIB, cfg) == round(4096 * MIB_KIB * 0.05)  # 5 % of a large limit


def _memcg(d: Path, *, limit_mib: int | None, usage_mib: int, memsw: tuple[int, int] | None = None,
           cache_mib: int = 0) -> None:
    d.mkdir(parents=True, exist_ok=True)
    # v1 memory.stat as this kernel writes it (trimmed): the memcg's own lines, then the subtree's total_*
    (d / "memory.stat").write_text(f"cache 0\nrss 0\ninactive_file 0\nactive_file 0\n"
                                   f"total_cache {cache_mib << 20}\ntotal_inactive_file {(cache_mib << 20) // 2}\n"
                                   f"total_active_file {(cache_mib << 20) - (cache_mib << 20) // 2}\n")
    (d / "memory.limit_in_bytes").write_text(str(limit_mib << 20) if limit_mib else "9223372036854771712\n")
    (d / "memory.usage_in_bytes").write_text(str(usage_mib << 20))
    (d / "memory.swappiness").write_text("60\n")
    (d / "cgroup.event_control").write_text("")
    if memsw is not None:
        (d / "memory.memsw.limit_in_bytes").write_text(str(memsw[0] << 20))
        (d / "memory.memsw.usage_in_bytes").write_text(str(memsw[1] << 20))


def _hybrid(tmp: Path) -> tuple[HeadroomCheck, Path, Path]:
    """A fake hybrid host: pids 11 and 12 in v1 memcgs /a and /b (each 128 MiB), both in the v2 scope."""
    proc, v1, scope = tmp / "proc", tmp / "v1", tmp / "v2" / "scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("11\n12\n")
    for pid, memcg in ((11, "a"), (12, "b")):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(f"4:memory:/{memcg}\n0::/scope\n")
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemFree: 20000000 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n")
    _memcg(v1 / "a", limit_mib=128, usage_mib=10)
    _memcg(v1 / "b", limit_mib=128, usage_mib=10)
    v1.joinpath("memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    check = HeadroomCheck(scope, SignalsConfig(), ProcFs(proc), str(v1), str(tmp / "v2"), tmp / "sys")
    return check, v1, proc


def test_headroom_fires_for_the_memcg_running_out_and_names_only_its_processes(tmp_path: Path) -> None:
    check, v1, _proc = _hybrid(tmp_path)
    try:
        got = check.check(0)
        assert got.events == [] and got.margin_kib == (128 - 10 - 32) * MIB_KIB
        assert len(check.wake_fds()) == 2  # a v1 usage threshold armed per memcg
        (v1 / "b" / "memory.usage_in_bytes").write_text(str(90 << 20))
        assert check.check(1).margin_kib == (128 - 90 - 32) * MIB_KIB
        (v1 / "b" / "memory.usage_in_bytes").write_text(str(120 << 20))
        got = check.check(2)
        assert len(got.events) == 1 and got.margin_kib == 0
        ev = got.events[0]
        assert ev.kill_reason == "cgroup_headroom" and ev.mechanism == "headroom" and ev.victims == frozenset({12})
        assert ev.signals == {"usage_kib": 120 * MIB_KIB, "limit_kib": 128 * MIB_KIB, "headroom_kib": 8 * MIB_KIB,
                              "threshold_kib": 32 * MIB_KIB, "swap_free_kib": 0, "swap_used_kib": None,
                              "file_cache_kib": 0}
        assert ev.still is not None and ev.still()
        (v1 / "b" / "memory.usage_in_bytes").write_text(str(20 << 20))  # the kill gave memory back
        assert not ev.still()
        # a memcg at its limit with page cache to reclaim is not out of memory
        _memcg(v1 / "b", limit_mib=128, usage_mib=126, cache_mib=60)
        got = check.check(3)
        assert got.events == [] and got.margin_kib == (128 - 126 + 60 - 32) * MIB_KIB
        _memcg(v1 / "b", limit_mib=128, usage_mib=126, cache_mib=20)
        got = check.check(4)
        assert [e.signals["file_cache_kib"] for e in got.events] == [20 * MIB_KIB]  # type: ignore[index]
    finally:
        check.close()


def test_headroom_with_memsw_says_low_mem_and_swap_once_the_memcg_swapped(tmp_path: Path) -> None:
    check, v1, proc = _hybrid(tmp_path)
    try:
        (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemFree: 20000000 kB\nSwapTotal: 524284 kB\n"
                                      "SwapFree: 400000 kB\nInactive(file): 0 kB\n")
        (proc / "swaps").write_text("Filename Type Size Used Priority\n/dev/zram1 partition 524284 124284 -2\n")
        # at its RAM limit, 100 MiB swapped of a 256 MiB memsw limit: 28 MiB of swap room left
        _memcg(v1 / "a", limit_mib=128, usage_mib=128, memsw=(256, 228))
        got = check.check(0)
        assert [e.kill_reason for e in got.events] == ["low_mem_and_swap"]
        sig = got.events[0].signals
        assert sig is not None and sig["swap_used_kib"] == 100 * MIB_KIB and sig["swap_free_kib"] == 28 * MIB_KIB
        # the same memcg well below its memsw limit merely swaps: no event
        _memcg(v1 / "a", limit_mib=128, usage_mib=128, memsw=(512, 228))
        assert check.check(1).events == []
    finally:
        check.close()


def test_headroom_degrades_when_a_memcg_vanishes_or_nothing_is_limited(tmp_path: Path) -> None:
    check, v1, _proc = _hybrid(tmp_path)
    try:
        check.check(0)
        with capture_logs() as logs:
            for f in (v1 / "b").iterdir():
                f.unlink()
            (v1 / "b").rmdir()  # removed mid-run
            for i in range(3):
                assert check.check(1 + i).events == []
        assert [e["event"] for e in logs] == ["headroom.memcg_gone"]
        assert check.check(9).margin_kib == (128 - 10 - 32) * MIB_KIB  # /a is still watched
        _memcg(v1 / "a", limit_mib=None, usage_mib=10)
        check.close()
        fresh, _, _ = _hybrid(tmp_path / "again")
        _memcg(tmp_path / "again" / "v1" / "a", limit_mib=None, usage_mib=10)
        _memcg(tmp_path / "again" / "v1" / "b", limit_mib=None, usage_mib=10)
        with capture_logs() as logs:
            assert fresh.check(0).margin_kib is None and fresh.check(1).events == []
        assert [e["event"] for e in logs] == ["headroom.no_limit"]
        fresh.close()
    finally:
        check.close()


def test_headroom_on_native_cgroup_v2(tmp_path: Path) -> None:
    proc, v2 = tmp_path / "proc", tmp_path / "v2"
    scope = v2 / "scope"
    leaf = scope / "job"
    leaf.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("")
    (leaf / "cgroup.procs").write_text("21\n")
    (proc / "21").mkdir(parents=True)
    (proc / "21" / "cgroup").write_text("0::/scope/job\n")
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n")
    for d, mx, high, cur in ((scope, "max", str(512 << 20), 300 << 20), (leaf, str(256 << 20), "max", 300 << 20)):
        (d / "memory.stat").write_text("anon 251658240\nfile 4194304\ninactive_file 2097152\nactive_file 1048576\n")
        (d / "memory.max").write_text(mx + "\n")
        (d / "memory.high").write_text(high + "\n")
        (d / "memory.current").write_text(str(cur))
    (leaf / "memory.current").write_text(str(240 << 20))
    check = HeadroomCheck(scope, SignalsConfig(), ProcFs(proc), None, str(v2), tmp_path / "sys")
    got = check.check(0)
    # the leaf's memory.max (256 MiB, 16 MiB left) binds before the scope's memory.high (512 MiB)
    assert [e.kill_reason for e in got.events] == ["cgroup_headroom"]
    assert got.events[0].signals["limit_kib"] == 256 * MIB_KIB  # type: ignore[index]
    assert got.events[0].signals["headroom_kib"] == 16 * MIB_KIB + 3 * MIB_KIB  # type: ignore[index]
    assert got.events[0].victims == frozenset({21})
    assert check.wake_fds() == {}  # no memory.events file in this fake tree: the adaptive period alone
    check.close()
    (leaf / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    check = HeadroomCheck(scope, SignalsConfig(), ProcFs(proc), None, str(v2), tmp_path / "sys")
    check.check(0)
    assert list(check.wake_fds().values()) == [select.POLLPRI]  # v2: memory.events polls POLLPRI
    check.close()


def test_a_limit_set_later_is_picked_up(tmp_path: Path) -> None:
    from lmkd_py.headroom import CHAINS_TTL_NS

    check, v1, _proc = _hybrid(tmp_path)
    try:
        _memcg(v1 / "a", limit_mib=None, usage_mib=120)
        _memcg(v1 / "b", limit_mib=None, usage_mib=10)
        assert check.check(0).margin_kib is None  # nothing limited yet
        _memcg(v1 / "a", limit_mib=128, usage_mib=120)
        assert check.check(1).events == []  # not looked up again yet
        got = check.check(CHAINS_TTL_NS)
        assert [e.victims for e in got.events] == [frozenset({11})]
    finally:
        check.close()
