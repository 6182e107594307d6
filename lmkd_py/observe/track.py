"""Observe mode's matching: which trace events belong to which SIGKILL (pure: no I/O, no clock).

The loop feeds decoded events (and proc-connector exits) in timestamp order; the tracker keeps one
``ObservedKill`` per victim between its ``signal_generate`` and the end of its exit, and ``due()`` hands
out the finished ones. What the kernel events do not say (a victim's thread group, a killer's comm, the
target of a pidfd) the loop reads from /proc *when it reads the event* — a killer may close its pidfd
microseconds after ``process_mrelease`` returns — and passes in as hints (``add_facts``,
``add_mrelease_target``) before feeding the events.

Facts this relies on (checked on this machine's 6.18):

- One ``signal_generate`` per kill, in the sender's context (``common_pid``), naming the target thread
  (``pid``) with ``result`` 0 when the signal was queued; a SIGKILL to a process already exiting is
  ``result`` 1 (ignored) and starts nothing. The kernel OOM killer sends with ``SEND_SIG_PRIV`` (``code``
  = SI_KERNEL) and calls ``mark_victim`` right after, from the same task.
- Every thread of a SIGKILLed process emits ``signal_deliver`` (sig 9) before it exits, so exit events
  of threads that did not are never a victim's. (A normal ``exit_group`` of a multi-threaded process
  also makes its other threads emit it, but without any ``signal_generate``: no record.)
- ``process_mrelease`` holds only ``mm_count``, so ``exit_mmap`` always runs in a victim's thread.
- The oom_reaper starts ``OOM_REAPER_DELAY`` (2 s) after the kill, and not at all when the victim's
  ``exit_mmap`` got there first (``wake_oom_reaper`` checks ``MMF_OOM_SKIP``); a queued reaper that finds
  the mm being torn down emits ``skip_task_reaping`` and retries every 100 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lmkd_py.procfs import cgroup_under
from lmkd_py.records import Victim
from lmkd_py.tracing import ProcExit, TraceEvent

SIGKILL = 9
SI_KERNEL = 0x80
SIGNAL_DELIVERED = 0  # TRACE_SIGNAL_DELIVERED, include/trace/events/signal.h
EXIT_GRACE_NS = 30_000_000  # after the exit is complete: late proc-connector exits of other threads
REAPER_SETTLE_NS = 300_000_000  # a queued oom_reaper's last retry after exit_mmap (retries every 100 ms)
EXIT_MMAP_WAIT_NS = 500_000_000  # after the leader's proc-connector exit, for an exit_mmap that may not come
HINT_TTL_NS = 10_000_000_000  # hints and unowned dying threads older than this are dropped

GENERATE = "signal:signal_generate"
DELIVER = "signal:signal_deliver"
MARK_VICTIM = "oom:mark_victim"
REAPER_EVENTS = {
    "oom:wake_reaper": "wake",
    "oom:start_task_reaping": "start",
    "oom:finish_task_reaping": "finish",
    "oom:skip_task_reaping": "skip",
}
MR_ENTER = "syscalls:sys_enter_process_mrelease"
MR_EXIT = "syscalls:sys_exit_process_mrelease"
SCHED_EXIT = "sched:sched_process_exit"
EXIT_MMAP = "mmap:exit_mmap"


@dataclass(frozen=True)
class ProcessFacts:
    """What /proc said about a task when its event was read. ``victim``: its description and sizes,
    when it was read as a kill's target; ``notes`` say where the sizes came from."""

    tid: int
    tgid: int
    comm: str | None = None
    tids: frozenset[int] = frozenset()
    victim: Victim | None = None
    notes: tuple[str, ...] = ()


@dataclass
class MreleaseCall:
    """One process_mrelease call matched to a victim; ``match`` is "fdinfo" or "preceding_signal"."""

    caller_tid: int
    enter_ns: int
    match: str
    exit_ns: int | None = None
    ret: int | None = None


@dataclass
class ObservedKill:
    """Everything seen of one SIGKILL and the victim's exit (timestamps: CLOCK_MONOTONIC ns)."""

    pid: int  # the victim's thread-group id
    generate: TraceEvent
    victim: ProcessFacts | None
    sender: ProcessFacts | None
    mem_before: tuple[int, int] | None  # (KiB, when sampled)
    tids: set[int]
    extra_signals: int = 0
    mark_victim: TraceEvent | None = None
    deliver_ns: dict[int, int] = field(default_factory=dict)
    exit_ns: dict[int, int] = field(default_factory=dict)  # tid -> sched_process_exit
    exit_mmap: TraceEvent | None = None
    mrelease: list[MreleaseCall] = field(default_factory=list)
    reaper: dict[str, list[int]] = field(default_factory=dict)  # wake/start/finish/skip -> timestamps
    proc_exits: dict[int, ProcExit] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    complete_ns: int | None = None
    timed_out: bool = False

    @property
    def gen_ns(self) -> int:
        return self.generate.ts_ns

    def exited(self, watermark_ns: int, exit_traced: bool) -> int | None:
        """When the exit was complete (the mm torn down and the leader gone), else None.

        Without the exit events (``exit_traced`` False) the leader's proc-connector exit alone counts;
        with them, that exit counts alone only after ``EXIT_MMAP_WAIT_NS`` without an exit_mmap (events
        lost, or another process holds the mm: its exit_mmap runs in that process' mmput later)."""
        if any(c.exit_ns is None for c in self.mrelease):
            return None
        proc = self.proc_exits.get(self.pid)
        if self.exit_mmap is None:
            if proc is None:
                return None
            if exit_traced and watermark_ns < proc.timestamp_ns + EXIT_MMAP_WAIT_NS:
                return None
            if exit_traced:
                self.notes.append("exit_mmap: none seen from the victim's threads (events lost, or the mm "
                                  "outlived them in another holder)")
            return proc.timestamp_ns
        leader_ns = proc.timestamp_ns if proc is not None else self.exit_ns.get(self.pid)
        if leader_ns is None:
            return None
        return max(leader_ns, self.exit_mmap.ts_ns)


def in_scope(cgroup: str | None, scope: str | None) -> bool:
    """Whether a cgroup v2 path ("/a/b") lies in ``scope``'s subtree (None: everything is)."""
    if scope is None:
        return True
    return cgroup_under(cgroup, scope)


def _int(ev: TraceEvent, name: str) -> int | None:
    v = ev.fields.get(name)
    return v if isinstance(v, int) else None


class Tracker:
    """Per-victim state between a SIGKILL and the end of its exit (module docstring).

    ``exit_traced``: whether sched_process_exit and exit_mmap are traced at all.
    ``timeout_ns``: a kill whose exit is not complete this long after the signal is handed out anyway
    (``timed_out``). ``scope_cgroup``: only victims in this cgroup v2 subtree; a victim whose cgroup could
    not be read is then skipped. ``mem_before``: the MemAvailable sample (KiB, time) to use as "before"
    for a kill at a given time, or None.
    """

    def __init__(
        self,
        *,
        timeout_ns: int,
        scope_cgroup: str | None = None,
        mem_before: Callable[[int], tuple[int, int] | None] | None = None,
        exit_traced: bool = True,
    ) -> None:
        self.timeout_ns = timeout_ns
        self.exit_traced = exit_traced
        self.scope_cgroup = scope_cgroup
        self._mem_before = mem_before
        self.pending: dict[int, ObservedKill] = {}
        self.skipped_out_of_scope = 0
        self._owner: dict[int, int] = {}  # tid -> victim tgid, for pending kills
        self._open: dict[int, MreleaseCall] = {}  # caller tid -> its call in progress
        self._facts: dict[int, tuple[int, ProcessFacts]] = {}  # tid -> (added at, facts)
        self._targets: dict[tuple[int, int], int] = {}  # (caller tid, enter ts) -> pidfd's pid
        self._dying: dict[int, list[TraceEvent]] = {}  # SIGKILLed tids of no known victim, their events
        self._dying_since: dict[int, int] = {}

    # -- hints from the read side ----------------------------------------------------------------
    def add_facts(self, facts: ProcessFacts, now_ns: int) -> None:
        self._facts[facts.tid] = (now_ns, facts)

    def add_mrelease_target(self, caller_tid: int, enter_ns: int, target_pid: int) -> None:
        """The pid the caller's pidfd referred to at the call (from /proc/CALLER/fdinfo/FD)."""
        self._targets[(caller_tid, enter_ns)] = target_pid

    def facts(self, tid: int) -> ProcessFacts | None:
        got = self._facts.get(tid)
        return got[1] if got is not None else None

    def note_all(self, note: str) -> None:
        """Add ``note`` to every pending kill (e.g. trace events lost while they were pending)."""
        for k in self.pending.values():
            if note not in k.notes:
                k.notes.append(note)

    @property
    def oldest_ns(self) -> int | None:
        return min((k.gen_ns for k in self.pending.values()), default=None)

    # -- events, in timestamp order ----------------------------------------------------------------
    def feed(self, ev: TraceEvent) -> None:
        name = ev.name
        if name == GENERATE:
            self._generate(ev)
        elif name == MR_ENTER:
            self._mr_enter(ev)
        elif name == MR_EXIT:
            call = self._open.pop(ev.pid, None)
            if call is not None:
                call.exit_ns, call.ret = ev.ts_ns, _int(ev, "ret")
        elif self.pending:
            self._victim_event(ev)

    def _owner_of(self, ev: TraceEvent) -> ObservedKill | None:
        tid = _int(ev, "pid") if ev.name in (SCHED_EXIT, MARK_VICTIM) or ev.name in REAPER_EVENTS else ev.pid
        if tid is None:
            return None
        owner = self._owner.get(tid)
        if owner is None:
            if ev.name == DELIVER or tid in self._dying:
                # A SIGKILLed thread of no known victim: maybe a thread the /proc read missed; the
                # proc connector's exit (pid, tgid) may tie it to its victim later.
                self._dying.setdefault(tid, []).append(ev)
                self._dying_since.setdefault(tid, ev.ts_ns)
            return None
        return self.pending.get(owner)

    def _victim_event(self, ev: TraceEvent) -> None:
        k = self._owner_of(ev)
        if k is None or ev.ts_ns < k.gen_ns:
            return
        name = ev.name
        if name == DELIVER:
            k.deliver_ns.setdefault(ev.pid, ev.ts_ns)
        elif name == SCHED_EXIT:
            tid = _int(ev, "pid")
            if tid is not None:
                k.exit_ns.setdefault(tid, ev.ts_ns)
        elif name == EXIT_MMAP:
            if k.exit_mmap is None:
                k.exit_mmap = ev
        elif name == MARK_VICTIM:
            if k.mark_victim is None:
                k.mark_victim = ev
        elif name in REAPER_EVENTS:
            k.reaper.setdefault(REAPER_EVENTS[name], []).append(ev.ts_ns)

    def _generate(self, ev: TraceEvent) -> None:
        if _int(ev, "sig") != SIGKILL:
            return
        target = _int(ev, "pid")
        if target is None:
            return
        facts = self.facts(target)
        tgid = facts.tgid if facts is not None else self._owner.get(target, target)
        k = self.pending.get(tgid)
        if k is not None:
            k.extra_signals += 1
            return
        if _int(ev, "result") != SIGNAL_DELIVERED:
            return  # the target was already exiting (or had SIGKILL pending): not a kill of its own
        if self.scope_cgroup is not None:
            cg = facts.victim.cgroup if facts is not None and facts.victim is not None else None
            if not in_scope(cg, self.scope_cgroup):
                self.skipped_out_of_scope += 1
                return
        tids = {tgid, target} | set(facts.tids if facts is not None else ())
        k = ObservedKill(
            pid=tgid,
            generate=ev,
            victim=facts,
            sender=self.facts(ev.pid),
            mem_before=self._mem_before(ev.ts_ns) if self._mem_before is not None else None,
            tids=tids,
        )
        self.pending[tgid] = k
        for tid in tids:
            self._owner[tid] = tgid

    def _mr_enter(self, ev: TraceEvent) -> None:
        caller = ev.pid
        target = self._targets.pop((caller, ev.ts_ns), None)
        k: ObservedKill | None = None
        match = "fdinfo"
        if target is not None:
            k = self.pending.get(self._owner.get(target, target))
        if k is None:
            match = "preceding_signal"
            k = self._preceding(caller, ev.ts_ns)
        if k is None:
            return
        call = MreleaseCall(caller, ev.ts_ns, match)
        k.mrelease.append(call)
        self._open[caller] = call

    def _preceding(self, caller: int, ts_ns: int) -> ObservedKill | None:
        """The caller's (or its process') latest SIGKILL before ``ts_ns``, preferring a victim that has
        no process_mrelease call yet (a killer may signal several victims before reaping them)."""
        caller_facts = self.facts(caller)
        caller_tgid = caller_facts.tgid if caller_facts is not None else None

        def same_killer(k: ObservedKill) -> bool:
            if k.generate.pid == caller:
                return True
            return caller_tgid is not None and k.sender is not None and k.sender.tgid == caller_tgid

        mine = [k for k in self.pending.values() if k.gen_ns <= ts_ns and same_killer(k)]
        if not mine:
            return None
        fresh = [k for k in mine if not k.mrelease]
        return max(fresh or mine, key=lambda k: k.gen_ns)

    def feed_proc_exit(self, e: ProcExit) -> None:
        """A proc-connector exit: records it and ties the thread to its victim (replaying its events)."""
        k = self.pending.get(e.tgid)
        if k is None and e.pid != e.tgid and self._owner.get(e.pid) == e.pid:
            # A SIGKILL aimed at a non-leader thread whose thread group /proc could not tell: the kill
            # was keyed by that thread's id; the connector names the real group.
            k = self._rekey(e.pid, e.tgid)
        if k is None or e.timestamp_ns < k.gen_ns:
            return
        k.proc_exits.setdefault(e.pid, e)
        if e.pid not in k.tids:
            k.tids.add(e.pid)
            self._owner[e.pid] = e.tgid
            for ev in self._dying.pop(e.pid, []):
                self._victim_event(ev)
            self._dying_since.pop(e.pid, None)

    def _rekey(self, old: int, tgid: int) -> ObservedKill | None:
        k = self.pending.pop(old, None)
        if k is None or tgid in self.pending:
            if k is not None:
                self.pending[old] = k
            return None
        k.pid = tgid
        k.tids.add(tgid)
        self.pending[tgid] = k
        for tid in k.tids:
            self._owner[tid] = tgid
        for ev in self._dying.pop(tgid, []):
            self._victim_event(ev)
        self._dying_since.pop(tgid, None)
        k.notes.append(f"the SIGKILL named thread {old}; its process is {tgid} (from the proc connector)")
        return k

    # -- hand-out ----------------------------------------------------------------------------------
    def due(self, watermark_ns: int) -> list[ObservedKill]:
        """Kills that are finished as of ``watermark_ns`` (every event before it has been fed), removed
        from the tracker. Also drops stale hints."""
        out = []
        for tgid, k in list(self.pending.items()):
            if k.complete_ns is None:
                k.complete_ns = k.exited(watermark_ns, self.exit_traced)
            done = k.complete_ns is not None and watermark_ns >= k.complete_ns + EXIT_GRACE_NS
            if done and not self._reaper_settled(k, watermark_ns):
                done = False
            if not done and watermark_ns >= k.gen_ns + self.timeout_ns:
                done = k.timed_out = True
            if done:
                out.append(k)
                del self.pending[tgid]
                for tid in k.tids:
                    if self._owner.get(tid) == tgid:
                        del self._owner[tid]
                for caller, call in list(self._open.items()):
                    if call in k.mrelease:
                        del self._open[caller]
        self._expire(watermark_ns - HINT_TTL_NS)
        return out

    @staticmethod
    def _reaper_settled(k: ObservedKill, watermark_ns: int) -> bool:
        """No oom_reaper work on this victim is still to come (module docstring for the rules)."""
        r = k.reaper
        if not r.get("wake") and not r.get("start") and not r.get("skip"):
            return True  # not woken before exit_mmap set MMF_OOM_SKIP: it never will be
        if r.get("finish"):
            return True
        mmap_ns = k.exit_mmap.ts_ns if k.exit_mmap is not None else None
        if mmap_ns is None:
            return False
        if any(t >= mmap_ns for t in r.get("skip", [])):
            return True  # the reaper found the mm torn down
        return watermark_ns >= mmap_ns + REAPER_SETTLE_NS

    def _expire(self, before_ns: int) -> None:
        for tid in [t for t, (at, _) in self._facts.items() if at < before_ns]:
            del self._facts[tid]
        for key in [key for key in self._targets if key[1] < before_ns]:
            del self._targets[key]
        for tid in [t for t, since in self._dying_since.items() if since < before_ns]:
            del self._dying_since[tid]
            self._dying.pop(tid, None)
