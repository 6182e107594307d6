"""The ``<N>`` syslog priority prefixes, as systemd would see them: lmkd-py in a subprocess whose stderr
is a file, with ``$JOURNAL_STREAM`` naming that file's device and inode (what systemd sets when stderr is
its journal stream) -- and naming something else, or nothing, when the prefixes must not appear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lmkd_py.journal import PRIORITIES

LEVELS = """
import structlog
from lmkd_py import log
log.configure("json", "debug")
l = structlog.get_logger()
l.debug("d"); l.info("i"); l.warning("w"); l.error("e"); l.critical("c")
"""

Stream = Callable[[os.stat_result], str | None]


def same_file(st: os.stat_result) -> str | None:
    return f"{st.st_dev}:{st.st_ino}"


def other_inode(st: os.stat_result) -> str | None:  # inherited from a parent, stderr redirected
    return f"{st.st_dev}:{st.st_ino + 1}"


def unset(st: os.stat_result) -> str | None:
    return None


def run(tmp_path: Path, stream: Stream, argv: list[str]) -> list[str]:
    """Run ``argv`` with stderr to a file and $JOURNAL_STREAM from that file's stat; its stderr lines."""
    err = tmp_path / "stderr.log"
    with err.open("wb") as f:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        value = stream(os.fstat(f.fileno()))
        if value is not None:
            env["JOURNAL_STREAM"] = value
        env["LMKD_PY_JOURNAL_SOCKET"] = ""  # this test is about the stream; no entry to the host's journal
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f, env=env,
                              timeout=60, cwd=tmp_path)
    lines = err.read_text().splitlines()
    assert proc.returncode == 0, lines
    return lines


def split(line: str) -> tuple[int | None, dict[str, object]]:
    """(priority prefix or None, the JSON object after it)."""
    if line.startswith("<") and line[2:3] == ">":
        return int(line[1]), json.loads(line[3:])
    return None, json.loads(line)


def test_each_level_gets_its_priority_when_stderr_is_the_journal(tmp_path: Path) -> None:
    lines = run(tmp_path, same_file, [sys.executable, "-c", LEVELS])
    got = [split(line) for line in lines]
    assert [p for p, _ in got] == [7, 6, 4, 3, 2]
    assert [e["event"] for _, e in got] == ["d", "i", "w", "e", "c"]  # the JSON itself is unchanged


@pytest.mark.parametrize("stream", [other_inode, unset], ids=["other-inode", "unset"])
def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path, stream: Stream) -> None:
    lines = run(tmp_path, stream, [sys.executable, "-c", LEVELS])
    assert len(lines) == 5 and all(split(line)[0] is None for line in lines), lines


def test_the_daemon_lines_carry_their_level_as_priority(tmp_path: Path) -> None:
    """The real daemon (dry run, one second): every line it logs starts with the priority of its level."""
    exe = Path(sys.prefix) / "bin" / "lmkd-py"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "lmkd_py.cli"]
    argv = [*base, "--dry-run", "--duration", "1", "--records", str(tmp_path / "kills.jsonl"),
            "--log-level", "debug"]  # --log-format auto: stderr is a file, so JSON
    got = [split(line) for line in run(tmp_path, same_file, argv)]
    assert got and all(p == PRIORITIES[str(e["level"])] for p, e in got), got
    assert any(e["event"] == "daemon.start" and p == 6 for p, e in got)
    assert any(p == 7 for p, _ in got)
    plain = [split(line) for line in run(tmp_path, other_inode, argv)]
    assert plain and all(p is None for p, _ in plain)
