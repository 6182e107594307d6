"""The daemon against a careless operator and a hostile config (issue 18 items 5, 6, 8), run as a user
runs it: ``python -m lmkd_py.cli`` in a subprocess. Each case must end in one clear line and an exit
code, never a traceback; a second killer must be refused, naming the first one's pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import needs_root
from tests.system.test_service import NotifySocket

V2 = Path("/sys/fs/cgroup/unified")


def run_cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmkd_py.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def no_traceback(p: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize(("content", "needle"), [
    (b"dry_run = true\n# caf\xe9\n", "not UTF-8"),
    (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    (b"a = 1\n" * 200_000, "at most"),
])
def test_bad_config_bytes_give_rc_2_naming_the_file(tmp_path: Path, content: bytes, needle: str) -> None:
    cfg = tmp_path / "hostile.toml"
    cfg.write_bytes(content)
    for args in (["--config", str(cfg), "--dry-run", "--duration", "1"], ["check-config", str(cfg)]):
        p = run_cli(args)
        no_traceback(p)
        assert p.returncode == 2 and needle in p.stderr and str(cfg) in p.stderr, p.stderr[-2000:]


def test_reload_of_a_non_utf8_file_is_rejected_and_ready_follows(tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "notify")
    cfg = tmp_path / "lmkd.toml"
    cfg.write_text("dry_run = true\n")
    env = dict(os.environ, NOTIFY_SOCKET=str(sock.path))
    p = subprocess.Popen([sys.executable, "-m", "lmkd_py.cli", "--config", str(cfg), "--records",
                          str(tmp_path / "r.jsonl"), "--log-format", "json", "--tracing", "off"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        sock.expect("READY=1", timeout=20)
        cfg.write_bytes(b"dry_run = true\n\xff\xfe\n")
        p.send_signal(signal.SIGHUP)
        got = sock.expect("READY=1", timeout=10)
        assert any("RELOADING=1" in m for m in got) and any("reload rejected" in m for m in got), got
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
        sock.sock.close()
    assert p.returncode == 0 and "Traceback" not in err
    assert "config.reload_rejected" in err and "not UTF-8" in err and "loop.error" not in err


@pytest.fixture
def empty_scope() -> Iterator[Path]:
    """A v2 cgroup with nothing in it: a real-mode daemon scoped to it can kill nothing."""
    if not (V2 / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy at /sys/fs/cgroup/unified")
    d = V2 / f"lmkd-py-test-hostile-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        d.rmdir()


@needs_root
def test_a_second_killer_is_refused_with_the_first_ones_pid(tmp_path: Path, empty_scope: Path) -> None:
    env = dict(os.environ, LMKD_PY_RUNTIME_DIR=str(tmp_path / "run"))
    args = [sys.executable, "-m", "lmkd_py.cli", "--cgroup", str(empty_scope), "--tracing", "off",
            "--log-format", "json", "--records"]
    first = subprocess.Popen([*args, str(tmp_path / "1.jsonl"), "--duration", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "run" / "lmkd-py.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        second = subprocess.run([*args, str(tmp_path / "2.jsonl"), "--duration", "5"], capture_output=True,
                                text=True, timeout=60, env=env)
        no_traceback(second)
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"another lmkd-py (pid {first.pid})" in second.stderr
        # A dry run decides but never kills: it may run beside a killer.
        dry = subprocess.run([*args, str(tmp_path / "3.jsonl"), "--dry-run", "--duration", "1"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert dry.returncode == 0, dry.stderr[-2000:]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0
    # The lock is the flock, not the file: once the first is gone a new one starts.
    again = subprocess.run([*args, str(tmp_path / "4.jsonl"), "--duration", "1"], capture_output=True, text=True,
                           timeout=60, env=env)
    assert again.returncode == 0, again.stderr[-2000:]


@needs_root
def test_tracing_on_without_tracefs_is_one_line_not_a_traceback(tmp_path: Path, empty_scope: Path) -> None:
    not_tracefs = tmp_path / "tracefs"
    not_tracefs.mkdir()
    env = dict(os.environ, LMKD_PY_RUNTIME_DIR=str(tmp_path / "run"), LMKD_PY_TRACEFS=str(not_tracefs))
    p = run_cli(["--cgroup", str(empty_scope), "--tracing", "on", "--records", str(tmp_path / "r.jsonl"),
                 "--duration", "1"], env=env)
    no_traceback(p)
    assert p.returncode == 1 and "tracing" in p.stderr and str(not_tracefs) in p.stderr, p.stderr[-2000:]


@needs_root
def test_an_unprivileged_killer_says_at_start_what_it_lacks(
    tmp_path: Path, empty_scope: Path, nobody_python: tuple[list[str], dict[str, str]]
) -> None:
    """Issue 18 item 8: without CAP_KILL (an ordinary user, not a dry run) the daemon says so at start,
    instead of first finding out at a kill."""
    import shutil
    import tempfile

    from tests.conftest import NOBODY

    home = Path(tempfile.mkdtemp(prefix="lmkd-py-nobody-", dir="/var/tmp"))  # reachable by nobody
    try:
        os.chown(home, NOBODY, NOBODY)
        prefix, env = nobody_python
        p = subprocess.run([*prefix, "--cgroup", str(empty_scope), "--records", str(home / "r.jsonl"),
                            "--tracing", "off", "--log-format", "json", "--duration", "1"], capture_output=True,
                           text=True, timeout=60, user=NOBODY, group=NOBODY, extra_groups=[], env=env, cwd=home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    no_traceback(p)
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"daemon.no_cap_kill"' in p.stderr and "CAP_KILL" in p.stderr


@needs_root
def test_the_daemon_refuses_an_unsafe_records_path_before_it_is_ready(tmp_path: Path, empty_scope: Path) -> None:
    """Issue 18 items 1 and 8: a records path in a directory someone else controls is refused at start
    (not at the first kill), naming the path; the symlink's target is untouched."""
    from tests.conftest import NOBODY

    os.chmod(tmp_path, 0o755)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    target = tmp_path / "precious"
    target.write_text("do not append\n")
    (theirs / "records.jsonl").symlink_to(target)
    env = dict(os.environ, LMKD_PY_RUNTIME_DIR=str(tmp_path / "run"))
    p = run_cli(["--cgroup", str(empty_scope), "--tracing", "off", "--records", str(theirs / "records.jsonl"),
                 "--duration", "1"], env=env)
    no_traceback(p)
    assert p.returncode == 1 and "cannot start" in p.stderr and str(theirs) in p.stderr, p.stderr[-2000:]
    assert target.read_text() == "do not append\n"
