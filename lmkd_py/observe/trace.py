"""The tracefs side of observe mode: two private instances, read without ever turning them off.

Observe mode traces every SIGKILL on the system for as long as it runs, so the cost of the events that
fire for *every* process matters more than anything else. The events are split by rate:

- ``lmkd-py-<pid>-observe`` (the *signal* instance) holds the rare events: ``signal_generate``
  narrowed in the kernel by the filter ``sig == 9``, the OOM killer's ``mark_victim`` and the
  oom_reaper's ``wake_reaper`` / ``start|finish|skip_task_reaping``, and
  ``sys_enter|exit_process_mrelease`` (optional: ``MRELEASE_EVENTS`` says what they cost). Its
  ``buffer_percent`` is 0, so a ``poll()`` on its per-CPU ``trace_pipe_raw`` wakes the loop as soon as
  one of them fires (~25 µs measured here): the loop must read the killer's ``/proc/TID/fdinfo/FD``
  while the pidfd is still open.
- ``lmkd-py-<pid>-observe-exit`` (the *exit* instance) is a flight recorder of
  ``sched_process_exit`` and ``exit_mmap``, which fire for every exiting process (``exit_mmap`` also
  for every exec), and of ``signal_deliver`` (``sig == 9``; ``EXIT_FILTERS`` says why it is here).
  They cannot be narrowed in the kernel: the victim is known only after the kill, and a filter set
  then would come too late for a fast exit (and replacing a filter costs a ~20 ms grace period, see
  ``lmkd_py.tracing``). So they are recorded (a ring-buffer write each) and *not decoded* while no
  kill is pending: the loop reads the raw sub-buffers once a second, keeps the last few whose events
  may still matter (``keep_pages``) and drops the rest unread. Only when a SIGKILL is pending are the
  kept pages decoded. benchmarks/observe_overhead.py measures what this costs a fork/exit-heavy load.

Both instances are ``raw.RawInstance``: ``trace_clock`` = ``mono`` (timestamps comparable with
``time.monotonic_ns()``), removed by ``close()``, which atexit also runs; a crashed run's instances are
removed by the next run's ``remove_stale_instances`` (their names carry the dead pid).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmkd_py.tracing import (
    INSTANCE_PREFIX,
    ProcConnector,
    ProcExit,
    RawInstance,
    RawPage,
    TraceEvent,
    TracingUnavailable,
    remove_stale_instances,
)

SIGNAL_EVENTS = (
    ("signal", "signal_generate"),
    ("oom", "mark_victim"),
    ("oom", "wake_reaper"),
    ("oom", "start_task_reaping"),
    ("oom", "finish_task_reaping"),
    ("oom", "skip_task_reaping"),
)
# The one system-wide cost that is not per exit: enabling any syscall event makes *every* syscall of every
# task take the kernel's syscall-tracing slow path (measured here: +85 ns per getppid()). Optional for
# that reason (``mrelease=False``); without it process_mrelease calls are not seen.
MRELEASE_EVENTS = (("syscalls", "sys_enter_process_mrelease"), ("syscalls", "sys_exit_process_mrelease"))
EXIT_EVENTS = (("signal", "signal_deliver"), ("sched", "sched_process_exit"), ("mmap", "exit_mmap"))
# Without it every signal on the system would wake the loop.
SIGNAL_FILTERS = {"signal/signal_generate": "sig == 9"}
# signal_deliver of SIGKILL also fires for the other threads of every multi-threaded process that calls
# exit_group (the kernel ends them with an internal SIGKILL, with no signal_generate): frequent enough on a
# busy system to stay out of the waking instance.
EXIT_FILTERS = {"signal/signal_deliver": "sig == 9"}
REQUIRED = frozenset({"signal:signal_generate"})


def keep_pages(pages: Sequence[RawPage], horizon_ns: int) -> list[RawPage]:
    """The sub-buffers of one CPU (in read order) that may hold an event at or after ``horizon_ns``.

    A sub-buffer's events lie between its own start timestamp and the next one's, so every page whose
    successor starts before the horizon is dropped; the last page is always kept (its end is unknown).
    """
    kept = []
    for i, page in enumerate(pages):
        if i + 1 < len(pages) and pages[i + 1][0] < horizon_ns:
            continue
        kept.append(page)
    return kept


class ObserveTrace:
    """The signal instance and the exit flight recorder (module docstring). Raises TracingUnavailable."""

    def __init__(
        self,
        root: Path,
        log: Any,
        *,
        owner_pid: int | None = None,
        mrelease: bool = True,
        signal_kib_per_cpu: int = 256,
        exit_kib_per_cpu: int = 512,
    ) -> None:
        self.log = log
        pid = owner_pid if owner_pid is not None else os.getpid()
        remove_stale_instances(root, log)
        events = SIGNAL_EVENTS + (MRELEASE_EVENTS if mrelease else ())
        self.signal = RawInstance(
            root, f"{INSTANCE_PREFIX}{pid}-observe", events, filters=SIGNAL_FILTERS,
            buffer_kib_per_cpu=signal_kib_per_cpu, overwrite=False, wake_on_any=True,
        )
        self.exits: RawInstance | None = None
        atexit.register(self.close)
        if not self.signal.enabled >= REQUIRED:
            self.close()
            raise TracingUnavailable(f"trace event(s) {sorted(REQUIRED - self.signal.enabled)} missing")
        try:
            # Overwrite: when the loop falls behind, the oldest exits go, not the newest (the kill's).
            self.exits = RawInstance(
                root, f"{INSTANCE_PREFIX}{pid}-observe-exit", EXIT_EVENTS, filters=EXIT_FILTERS,
                buffer_kib_per_cpu=exit_kib_per_cpu, overwrite=True, wake_on_any=False,
            )
        except TracingUnavailable as exc:
            self.signal.notes.append(f"exit events not traced: {exc.reason}")
        if not mrelease:
            self.signal.notes.append("process_mrelease not traced (turned off: syscall tracing slows every syscall)")
        self.enabled = self.signal.enabled | (self.exits.enabled if self.exits else frozenset())
        self.mrelease_traced = {f"{s}:{e}" for s, e in MRELEASE_EVENTS} <= self.enabled
        self.notes = [*self.signal.notes, *(self.exits.notes if self.exits else [])]
        self._kept: dict[int, list[RawPage]] = {}

    def read_signal_events(self, notes: list[str]) -> list[TraceEvent]:
        return self.signal.read_events(notes)

    def read_exit_events(self, horizon_ns: int, decode: bool, notes: list[str]) -> list[TraceEvent]:
        """Exit events at or after ``horizon_ns`` when ``decode``; otherwise nothing is decoded and only
        the pages that may still matter are kept for a later call (module docstring)."""
        if self.exits is None:
            return []
        for cpu, pages in self.exits.read_raw().items():
            self._kept.setdefault(cpu, []).extend(pages)
        for cpu in list(self._kept):
            self._kept[cpu] = keep_pages(self._kept[cpu], horizon_ns)
        # Counted on every call, so that a loss while nothing was pending is not blamed on a kill.
        self.exits.lost_events(notes if decode else [])
        if not decode:
            return []
        events: list[TraceEvent] = []
        for cpu, pages in self._kept.items():
            events.extend(e for e in self.exits.decode(cpu, pages, notes) if e.ts_ns >= horizon_ns)
        self._kept.clear()
        return events

    def lost_signal_events(self, notes: list[str]) -> None:
        self.signal.lost_events(notes)

    def close(self) -> None:
        """Remove both instances (idempotent); a failure is logged and left for the next run's sweep."""
        for inst in (self.signal, self.exits):
            why = inst.close() if inst is not None else None
            if why is not None:
                self.log.warning("observe.instance_left", reason=why)
        atexit.unregister(self.close)


class ExitListener(ProcConnector):
    """The proc connector, listened to only while a kill is pending (an idle listener would be woken
    by every exit on the system). Adds the one thing the loop needs to ``ProcConnector``."""

    def drain(self) -> list[ProcExit]:
        """Exit events received so far (any process). Raises OSError on socket trouble."""
        return self._drain()
