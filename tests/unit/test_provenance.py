"""Confounders: each setting read from a fake /sys and /proc, a missing or unreadable source recorded
as unknown with the reason, older records without the block still loading, and one real read here."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lmkd_py.provenance import collect, confounders
from lmkd_py.records import (
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Steps,
    Victim,
    read_records,
    record_dict,
    record_json,
)

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 1
CPU implementer\t: 0x41
CPU part\t: 0xd03
"""
SWAPS = """Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/zram0                              partition\t1048572\t\t0\t\t100
"""


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    _w(sys_root / "kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n")
    _w(sys_root / "kernel/mm/transparent_hugepage/defrag", "always defer defer+madvise [madvise] never\n")
    _w(sys_root / "kernel/mm/lru_gen/enabled", "0x0007\n")
    _w(proc_root / "sys/vm/swappiness", "100\n")
    _w(proc_root / "sys/vm/min_free_kbytes", "22528\n")
    _w(proc_root / "sys/vm/watermark_scale_factor", "10\n")
    _w(proc_root / "swaps", SWAPS)
    _w(sys_root / "block/zram0/comp_algorithm", "lzo lzo-rle [zstd] lz4\n")
    _w(sys_root / "block/zram0/disksize", "1073741824\n")
    _w(sys_root / "block/zram0/max_comp_streams", "4\n")
    _w(sys_root / "block/sda/size", "1\n")
    _w(proc_root / "cpuinfo", ARM_CPUINFO)
    _w(sys_root / "devices/system/cpu/online", "0-3,6\n")
    for cpu, gov in ((0, "schedutil"), (1, "schedutil"), (4, "performance")):
        _w(sys_root / f"devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor", f"{gov}\n")
    _w(proc_root / "cmdline", "BOOT_IMAGE=/vmlinuz-7.3 root=/dev/vda initrd=/initrd.img psi=1\n")
    return sys_root, proc_root


def test_every_setting_from_a_fake_tree(tmp_path: Path) -> None:
    c = confounders(*fake_tree(tmp_path), page_size=16384)
    values = {f.name: getattr(c, f.name).value for f in dataclasses.fields(c)}
    assert values == {
        "thp_enabled": "madvise",
        "thp_defrag": "madvise",
        "lru_gen": "0x0007",
        "swappiness": "100",
        "min_free_kbytes": "22528",
        "watermark_scale_factor": "10",
        "swap": "/dev/zram0 partition 1048572 KiB prio 100",
        "zram": "zram0 zstd 1073741824 B streams 4",
        "page_size": "16384",
        "cpu_model": "implementer 0x41 part 0xd08 + implementer 0x41 part 0xd03",
        "cpu_count": "5",
        "cpufreq_governor": "performance, schedutil",
        "kernel_cmdline": "root=/dev/vda psi=1",  # BOOT_IMAGE= and initrd= name the kernel itself
    }


def test_missing_and_unreadable_sources_are_unknown_with_the_reason(tmp_path: Path) -> None:
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    _w(proc_root / "swaps", SWAPS.splitlines()[0] + "\n")  # header only: no swap
    (sys_root / "block").mkdir(parents=True)
    _w(sys_root / "devices/system/cpu/online", "garbage\n")
    (proc_root / "sys/vm").mkdir(parents=True)
    (proc_root / "sys/vm/swappiness").mkdir()  # a directory: reading it fails with EISDIR
    c = confounders(sys_root, proc_root)
    assert c.swap is not None and c.swap.value == "none"
    assert c.zram is not None and c.zram.value == "none"
    assert c.lru_gen is not None and c.lru_gen.value is None
    assert c.lru_gen.unreadable is not None and "lru_gen/enabled: no such file" in c.lru_gen.unreadable
    assert c.swappiness is not None and c.swappiness.unreadable is not None
    assert "directory" in c.swappiness.unreadable.lower()
    assert c.cpu_count is not None and c.cpu_count.unreadable is not None and "not a CPU list" in c.cpu_count.unreadable
    assert c.cpufreq_governor is not None and "no cpufreq" in str(c.cpufreq_governor.unreadable)
    for name in (f.name for f in dataclasses.fields(c)):
        s = getattr(c, name)
        assert (s.value is None) != (s.unreadable is None), name  # a value, or why there is none


def test_records_without_the_block_still_load_and_new_ones_round_trip(tmp_path: Path) -> None:
    prov = collect(sys_root=fake_tree(tmp_path)[0], proc_root=tmp_path / "proc")
    new = KillRecord(record_id="r", wall_time="t", outcome=Outcome.KILLED, victim=Victim(pid=5), provenance=prov,
                     steps=Steps(start_ns=1, end_ns=2), mrelease=Mrelease(status=MreleaseStatus.OK))
    as_before = record_dict(new)
    del as_before["provenance"]["confounders"]  # what lmkd-py wrote before the block existed
    path = tmp_path / "field.jsonl"
    path.write_text(json.dumps(as_before) + "\n" + record_json(new) + "\n")
    result = read_records([path])
    assert not result.problems
    old_rec, new_rec = result.records
    assert old_rec.provenance.confounders is None and old_rec.provenance.kernel_release == prov.kernel_release
    assert new_rec.provenance.confounders == prov.confounders


def test_real_read_on_this_machine() -> None:
    c = confounders()
    assert c.page_size is not None and c.page_size.value == str(os.sysconf("SC_PAGE_SIZE"))
    assert c.cpu_count is not None and c.cpu_count.value == str(len(os.sched_getaffinity(0)))
    assert c.swappiness is not None
    assert c.swappiness.value == Path("/proc/sys/vm/swappiness").read_text().strip()
    assert c.thp_enabled is not None and c.thp_enabled.value in ("always", "madvise", "never")
    assert c.cpu_model is not None and c.cpu_model.value
    cmdline = Path("/proc/cmdline").read_text()
    assert c.kernel_cmdline is not None and c.kernel_cmdline.value is not None
    assert all(word in cmdline for word in c.kernel_cmdline.value.split())


def test_machine_id_is_an_app_specific_hash_never_the_id_itself(tmp_path: Path) -> None:
    from lmkd_py.provenance import machine_id

    (tmp_path / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    got = machine_id(tmp_path)
    assert got is not None and len(got) == 32 and got != "0123456789abcdef0123456789abcdef"
    assert machine_id(tmp_path) == got  # stable: the same board across boots
    (tmp_path / "machine-id").write_text("fedcba9876543210fedcba9876543210\n")
    assert machine_id(tmp_path) not in (None, got)
    (tmp_path / "machine-id").write_text("uninitialized\n")
    assert machine_id(tmp_path) is None
    assert machine_id(tmp_path / "missing") is None
