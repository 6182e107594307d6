"""``compare`` on records of real kills: the reaper's work on 512 MiB victims is slower than on 64 MiB.

Victims are Python children of this test that fill 64 or 512 MiB of anonymous memory (a bytearray, every
page written). Each is killed by ``lmkd-py kill PID --records FILE`` as a user would run it, sizes
alternating, until each size has 6 measured reaps. The comparison must then say that the larger
victims' reaper work is slower, with a 95 % CI of the difference of medians above zero.

Which number is "the reaper's work": ``kernel.reaper_work_ns`` when the kernel timeline (tracing) gave
enough of them, otherwise ``mrelease.wall_ns`` of the calls that returned 0 - process_mrelease's wall
time on the reaper thread, which is the reaper's work as seen from user space. The test prints which.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.records import read_records

pytest.importorskip("numpy", reason="the report extra (numpy) is not installed")
pytest.importorskip("scipy", reason="the report extra (scipy) is not installed")

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: killing with process_mrelease and tracing"),
]

LMKD = Path(sys.executable).with_name("lmkd-py")
MIN_VALUES = 6  # measured reaps per size: the effect is large (~5 vs ~27 ms here)
MAX_PAIRS = 30  # give up (and fail) after this many kills per size
VICTIM = """
import sys, time
size = int(sys.argv[1]) << 20
buf = bytearray(size)
buf[::4096] = b"\\x01" * len(range(0, size, 4096))  # write every page: resident, not just reserved
print("ready", flush=True)
time.sleep(600)
"""


def _kill_available() -> str | None:
    if not LMKD.exists():
        return f"{LMKD} not installed"
    proc = subprocess.run([str(LMKD), "kill", "--help"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"`lmkd-py kill` is not available yet: {proc.stderr.strip()[:200]}"


@pytest.fixture
def victims() -> Iterator[list[subprocess.Popen[str]]]:
    """Victims this test starts; any still alive at the end are killed and reaped here."""
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def _kill_one(size_mib: int, records: Path, victims: list[subprocess.Popen[str]]) -> None:
    p = subprocess.Popen([sys.executable, "-c", VICTIM, str(size_mib)], stdout=subprocess.PIPE, text=True)
    victims.append(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready", f"victim {p.pid} did not start"
    proc = subprocess.run(
        [str(LMKD), "kill", str(p.pid), "--records", str(records)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert p.wait(timeout=30) == -9


def _values(records: Path) -> tuple[int, int]:
    """(reaper_work values, mrelease_wall values) in ``records``, counted as the report counts them."""
    recs = read_records([records]).records if records.exists() else []
    reaped = [r for r in recs if r.mrelease.status == "ok"]  # ESRCH: nothing reaped, not counted
    work = sum(1 for r in reaped if r.kernel is not None and r.kernel.reaper_work_ns is not None)
    wall = sum(1 for r in reaped if r.mrelease.wall_ns is not None)
    return work, wall


def test_larger_victims_reaper_work_is_reported_slower(tmp_path: Path, victims: list[subprocess.Popen[str]]) -> None:
    missing = _kill_available()
    if missing:
        pytest.skip(missing)
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    # Interleave the sizes so drift of the machine hits both sides alike. A process_mrelease that finds
    # the mm already dropped (ESRCH, a benign race on this 2-core machine: about half the kills here)
    # measures nothing, so kill until each side has MIN_VALUES measured reaps (or MAX_PAIRS kills).
    pairs = 0
    while pairs < MAX_PAIRS and min(max(_values(small)), max(_values(large))) < MIN_VALUES:
        _kill_one(64, small, victims)
        _kill_one(512, large, victims)
        pairs += 1

    recs = read_records([small, large])
    assert not recs.problems
    assert len(recs.records) == 2 * pairs
    assert all(r.outcome == "killed" for r in recs.records), [r.outcome for r in recs.records]
    enough_timeline = min(_values(small)[0], _values(large)[0]) >= MIN_VALUES
    metric = "reaper_work" if enough_timeline else "mrelease_wall"
    print(
        f"{pairs} kills per size; reaper work measured as {metric}: "
        + (
            "kernel timeline (tracing) present"
            if enough_timeline
            else "no complete kernel timeline, so "
            "process_mrelease's wall time on the reaper thread stands for the reaper's work"
        )
    )

    proc = subprocess.run(
        [
            str(LMKD),
            "compare",
            "--a",
            str(small),
            "--b",
            str(large),
            "--label-a",
            "64MiB",
            "--label-b",
            "512MiB",
            "--format",
            "json",
            "--plots",
            str(tmp_path / "plots"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    row = next(m for m in doc["metrics"] if m["name"] == metric)
    print(json.dumps(row))
    assert min(row["a"]["n"], row["b"]["n"]) >= MIN_VALUES, f"too few measured reaps in {MAX_PAIRS} kills"
    assert row["b"]["median"] > row["a"]["median"]
    assert row["diff_ci"][0] > 0, f"CI of the difference includes 0: {row['diff_ci']}"
    assert row["p_value"] < 0.05
    # Victims of different sizes, and (most likely) fewer than 20 values: both must be said.
    assert any("victim sizes differ" in w for w in doc["warnings"])
    assert row["a"]["n"] >= 20 or any("fewer than 20" in w for w in doc["warnings"])
    assert (tmp_path / "plots" / f"{metric}_ecdf.png").exists()

    proc = subprocess.run(
        [str(LMKD), "report", str(small), str(large), "--format", "markdown"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"records: {2 * pairs}" in proc.stdout and "| mrelease_wall | ms |" in proc.stdout
