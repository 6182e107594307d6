"""lmkd-py as a service, run as a user would: a real NOTIFY_SOCKET the test owns, watchdog pings,
SIGHUP with a good and a bad config, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

GOOD = """
dry_run = true
[kill]
min_interval_ms = {interval}
"""


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path
        self.messages: list[str] = []

    def expect(self, needle: str, timeout: float) -> list[str]:
        """Messages received until one contains ``needle`` (fails after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        got: list[str] = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            got.append(msg)
            self.messages.append(msg)
            if needle in msg:
                return got
        raise AssertionError(f"no {needle!r} within {timeout} s; got {got}")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], NotifySocket, Path]]:
    sock = NotifySocket(tmp_path / "notify")
    cfg = tmp_path / "lmkd.toml"
    cfg.write_text(GOOD.format(interval=1000))
    env = dict(os.environ, NOTIFY_SOCKET=str(sock.path), WATCHDOG_USEC="1000000",
               LMKD_PY_RUNTIME_DIR=str(tmp_path / "run"))  # its status file stays in the test's directory
    p = subprocess.Popen(
        [sys.executable, "-m", "lmkd_py.cli", "--config", str(cfg), "--records", str(tmp_path / "r.jsonl"),
         "--log-format", "json", "--tracing", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        yield p, sock, cfg
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
        sock.sock.close()


def _events(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_ready_watchdog_reload_and_stop(service: tuple[subprocess.Popen[str], NotifySocket, Path]) -> None:
    p, sock, cfg = service
    sock.expect("READY=1", timeout=20)
    # WATCHDOG_USEC=1 s: the loop must ping well within it, while idle.
    t0 = time.monotonic()
    sock.expect("WATCHDOG=1", timeout=2)
    sock.expect("WATCHDOG=1", timeout=2)
    assert time.monotonic() - t0 < 2.5

    cfg.write_text(GOOD.format(interval=4321))
    p.send_signal(signal.SIGHUP)
    got = sock.expect("READY=1", timeout=10)
    assert any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in got), got

    cfg.write_text(GOOD.format(interval=1000) + "\n[kill]\nbogus = 1\n")  # duplicate table: invalid TOML
    p.send_signal(signal.SIGHUP)
    sock.expect("READY=1", timeout=10)
    cfg.write_text("[kill]\nexit_timeout_ms = -1\n")
    p.send_signal(signal.SIGHUP)
    sock.expect("READY=1", timeout=10)
    sock.expect("WATCHDOG=1", timeout=2)  # still alive and looping after two bad reloads

    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err[-2000:]
    assert any("STOPPING=1" in m for m in sock.messages) or _drain_has(sock, "STOPPING=1")
    ev = _events(err)
    reloaded = [e for e in ev if e.get("event") == "config.reloaded"]
    rejected = [e for e in ev if e.get("event") == "config.reload_rejected"]
    assert len(reloaded) == 1
    assert len(rejected) == 2
    assert "not valid TOML" in str(rejected[0]["reason"])
    assert "kill.exit_timeout_ms" in str(rejected[1]["reason"])
    assert rejected[0]["kept"] == reloaded[0]["config_hash"]  # the good reloaded config stayed in force


def _drain_has(sock: NotifySocket, needle: str) -> bool:
    try:
        sock.expect(needle, timeout=2)
    except AssertionError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="observe mode needs root (tracefs instances)")
def test_observe_mode_from_the_config_speaks_sd_notify(tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "notify")
    cfg = tmp_path / "observe.toml"
    cfg.write_text(f'mode = "observe"\n[records]\npath = "{tmp_path / "obs.jsonl"}"\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(sock.path), WATCHDOG_USEC="1000000",
               LMKD_PY_RUNTIME_DIR=str(tmp_path / "run"))
    p = subprocess.Popen([sys.executable, "-m", "lmkd_py.cli", "--config", str(cfg), "--log-format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        sock.expect("READY=1", timeout=20)
        sock.expect("WATCHDOG=1", timeout=2)
        sock.expect("WATCHDOG=1", timeout=2)
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err[-2000:]
        assert "observe.ready" in err and "daemon.ready" not in err
        if not any("STOPPING=1" in m for m in sock.messages):
            sock.expect("STOPPING=1", timeout=2)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        sock.sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="running lmkd-py status as nobody needs root to switch users")
def test_status_of_a_dry_run_daemon_read_by_an_unprivileged_user(
    nobody_python: tuple[list[str], dict[str, str]],
) -> None:
    """The daemon keeps its status file; `lmkd-py status` run as nobody shows it, and says so (exit 1)
    once the daemon is gone."""
    from tests.conftest import NOBODY

    # A directory nobody can reach (pytest's tmp_path is under root's 0700 /tmp/pytest-of-root).
    base = Path(tempfile.mkdtemp(prefix="lmkd-test-field-status-"))
    try:
        os.chmod(base, 0o755)
        run = base / "run"
        sock = NotifySocket(base / "notify")
        env = dict(os.environ, NOTIFY_SOCKET=str(sock.path), LMKD_PY_RUNTIME_DIR=str(run))
        p = subprocess.Popen(
            [sys.executable, "-m", "lmkd_py.cli", "--dry-run", "--records", str(base / "r.jsonl"),
             "--log-format", "json", "--tracing", "off"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        try:
            sock.expect("READY=1", timeout=20)
            argv, nobody_env = nobody_python
            as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": [], "env": nobody_env}

            def status(*extra: str) -> subprocess.CompletedProcess[str]:
                # The status is written on the loop's first turn, right after READY=1: wait for the file.
                while not (run / "status.json").exists() and p.poll() is None:
                    time.sleep(0.05)
                return subprocess.run([*argv, "status", "--runtime-dir", str(run), *extra], capture_output=True,
                                      text=True, timeout=60, **as_nobody)  # type: ignore[call-overload]

            text = status()
            assert text.returncode == 0, text.stderr
            assert f"mode dry-run, pid {p.pid}" in text.stdout
            assert "sources: PSI" in text.stdout and "top candidates:" in text.stdout
            raw = status("--json")
            assert raw.returncode == 0, raw.stderr
            state = json.loads(raw.stdout)
            assert state["running"] is True and state["pid"] == p.pid and state["mode"] == "dry-run"
            assert state["candidates"] and all("reason" in c for c in state["candidates"])
            p.send_signal(signal.SIGKILL)  # a crash: the file stays behind, stale
            p.wait(timeout=30)
            stale = subprocess.run([*argv, "status", "--runtime-dir", str(run)], capture_output=True, text=True,
                                   timeout=60, **as_nobody)  # type: ignore[call-overload]
            assert stale.returncode == 1 and "NOT RUNNING" in stale.stdout and "is gone" in stale.stderr
        finally:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=30)
            sock.sock.close()
    finally:
        shutil.rmtree(base)
