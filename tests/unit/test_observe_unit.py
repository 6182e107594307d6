"""Observe mode's pure parts: event matching (tracker), record building, page selection, /proc readers
on a fake tree, and that ``report``/``compare`` read observed records unchanged."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from lmkd_py.observe.procs import MemSampler, WarmTable, read_pidfd_target, read_task_facts, read_victim_facts
from lmkd_py.observe.record import build_record, parse_pidfd_fdinfo
from lmkd_py.observe.trace import keep_pages
from lmkd_py.observe.track import (
    EXIT_GRACE_NS,
    REAPER_SETTLE_NS,
    SI_KERNEL,
    ObservedKill,
    ProcessFacts,
    Tracker,
    in_scope,
)
from lmkd_py.procfs import ProcFs
from lmkd_py.records import KillRecord, MreleaseStatus, Outcome, Provenance, RecordWriter, Victim, read_records
from lmkd_py.tracing.connector import ProcExit
from lmkd_py.tracing.ringbuf import TraceEvent
from tests.fakes import fake_proc

MS = 1_000_000
V616 = (6, 18)
T0 = 1_000 * MS


# -- synthetic events (field names and meanings as in this kernel's format files) -------------------
def gen(ts: int, sender: int, target: int, *, code: int = 0, result: int = 0, comm: bytes = b"victim") -> TraceEvent:
    fields: dict[str, int | bytes] = {"sig": 9, "errno": 0, "code": code, "comm": comm.ljust(16, b"\0"),
                                      "pid": target, "group": 1, "result": result}
    return TraceEvent(ts, 0, "signal:signal_generate", sender, fields)


def deliver(ts: int, tid: int) -> TraceEvent:
    return TraceEvent(ts, 0, "signal:signal_deliver", tid, {"sig": 9, "errno": 0, "code": 0})


def sched_exit(ts: int, tid: int, group_dead: int = 1) -> TraceEvent:
    return TraceEvent(ts, 0, "sched:sched_process_exit", tid, {"pid": tid, "prio": 120, "group_dead": group_dead})


def exit_mmap(ts: int, tid: int) -> TraceEvent:
    return TraceEvent(ts, 1, "mmap:exit_mmap", tid, {"mm": 0xFFFF0001, "mt": 0xFFFF0002})


def mark(ts: int, ctx: int, victim: int, anon: int = 40_000, file: int = 6_000, shmem: int = 0) -> TraceEvent:
    return TraceEvent(ts, 0, "oom:mark_victim", ctx, {"pid": victim, "anon_rss": anon, "file_rss": file,
                                                      "shmem_rss": shmem, "uid": 0, "oom_score_adj": 0})


def reaper(ts: int, kind: str, victim: int) -> TraceEvent:
    names = {"wake": "wake_reaper", "start": "start_task_reaping", "finish": "finish_task_reaping",
             "skip": "skip_task_reaping"}
    return TraceEvent(ts, 1, f"oom:{names[kind]}", 33, {"pid": victim})


def mr_enter(ts: int, tid: int, fd: int) -> TraceEvent:
    return TraceEvent(ts, 0, "syscalls:sys_enter_process_mrelease", tid, {"pidfd": fd, "flags": 0})


def mr_exit(ts: int, tid: int, ret: int = 0) -> TraceEvent:
    return TraceEvent(ts, 0, "syscalls:sys_exit_process_mrelease", tid, {"ret": ret})


def pexit(ts: int, tid: int, tgid: int) -> ProcExit:
    return ProcExit(pid=tid, tgid=tgid, exit_code=9, exit_signal=17, timestamp_ns=ts, cpu=0)


def feed(tr: Tracker, items: Iterable[TraceEvent | ProcExit]) -> None:
    for it in sorted(items, key=lambda x: x.ts_ns if isinstance(x, TraceEvent) else x.timestamp_ns):
        if isinstance(it, TraceEvent):
            tr.feed(it)
        else:
            tr.feed_proc_exit(it)


def victim_facts(pid: int, comm: str = "victim", cgroup: str = "/app", tids: Iterable[int] = ()) -> ProcessFacts:
    v = Victim(pid=pid, comm=comm, cgroup=cgroup, rss_kib=131_072, rss_anon_kib=131_000, start_time_ticks=7)
    return ProcessFacts(pid, pid, comm, frozenset({pid, *tids}), v, ("victim sizes: from the warm table",))


def record(k: ObservedKill, version: tuple[int, int] = V616) -> KillRecord:
    return build_record(k, kernel_version=version, end_ns=k.gen_ns + 10_000 * MS, mem_after_kib=2_000_000,
                        provenance=Provenance(kernel_release="6.18.0-test"))


def simple_exit(t: int, pid: int, *, mmap_ms: float = 8.0) -> list[TraceEvent | ProcExit]:
    """A single-threaded victim's exit starting at ``t``: deliver, exit start, exit_mmap end, proc exit."""
    end = t + int(mmap_ms * MS)
    return [deliver(t, pid), sched_exit(t + 20_000, pid), exit_mmap(end, pid), pexit(end + 30_000, pid, pid)]


# -- a foreign killer ---------------------------------------------------------------------------------
def foreign_kill(hints: bool) -> tuple[Tracker, list[ObservedKill]]:
    """Killer 50 signals victims 100 and 200, then calls process_mrelease on 100, then on 200."""
    tr = Tracker(timeout_ns=5_000 * MS, mem_before=lambda ts: (1_000_000, ts - 300 * MS))
    tr.add_facts(ProcessFacts(50, 50, "killerd"), T0)
    tr.add_facts(victim_facts(100), T0)
    tr.add_facts(victim_facts(200), T0)
    if hints:
        tr.add_mrelease_target(50, T0 + 1 * MS, 100)
        tr.add_mrelease_target(50, T0 + 20 * MS, 200)
    feed(tr, [
        gen(T0, 50, 100), gen(T0 + 30_000, 50, 200),
        mr_enter(T0 + 1 * MS, 50, 3), mr_exit(T0 + 15 * MS, 50, 0),
        mr_enter(T0 + 20 * MS, 50, 4), mr_exit(T0 + 20 * MS + 5_000, 50, -3),
        *simple_exit(T0 + 2 * MS, 100), *simple_exit(T0 + 3 * MS, 200, mmap_ms=12),
    ])
    return tr, tr.due(T0 + 100 * MS)


def test_foreign_killer_matched_by_fdinfo() -> None:
    tr, done = foreign_kill(hints=True)
    assert not tr.pending
    by_pid = {k.pid: record(k) for k in done}
    assert set(by_pid) == {100, 200}
    a, b = by_pid[100], by_pid[200]
    for rec in (a, b):
        assert rec.observed and rec.outcome is Outcome.OBSERVED
        assert rec.killer is not None and rec.kernel is not None
        killer = rec.killer
        assert (killer.kind, killer.pid, killer.comm, killer.match) == ("process", 50, "killerd", "fdinfo")
        assert rec.steps.start_ns == rec.steps.signal_sent_ns == rec.kernel.signal_generate_ns
    assert a.mrelease.status is MreleaseStatus.OK and a.mrelease.wall_ns == 14 * MS
    assert a.steps.mrelease_start_ns == T0 + 1 * MS and a.mrelease.reaper_tid == 50
    assert b.mrelease.status is MreleaseStatus.ALREADY_RELEASED and b.mrelease.errno_name == "ESRCH"
    assert a.kernel is not None and a.kernel.reaper_work_ns == 14 * MS
    # exit_mmap from the victim's sched_process_exit (6.16+) to the exit_mmap event
    assert a.kernel.exit_mmap_ns == 8 * MS - 20_000
    assert a.kernel.reap_total_ns == a.kernel.exit_mmap_ns + 14 * MS
    assert a.steps.exit_observed_ns == T0 + 10 * MS + 30_000 == a.kernel.proc_exit_ns
    assert a.kill_to_exit_ns == 10 * MS + 30_000
    assert a.victim.rss_kib == 131_072 and a.victim.comm == "victim"
    assert a.mem_available_before_kib == 1_000_000 and a.mem_recovered_kib == 1_000_000


def test_without_fdinfo_the_latest_unreaped_preceding_signal_is_taken() -> None:
    # Signal A, signal B, then reap A and B: without the pidfd's target this is ambiguous; the tracker
    # takes the caller's latest victim without a call yet and says it guessed ("preceding_signal").
    _tr, done = foreign_kill(hints=False)
    by_pid = {k.pid: record(k) for k in done}
    assert {r.killer.match for r in by_pid.values() if r.killer} == {"preceding_signal"}
    assert by_pid[200].steps.mrelease_start_ns == T0 + 1 * MS
    assert by_pid[100].steps.mrelease_start_ns == T0 + 20 * MS


def test_preceding_signal_by_another_thread_of_the_killer() -> None:
    # Android lmkd signals from its main thread and reaps on a reaper thread: same process, other tid.
    tr = Tracker(timeout_ns=5_000 * MS)
    tr.add_facts(ProcessFacts(50, 50, "lmkd"), T0)
    tr.add_facts(ProcessFacts(51, 50, "lmkd_reaper"), T0)
    feed(tr, [gen(T0, 50, 100), mr_enter(T0 + MS, 51, 7), mr_exit(T0 + 4 * MS, 51), *simple_exit(T0 + MS, 100)])
    (k,) = tr.due(T0 + 100 * MS)
    rec = record(k)
    assert rec.killer is not None and rec.killer.match == "preceding_signal" and rec.killer.pid == 50
    assert rec.mrelease.reaper_tid == 51 and rec.mrelease.wall_ns == 3 * MS


def test_mrelease_of_someone_elses_victim_is_ignored() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    tr.add_facts(ProcessFacts(60, 60, "other"), T0)
    feed(tr, [gen(T0, 50, 100), mr_enter(T0 + MS, 60, 3), mr_exit(T0 + 2 * MS, 60), *simple_exit(T0 + MS, 100)])
    (k,) = tr.due(T0 + 100 * MS)
    assert k.mrelease == [] and record(k).mrelease.status is MreleaseStatus.NOT_ATTEMPTED


# -- the kernel OOM killer -------------------------------------------------------------------------------
def test_kernel_oom_kill_without_reaper() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    tr.add_facts(victim_facts(100), T0)
    feed(tr, [gen(T0, 100, 100, code=SI_KERNEL), mark(T0 + 2_000, 100, 100, anon=39_552, file=6_628),
              *simple_exit(T0 + 2 * MS, 100, mmap_ms=3)])
    (k,) = tr.due(T0 + 50 * MS)
    rec = record(k)
    assert rec.killer is not None and rec.killer.kind == "kernel_oom" and rec.killer.pid is None
    assert (rec.victim.rss_anon_kib, rec.victim.rss_file_kib, rec.victim.rss_kib) == (39_552, 6_628, 46_180)
    assert "victim sizes: from the OOM killer's mark_victim event, at the kill" in rec.notes
    assert not any("warm table" in n for n in rec.notes)
    assert rec.kernel is not None and rec.kernel.oom_reaper_start_ns is None
    assert any(n.startswith("oom_reaper: not run") for n in rec.kernel.notes)
    assert rec.kernel.reap_total_ns == rec.kernel.exit_mmap_ns == 3 * MS - 20_000
    assert rec.mrelease.status is MreleaseStatus.NOT_ATTEMPTED


def test_kernel_oom_kill_with_reaper_waits_for_exit() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    wake = T0 + 2_015 * MS
    events: list[TraceEvent | ProcExit] = [
        gen(T0, 100, 100, code=SI_KERNEL), mark(T0 + 2_000, 100, 100), deliver(T0 + 2 * MS, 100),
        reaper(wake, "wake", 100), reaper(wake + 50_000, "start", 100), reaper(wake + 2_550_000, "finish", 100),
    ]
    feed(tr, events)
    assert tr.due(wake + 100 * MS) == []  # the victim is held (e.g. ptrace): no exit yet
    end = T0 + 3_500 * MS
    feed(tr, [sched_exit(end, 100), exit_mmap(end + 170_000, 100), pexit(end + 200_000, 100, 100)])
    assert tr.due(end + 200_000 + EXIT_GRACE_NS - 1) == []
    (k,) = tr.due(end + 200_000 + EXIT_GRACE_NS)
    rec = record(k)
    kt = rec.kernel
    assert kt is not None and kt.oom_reaper_start_ns == wake + 50_000 and kt.oom_reaper_end_ns == wake + 2_550_000
    assert kt.reaper_work_ns == 2_500_000 and kt.exit_mmap_ns == 170_000 and kt.reap_total_ns == 2_670_000
    assert rec.kill_to_exit_ns == 3_500 * MS + 200_000


def test_reaper_woken_before_exit_mmap_is_waited_for_until_it_skips() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    wake = T0 + 2_000 * MS
    feed(tr, [gen(T0, 100, 100, code=SI_KERNEL), mark(T0 + 1_000, 100, 100), deliver(T0 + 1_990 * MS, 100),
              sched_exit(T0 + 1_995 * MS, 100), reaper(wake, "wake", 100), reaper(wake + 1_000, "skip", 100),
              exit_mmap(wake + 5 * MS, 100), pexit(wake + 5 * MS + 10_000, 100, 100)])
    settle = wake + 5 * MS + 10_000 + EXIT_GRACE_NS
    assert tr.due(settle) == []  # the skip before exit_mmap was a busy mmap_lock: a retry is coming
    feed(tr, [reaper(wake + 100 * MS, "skip", 100)])
    (k,) = tr.due(wake + 101 * MS)
    kt = record(k).kernel
    assert kt is not None and kt.oom_reaper_start_ns is None and any("skipped the victim 2x" in n for n in kt.notes)
    # Without the closing skip the wait ends REAPER_SETTLE_NS after exit_mmap.
    tr2 = Tracker(timeout_ns=5_000 * MS)
    feed(tr2, [gen(T0, 100, 100, code=SI_KERNEL), mark(T0 + 1_000, 100, 100), reaper(wake, "wake", 100),
               sched_exit(wake + MS, 100), exit_mmap(wake + 5 * MS, 100), pexit(wake + 6 * MS, 100, 100)])
    assert tr2.due(wake + 5 * MS + REAPER_SETTLE_NS - 1) == []
    assert len(tr2.due(wake + 5 * MS + REAPER_SETTLE_NS)) == 1


def test_kernel_sigkill_without_oom_is_kind_kernel() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 100, 300, code=SI_KERNEL), *simple_exit(T0 + MS, 300)])
    (k,) = tr.due(T0 + 100 * MS)
    rec = record(k)
    assert rec.killer is not None and rec.killer.kind == "kernel"
    assert rec.victim.pid == 300 and rec.victim.comm == "victim"  # from the event when /proc had nothing


# -- what must not make records --------------------------------------------------------------------------
def test_normal_exits_make_no_kill() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    events: list[TraceEvent | ProcExit] = []
    for i in range(200):
        pid, t = 1_000 + i, T0 + i * MS
        events += [sched_exit(t, pid), exit_mmap(t + 10_000, pid), pexit(t + 20_000, pid, pid)]
    # exit_group of a multi-threaded process: its other threads take SIGKILL without any signal_generate
    events += [sched_exit(T0, 5_000, 0), deliver(T0 + 1, 5_001), sched_exit(T0 + 2, 5_001), exit_mmap(T0 + 3, 5_001)]
    # SIGKILL sent to a process already exiting (result 1: ignored) and other signals
    events += [gen(T0 + 5, 1, 1_005, result=1)]
    feed(tr, events)
    assert not tr.pending and tr.due(T0 + 60_000 * MS) == []


def test_repeated_sigkill_is_one_kill() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 100), gen(T0 + 10, 50, 100, result=2), gen(T0 + 20, 51, 100, result=1),
              *simple_exit(T0 + MS, 100)])
    (k,) = tr.due(T0 + 100 * MS)
    assert k.extra_signals == 2 and "SIGKILL sent 3x; the first one counts" in record(k).notes


def test_scope_skips_victims_outside_and_unknown() -> None:
    tr = Tracker(timeout_ns=5_000 * MS, scope_cgroup="/app")
    tr.add_facts(victim_facts(100, cgroup="/app/sub"), T0)
    tr.add_facts(victim_facts(200, cgroup="/other"), T0)
    feed(tr, [gen(T0, 50, 100), gen(T0, 50, 200), gen(T0, 50, 300)])
    assert set(tr.pending) == {100} and tr.skipped_out_of_scope == 2
    assert in_scope("/app", "/app") and in_scope("/x", "/") and not in_scope("/application", "/app")


# -- threads, timeouts, old kernels ----------------------------------------------------------------------
def test_thread_unknown_to_proc_is_tied_by_the_proc_connector() -> None:
    # /proc gave nothing (the victim was gone); its second thread 101 ran exit_mmap.
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 100), deliver(T0 + MS, 101), deliver(T0 + MS, 100), sched_exit(T0 + 2 * MS, 100, 0),
              sched_exit(T0 + 3 * MS, 101, 1), exit_mmap(T0 + 9 * MS, 101), pexit(T0 + 2 * MS + 5_000, 100, 100)])
    assert tr.due(T0 + 9 * MS + 10_000 + EXIT_GRACE_NS) == []  # exit_mmap not yet tied to the victim
    feed(tr, [pexit(T0 + 9 * MS + 10_000, 101, 100)])
    (k,) = tr.due(T0 + 9 * MS + 10_000 + EXIT_GRACE_NS)
    kt = record(k).kernel
    assert kt is not None and kt.exit_mmap_end_ns == T0 + 9 * MS and kt.exit_mmap_ns == 6 * MS
    assert kt.proc_exit_ns == T0 + 9 * MS + 10_000 and kt.signal_deliver_ns == T0 + MS


def test_timeout_hands_out_an_unfinished_kill() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 100), deliver(T0 + MS, 100)])
    assert tr.due(T0 + 4_999 * MS) == []
    (k,) = tr.due(T0 + 5_000 * MS)
    rec = record(k)
    assert k.timed_out and rec.kill_to_exit_ns is None and rec.steps.exit_observed_ns is None
    assert "the exit was not complete when observe stopped waiting for it" in rec.notes


def test_before_6_16_exit_mmap_is_timed_from_signal_deliver() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 100), *simple_exit(T0 + MS, 100)])
    (k,) = tr.due(T0 + 100 * MS)
    kt = record(k, version=(6, 12)).kernel
    assert kt is not None and kt.exit_mmap_ns == 8 * MS
    assert any("measured from signal_deliver" in n for n in kt.notes)


# -- small pure helpers ----------------------------------------------------------------------------------
def test_keep_pages_drops_only_pages_that_end_before_the_horizon() -> None:
    pages = [(10, b"a"), (20, b"b"), (30, b"c"), (40, b"d")]
    assert keep_pages(pages, 25) == [(20, b"b"), (30, b"c"), (40, b"d")]
    assert keep_pages(pages, 100) == [(40, b"d")]  # the last page's end is unknown: kept
    assert keep_pages(pages, 0) == pages and keep_pages([], 5) == []


def test_parse_pidfd_fdinfo() -> None:
    text = "pos:\t0\nflags:\t02000002\nmnt_id:\t4\nino:\t38493\nPid:\t6026\nNSpid:\t6026\n"
    assert parse_pidfd_fdinfo(text) == 6026
    assert parse_pidfd_fdinfo(text.replace("6026", "-1")) is None  # reaped already
    assert parse_pidfd_fdinfo("pos:\t0\nflags:\t02\n") is None  # not a pidfd


# -- /proc readers on a fake tree ------------------------------------------------------------------------
def test_warm_table_and_victim_facts(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "big", 64 * 1024, tids=(11, 12))
    fake_proc(tmp_path, 20, "small", 2 * 1024)
    proc = ProcFs(tmp_path)
    now = [T0]
    warm = WarmTable(proc, min_rss_kib=16 * 1024, clock=lambda: now[0])
    warm.refresh()
    assert len(warm) == 1
    entry = warm.get(10)
    assert entry is not None and entry.tids == {10, 11, 12}
    assert entry.victim.rss_kib == 64 * 1024
    assert entry.victim.cmdline == "big --flag" and entry.victim.cgroup == "/apps/x"
    # After the kill the status shows less (being freed): the warm sizes win, same start time.
    (tmp_path / "10/status").write_text((tmp_path / "10/status").read_text().replace(f"{64 * 1024} kB", "4 kB"))
    now[0] += 2_000 * MS
    facts = read_victim_facts(proc, warm, 10, "big", now[0])
    assert facts is not None and facts.victim is not None and facts.victim.rss_kib == 64 * 1024
    assert facts.tids == {10, 11, 12} and facts.notes[0].startswith("victim sizes: from the warm table, read 2000 ms")
    # Not in the table: read now, and said so.
    small = read_victim_facts(proc, warm, 20, "small", now[0])
    assert small is not None and small.victim is not None and small.victim.rss_kib == 2 * 1024
    assert "read after the SIGKILL" in small.notes[0]
    # Gone: the table's entry, when its comm matches the event's.
    for name in ("stat", "status", "cmdline", "cgroup", "oom_score_adj"):
        (tmp_path / "10" / name).unlink()
    gone = read_victim_facts(proc, warm, 10, "big", now[0])
    assert gone is not None and gone.victim is not None and "gone before it could be read" in gone.notes[0]
    assert read_victim_facts(proc, warm, 10, "other", now[0]) is None
    assert read_task_facts(proc, 20) == ProcessFacts(20, 20, "small")
    assert read_task_facts(proc, 99) is None


def test_pidfd_target_and_mem_sampler(tmp_path: Path) -> None:
    (tmp_path / "7/fdinfo").mkdir(parents=True)
    (tmp_path / "7/fdinfo/3").write_text("pos:\t0\nflags:\t02000002\nPid:\t4242\nNSpid:\t4242\n")
    proc = ProcFs(tmp_path)
    assert read_pidfd_target(proc, 7, 3) == 4242 and read_pidfd_target(proc, 7, 4) is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 5000 kB\n")
    (tmp_path / "zoneinfo").write_text("")
    m = MemSampler(proc)
    m.sample(10)
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable: 7000 kB\n")
    m.sample(20)
    assert m.before(15) == (5000, 10) and m.before(25) == (7000, 20) and m.before(5) is None


# -- report and compare read observed records unchanged --------------------------------------------------
def test_report_and_compare_read_observed_records(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    from lmkd_py.report import cmd_compare
    from lmkd_py.report.data import load_table

    _tr, done = foreign_kill(hints=True)
    paths = []
    for i, release in enumerate(("6.12.0", "6.18.0")):
        path = tmp_path / f"{i}.jsonl"
        writer = RecordWriter(path, fsync=False)
        for k in done:
            rec = record(k)
            assert writer.write(dataclasses.replace(rec, provenance=Provenance(kernel_release=release)))
        paths.append(path)
    back = read_records(paths)
    assert not back.problems and len(back.records) == 4 and all(r.observed for r in back.records)
    table = load_table(paths)
    assert table.rows == 4
    assert len(table.values("kill_to_exit_ns")) == 4 and len(table.values("exit_mmap_ns")) == 4
    assert len(table.values("reaper_work_ns")) == 2  # the ESRCH call reaped nothing: left out, as for own kills
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(a=[paths[0]], b=[paths[1]], by=None, files=[], format="json", plots=None,
                              seed=0, resamples=200, label_a="6.12", label_b="6.18")
    assert cmd_compare(args, out=out, err=err) == 0, err.getvalue()
    assert json.loads(out.getvalue())


def test_sigkill_to_a_thread_of_a_vanished_process_is_rekeyed() -> None:
    # tgkill(SIGKILL) to thread 101 of process 100, which /proc could no longer show: keyed by 101 until
    # the proc connector names the group.
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 101), deliver(T0 + MS, 101), deliver(T0 + MS, 100), sched_exit(T0 + 2 * MS, 101, 0),
              pexit(T0 + 2 * MS + 10, 101, 100), sched_exit(T0 + 3 * MS, 100, 1), exit_mmap(T0 + 5 * MS, 100),
              pexit(T0 + 5 * MS + 10, 100, 100)])
    (k,) = tr.due(T0 + 100 * MS)
    rec = record(k)
    assert rec.victim.pid == 100 and rec.kernel is not None and rec.kernel.exit_mmap_ns == 2 * MS
    assert k.deliver_ns == {101: T0 + MS, 100: T0 + MS}  # the leader's, seen before the rekey, too
    assert any("its process is 100" in n for n in rec.notes)


def test_stopping_hands_out_pending_kills() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 100), deliver(T0 + MS, 100)])
    (k,) = tr.due(1 << 62)
    assert k.timed_out and not tr.pending


def test_untraced_mrelease_is_not_reported_as_no_reaper() -> None:
    tr = Tracker(timeout_ns=5_000 * MS)
    feed(tr, [gen(T0, 50, 100), *simple_exit(T0 + MS, 100)])
    (k,) = tr.due(T0 + 100 * MS)
    rec = build_record(k, kernel_version=V616, end_ns=T0 + 200 * MS, mem_after_kib=None,
                       provenance=Provenance(), mrelease_traced=False)
    assert rec.mrelease.status is MreleaseStatus.NOT_ATTEMPTED and rec.mrelease.note == "process_mrelease not traced"
    assert rec.kernel is not None and rec.kernel.exit_mmap_ns is not None and rec.kernel.reap_total_ns is None
    assert any(n.startswith("reap_total_ns unknown") for n in rec.kernel.notes)
