"""One observed kill as a ``KillRecord`` in the record format of lmkd-py's own kills (pure, no I/O).

The record is shaped so that ``report`` and ``compare`` read it unchanged: ``outcome`` = observed,
``observed`` = true, ``killer`` says who killed (``kernel_oom``, ``kernel`` for another kernel-sent
SIGKILL, or ``process`` with its pid and comm), and the derived metrics follow the definitions of
``timeline.build_timeline``:

- ``reaper_work_ns``: the time inside process_mrelease (sum of the matched calls), or, when nobody called
  it, the kernel oom_reaper's ``finish_task_reaping - start_task_reaping``.
- ``exit_mmap_ns``: end of the victim's exit_mmap minus the ``sched_process_exit`` of the thread that ran
  it (on 6.16+ that tracepoint fires just before ``exit_mm``; before 6.16 it fires after it, so the start
  is that thread's ``signal_deliver`` instead, and a note says so).
- ``reap_total_ns``: ``tracing.reap_total_ns``, the same definition as for lmkd-py's own kills.
- ``kill_to_exit_ns``: ``signal_generate`` to the exit: the proc connector's exit of the victim (the
  kernel's analogue of the pidfd turning readable, which is what lmkd-py's own kills measure) or, when
  that was missed, the later of the last ``sched_process_exit`` and the end of exit_mmap (noted).

``steps`` carry kernel timestamps (CLOCK_MONOTONIC ns, the same clock): ``start_ns`` and
``signal_sent_ns`` are the ``signal_generate``; ``end_ns`` is when the record was made.
"""

from __future__ import annotations

import dataclasses
import errno
import uuid
from datetime import UTC, datetime
from typing import Any

from lmkd_py.observe.track import SI_KERNEL, ObservedKill
from lmkd_py.records import (
    KernelTimeline,
    KilledBy,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Provenance,
    Steps,
    Victim,
    errno_name,
)
from lmkd_py.tracing import exit_mmap_span, reap_total_ns


def parse_pidfd_fdinfo(text: str) -> int | None:
    """The pid a pidfd refers to, from the text of ``/proc/PID/fdinfo/FD``: the ``Pid:`` line.

    None when there is no such line (not a pidfd) or it is -1 (the process was reaped already)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Pid":
            try:
                pid = int(value.strip())
            except ValueError:
                return None
            return pid if pid > 0 else None
    return None


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f} ms"


def killer_of(k: ObservedKill) -> tuple[KilledBy, list[str]]:
    """Who killed, and notes on how that was decided."""
    notes: list[str] = []
    gen = k.generate
    code = gen.fields.get("code")
    match = k.mrelease[0].match if k.mrelease else None
    mv = k.mark_victim
    if mv is not None and mv.pid == gen.pid and code == SI_KERNEL:
        ctx = k.sender.comm if k.sender is not None else None
        notes.append(f"killer: the kernel OOM killer, running in the context of task {gen.pid} ({ctx})")
        return KilledBy(kind="kernel_oom", match=match), notes
    if mv is not None:
        notes.append("the kernel OOM killer chose this victim too (mark_victim) after it was signalled")
    if code == SI_KERNEL:
        notes.append(
            "killer: a SIGKILL sent by the kernel (SI_KERNEL) with no OOM kill of this task, e.g. the OOM "
            "killer ending another process that shares the victim's mm, or a hard RLIMIT_CPU"
        )
        return KilledBy(kind="kernel", match=match), notes
    s = k.sender
    if s is None:
        notes.append(f"killer: task {gen.pid} was gone before it could be read; its pid may be a thread id")
        return KilledBy(kind="process", pid=gen.pid, match=match), notes
    return KilledBy(kind="process", pid=s.tgid, comm=s.comm, match=match), notes


def _victim(k: ObservedKill, notes: list[str]) -> Victim:
    facts = k.victim
    comm_raw = k.generate.fields.get("comm")
    comm = comm_raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(comm_raw, bytes) else None
    v = facts.victim if facts is not None and facts.victim is not None else Victim(pid=k.pid, comm=comm)
    facts_notes = list(facts.notes) if facts is not None else [
        "victim: gone before /proc could be read and not in the warm table: no description"
    ]
    v = dataclasses.replace(v, pid=k.pid, comm=v.comm or comm)
    mv = k.mark_victim
    if mv is not None:
        # The OOM killer's own count at the kill (K(get_mm_counter()), KiB): exact, and free.
        anon, file, shmem = (mv.fields.get(f) for f in ("anon_rss", "file_rss", "shmem_rss"))
        if isinstance(anon, int) and isinstance(file, int) and isinstance(shmem, int):
            update: dict[str, Any] = {
                "rss_kib": anon + file + shmem, "rss_anon_kib": anon, "rss_file_kib": file, "rss_shmem_kib": shmem,
            }
            adj, uid = mv.fields.get("oom_score_adj"), mv.fields.get("uid")
            if isinstance(adj, int):
                update["oom_score_adj"] = adj
            if isinstance(uid, int):
                update["uid"] = uid
            v = dataclasses.replace(v, **update)
            facts_notes = [n for n in facts_notes if not n.startswith("victim sizes:")]
            facts_notes.append("victim sizes: from the OOM killer's mark_victim event, at the kill")
    notes.extend(facts_notes)
    return v


def _mrelease(k: ObservedKill, traced: bool) -> Mrelease:
    calls = k.mrelease
    if not calls:
        note = "observed: no process_mrelease call on this victim" if traced else "process_mrelease not traced"
        return Mrelease(status=MreleaseStatus.NOT_ATTEMPTED, note=note)
    first, last = calls[0], calls[-1]
    wall = last.exit_ns - first.enter_ns if last.exit_ns is not None else None
    extra = f"; {len(calls)} calls" if len(calls) > 1 else ""
    note = f"observed: called by task {first.caller_tid}, matched by {first.match}{extra}"
    ret = last.ret
    if last.exit_ns is None or ret is None:
        return Mrelease(status=MreleaseStatus.ERROR, reaper_tid=first.caller_tid,
                        note=note + "; no sys_exit_process_mrelease seen")
    if ret >= 0:
        return Mrelease(status=MreleaseStatus.OK, ret=ret, wall_ns=wall, reaper_tid=first.caller_tid, note=note)
    err = -ret
    status = {
        errno.ESRCH: MreleaseStatus.ALREADY_RELEASED,
        errno.ENOSYS: MreleaseStatus.UNSUPPORTED,
    }.get(err, MreleaseStatus.ERROR)
    return Mrelease(status=status, errno=err, errno_name=errno_name(err), wall_ns=wall,
                    reaper_tid=first.caller_tid, note=note)


def _timeline(
    k: ObservedKill,
    kernel_version: tuple[int, int],
    source: str,
    unavailable: str | None,
    mrelease_traced: bool,
    notes: list[str],
) -> KernelTimeline:
    deliver = min(k.deliver_ns.values(), default=None)
    exit_start = min(k.exit_ns.values(), default=None)
    done_calls = [c for c in k.mrelease if c.exit_ns is not None]
    mr_work = sum(c.exit_ns - c.enter_ns for c in done_calls if c.exit_ns is not None) if done_calls else None
    r = k.reaper
    r_start = min(r.get("start", []), default=None)
    r_end = min((t for t in r.get("finish", []) if r_start is not None and t >= r_start), default=None)
    if r.get("wake"):
        notes.append(f"oom_reaper: woken {_ms(r['wake'][0] - k.gen_ns)} after the kill")
    if r.get("skip"):
        notes.append(f"oom_reaper: skipped the victim {len(r['skip'])}x (mm being torn down, or mmap_lock busy)")
    if r_start is not None and r_end is None:
        notes.append("oom_reaper: started, but no finish_task_reaping seen")
    if k.mark_victim is not None and not r:
        notes.append("oom_reaper: not run (the victim's exit_mmap finished within the reaper's 2 s delay)")
    reaper_work = mr_work
    if reaper_work is None and r_start is not None and r_end is not None:
        reaper_work = r_end - r_start
    elif mr_work is not None and r_start is not None:
        notes.append("both process_mrelease and the oom_reaper worked on this victim: reaper_work_ns is the former")
    mmap_ev = k.exit_mmap
    _start, exit_mmap_ns = exit_mmap_span(
        kernel_version, mmap_ev.pid if mmap_ev else None, mmap_ev.ts_ns if mmap_ev else None,
        k.exit_ns, exit_start, k.deliver_ns, deliver, notes,
    )
    reaper_ran: bool | None = True
    if not k.mrelease and r_start is None:
        reaper_ran = False if mrelease_traced else None  # untraced calls could have been made
    reap_total = reap_total_ns(exit_mmap_ns, reaper_work, reaper_ran=reaper_ran, notes=notes)
    proc_exit = max((e.timestamp_ns for e in k.proc_exits.values()), default=None)
    return KernelTimeline(
        source=source,
        unavailable_reason=unavailable,
        signal_generate_ns=k.gen_ns,
        signal_deliver_ns=deliver,
        mrelease_enter_ns=k.mrelease[0].enter_ns if k.mrelease else None,
        mrelease_exit_ns=k.mrelease[-1].exit_ns if k.mrelease else None,
        mrelease_ret=k.mrelease[-1].ret if k.mrelease else None,
        exit_start_ns=exit_start,
        exit_mmap_end_ns=mmap_ev.ts_ns if mmap_ev is not None else None,
        proc_exit_ns=proc_exit,
        oom_reaper_start_ns=r_start,
        oom_reaper_end_ns=r_end,
        reaper_work_ns=reaper_work,
        exit_mmap_ns=exit_mmap_ns,
        reap_total_ns=reap_total,
        notes=["freed_by_*, lock and mmap_lock waits: not traced in observe mode (too costly system-wide)"],
    )


def _exit_observed(k: ObservedKill, notes: list[str]) -> int | None:
    leader = k.proc_exits.get(k.pid)
    if leader is not None:
        return leader.timestamp_ns
    last_exit = max(k.exit_ns.values(), default=None)
    ends = [t for t in (last_exit, k.exit_mmap.ts_ns if k.exit_mmap is not None else None) if t is not None]
    if not ends:
        return None
    notes.append("exit_observed_ns: no proc-connector exit of the victim; the later of its last "
                 "sched_process_exit and exit_mmap end instead")
    return max(ends)


def build_record(
    k: ObservedKill,
    *,
    kernel_version: tuple[int, int],
    end_ns: int,
    mem_after_kib: int | None,
    provenance: Provenance,
    source: str = "tracefs+proc_connector",
    unavailable_reason: str | None = None,
    mrelease_traced: bool = True,
    extra_notes: list[str] | None = None,
) -> KillRecord:
    """The record of one observed kill (module docstring for every field's meaning). ``mrelease_traced``:
    whether process_mrelease calls were traced at all (without them "no call" cannot be told)."""
    notes: list[str] = list(k.notes)
    victim = _victim(k, notes)
    killer, killer_notes = killer_of(k)
    notes.extend(killer_notes)
    mrelease = _mrelease(k, mrelease_traced)
    kernel_notes: list[str] = list(extra_notes or [])
    kernel = _timeline(k, kernel_version, source, unavailable_reason, mrelease_traced, kernel_notes)
    kernel = dataclasses.replace(kernel, notes=[*kernel.notes, *kernel_notes])
    if k.extra_signals:
        notes.append(f"SIGKILL sent {k.extra_signals + 1}x; the first one counts")
    if k.timed_out:
        notes.append("the exit was not complete when observe stopped waiting for it")
    exit_ns = _exit_observed(k, notes)
    before = k.mem_before
    mem_before = before[0] if before is not None else None
    if before is not None:
        notes.append(f"mem_available_before_kib: sampled {_ms(k.gen_ns - before[1])} before the kill")
    steps = Steps(
        start_ns=k.gen_ns,
        signal_sent_ns=k.gen_ns,
        mrelease_start_ns=kernel.mrelease_enter_ns,
        mrelease_end_ns=kernel.mrelease_exit_ns,
        exit_observed_ns=exit_ns,
        end_ns=end_ns,
    )
    return KillRecord(
        record_id=str(uuid.uuid4()),
        wall_time=datetime.now(UTC).isoformat(timespec="microseconds"),
        outcome=Outcome.OBSERVED,
        observed=True,
        victim=victim,
        steps=steps,
        mrelease=mrelease,
        mem_available_before_kib=mem_before,
        mem_available_after_kib=mem_after_kib,
        mem_recovered_kib=mem_after_kib - mem_before if mem_after_kib is not None and mem_before is not None else None,
        kill_to_exit_ns=exit_ns - k.gen_ns if exit_ns is not None else None,
        notes=notes,
        kernel=kernel,
        killer=killer,
        provenance=provenance,
    )
