"""What observe mode reads from /proc: the warm table of large processes, the facts read when a kill is
seen, the target of a killer's pidfd, and MemAvailable samples.

Sizes "as last seen before the kill": by the time observe reads a victim's /proc files the SIGKILL has
been sent and process_mrelease may already be freeing its memory, so its sizes come from a warm table
refreshed every few seconds (large processes only: ``stat`` of every process, the rest only for those
above the threshold) when the process there is the same one (pid and start time). Otherwise they are
read at once and a note says they were read after the kill. For the kernel OOM killer's victims the
record uses the sizes of ``mark_victim`` instead (exact, at the kill).
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from lmkd_py.observe.record import parse_pidfd_fdinfo
from lmkd_py.observe.track import ProcessFacts
from lmkd_py.procfs import PAGE_KIB, ProcFs, ProcParseError, cgroup_v2_path, subtree_pids
from lmkd_py.records import Victim

log = structlog.get_logger("lmkd_py.observe")
_GONE = (FileNotFoundError, ProcessLookupError, ProcParseError, PermissionError)


@dataclass(frozen=True)
class WarmEntry:
    victim: Victim
    tids: frozenset[int]
    read_ns: int


class WarmTable:
    """Processes with RSS at or above ``min_rss_kib`` (all processes of ``scope_dir``'s subtree when set),
    described as ``Victim``s with their sizes as of ``refresh()``."""

    def __init__(
        self, proc: ProcFs, *, min_rss_kib: int, scope_dir: Path | None = None, clock: Callable[[], int]
    ) -> None:
        self.proc = proc
        self.min_rss_kib = min_rss_kib
        self.scope_dir = scope_dir
        self.clock = clock
        self._entries: dict[int, WarmEntry] = {}
        self._static: dict[tuple[int, int], tuple[str, str | None]] = {}
        self.refreshed_ns: int | None = None
        self.last_cost_ns: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, pid: int) -> WarmEntry | None:
        return self._entries.get(pid)

    def _pids(self) -> Iterable[int]:
        return subtree_pids(self.scope_dir) if self.scope_dir is not None else self.proc.pids()

    def refresh(self) -> None:
        t0 = self.clock()
        entries: dict[int, WarmEntry] = {}
        static: dict[tuple[int, int], tuple[str, str | None]] = {}
        for pid in self._pids():
            try:
                st = self.proc.stat(pid)
                if st.is_kernel_thread or st.state in ("Z", "X"):
                    continue
                if self.scope_dir is None and st.rss_pages * PAGE_KIB < self.min_rss_kib:
                    continue
                key = (pid, st.start_time_ticks)
                info = self._static.get(key)
                if info is None:
                    info = (" ".join(self.proc.cmdline(pid))[:512], cgroup_v2_path(self.proc.cgroup(pid)))
                static[key] = info
                status = self.proc.status(pid)
                victim = Victim(
                    pid=pid, comm=st.comm, cmdline=info[0], cgroup=info[1], start_time_ticks=st.start_time_ticks,
                    oom_score_adj=self.proc.oom_score_adj(pid), **status.victim_fields(),
                )
                tids = task_ids(self.proc, pid) if (status.threads or 1) > 1 else frozenset({pid})
            except _GONE as exc:
                log.debug("observe.warm_skip", pid=pid, reason=str(exc) or type(exc).__name__)
                continue
            entries[pid] = WarmEntry(victim, tids, self.clock())
        self._entries = entries
        self._static = static
        self.refreshed_ns = self.clock()
        self.last_cost_ns = self.refreshed_ns - t0


def task_ids(proc: ProcFs, pid: int) -> frozenset[int]:
    """Thread ids of ``pid`` now. Raises FileNotFoundError when it is gone."""
    return frozenset(int(t) for t in os.listdir(f"{proc.root}/{pid}/task") if t.isdigit())


def read_task_facts(proc: ProcFs, tid: int) -> ProcessFacts | None:
    """Thread-group id and comm of a task (a killer), or None when it is gone."""
    try:
        status = proc.status(tid)
    except _GONE:
        return None
    return ProcessFacts(tid=tid, tgid=status.tgid or tid, comm=status.name)


def read_victim_facts(
    proc: ProcFs, warm: WarmTable, tid: int, event_comm: str | None, now_ns: int
) -> ProcessFacts | None:
    """Facts about a kill's target thread ``tid``, read right after the kill was seen.

    Sizes come from the warm table when it holds the same process, else from this read (noted). When
    the process is gone already, the warm table's entry for ``tid`` is used if its comm matches the
    event's; None when nothing is known.
    """
    try:
        status = proc.status(tid)
        tgid = status.tgid or tid
        if tgid != tid:
            status = proc.status(tgid)
        st = proc.stat(tgid)
        tids = task_ids(proc, tgid)
        victim = Victim(
            pid=tgid, comm=st.comm, start_time_ticks=st.start_time_ticks,
            cmdline=" ".join(proc.cmdline(tgid))[:512], cgroup=cgroup_v2_path(proc.cgroup(tgid)),
            oom_score_adj=proc.oom_score_adj(tgid), **status.victim_fields(),
        )
    except _GONE:
        entry = warm.get(tid)
        if entry is None or (event_comm is not None and entry.victim.comm != event_comm):
            return None
        age = (now_ns - entry.read_ns) / 1e6
        note = f"victim: gone before it could be read; description and sizes from the warm table ({age:.0f} ms old)"
        return ProcessFacts(tid, tid, entry.victim.comm, entry.tids, entry.victim, (note,))
    entry = warm.get(tgid)
    if entry is not None and entry.victim.start_time_ticks == st.start_time_ticks:
        # The same process, as it was before the kill (a dying process' cmdline already reads empty).
        age = (now_ns - entry.read_ns) / 1e6
        victim = entry.victim
        note = f"victim sizes: from the warm table, read {age:.0f} ms before the kill was seen"
        tids = tids | entry.tids
    else:
        if not victim.cmdline:
            victim = dataclasses.replace(victim, cmdline=None)
        note = "victim sizes: read after the SIGKILL (not in the warm table): may be partly freed already"
    return ProcessFacts(tid, tgid, st.comm, tids, victim, (note,))


def read_pidfd_target(proc: ProcFs, tid: int, fd: int) -> int | None:
    """The pid that task ``tid``'s file descriptor ``fd`` (a pidfd) refers to, or None."""
    try:
        with open(f"{proc.root}/{tid}/fdinfo/{fd}") as fh:
            return parse_pidfd_fdinfo(fh.read())
    except OSError:
        return None


class MemSampler:
    """MemAvailable plus the per-CPU free lists (KiB; as lmkd-py's own kills measure it), sampled."""

    def __init__(self, proc: ProcFs, keep: int = 4) -> None:
        self.proc = proc
        self._samples: deque[tuple[int, int]] = deque(maxlen=keep)

    def read(self) -> int | None:
        try:
            return self.proc.free_memory_kib()
        except (OSError, ProcParseError) as exc:
            log.debug("observe.meminfo_failed", reason=str(exc))
            return None

    def sample(self, now_ns: int) -> None:
        kib = self.read()
        if kib is not None:
            self._samples.append((kib, now_ns))

    def before(self, ts_ns: int) -> tuple[int, int] | None:
        """The latest sample taken at or before ``ts_ns``: (KiB, when)."""
        for kib, at in reversed(self._samples):
            if at <= ts_ns:
                return kib, at
        return None
