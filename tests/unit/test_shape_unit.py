"""The shape family without processes: smaps parsing and classes, the file format as untrusted input,
scaling, the memory check, the replica's plan against a baseline, and fidelity."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from lmkd_py.shape import (
    CLASSES,
    Machine,
    Shape,
    ShapeError,
    ShapeProvenance,
    ShapeVma,
    capture,
    check_fits,
    classify,
    compare,
    dumps,
    loads,
    parse_mountinfo_devices,
    parse_smaps,
    replay_plan,
    shape_to_dict,
    target_for,
    within,
)
from lmkd_py.shape.smaps import SmapsParseError

FIELDS = """Size:               {size} kB
KernelPageSize:        {kps} kB
Rss:                 {rss} kB
Shared_Dirty:          0 kB
Private_Dirty:       {dirty} kB
AnonHugePages:       {thp} kB
Swap:                  {swap} kB
Locked:                0 kB
VmFlags: {flags}
"""


def entry(start: int, size_kib: int, perms: str, dev: str, inode: int, path: str, *, rss: int = 0, dirty: int = 0,
          thp: int = 0, swap: int = 0, kps: int = 4, flags: str = "rd wr mr mw me ac") -> str:
    end = start + size_kib * 1024
    head = f"{start:012x}-{end:012x} {perms} 00000000 {dev} {inode:<10d} {path}".rstrip()
    return head + "\n" + FIELDS.format(size=size_kib, kps=kps, rss=rss, dirty=dirty, thp=thp, swap=swap, flags=flags)


SMAPS = "".join([
    entry(0x400000, 8, "r--p", "fe:00", 11, "/usr/bin/prog", rss=8),
    entry(0x402000, 16, "r-xp", "fe:00", 11, "/usr/bin/prog", rss=12),
    entry(0x406000, 4, "rw-p", "fe:00", 11, "/usr/bin/prog", rss=4, dirty=4),
    entry(0x1000000, 132, "rw-p", "00:00", 0, "[heap]", rss=100, dirty=100),
    entry(0x7f0000000000, 4096, "rw-p", "00:00", 0, "", rss=4096, dirty=4096, thp=2048),
    entry(0x7f0000400000, 4, "---p", "00:00", 0, ""),
    entry(0x7f0000401000, 64, "rw-p", "00:00", 0, "[anon:java heap]", rss=64, dirty=64, swap=0),
    entry(0x7f0000411000, 1024, "rw-s", "00:01", 77, "/dev/zero (deleted)", rss=512, dirty=512),
    entry(0x7f0000511000, 1024, "rw-s", "00:01", 78, "/memfd:pool (deleted)", rss=256),
    entry(0x7f0000611000, 256, "rw-s", "00:1a", 79, "/dev/shm/seg with space", rss=256, dirty=256),
    entry(0x7f0000651000, 32, "rw-s", "fe:00", 80, "/tmp/hsperfdata_root/42", rss=32, dirty=8),
    entry(0x7f0000659000, 2048, "rw-p", "00:1b", 81, "/mnt/huge/x", kps=2048, flags="rd wr mr mw me ht"),
    entry(0x7ffc00000000, 132, "rw-p", "00:00", 0, "[stack]", rss=24, dirty=24),
    entry(0x7ffc00100000, 8, "r-xp", "00:00", 0, "[vdso]", rss=4),
])
MOUNTINFO = """22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:26 / /dev/shm rw,nosuid,nodev - tmpfs tmpfs rw,size=100k
31 22 0:27 / /mnt/huge rw - hugetlbfs hugetlbfs rw,pagesize=2M
garbage line
"""


def shape_of(vmas: list[ShapeVma], *, threads: int = 4, arch: str = "x86_64", page: int = 4096) -> Shape:
    return Shape(provenance=ShapeProvenance(comm="prog", kernel="6.18", arch=arch, page_size=page,
                                            hugepage_kib=2048), threads=threads, vmas=tuple(vmas))


def test_parse_smaps_keeps_every_entry_and_field() -> None:
    vmas = parse_smaps(SMAPS)
    assert len(vmas) == 14
    shm = vmas[9]
    assert shm.path == "/dev/shm/seg with space" and shm.dev == (0, 0x1A) and shm.inode == 79
    assert shm.size_kib == 256 and shm.get("Rss") == 256 and shm.perms == "rw-s"
    assert vmas[4].get("AnonHugePages") == 2048
    assert vmas[5].path is None and "ht" in vmas[11].flags
    with pytest.raises(SmapsParseError, match="line 1"):
        parse_smaps("not smaps at all\n")


def test_mountinfo_devices() -> None:
    assert parse_mountinfo_devices(MOUNTINFO) == {(254, 0): "ext4", (0, 26): "tmpfs", (0, 27): "hugetlbfs"}


def test_every_class_is_recognised() -> None:
    # 00:1a is the tmpfs in this fake mountinfo's numbering (0:26), 00:1b hugetlbfs (0:27).
    fstypes = parse_mountinfo_devices(MOUNTINFO)
    got = [classify(v, fstypes, 4096) for v in parse_smaps(SMAPS)]
    assert got == ["file_private", "file_private", "file_private", "heap", "anon_private", "anon_private",
                   "anon_private", "anon_shared", "shmem", "shmem", "file_shared", "hugetlb", "stack", "special"]
    assert set(got) == set(CLASSES) - set()  # the fixture covers every class
    # Without mountinfo a /dev/shm file cannot be told from a disk file; the hugetlb page size still tells.
    blind = [classify(v, {}, 4096) for v in parse_smaps(SMAPS)]
    assert blind[9] == "file_shared" and blind[11] == "hugetlb"


def test_capture_from_a_fake_proc_tree(tmp_path: Path) -> None:
    pid = tmp_path / "123"
    (pid / "task" / "123").mkdir(parents=True)
    (pid / "task" / "124").mkdir()
    (pid / "stat").write_text("123 (my prog) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 2 0 4242 0 0\n")
    (pid / "status").write_text("Name:\tprog\nThreads:\t2\nVmRSS:\t5000 kB\nVmLck:\t0 kB\n")
    (pid / "mountinfo").write_text(MOUNTINFO)
    (pid / "smaps").write_text(SMAPS)
    shape = capture(123, proc=tmp_path, page_size=4096)
    s = shape.summary()
    assert shape.threads == 2 and shape.provenance.comm == "prog" and shape.status["vm_rss_kib"] == 5000
    assert s["file_private"].vmas == 3 and s["file_private"].files == 1 and s["file_private"].rss_kib == 24
    assert s["anon_private"].thp_kib == 2048 and s["shmem"].files == 2
    assert all(v.path is None for v in shape.vmas), "no file name leaves the machine by default"
    assert "/dev/shm/seg with space" in dumps(capture(123, proc=tmp_path, page_size=4096, keep_paths=True))
    assert "/usr/bin/prog" not in dumps(shape) and "hsperfdata" not in dumps(shape)
    # Round trip through the file format.
    again = loads(dumps(shape))
    assert again.vmas == shape.vmas and again.threads == 2


def test_capture_says_what_went_wrong(tmp_path: Path) -> None:
    from lmkd_py.shape import CaptureError

    with pytest.raises(CaptureError, match="no process 9"):
        capture(9, proc=tmp_path)
    pid = tmp_path / "7"
    pid.mkdir()
    (pid / "stat").write_text("7 (zombie) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 99 0 0\n")
    (pid / "smaps").write_text("")
    with pytest.raises(CaptureError, match="no memory map"):
        capture(7, proc=tmp_path)
    (pid / "smaps").unlink()
    with pytest.raises(CaptureError, match="exited during capture"):
        capture(7, proc=tmp_path)


# --- the file format as untrusted input --------------------------------------------------------------


def good_doc() -> dict[str, Any]:
    return shape_to_dict(shape_of([ShapeVma("anon_private", "rw-", 1024, rss_kib=512, dirty_kib=512),
                                   ShapeVma("file_private", "r-x", 64, rss_kib=32, file=0)]))


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d["provenance"].update(page_size=3000), "provenance.page_size"),
    (lambda d: d.update(threads=10**9), "threads"),
    (lambda d: d.update(threads="4"), "threads"),
    (lambda d: d.update(vmas=[]), "vmas"),
    (lambda d: d["vmas"][0].update({"class": "weird"}), r"vmas\[0\]\.class"),
    (lambda d: d["vmas"][0].update(prot="rwz"), r"vmas\[0\]\.prot"),
    (lambda d: d["vmas"][0].update(rss_kib=4096), r"vmas\[0\]\.rss_kib"),
    (lambda d: d["vmas"][0].update(size_kib=1 << 50), r"vmas\[0\]\.size_kib"),
    (lambda d: d["vmas"][0].update(dirty_kib=-1), r"vmas\[0\]\.dirty_kib"),
    (lambda d: d["vmas"][0].update(thp_kib=600), r"vmas\[0\]\.thp_kib"),
    (lambda d: d["vmas"][1].pop("file"), r"vmas\[1\]\.file"),
    (lambda d: d["classes"]["anon_private"].update(rss_kib=1), r"classes\.anon_private\.rss_kib"),
    (lambda d: d["provenance"].update(comm="x" * 10_000), "provenance.comm"),
    (lambda d: d.update(unreadable=["x"] * 1000), "unreadable"),
])
def test_bad_fields_are_named(edit: Any, field: str) -> None:
    doc = good_doc()
    edit(doc)
    with pytest.raises(ShapeError, match=field):
        loads(json.dumps(doc))


def test_file_size_and_count_are_bounded() -> None:
    with pytest.raises(ShapeError, match="more than"):
        loads(b" " * (64 << 20) + b"{}")
    doc = good_doc()
    doc["vmas"] = doc["vmas"][:1] * 300_000
    doc.pop("classes")
    with pytest.raises(ShapeError, match="vmas: 300000 VMAs"):
        loads(json.dumps(doc))
    with pytest.raises(ShapeError, match="not JSON"):
        loads("[" * 100_000)


# --- scaling, the machine, the plan --------------------------------------------------------------------

HERE = Machine(arch="x86_64", page_size=4096, hugepage_kib=2048, mem_available_kib=8 << 20, max_map_count=65530)


def mixed(n: int = 40) -> list[ShapeVma]:
    out = [ShapeVma("anon_private", "rw-", 8 * (i + 1), rss_kib=4 * (i + 1), dirty_kib=4 * (i + 1))
           for i in range(n)]
    out += [ShapeVma("file_private", "r--", 64, rss_kib=16, file=i // 2) for i in range(n // 2)]
    out += [ShapeVma("heap", "rw-", 1024, rss_kib=800, dirty_kib=800), ShapeVma("stack", "rw-", 132, rss_kib=20),
            ShapeVma("special", "r-x", 8, rss_kib=4)]
    return out


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0, 2.0, 3.0])
def test_scale_is_proportional_and_keeps_the_size_distribution(scale: float) -> None:
    shape = shape_of(mixed(), threads=10)
    t = target_for(shape, HERE, scale)
    orig, got = shape.summary(), Shape(shape.provenance, t.threads, t.vmas).summary()
    for cls in ("anon_private", "file_private"):
        assert got[cls].vmas == round(orig[cls].vmas * scale)
        assert got[cls].rss_kib == pytest.approx(orig[cls].rss_kib * scale, rel=0.1)
        assert min(v.size_kib for v in t.of(cls)) >= min(v.size_kib for v in shape.vmas if v.cls == cls)
    assert got["heap"].vmas == 1 and got["heap"].rss_kib == pytest.approx(800 * scale, abs=4)
    assert got["special"].vmas == 1
    assert t.threads == round(10 * scale)
    assert got["file_private"].files == round(orig["file_private"].files * scale) or scale < 1


def test_other_arch_and_page_size_warn_and_round() -> None:
    shape = shape_of([ShapeVma("anon_private", "rw-", 6, rss_kib=6, dirty_kib=6)], arch="aarch64", page=4096)
    t = target_for(shape, dataclasses.replace(HERE, page_size=16384))
    assert any("aarch64" in w for w in t.warnings) and any("16 KiB" in w for w in t.warnings)
    (v,) = t.of("anon_private")
    assert v.size_kib == 16 and v.rss_kib % 16 == 0
    with pytest.raises(ShapeError, match="scale"):
        target_for(shape, HERE, 0)
    with pytest.raises(ShapeError, match="scale"):
        target_for(shape, HERE, float("nan"))


def test_a_shape_larger_than_memory_is_refused() -> None:
    big = shape_of([ShapeVma("anon_private", "rw-", 4 << 20, rss_kib=4 << 20, dirty_kib=4 << 20)])
    fits = target_for(big, HERE)
    assert check_fits(fits, HERE) == []
    with pytest.raises(ShapeError, match="more than 90% of the 2048 MiB available"):
        check_fits(fits, dataclasses.replace(HERE, mem_available_kib=2 << 20))
    with pytest.raises(ShapeError, match="max_map_count"):
        many = shape_of([ShapeVma("anon_private", "rw-", 4, rss_kib=4, dirty_kib=4)] * 2000)
        check_fits(target_for(many, HERE), dataclasses.replace(HERE, max_map_count=1000))


def test_plan_subtracts_the_baseline_class_by_class() -> None:
    target = target_for(shape_of(mixed()), HERE)
    baseline = shape_of([ShapeVma("anon_private", "rw-", 8, rss_kib=8, dirty_kib=8),
                         ShapeVma("file_private", "r-x", 64, rss_kib=60, file=0)])
    plan, warnings = replay_plan(target, baseline, HERE)
    pieces = plan["pieces"]
    anon = [p for p in pieces if p[0] == "anon_private"]
    files = [p for p in pieces if p[0] == "file_private"]
    # 40 wanted: 1 already there and 2 guard pages of the replica's reservation.
    assert len(anon) == 40 - 1 - 2 and len(files) == 20 - 1
    want_rss = sum(v.rss_kib for v in target.of("anon_private")) * 1024
    # The resident memory of the VMAs taken out moves to the others: the class total is kept.
    assert sum(p[3] for p in anon) + 8 * 1024 == want_rss
    assert sum(p[3] for p in files) + 60 * 1024 == pytest.approx(20 * 16 * 1024, abs=4096 * 20)
    assert {p[8] for p in files} == set(range(len(plan["files"]))) and all(f[0] == "file" for f in plan["files"])
    assert plan["heap"] == [1024 * 1024, 800 * 1024] and plan["stack"] == [20 * 1024]
    assert warnings == []
    crowded = shape_of([ShapeVma("file_private", "r-x", 64, rss_kib=60, file=0)] * 30)
    _, warnings = replay_plan(target, crowded, HERE)
    assert any("file_private: the replica's interpreter alone has 30 VMAs" in w for w in warnings)


def test_plan_keeps_the_resident_total_when_a_baseline_vma_takes_a_large_ones_place() -> None:
    # The case of a CI failure: the shape has three threads' malloc arenas (64 MiB PROT_NONE each); doubled,
    # six, and six thread stacks. The replica runs 2 x 4 - 1 = 7 threads, so its seventh arena and stack
    # stand in for the next nearest sizes: the shape's half-resident 18 MiB VMA and a 3.4 MiB one, whose
    # resident memory the other VMAs cannot hold.
    arena = ShapeVma("anon_private", "---", 65404)
    stack = ShapeVma("anon_private", "rw-", 8192, rss_kib=8, dirty_kib=8)
    shape = shape_of([*[arena] * 3, *[stack] * 3, ShapeVma("anon_private", "rw-", 3480, rss_kib=2924, dirty_kib=2924),
                      ShapeVma("anon_private", "rw-", 16384, rss_kib=16384, dirty_kib=16384, thp_kib=16384),
                      ShapeVma("anon_private", "rw-", 18816, rss_kib=9408, dirty_kib=9408),
                      *[ShapeVma("anon_private", "rw-", 204, rss_kib=204, dirty_kib=204)] * 6])
    target = target_for(shape, HERE, scale=2.0)
    baseline = shape_of([*[arena] * 7, *[stack] * 7,
                         ShapeVma("anon_private", "rw-", 2448, rss_kib=2000, dirty_kib=2000)])
    plan, _ = replay_plan(target, baseline, HERE)
    anon = [p for p in plan["pieces"] if p[0] == "anon_private"]
    assert len(anon) == len(target.of("anon_private")) - 15 - 2  # the baseline's VMAs and two guards
    want = sum(v.rss_kib for v in target.of("anon_private"))
    assert sum(p[3] for p in anon) // 1024 + 7 * 8 + 2000 == want
    assert all(p[3] <= p[2] and p[4] <= p[3] for p in anon)
    # The THP pieces are left as they were: the small-page one grew.
    assert sorted(p[5] for p in anon if p[5]) == [16384 * 1024] * 2


def test_fidelity_rows() -> None:
    a = shape_of(mixed())
    b = shape_of(mixed()[:-5])
    rows = {r.cls: r for r in compare(a, b)}
    assert rows["all"].vmas_a == len(a.vmas) and rows["all"].vmas_b == len(b.vmas)
    assert within(rows["anon_private"], 0.05) and not within(rows["file_private"], 0.05)
    assert rows["file_private"].vmas_dev == pytest.approx(-2 / 20)
