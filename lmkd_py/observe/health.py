"""What observe mode tells its supervisor and ``lmkd-py status``: its state for the status file, and the
wait for a usable tracefs when it runs as a service.

Observe has nothing to watch without tracefs. Run by hand (``lmkd-py observe``) it says why and exits 1.
As a service (``mode = "observe"``, under a unit with ``Restart=always``) an exit would only restart it
every few seconds, forever, printing the same error: so it reports READY with a STATUS naming the reason,
keeps pinging the watchdog, keeps its status file saying ``degraded``, and tries again every
``TRACEFS_RETRY_NS`` (an operator who mounts tracefs, or fixes $LMKD_PY_TRACEFS and restarts, is heard).
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmkd_py.observe.trace import ObserveTrace
from lmkd_py.records import KillRecord
from lmkd_py.sdnotify import Notifier
from lmkd_py.status import StatusFile
from lmkd_py.tracing import TracingUnavailable, find_tracefs

if TYPE_CHECKING:
    from lmkd_py.observe.loop import Observer

TRACEFS_RETRY_NS = 30_000_000_000


@dataclass(frozen=True)
class Opened:
    """What ``open_trace`` got: the trace, or the reason there is none (``stopped``: a stop or the
    deadline came while waiting, which is a clean end, not a failure)."""

    trace: ObserveTrace | None
    reason: str | None = None
    stopped: bool = False


def kill_summary(record: KillRecord) -> dict[str, Any]:
    """One observed kill as ``lmkd-py status`` lists it."""
    k = record.killer
    back = record.kill_to_mem_recovered_ns
    return {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": record.victim.pid, "comm": record.victim.comm,
            "outcome": record.outcome.value,
            "reason": f"killed by {k.kind} pid {k.pid} ({k.comm})" if k is not None else "killer unknown",
            "mem_back_ms": round(back / 1e6, 3) if back is not None else None}


def observe_state(obs: Observer, *, scope: str | None) -> dict[str, Any]:
    """Observe mode's status: its sources (the tracefs instances, the proc connector) and the last kills."""
    trace = obs.trace
    sources = [f"tracefs {trace.signal.path}: {', '.join(sorted(trace.enabled))}"]
    sources.append("proc connector" if obs.listener is not None else "proc connector unavailable")
    if scope is not None:
        sources.append(f"scope: cgroup {scope}")
    return {"mode": "observe", "version": obs.provenance.lmkd_py_version, "config_hash": obs.provenance.config_hash,
            "sources": sources, "signals": [], "candidates": [], "last_kills": list(obs.last_kills),
            "stats": {"written": obs.written, "dropped": obs.dropped, "pending": len(obs.tracker.pending),
                      "kills_seen": obs.kills_seen}}


def waiting_state(reason: str, config_hash: str | None, version: str | None) -> dict[str, Any]:
    return {"mode": "observe", "version": version, "config_hash": config_hash, "sources": [],
            "degraded": f"waiting for tracefs: {reason}", "signals": [], "candidates": [], "last_kills": []}


def open_trace(
    tracefs_root: Path | None,
    log: Any,
    *,
    mrelease: bool,
    retry_ns: int | None,
    stop: Callable[[], bool],
    deadline_ns: int | None,
    wake_fd: int | None,
    notifier: Notifier | None,
    on_wait: Callable[[str], None] | None = None,
) -> Opened:
    """The observe trace. ``retry_ns`` None: one try. Otherwise wait and retry every ``retry_ns``
    (module docstring); ``on_wait(reason)`` is called once per failed try (the status file)."""
    announced = False
    while True:
        try:
            return Opened(ObserveTrace(find_tracefs(tracefs_root, log), log, mrelease=mrelease))
        except TracingUnavailable as exc:
            reason = exc.reason
        if retry_ns is None:
            return Opened(None, reason)
        if not announced:
            log.error("observe.waiting_for_tracefs", reason=reason, retry_s=retry_ns / 1e9)
            if notifier is not None:
                notifier.ready(f"waiting for tracefs: {reason}"[:200])
            announced = True
        if on_wait is not None:
            on_wait(reason)
        if not _pause(retry_ns, stop, deadline_ns, wake_fd, notifier):
            return Opened(None, reason, stopped=True)


def _pause(
    pause_ns: int, stop: Callable[[], bool], deadline_ns: int | None, wake_fd: int | None, notifier: Notifier | None
) -> bool:
    """Wait ``pause_ns``, pinging the watchdog; False when a stop or the deadline came first."""
    end = time.monotonic_ns() + pause_ns
    if deadline_ns is not None:
        end = min(end, deadline_ns)
    poller = select.poll()
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    while not stop():
        now = time.monotonic_ns()
        if deadline_ns is not None and now >= deadline_ns:
            return False
        if now >= end:
            return True
        timeout_ns = end - now
        if notifier is not None and notifier.watchdog_interval_ns:
            timeout_ns = min(timeout_ns, notifier.watchdog_interval_ns)
        if poller.poll(timeout_ns // 1_000_000 + 1) and wake_fd is not None:
            with contextlib.suppress(OSError):
                os.read(wake_fd, 4096)
        if notifier is not None and notifier.watchdog_interval_ns:
            notifier.watchdog()
    return False


def keep_status(status: StatusFile | None, obs: Observer, scope: str | None, kills_before: int) -> int:
    """After a turn of the loop: rewrite the status at once when a kill was seen, else when due.
    Returns the count of kills seen, for the next call."""
    if status is not None:
        seen = obs.kills_seen != kills_before
        if seen or status.due():
            status.update(observe_state(obs, scope=scope), force=seen)
    return obs.kills_seen
