"""The decision signals' parsers on recorded snapshots (this 6.18 x86_64 machine, trimmed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmkd_py.procfs import (
    CgroupEntry,
    ProcParseError,
    SwapDevice,
    Watermarks,
    ZramMmStat,
    memcg_v1_path,
    parse_cgroup,
    parse_memcg_bytes,
    parse_swaps,
    parse_vmstat,
    parse_zoneinfo_watermarks,
    parse_zram_mm_stat,
)

VMSTAT = """\
nr_free_pages 5656089
nr_zone_inactive_file 332407
nr_inactive_file 332407
nr_active_file 116557
workingset_refault_anon 0
workingset_refault_file 4152473
allocstall_dma 0
allocstall_normal 3
pgscan_kswapd 17
pgscan_direct 25
pgscan_file 9790316
"""

# Three zones as /proc/zoneinfo prints them (per-node stats and most counters cut): DMA with a lowmem
# reserve, DMA32, and an empty Movable zone whose watermarks must not count.
ZONEINFO = """\
Node 0, zone      DMA
  per-node stats
      nr_inactive_anon 1578
      workingset_refault_file 4152473
  pages free     3840
        boost    0
        min      41
        low      51
        high     61
        promo    71
        spanned  4095
        present  3998
        managed  3840
        cma      0
        protection: (0, 3018, 6090, 6090, 6090)
      nr_free_pages 3840
  pagesets
    cpu: 0
              count: 0
              high:  0
              batch: 1
Node 0, zone    DMA32
  pages free     772794
        boost    0
        min      8353
        low      10441
        high     12529
        promo    14617
        spanned  1044480
        present  782336
        managed  772794
        cma      0
        protection: (0, 0, 3072, 3072, 3072)
      nr_free_pages 772794
  pagesets
    cpu: 0
              count: 48
              high:  1294
              batch: 63
Node 0, zone  Movable
  pages free     0
        boost    0
        min      32
        low      32
        high     32
        promo    32
        spanned  0
        present  0
        managed  0
        protection: (0, 0, 0, 0, 0)
"""


def test_vmstat_keeps_the_counters_lmkd_uses() -> None:
    got = parse_vmstat(VMSTAT)
    assert got == {"nr_inactive_file": 332407, "nr_active_file": 116557, "workingset_refault_file": 4152473,
                   "allocstall_dma": 0, "allocstall_normal": 3, "pgscan_kswapd": 17, "pgscan_direct": 25}
    assert parse_vmstat(VMSTAT, None)["pgscan_file"] == 9790316
    # before 5.9 the counter had no _file suffix
    assert parse_vmstat("workingset_refault 12\n") == {"workingset_refault": 12}
    with pytest.raises(ProcParseError, match="pgscan_direct"):
        parse_vmstat("pgscan_direct lots\n")


def test_zoneinfo_watermarks_sum_populated_zones_with_their_largest_reserve() -> None:
    wm = parse_zoneinfo_watermarks(ZONEINFO)
    # DMA: 41/51/61 + 6090; DMA32: 8353/10441/12529 + 3072; Movable has no pages present
    assert wm == Watermarks(41 + 6090 + 8353 + 3072, 51 + 6090 + 10441 + 3072, 61 + 6090 + 12529 + 3072)
    # the per-CPU "high:" of a pageset is not the zone's high watermark (the first one counts)
    assert "high:  1294" in ZONEINFO
    with pytest.raises(ProcParseError, match="no populated zone"):
        parse_zoneinfo_watermarks("Node 0, zone Movable\n  pages free 0\n        present  0\n        high 3\n")
    with pytest.raises(ProcParseError, match="protection"):
        parse_zoneinfo_watermarks("Node 0, zone DMA\n        present 1\n        high 2\n        protection: (a, b)\n")


def test_zram_mm_stat_swaps_and_memcg_sizes() -> None:
    mm = parse_zram_mm_stat("76546048  1212416  2134016 268435456  2134016     1234        0        0        0\n")
    assert mm == ZramMmStat(76546048, 1212416, 2134016, 268435456)
    with pytest.raises(ProcParseError):
        parse_zram_mm_stat("1 2 3\n")
    with pytest.raises(ProcParseError):
        parse_zram_mm_stat("1 2 x 4\n")
    swaps = parse_swaps("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
                        "/dev/zram1                              partition\t524284\t\t99284\t\t-2\n"
                        "/var/swapfile                           file\t\t1048572\t\t0\t\t-3\n")
    assert swaps == [SwapDevice("/dev/zram1", 524284, 99284), SwapDevice("/var/swapfile", 1048572, 0)]
    assert [s.zram for s in swaps] == ["zram1", None]
    assert parse_swaps("Filename\tType\tSize\tUsed\tPriority\n") == []
    assert parse_memcg_bytes("268435456\n") == 268435456
    assert parse_memcg_bytes("max\n") is None
    assert parse_memcg_bytes("9223372036854771712\n") is None  # v1 PAGE_COUNTER_MAX: no limit
    with pytest.raises(ProcParseError):
        parse_memcg_bytes("lots\n")


def test_memcg_v1_path_of_a_hybrid_host() -> None:
    text = "9:name=systemd:/\n4:memory:/process_api/a8cf\n3:cpuset:/\n0::/lmkd-h-signals-x\n"
    assert memcg_v1_path(parse_cgroup(text)) == "/process_api/a8cf"
    assert memcg_v1_path([CgroupEntry(0, (), "/only-v2")]) is None


def test_subtree_pids_walks_children_and_skips_what_vanishes(tmp_path: Path) -> None:
    from lmkd_py.procfs import subtree_pids

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()  # a child without cgroup.procs (being removed): skipped
    (tmp_path / "cgroup.procs").write_text("1\n")
    (tmp_path / "a" / "cgroup.procs").write_text("2\n3\n")
    (tmp_path / "a" / "b" / "cgroup.procs").write_text("4\n")
    assert subtree_pids(tmp_path) == {1, 2, 3, 4}
    assert subtree_pids(tmp_path / "a" / "b") == {4}
    assert subtree_pids(tmp_path / "gone") == set()


def test_flat_keyed_cgroup_files() -> None:
    from lmkd_py.procfs import parse_flat_keyed

    assert parse_flat_keyed("low 0\nhigh 3\nmax 12\noom 1\noom_kill 1\n")["max"] == 12
    stat = parse_flat_keyed("cache 4096\ntotal_inactive_file 8192\ntotal_active_file 4096\n\n")
    assert stat == {"cache": 4096, "total_inactive_file": 8192, "total_active_file": 4096}
    with pytest.raises(ProcParseError, match="oom"):
        parse_flat_keyed("oom many\n")
