"""lmkd's kill reasons (reasons.py): thrashing with its decay, swap left, each reason and its band floor,
and the degrade cases, on recorded /proc values."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from lmkd_py.config import SignalsConfig
from lmkd_py.procfs import PAGE_KIB, ProcFs, SwapDevice, Watermarks, ZramMmStat
from lmkd_py.reasons import (
    LmkdCheck,
    LmkdState,
    Sample,
    Thrashing,
    Wmark,
    breached,
    decide,
    swap_free_kib,
    swap_util_pct,
    took_kill,
    zram_room_kib,
)

S = 1_000_000_000
WM = Watermarks(min_pages=1000, low_pages=2000, high_pages=3000)
LRU = 100_000  # pages of file cache


def test_breached_names_the_lowest_watermark() -> None:
    assert [breached(n, WM) for n in (999, 1000, 1999, 2999, 3000)] == [
        Wmark.MIN, Wmark.LOW, Wmark.LOW, Wmark.HIGH, Wmark.NONE]


def test_thrashing_windows_and_decay() -> None:
    th = Thrashing(limit_pct=100, decay_pct=10)
    assert th.update(0, LRU, 0) == 0
    assert th.update(50_000, LRU, S // 2) == 49  # half of the cache refaulted so far
    # window crossed (1 window): 80 % refaulted in it, below the limit: halved and carried
    assert th.update(80_000, LRU, S + 1) == 39
    assert th.update(80_000, LRU, S + S // 2) == 39  # no new refaults in this window
    # two windows passed: always decayed, by 2 windows (>> 2)
    assert th.update(80_000, LRU, 3 * S + 2) == 0
    # over the limit in one window: kept whole (no victim was found; lmkd retries)
    th2 = Thrashing(limit_pct=100, decay_pct=10)
    th2.update(0, LRU, 0)
    assert th2.update(150_000, LRU, S + 1) == 149
    assert th2.update(150_000, LRU, S + S // 2) == 149
    th2.cut()
    assert th2.limit == 90
    th2.cut()
    assert th2.limit == 81
    th2.update(150_000, LRU, 2 * S + 2)  # the next window restores the limit
    assert th2.limit == 100


def test_swap_free_is_the_least_of_swapfree_zram_room_and_easy_memory() -> None:
    mi = {"SwapTotal": 524284, "SwapFree": 400000, "MemFree": 10_000_000, "Inactive(file)": 0}
    assert swap_free_kib({"SwapTotal": 0, "SwapFree": 0}, None, {}, 1) is None
    assert swap_free_kib(mi, None, {}, 1) == 400000
    z = SwapDevice("/dev/zram1", 524284, 124284)
    # 64 MiB mem_limit, 60 MiB used, 4:1 so far -> 16 MiB more fit
    mm = ZramMmStat(240 << 20, 60 << 20, 60 << 20, 64 << 20)
    assert zram_room_kib(z, mm) == 16 * 1024
    assert zram_room_kib(z, ZramMmStat(0, 0, 0, 0)) == 400000  # no mem_limit: the device's free space
    assert swap_free_kib(mi, [z], {"zram1": mm}, 1) == 16 * 1024
    # zram takes RAM: with little free memory, free swap is bounded by it (swap_compression_ratio 1)
    assert swap_free_kib({**mi, "MemFree": 50_000}, None, {}, 1) == 50_000
    assert swap_free_kib({**mi, "MemFree": 50_000}, None, {}, 0) == 400000
    assert swap_util_pct({"SwapTotal": 100, "SwapFree": 40, "Active(anon)": 20, "Inactive(anon)": 20}) == 60


def sample(*, free_pages: int = 10_000, refault: int = 0, direct: int = 0, kswapd: int = 0,
           swap_free: int | None = None, swap_total: int = 0, lru: int = LRU,
           extra: dict[str, int] | None = None) -> Sample:
    mi = {"MemFree": free_pages * PAGE_KIB, "SwapTotal": swap_total, "SwapFree": swap_free or 0, **(extra or {})}
    vs = {"workingset_refault_file": refault, "nr_active_file": lru // 2, "nr_inactive_file": lru - lru // 2,
          "pgscan_direct": direct, "pgscan_kswapd": kswapd}
    return Sample(mi, vs, swap_free, breached(free_pages, WM), WM)


def state(**cfg: object) -> LmkdState:
    c = SignalsConfig(**cfg)  # type: ignore[arg-type]
    return LmkdState(c, Thrashing(c.thrashing_limit_pct, c.thrashing_limit_decay_pct))


def run(st: LmkdState, first: Sample, then: Sample, t: int = S // 2):  # type: ignore[no-untyped-def]
    assert decide(first, st, 0) is None  # the first look only sets the baselines
    return decide(then, st, t)


SWAP = 1_000_000  # KiB of swap; low below 100,000


@pytest.mark.parametrize(
    ("then", "reason", "adj"),
    [
        # swap low and 120 % of the cache refaulted: min watermark holds -> spare perceptible (201)
        (sample(refault=120_000, kswapd=5, swap_free=50_000, swap_total=SWAP, free_pages=1500),
         "low_swap_and_thrashing", 201),
        # ... below the min watermark: anything down to 0
        (sample(refault=120_000, kswapd=5, swap_free=50_000, swap_total=SWAP, free_pages=900),
         "low_swap_and_thrashing", 0),
        # swap low, below the low watermark, little thrashing
        (sample(refault=10, kswapd=5, swap_free=50_000, swap_total=SWAP, free_pages=1500), "low_mem_and_swap", 201),
        # below the low watermark and thrashing, swap fine
        (sample(refault=120_000, kswapd=5, swap_free=900_000, swap_total=SWAP, free_pages=1500),
         "low_mem_and_thrashing", 201),
        # ... thrashing at the critical level (2 x limit) may kill perceptible processes
        (sample(refault=250_000, kswapd=5, free_pages=1500), "low_mem_and_thrashing", 0),
        # direct reclaim and thrashing, watermarks fine
        (sample(refault=120_000, direct=5, free_pages=50_000), "direct_recl_and_thrashing", 201),
    ],
)
def test_each_reason_with_lmkds_band_floor(then: Sample, reason: str, adj: int) -> None:
    st = state()
    first = sample(swap_free=then.swap_free_kib, swap_total=then.meminfo["SwapTotal"])
    d = run(st, first, then)
    assert d is not None and (d.reason, d.min_oom_score_adj) == (reason, adj)
    assert d.signals["thrashing_pct"] is not None and "wmark_low_kib" in d.signals


def test_quiet_cases() -> None:
    # nothing changed (no reclaim, no refault): no decision even below the watermark with swap low
    assert run(state(), sample(swap_free=1, swap_total=SWAP), sample(swap_free=1, swap_total=SWAP, free_pages=10)) \
        is None
    # thrashing hard but memory is plentiful and no direct reclaim (kswapd only): lmkd does not kill
    assert run(state(), sample(), sample(refault=500_000, kswapd=9, free_pages=50_000)) is None
    # no swap at all: the swap reasons never fire, even at the min watermark
    assert run(state(), sample(), sample(refault=10, kswapd=9, free_pages=10)) is None


def test_swap_util_reason_is_off_by_default_and_fires_when_set() -> None:
    then = sample(refault=10, kswapd=5, swap_free=600_000, swap_total=SWAP, free_pages=1500,
                  extra={"Active(anon)": 100_000, "Inactive(anon)": 100_000})
    first = sample(swap_free=600_000, swap_total=SWAP)
    assert run(state(), first, then) is None  # swap_util_max 100 = off (lmkd's default)
    d = run(state(swap_util_max_pct=50), first, then)
    assert d is not None and d.reason == "low_mem_and_swap_util" and d.signals["swap_util_pct"] == 66


def test_a_thrashing_kill_cuts_the_limit_and_then_low_filecache_keeps_killing() -> None:
    st = state(filecache_min_kib=2 * LRU * PAGE_KIB)
    d = run(st, sample(), sample(refault=120_000, direct=5, free_pages=50_000))
    assert d is not None and d.reason == "direct_recl_and_thrashing"
    took_kill(st, d, sample(refault=120_000, direct=5), S // 2)
    assert st.thrashing.limit == 90  # lmkd: limit * (100 - decay) / 100
    # the look after the kill: above the low watermark, reclaim goes on, no thrashing since the reset
    d2 = decide(sample(refault=120_010, direct=6, free_pages=50_000), st, S // 2 + 10_000_000)
    assert d2 is not None and d2.reason == "low_filecache_after_thrashing" and d2.min_oom_score_adj == 201
    # with enough file cache the check stops
    st.check_filecache = True
    assert decide(sample(refault=120_020, direct=7, free_pages=50_000, lru=10 * LRU), st, S // 2 + 20_000_000) \
        is None
    assert st.check_filecache is False


def test_pressure_after_kill_below_the_min_watermark() -> None:
    st = state()
    d = run(st, sample(), sample(refault=120_000, kswapd=5, free_pages=1500))
    assert d is not None and d.reason == "low_mem_and_thrashing"
    took_kill(st, d, sample(refault=120_000, kswapd=5), S // 2)
    d2 = decide(sample(refault=120_001, kswapd=6, free_pages=900), st, S // 2 + 10_000_000)
    assert d2 is not None and (d2.reason, d2.min_oom_score_adj) == ("pressure_after_kill", 0)
    # only on the first look after the kill
    d3 = decide(sample(refault=120_002, kswapd=7, free_pages=900), st, S // 2 + 20_000_000)
    assert d3 is None or d3.reason != "pressure_after_kill"


def _fake_proc(root: Path, *, meminfo: str, vmstat: str, zoneinfo: str | None, swaps: str | None) -> ProcFs:
    root.mkdir(exist_ok=True)
    (root / "meminfo").write_text(meminfo)
    (root / "vmstat").write_text(vmstat)
    if zoneinfo is not None:
        (root / "zoneinfo").write_text(zoneinfo)
    if swaps is not None:
        (root / "swaps").write_text(swaps)
    return ProcFs(root)


def test_check_degrades_with_one_log_line_each(tmp_path: Path) -> None:
    from tests.unit.test_signals_parse import VMSTAT

    proc = _fake_proc(tmp_path / "proc", meminfo="MemTotal: 1000000 kB\nMemFree: 900000 kB\nSwapTotal: 0 kB\n"
                      "SwapFree: 0 kB\n", vmstat=VMSTAT, zoneinfo=None, swaps=None)
    t = [0]
    check = LmkdCheck(SignalsConfig(), proc, sys_root=tmp_path / "sys", clock=lambda: t[0])
    with capture_logs() as logs:
        for i in range(5):
            t[0] = i * 70 * S  # past the once-a-minute zoneinfo re-read
            got = check.check(t[0])
            assert got.events == [] and got.margin_kib is None  # no zoneinfo: margin unknown
    names = [e["event"] for e in logs]
    assert names.count("signals.zoneinfo_unavailable") == 1 and names.count("signals.no_swap") == 1
    # vmstat gone too: no decision, still no exception and one line
    (tmp_path / "proc" / "vmstat").unlink()
    with capture_logs() as logs:
        assert check.check(400 * S).events == [] and check.check(401 * S).events == []
    assert [e["event"] for e in logs] == ["signals.vmstat_unavailable"]


def test_check_emits_an_event_that_rechecks_itself(tmp_path: Path) -> None:
    from tests.unit.test_signals_parse import ZONEINFO

    wm = Watermarks(41 + 6090 + 8353 + 3072, 51 + 6090 + 10441 + 3072, 61 + 6090 + 12529 + 3072)
    low_kib = wm.low_pages * PAGE_KIB
    vm = "nr_active_file 50000\nnr_inactive_file 50000\nworkingset_refault_file {r}\npgscan_kswapd {k}\n" \
         "pgscan_direct 0\n"
    mem = "MemTotal: 1000000 kB\nMemFree: {f} kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
    proc = _fake_proc(tmp_path / "proc", meminfo=mem.format(f=low_kib + 40960), vmstat=vm.format(r=0, k=0),
                      zoneinfo=ZONEINFO, swaps=None)
    t = [0]
    check = LmkdCheck(SignalsConfig(), proc, sys_root=tmp_path / "sys", clock=lambda: t[0])
    first = check.check(0)
    assert first.events == [] and first.margin_kib == 40960
    (tmp_path / "proc" / "meminfo").write_text(mem.format(f=low_kib - 4096))
    (tmp_path / "proc" / "vmstat").write_text(vm.format(r=150_000, k=10))
    t[0] = S // 2
    got = check.check(t[0])
    assert [e.kill_reason for e in got.events] == ["low_mem_and_thrashing"] and got.margin_kib == 0
    ev = got.events[0]
    assert ev.level.min_oom_score_adj == 201 and ev.mechanism == "signals" and ev.signals is not None
    assert ev.still is not None and ev.still()
    (tmp_path / "proc" / "meminfo").write_text(mem.format(f=low_kib + 4096))  # memory came back
    assert not ev.still()
