"""Fleet-scale analysis (issue 15): compressed and many-file inputs, the Parquet dataset and the columnar
path, the cluster bootstrap and --paired on fleets with a known board effect, --fail-if, the seed table.

Real files throughout: JSONL written by the synthetic generator, gzip and zstd files made by their
libraries, Parquet written by ``lmkd-py export`` (and a foreign one by DuckDB itself).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("duckdb")
zstandard = pytest.importorskip("zstandard")

from lmkd_py.records import Problems, adapter, record_json  # noqa: E402
from lmkd_py.report import cmd_compare, cmd_export, cmd_report  # noqa: E402
from lmkd_py.report.cluster import hist_of  # noqa: E402
from lmkd_py.report.fleetstats import compare_hists  # noqa: E402
from lmkd_py.report.sources import expand  # noqa: E402
from lmkd_py.report.stats import BootstrapOptions  # noqa: E402
from lmkd_py.report.synth import SynthSpec, synthetic_lines  # noqa: E402


def _write(path: Path, spec: SynthSpec) -> Path:
    path.write_text("".join(synthetic_lines(spec)))
    return path


def _run(cmd, **kw: object) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    defaults = {"format": "json", "plots": None, "seed": 0, "resamples": 400, "by": None, "files": [],
                "label_a": None, "label_b": None, "paired": False, "fail_if": None, "group_by": None,
                "a": None, "b": None}
    rc = cmd(argparse.Namespace(**{**defaults, **kw}), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def _metrics(doc: dict) -> dict:  # type: ignore[type-arg]
    return {m["name"]: m for m in doc["metrics"]}


def test_canonical_json_of_the_export_is_record_json() -> None:
    dump = adapter().dump_json
    for line in synthetic_lines(SynthSpec(n=20, seed=3, boards=4, dry_run_share=0.3)):
        rec = adapter().validate_json(line)
        assert json.loads(dump(rec)) == json.loads(record_json(rec))


def test_gzip_and_zstd_read_as_the_plain_file_and_a_corrupt_one_keeps_what_came_before(tmp_path: Path) -> None:
    plain = _write(tmp_path / "r.jsonl", SynthSpec(n=300, seed=5))
    data = plain.read_bytes()
    (tmp_path / "r.jsonl.1.gz").write_bytes(gzip.compress(data))
    (tmp_path / "r.jsonl.2.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    # A gzip cut in the middle of its deflate stream, then garbage: as a damaged disk or transfer leaves it.
    whole = gzip.compress(data)
    (tmp_path / "bad.jsonl.gz").write_bytes(whole[: len(whole) // 2] + b"\x00garbage" * 64)
    rc, out, err = _run(cmd_report, files=[tmp_path])
    assert rc == 0
    (group,) = json.loads(out)["groups"]
    read_before_damage = group["records"] - 3 * 300
    assert 0 < read_before_damage < 300
    m = re.search(re.escape(f"{tmp_path / 'bad.jsonl.gz'}: gzip data corrupt after line ") + r"(\d+)", err)
    assert m and read_before_damage <= int(m.group(1)) <= read_before_damage + 3, err


def test_a_directory_of_100000_files_is_walked_and_the_others_counted(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    d.mkdir()
    for i in range(100_000):
        (d / f"note-{i:06d}.txt").touch()
    sub = d / "board-1"
    sub.mkdir()
    _write(sub / "records.jsonl", SynthSpec(n=50, seed=1))
    problems = Problems()
    sources = expand([d], problems)
    assert [s.path.name for s in sources] == ["records.jsonl"]
    (note,) = list(problems)
    assert note.startswith(f"{d}: skipped 100000 file(s) that are not record files (note-")
    assert len(re.findall(r"note-\d{6}\.txt", note)) == 5 and note.endswith("and 99995 more)")


def test_export_then_report_on_parquet_matches_the_jsonl_report(tmp_path: Path) -> None:
    src = _write(tmp_path / "r.jsonl", SynthSpec(n=3000, seed=2, dry_run_share=0.05, boards=5))
    with src.open("a") as fh:
        fh.write('{"schema_version": 99, "record_id": "x"}\n')
    rc, out, err = _run(cmd_export, files=[src], parquet=tmp_path / "ds")
    assert rc == 0 and "exported 3000 records" in out and f"{src}:3001:" in err
    assert list((tmp_path / "ds").glob("kernel_release=6.18.0-synthetic/machine_model=synthetic%20machine/*.parquet"))
    rc, jsonl_out, _ = _run(cmd_report, files=[src])
    rc2, parquet_out, _ = _run(cmd_report, files=[tmp_path / "ds"])
    assert rc == rc2 == 0
    (g1,), (g2,) = json.loads(jsonl_out)["groups"], json.loads(parquet_out)["groups"]
    assert g1["records"] == g2["records"] == 3000 and g1["dry_runs"] == g2["dry_runs"] > 0
    m1, m2 = _metrics(g1), _metrics(g2)
    assert m1.keys() == m2.keys()
    for name, m in m1.items():
        assert m2[name]["n"] == m["n"], name
        for q in ("median", "p90", "mean"):
            assert m2[name][q] == pytest.approx(m[q], rel=1.5e-3), (name, q)


def test_foreign_and_newer_parquet_are_skipped_by_name_and_the_rest_analysed(tmp_path: Path) -> None:
    import duckdb

    _run(cmd_export, files=[_write(tmp_path / "r.jsonl", SynthSpec(n=200, seed=1))], parquet=tmp_path / "ds")
    foreign = tmp_path / "ds" / "foreign.parquet"
    duckdb.sql(f"COPY (SELECT 1 AS a, 'x' AS b) TO '{foreign}' (FORMAT parquet)")
    newer = tmp_path / "ds" / "newer.parquet"
    duckdb.sql(f"COPY (SELECT 2 AS schema_version) TO '{newer}' "
               "(FORMAT parquet, KV_METADATA {'lmkd_py.format': 'kill-records/2'})")
    broken = tmp_path / "ds" / "broken.parquet"
    broken.write_bytes(b"PAR1" + b"\x00" * 100)
    rc, out, err = _run(cmd_report, files=[tmp_path / "ds"])
    assert rc == 0 and json.loads(out)["groups"][0]["records"] == 200
    assert f"{foreign}: skipped: Parquet without lmkd-py's lmkd_py.format key" in err
    assert f"{newer}: skipped: record schema 'kill-records/2' is newer" in err
    assert f"{broken}: skipped: not a readable Parquet file" in err


def _fleet_side(rng: np.random.Generator, shift: float, boards: int = 30, per: int = 40, tau: float = 0.3
                ) -> object:
    vals, bcodes, tcodes = [], [], []
    for b in range(boards):
        effect = rng.normal(0, tau)
        boots = int(rng.integers(1, 4))
        for k in range(boots):
            n = per // boots
            vals.append(20.0 * shift * np.exp(effect + rng.normal(0, 0.35, n)))
            bcodes.append(np.full(n, b))
            tcodes.append(np.full(n, k))
    return hist_of(np.concatenate(vals), np.concatenate(bcodes).astype(np.int32),
                   np.concatenate(tcodes).astype(np.int32), [f"board-{i}" for i in range(boards)])


def test_cluster_ci_covers_the_true_difference_where_the_naive_one_does_not() -> None:
    """Boards with a log-normal effect (sd 0.3) on both sides, B 10 % slower: the population medians are
    20 and 22 ms, so the true difference is 2 ms. 200 seeds."""
    import lmkd_py.report.fleetstats as fs
    from lmkd_py.report.cluster import Design, design_of

    covered = {"cluster": 0, "naive": 0}
    for seed in range(200):
        rng = np.random.default_rng(seed)
        ha, hb = _fleet_side(rng, 1.0), _fleet_side(rng, 1.1)
        opts = BootstrapOptions(resamples=400, seed=seed)
        row, da, db = compare_hists("reap_total", "ms", ha, hb, opts)  # type: ignore[arg-type]
        assert da.kind == db.kind == "boards"
        covered["cluster"] += row.diff_ci[0] <= 2.0 <= row.diff_ci[1]
        fs.design_of = lambda h: Design("records", 1, 1)  # type: ignore[assignment]  # as if independent
        try:
            naive, _, _ = compare_hists("reap_total", "ms", ha, hb, opts)  # type: ignore[arg-type]
        finally:
            fs.design_of = design_of
        covered["naive"] += naive.diff_ci[0] <= 2.0 <= naive.diff_ci[1]
    assert covered["cluster"] >= 186, covered  # >= 93 %
    assert covered["naive"] <= 150, covered  # too narrow: well under 95 %


def test_compare_says_boards_and_boots_and_paired_is_narrower_and_right(tmp_path: Path) -> None:
    common = {"boards": 40, "boots": 2, "board_sigma": 0.4, "board_seed": 11}
    a = _write(tmp_path / "a.jsonl", SynthSpec(n=4000, seed=1, **common))  # type: ignore[arg-type]
    b = _write(tmp_path / "b.jsonl", SynthSpec(n=4000, seed=2, shift=1.1, **common))  # type: ignore[arg-type]
    rc, out, _ = _run(cmd_compare, a=[a], b=[b])
    doc = json.loads(out)
    assert rc == 0 and doc["sides"]["a"] == {"records": 4000, "boards": 40, "boots": 80, "design": "boards"}
    unpaired = _metrics(doc)["reap_total"]
    rc, out, _ = _run(cmd_compare, a=[a], b=[b], paired=True)
    doc = json.loads(out)
    paired = _metrics(doc)["reap_total"]
    assert doc["paired_boards"] == 40
    lo, hi = paired["diff_pct_ci"]
    assert lo < paired["diff_pct"] < hi and abs(paired["diff_pct"] - 10.0) < 3  # the planted +10 %
    assert hi - lo < (unpaired["diff_pct_ci"][1] - unpaired["diff_pct_ci"][0]) / 3


def test_fail_if_gates_exit_1_only_when_the_ci_is_beyond_and_say_so_first(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", SynthSpec(n=2000, seed=1))
    b = _write(tmp_path / "b.jsonl", SynthSpec(n=2000, seed=2, shift=1.2))
    rc, out, _ = _run(cmd_compare, a=[a], b=[b], format="table", fail_if=["reap_total:+5%"])
    first = out.splitlines()[0]
    assert rc == 1 and first.startswith("FAIL (1 of 1 gates): reap_total +") and "lies entirely beyond" in first
    rc, out, _ = _run(cmd_compare, a=[a], b=[b], format="table", fail_if=["reap_total:+30%", "exit_mmap:+50ms"])
    assert rc == 0 and out.splitlines()[0].startswith("PASS (2 gates): reap_total")
    rc, _, err = _run(cmd_compare, a=[a], b=[b], fail_if=["reap_total:5"])
    assert rc == 2 and "METRIC:+N%" in err
    rc, _, err = _run(cmd_compare, a=[a], b=[b], fail_if=["reap_total:+5MiB"])
    assert rc == 2 and "reap_total is in ms" in err


def test_markdown_has_the_seed_table_on_parquet_too(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.jsonl", SynthSpec(n=1000, seed=1, boards=8))
    b = _write(tmp_path / "b.jsonl", SynthSpec(n=1000, seed=2, boards=8, kernel_release="6.19.0-synthetic"))
    _run(cmd_export, files=[a, b], parquet=tmp_path / "ds")
    rc, out, _ = _run(cmd_compare, by="kernel", files=[tmp_path / "ds"], format="markdown")
    assert rc == 0
    assert "| kernel | total (ms) | exit_mmap (ms) | reaper work (ms) | lock wait (ms) | n | boards |" in out
    assert "| 6.18.0-synthetic | " in out and "| 1000 | 8 |" in out
    assert "| metric | unit |" in out  # the full table follows


def test_medians_read_in_the_narrow_window_are_those_of_every_bin_and_a_miss_widens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """side_medians reads each resampled median in a window near the pooled median, from counts below and
    above it per unit: the medians are exactly those of the whole histogram on the same resamples, also
    when the window starts far too narrow and must widen (the same weights drawn again)."""
    import lmkd_py.report.cluster as cl

    rng = np.random.default_rng(5)
    items = {"a": (_fleet_side(rng, 1.0, boards=300, per=200), "boards"),
             "b": (_fleet_side(rng, 1.3, boards=40, per=900), "boards")}
    narrow = cl.side_medians(items, 300, [1, 2])
    for name, (h, _) in items.items():
        w = cl.window_for(h, 6 * h.spread())  # type: ignore[arg-type]
        assert w.hi - w.lo < 0.5 * (h.bins.max() - h.bins.min()), name  # narrow indeed
    monkeypatch.setattr(cl, "FINE_COLUMNS", 1 << 22)  # one column per fine bin over every value
    monkeypatch.setattr(cl, "Z_WINDOW", 1e9)
    whole = cl.side_medians(items, 300, [1, 2])
    monkeypatch.setattr(cl, "Z_WINDOW", 1e-4)  # misses: widened x4 at a time until nothing falls out
    widened = cl.side_medians(items, 300, [1, 2])
    for name in items:
        assert np.isfinite(narrow[name]).all() and np.unique(narrow[name]).size > 20
        assert np.array_equal(narrow[name], whole[name]), name
        assert np.array_equal(widened[name], whole[name]), name


def test_columnar_compare_agrees_with_the_in_memory_one(tmp_path: Path) -> None:
    """The same fleet through both paths (JSONL in memory; Parquet through DuckDB): the same designs and
    counts, medians within a bin, CIs within a few per cent of their width (the paths number the boots
    in another order, so the resamples differ)."""
    common = {"boards": 30, "boots": 2, "board_sigma": 0.3, "board_seed": 3}
    a = _write(tmp_path / "a.jsonl", SynthSpec(n=3000, seed=1, **common))  # type: ignore[arg-type]
    b = _write(tmp_path / "b.jsonl", SynthSpec(n=3000, seed=2, shift=1.1, **common))  # type: ignore[arg-type]
    for src, ds in ((a, "da"), (b, "db")):
        assert _run(cmd_export, files=[src], parquet=tmp_path / ds)[0] == 0
    rc, mem, _ = _run(cmd_compare, a=[a], b=[b], resamples=2000)
    rc2, col, _ = _run(cmd_compare, a=[tmp_path / "da"], b=[tmp_path / "db"], resamples=2000)
    assert rc == rc2 == 0
    dm, dc = json.loads(mem), json.loads(col)
    assert dm["sides"] == dc["sides"] and dm["sides"]["a"]["design"] == "boards"
    for name in ("reap_total", "exit_mmap", "kill_to_exit"):
        m, c = _metrics(dm)[name], _metrics(dc)[name]
        assert m["a"]["n"] == c["a"]["n"] and m["b"]["n"] == c["b"]["n"]
        assert c["a"]["median"] == pytest.approx(m["a"]["median"], rel=1.5e-3)
        width = m["diff_ci"][1] - m["diff_ci"][0]
        assert width > 0
        for i in (0, 1):
            assert abs(c["diff_ci"][i] - m["diff_ci"][i]) < 0.1 * width, (name, m["diff_ci"], c["diff_ci"])
