"""How ``report`` and ``compare`` scale with the number of records: time and peak memory.

Writes synthetic record files (10k, 100k and 1M records by default; generation time is not counted),
then, each size in a fresh interpreter so peak RSS belongs to that size alone, times:
load (read + validate every line into columns), report (per-group summaries + table), and compare
(two halves, B planted 10 % slower: bootstraps, Mann-Whitney, KS). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/report_scale.py [--sizes 10000,100000,1000000] [--resamples 2000] [--smoke]
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

from lmkd_py.report.synth import SynthSpec, synthetic_lines


def _write(path: Path, spec: SynthSpec) -> None:
    with path.open("w") as fh:
        fh.writelines(synthetic_lines(spec))


def one(n: int, workdir: Path, resamples: int) -> dict[str, float]:
    """Measure one size in this process; returns seconds per phase and peak RSS in MiB."""
    from lmkd_py import report

    a, b = workdir / f"a-{n}.jsonl", workdir / f"b-{n}.jsonl"
    t0 = time.perf_counter()
    _write(a, SynthSpec(n=n // 2, seed=1, dry_run_share=0.02))
    _write(b, SynthSpec(n=n - n // 2, seed=2, shift=1.1, kernel_release="6.12.0-synthetic"))
    gen_s = time.perf_counter() - t0
    rss_before = _peak_rss_mib()

    from lmkd_py.report.data import load_table

    t0 = time.perf_counter()
    table = load_table([a, b])
    load_s = time.perf_counter() - t0
    assert table.rows == n, (table.rows, n)
    del table

    sink = io.StringIO()
    t0 = time.perf_counter()
    rc = report.cmd_report(argparse.Namespace(files=[a, b], format="table", plots=None), out=sink)
    report_s = time.perf_counter() - t0
    assert rc == 0

    t0 = time.perf_counter()
    rc = report.cmd_compare(
        argparse.Namespace(
            a=[a],
            b=[b],
            by=None,
            files=[],
            format="json",
            plots=None,
            seed=0,
            resamples=resamples,
            label_a=None,
            label_b=None,
        ),
        out=sink,
    )
    compare_s = time.perf_counter() - t0
    assert rc == 0
    size_mib = (a.stat().st_size + b.stat().st_size) / 2**20
    a.unlink()
    b.unlink()
    return {
        "records": n,
        "file_mib": round(size_mib, 1),
        "generate_s": round(gen_s, 2),
        "load_s": round(load_s, 2),
        "report_s": round(report_s, 2),
        "compare_s": round(compare_s, 2),
        "rss_before_mib": round(rss_before),
        "peak_rss_mib": round(_peak_rss_mib()),
    }


def _peak_rss_mib() -> float:
    """This process' peak RSS (VmHWM). Not ru_maxrss: after a vfork + exec it starts from the parent's
    peak, which the kernel carries over at exec."""
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmHWM:")[1].split()[0]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parse_args(ap, smoke={"sizes": "1000", "resamples": 200})
    if args.one is not None:
        print(json.dumps(one(args.one, args.dir, args.resamples)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"{'records':>9} {'file MiB':>9} {'load s':>8} {'report s':>9} {'compare s':>10} "
        f"{'us/rec (report)':>16} {'peak RSS MiB':>13}"
    )
    with tempfile.TemporaryDirectory(prefix="lmkd-report-scale-") as tmp:
        for n in sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(n), "--dir", tmp, "--resamples", str(args.resamples)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                broken(f"measuring {n} records failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{r['records']:>9} {r['file_mib']:>9} {r['load_s']:>8} {r['report_s']:>9} {r['compare_s']:>10} "
                f"{r['report_s'] / n * 1e6:>16.1f} {r['peak_rss_mib']:>13}",
                flush=True,
            )


if __name__ == "__main__":
    main()
