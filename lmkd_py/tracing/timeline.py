"""Turn the decoded trace events of one kill window into a ``KernelTimeline`` (pure, no I/O).

Sides: an event belongs to the *reaper* when its task is the reaper thread (the one that calls
process_mrelease), to the *victim* when its task is one of the victim's threads. The kernel-side
filters of ``tracing.py`` let only those tasks through for the noisy events (rss_stat, lock
contention, mmap_lock); the rare events (signals, process_mrelease, exits, exit_mmap) are traced
system-wide and matched here by their fields.

Memory freed per side comes from ``kmem:rss_stat``: each event carries the mm it counts for
(``mm_id``, a hash of the mm pointer), ``curr`` (whether that mm is the emitting task's own — on
6.16+ the victim's own exit_mmap runs after ``exit_mm`` cleared ``current->mm``, so ``curr`` is 0
on both sides and cannot tell them apart), ``member`` (0 file, 1 anon, 2 swap, 3 shmem) and
``size``, the counter's value *after* the change, in bytes. The change is the difference to the
previous value of the same counter, signed, credited to whichever side emitted the event. The
counters are per-CPU counters read approximately (``percpu_counter_read``), so a side's share is
exact to about one counter batch (32 pages per CPU); totals telescope and stay exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lmkd_py.records import KernelTimeline
from lmkd_py.tracing.ringbuf import TraceEvent

RSS_KINDS = {0: "file", 1: "anon", 2: "swap", 3: "shmem"}
_STATUS_KEYS = {"RssFile": "file", "RssAnon": "anon", "VmSwap": "swap", "RssShmem": "shmem"}
LCB_F_SPIN = 1  # include/trace/events/lock.h
# sched_process_exit moved before exit_mm in 6.16 (commit 3e816361e94a).
EXIT_TRACEPOINT_BEFORE_EXIT_MM = (6, 16)


@dataclass(frozen=True)
class KillWindow:
    """What ``before_kill`` knew: who is who, when tracing started (CLOCK_MONOTONIC ns) and the
    victim's RSS per kind just before the kill (KiB, from /proc/PID/status), when readable."""

    victim_pid: int
    victim_tids: frozenset[int]
    reaper_tid: int
    start_ns: int
    rss_baseline_kib: dict[str, int] | None = None


def parse_status_rss_kib(text: str) -> dict[str, int]:
    """RSS per kind (file, anon, swap, shmem) in KiB from the text of /proc/PID/status."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        kind = _STATUS_KEYS.get(key)
        if kind is not None:
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[kind] = int(parts[0])
    return out


def pid_filter(tids: Iterable[int], max_len: int = 3800) -> str:
    """A tracefs event filter matching ``common_pid`` in ``tids``.

    Consecutive ids become ranges (threads made together get consecutive ids). When the filter
    would pass ``max_len`` (the kernel takes at most a page), the ids' whole span is used instead: a
    superset, which costs only volume because ``build_timeline`` matches tasks exactly.
    """
    ids = sorted(set(tids))
    if not ids:
        raise ValueError("pid_filter needs at least one id")
    runs: list[tuple[int, int]] = []
    for tid in ids:
        if runs and tid == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], tid)
        else:
            runs.append((tid, tid))
    parts = [
        f"common_pid == {lo}" if lo == hi else f"(common_pid >= {lo} && common_pid <= {hi})" for lo, hi in runs
    ]
    text = " || ".join(parts)
    if len(text) > max_len:
        text = f"common_pid >= {ids[0]} && common_pid <= {ids[-1]}"
    return text


def exit_mmap_span(
    kernel_version: tuple[int, int],
    tid: int | None,
    end_ns: int | None,
    exit_by_tid: Mapping[int, int],
    exit_start_ns: int | None,
    deliver_by_tid: Mapping[int, int],
    deliver_ns: int | None,
    notes: list[str],
) -> tuple[int | None, int | None]:
    """(start, duration) in ns of the victim's exit_mmap, ending at ``end_ns`` in task ``tid``.

    Version-aware: since 6.16 (commit 3e816361e94a) sched_process_exit fires before exit_mm, so it starts
    the span; before, it fires after exit_mm and the span starts at the SIGKILL delivery instead (noted).
    The task's own event is preferred; the process-wide one otherwise."""
    if end_ns is None or tid is None:
        return None, None
    if kernel_version >= EXIT_TRACEPOINT_BEFORE_EXIT_MM:
        start = exit_by_tid.get(tid, exit_start_ns)
    else:
        start = deliver_by_tid.get(tid, deliver_ns)
        notes.append("exit_mmap_ns measured from signal_deliver: before 6.16 sched_process_exit fires after exit_mm")
    return start, (end_ns - start if start is not None else None)


def _first(events: Iterable[TraceEvent]) -> TraceEvent | None:
    return next(iter(events), None)


def _pair_durations(
    events: Sequence[TraceEvent], begin: str, end: str, key: str
) -> list[tuple[TraceEvent, int]]:
    """Match begin/end events of the same task (and same ``key`` field); return (begin, ns) pairs."""
    open_by_task: dict[tuple[int, object], list[TraceEvent]] = defaultdict(list)
    pairs = []
    for ev in events:
        if ev.name == begin:
            open_by_task[(ev.pid, ev.fields.get(key))].append(ev)
        elif ev.name == end:
            stack = open_by_task.get((ev.pid, ev.fields.get(key)))
            if stack:
                start = stack.pop()
                pairs.append((start, ev.ts_ns - start.ts_ns))
    return pairs


def reap_total_ns(
    exit_mmap_ns: int | None, reaper_work_ns: int | None, *, reaper_ran: bool | None, notes: list[str]
) -> int | None:
    """The seed table's "total": reaper work + exit_mmap, the one definition for own and observed kills.

    ``reaper_ran``: True when a reaper (process_mrelease, the kernel's oom_reaper) worked on the victim,
    False when none did — then the total is exit_mmap alone (noted) — and None when that cannot be told
    (process_mrelease not traced): then the total is unknown (noted), never exit_mmap alone."""
    if exit_mmap_ns is None:
        return None
    if reaper_work_ns is not None:
        return exit_mmap_ns + reaper_work_ns
    if reaper_ran is False:
        notes.append("no reaper ran (no process_mrelease, no oom_reaper): reap_total_ns is exit_mmap alone")
        return exit_mmap_ns
    if reaper_ran is None:
        notes.append("reap_total_ns unknown: process_mrelease not traced, so a reaper's share is unknown")
    else:
        notes.append("reap_total_ns unknown: a reaper ran but its work was not measured")
    return None


@dataclass(frozen=True)
class _Marks:
    """The landmark events of one kill window (first of each kind, matched to the victim or reaper)."""

    victim: frozenset[int]
    reaper: int
    gen_ns: int | None
    deliver_by_tid: dict[int, int]
    exit_by_tid: dict[int, int]
    mr_enter: TraceEvent | None
    mr_exit: TraceEvent | None
    exit_mmap: TraceEvent | None

    @property
    def deliver_ns(self) -> int | None:
        return min(self.deliver_by_tid.values()) if self.deliver_by_tid else None

    @property
    def exit_start_ns(self) -> int | None:
        return min(self.exit_by_tid.values()) if self.exit_by_tid else None

    def side_of(self, pid: int) -> str | None:
        if pid == self.reaper:
            return "reaper"
        return "victim" if pid in self.victim else None

    def counted_side(self, ev: TraceEvent) -> str | None:
        """The side a wait counts for: the reaper thread also runs the daemon's own code, and only its
        work inside process_mrelease is about the victim."""
        side = self.side_of(ev.pid)
        if side == "reaper":
            inside = self.mr_enter is not None and self.mr_enter.ts_ns <= ev.ts_ns and (
                self.mr_exit is None or ev.ts_ns <= self.mr_exit.ts_ns)
            return side if inside else None
        return side


def _marks(evs: Sequence[TraceEvent], window: KillWindow, notes: list[str]) -> _Marks:
    victim = window.victim_tids | {window.victim_pid}
    reaper = window.reaper_tid
    gen = _first(
        e for e in evs
        if e.name == "signal:signal_generate" and e.fields.get("sig") == 9 and e.fields.get("pid") == window.victim_pid
    )
    deliver_by_tid: dict[int, int] = {}
    exit_by_tid: dict[int, int] = {}
    for e in evs:
        if e.name == "signal:signal_deliver" and e.fields.get("sig") == 9 and e.pid in victim:
            deliver_by_tid.setdefault(e.pid, e.ts_ns)
        elif e.name == "sched:sched_process_exit" and e.fields.get("pid") in victim:
            exit_by_tid.setdefault(e.pid, e.ts_ns)
    mr_enter = _first(e for e in evs if e.name == "syscalls:sys_enter_process_mrelease" and e.pid == reaper)
    mr_exit = None
    if mr_enter is not None:
        mr_exit = _first(
            e for e in evs
            if e.name == "syscalls:sys_exit_process_mrelease" and e.pid == reaper and e.ts_ns >= mr_enter.ts_ns
        )
    victim_mms = {e.fields.get("mm") for e in evs if e.name.startswith("mmap_lock:") and e.pid in victim}
    # The first match: once the victim's mm is freed its address may be reused by a process that
    # exits later in the window, so a later match by address is not ours.
    exit_mmap = _first(e for e in evs if e.name == "mmap:exit_mmap" and e.pid in victim)
    if exit_mmap is None:
        exit_mmap = _first(e for e in evs if e.name == "mmap:exit_mmap" and e.fields.get("mm") in victim_mms)
    if exit_mmap is not None and exit_mmap.pid not in victim:
        notes.append(f"exit_mmap ran in task {exit_mmap.pid}, which held the last reference to the mm")
    return _Marks(frozenset(victim), reaper, gen.ts_ns if gen else None, deliver_by_tid, exit_by_tid,
                  mr_enter, mr_exit, exit_mmap)


def _note_missing(m: _Marks, enabled: frozenset[str], notes: list[str]) -> None:
    for key, value, event in (
        ("signal_generate_ns", m.gen_ns, "signal:signal_generate"),
        ("signal_deliver_ns", m.deliver_ns, "signal:signal_deliver"),
        ("mrelease_enter_ns", m.mr_enter, "syscalls:sys_enter_process_mrelease"),
        ("exit_start_ns", m.exit_start_ns, "sched:sched_process_exit"),
        ("exit_mmap_end_ns", m.exit_mmap, "mmap:exit_mmap"),
    ):
        if value is None:
            why = "event not traced on this kernel" if event not in enabled else "no matching event in the window"
            notes.append(f"{key}: {why} ({event})")


def _freed(
    evs: Sequence[TraceEvent], m: _Marks, window: KillWindow, enabled: frozenset[str], notes: list[str]
) -> dict[str, dict[str, int]] | None:
    """KiB freed per side and memory kind, from ``kmem:rss_stat`` (module docstring)."""
    if "kmem:rss_stat" not in enabled:
        notes.append("freed_by_*_kib: kmem:rss_stat not traced on this kernel")
        return None
    rss = [e for e in evs if e.name == "kmem:rss_stat"]
    mm_ids = {e.fields.get("mm_id") for e in rss if e.pid in m.victim}
    mm_ids |= {e.fields.get("mm_id") for e in rss if e.pid == m.reaper and e.fields.get("curr") == 0}
    if not mm_ids:
        notes.append("freed_by_*_kib: no rss_stat event for the victim's mm")
        return None
    prev: dict[tuple[object, int], int] = {}
    baseline = window.rss_baseline_kib or {}
    sums: dict[str, dict[str, int]] = {s: dict.fromkeys(RSS_KINDS.values(), 0) for s in ("reaper", "victim")}
    unbased = False
    for e in rss:
        side = m.side_of(e.pid)
        member = e.fields.get("member")
        size = e.fields.get("size")
        if side is None or e.fields.get("mm_id") not in mm_ids or not isinstance(member, int):
            continue
        kind = RSS_KINDS.get(member)
        if kind is None or not isinstance(size, int):
            continue
        counter = (e.fields.get("mm_id"), member)
        if counter not in prev:
            if kind in baseline:
                prev[counter] = baseline[kind] * 1024
            else:
                prev[counter] = size
                unbased = True
        sums[side][kind] += prev[counter] - size
        prev[counter] = size
    if unbased:
        notes.append("no RSS baseline for a kind: its first counter batch is not attributed")
    freed = {}
    for side, kinds in sums.items():
        if any(v < 0 for v in kinds.values()):
            notes.append(f"freed_by_{side}_kib: a counter grew during the window; negative shown as 0")
        freed[side] = {k: max(v, 0) // 1024 for k, v in kinds.items()}
    return freed


def _lock_waits(
    evs: Sequence[TraceEvent], m: _Marks, enabled: frozenset[str], notes: list[str]
) -> tuple[dict[str, int] | None, dict[str, int] | None, dict[str, int] | None]:
    """(contended-lock ns, contended-lock count, mmap_lock wait ns), each per side; None when untraced."""
    lock_ns: dict[str, int] | None = None
    lock_count: dict[str, int] | None = None
    if {"lock:contention_begin", "lock:contention_end"} <= enabled:
        lock_ns = dict.fromkeys(("reaper", "victim", "reaper_sleep", "victim_sleep"), 0)
        lock_count = dict(lock_ns)
        for begin, dur in _pair_durations(evs, "lock:contention_begin", "lock:contention_end", "lock_addr"):
            side = m.counted_side(begin)
            if side is None:
                continue
            flags = begin.fields.get("flags")
            key = side if isinstance(flags, int) and flags & LCB_F_SPIN else f"{side}_sleep"
            lock_ns[key] += dur
            lock_count[key] += 1
    else:
        notes.append("lock_contention_*: lock:contention_* not traced on this kernel")
    mmap_wait: dict[str, int] | None = None
    if {"mmap_lock:mmap_lock_start_locking", "mmap_lock:mmap_lock_acquire_returned"} <= enabled:
        mmap_wait = {"reaper": 0, "victim": 0}
        for begin, dur in _pair_durations(
            evs, "mmap_lock:mmap_lock_start_locking", "mmap_lock:mmap_lock_acquire_returned", "mm"
        ):
            side = m.counted_side(begin)
            if side is not None:
                mmap_wait[side] += dur
    else:
        notes.append("mmap_lock_wait_ns: mmap_lock events not traced on this kernel")
    return lock_ns, lock_count, mmap_wait


def _throughput(
    freed: dict[str, dict[str, int]] | None, m: _Marks, exit_mmap_start: int | None,
    rss_before_kib: int | None, notes: list[str],
) -> float | None:
    if freed is None:
        return None
    starts: list[int] = []
    ends: list[int] = []
    by_side = {s: sum(v for k, v in kinds.items() if k != "swap") for s, kinds in freed.items()}
    if by_side["reaper"] > 0 and m.mr_enter and m.mr_exit:
        starts.append(m.mr_enter.ts_ns)
        ends.append(m.mr_exit.ts_ns)
    if by_side["victim"] > 0 and m.exit_mmap is not None and exit_mmap_start is not None:
        starts.append(exit_mmap_start)
        ends.append(m.exit_mmap.ts_ns)
    total_kib = by_side["reaper"] + by_side["victim"]
    if rss_before_kib and abs(total_kib - rss_before_kib) > rss_before_kib / 10:
        notes.append(f"freed {total_kib} KiB in total but RSS before the kill was {rss_before_kib} KiB")
    if starts and max(ends) > min(starts):
        return (total_kib / 1024) / ((max(ends) - min(starts)) / 1e9)
    return None


def build_timeline(
    events: Sequence[TraceEvent],
    window: KillWindow,
    kernel_version: tuple[int, int],
    *,
    enabled: frozenset[str],
    proc_exit_ns: int | None = None,
    rss_before_kib: int | None = None,
    mrelease_wall_ns: int | None = None,
    source: str = "tracefs",
    notes: Sequence[str] = (),
) -> KernelTimeline:
    """Build the timeline and derived metrics of one kill.

    ``events`` may be in any order and may hold events from before the window (they are dropped).
    ``enabled`` names the events the instance really traced (``system:name``): a measure whose
    events were not traced stays None with a note saying so, instead of a misleading zero.

    Derived metrics (all ns of CLOCK_MONOTONIC unless named otherwise):

    - ``reaper_work_ns`` = process_mrelease exit - enter, on the reaper thread.
    - ``exit_mmap_ns`` = end of the victim's exit_mmap - its start. On 6.16+ the start is the
      ``sched_process_exit`` of the task that ran exit_mmap (it fires just before ``exit_mm``); on
      older kernels that tracepoint fires after exit_mm, so the start is that task's
      ``signal_deliver`` instead (this includes the exit work before exit_mm; a note says so).
    - ``reap_total_ns``: see ``reap_total_ns`` (reaper work + exit_mmap).
    - ``reap_throughput_mib_s`` = (file + anon + shmem freed by both sides, MiB) / (last free end -
      first free start, s), where a side's free starts at its work start (mrelease enter; the
      exit_mmap start above) and ends at its work end (mrelease exit; exit_mmap end), and a side
      counts only when it freed something.
    """
    out_notes = list(notes)
    evs = sorted((e for e in events if e.ts_ns >= window.start_ns), key=lambda e: e.ts_ns)
    if not evs:
        return KernelTimeline(
            source=source,
            unavailable_reason="no trace events in the kill window",
            proc_exit_ns=proc_exit_ns,
            notes=out_notes,
        )
    m = _marks(evs, window, out_notes)
    _note_missing(m, enabled, out_notes)
    freed = _freed(evs, m, window, enabled, out_notes)
    lock_ns, lock_count, mmap_wait = _lock_waits(evs, m, enabled, out_notes)

    mr_enter, mr_exit, exit_mmap = m.mr_enter, m.mr_exit, m.exit_mmap
    reaper_work = mr_exit.ts_ns - mr_enter.ts_ns if mr_enter and mr_exit else None
    exit_mmap_start, exit_mmap_ns = exit_mmap_span(
        kernel_version, exit_mmap.pid if exit_mmap else None, exit_mmap.ts_ns if exit_mmap else None,
        m.exit_by_tid, m.exit_start_ns, m.deliver_by_tid, m.deliver_ns, out_notes,
    )
    reaper_ran = mr_enter is not None or mrelease_wall_ns is not None
    reap_total = reap_total_ns(exit_mmap_ns, reaper_work, reaper_ran=reaper_ran, notes=out_notes)
    throughput = _throughput(freed, m, exit_mmap_start, rss_before_kib, out_notes)

    # --- consistency --------------------------------------------------------------------------
    known = [t for t in (m.gen_ns, m.deliver_ns, m.exit_start_ns, exit_mmap.ts_ns if exit_mmap else None)
             if t is not None]
    if known != sorted(known):
        out_notes.append("timeline out of order: generate/deliver/exit start/exit_mmap end")
    if reaper_work is not None and mrelease_wall_ns is not None and reaper_work > mrelease_wall_ns:
        out_notes.append(f"reaper work {reaper_work} ns exceeds the measured process_mrelease wall time")
    if mr_enter is not None and mr_exit is None:
        out_notes.append("mrelease_exit_ns: no sys_exit_process_mrelease after the enter")
    ret = mr_exit.fields.get("ret") if mr_exit else None
    return KernelTimeline(
        source=source,
        signal_generate_ns=m.gen_ns,
        signal_deliver_ns=m.deliver_ns,
        mrelease_enter_ns=mr_enter.ts_ns if mr_enter else None,
        mrelease_exit_ns=mr_exit.ts_ns if mr_exit else None,
        mrelease_ret=ret if isinstance(ret, int) else None,
        exit_start_ns=m.exit_start_ns,
        exit_mmap_end_ns=exit_mmap.ts_ns if exit_mmap else None,
        proc_exit_ns=proc_exit_ns,
        freed_by_reaper_kib=freed["reaper"] if freed else None,
        freed_by_victim_kib=freed["victim"] if freed else None,
        mmap_lock_wait_ns=mmap_wait,
        lock_contention_ns=lock_ns,
        lock_contention_count=lock_count,
        reaper_work_ns=reaper_work,
        exit_mmap_ns=exit_mmap_ns,
        reap_total_ns=reap_total,
        reap_throughput_mib_s=throughput,
        notes=out_notes,
    )
