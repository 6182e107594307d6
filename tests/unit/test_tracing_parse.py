"""Pure parts of lmkd_py.tracing: ring-buffer decoding, timeline building, filters, proc connector.

The format texts below are what this project's 6.18 kernel prints in tracefs; the sub-buffers are
built byte by byte with the layout of kernel/trace/ring_buffer.c, so the decoder is checked against
the format, not against itself.
"""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkd_py.tracing import NullTracer, TracingUnavailable, open_tracer, parse_kernel_version
from lmkd_py.tracing.connector import (
    CN_IDX_PROC,
    NLMSG_DONE,
    PROC_CN_MCAST_LISTEN,
    PROC_EVENT_EXIT,
    control_message,
    parse_proc_exits,
)
from lmkd_py.tracing.ringbuf import (
    FormatError,
    PageLayout,
    TraceEvent,
    parse_cpu_stats,
    parse_event_format,
    parse_header_page,
    parse_subbuffer,
)
from lmkd_py.tracing.timeline import KillWindow, build_timeline, parse_status_rss_kib, pid_filter

RSS_STAT_FORMAT = """name: rss_stat
ID: 646
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int mm_id;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned int curr;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int member;\toffset:16;\tsize:4;\tsigned:1;
\tfield:long size;\toffset:24;\tsize:8;\tsigned:1;

print fmt: "mm_id=%u curr=%d type=%s size=%ldB", REC->mm_id, REC->curr, REC->member, REC->size
"""

SIGNAL_GENERATE_FORMAT = """name: signal_generate
ID: 261
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int sig;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int errno;\toffset:12;\tsize:4;\tsigned:1;
\tfield:int code;\toffset:16;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:20;\tsize:16;\tsigned:0;
\tfield:pid_t pid;\toffset:36;\tsize:4;\tsigned:1;
\tfield:int group;\toffset:40;\tsize:4;\tsigned:1;
\tfield:int result;\toffset:44;\tsize:4;\tsigned:1;

print fmt: "sig=%d errno=%d code=%d comm=%s pid=%d grp=%d res=%d", REC->sig
"""

HEADER_PAGE = """\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;
\tfield: local_t commit;\toffset:8;\tsize:8;\tsigned:1;
\tfield: int overwrite;\toffset:8;\tsize:1;\tsigned:1;
\tfield: char data;\toffset:16;\tsize:4080;\tsigned:0;
"""

RSS = parse_event_format("kmem", RSS_STAT_FORMAT)
GEN = parse_event_format("signal", SIGNAL_GENERATE_FORMAT)
FORMATS = {RSS.event_id: RSS, GEN.event_id: GEN}
LAYOUT = PageLayout()


# --- a writer with the kernel's layout, for the tests only ---------------------------------------


def rss_payload(pid: int, mm_id: int, curr: int, member: int, size: int) -> bytes:
    return struct.pack("=HBBiIIiiq", RSS.event_id, 0, 0, pid, mm_id, curr, member, 0, size)


def gen_payload(pid: int, sig: int, target: int) -> bytes:
    return struct.pack("=HBBiiii16siii", GEN.event_id, 0, 0, pid, sig, 0, 0, b"victim", target, 1, 0)


def data_entry(delta: int, payload: bytes, force_long: bool = False) -> bytes:
    payload += b"\0" * (-len(payload) % 4)
    if len(payload) <= 28 * 4 and not force_long:
        return struct.pack("=I", (delta << 5) | (len(payload) // 4)) + payload
    return struct.pack("=II", delta << 5, len(payload) + 4) + payload


def time_extend(delta: int) -> bytes:
    return struct.pack("=II", ((delta & ((1 << 27) - 1)) << 5) | 30, delta >> 27)


def time_stamp(ts: int) -> bytes:
    return struct.pack("=II", ((ts & ((1 << 27) - 1)) << 5) | 31, (ts >> 27) & 0xFFFFFFFF)


def padding(delta: int, length: int) -> bytes:
    return struct.pack("=II", (delta << 5) | 29, length) + b"\0" * (length - 4)


def page(ts: int, entries: list[bytes], flags: int = 0, missed: int | None = None, size: int = 4096) -> bytes:
    data = b"".join(entries)
    body = data + (struct.pack("=Q", missed) if missed is not None else b"")
    out = struct.pack("=QQ", ts, len(data) | flags) + body
    return out + b"\0" * (size - len(out))


# --- formats ------------------------------------------------------------------------------------


def test_event_format_fields_and_id() -> None:
    assert (RSS.event_id, RSS.name) == (646, "kmem:rss_stat")
    by_name = {f.name: f for f in RSS.fields}
    assert (by_name["size"].offset, by_name["size"].size, by_name["size"].signed) == (24, 8, True)
    assert not by_name["mm_id"].signed
    comm = {f.name: f for f in GEN.fields}["comm"]
    assert comm.is_array and comm.size == 16


def test_format_without_id_is_refused() -> None:
    with pytest.raises(FormatError):
        parse_event_format("kmem", "name: x\nformat:\n")


def test_header_page_layout() -> None:
    assert parse_header_page(HEADER_PAGE) == PageLayout(0, 8, 8, 16)
    with pytest.raises(FormatError):
        parse_header_page("\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n")


# --- sub-buffers ----------------------------------------------------------------------------------


def test_subbuffer_decodes_timestamps_and_fields() -> None:
    base = 5_000_000_000
    data = page(
        base,
        [
            data_entry(10, gen_payload(50, 9, 100)),  # 48 bytes: small entry
            data_entry(5, rss_payload(60, 7, 0, 1, 1 << 20), force_long=True),  # long form
            time_extend(3 << 27),  # a gap longer than 27 bits of delta
            data_entry(7, rss_payload(100, 7, 1, 0, 4096)),
        ],
    )
    res = parse_subbuffer(data, 1, LAYOUT, FORMATS)
    assert not res.missed_events
    assert [e.ts_ns for e in res.events] == [base + 10, base + 15, base + 15 + (3 << 27) + 7]
    gen, reap, vic = res.events
    assert (gen.name, gen.pid, gen.fields["sig"], gen.fields["pid"]) == ("signal:signal_generate", 50, 9, 100)
    assert gen.fields["comm"] == b"victim".ljust(16, b"\0")
    assert (reap.pid, reap.fields["mm_id"], reap.fields["size"], reap.cpu) == (60, 7, 1 << 20, 1)
    assert (vic.fields["curr"], vic.fields["member"]) == (1, 0)


def test_subbuffer_absolute_stamp_keeps_high_bits() -> None:
    base = (0x18 << 56) | 1000  # top bits set: an absolute stamp carries only 59 bits
    data = page(base, [time_stamp((base + 500) & ((1 << 59) - 1)), data_entry(0, gen_payload(1, 9, 2))])
    assert parse_subbuffer(data, 0, LAYOUT, FORMATS).events[0].ts_ns == base + 500


def test_subbuffer_padding_discard_counts_delta_and_null_padding_ends() -> None:
    data = page(
        0,
        [
            padding(4, 48),  # a discarded event: its delta still advances time
            data_entry(6, gen_payload(1, 9, 2)),
            struct.pack("=II", 29, 0),  # null padding: the rest is unused
            data_entry(1, gen_payload(3, 9, 4)),
        ],
    )
    res = parse_subbuffer(data, 0, LAYOUT, FORMATS)
    assert [(e.ts_ns, e.pid) for e in res.events] == [(10, 1)]


def test_subbuffer_reports_unknown_ids_and_lost_events() -> None:
    other = struct.pack("=HBBi", 999, 0, 0, 1) + b"\0" * 8
    data = page(0, [data_entry(1, other), data_entry(1, gen_payload(1, 9, 2))], flags=(1 << 31) | (1 << 30), missed=17)
    res = parse_subbuffer(data, 0, LAYOUT, FORMATS)
    assert res.unknown_ids == {999}
    assert res.missed_events and res.missed_count == 17
    assert len(res.events) == 1


def test_cpu_stats() -> None:
    text = "entries: 0\noverrun: 3\ncommit overrun: 0\noldest event ts:     0.000000\ndropped events: 12\n"
    stats = parse_cpu_stats(text)
    assert (stats["overrun"], stats["dropped events"]) == (3, 12)
    assert "oldest event ts" not in stats


def test_subbuffer_bad_commit_is_refused() -> None:
    bad = struct.pack("=QQ", 0, 5000) + b"\0" * 100
    with pytest.raises(FormatError):
        parse_subbuffer(bad, 0, LAYOUT, FORMATS)
    with pytest.raises(FormatError):
        parse_subbuffer(b"\0" * 8, 0, LAYOUT, FORMATS)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 1 << 34),  # delta, ns (sometimes needs a time extension)
            st.booleans(),  # rss_stat or signal_generate
            st.integers(-(2**31), 2**31 - 1),
            st.integers(0, 2**40),
            st.booleans(),  # long form
        ),
        max_size=40,
    ),
    st.integers(0, 2**50),
)
def test_subbuffer_round_trip(items: list[tuple[int, bool, int, int, bool]], base: int) -> None:
    entries = []
    expected = []
    ts = base
    for delta, is_rss, pid, size, long_form in items:
        if delta >= 1 << 27:
            entries.append(time_extend(delta))
            step = 0
        else:
            step = delta
        ts += delta
        payload = rss_payload(pid, 3, 0, 1, size) if is_rss else gen_payload(pid, 9, pid)
        entries.append(data_entry(step, payload, force_long=long_form))
        expected.append((ts, pid, size if is_rss else None))
    res = parse_subbuffer(page(base, entries, size=8192), 0, LAYOUT, FORMATS)
    got = [(e.ts_ns, e.pid, e.fields["size"] if e.name == "kmem:rss_stat" else None) for e in res.events]
    assert got == expected


# --- timeline -------------------------------------------------------------------------------------

VICTIM, REAPER, KILLER, OTHER = 100, 60, 50, 999
MM, MM_ID, OWN_MM_ID = 0xFFFF0000AAAA0000, 7, 9
ALL_EVENTS = frozenset(
    {
        "signal:signal_generate",
        "signal:signal_deliver",
        "syscalls:sys_enter_process_mrelease",
        "syscalls:sys_exit_process_mrelease",
        "sched:sched_process_exit",
        "mmap:exit_mmap",
        "kmem:rss_stat",
        "lock:contention_begin",
        "lock:contention_end",
        "mmap_lock:mmap_lock_start_locking",
        "mmap_lock:mmap_lock_acquire_returned",
    }
)


def ev(ts: int, name: str, task: int, **fields: int) -> TraceEvent:
    return TraceEvent(ts, 0, name, task, dict(fields))


def rss(ts: int, pid: int, member: int, kib: int, mm_id: int = MM_ID, curr: int = 0) -> TraceEvent:
    return ev(ts, "kmem:rss_stat", pid, mm_id=mm_id, curr=curr, member=member, size=kib * 1024)


def kill_events() -> list[TraceEvent]:
    """One kill: baseline anon 1000 KiB, file 100 KiB; the reaper frees 400 anon, the victim the rest."""
    return [
        ev(500, "signal:signal_generate", KILLER, sig=9, pid=VICTIM),  # before the window: dropped
        ev(1100, "signal:signal_generate", KILLER, sig=9, pid=VICTIM),
        ev(1150, "syscalls:sys_enter_process_mrelease", REAPER, pidfd=4, flags=0),
        ev(1160, "mmap_lock:mmap_lock_start_locking", REAPER, mm=MM, write=0),
        ev(1170, "mmap_lock:mmap_lock_acquire_returned", REAPER, mm=MM, write=0, success=1),
        rss(1200, REAPER, 1, 800),
        rss(1250, REAPER, 1, 600),
        ev(1300, "signal:signal_deliver", VICTIM, sig=9),
        ev(1310, "sched:sched_process_exit", VICTIM, pid=VICTIM, group_dead=1),
        ev(1315, "sched:sched_process_exit", OTHER, pid=OTHER, group_dead=1),  # not ours
        ev(1320, "mmap_lock:mmap_lock_start_locking", VICTIM, mm=MM, write=0),
        ev(1350, "mmap_lock:mmap_lock_acquire_returned", VICTIM, mm=MM, write=0, success=1),
        ev(1400, "lock:contention_begin", VICTIM, lock_addr=0xA, flags=1),
        ev(1420, "lock:contention_begin", REAPER, lock_addr=0xB, flags=1),
        ev(1425, "lock:contention_end", REAPER, lock_addr=0xB, ret=0),
        ev(1450, "lock:contention_end", VICTIM, lock_addr=0xA, ret=0),
        ev(1460, "lock:contention_begin", VICTIM, lock_addr=0xC, flags=2),  # a sleeping lock (rwsem)
        ev(1490, "lock:contention_end", VICTIM, lock_addr=0xC, ret=0),
        rss(1500, VICTIM, 1, 300),
        rss(1510, VICTIM, 0, 0),
        ev(1600, "syscalls:sys_exit_process_mrelease", REAPER, ret=0),
        # The reaper thread's own business after the reap: not about the victim.
        ev(1700, "mmap_lock:mmap_lock_start_locking", REAPER, mm=0x1234, write=1),
        ev(1800, "mmap_lock:mmap_lock_acquire_returned", REAPER, mm=0x1234, write=1, success=1),
        rss(1700, REAPER, 1, 5000, mm_id=OWN_MM_ID, curr=1),
        rss(1900, VICTIM, 1, 0),
        ev(2000, "mmap:exit_mmap", VICTIM, mm=MM, mt=0),
    ]


WINDOW = KillWindow(VICTIM, frozenset({VICTIM}), REAPER, 1000, {"anon": 1000, "file": 100, "shmem": 0, "swap": 0})


def test_timeline_of_a_kill_on_6_18() -> None:
    events = kill_events()[::-1]  # order of arrival must not matter
    tl = build_timeline(
        events, WINDOW, (6, 18), enabled=ALL_EVENTS, proc_exit_ns=2100, rss_before_kib=1100, mrelease_wall_ns=500
    )
    assert tl.unavailable_reason is None
    assert (tl.signal_generate_ns, tl.signal_deliver_ns) == (1100, 1300)
    assert (tl.exit_start_ns, tl.exit_mmap_end_ns) == (1310, 2000)
    assert (tl.mrelease_enter_ns, tl.mrelease_exit_ns, tl.mrelease_ret, tl.proc_exit_ns) == (1150, 1600, 0, 2100)
    assert tl.freed_by_reaper_kib == {"file": 0, "anon": 400, "swap": 0, "shmem": 0}
    assert tl.freed_by_victim_kib == {"file": 100, "anon": 600, "swap": 0, "shmem": 0}
    assert tl.mmap_lock_wait_ns == {"reaper": 10, "victim": 30}
    assert tl.lock_contention_ns == {"reaper": 5, "victim": 50, "reaper_sleep": 0, "victim_sleep": 30}
    assert tl.lock_contention_count == {"reaper": 1, "victim": 1, "reaper_sleep": 0, "victim_sleep": 1}
    assert tl.reaper_work_ns == 450
    assert tl.exit_mmap_ns == 2000 - 1310
    assert tl.reap_total_ns == 450 + 690
    # 1100 KiB from the reaper's start (1150) to the victim's exit_mmap end (2000).
    assert tl.reap_throughput_mib_s == pytest.approx((1100 / 1024) / (850 / 1e9))
    assert tl.notes == []


def test_before_6_16_exit_mmap_starts_at_signal_deliver() -> None:
    tl = build_timeline(kill_events(), WINDOW, (6, 12), enabled=ALL_EVENTS)
    assert tl.exit_mmap_ns == 2000 - 1300
    assert any("signal_deliver" in n and "6.16" in n for n in tl.notes)


def test_missing_events_leave_fields_none_with_reasons() -> None:
    events = [e for e in kill_events() if e.name not in ("mmap:exit_mmap", "syscalls:sys_exit_process_mrelease")]
    enabled = ALL_EVENTS - {"mmap:exit_mmap", "lock:contention_begin", "lock:contention_end"}
    tl = build_timeline(events, WINDOW, (6, 18), enabled=enabled)
    assert tl.exit_mmap_end_ns is None and tl.exit_mmap_ns is None and tl.reap_total_ns is None
    assert tl.mrelease_exit_ns is None and tl.reaper_work_ns is None
    assert tl.lock_contention_ns is None and tl.lock_contention_count is None
    assert any(n.startswith("exit_mmap_end_ns: event not traced") for n in tl.notes)
    assert any(n.startswith("mrelease_exit_ns") for n in tl.notes)
    assert any(n.startswith("lock_contention_*") for n in tl.notes)


def test_no_events_in_window() -> None:
    tl = build_timeline([ev(10, "signal:signal_generate", 1, sig=9, pid=VICTIM)], WINDOW, (6, 18), enabled=ALL_EVENTS)
    assert tl.unavailable_reason == "no trace events in the kill window"
    assert tl.signal_generate_ns is None


def test_rss_without_baseline_loses_only_the_first_batch() -> None:
    window = KillWindow(VICTIM, frozenset({VICTIM}), REAPER, 1000, None)
    tl = build_timeline(kill_events(), window, (6, 18), enabled=ALL_EVENTS)
    # The first anon event (reaper, 800) and the first file event (victim, 0) have no "before".
    assert tl.freed_by_reaper_kib is not None and tl.freed_by_reaper_kib["anon"] == 200
    assert tl.freed_by_victim_kib is not None and tl.freed_by_victim_kib["file"] == 0
    assert any("baseline" in n for n in tl.notes)


def test_no_mrelease_means_total_is_exit_mmap_alone() -> None:
    events = [e for e in kill_events() if e.pid != REAPER]
    tl = build_timeline(events, WINDOW, (6, 18), enabled=ALL_EVENTS)
    assert tl.reaper_work_ns is None
    assert tl.reap_total_ns == tl.exit_mmap_ns == 690
    assert any("exit_mmap alone" in n for n in tl.notes)


def test_exit_mmap_in_another_holder_is_noted() -> None:
    events = [e for e in kill_events() if e.name != "mmap:exit_mmap"]
    events.append(ev(3000, "mmap:exit_mmap", OTHER, mm=MM, mt=0))
    tl = build_timeline(events, WINDOW, (6, 18), enabled=ALL_EVENTS)
    assert tl.exit_mmap_end_ns == 3000
    assert any(f"task {OTHER}" in n for n in tl.notes)


def test_reused_mm_address_later_in_the_window_is_not_ours() -> None:
    # After the victim's mm is freed, a process exiting later may have an mm at the same address.
    events = [*kill_events(), ev(5000, "mmap:exit_mmap", OTHER, mm=MM, mt=0)]
    tl = build_timeline(events, WINDOW, (6, 18), enabled=ALL_EVENTS)
    assert tl.exit_mmap_end_ns == 2000
    assert not any(f"task {OTHER}" in n for n in tl.notes)


def test_inconsistencies_are_noted() -> None:
    tl = build_timeline(
        kill_events(), WINDOW, (6, 18), enabled=ALL_EVENTS, rss_before_kib=5000, mrelease_wall_ns=100
    )
    assert any("exceeds the measured process_mrelease wall time" in n for n in tl.notes)
    assert any("RSS before the kill was 5000" in n for n in tl.notes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3), st.integers(0, 50)), max_size=60))
def test_rss_attribution_conserves_memory(steps: list[tuple[bool, int, int]]) -> None:
    """Each side's share is the sum of its own decrements; both shares add up to what went."""
    baseline = {"file": 3000, "anon": 3000, "swap": 3000, "shmem": 3000}
    kinds = ["file", "anon", "swap", "shmem"]
    current = dict(baseline)
    expected = {"reaper": dict.fromkeys(kinds, 0), "victim": dict.fromkeys(kinds, 0)}
    events = [ev(1001, "signal:signal_deliver", VICTIM, sig=9)]
    for i, (by_reaper, member, kib) in enumerate(steps):
        kind = kinds[member]
        kib = min(kib, current[kind])
        current[kind] -= kib
        side = "reaper" if by_reaper else "victim"
        expected[side][kind] += kib
        events.append(rss(1010 + i, REAPER if by_reaper else VICTIM, member, current[kind]))
    window = KillWindow(VICTIM, frozenset({VICTIM}), REAPER, 1000, baseline)
    tl = build_timeline(events, window, (6, 18), enabled=ALL_EVENTS)
    if not steps:
        assert tl.freed_by_reaper_kib is None
        return
    assert tl.freed_by_reaper_kib == expected["reaper"]
    assert tl.freed_by_victim_kib == expected["victim"]


# --- helpers --------------------------------------------------------------------------------------


def _eval_filter(text: str, pid: int) -> bool:
    expr = text.replace("&&", " and ").replace("||", " or ").replace("common_pid", str(pid))
    assert re.fullmatch(r"[\d\s()<>=andor]+", expr), expr
    return bool(eval(expr))  # the expression is digits and comparisons only, checked just above


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(1, 4_000_000), min_size=1, max_size=400))
def test_pid_filter_matches_the_ids(tids: set[int]) -> None:
    text = pid_filter(tids)
    assert len(text) <= 3800
    for tid in tids:
        assert _eval_filter(text, tid)
    lo, hi = min(tids), max(tids)
    for probe in (lo - 1, hi + 1):
        assert not _eval_filter(text, probe)
    if "||" in text or "common_pid ==" in text:  # exact form (not the span fallback)
        gaps = [t + 1 for t in tids if t + 1 not in tids and t + 1 < hi]
        assert not any(_eval_filter(text, g) for g in gaps[:20])


def test_pid_filter_ranges_and_fallback() -> None:
    assert pid_filter([5]) == "common_pid == 5"
    assert pid_filter([3, 1, 2, 9]) == "(common_pid >= 1 && common_pid <= 3) || common_pid == 9"
    many = list(range(1000, 3000, 2))
    assert pid_filter(many) == "common_pid >= 1000 && common_pid <= 2998"
    with pytest.raises(ValueError):
        pid_filter([])


def test_status_rss_by_kind() -> None:
    text = (
        "Name:\tpython\nVmRSS:\t  272376 kB\nRssAnon:\t  266780 kB\nRssFile:\t    5596 kB\n"
        "RssShmem:\t       0 kB\nVmSwap:\t 12 kB\n"
    )
    assert parse_status_rss_kib(text) == {"anon": 266780, "file": 5596, "shmem": 0, "swap": 12}


def test_kernel_version() -> None:
    assert parse_kernel_version("6.18.44-fc-v595") == (6, 18)
    assert parse_kernel_version("7.3.0-1-cloud-arm64") == (7, 3)
    assert parse_kernel_version("garbage") == (0, 0)


# --- proc connector -------------------------------------------------------------------------------


def proc_datagram(what: int, body: bytes, ts: int = 123) -> bytes:
    event = struct.pack("=IIQ", what, 1, ts) + body
    cn = struct.pack("=IIIIHH", CN_IDX_PROC, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), NLMSG_DONE, 0, 0, 0) + cn


def test_proc_exit_parsed_and_other_events_skipped() -> None:
    exit_body = struct.pack("=IIIIII", 4242, 4242, 9, 17, 1, 1)
    fork_body = struct.pack("=IIII", 1, 1, 4243, 4243)
    data = proc_datagram(1, fork_body) + proc_datagram(PROC_EVENT_EXIT, exit_body, ts=987654321)
    (ex,) = parse_proc_exits(data)
    assert (ex.pid, ex.tgid, ex.exit_code, ex.exit_signal, ex.timestamp_ns, ex.cpu) == (4242, 4242, 9, 17, 987654321, 1)
    assert parse_proc_exits(data[:30]) == []
    assert parse_proc_exits(proc_datagram(PROC_EVENT_EXIT, exit_body)[:-8]) == []


def test_control_message_layout() -> None:
    msg = control_message(PROC_CN_MCAST_LISTEN, 77)
    length, typ, _, _, port = struct.unpack_from("=IHHII", msg)
    assert (length, typ, port) == (len(msg), NLMSG_DONE, 77) and length == 16 + 20 + 4
    idx, val, _, _, plen, _ = struct.unpack_from("=IIIIHH", msg, 16)
    assert (idx, val, plen) == (1, 1, 4)
    assert struct.unpack_from("=I", msg, 36)[0] == PROC_CN_MCAST_LISTEN
    filtered = control_message(PROC_CN_MCAST_LISTEN, 77, PROC_EVENT_EXIT)
    assert struct.unpack_from("=HII", filtered, 32)[0] == 8
    assert struct.unpack_from("=II", filtered, 36) == (PROC_CN_MCAST_LISTEN, PROC_EVENT_EXIT)


# --- open_tracer without I/O ------------------------------------------------------------------------


def test_mode_off_and_bad_mode() -> None:
    tracer = open_tracer("off")
    assert isinstance(tracer, NullTracer)
    tracer.before_kill(1, 2)
    tl = tracer.after_kill(1, 2, None, None)
    assert tl.unavailable_reason == "tracing off" and tl.signal_generate_ns is None
    tracer.close()
    with pytest.raises(ValueError):
        open_tracer("sometimes")
    assert TracingUnavailable("x").reason == "x"


def test_data_loc_field_is_named_by_its_last_word() -> None:
    from lmkd_py.tracing.ringbuf import parse_event_format

    fmt = parse_event_format(
        "oom",
        "name: mark_victim\nID: 7\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
        "\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;\n"
        "\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n"
        "\tfield:char name[16];\toffset:16;\tsize:16;\tsigned:0;\n",
    )
    names = {f.name: f.is_array for f in fmt.fields}
    assert names["comm"] is True and names["name"] is True and names["pid"] is False
    assert "char" not in names
