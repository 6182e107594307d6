"""The status file: when it is rewritten, how it is written, how a reader tells a running daemon from a
stale file, and that text processes chose cannot drive the reader's terminal."""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import structlog

from lmkd_py.records import Provenance
from lmkd_py.status import (
    STATUS_NAME,
    StatusFile,
    StatusUnavailable,
    claim,
    cmd_status,
    format_status,
    read_status,
    start_time_ticks,
)
from tests.unit.test_daemon_loop import MEDIUM, ev, make


class Clock:
    def __init__(self) -> None:
        self.t = 10**12

    def __call__(self) -> int:
        return self.t


def test_written_whole_0644_and_only_when_changed_and_due(tmp_path: Path) -> None:
    clock = Clock()
    sf = StatusFile(tmp_path, min_interval_ns=5_000_000_000, clock=clock)
    old_umask = os.umask(0o077)  # the unit's UMask=0077
    try:
        assert sf.update({"mode": "kill", "n": 1})
    finally:
        os.umask(old_umask)
    path = tmp_path / STATUS_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    body = json.loads(path.read_text())
    assert body["mode"] == "kill" and body["pid"] == os.getpid()
    assert body["start_time_ticks"] == start_time_ticks(os.getpid())
    clock.t += 1_000_000_000
    assert not sf.update({"mode": "kill", "n": 2})  # not due yet
    assert sf.update({"mode": "kill", "n": 2}, force=True)  # after a kill: at once
    clock.t += 6_000_000_000
    assert not sf.update({"mode": "kill", "n": 2})  # due, but nothing changed
    assert sf.update({"mode": "kill", "n": 3})
    assert sf.writes == 3
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_NAME]  # no temp file left
    sf.close()
    assert not path.exists()


def test_a_status_that_cannot_be_written_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    sf = StatusFile(gone, log=structlog.get_logger())
    with structlog.testing.capture_logs() as logs:
        assert not sf.update({"a": 1})
        assert not sf.update({"a": 2}, force=True)
    assert [e["event"] for e in logs] == ["status.write_failed"]


def test_one_writer_per_directory(tmp_path: Path) -> None:
    log = structlog.get_logger()
    first = claim(tmp_path / "run", log)
    assert first is not None
    with structlog.testing.capture_logs() as logs:
        assert claim(tmp_path / "run", log) is None
    assert logs[0]["event"] == "status.not_kept" and str(os.getpid()) in logs[0]["reason"]
    first.close()
    again = claim(tmp_path / "run", log)
    assert again is not None
    again.close()
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


def test_reader_tells_a_running_writer_from_a_stale_file(tmp_path: Path) -> None:
    sf = StatusFile(tmp_path)
    sf.update({"mode": "observe"})
    assert read_status(tmp_path)["running"] is True
    body = json.loads((tmp_path / STATUS_NAME).read_text())
    body["start_time_ticks"] += 1  # the pid now names another, younger process
    (tmp_path / STATUS_NAME).write_text(json.dumps(body))
    assert read_status(tmp_path)["running"] is False
    args = argparse.Namespace(runtime_dir=tmp_path, json=False)
    assert cmd_status(args) == 1


@pytest.mark.parametrize("content", [b"", b"[1]", b"{\"pid\": \"x\"}", b"{" * 100_000, b" " * (2 << 20)])
def test_reader_refuses_what_is_not_a_status(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATUS_NAME).write_bytes(content)
    with pytest.raises(StatusUnavailable, match=STATUS_NAME):
        read_status(tmp_path)


def test_no_status_file_exits_nonzero_naming_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_status(argparse.Namespace(runtime_dir=tmp_path, json=False)) == 1
    assert str(tmp_path / STATUS_NAME) in capsys.readouterr().err


def test_text_a_process_chose_is_escaped_and_bounded() -> None:
    state: dict[str, Any] = {
        "pid": 1, "running": True, "mode": "kill\x1b[2J", "sources": ["psi\n"],
        "candidates": [{"pid": 5, "comm": "\x1b]0;owned\x07", "oom_score_adj": 0, "size_kib": 1,
                        "reason": "x" * 10_000}],
        "last_kills": [{"pid": 5, "comm": "\u202eevil", "outcome": "killed", "reason": None, "mem_back_ms": None}],
        "signals": [{"name": "n", "value": "\x1b", "threshold": None}],
    }
    out = format_status(state)
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b]0;owned" in out and "…(+" in out
    assert all(len(line) < 400 for line in out.splitlines())


def test_daemon_writes_status_after_a_kill_and_on_its_cadence(tmp_path: Path) -> None:
    d, (clock, src, _table, killer, _sink) = make()
    killer.provenance = Provenance(lmkd_py_version="9.9", config_hash="abc")
    proc = type("P", (), {"free_and_total_kib": staticmethod(lambda: (500, 1000))})()
    d.table.proc = proc  # type: ignore[attr-defined]
    d.status = StatusFile(tmp_path, clock=clock)
    d.iterate(0)  # the first turn writes at once
    first = read_status(tmp_path)
    assert first["mode"] == "kill" and first["sources"] == ["fake"] and first["last_kills"] == []
    assert [c["pid"] for c in first["candidates"]] == [11, 10, 12]  # oom_score_adj first, then size
    floor = next(s for s in first["signals"] if s["name"] == "free memory (floor)")
    assert (floor["value"], floor["threshold"]) == (500, 50)
    src.script.append([ev(MEDIUM, clock)])
    d.iterate(0)  # a kill: written at once, though the cadence is not due
    kills = read_status(tmp_path)["last_kills"]
    assert [(k["pid"], k["outcome"]) for k in kills] == [(11, "killed")]
    d.close()
    assert not (tmp_path / STATUS_NAME).exists()
