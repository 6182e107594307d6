"""A real kill by the daemon reaches journald's native protocol (issue 14 item 6), and its log lines
carry their syslog priorities.

The daemon runs as under systemd: stderr is a file named by ``$JOURNAL_STREAM`` (device and inode), and
``$LMKD_PY_JOURNAL_SOCKET`` points it at a socket this test binds instead of /run/systemd/journal/socket.
The kill: a process of the test grows anonymous memory in a v1 memcg with a 256 MiB limit and no swap
(the headroom episode of test_signals_real); the daemon, scoped to the test's v2 cgroup, kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lmkd_py.journal import PRIORITIES
from lmkd_py.stress import PressureCgroup
from tests.conftest import needs_root
from tests.integration.test_signals_real import Grower, _missing, _wait
from tests.journald import JournalReceiver

pytestmark = [needs_root, pytest.mark.slow]


def test_a_real_kill_is_a_structured_journal_entry_and_the_lines_carry_priorities(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    records = tmp_path / "records.jsonl"
    stderr = tmp_path / "stderr.log"
    receiver = JournalReceiver(tmp_path / "journal.sock")
    with PressureCgroup(f"lmkd-test-journal-{uuid.uuid4().hex[:8]}", limit_mib=256) as cg, \
            stderr.open("wb") as err:
        (cg.v1_path / "memory.swappiness").write_text("0")
        grower = Grower(step_mib=3, period_ms=20, cap_mib=2048)  # 150 MiB/s, far past the limit
        daemon: subprocess.Popen[bytes] | None = None
        try:
            cg.add(grower.pid)
            st = os.fstat(err.fileno())
            env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
                       LMKD_PY_JOURNAL_SOCKET=str(receiver.path))
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lmkd_py.cli", "--cgroup", str(cg.v2_path), "--records", str(records),
                 "--duration", "60", "--tracing", "off"],
                stdout=subprocess.DEVNULL, stderr=err, env=env)
            assert _wait(lambda: "daemon.ready" in stderr.read_text(), 30), stderr.read_text()
            grower.go()
            assert _wait(lambda: grower.p.poll() is not None, 20), "the grower is still alive after 20 s"
            assert _wait(lambda: records.exists() and records.read_text().strip(), 5), stderr.read_text()
            entry = receiver.recv(10)
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
            grower.kill()
            receiver.close()
    first = json.loads(records.read_text().splitlines()[0])
    assert first["outcome"] == "killed" and first["victim"]["pid"] == grower.pid, first
    assert grower.p.returncode == -signal.SIGKILL
    # The entry says what the record says, field by field.
    assert entry["LMKD_RECORD_ID"] == first["record_id"] and entry["LMKD_OUTCOME"] == "killed"
    assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "lmkd-py"
    assert entry["LMKD_VICTIM_PID"] == str(grower.pid) and entry["LMKD_VICTIM_COMM"] == first["victim"]["comm"]
    assert entry["LMKD_REASON"] == first["pressure"]["kill_reason"] == "cgroup_headroom"
    assert entry["LMKD_KILL_TO_EXIT_MS"] == f"{first['kill_to_exit_ns'] / 1e6:.3f}"
    assert entry["LMKD_MRELEASE"] == first["mrelease"]["status"]
    rss_mib = round(first["victim"]["rss_kib"] / 1024)
    assert entry["MESSAGE"].startswith(
        f"killed {first['victim']['comm']} (pid {grower.pid}, {rss_mib} MiB) for cgroup_headroom: exit after ")
    # Every line of the daemon's stderr starts with the priority of its level.
    lines = stderr.read_text().splitlines()
    parsed = [(line[:3], json.loads(line[3:])) for line in lines]
    assert all(prefix == f"<{PRIORITIES[e['level']]}>" for prefix, e in parsed), lines
    assert any(e["event"] == "daemon.start" for _, e in parsed)
