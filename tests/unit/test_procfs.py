from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmkd_py.procfs import (
    ProcFs,
    ProcParseError,
    cgroup_v2_path,
    parse_cgroup,
    parse_cmdline,
    parse_mem_available,
    parse_meminfo,
    parse_oom_score_adj,
    parse_pressure,
    parse_stat,
    parse_status,
)

STAT_TAIL = "S 1 100 100 0 -1 4194560 500 0 0 0 7 3 0 0 20 0 3 0 123456 276824064 67890 18446744073709551615"


@pytest.mark.parametrize(
    "comm",
    ["python3", "a b", "x) S 1 2 (", ")(", "with\nnewline", "((", "))", ""],
)
def test_stat_hostile_comm(comm: str) -> None:
    st_ = parse_stat(f"4242 ({comm}) {STAT_TAIL}")
    assert st_.pid == 4242
    assert st_.comm == comm
    assert st_.state == "S"
    assert st_.ppid == 1
    assert st_.num_threads == 3
    assert st_.start_time_ticks == 123456
    assert st_.rss_pages == 67890
    assert not st_.is_kernel_thread


def test_stat_kernel_thread_flag() -> None:
    text = f"2 (kthreadd) {STAT_TAIL}".replace(" 4194560 ", f" {0x00200040} ")
    assert parse_stat(text).is_kernel_thread


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=16))
def test_stat_any_comm_roundtrips(comm: str) -> None:
    assert parse_stat(f"7 ({comm}) {STAT_TAIL}").comm == comm


@pytest.mark.parametrize(
    "text",
    ["", "4242", "4242 (x", "4242 (x) S 1 2", "abc (x) " + STAT_TAIL, "1 (x) " + STAT_TAIL.replace("123456", "1e5")],
)
def test_stat_malformed(text: str) -> None:
    with pytest.raises(ProcParseError):
        parse_stat(text)


@given(st.text(max_size=400))
def test_parsers_never_raise_anything_but_parse_error(text: str) -> None:
    for parse in (parse_stat, parse_status, parse_meminfo, parse_pressure, parse_cgroup, parse_oom_score_adj,
                  parse_mem_available):
        with contextlib.suppress(ProcParseError):
            parse(text)  # type: ignore[operator]


@given(st.binary(max_size=300))
def test_cmdline_never_raises(data: bytes) -> None:
    assert all(isinstance(a, str) for a in parse_cmdline(data))


STATUS = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Tgid:\t4242
Pid:\t4242
Uid:\t1000\t1000\t1000\t1000
VmRSS:\t  270336 kB
RssAnon:\t  266752 kB
RssFile:\t    3584 kB
RssShmem:\t       0 kB
VmSwap:\t      12 kB
Threads:\t2
"""


def test_status_fields() -> None:
    s = parse_status(STATUS)
    assert (s.name, s.tgid, s.uid, s.threads) == ("python3", 4242, 1000, 2)
    assert (s.vm_rss_kib, s.rss_anon_kib, s.rss_file_kib, s.rss_shmem_kib, s.vm_swap_kib) == (
        270336, 266752, 3584, 0, 12,
    )


def test_status_truncated_gives_none() -> None:
    s = parse_status(STATUS[: STATUS.index("RssFile")])
    assert s.rss_anon_kib == 266752
    assert s.rss_file_kib is None and s.vm_swap_kib is None and s.threads is None


def test_status_bad_number_names_key() -> None:
    with pytest.raises(ProcParseError, match="VmRSS"):
        parse_status("VmRSS:\t lots kB\n")


def test_cmdline_cgroup_adj_meminfo_pressure() -> None:
    assert parse_cmdline(b"python3\0-c\0print(1)\0") == ["python3", "-c", "print(1)"]
    assert parse_cmdline(b"") == []
    entries = parse_cgroup("4:memory:/lmkd/x\n0::/lmkd-v2/y\n")
    assert cgroup_v2_path(entries) == "/lmkd-v2/y"
    assert entries[0].controllers == ("memory",)
    assert parse_oom_score_adj("900\n") == 900
    with pytest.raises(ProcParseError):
        parse_oom_score_adj("2000")
    mi = parse_meminfo("MemTotal:       24000000 kB\nMemAvailable:   23000000 kB\nHugePages_Total:       0\n")
    assert mi["MemAvailable"] == 23000000 and mi["HugePages_Total"] == 0
    psi = parse_pressure(
        "some avg10=1.50 avg60=0.20 avg300=0.00 total=123456\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=789\n"
    )
    assert psi.some.avg10 == 1.5 and psi.some.total_us == 123456
    assert psi.full is not None and psi.full.total_us == 789
    with pytest.raises(ProcParseError, match="some"):
        parse_pressure("some avg10=x avg60=0 avg300=0 total=1\n")


def test_procfs_reads_fake_tree(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    (tmp_path / "77" / "stat").write_text(f"77 (fake) {STAT_TAIL}")
    (tmp_path / "77" / "status").write_text(STATUS)
    (tmp_path / "77" / "oom_score_adj").write_text("500\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("MemAvailable: 1000 kB\n")
    proc = ProcFs(tmp_path)
    assert list(proc.pids()) == [77]
    assert proc.stat(77).comm == "fake"
    assert proc.oom_score_adj(77) == 500
    assert proc.mem_available_kib() == 1000
    with pytest.raises(FileNotFoundError):
        proc.stat(78)


def test_procfs_real_self() -> None:
    import os

    proc = ProcFs()
    st_ = proc.stat(os.getpid())
    assert st_.pid == os.getpid()
    status = proc.status(os.getpid())
    assert status.vm_rss_kib is not None and status.vm_rss_kib > 1000
    assert proc.mem_available_kib() is not None
    assert proc.pressure("memory").some.total_us >= 0


def test_candidate_table_survives_a_hostile_proc_tree(tmp_path: Path) -> None:
    import time

    from lmkd_py.candidates import CandidateTable
    from lmkd_py.policy import Rules

    def proc(pid: int, stat: str, adj: str = "0", status: str = STATUS) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(stat)
        (d / "oom_score_adj").write_text(adj)
        (d / "status").write_text(status)
        (d / "cmdline").write_bytes(b"x\0")
        (d / "cgroup").write_text("0::/\n")

    proc(10, f"10 (good) {STAT_TAIL}")
    proc(11, "11 (truncated) S 1")
    proc(12, f"12 (bad adj) {STAT_TAIL}", adj="lots")
    proc(13, "")
    proc(14, f"14 (no cgroup line) {STAT_TAIL}")
    (tmp_path / "14" / "cgroup").write_text("garbage")
    (tmp_path / "15").mkdir()  # vanished between listdir and open
    table = CandidateTable(ProcFs(tmp_path), Rules(), clock=time.monotonic_ns)
    table.refresh()
    assert [c.candidate.pid for c in table.rank(0)] == [10]


def test_pcp_pages_are_summed_over_zones_and_cpus() -> None:
    from lmkd_py.procfs import parse_pcp_pages

    zoneinfo = """Node 0, zone   Normal
  pages free     5000
  pagesets
    cpu: 0
              count:    120
              high:     3733
    cpu: 1
              count:    7
              high:     0
Node 0, zone  Movable
  pagesets
    cpu: 0
              count:    3
"""
    assert parse_pcp_pages(zoneinfo) == 130
    with pytest.raises(ProcParseError):
        parse_pcp_pages("    count: many\n")
    assert ProcFs().pcp_free_kib() >= 0


def test_capability_bits() -> None:
    from lmkd_py.procfs import CAP_IPC_LOCK, CAP_SYS_RESOURCE, has_capability

    here = "Name:\tx\nCapEff:\t000001fffeffffff\n"  # this project's root: all but CAP_SYS_RESOURCE
    assert has_capability(here, CAP_IPC_LOCK) and not has_capability(here, CAP_SYS_RESOURCE)
    assert not has_capability("CapEff:\tzz\n", CAP_IPC_LOCK)
    assert not has_capability("Name:\tx\n", CAP_IPC_LOCK)


def test_exe_link_and_unknown_exe_logged_once(tmp_path: Path) -> None:
    import time

    from structlog.testing import capture_logs

    from lmkd_py.candidates import CandidateTable
    from lmkd_py.policy import Rules
    from lmkd_py.procfs import parse_exe_link

    assert parse_exe_link("/usr/sbin/sshd (deleted)") == "/usr/sbin/sshd"
    assert parse_exe_link("/usr/sbin/sshd") == "/usr/sbin/sshd"
    for pid, exe in ((10, "/usr/bin/python3.11"), (11, None)):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "stat").write_text(f"{pid} (p) {STAT_TAIL}")
        (d / "oom_score_adj").write_text("0")
        (d / "cmdline").write_bytes(b"p\0")
        (d / "cgroup").write_text("0::/\n")
        if exe is not None:
            (d / "exe").symlink_to(exe)
    proc = ProcFs(tmp_path)
    assert proc.exe(10) == "/usr/bin/python3.11"
    with pytest.raises(FileNotFoundError):
        proc.exe(11)
    table = CandidateTable(proc, Rules(), clock=time.monotonic_ns)
    with capture_logs() as logs:
        table.refresh()
        table.refresh()
    exes = {c.candidate.pid: c.candidate.exe for c in table.rank(-999)}
    assert exes == {10: "/usr/bin/python3.11", 11: None}  # unknown exe: still a candidate
    assert [e["pid"] for e in logs if e["event"] == "candidates.exe_unknown"] == [11]
