"""What the kill benchmarks share: an anonymous-memory victim they start and kill, and medians."""

from __future__ import annotations

import statistics
import subprocess
import sys
from collections.abc import Sequence

from lmkd_py.killer import Killer
from lmkd_py.records import KillRecord

# argv: size in MiB, then optionally a CPU to pin to (the victim then also runs at nice 19: starved).
VICTIM = """
import os, sys, time
if len(sys.argv) > 2:
    os.sched_setaffinity(0, {int(sys.argv[2])})
    os.nice(19)
size = int(sys.argv[1]) << 20
b = bytearray(size)
b[::4096] = b"\\1" * len(range(0, size, 4096))  # one write per page, in C
print("ready", flush=True)
time.sleep(3600)
"""


def one_kill(killer: Killer, size_mib: int, cpu: int | None = None) -> KillRecord:
    """Start a victim of ``size_mib`` MiB (pinned and starved on ``cpu`` if given), kill it with
    ``killer``, and reap it whatever happened."""
    extra = [str(cpu)] if cpu is not None else []
    p = subprocess.Popen([sys.executable, "-c", VICTIM, str(size_mib), *extra], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return killer.kill(killer.snapshot(p.pid))
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def med(values: Sequence[float | int | None], scale: float = 1e6) -> float | None:
    """Median of the known values divided by ``scale`` (default: ns -> ms), or None."""
    got = [v for v in values if v is not None]
    return statistics.median(got) / scale if got else None
