"""``lmkd-py trace-export`` (lmkd_py/report/trace.py): the trace-event format's required fields, every
slice inside its kill's top-level slice, proper nesting per track, selection by id, and untrusted input."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

from lmkd_py.records import (
    KernelTimeline,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Pressure,
    Provenance,
    Steps,
    Victim,
    record_json,
)
from lmkd_py.report import cmd_trace_export
from lmkd_py.report.trace import trace_document

T0 = 5_000_000_000_000  # CLOCK_MONOTONIC ns of the kill's start, as on a machine up for ~83 minutes


def full_record(record_id: str = "rec-1", t0: int = T0, **kernel: Any) -> KillRecord:
    """A kill with every step and every timeline field, in the order they happen on 6.16+."""
    ms = 1_000_000
    tl = {
        "source": "tracefs+proc_connector",
        "signal_generate_ns": t0 + 3 * ms + 10_000, "signal_deliver_ns": t0 + 3 * ms + 200_000,
        "mrelease_enter_ns": t0 + 3 * ms + 50_000, "mrelease_exit_ns": t0 + 20 * ms, "mrelease_ret": 0,
        "exit_start_ns": t0 + 3 * ms + 300_000, "exit_mmap_end_ns": t0 + 22 * ms, "proc_exit_ns": t0 + 23 * ms,
        "freed_by_reaper_kib": {"anon": 200_000, "file": 10, "swap": 0, "shmem": 0},
        "freed_by_victim_kib": {"anon": 60_000, "file": 5_000, "swap": 0, "shmem": 0},
        "mmap_lock_wait_ns": {"reaper": 1_000, "victim": 2_000},
        "lock_contention_ns": {"reaper": 10, "victim": 20, "reaper_sleep": 0, "victim_sleep": 5},
        "reaper_work_ns": 20 * ms - 3 * ms - 50_000, "exit_mmap_ns": 22 * ms - 3 * ms - 300_000,
        "reap_total_ns": 36 * ms,
    }
    tl.update(kernel)
    return KillRecord(
        record_id=record_id, kill_id=None, wall_time="2026-03-01T12:00:00+00:00", outcome=Outcome.KILLED,
        victim=Victim(pid=4242, comm="hog\x1b[2J", rss_kib=266_000),
        steps=Steps(start_ns=t0, pidfd_opened_ns=t0 + 100_000, identity_checked_ns=t0 + 200_000,
                    sizes_read_ns=t0 + 2 * ms, signal_sent_ns=t0 + 3 * ms + 20_000,
                    mrelease_start_ns=t0 + 3 * ms + 30_000,
                    mrelease_end_ns=t0 + 20 * ms + 10_000, exit_observed_ns=t0 + 24 * ms,
                    mem_recovered_ns=t0 + 25 * ms, end_ns=t0 + 26 * ms),
        mrelease=Mrelease(status=MreleaseStatus.OK, ret=0, wall_ns=17 * ms, reaper_tid=777),
        mem_available_before_kib=1_000_000, mem_available_after_kib=1_260_000, kill_to_exit_ns=21 * ms,
        pressure=Pressure(kill_reason="psi_critical"), kernel=KernelTimeline(**tl),
        provenance=Provenance(kernel_release="6.18.0"),
    )


def check_format(doc: dict[str, Any]) -> None:
    """The rules a viewer relies on, for every event of ``doc``."""
    assert set(doc) == {"traceEvents", "displayTimeUnit"} and doc["displayTimeUnit"] == "ns"
    events = doc["traceEvents"]
    assert events
    for e in events:
        assert {"name", "ph", "ts", "pid", "tid"} <= e.keys(), e
        assert isinstance(e["name"], str) and e["ph"] in {"X", "C", "M", "i"}
        assert isinstance(e["ts"], int | float) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "X":
            assert isinstance(e["dur"], int | float) and e["dur"] >= 0, e
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, int | float) for v in e["args"].values())
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        by_pid.setdefault(e["pid"], []).append(e)
    eps = 1e-6
    for pid, evs in by_pid.items():
        named = {e["tid"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
        assert any(e["ph"] == "M" and e["name"] == "process_name" for e in evs), pid
        tops = [e for e in evs if e["ph"] == "X" and e["name"].startswith("kill ")]
        assert len(tops) == 1, f"kill {pid} has one top-level slice"
        top = tops[0]
        lo, hi = top["ts"], top["ts"] + top["dur"]
        for e in evs:
            if e["ph"] in ("X", "i", "C"):
                assert e["tid"] in named, f"tid {e['tid']} of {e['name']} has no thread_name"
                end = e["ts"] + e.get("dur", 0)
                assert lo - eps <= e["ts"] and end <= hi + eps, f"{e['name']} is outside its kill"
        # on each track, slices nest or are disjoint: never a partial overlap
        for tid in {e["tid"] for e in evs if e["ph"] == "X"}:
            spans = sorted(((e["ts"], e["ts"] + e["dur"]) for e in evs if e["ph"] == "X" and e["tid"] == tid),
                           key=lambda s: (s[0], -s[1]))
            stack: list[float] = []
            for start, end in spans:
                while stack and stack[-1] <= start + eps:
                    stack.pop()
                assert not stack or end <= stack[-1] + eps, f"partial overlap on tid {tid} of kill {pid}"
                stack.append(end)


def slices(doc: dict[str, Any], pid: int = 1) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] == pid}


def test_a_full_kill_has_every_track_and_slice() -> None:
    doc = trace_document([full_record()])
    check_format(doc)
    json.dumps(doc, allow_nan=False)
    s = slices(doc)
    assert {"pidfd_open", "identity check", "read sizes", "wait for exit", "wait for memory back",
            "process_mrelease (call)", "process_mrelease (kernel)", "SIGKILL generate -> deliver", "exit_mmap",
            "exit (sched_process_exit -> proc connector)"} <= s.keys()
    kernel = s["process_mrelease (kernel)"]
    assert kernel["ts"] == pytest.approx(3050.0) and kernel["dur"] == pytest.approx(16950.0)  # microseconds
    assert kernel["args"]["freed_kib"]["anon"] == 200_000 and kernel["args"]["mmap_lock_wait_ns"] == 1_000
    assert s["exit_mmap"]["args"]["lock_contention_ns_sleep"] == 5
    assert s["exit_mmap"]["dur"] == pytest.approx(18700.0)
    top = next(v for k, v in s.items() if k.startswith("kill "))
    assert top["ts"] == 0 and top["args"]["monotonic_start_ns"] == T0 and top["args"]["record_id"] == "rec-1"
    assert "\x1b" not in json.dumps(doc), "names from the record are escaped"
    tracks = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert tracks == {"lmkd-py", "reaper tid 777", "victim pid 4242"}
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    reaper = [e["args"]["anon"] for e in counters if e["name"] == "freed by reaper (KiB)"]
    assert reaper == [0, 200_000]
    assert [e["args"]["free"] for e in counters if e["name"] == "free memory (KiB)"] == [1_000_000, 1_260_000]


def test_a_record_without_a_timeline_still_shows_its_steps() -> None:
    r = dataclasses.replace(full_record(), kernel=KernelTimeline(unavailable_reason="tracefs not mounted"))
    doc = trace_document([r])
    check_format(doc)
    s = slices(doc)
    assert "process_mrelease (call)" in s and "exit_mmap" not in s
    top = next(v for k, v in s.items() if k.startswith("kill "))
    assert top["args"]["timeline"] == "tracefs not mounted"


def test_odd_records_stay_valid_traces() -> None:
    """A slice ending before it starts is left out (named in the top slice); one that overlaps its track
    without nesting goes to a second lane of that track."""
    r = full_record(exit_start_ns=T0 + 21_000_000, proc_exit_ns=T0 + 20_000_000,  # exit ends before it starts
                    signal_deliver_ns=T0 + 10_000_000, exit_mmap_ns=15_000_000)  # exit_mmap overlaps the signal
    doc = trace_document([r])
    check_format(doc)
    top = next(v for k, v in slices(doc).items() if k.startswith("kill "))
    assert any("exit (sched_process_exit" in x for x in top["args"]["skipped"])
    lanes = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert "victim (2) pid 4242" in lanes


def _files(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(record_json(full_record("rec-a")) + "\n" + '{"schema_version": 1, "record_id": 5}\n')
    b.write_text("not json at all\n" + record_json(full_record("rec-b", t0=9 * T0)) + "\n")
    return [a, b]


def _run(files: list[Path], out: Path, kill: str | None = None) -> tuple[int, str]:
    err = io.StringIO()
    rc = cmd_trace_export(Namespace(files=files, kill=kill, output=out), err=err)
    return rc, err.getvalue()


def test_several_files_one_process_per_kill_and_bad_lines_named(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    rc, err = _run(_files(tmp_path), out)
    assert rc == 0, err
    assert f"{tmp_path / 'a.jsonl'}:2: skipped" in err and f"{tmp_path / 'b.jsonl'}:1: skipped: not JSON" in err
    doc = json.loads(out.read_text())
    check_format(doc)
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert set(names) == {1, 2} and "rec-a" in names[1] and "rec-b" in names[2]


def test_kill_id_selects_one_kill(tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    rc, err = _run(_files(tmp_path), out, kill="rec-b")
    assert rc == 0, err
    doc = json.loads(out.read_text())
    check_format(doc)
    assert {e["pid"] for e in doc["traceEvents"]} == {1}
    assert slices(doc)["kill hog\\x1b[2J (pid 4242)"]["args"]["record_id"] == "rec-b"
    rc, err = _run(_files(tmp_path), tmp_path / "none.json", kill="no-such-id")
    assert rc == 2 and "no record with id 'no-such-id'" in err and not (tmp_path / "none.json").exists()


def test_unreadable_input_and_output_exit_2(tmp_path: Path) -> None:
    rc, err = _run([tmp_path / "missing.jsonl"], tmp_path / "t.json")
    assert rc == 2 and "missing.jsonl" in err
    rc, err = _run([tmp_path], tmp_path / "t.json")
    assert rc == 2 and "not a record file (a directory)" in err
    rc, err = _run(_files(tmp_path), tmp_path / "no-dir" / "t.json")
    assert rc == 2 and "cannot write" in err


def test_the_command_line(tmp_path: Path) -> None:
    files = _files(tmp_path)
    out = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "trace-export", *map(str, files), "--kill", "rec-a",
                          "-o", "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    check_format(json.loads(out.stdout))
    # the report family's face, and so trace-export, never needs numpy
    code = "import sys, lmkd_py.report, lmkd_py.report.trace; assert 'numpy' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
