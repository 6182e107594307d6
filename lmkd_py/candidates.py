"""The warm candidate table: every killable-looking process, refreshed off the kill path.

A full refresh reads two small files per process (``stat`` and ``oom_score_adj``), and ``status``
too when the machine has swap, so that swapped-out memory counts in every candidate's size (issue 12);
it also reads the identity protect_exe trusts (the ``exe`` link and the owner uid), which exec and
setuid change under the same pid and start time. ``cmdline`` and the cgroup are read once per process
(keyed by pid and start time, again after an exec) since they rarely change. At decision time only the
first few ranked candidates are read again (``recheck``): identity, adj, and RSS + swap from
``status``. See design.md, "The decision must not scan".

Processes that appeared since the last refresh are found without a scan (``newcomers``): in a cgroup
scope from the scope's ``cgroup.procs``; system-wide from the pids allocated since the refresh — the
kernel hands pids out in increasing order, and ``/proc/loadavg`` names the last one — so the decision
reads only the new pids (a hog started a moment ago must not lose to an older bystander).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import structlog

from lmkd_py.policy import OOM_SCORE_ADJ_MIN, Candidate, Choice, Rules, band_prefix, rank_victims
from lmkd_py.procfs import PAGE_KIB, ProcFs, ProcParseError, cgroup_v2_path, subtree_pids

log = structlog.get_logger("lmkd_py.candidates")
# Past this many pids allocated since the refresh, newcomers are found by listing /proc instead.
NEWCOMER_SPAN_MAX = 512


class CandidateTable:
    """Candidates as of the last refresh; ``rank`` is cheap, ``refresh`` reads /proc."""

    def __init__(
        self,
        procfs: ProcFs,
        rules: Rules,
        *,
        scope_dir: Path | None = None,
        clock: Callable[[], int],
        pidfd_open: Callable[[int], int] | None = None,
        hold: int = 0,
    ) -> None:
        self.proc = procfs
        # pidfds of the first ``hold`` candidates, opened when they are ranked (and checked against the
        # start time just read), so the kill signals exactly the process that was ranked: a start time
        # in clock ticks alone cannot tell a pid reused within one tick.
        self._pidfd_open = pidfd_open
        self._hold = hold if pidfd_open is not None else 0
        self._held: dict[tuple[int, int], int] = {}
        self.rules = rules
        self.scope_dir = scope_dir
        self.clock = clock
        self._cands: dict[int, Candidate] = {}
        self._static: dict[tuple[int, int], tuple[str, int | None, str | None]] = {}
        self._ranked: list[Choice] = []
        self._newcomers: dict[int, Candidate] = {}
        self._last_pid: int | None = None  # the last pid allocated when the table was refreshed
        self.refreshed_ns: int | None = None
        self.last_refresh_cost_ns: int | None = None

    def __len__(self) -> int:
        return len(self._cands)

    def _pids(self) -> Iterable[int]:
        if self.scope_dir is not None:
            return subtree_pids(self.scope_dir)
        return self.proc.pids()

    def refresh(self) -> None:
        t0 = self.clock()
        fresh: dict[int, Candidate] = {}
        static: dict[tuple[int, int], tuple[str, int | None, str | None]] = {}
        self._last_pid = self._read_last_pid()
        with_swap = self._has_swap()
        for pid in self._pids():
            c = self._read(pid, static)
            if c is not None:
                fresh[pid] = self._with_swap(c) if with_swap else c
        self._cands = fresh
        self._static = static
        self._newcomers = {}
        # Rank once, for every level: a level's choices are a prefix of this (band_prefix).
        self._ranked = rank_victims(fresh.values(), OOM_SCORE_ADJ_MIN + 1, self.rules)
        self._hold_pidfds([(c.candidate.pid, c.candidate.start_time_ticks) for c in self._ranked[: self._hold]])
        self.refreshed_ns = self.clock()
        self.last_refresh_cost_ns = self.refreshed_ns - t0

    def _read(self, pid: int, static: dict[tuple[int, int], tuple[str, int | None, str | None]]) -> Candidate | None:
        try:
            st = self.proc.stat(pid)
            if st.is_kernel_thread or st.state in ("Z", "X"):
                return None
            adj = self.proc.oom_score_adj(pid)
            # exe and uid are what protect_exe trusts, and execve()/setuid() change them while pid and
            # start time stay: a cron child forked as root that setuid()s and execs a user's job would
            # keep a root identity in a cache keyed by (pid, start time). So both are read on every
            # refresh (~2.8 + 1.7 us per process here, against ~12 us for the stat read alone).
            exe = self._exe(pid)
            uid = self.proc.uid(pid)
            key = (pid, st.start_time_ticks)
            prev = self._cands.get(pid)
            info = self._static.get(key)
            if info is not None and prev is not None and prev.start_time_ticks == st.start_time_ticks \
                    and prev.exe != exe:
                info = None  # an exec since the last refresh: its cmdline is new too
            if info is None:
                cmdline = " ".join(self.proc.cmdline(pid))[:512]
                cgroup = cgroup_v2_path(self.proc.cgroup(pid))
                info = (cmdline, uid, cgroup)
            static[key] = info
        except (FileNotFoundError, ProcessLookupError, ProcParseError) as exc:
            log.debug("candidates.skip", pid=pid, reason=str(exc) or type(exc).__name__)
            return None
        except PermissionError as exc:
            log.debug("candidates.skip", pid=pid, reason=f"permission: {exc}")
            return None
        swap = prev.swap_kib if prev is not None and prev.start_time_ticks == st.start_time_ticks else 0
        return Candidate(
            pid=pid,
            start_time_ticks=st.start_time_ticks,
            comm=st.comm,
            oom_score_adj=adj,
            rss_kib=st.rss_pages * PAGE_KIB,
            swap_kib=swap,
            cmdline=info[0],
            uid=uid,
            cgroup=info[2],
            ppid=st.ppid,
            kernel_thread=st.is_kernel_thread,
            exe=exe,
        )

    def pidfd(self, pid: int, start_time_ticks: int) -> int | None:
        """The pidfd held for this process since it was ranked, or None (the killer opens one then)."""
        return self._held.get((pid, start_time_ticks))

    def close(self) -> None:
        """Close the held pidfds. The table stays usable (the next refresh holds new ones)."""
        self._hold_pidfds([])

    def _hold_pidfds(self, want: list[tuple[int, int]], *, keep_others: bool = False) -> None:
        held: dict[tuple[int, int], int] = {}
        for key in want:
            fd = self._held.pop(key, None)
            if fd is None:
                fd = self._open_verified(*key)
            if fd is not None:
                held[key] = fd
        if keep_others:
            held.update(self._held)
        else:
            for fd in self._held.values():
                os.close(fd)
        self._held = held

    def _open_verified(self, pid: int, start_time_ticks: int) -> int | None:
        assert self._pidfd_open is not None
        try:
            fd = self._pidfd_open(pid)
        except OSError:
            return None  # gone (ESRCH), or not ours to hold: the killer opens its own then
        try:
            same = self.proc.stat(pid).start_time_ticks == start_time_ticks
        except (FileNotFoundError, ProcessLookupError, ProcParseError):
            same = False
        if not same:
            os.close(fd)
            return None
        return fd

    def read_candidate(self, pid: int) -> Candidate | None:
        """``pid`` read now (a few files), or None when it is gone, a kernel thread or unreadable."""
        return self._read(pid, {})

    def holds(self, pid: int, start_time_ticks: int) -> bool:
        """Whether the last refresh saw this process (pid and start time)."""
        c = self._cands.get(pid)
        return c is not None and c.start_time_ticks == start_time_ticks

    def _has_swap(self) -> bool:
        try:
            return self.proc.meminfo().get("SwapTotal", 0) > 0
        except (OSError, ProcParseError):
            return False

    def _with_swap(self, c: Candidate) -> Candidate:
        try:
            swap = self.proc.status(c.pid).vm_swap_kib
        except (FileNotFoundError, ProcessLookupError, PermissionError, ProcParseError):
            return c
        return replace(c, swap_kib=swap or 0)

    def _read_last_pid(self) -> int | None:
        try:
            return self.proc.last_pid()
        except (OSError, ProcParseError):
            return None

    def _new_pids(self) -> Iterable[int]:
        """Pids that may have appeared since the refresh, without a /proc scan."""
        if self.scope_dir is not None:
            return subtree_pids(self.scope_dir) - self._cands.keys() - self._newcomers.keys()
        then, now = self._last_pid, self._read_last_pid()
        if then is None or now is None:
            return ()
        span: Sequence[int]
        if now >= then:
            span = range(then + 1, now + 1)
        else:  # the pid counter wrapped: the rest of the old run, then from the bottom (pid 300 on)
            span = [*range(then + 1, self.proc.pid_max() + 1), *range(300, now + 1)]
        if len(span) > NEWCOMER_SPAN_MAX:
            # A fork storm: list the directory (names only, no per-process reads) instead.
            return set(self.proc.pids()) - self._cands.keys() - self._newcomers.keys()
        return (p for p in span if p not in self._cands and p not in self._newcomers)

    def newcomers(self, min_adj: int) -> list[Choice]:
        """Processes started since the last refresh, ranked for ``min_adj``: read now (a few files
        each), kept until the next refresh. Threads get pids from the same counter and are skipped."""
        static: dict[tuple[int, int], tuple[str, int | None, str | None]] = {}
        for pid in self._new_pids():
            try:
                status = self.proc.status(pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError, ProcParseError):
                continue
            if status.tgid != pid:
                continue  # a thread of an older process
            c = self._read(pid, static)
            if c is not None:
                self._newcomers[pid] = replace(c, swap_kib=status.vm_swap_kib or 0)
        self._static.update(static)
        if not self._newcomers:
            return []
        log.debug("candidates.newcomers", count=len(self._newcomers))
        ranked = rank_victims(self._newcomers.values(), min_adj, self.rules)
        if self._hold:
            self._hold_pidfds([(c.candidate.pid, c.candidate.start_time_ticks) for c in ranked[: self._hold]],
                              keep_others=True)
        return ranked

    def _exe(self, pid: int) -> str | None:
        """/proc/PID/exe, or None when it cannot be read: EACCES for another user's process without
        CAP_SYS_PTRACE, ENOENT for a process exiting now. Unknown means "not protected by exe"; logged
        at debug the first time per process (the table remembers the last exe it saw)."""
        try:
            return self.proc.exe(pid)
        except OSError as exc:
            prev = self._cands.get(pid)
            if prev is None or prev.exe is not None:
                log.debug("candidates.exe_unknown", pid=pid, reason=exc.strerror or type(exc).__name__)
            return None

    def rank(self, min_adj: int, limit: int | None = None) -> list[Choice]:
        """The ranking of the last refresh for a level's floor: no /proc reads, no sorting. ``limit``:
        only the first so many (a decision needs a handful; copying 5,000 costs ~15 us a time)."""
        if limit is None:
            return band_prefix(self._ranked, min_adj)
        return band_prefix(self._ranked[:limit], min_adj)

    def recheck(self, choices: list[Choice], top: int, min_adj: int) -> list[Choice]:
        """Re-read the first ``top`` choices (identity, adj, RSS + swap; cgroup, owner and exe when a rule
        looks at them), re-rank them, and append
        the rest unchanged as fallbacks. A process that is gone or now another process is dropped. The
        cgroup is read again because a process can be moved (into a protected cgroup, out of the scope)
        after the refresh cached it."""
        fresh: list[Candidate] = []
        for ch in choices[:top]:
            c = ch.candidate
            try:
                st = self.proc.stat(c.pid)
                if st.start_time_ticks != c.start_time_ticks or st.state in ("Z", "X"):
                    continue
                rss_kib, swap_kib = self.proc.rss_swap_kib(c.pid)
                adj = self.proc.oom_score_adj(c.pid)
                # What only some rules look at is read again only when a rule does (~20 us each here).
                cgroup = cgroup_v2_path(self.proc.cgroup(c.pid)) if self.rules.reads_cgroup else c.cgroup
                # the owner of /proc/PID, as the refresh reads it (protect_exe, protect_uid)
                uid = self.proc.uid(c.pid) if self.rules.reads_owner else c.uid
                exe = self._exe(c.pid) if self.rules.reads_owner else c.exe
            except (FileNotFoundError, ProcessLookupError, ProcParseError, PermissionError) as exc:
                log.debug("candidates.recheck_drop", pid=c.pid, reason=str(exc) or type(exc).__name__)
                continue
            updated = replace(
                c,
                oom_score_adj=adj,
                cgroup=cgroup,
                rss_kib=rss_kib if rss_kib is not None else st.rss_pages * PAGE_KIB,
                swap_kib=swap_kib or 0,
                uid=uid,
                exe=exe,  # an exec since the refresh changes what it is
            )
            self._cands[c.pid] = updated
            fresh.append(updated)
        # Only the head is re-ranked; the tail keeps the refresh's order as fallbacks (its ``rank``
        # fields are positions in that ranking; a caller numbers the list it gets by enumerate).
        return rank_victims(fresh, min_adj, self.rules) + choices[top:]
