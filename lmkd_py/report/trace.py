"""``lmkd-py trace-export``: the timeline of each kill as a Chrome/Perfetto trace-event JSON file
(open it in ui.perfetto.dev or chrome://tracing).

One kill is one trace "process" (``pid`` = its place in the export, named after the victim and the
record id), so kills never mix. Its threads are tracks: **lmkd-py** (the killer's own steps from
``steps``: pidfd_open, identity check, sizes, waiting for the exit and for the memory), **reaper** (the
process_mrelease call as lmkd-py timed it, the kernel's process_mrelease from tracefs inside it, the
kernel's oom_reaper in observe mode) and **victim** (SIGKILL generated -> delivered, exit -> proc
connector exit, exit_mmap). Counters: KiB freed by each side per memory kind, rising from 0 at the
side's work start to its total at the work end (the record holds totals, not a curve), and free memory
before and after. Lock waits are per-side totals without timestamps in the record, so they are shown as
arguments of that side's slice, never as invented slices.

Times: ``ts``/``dur`` in microseconds (floats) from the kill's first timestamp, so kills from different
boots and boards sit side by side; the kill's own CLOCK_MONOTONIC start is an argument of its top-level
slice. Slices of one track that would overlap without nesting (odd or hostile records) go to a second
lane of that track rather than break the viewer's nesting.

Record files are untrusted: read with ``records.iter_records`` (a bad line is skipped and named as
``file:line``), strings escaped with ``text.printable``, a slice that ends before it starts left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lmkd_py.records import KernelTimeline, KillRecord, Problems, iter_records
from lmkd_py.report.cli import _BadInput, _check_file
from lmkd_py.text import printable

KILLER, REAPER, VICTIM = 1, 2, 3
TRACK_NAMES = {KILLER: "lmkd-py", REAPER: "reaper", VICTIM: "victim"}
LANE_STRIDE = 100  # lane n (n >= 1) of track t has tid t * LANE_STRIDE + n
MAX_SIDE_KEYS = 8  # the tracer writes 2-4 sides; a record with more is not one of ours
MAX_NOTES = 20


@dataclass
class _Slice:
    name: str
    track: int
    start_ns: int
    end_ns: int
    args: dict[str, Any] = field(default_factory=dict)


def _span(slices: list[_Slice], skipped: list[str], name: str, track: int, start: int | None, end: int | None,
          **args: Any) -> None:
    if start is None or end is None:
        return
    if end < start:
        skipped.append(f"{name}: ends {start - end} ns before it starts")
        return
    slices.append(_Slice(name, track, start, end, {k: v for k, v in args.items() if v is not None}))


def _slices(r: KillRecord, skipped: list[str]) -> list[_Slice]:
    """Every slice of one record but the top-level one, by track (module docstring)."""
    s, k, mr = r.steps, r.kernel, r.mrelease
    out: list[_Slice] = []
    _span(out, skipped, "pidfd_open", KILLER, s.start_ns, s.pidfd_opened_ns)
    _span(out, skipped, "identity check", KILLER, s.pidfd_opened_ns, s.identity_checked_ns)
    _span(out, skipped, "read sizes", KILLER, s.identity_checked_ns, s.sizes_read_ns)
    _span(out, skipped, "wait for exit", KILLER, s.signal_sent_ns, s.exit_observed_ns,
          kill_to_exit_ns=r.kill_to_exit_ns)
    _span(out, skipped, "wait for memory back", KILLER, s.exit_observed_ns, s.mem_recovered_ns,
          mem_recovered_kib=r.mem_recovered_kib, target_kib=r.mem_recovery_target_kib)
    _span(out, skipped, "process_mrelease (call)", REAPER, s.mrelease_start_ns, s.mrelease_end_ns,
          status=mr.status.value, errno=mr.errno_name, wall_ns=mr.wall_ns, thread_cpu_ns=mr.thread_cpu_ns,
          reaper_tid=mr.reaper_tid)
    if k is None:
        return out
    side = _side_args(k)
    _span(out, skipped, "process_mrelease (kernel)", REAPER, k.mrelease_enter_ns, k.mrelease_exit_ns,
          ret=k.mrelease_ret, reaper_work_ns=k.reaper_work_ns, **side["reaper"])
    _span(out, skipped, "oom_reaper", REAPER, k.oom_reaper_start_ns, k.oom_reaper_end_ns, **side["reaper"])
    _span(out, skipped, "SIGKILL generate -> deliver", VICTIM, k.signal_generate_ns, k.signal_deliver_ns)
    _span(out, skipped, "exit (sched_process_exit -> proc connector)", VICTIM, k.exit_start_ns, k.proc_exit_ns)
    if k.exit_mmap_end_ns is not None and k.exit_mmap_ns is not None:
        _span(out, skipped, "exit_mmap", VICTIM, k.exit_mmap_end_ns - k.exit_mmap_ns, k.exit_mmap_end_ns,
              exit_mmap_ns=k.exit_mmap_ns, **side["victim"])
    return out


def _side_args(k: KernelTimeline) -> dict[str, dict[str, Any]]:
    """Per side (reaper, victim): KiB freed by kind and the lock-wait totals, as slice arguments."""
    out: dict[str, dict[str, Any]] = {"reaper": {"freed_kib": k.freed_by_reaper_kib},
                                      "victim": {"freed_kib": k.freed_by_victim_kib}}
    for key, values in (("mmap_lock_wait_ns", k.mmap_lock_wait_ns), ("lock_contention_ns", k.lock_contention_ns),
                        ("lock_contention_count", k.lock_contention_count)):
        for name, value in list((values or {}).items())[:MAX_SIDE_KEYS]:
            who, _, how = name.partition("_")  # "victim_sleep" -> victim, sleeping locks
            if who in out:
                out[who][f"{key}_{printable(how, max_chars=32)}" if how else key] = value
    return out


def _counters(r: KillRecord) -> list[tuple[str, int, dict[str, int]]]:
    """(name, ts ns, values) of the counter events of one record."""
    out: list[tuple[str, int, dict[str, int]]] = []
    k = r.kernel
    if k is not None:
        mmap_start = k.exit_mmap_end_ns - k.exit_mmap_ns if k.exit_mmap_end_ns and k.exit_mmap_ns else None
        for name, kinds, start, end in (
            ("freed by reaper (KiB)", k.freed_by_reaper_kib, k.mrelease_enter_ns, k.mrelease_exit_ns),
            ("freed by victim (KiB)", k.freed_by_victim_kib, mmap_start, k.exit_mmap_end_ns),
        ):
            if kinds and start is not None and end is not None and end >= start:
                clean = {printable(kind, max_chars=32): v for kind, v in kinds.items()}
                out += [(name, start, dict.fromkeys(clean, 0)), (name, end, clean)]
    s = r.steps
    before, after = r.mem_available_before_kib, r.mem_available_after_kib
    if before is not None and s.sizes_read_ns is not None:
        out.append(("free memory (KiB)", s.sizes_read_ns, {"free": before}))
    if after is not None:
        out.append(("free memory (KiB)", s.mem_recovered_ns or s.end_ns, {"free": after}))
    return out


def _lanes(slices: list[_Slice]) -> list[tuple[_Slice, int]]:
    """Each slice with its tid: the first lane of its track where it nests (module docstring)."""
    open_ends: dict[int, list[list[int]]] = {}
    out = []
    for sl in sorted(slices, key=lambda x: (x.start_ns, -x.end_ns)):
        lanes = open_ends.setdefault(sl.track, [])
        for n, stack in enumerate([*lanes, []]):
            while stack and stack[-1] <= sl.start_ns:
                stack.pop()
            if not stack or sl.end_ns <= stack[-1]:
                if n == len(lanes):
                    lanes.append(stack)
                stack.append(sl.end_ns)
                out.append((sl, sl.track if n == 0 else sl.track * LANE_STRIDE + n))
                break
    return out


def kill_events(r: KillRecord, pid: int) -> list[dict[str, Any]]:
    """The trace events of one record, as trace process ``pid``."""
    skipped: list[str] = []
    slices = _slices(r, skipped)
    counters = _counters(r)
    times = [t for sl in slices for t in (sl.start_ns, sl.end_ns)] + [t for _, t, _ in counters]
    times += [t for t in (r.steps.start_ns, r.steps.end_ns, r.steps.signal_sent_ns) if t is not None]
    base, last = min(times), max(times)

    def us(ns: int) -> float:
        return (ns - base) / 1000

    v = r.victim
    comm = printable(v.comm or "?", max_chars=64)
    label = f"kill {pid}: {comm} (pid {v.pid}) {r.outcome.value} [{printable(r.record_id, max_chars=40)}]"
    top = {
        "record_id": printable(r.record_id, max_chars=80), "kill_id": r.kill_id, "outcome": r.outcome.value,
        "kill_reason": r.pressure.kill_reason if r.pressure else None,
        "wall_time": printable(r.wall_time, max_chars=40),
        "monotonic_start_ns": base, "kernel_release": r.provenance.kernel_release,
        "timeline": (r.kernel.source or "tracefs") if r.kernel and not r.kernel.unavailable_reason else
        (r.kernel.unavailable_reason if r.kernel else "none in this record"),
        "skipped": skipped or None,
        "notes": [printable(n, max_chars=200) for n in r.kernel.notes[:MAX_NOTES]] if r.kernel and r.kernel.notes
        else None,
    }
    events: list[dict[str, Any]] = [
        _meta("process_name", pid, 0, {"name": printable(label, max_chars=200)}),
        _meta("process_sort_index", pid, 0, {"sort_index": pid}),
        _slice_event(f"kill {comm} (pid {v.pid})", pid, KILLER, 0.0, us(last),
                     {k: printable(x, max_chars=200) if isinstance(x, str) else x
                      for k, x in top.items() if x is not None}),
    ]
    placed = _lanes(slices)
    sent_tid = REAPER if r.steps.mrelease_start_ns is not None else KILLER
    tids = {KILLER} | {tid for _, tid in placed} | ({sent_tid} if r.steps.signal_sent_ns is not None else set())
    for tid in sorted(tids):
        track, lane = (tid, 0) if tid < LANE_STRIDE else divmod(tid, LANE_STRIDE)
        name = TRACK_NAMES[track] + (f" ({lane + 1})" if lane else "")
        if track == REAPER and r.mrelease.reaper_tid is not None:
            name += f" tid {r.mrelease.reaper_tid}"
        elif track == VICTIM:
            name += f" pid {v.pid}"
        events.append(_meta("thread_name", pid, tid, {"name": name}))
        events.append(_meta("thread_sort_index", pid, tid, {"sort_index": tid}))
    for sl, tid in placed:
        events.append(_slice_event(sl.name, pid, tid, us(sl.start_ns), (sl.end_ns - sl.start_ns) / 1000, sl.args))
    if r.steps.signal_sent_ns is not None:
        events.append({"name": "SIGKILL sent", "ph": "i", "s": "t", "ts": us(r.steps.signal_sent_ns), "pid": pid,
                       "tid": sent_tid})
    for name, t, values in sorted(counters, key=lambda c: c[1]):
        events.append({"name": name, "ph": "C", "ts": us(t), "pid": pid, "tid": KILLER, "args": values})
    return events


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "ts": 0, "pid": pid, "tid": tid, "args": args}


def _slice_event(name: str, pid: int, tid: int, ts: float, dur: float, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}


def trace_document(records: Iterable[KillRecord]) -> dict[str, Any]:
    """The whole trace: every record's events, kill n as process n (from 1)."""
    events: list[dict[str, Any]] = []
    for n, r in enumerate(records, 1):
        events += kill_events(r, n)
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def select(records: Iterable[KillRecord], kill: str | None) -> list[KillRecord]:
    """All records, or those whose ``record_id`` (or shared ``kill_id``: a whole-cgroup kill) is ``kill``."""
    return [r for r in records if kill is None or kill in (r.record_id, r.kill_id)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", type=Path, nargs="+", metavar="RECORDS", help="JSONL record files")
    p.add_argument("--kill", metavar="ID", help="only the kill with this record_id (or kill_id: a whole-cgroup kill)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.json",
                   help="trace file to write ('-': stdout)")


def cmd_trace_export(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Write the trace of the kills in ``args.files`` to ``args.output``. Returns 0, or 2 on bad input (a
    file that cannot be read, no kill with ``--kill ID``, an output that cannot be written)."""
    out = out or sys.stdout
    err = err or sys.stderr
    problems = Problems()
    try:
        records = _read(list(args.files), problems)
    except _BadInput as exc:
        print(f"lmkd-py trace-export: {exc}", file=err)
        return 2
    if problems:
        print(f"skipped {len(problems)} unreadable line(s):", file=err)
        for note in problems:
            print(f"  {printable(note, max_chars=300)}", file=err)
        if len(problems) > len(problems.notes):
            print(f"  ... and {len(problems) - len(problems.notes)} more", file=err)
    chosen = select(records, args.kill)
    if not chosen:
        what = f"no record with id {printable(repr(args.kill), max_chars=80)}" if args.kill else "no records"
        print(f"lmkd-py trace-export: {what} in {', '.join(printable(str(f)) for f in args.files)}", file=err)
        return 2
    text = json.dumps(trace_document(chosen), allow_nan=False, separators=(",", ":"))
    if str(args.output) == "-":
        out.write(text + "\n")
    else:
        try:
            Path(args.output).write_text(text + "\n")
        except OSError as exc:
            print(f"lmkd-py trace-export: cannot write {printable(str(args.output))}: {exc.strerror or exc}", file=err)
            return 2
        print(f"{len(chosen)} kill(s) written to {printable(str(args.output))}", file=err)
    return 0


def _read(paths: Sequence[Path], problems: Problems) -> list[KillRecord]:
    """Every record of ``paths`` (bad lines noted in ``problems``). Raises _BadInput naming the file
    that is not a record file or cannot be read."""
    records: list[KillRecord] = []
    for path in paths:
        _check_file(Path(path))
        try:
            records.extend(iter_records(Path(path), problems))
        except OSError as exc:
            raise _BadInput(f"{printable(str(path))}: {exc.strerror or exc}") from exc
    return records
