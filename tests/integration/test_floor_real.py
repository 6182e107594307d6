"""The free-memory floor's lead on the real kernel: a process allocating at its own pace inside a limited
memcg makes the machine's free memory fall; FloorCheck, reading the real /proc/meminfo, measures that
fall and raises its floor by it while it lasts, and drops back to the percentage floor once it stops."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lmkd_py.procfs import ProcFs
from lmkd_py.signals import LEAD_CAP, FloorCheck, signal_level
from tests.conftest import needs_root

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")
pytestmark = [needs_root, pytest.mark.skipif(
    not (V1 / "memory.limit_in_bytes").exists() or not (V2 / "cgroup.procs").exists(),
    reason="needs the v1 memory controller and cgroup v2")]

# Allocates and touches 8 MiB every 20 ms (~400 MiB/s at most) up to the total, then says when it began
# and ended, by its own clock (CLOCK_MONOTONIC, as the check's).
GROWER = r"""
import sys, time
total, step = int(sys.argv[1]) << 20, 8 << 20
sys.stdin.readline()
held, t0 = [], time.monotonic_ns()
while len(held) * step < total:
    b = bytearray(step)
    b[::4096] = b"\x01" * (step // 4096)
    held.append(b)
    time.sleep(0.02)
print(t0, time.monotonic_ns(), flush=True)
sys.stdin.readline()
"""


def test_the_floor_measures_a_real_fall_and_leads_by_it_only_while_it_lasts() -> None:
    from lmkd_py.stress import PressureCgroup

    proc = ProcFs()
    floor = FloorCheck(proc.free_and_total_kib, 0.1, signal_level("mem_floor", 0), lead_ms=250)
    got = proc.free_and_total_kib()
    assert got is not None
    base = round(got[1] * 0.1 / 100)
    mib = 640
    samples: list[tuple[int, int, int]] = []  # (t, fall KiB/s, floor KiB)
    with PressureCgroup(f"lmkd-py-test-floor-{uuid.uuid4().hex[:8]}", limit_mib=mib + 128) as cg:
        child = subprocess.Popen([sys.executable, "-c", GROWER, str(mib)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            cg.add(child.pid)
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write("go\n")
            child.stdin.flush()
            deadline = time.monotonic() + 60
            while child.poll() is None and time.monotonic() < deadline:
                now = time.monotonic_ns()
                free_total = proc.free_and_total_kib()
                assert free_total is not None
                floor_kib, fall = floor.floor_kib(now, *free_total)
                samples.append((now, fall, floor_kib))
                if samples[-1][0] - samples[0][0] > 1_000_000_000 and _done(child):
                    break
                time.sleep(0.02)
            line = child.stdout.readline().split()
            t0, t1 = int(line[0]), int(line[1])
            # Half a second after the end: the fall is over and the floor is the percentage's again.
            for _ in range(25):
                time.sleep(0.02)
                now = time.monotonic_ns()
                free_total = proc.free_and_total_kib()
                assert free_total is not None
                floor_kib, fall = floor.floor_kib(now, *free_total)
                samples.append((now, fall, floor_kib))
        finally:
            child.kill()
            child.wait()
    own_rate = mib * 1024 * 1_000_000_000 // (t1 - t0)  # KiB/s, by the grower's clock
    during = [fall for t, fall, _ in samples if t0 + 200_000_000 <= t <= t1]
    assert len(during) >= 10, f"too few samples while it grew: {len(during)}"
    measured = statistics.median(during)
    assert 0.6 * own_rate <= measured <= 1.4 * own_rate, (measured, own_rate)
    raised = [f for t, _, f in samples if t0 + 200_000_000 <= t <= t1]
    # 250 ms of a few hundred MiB/s is above 0.1 % of this machine's memory (24 MiB of 24 GiB).
    assert base < statistics.median(raised) <= LEAD_CAP * base
    after = [(fall, f) for t, fall, f in samples if t >= t1 + 300_000_000]
    # (Free memory still moves with the rest of the machine: most samples, not all, see no fall at all.)
    assert after and statistics.median(f for _, f in after) == base, after
    assert statistics.median(fall for fall, _ in after) < own_rate / 10, after


def _done(child: subprocess.Popen[str]) -> bool:
    """Whether the grower has printed its times (it then waits on stdin, alive)."""
    import select

    assert child.stdout is not None
    return bool(select.select([child.stdout], [], [], 0)[0])
