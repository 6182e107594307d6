"""The daemon's own memory (issue 13): <= 22 MiB resident and <= 22 MiB locked at idle after its first kill,
with tracing, the proc connector and the records writer on, started as the service starts it (real mode,
the shipped config file). A footprint is stable enough for a test with a margin (10 %); times are not,
so start-up time lives in benchmarks/footprint.py.

The daemon is scoped (--cgroup) to a memory cgroup with a limit holding only the test's grower, so the
first kill is of a process the test started: real mode on the whole machine could kill someone else's.
Observe mode is measured the same way, recording the kill the test makes itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.stress import PressureCgroup
from tests.conftest import needs_root
from tests.integration.test_signals_real import Grower, _missing

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "lmkd-py.toml"
TARGET_KIB = 22 * 1024
MARGIN = 1.10
# Shared objects whose presence in the daemon means a footprint regression: pydantic's validator core
# (config validation runs in a child), OpenSSL (hashlib, ssl: nothing here opens a network socket or needs
# more than CPython's own SHA-256), asyncio (behind structlog; lean.py keeps it out).
NOT_IN_DAEMON = ("pydantic_core", "_ssl.", "_hashlib.", "_asyncio.", "libcrypto", "libssl")




def footprint(pid: int) -> dict[str, int]:
    """VmRSS, VmLck (KiB, /proc/PID/status) and Locked (KiB actually locked and resident, smaps_rollup)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmLck", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Locked:"):
            out["Locked"] = int(line.split()[1])
    return out


def libraries(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/" in line}


class Running:
    """An lmkd-py process with its stderr (JSON logs) drained by a thread."""

    def __init__(self, args: list[str]) -> None:
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "lmkd_py.cli", *args, "--log-format", "json"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        assert self.ready.wait(30), "not ready in 30 s:\n" + self.log()

    def _drain(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line)
            if '"daemon.ready"' in line or '"observe.ready"' in line:
                self.ready.set()

    def log(self) -> str:
        return "".join(self.lines[-40:])

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        code = self.p.wait(30)
        self._t.join(5)
        return code


@pytest.fixture
def cgroup() -> Iterator[PressureCgroup]:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    with PressureCgroup(f"lmkd-test-footprint-{uuid.uuid4().hex[:8]}", limit_mib=256) as cg:
        (cg.v1_path / "memory.swappiness").write_text("0")
        yield cg


def records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def check(fp: dict[str, int], libs: set[str], what: str) -> None:
    print(f"{what}: " + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in sorted(fp.items())))
    assert fp["VmRSS"] <= TARGET_KIB * MARGIN, f"{what}: RSS {fp['VmRSS'] / 1024:.1f} MiB over 22 MiB + 10 %"
    assert fp.get("Locked", 0) <= TARGET_KIB * MARGIN, f"{what}: locked {fp['Locked'] / 1024:.1f} MiB over target"
    loaded = sorted(lib for lib in libs if any(n in lib for n in NOT_IN_DAEMON))
    assert loaded == [], f"{what}: maps what it never uses: {loaded}"


@needs_root
@pytest.mark.slow
def test_kill_mode_after_its_first_kill_as_the_service_runs_it(cgroup: PressureCgroup, tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    grower = Grower(step_mib=3, period_ms=20, cap_mib=2048)
    try:
        cgroup.add(grower.pid)
        d = Running(["--config", str(SHIPPED), "--cgroup", str(cgroup.v2_path), "--records", str(out)])
        try:
            grower.go()
            assert wait_for(lambda: records(out), 20), "no kill record:\n" + d.log()
            time.sleep(2.0)  # idle after the kill: the reaper thread and buffers have done their work
            fp, libs = footprint(d.p.pid), libraries(d.p.pid)
            kernel = records(out)[0].get("kernel")
        finally:
            code = d.stop()
        assert code == 0, d.log()
        rec = records(out)[0]
        assert rec["outcome"] == "killed" and rec["victim"]["pid"] == grower.pid, rec  # type: ignore[index]
        assert isinstance(kernel, dict) and kernel.get("exit_mmap_ns") is not None, f"tracing was not on: {kernel}"
        assert fp.get("Locked", 0) > 0, "mlockall did not lock (the service's default)"
        check(fp, libs, "kill mode after its first kill")
    finally:
        grower.kill()


@needs_root
@pytest.mark.slow
def test_observe_mode_after_recording_a_kill(cgroup: PressureCgroup, tmp_path: Path) -> None:
    out = tmp_path / "observed.jsonl"
    grower = Grower(step_mib=4, period_ms=20, cap_mib=64)  # 64 MiB, then holds
    try:
        cgroup.add(grower.pid)
        o = Running(["observe", "--config", str(SHIPPED), "--records", str(out)])
        try:
            grower.go()
            assert grower.p.stdout is not None and grower.p.stdout.readline().strip() == "capped"
            grower.p.send_signal(signal.SIGKILL)  # a kill made by someone else: the test
            grower.p.wait()
            assert wait_for(lambda: any(r["victim"]["pid"] == grower.pid for r in records(out)), 20), o.log()  # type: ignore[index]
            time.sleep(2.0)
            fp, libs = footprint(o.p.pid), libraries(o.p.pid)
        finally:
            code = o.stop()
        assert code == 0, o.log()
        # Observe mode is not locked, on purpose (README, "Footprint"): what it measures comes from the
        # kernel's own timestamps, and ~20 MiB of unevictable memory would add to the pressure it records.
        assert fp.get("Locked", 0) == 0
        check(fp, libs, "observe mode after recording a kill")
    finally:
        grower.kill()


def test_the_daemons_imports_leave_out_what_it_never_uses() -> None:
    """What the daemon and observe mode import (as cli.main does it) holds no offline family (report, lab,
    stress), no pydantic, no asyncio, no OpenSSL-backed hashlib and, with no pattern configured, no re2."""
    code = (
        "import sys\n"
        "from lmkd_py.lean import defer_asyncio, asyncio_loaded\n"
        "defer_asyncio()\n"
        "import lmkd_py.service, lmkd_py.observe\n"
        "from lmkd_py.config import Config\n"
        "from lmkd_py.policy import Rules\n"
        "Rules.from_config(Config().policy)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core', 're2', 'numpy',"
        " '_hashlib', 'ssl') or m.startswith(('lmkd_py.report', 'lmkd_py.lab', 'lmkd_py.stress')))\n"
        "print(bad, asyncio_loaded())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"
