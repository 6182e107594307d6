"""Observe as a service without tracefs: it waits and retries (READY with the reason, watchdog pings,
a degraded status) instead of exiting into a restart loop; by hand it fails at once with the reason."""

from __future__ import annotations

from pathlib import Path

import structlog

from lmkd_py.observe.health import open_trace, waiting_state
from lmkd_py.status import StatusFile, read_status


class Notes:
    watchdog_interval_ns = 1_000_000  # 1 ms: the wait pings between its retries

    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status: str | None = None) -> None:
        self.sent.append(f"READY {status}")

    def status(self, text: str) -> None:
        self.sent.append(f"STATUS {text}")

    def watchdog(self) -> None:
        self.sent.append("WATCHDOG")

    def reloading(self) -> None:
        self.sent.append("RELOADING")

    def stopping(self) -> None:
        self.sent.append("STOPPING")


def test_by_hand_no_tracefs_is_one_try_with_the_reason(tmp_path: Path) -> None:
    opened = open_trace(tmp_path, structlog.get_logger(), mrelease=False, retry_ns=None, stop=lambda: False,
                        deadline_ns=None, wake_fd=None, notifier=None)
    assert opened.trace is None and not opened.stopped
    assert opened.reason is not None and "not a tracefs mount" in opened.reason


def test_as_a_service_it_waits_retries_and_stays_healthy(tmp_path: Path) -> None:
    notes = Notes()
    tries: list[str] = []
    (tmp_path / "run-status").mkdir()
    status = StatusFile(tmp_path / "run-status")

    def on_wait(why: str) -> None:
        tries.append(why)
        status.update(waiting_state(why, "hash", "1.0"), force=True)

    with structlog.testing.capture_logs() as logs:
        opened = open_trace(tmp_path, structlog.get_logger(), mrelease=False, retry_ns=5_000_000,
                            stop=lambda: len(tries) >= 3, deadline_ns=None, wake_fd=None, notifier=notes,
                            on_wait=on_wait)
    assert opened.trace is None and opened.stopped  # a stop while waiting is a clean end
    assert len(tries) == 3
    assert [e["event"] for e in logs] == ["observe.waiting_for_tracefs"]  # said once, not per retry
    assert notes.sent[0].startswith("READY waiting for tracefs:") and "not a tracefs mount" in notes.sent[0]
    assert "WATCHDOG" in notes.sent
    state = read_status(tmp_path / "run-status")
    assert state["mode"] == "observe" and "waiting for tracefs" in state["degraded"]
