"""Self-protection at start: lock our memory, lower our own oom_score_adj, optionally SCHED_FIFO.

A low-memory killer that is swapped out, OOM-killed or starved under the very pressure it exists for is
worse than none. Each step is tried, logged with its result, and never fatal: on this project's machines
root lacks CAP_SYS_RESOURCE, so a negative oom_score_adj is refused (EACCES) and that must not stop us.
"""

from __future__ import annotations

import gc
import os
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

from lmkd_py.config import SelfProtectionConfig
from lmkd_py.procfs import CAP_IPC_LOCK, self_has_capability
from lmkd_py.syscalls import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, Syscalls, prepare_heap_for_locking

log = structlog.get_logger("lmkd_py.protect")

# Stack reserved for each thread the daemon starts later (the reaper, tracefs' janitor): they run short
# Python functions (a few syscalls, no deep recursion). glibc's default of 8 MiB (RLIMIT_STACK) is
# reserved whole and, under MCL_FUTURE, counted as locked.
THREAD_STACK_BYTES = 512 * 1024


@dataclass(frozen=True)
class StepResult:
    step: str
    ok: bool
    detail: str


def lock_memory(syscalls: Syscalls) -> StepResult:
    """mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT). ONFAULT: lock pages as they are touched instead of
    faulting in every mapping now, which keeps the resident set small.

    Skipped without CAP_IPC_LOCK when RLIMIT_MEMLOCK is finite: MCL_FUTURE would make every later
    allocation past that limit fail, and the daemon (Python) allocates as it runs."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if not self_has_capability(CAP_IPC_LOCK) and soft != resource.RLIM_INFINITY:
        return StepResult("mlockall", False, f"skipped: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is {soft} bytes")
    # Lock only what the daemon keeps: start-up's garbage collected and its free heap pages returned
    # first, later threads' stacks and malloc arenas small (issue 13).
    gc.collect()
    threading.stack_size(THREAD_STACK_BYTES)
    one_arena = prepare_heap_for_locking()
    try:
        syscalls.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
    except OSError as exc:
        return StepResult("mlockall", False, f"failed: {exc.strerror}")
    arenas = "" if one_arena else "; malloc arenas not limited (not glibc)"
    return StepResult("mlockall", True, f"locked (current, future, on fault){arenas}")


def set_oom_score_adj(value: int, proc_self: Path = Path("/proc/self")) -> StepResult:
    try:
        (proc_self / "oom_score_adj").write_text(str(value))
    except OSError as exc:
        hint = " (lowering it needs CAP_SYS_RESOURCE)" if value < 0 else ""
        return StepResult("oom_score_adj", False, f"{value} refused: {exc.strerror}{hint}")
    return StepResult("oom_score_adj", True, f"set to {value}")


def set_fifo(priority: int) -> StepResult:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except OSError as exc:
        return StepResult("sched_fifo", False, f"priority {priority} refused: {exc.strerror} (needs CAP_SYS_NICE)")
    return StepResult("sched_fifo", True, f"SCHED_FIFO priority {priority}")


def protect_self(cfg: SelfProtectionConfig, syscalls: Syscalls) -> list[StepResult]:
    """Apply every configured step; log each result (info when done, warning when not)."""
    results = []
    if cfg.mlockall:
        results.append(lock_memory(syscalls))
    if cfg.oom_score_adj is not None:
        results.append(set_oom_score_adj(cfg.oom_score_adj))
    if cfg.sched_fifo_priority is not None:
        results.append(set_fifo(cfg.sched_fifo_priority))
    for r in results:
        (log.info if r.ok else log.warning)("self_protect", step=r.step, ok=r.ok, detail=r.detail)
    return results
