"""Fixtures shared by every tier: child processes that the test itself starts (and always reaps)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

VICTIM_CODE = """
import sys, time
size = int(sys.argv[1]) << 20
b = bytearray(size)
for i in range(0, size, 4096):
    b[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


class Children:
    """Processes a test started; everything still alive is SIGKILLed (through its own handle) and
    reaped at teardown, so a failing test leaves nothing behind."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def victim(self, size_mib: int) -> subprocess.Popen[str]:
        """A Python child that has touched ``size_mib`` MiB of anonymous memory when this returns."""
        p = subprocess.Popen(
            [sys.executable, "-c", VICTIM_CODE, str(size_mib)], stdout=subprocess.PIPE, text=True
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", f"victim did not start: {line!r}"
        return p

    def sleeper(self) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], text=True)
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, tracefs, other users' processes)")
