"""How ``compare`` scales with the number of records: the in-memory JSONL path (the old one) against the
columnar path (``export --parquet`` once, then ``compare`` on the dataset through DuckDB); time and
peak RSS, each measurement in a fresh interpreter so its peak belongs to it alone.

The data: a synthetic fleet, 100 records per board (a day of a 10,000-board fleet is 1 M records), two
boots per board, a log-normal board effect (sd 0.3); side B on the same boards with latencies 10 %
longer. Generation is not timed. Phases per size:

- ``old``: ``compare --a A.jsonl --b B.jsonl`` in memory (load + cluster bootstrap), for sizes up to
  ``--old-max`` (beyond, the old path needs more memory than the target allows);
- ``export``: ``export --parquet`` of both files (once per data set);
- ``columnar``: ``compare --a DS_A --b DS_B`` on the datasets;
- ``engines`` (``--engines``): the bootstrap's per-board histogram of three metrics, the engine's core
  query shape, in DuckDB and in Polars (when installed) on the same Parquet files;
- ``--scale-up K``: after the largest size, a dataset K times larger made by copying its Parquet K times
  with the boards and boots renamed in each copy (``replicate``; a fleet K times as many boards, each
  copy's files encoded as the original's), then ``columnar`` on it. Generating and exporting 30 M records
  from JSONL would take ~20 min (56 GB of JSONL); the compare reads the same kind of files either way.

Prints figures; asserts nothing.

    .venv/bin/python benchmarks/report_scale.py [--sizes 100000,1000000] [--old-max 1000000]
        [--resamples 2000] [--engines] [--scale-up 30] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script


def _peak_rss_mib() -> float:
    """This process' peak RSS (VmHWM). Not ru_maxrss: after a vfork + exec it starts from the parent's
    peak, which the kernel carries over at exec."""
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmHWM:")[1].split()[0]) / 1024


def _specs(n: int) -> tuple[object, object]:
    from lmkd_py.report.synth import SynthSpec

    boards = max(2, n // 2 // 100)
    common = {"boards": boards, "boots": 2, "board_sigma": 0.3, "board_seed": 7}
    return (SynthSpec(n=n // 2, seed=1, dry_run_share=0.02, **common),  # type: ignore[arg-type]
            SynthSpec(n=n - n // 2, seed=2, shift=1.1, kernel_release="6.19.0-synthetic", **common))  # type: ignore[arg-type]


def phase(name: str, n: int, workdir: Path, resamples: int, copies: int = 1) -> dict[str, float]:
    """One phase in this process: seconds and peak RSS (MiB)."""
    a, b = workdir / f"a-{n}.jsonl", workdir / f"b-{n}.jsonl"
    da, db = workdir / f"a-{n}.parquet.d", workdir / f"b-{n}.parquet.d"
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    if name == "generate":
        from lmkd_py.report.synth import synthetic_lines

        for path, spec in zip((a, b), _specs(n), strict=True):
            with path.open("w") as fh:
                fh.writelines(synthetic_lines(spec))  # type: ignore[arg-type]
        out["file_mib"] = (a.stat().st_size + b.stat().st_size) / 2**20
    elif name == "export":
        from lmkd_py.report import cmd_export

        for src, ds in ((a, da), (b, db)):
            rc = cmd_export(argparse.Namespace(files=[src], parquet=ds), out=io.StringIO())
            assert rc == 0
        out["dataset_mib"] = sum(f.stat().st_size for d in (da, db) for f in d.rglob("*.parquet")) / 2**20
    elif name in ("old", "columnar"):
        from lmkd_py.report import cmd_compare

        sides = ([a], [b]) if name == "old" else ([da], [db])
        sink = io.StringIO()
        rc = cmd_compare(argparse.Namespace(a=sides[0], b=sides[1], by=None, files=[], format="json", plots=None,
                                            seed=0, resamples=resamples, label_a=None, label_b=None,
                                            paired=False, fail_if=None), out=sink)
        assert rc == 0
        doc = json.loads(sink.getvalue())
        row = {m["name"]: m for m in doc["metrics"]}["reap_total"]
        out["diff_pct"] = row["diff_pct"]
        out["records"] = doc["sides"]["a"]["records"] + doc["sides"]["b"]["records"]
    elif name == "replicate":
        out["dataset_mib"] = _replicate(workdir, n, copies)
    elif name in ("duckdb", "polars"):
        out["rows"] = _engine(name, [da, db])
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _replicate(workdir: Path, n: int, copies: int) -> float:
    """Datasets of ``copies`` x ``n`` records from those of ``n``: copy k renames every machine and boot id
    with a ``~k`` suffix (new boards and boots, same kills); one Parquet file per copy, same partition,
    same metadata and compression as export writes."""
    import duckdb

    from lmkd_py.report.export import ENGINE_MEMORY
    from lmkd_py.report.schema import FORMAT_KEY, FORMAT_VALUE

    con = duckdb.connect(config={"memory_limit": ENGINE_MEMORY, "threads": 2})
    size = 0
    for side in ("a", "b"):
        src = workdir / f"{side}-{n}.parquet.d"
        files = sorted(str(f) for f in src.rglob("*.parquet"))
        part = Path(files[0]).parent.relative_to(src)
        dest = workdir / f"{side}-{n * copies}.parquet.d" / part
        dest.mkdir(parents=True)
        for k in range(copies):
            out = dest / f"copy-{k}.parquet"
            con.execute(
                "COPY (SELECT * REPLACE (struct_update(provenance, machine_id := provenance.machine_id || $k, "
                "boot_id := provenance.boot_id || $k) AS provenance) FROM read_parquet($f, hive_partitioning=false)) "
                f"TO '{out}' (FORMAT parquet, COMPRESSION zstd, KV_METADATA {{'{FORMAT_KEY}': '{FORMAT_VALUE}'}})",
                {"k": f"~{k}", "f": files})
            size += out.stat().st_size
    return size / 2**20


def _engine(name: str, datasets: list[Path]) -> float:
    """Per (board, 0.1 % bin) counts of reap_total, exit_mmap and reaper_work over both datasets."""
    files = sorted(str(f) for d in datasets for f in d.rglob("*.parquet"))
    step = 0.0009995003330835331  # ln(1.001), cluster.LOG_STEP
    if name == "duckdb":
        import duckdb

        con = duckdb.connect(config={"memory_limit": "768MB", "threads": 2})
        q = ("SELECT metric, board, CAST(floor(ln(v) / $s) AS BIGINT) AS bin, count(*) FROM (UNPIVOT (SELECT "
             "provenance.machine_id AS board, kernel.reap_total_ns AS m0, kernel.exit_mmap_ns AS m1, "
             "kernel.reaper_work_ns AS m2 FROM read_parquet($f)) ON m0, m1, m2 INTO NAME metric VALUE v) "
             "WHERE v > 0 GROUP BY ALL")
        return float(len(con.execute(q, {"f": files, "s": step}).fetchnumpy()["bin"]))
    import polars as pl

    lf = pl.scan_parquet(files).select(
        pl.col("provenance").struct.field("machine_id").alias("board"),
        pl.col("kernel").struct.field("reap_total_ns").alias("m0"),
        pl.col("kernel").struct.field("exit_mmap_ns").alias("m1"),
        pl.col("kernel").struct.field("reaper_work_ns").alias("m2"),
    ).unpivot(index="board", on=["m0", "m1", "m2"], variable_name="metric", value_name="v")
    res = (lf.filter(pl.col("v") > 0)
           .with_columns((pl.col("v").cast(pl.Float64).log() / step).floor().cast(pl.Int64).alias("bin"))
           .group_by("metric", "board", "bin").len().collect(engine="streaming"))
    return float(res.height)


def _run(name: str, n: int, tmp: str, resamples: int, copies: int = 1) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--phase", name, "--n", str(n), "--dir", tmp,
                           "--resamples", str(resamples), "--copies", str(copies)], capture_output=True, text=True)
    if proc.returncode != 0:
        broken(f"{name} at {n} records failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--old-max", type=int, default=1_000_000)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--engines", action="store_true", help="also time the core query in DuckDB and Polars")
    ap.add_argument("--scale-up", type=int, default=0, metavar="K",
                    help="also compare a dataset K times the largest size (its Parquet copied K times, renamed)")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parse_args(ap, smoke={"sizes": "2000", "resamples": 200, "engines": True, "scale_up": 3})
    if args.phase is not None:
        print(json.dumps(phase(args.phase, args.n, args.dir, args.resamples, args.copies)))
        return
    print(f"{'records':>9} {'phase':>9} {'seconds':>8} {'peak RSS MiB':>13}  notes", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmkd-report-scale-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            gen = _run("generate", n, tmp, args.resamples)
            print(f"{n:>9} {'generate':>9} {gen['seconds']:>8.2f} {gen['peak_rss_mib']:>13.0f}  "
                  f"{gen['file_mib']:.0f} MiB of JSONL (not part of any figure below)", flush=True)
            phases = ["export", "columnar"] + (["old"] if n <= args.old_max else [])
            if args.engines:
                phases += ["duckdb"] + (["polars"] if _has("polars") else [])
            for name in phases:
                r = _run(name, n, tmp, args.resamples)
                note = {"export": f"{r.get('dataset_mib', 0):.0f} MiB of Parquet",
                        "columnar": f"compare on the datasets, reap_total diff {r.get('diff_pct', 0):+.1f} %",
                        "old": f"compare on the JSONL in memory, reap_total diff {r.get('diff_pct', 0):+.1f} %",
                        "duckdb": f"core query, {r.get('rows', 0):.0f} groups",
                        "polars": f"core query, {r.get('rows', 0):.0f} groups"}[name]
                print(f"{n:>9} {name:>9} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f}  {note}", flush=True)
            if args.engines and not _has("polars"):
                print(f"{n:>9} {'polars':>9} not installed (pip install polars to measure it)")
            if args.scale_up > 1 and n == max(int(s) for s in args.sizes.split(",")):
                big = n * args.scale_up
                r = _run("replicate", n, tmp, args.resamples, args.scale_up)
                print(f"{big:>9} {'replicate':>9} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f}  "
                      f"{r['dataset_mib']:.0f} MiB of Parquet: {args.scale_up} renamed copies (not part of any figure)",
                      flush=True)
                r = _run("columnar", big, tmp, args.resamples)
                print(f"{big:>9} {'columnar':>9} {r['seconds']:>8.2f} {r['peak_rss_mib']:>13.0f}  "
                      f"compare on the datasets, reap_total diff {r.get('diff_pct', 0):+.1f} %", flush=True)
            for f in Path(tmp).iterdir():
                if f.is_dir():
                    import shutil

                    shutil.rmtree(f)
                else:
                    f.unlink()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
