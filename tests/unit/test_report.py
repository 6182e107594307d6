"""Unit tests of ``lmkd-py report`` / ``compare`` on synthetic and hand-made record files."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy", reason="the report extra (numpy) is not installed")
pytest.importorskip("scipy", reason="the report extra (scipy) is not installed")

from lmkd_py import report  # noqa: E402
from lmkd_py.records import (  # noqa: E402
    KernelTimeline,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Provenance,
    Steps,
    Victim,
    read_records,
    record_json,
)
from lmkd_py.report.data import load_table  # noqa: E402
from lmkd_py.report.stats import BootstrapOptions, compare_tables, compare_values  # noqa: E402
from lmkd_py.report.synth import SynthSpec, synthetic_lines  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def rec(**kw: Any) -> KillRecord:
    """A valid killed record; keyword arguments replace fields (``kernel=...``, ``kernel_release=...``)."""
    release = kw.pop("kernel_release", "6.18.0-test")
    base: dict[str, Any] = {
        "record_id": "r",
        "wall_time": "2025-01-01T00:00:00+00:00",
        "outcome": Outcome.KILLED,
        "victim": Victim(pid=100, rss_kib=kw.pop("rss_kib", 262144)),
        "steps": Steps(start_ns=1, end_ns=2),
        "mrelease": Mrelease(status=MreleaseStatus.OK, ret=0, wall_ns=kw.pop("wall_ns", 10_000_000)),
        "kill_to_exit_ns": 20_000_000,
        "provenance": Provenance(kernel_release=release, machine_model="test box"),
    }
    base.update(kw)
    return KillRecord(**base)


def write(path: Path, lines: list[str] | list[KillRecord], tail: str = "") -> Path:
    text = "".join(x if isinstance(x, str) else record_json(x) + "\n" for x in lines)
    path.write_text(text + tail)
    return path


def synth(path: Path, **kw: Any) -> Path:
    path.write_text("".join(synthetic_lines(SynthSpec(**kw))))
    return path


def run_report(files: list[Path], fmt: str = "json", plots: Path | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = report.cmd_report(argparse.Namespace(files=files, format=fmt, plots=plots), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def run_compare(**kw: Any) -> tuple[int, str, str]:
    ns = argparse.Namespace(
        a=None, b=None, by=None, files=[], format="json", plots=None, seed=0, resamples=500, label_a=None, label_b=None
    )
    for k, v in kw.items():
        setattr(ns, k, v)
    out, err = io.StringIO(), io.StringIO()
    rc = report.cmd_compare(ns, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def strict_json(text: str) -> Any:
    def no_nan(token: str) -> Any:
        raise AssertionError(f"{token} in JSON output")

    return json.loads(text, parse_constant=no_nan)


def row(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in doc["metrics"] if m["name"] == name]
    assert found, f"no row {name}: {[m['name'] for m in doc['metrics']]}"
    return found[0]


# --- dependencies ------------------------------------------------------------------------------------


def test_importing_report_does_not_import_the_extra() -> None:
    code = "import sys, lmkd_py.report; bad = {'numpy', 'scipy', 'matplotlib'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    assert out.stdout.strip() == "set()"


def test_missing_extra_exits_2_with_the_install_hint(tmp_path: Path) -> None:
    f = write(tmp_path / "r.jsonl", [rec()])
    code = f"""
import argparse, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('numpy', 'scipy'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
from lmkd_py import report
sys.exit(report.cmd_report(argparse.Namespace(files=[{str(f)!r}], format='table', plots=None)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "install the report extra: pip install 'lmkd-py[report]'" in proc.stderr


# --- reading ------------------------------------------------------------------------------------------


def test_reader_skips_and_words_problems_exactly_as_read_records(tmp_path: Path) -> None:
    good = [rec(wall_ns=i * 1_000_000, rss_kib=1024 * (i + 1)) for i in range(5)]
    obj = json.loads(record_json(good[0]))
    no_version = {k: v for k, v in obj.items() if k != "schema_version"}
    bad_field = {**obj, "victim": {**obj["victim"], "pid": "not a pid"}}
    missing = {k: v for k, v in obj.items() if k != "steps"}
    lines = [
        record_json(good[0]) + "\n",
        "this is not json\n",
        record_json(good[1]) + "\n",
        "[1, 2]\n",
        json.dumps(no_version) + "\n",
        json.dumps(bad_field) + "\n",
        "\n",
        json.dumps(missing) + "\n",
        json.dumps({**obj, "schema_version": 0}) + "\n",  # an older version is read
        record_json(good[2]) + "\n",
    ]
    path = write(tmp_path / "mixed.jsonl", lines, tail=record_json(good[3])[:-40])
    expected = read_records([path])
    table = load_table([path])
    assert table.problems == expected.problems
    assert len(table.problems) == 6
    assert "truncated last line" in table.problems[-1] and f"{path}:11:" in table.problems[-1]
    assert table.rows == len(expected.records) == 4
    walls = [r.mrelease.wall_ns for r in expected.records]
    assert table.columns["mrelease_wall_ns"].tolist() == walls


def test_newer_schema_version_is_skipped_naming_file_and_line(tmp_path: Path) -> None:
    """One board on a newer lmkd-py must not cost the report of the whole fleet (issue 18, item 7)."""
    newer = json.loads(record_json(rec())) | {"schema_version": 99}
    path = write(tmp_path / "new.jsonl", [rec(), json.dumps(newer) + "\n"])
    other = write(tmp_path / "other.jsonl", [rec(kernel_release="6.1.0"), rec(kernel_release="6.1.0")])
    table = load_table([path, other])
    assert table.rows == 3
    assert list(table.problems) == [
        f"{path}:2: skipped: record schema_version 99 is newer than this lmkd-py understands (1); upgrade lmkd-py "
        "to read it"
    ]
    rc, out, err = run_report([path, other], fmt="table")
    assert rc == 0 and "records: 1" in out and "records: 2" in out
    assert f"{path}:2:" in err and "upgrade lmkd-py" in err
    rc, out, err = run_compare(a=[path], b=[other], format="table")
    assert rc == 0 and f"{path}:2:" in err and "diff median" in out


def test_truncated_file_is_read_with_a_note(tmp_path: Path) -> None:
    path = write(tmp_path / "cut.jsonl", [rec(), rec()], tail=record_json(rec())[:100])
    rc, out, err = run_report([path])
    assert rc == 0
    assert f"{path}:3: skipped: truncated last line" in err
    doc = strict_json(out)
    assert doc["groups"][0]["records"] == 2 and doc["problems_total"] == 1


def test_missing_file_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    rc, _, err = run_report([tmp_path / "nope.jsonl"])
    assert rc == 2 and "nope.jsonl" in err and "No such file" in err
    f = write(tmp_path / "r.jsonl", [rec()])
    rc, _, err = run_report([f], fmt="yaml")
    assert rc == 2 and "unknown format" in err
    rc, _, err = run_compare(a=[f])
    assert rc == 2 and "both sides" in err
    rc, _, err = run_compare(a=[f], b=[f], by="kernel", files=[f])
    assert rc == 2 and "not both" in err
    rc, _, err = run_compare(by="colour", files=[f])
    assert rc == 2 and "--by" in err
    rc, _, err = run_report([f], plots=f)
    assert rc == 2 and "directory" in err


# --- empty and degenerate sets ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_empty_sets_do_not_crash(tmp_path: Path, fmt: str) -> None:
    empty = write(tmp_path / "empty.jsonl", [])
    junk = write(tmp_path / "junk.jsonl", ["not json\n"])
    rc, out, _ = run_report([empty, junk], fmt=fmt)
    assert rc == 0
    if fmt == "json":
        assert strict_json(out)["groups"] == []
    else:
        assert "no records" in out
    rc, out, _ = run_compare(a=[empty], b=[junk], format=fmt, plots=tmp_path / "plots")
    assert rc == 0
    if fmt == "json":
        doc = strict_json(out)
        assert all(m["a"]["n"] == 0 and m["b"]["n"] == 0 for m in doc["metrics"])
        assert all(m["a"]["ci"] == [None, None] and m["diff_ci"] == [None, None] for m in doc["metrics"])
        assert any("no values on either side" in w for w in doc["warnings"])
    else:
        assert "no values to compare" in out
    rc, _, err = run_compare(by="kernel", files=[empty])
    assert rc == 2 and "found 0" in err


def test_one_sided_single_and_constant_values(tmp_path: Path) -> None:
    one = write(tmp_path / "one.jsonl", [rec(wall_ns=5_000_000)])
    const = write(tmp_path / "const.jsonl", [rec(wall_ns=5_000_000) for _ in range(30)])
    empty = write(tmp_path / "empty.jsonl", [])
    rc, out, _ = run_compare(a=[one], b=[const])
    assert rc == 0
    r = row(strict_json(out), "mrelease_wall")
    assert r["a"]["n"] == 1 and r["a"]["ci"] == [None, None] and r["diff_median"] == 0.0
    assert r["b"]["ci"] == [5.0, 5.0]
    rc, out, _ = run_compare(a=[empty], b=[const], format="table")
    assert rc == 0 and "mrelease_wall" in out and "A: fewer than 20 values" in out


def test_dry_runs_are_counted_but_not_in_latencies(tmp_path: Path) -> None:
    dry = rec(outcome=Outcome.DRY_RUN, dry_run=True, wall_ns=999_000_000, kill_to_exit_ns=999_000_000)
    path = write(tmp_path / "d.jsonl", [rec(), rec(), dry])
    _, out, _ = run_report([path])
    g = strict_json(out)["groups"][0]
    assert g["records"] == 3 and g["dry_runs"] == 1 and g["outcomes"] == {"killed": 2, "dry_run": 1}
    m = {x["name"]: x for x in g["metrics"]}
    assert m["mrelease_wall"]["n"] == 2 and m["mrelease_wall"]["median"] == 10.0
    assert m["kill_to_exit"]["mean"] == 20.0
    assert sum(b["count"] for b in g["victim_rss_bins"]) == 3  # sizes are binned for every record


# --- report contents -----------------------------------------------------------------------------------


def test_report_groups_metrics_histograms_and_bins(tmp_path: Path) -> None:
    esrch = Mrelease(status=MreleaseStatus.ALREADY_RELEASED, errno=3, errno_name="ESRCH", wall_ns=1000)
    timeline = KernelTimeline(
        reaper_work_ns=30_000_000,
        exit_mmap_ns=10_000_000,
        reap_total_ns=40_000_000,
        reap_throughput_mib_s=6400.0,
        freed_by_reaper_kib={"anon": 300, "file": 0},
        freed_by_victim_kib={"anon": 100},
        mmap_lock_wait_ns={"reaper": 1_000_000},
    )
    both = dataclasses.replace(timeline, mmap_lock_wait_ns={"reaper": 3_000_000, "victim": 2_000_000})
    recs = [
        rec(kernel=timeline, rss_kib=10 * 1024),
        rec(kernel=both, rss_kib=100 * 1024),
        rec(mrelease=esrch, rss_kib=2048 * 1024, kernel=KernelTimeline(reaper_work_ns=2000, exit_mmap_ns=50_000_000)),
        rec(kernel_release="6.12.0", rss_kib=5000 * 1024),
    ]
    path = write(tmp_path / "r.jsonl", recs)
    rc, out, _ = run_report([path])
    assert rc == 0
    groups = strict_json(out)["groups"]
    assert [g["kernel_release"] for g in groups] == ["6.12.0", "6.18.0-test"]
    g = groups[1]
    assert g["records"] == 3 and g["machine_model"] == "test box"
    assert g["errno"] == {"ESRCH": 1}
    assert g["mrelease_status"] == {"ok": 2, "already_released": 1}
    m = {x["name"]: x for x in g["metrics"]}
    # The ESRCH call (microseconds, nothing reaped) is in the status histogram, not in the reaper's
    # times; the victim's exit_mmap of that kill counts.
    assert m["reaper_work"]["n"] == 2 and m["reaper_work"]["median"] == 30.0
    assert m["mrelease_wall"]["n"] == 2 and m["mrelease_wall"]["median"] == 10.0
    assert m["exit_mmap"]["n"] == 3 and m["exit_mmap"]["median"] == 10.0
    assert m["freed_by_reaper_share"]["median"] == pytest.approx(75.0)
    assert m["mmap_lock_wait"]["n"] == 2 and m["mmap_lock_wait"]["median"] == pytest.approx(3.0)
    assert m["mmap_lock_wait.reaper"]["n"] == 2 and m["mmap_lock_wait.reaper"]["median"] == pytest.approx(2.0)
    assert m["mmap_lock_wait.victim"]["n"] == 1 and m["mmap_lock_wait.victim"]["median"] == pytest.approx(2.0)
    assert m["exit_mmap"]["p99"] == pytest.approx(49.2)
    assert m["kill_to_mem_recovered"]["n"] == 0 and m["kill_to_mem_recovered"]["median"] is None
    bins = {(b["lo_mib"], b["hi_mib"]): b["count"] for b in g["victim_rss_bins"]}
    assert bins[(0, 16)] == 1 and bins[(64, 256)] == 1 and bins[(1024, 4096)] == 1
    assert groups[0]["victim_rss_bins"][-1] == {"lo_mib": 4096, "hi_mib": None, "count": 1}
    for fmt in ("table", "markdown"):
        rc, text, _ = run_report([path], fmt=fmt)
        assert rc == 0 and "reaper_work" in text and "ESRCH 1" in text and "6.12.0" in text


def test_report_on_synthetic_set_matches_numpy(tmp_path: Path) -> None:
    path = synth(tmp_path / "s.jsonl", n=500, seed=3)
    records = read_records([path]).records
    walls = np.array([r.mrelease.wall_ns for r in records], dtype=float) / 1e6
    _, out, _ = run_report([path])
    m = {x["name"]: x for x in strict_json(out)["groups"][0]["metrics"]}["mrelease_wall"]
    assert m["n"] == 500
    assert m["median"] == pytest.approx(np.median(walls))
    assert m["p90"] == pytest.approx(np.percentile(walls, 90))
    assert m["p99"] == pytest.approx(np.percentile(walls, 99))
    assert m["mean"] == pytest.approx(walls.mean())


# --- comparison: detection and its error rate --------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.25, 0.8])
def test_known_shift_is_detected_with_the_right_sign(tmp_path: Path, shift: float) -> None:
    a = synth(tmp_path / "a.jsonl", n=200, seed=1)
    b = synth(tmp_path / "b.jsonl", n=200, seed=2, shift=shift)
    rc, out, _ = run_compare(a=[a], b=[b])
    assert rc == 0
    doc = strict_json(out)
    for name in ("reaper_work", "exit_mmap", "reap_total", "kill_to_exit", "mrelease_wall"):
        r = row(doc, name)
        lo, hi = r["diff_ci"]
        assert lo <= r["diff_median"] <= hi
        if shift > 1:
            assert lo > 0 and r["diff_pct"] > 5, r
        else:
            assert hi < 0 and r["diff_pct"] < -5, r
        assert r["p_value"] < 0.01
        assert r["a"]["ci"][0] <= r["a"]["median"] <= r["a"]["ci"][1]
    assert not any("victim sizes differ" in w for w in doc["warnings"])


def test_same_distribution_false_positive_rate_is_near_5_percent() -> None:
    ci_hits = p_hits = 0
    trials = 200
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        a, b = rng.lognormal(3.0, 0.4, 30), rng.lognormal(3.0, 0.4, 30)
        r = compare_values("x", "ms", a, b, BootstrapOptions(resamples=400, seed=seed))
        lo, hi = r.diff_ci
        assert lo is not None and hi is not None and r.p_value is not None
        ci_hits += lo > 0 or hi < 0
        p_hits += r.p_value < 0.05
    # Expected 10 of 200 each; the bounds fail a test that never (or far too often) rejects.
    assert 1 <= ci_hits <= 20, ci_hits
    assert 1 <= p_hits <= 20, p_hits


def test_same_seed_same_numbers_other_seed_other_interval(tmp_path: Path) -> None:
    a = synth(tmp_path / "a.jsonl", n=100, seed=1)
    b = synth(tmp_path / "b.jsonl", n=100, seed=2)
    first = strict_json(run_compare(a=[a], b=[b], seed=7)[1])
    again = strict_json(run_compare(a=[a], b=[b], seed=7)[1])
    other = strict_json(run_compare(a=[a], b=[b], seed=8)[1])
    assert first == again
    assert row(first, "reaper_work")["diff_ci"] != row(other, "reaper_work")["diff_ci"]
    assert row(first, "reaper_work")["diff_median"] == row(other, "reaper_work")["diff_median"]


def test_json_contract(tmp_path: Path) -> None:
    a = synth(tmp_path / "a.jsonl", n=50, seed=1)
    b = synth(tmp_path / "b.jsonl", n=50, seed=2)
    doc = strict_json(run_compare(a=[a], b=[b], label_a="6.12", label_b="6.18")[1])
    assert {"metrics", "warnings"} <= doc.keys() and doc["a_label"] == "6.12"
    units = {m["name"]: m["unit"] for m in doc["metrics"]}
    assert units["reaper_work"] == units["kill_to_exit"] == units["mrelease_wall"] == "ms"
    for m in doc["metrics"]:
        assert {"name", "unit", "a", "b", "diff_median", "diff_ci", "p_value"} <= m.keys()
        for side in ("a", "b"):
            assert {"n", "median", "ci", "p90", "mean"} <= m[side].keys() and len(m[side]["ci"]) == 2
        assert len(m["diff_ci"]) == 2
    r = row(doc, "reaper_work")
    assert 10 < r["a"]["median"] < 40  # milliseconds: the synthetic median is 20 ms


def test_warnings_small_n_and_size_difference_adds_per_gib_rows(tmp_path: Path) -> None:
    small = synth(tmp_path / "s.jsonl", n=12, seed=1, rss_mib=64)
    big = synth(tmp_path / "b.jsonl", n=40, seed=2, rss_mib=512)
    doc = strict_json(run_compare(a=[small], b=[big])[1])
    assert any(w.startswith("A: fewer than 20 values") and "reaper_work (n=12)" in w for w in doc["warnings"])
    assert not any(w.startswith("B: fewer") for w in doc["warnings"])
    assert any("victim sizes differ" in w for w in doc["warnings"])
    per_gib = row(doc, "reaper_work_per_gib")
    assert per_gib["unit"] == "ms/GiB" and per_gib["a"]["n"] == 12
    # Work per GiB is the same by construction (latency scales with size): no shift in that row.
    assert per_gib["diff_ci"][0] < 0 < per_gib["diff_ci"][1]
    assert row(doc, "reaper_work")["diff_ci"][0] > 0
    same = strict_json(run_compare(a=[small], b=[small])[1])
    assert not any(m["name"].endswith("_per_gib") for m in same["metrics"])


def test_large_sets_bootstrap_a_subsample_and_say_so() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(3.0, 0.4, 3000), rng.lognormal(3.0, 0.4, 3000)
    small = compare_values("x", "ms", a, b, BootstrapOptions(resamples=300, max_n=300))
    full = compare_values("x", "ms", a, b, BootstrapOptions(resamples=300, max_n=10_000))
    assert small.a.median == full.a.median == float(np.median(a))
    assert small.a.ci[0] <= small.a.median <= small.a.ci[1]
    width = (small.a.ci[1] - small.a.ci[0]) / (full.a.ci[1] - full.a.ci[0])
    assert 2 < width < 5  # sqrt(3000 / 300) ≈ 3.2 times wider: conservative, never narrower


def test_subsample_warning_in_the_table(tmp_path: Path) -> None:
    a = synth(tmp_path / "a.jsonl", n=150, seed=1)
    table = load_table([a])
    cmp = compare_tables(table, table, "A", "B", BootstrapOptions(resamples=200, max_n=100))
    assert any("random subsample of 100" in w for w in cmp.warnings)


def test_compare_by_kernel_splits_one_set(tmp_path: Path) -> None:
    old = synth(tmp_path / "old.jsonl", n=60, seed=1, kernel_release="6.12.0", shift=1.5)
    new = synth(tmp_path / "new.jsonl", n=60, seed=2, kernel_release="6.18.0")
    third = synth(tmp_path / "third.jsonl", n=10, seed=3, kernel_release="7.0.0")
    rc, out, _ = run_compare(by="kernel", files=[old, new])
    assert rc == 0
    doc = strict_json(out)
    assert (doc["a_label"], doc["b_label"]) == ("6.12.0", "6.18.0")
    assert row(doc, "reaper_work")["diff_ci"][1] < 0  # 6.18 is faster by construction
    rc, _, err = run_compare(by="kernel", files=[old, new, third])
    assert rc == 2 and "found 3" in err and "--label-a" in err
    rc, out, _ = run_compare(by="kernel", files=[old, new, third], label_a="7.0.0", label_b="6.12.0")
    assert rc == 0 and row(strict_json(out), "reaper_work")["a"]["n"] == 10
    rc, _, err = run_compare(by="kernel", files=[old, new], label_a="5.4", label_b="6.12.0")
    assert rc == 2 and "'5.4'" in err
    rc, out, _ = run_compare(by="machine", files=[old], label_a="synthetic machine", label_b="synthetic machine")
    assert rc == 0


def test_mixed_kernels_on_one_side_are_warned(tmp_path: Path) -> None:
    a1 = synth(tmp_path / "a1.jsonl", n=20, seed=1, kernel_release="6.12.0")
    a2 = synth(tmp_path / "a2.jsonl", n=20, seed=2, kernel_release="6.12.1")
    doc = strict_json(run_compare(a=[a1, a2], b=[a1])[1])
    assert any(w.startswith("A mixes 2 values of kernel_release") for w in doc["warnings"])


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_text_formats_show_rows_ci_and_warnings(tmp_path: Path, fmt: str) -> None:
    a = synth(tmp_path / "a.jsonl", n=15, seed=1, timeline=False)
    b = synth(tmp_path / "b.jsonl", n=30, seed=2, timeline=False, shift=1.3)
    rc, out, _ = run_compare(a=[a], b=[b], format=fmt, label_a="old", label_b="new")
    assert rc == 0
    assert "mrelease_wall" in out and "old median [95% CI]" in out and "diff 95% CI" in out
    assert "reaper_work " not in out  # no values on either side: only in the warnings
    assert "no values on either side for: reaper_work" in out
    assert "old: fewer than 20 values" in out
    if fmt == "markdown":
        assert "| metric | unit |" in out and "|---|" in out


# --- plots --------------------------------------------------------------------------------------------------


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the report extra (matplotlib) is not installed")
    a = synth(tmp_path / "a.jsonl", n=40, seed=1)
    b = synth(tmp_path / "b.jsonl", n=40, seed=2, kernel_release="6.12.0")
    rc, _, _ = run_compare(a=[a], b=[b], plots=tmp_path / "cmp", format="table")
    assert rc == 0
    for name in ("reaper_work_ecdf.png", "reaper_work_box.png", "mmap_lock_wait_reaper_ecdf.png"):
        assert (tmp_path / "cmp" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, _ = run_report([a, b], plots=tmp_path / "rep", fmt="table")
    assert rc == 0
    assert (tmp_path / "rep" / "kill_to_exit_box.png").stat().st_size > 1000


def test_nan_is_never_emitted() -> None:
    r = compare_values("x", "ms", np.array([0.0, 0.0, 0.0]), np.array([0.0, 0.0, 0.0]), BootstrapOptions(resamples=100))
    assert r.diff_pct is None  # relative to a zero median: unknown, not inf
    assert r.p_value is None or not math.isnan(r.p_value)


def test_victims_a_few_kib_apart_are_not_different_sizes(tmp_path: Path) -> None:
    # As in the arm64 lab: the same victim measured 267.32 vs 267.33 MiB on two kernels; KS calls that
    # a different distribution (constant samples), but it changes no latency: no per-GiB rows.
    a = write(tmp_path / "a.jsonl", [rec(rss_kib=273_740, kill_to_exit_ns=10_000_000 + i) for i in range(25)])
    b = write(tmp_path / "b.jsonl", [rec(rss_kib=273_748, kill_to_exit_ns=10_000_000 + i) for i in range(25)])
    doc = strict_json(run_compare(a=[a], b=[b])[1])
    assert not any("victim sizes differ" in w for w in doc["warnings"])
    assert not any(m["name"].endswith("_per_gib") for m in doc["metrics"])
