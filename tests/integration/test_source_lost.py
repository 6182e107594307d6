"""The PSI fd failing for real: the watched cgroup is removed under the daemon, which must survive,
say so, and re-arm once the cgroup is back."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import needs_root

V2 = Path("/sys/fs/cgroup/unified")
pytestmark = [needs_root, pytest.mark.skipif(not (V2 / "cgroup.procs").exists(), reason="no cgroup v2 at " + str(V2))]


def _wait_for(p: subprocess.Popen[str], lines: list[str], event: str, timeout: float) -> dict[str, object]:
    assert p.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") == event:
            return ev  # type: ignore[no-any-return]
    raise AssertionError(f"no {event} within {timeout} s:\n{''.join(lines[-20:])}")


def test_cgroup_removed_and_recreated(tmp_path: Path) -> None:
    cg = V2 / f"lmkd-py-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    p = subprocess.Popen(
        [sys.executable, "-m", "lmkd_py.cli", "--dry-run", "--cgroup", str(cg), "--records", str(tmp_path / "r.jsonl"),
         "--tracing", "off", "--log-format", "json", "--duration", "60"],
        stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    try:
        _wait_for(p, lines, "daemon.ready", 20)
        cg.rmdir()
        _wait_for(p, lines, "psi.source_lost", 10)
        failed = _wait_for(p, lines, "psi.reopen_failed", 10)
        assert str(cg) in str(failed["reason"])
        time.sleep(1.5)
        assert p.poll() is None, "the daemon died with its cgroup"
        cg.mkdir()
        _wait_for(p, lines, "psi.reopened", 10)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 0
        assert "loop.error" not in "".join(lines) + err
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        if cg.exists():
            cg.rmdir()
