"""The pure parts of the workload generator: specs, layout plans, scenarios, option handling, parsers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmkd_py.stress import SCENARIOS, VictimSpec, options_from_args, scenario_specs
from lmkd_py.stress.cgroup import parse_oom_control, parse_procs, validate_cgroup_name
from lmkd_py.stress.child import SPARSE_STRIDE, split_pieces, touched_pages
from lmkd_py.stress.spec import expected_rss_kib, plan_layout, spec_problems

PAGE = 4096


def ns(**kw: object) -> argparse.Namespace:
    """A Namespace with cli.py's stress defaults, overridden by ``kw``."""
    base: dict[str, object] = dict(size_mib=64, vmas=1, kind="anon", threads=1, touch="all", adj=None, count=1,
                                   json=False, pressure=False, cgroup=None, limit_mib=None, file_mib=None,
                                   scenario=None, seed=0, duration=None)
    base.update(kw)
    return argparse.Namespace(**base)


# --- layout ------------------------------------------------------------------------------------------


@given(pages=st.integers(1, 200_000), vmas=st.integers(1, 60_000))
def test_split_pieces_is_exact_and_even(pages: int, vmas: int) -> None:
    if vmas > pages:
        with pytest.raises(ValueError, match="non-empty"):
            split_pieces(pages, vmas)
        return
    pieces = split_pieces(pages, vmas)
    assert len(pieces) == vmas
    assert sum(pieces) == pages
    assert max(pieces) - min(pieces) <= 1 and min(pieces) >= 1


@given(pages=st.integers(1, 20_000), vmas=st.integers(1, 500))
def test_sparse_touch_is_a_quarter_however_the_kind_is_split(pages: int, vmas: int) -> None:
    vmas = min(vmas, pages)
    touched = 0
    index = 0
    for count in split_pieces(pages, vmas):
        for off, run in touched_pages(index, count, "sparse"):
            assert 0 <= off < count and run == 1
            assert (index + off) % SPARSE_STRIDE == 0
            touched += run
        index += count
    assert touched == -(-pages // SPARSE_STRIDE)


def test_touch_all_is_one_run_of_the_whole_piece() -> None:
    assert list(touched_pages(17, 9, "all")) == [(0, 9)]


@given(size_mib=st.integers(1, 4096), vmas=st.integers(3, 60_000))
def test_mixed_plan_keeps_totals_and_shares(size_mib: int, vmas: int) -> None:
    pages = size_mib * 256
    plans = plan_layout(_unchecked(size_mib=size_mib, vmas=vmas, kind="mixed"), PAGE)
    assert [p.kind for p in plans] == ["anon", "file", "shmem"]
    assert sum(p.pages for p in plans) == pages
    assert sum(p.vmas for p in plans) == vmas
    anon, file, shmem = plans
    assert file.pages == shmem.pages == pages // 4
    assert all(p.vmas >= 1 for p in plans)
    assert anon.pages >= file.pages


def _unchecked(**kw: object) -> VictimSpec:
    """A VictimSpec built without __post_init__'s validation, to test the planner on any input."""
    spec = object.__new__(VictimSpec)
    defaults = dict(size_mib=64, vmas=1, kind="anon", threads=1, touch="all", adj=None)
    defaults.update(kw)
    for k, v in defaults.items():
        object.__setattr__(spec, k, v)
    return spec


def test_single_kind_plan_is_the_whole_size() -> None:
    assert [(p.kind, p.pages, p.vmas) for p in plan_layout(VictimSpec(size_mib=8, vmas=5, kind="shmem"))] == [
        ("shmem", 2048, 5)
    ]


def test_expected_rss() -> None:
    assert expected_rss_kib(VictimSpec(size_mib=64)) == {"anon": 65536, "file": 0, "shmem": 0}
    assert expected_rss_kib(VictimSpec(size_mib=64, kind="file", touch="sparse")) == {
        "anon": 0, "file": 16384, "shmem": 0}
    assert expected_rss_kib(VictimSpec(size_mib=64, vmas=8, kind="mixed")) == {
        "anon": 32768, "file": 16384, "shmem": 16384}


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(kind="heap"), "kind must be one of"),
        (dict(touch="some"), "touch must be one of"),
        (dict(size_mib=0), "size_mib must be at least 1"),
        (dict(vmas=0), "vmas must be in"),
        (dict(vmas=70_000), "vm.max_map_count"),
        (dict(threads=0), "threads must be in"),
        (dict(adj=1001), "oom_score_adj"),
        (dict(kind="mixed", vmas=2), "one VMA per kind"),
        (dict(size_mib=1, vmas=300), "cannot be split into 300 VMAs"),
    ],
)
def test_impossible_specs_are_refused_with_the_reason(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VictimSpec(**kw)  # type: ignore[arg-type]


def test_valid_specs_have_no_problems() -> None:
    assert spec_problems(VictimSpec()) == []
    assert spec_problems(VictimSpec(size_mib=1, vmas=256, kind="anon", adj=-1000)) == []


# --- scenarios ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["app-like", "many-vmas", "big-anon"])
def test_scenarios_are_deterministic_per_seed(name: str) -> None:
    assert scenario_specs(name, 7) == scenario_specs(name, 7)
    assert SCENARIOS[name] == scenario_specs(name, 0)
    assert all(isinstance(s, VictimSpec) for s in SCENARIOS[name])
    # Seeds change the draw (for at least one of a handful of seeds).
    assert any(scenario_specs(name, s) != scenario_specs(name, 0) for s in range(1, 6))


def test_app_like_looks_like_apps() -> None:
    specs = scenario_specs("app-like", 1)
    assert len(specs) >= 3
    assert {s.kind for s in specs} == {"mixed"}
    assert all(300 <= s.vmas <= 3000 and s.threads >= 8 and s.adj is not None and s.adj >= 700 for s in specs)
    assert len({s.size_mib for s in specs} | {s.vmas for s in specs}) > 2  # a mix, not copies


def test_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="app-like"):
        scenario_specs("nope", 0)


# --- options -----------------------------------------------------------------------------------------


def test_plain_options_make_count_copies_of_one_spec() -> None:
    opts = options_from_args(ns(size_mib=8, vmas=10, kind="file", threads=3, touch="sparse", adj=500, count=3))
    assert opts.specs == [VictimSpec(8, 10, "file", 3, "sparse", 500)] * 3
    assert opts.cgroup_name is None and not opts.pressure


def test_scenario_replaces_the_spec_options_and_count_repeats_it() -> None:
    opts = options_from_args(ns(scenario="many-vmas", seed=4, count=2, size_mib=1))
    assert opts.specs == scenario_specs("many-vmas", 4) * 2


def test_pressure_needs_a_limit_and_defaults_the_file_to_twice_it() -> None:
    with pytest.raises(ValueError, match="--limit-mib"):
        options_from_args(ns(pressure=True))
    opts = options_from_args(ns(pressure=True, limit_mib=96), pid=1234)
    assert opts.file_mib == 192
    assert opts.cgroup_name == "lmkd-py-stress-1234"
    with pytest.raises(ValueError, match="--pressure"):
        options_from_args(ns(file_mib=10))


def test_cgroup_argument_is_a_name_or_a_path_under_a_root() -> None:
    assert options_from_args(ns(cgroup=Path("grp"))).cgroup_name == "grp"
    assert options_from_args(ns(cgroup=Path("/sys/fs/cgroup/memory/a/b"))).cgroup_name == "a/b"
    assert options_from_args(ns(cgroup=Path("/sys/fs/cgroup/unified/c"))).cgroup_name == "c"
    for bad in ("/tmp/x", "../x", "/sys/fs/cgroup/memory"):
        with pytest.raises(ValueError):
            options_from_args(ns(cgroup=Path(bad)))


def test_missing_namespace_attributes_take_defaults() -> None:
    opts = options_from_args(argparse.Namespace())
    assert opts.specs == [VictimSpec()]
    assert opts.duration_s is None and opts.json is False


def test_negative_count_and_duration_are_refused() -> None:
    with pytest.raises(ValueError, match="--count"):
        options_from_args(ns(count=-1))
    with pytest.raises(ValueError, match="--duration"):
        options_from_args(ns(duration=-1.0))


# --- parsers -----------------------------------------------------------------------------------------


def test_parse_oom_control() -> None:
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert parse_oom_control(text) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert parse_oom_control("garbage\n") == {}


def test_parse_procs() -> None:
    assert parse_procs("12\n345\n") == [12, 345]
    assert parse_procs("") == []


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", ".", "x\ny"])
def test_bad_cgroup_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_cgroup_name(bad)


def test_good_cgroup_names() -> None:
    assert validate_cgroup_name("lmkd-py-test-1") == "lmkd-py-test-1"
    assert validate_cgroup_name("a/b") == "a/b"
