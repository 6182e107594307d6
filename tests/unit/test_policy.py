from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from lmkd_py.config import PolicyConfig
from lmkd_py.policy import Candidate, Rules, exclusion, rank_victims


def cand(pid: int, adj: int = 0, rss: int = 10_000, **kw: object) -> Candidate:
    return Candidate(pid=pid, start_time_ticks=pid * 10, comm=str(kw.pop("comm", f"p{pid}")), oom_score_adj=adj,
                     rss_kib=rss, **kw)  # type: ignore[arg-type]


def test_band_then_size_then_pid() -> None:
    cs = [cand(10, 0, 900_000), cand(11, 900, 1_000), cand(12, 900, 5_000), cand(13, 500, 9_000), cand(14, 900, 5_000)]
    order = [c.candidate.pid for c in rank_victims(cs, 0, Rules())]
    assert order == [12, 14, 11, 13, 10]
    assert [c.rank for c in rank_victims(cs, 0, Rules())] == [0, 1, 2, 3, 4]


def test_level_floor_and_never_kill_level() -> None:
    cs = [cand(10, 0), cand(11, 800), cand(12, 999)]
    assert [c.candidate.pid for c in rank_victims(cs, 800, Rules())] == [12, 11]
    assert rank_victims(cs, 1001, Rules()) == []


def test_swap_counts_as_size() -> None:
    cs = [cand(10, 0, 1_000, swap_kib=50_000), cand(11, 0, 20_000)]
    assert rank_victims(cs, 0, Rules())[0].candidate.pid == 10


def test_never_candidates() -> None:
    rules = Rules.from_config(
        PolicyConfig(protect_comm=("sshd",), protect_cmdline=("--keep-me",), protect_cgroup=("/system.slice",),
                     protect_uid=(42,), min_rss_kib=100),
        self_pids={77},
    )
    cs = {
        "pid 1": cand(1, 1000),
        "kernel thread": cand(3, 1000, kernel_thread=True),
        "lmkd-py itself": cand(77, 1000),
        "oom_score_adj -1000": cand(5, -1000),
        "protected comm": cand(6, 1000, comm="sshd"),
        "protected cmdline": cand(7, 1000, cmdline="app --keep-me"),
        "protected cgroup": cand(8, 1000, cgroup="/system.slice/x.service"),
        "protected uid": cand(9, 1000, uid=42),
        "smaller than 100 KiB": cand(20, 1000, rss=50),
    }
    for why, c in cs.items():
        assert exclusion(c, rules) == why
    assert exclusion(cand(4, 1000, ppid=2), rules) == "kernel thread"  # a child of kthreadd
    # a cgroup prefix matches whole components only
    assert exclusion(cand(21, 1000, cgroup="/system.slicer/x"), rules) is None
    assert rank_victims(cs.values(), -999, rules) == []


def test_prefer_raises_priority_and_enters_band() -> None:
    rules = Rules.from_config(PolicyConfig(prefer_comm=("chrome",), prefer_adj_bonus=300))
    cs = [cand(10, 700, 2_000, comm="chrome"), cand(11, 900, 90_000)]
    ranked = rank_victims(cs, 800, rules)
    assert [c.candidate.pid for c in ranked] == [10, 11]
    assert ranked[0].effective_adj == 1000 and "preferred" in ranked[0].reason


def test_scope() -> None:
    rules = Rules(scope_cgroup="/lmkd/test")
    cs = [cand(10, 0, cgroup="/lmkd/test/a"), cand(11, 0, cgroup="/lmkd/other"), cand(12, 0, cgroup=None)]
    assert [c.candidate.pid for c in rank_victims(cs, 0, rules)] == [10]


candidates = st.lists(
    st.builds(
        Candidate,
        pid=st.integers(1, 5000),
        start_time_ticks=st.integers(0, 10**9),
        comm=st.sampled_from(["app", "sshd", "chrome", "db", "x y"]),
        oom_score_adj=st.integers(-1000, 1000),
        rss_kib=st.integers(0, 10**7),
        swap_kib=st.integers(0, 10**6),
        cmdline=st.sampled_from(["", "app --keep-me", "chrome --type=renderer"]),
        uid=st.sampled_from([None, 0, 1000, 42]),
        cgroup=st.sampled_from([None, "/", "/system.slice/a", "/user.slice/b"]),
        ppid=st.integers(0, 10),
        kernel_thread=st.booleans(),
    ),
    max_size=40,
    unique_by=lambda c: c.pid,
)
RULES = Rules.from_config(
    PolicyConfig(protect_comm=("sshd",), protect_cmdline=("--keep-me",), protect_cgroup=("/system.slice",),
                 protect_uid=(42,), prefer_cmdline=("renderer",), min_rss_kib=10),
    self_pids={77},
)


@settings(max_examples=300)
@given(candidates, st.integers(-999, 1001), st.randoms())
def test_properties(cs: list[Candidate], min_adj: int, rnd: object) -> None:
    ranked = rank_victims(cs, min_adj, RULES)
    # protected processes are never ranked
    for ch in ranked:
        c = ch.candidate
        assert exclusion(c, RULES) is None
        assert c.pid not in (1, 2, 77) and not c.kernel_thread and c.oom_score_adj > -1000
        assert c.comm != "sshd" and "--keep-me" not in c.cmdline and c.uid != 42
        assert not (c.cgroup or "").startswith("/system.slice")
        # the level -> min adj mapping holds
        assert ch.effective_adj >= min_adj
    # order is independent of input order
    shuffled = list(cs)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert rank_victims(shuffled, min_adj, RULES) == ranked
    # bands descend, and within a band sizes descend
    keys = [(-ch.effective_adj, -ch.candidate.size_kib) for ch in ranked]
    assert keys == sorted(keys)
    # everything eligible is ranked
    eligible = [c for c in cs if exclusion(c, RULES) is None]
    assert len(ranked) == sum(
        1 for c in eligible
        if (min(1000, c.oom_score_adj + 300) if re.search("renderer", c.cmdline) else c.oom_score_adj) >= min_adj
        and min_adj <= 1000
    )


@settings(max_examples=200)
@given(candidates, st.integers(-999, 1001))
def test_band_prefix_equals_ranking_at_that_floor(cs: list[Candidate], min_adj: int) -> None:
    from lmkd_py.policy import band_prefix

    assert band_prefix(rank_victims(cs, -999, RULES), min_adj) == rank_victims(cs, min_adj, RULES)


def test_protect_exe_needs_path_and_uid() -> None:
    from lmkd_py.config import ExeIdentity

    rules = Rules.from_config(PolicyConfig(protect_exe=(
        ExeIdentity(path="/usr/sbin/sshd", uid=0), ExeIdentity(path="/usr/lib/postgresql/", uid=112))))
    cases = [
        (cand(1_001, exe="/usr/sbin/sshd", uid=0), "protected exe"),
        (cand(1_002, exe="/usr/sbin/sshd", uid=1000), None),  # path faked in a user's mount namespace
        (cand(1_003, exe="/usr/sbin/sshd", uid=None), None),  # owner unknown
        (cand(1_004, exe=None, uid=0), None),  # exe unreadable
        (cand(1_005, exe="/usr/sbin/sshd2", uid=0), None),
        (cand(1_006, exe="/usr/lib/postgresql/16/bin/postgres", uid=112), "protected exe"),
        (cand(1_007, exe="/usr/lib/postgresqlx/postgres", uid=112), None),
        (cand(1_008, exe="/usr/lib/postgresql/16/bin/postgres", uid=0), None),
        (cand(1_009, comm="sshd", exe="/home/u/hog", uid=1000), None),  # a name is no identity
    ]
    for c, why in cases:
        assert exclusion(c, rules) == why, c
