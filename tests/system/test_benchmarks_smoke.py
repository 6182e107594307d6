"""Benchmarks must not rot: every script in benchmarks/ runs with ``--smoke`` (its smallest size, a few
seconds) and prints its figures. A benchmark fails here only when it is broken (non-zero exit: an
exception, or no data); the figures are parsed as numbers, never compared with a target.

The episode benchmark makes memory cgroups named ``$LMKD_TEST_CGROUP_PREFIX`` (default
``lmkd-py-test-bench-``) plus a random suffix; the test checks that none is left behind, nor a tracefs
instance of a benchmark that exited.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import check_no_instance_left

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
N = r"(-?\d+(?:\.\d+)?)"  # one figure
FOOT = rf"{N} MiB \| {N} MiB \| {N} MiB \| {N} %"  # footprint.py: RSS | locked | VmLck | idle CPU
CGROUP_PREFIX = os.environ.get("LMKD_TEST_CGROUP_PREFIX", "lmkd-py-test-bench-")
CGROUP_ROOTS = (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup/unified"))


@dataclass(frozen=True)
class Case:
    script: str
    figures: tuple[str, ...]  # regexes (multiline); every group must parse as a finite number
    args: tuple[str, ...] = ()
    root: bool = False  # cgroups, tracefs
    tracefs: bool = False
    cgroups: bool = False

    @property
    def id(self) -> str:
        return " ".join((self.script, *self.args))


CASES = (
    Case("kill_path.py", (rf"^mrelease\s+\d+\s+{N}\s+{N}", rf"^kill-only\s+\d+\s+{N}\s+{N}",
                          rf"ratio mrelease / kill-only, median kill->exit: {N}")),
    Case("kill_path.py", (rf"^mrelease\s+\d+\s+{N}\s+{N}\s+{N}",
                          rf"ratio mrelease / kill-only, median kill->exit: {N}"), args=("--starve",)),
    Case("decision_latency.py", (rf"decision p50\s+{N} ms\s+p99\s+{N} ms\s+\| full /proc scan p50\s+{N} ms",)),
    Case("footprint.py", (rf"^\| lmkd-py kill mode, whole machine[^|]*\| {N} ms \| {FOOT}",
                          rf"^\| lmkd-py kill mode, scoped[^|]*\| {N} ms \| {FOOT}",
                          rf"^\| lmkd-py observe mode[^|]*\| {N} ms \| {FOOT}",
                          rf"^\s+pydantic\s+\+{N} MiB"),
         root=True, tracefs=True, cgroups=True),
    Case("reap_curve.py", (rf"^\s+16\s+1\s+1\s+{N}\s+{N}", rf"^\s+16\s+64\s+1\s+{N}\s+{N}")),
    Case("episode.py", (rf"^lmkd-py\s+{N}\s+\S+\s+{N}\s+{N}\s+{N}", rf"^none\s+{N}\s+\S+\s+{N}\s+{N}\s+{N}"),
         root=True, cgroups=True),
    Case("killer_race.py", (rf"^anon\s+lmkd-py\s+{N}\s+{N}\s+{N}", rf"^many\s+none\s+{N}\s+{N}\s+{N}"),
         root=True, cgroups=True),
    Case("tracing_overhead.py", (rf"^tracing\s+\d+\s+{N}\s+{N}\s+{N}", rf"^no tracing\s+\d+\s+{N}\s+{N}\s+{N}",
                                 rf"ratio tracing / no tracing, median kill->exit: {N}",
                                 rf"before_kill \(on the kill path\): median {N} us",
                                 rf"ratio armed / none: {N}"),
         root=True, tracefs=True),
    Case("report_scale.py", (rf"^\s+2000\s+export\s+{N}\s+{N}", rf"^\s+2000\s+columnar\s+{N}\s+{N}",
                             rf"^\s+2000\s+old\s+{N}\s+{N}", rf"^\s+2000\s+duckdb\s+{N}\s+{N}")),
    Case("shape_fidelity.py", (rf"^all\s+\d+\s+\d+\s+\+?{N}%\s+{N}\s+{N}\s+\+?{N}%",
                               rf"^kill->exit\s+{N}\s+{N}\s+", r"kills python-numpy: (\d+) original, (\d+) replica"),
         root=True, tracefs=True),
    Case("observe_overhead.py", (rf"wall ratio on/off: {N}", rf"observer CPU when idle: {N} ms",
                                 rf"observer CPU per observed kill: {N} ms"),
         root=True, tracefs=True),
)


def test_every_benchmark_has_a_smoke_case() -> None:
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert scripts == {c.script for c in CASES}, "a benchmark without a smoke case (or a case without a script)"
    smoke_target = (ROOT / "Makefile").read_text().split("\nbench-smoke:", 1)[1].split("\n\n", 1)[0]
    for script in scripts:
        assert f"benchmarks/{script} --smoke" in smoke_target, f"make bench-smoke does not run {script}"


def _our_cgroups() -> set[Path]:
    return {p for root in CGROUP_ROOTS if root.is_dir() for p in root.glob(f"{CGROUP_PREFIX}*")}


def _tracefs_root() -> Path:
    import structlog

    from lmkd_py.tracing import TracingUnavailable, find_tracefs

    try:
        return find_tracefs(None, structlog.get_logger())
    except TracingUnavailable as exc:
        pytest.skip(f"no tracefs here: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_benchmark_smoke(case: Case) -> None:
    if case.root and os.geteuid() != 0:
        pytest.skip(f"{case.script} needs root (cgroups or tracefs)")
    if case.cgroups and not all(r.is_dir() for r in CGROUP_ROOTS):
        pytest.skip(f"{case.script} needs a v1 memory controller and a v2 hierarchy at {CGROUP_ROOTS}")
    instances = check_no_instance_left(_tracefs_root()) if case.tracefs else None
    if instances is not None:
        next(instances)
    cgroups_before = _our_cgroups()
    cmd = [sys.executable, str(BENCH / case.script), "--smoke", *case.args]
    if case.cgroups:
        cmd += ["--cgroup-prefix", CGROUP_PREFIX]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    print(f"{case.id} --smoke: {took:.1f} s\n{out.stdout}")
    assert out.returncode == 0, f"rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    for pattern in case.figures:
        m = re.search(pattern, out.stdout, flags=re.M)
        assert m is not None, f"no figure matching {pattern!r} in:\n{out.stdout}"
        for value in m.groups():
            assert math.isfinite(float(value)), (pattern, value)
    if case.script == "observe_overhead.py":  # its last line is the machine-readable summary
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert all(math.isfinite(v) for v in summary["syscall_ns"].values())
    assert _our_cgroups() == cgroups_before, "cgroups left behind"
    if instances is not None:
        next(instances, None)
