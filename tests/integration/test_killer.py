"""The kill path on real processes: real pidfds, real SIGKILL, real process_mrelease on this kernel.
Errno values the kernel will not give on demand are scripted (tests/fakes.py) on top of real calls."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmkd_py.killer import Killer, KillOptions
from lmkd_py.records import MreleaseStatus, Outcome, Victim
from lmkd_py.syscalls import LinuxSyscalls
from tests.conftest import Children
from tests.fakes import ScriptedSyscalls

LMKD = [sys.executable, "-m", "lmkd_py.cli"]


def alive(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_cli_kill_256_mib_child(children: Children, tmp_path: Path) -> None:
    victim = children.victim(256)
    records = tmp_path / "records.jsonl"
    out = subprocess.run(
        [*LMKD, "kill", str(victim.pid), "--records", str(records), "--tracing", "off"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"pid {victim.pid}" in out.stdout and "killed" in out.stdout
    assert victim.wait(timeout=10) == -9  # the process is gone, by SIGKILL
    (line,) = records.read_text().splitlines()
    rec = json.loads(line)
    assert rec["outcome"] == "killed" and rec["dry_run"] is False
    assert rec["victim"]["rss_kib"] >= 250 * 1024
    assert rec["victim"]["rss_anon_kib"] >= 250 * 1024
    s = rec["steps"]
    order = ["start_ns", "pidfd_opened_ns", "identity_checked_ns", "sizes_read_ns", "signal_sent_ns",
             "mrelease_start_ns", "mrelease_end_ns", "end_ns"]
    assert all(isinstance(s[k], int) for k in order), s
    assert [s[k] for k in order] == sorted(s[k] for k in order)
    assert s["signal_sent_ns"] < s["exit_observed_ns"] <= s["end_ns"]
    assert rec["mrelease"]["status"] in ("ok", "already_released")
    assert rec["mrelease"]["ret"] == 0 or rec["mrelease"]["errno_name"] == "ESRCH"
    assert rec["mrelease"]["reaper_tid"] and rec["mrelease"]["thread_cpu_ns"] is not None
    assert rec["kill_to_exit_ns"] == s["exit_observed_ns"] - s["signal_sent_ns"] > 0
    assert rec["mem_available_before_kib"] and rec["mem_available_after_kib"]
    p = rec["provenance"]
    assert p["kernel_release"] == os.uname().release and p["arch"] == os.uname().machine
    assert p["boot_id"] and p["lmkd_py_version"] and p["config_hash"]


def test_identity_mismatch_is_refused_and_nothing_signalled(children: Children) -> None:
    child = children.sleeper()
    sys_ = ScriptedSyscalls()
    killer = Killer(sys_)
    snap = killer.snapshot(child.pid)
    assert snap.start_time_ticks is not None
    rec = killer.kill(dataclasses.replace(snap, start_time_ticks=snap.start_time_ticks - 1))
    killer.close()
    assert rec.outcome is Outcome.REFUSED_IDENTITY
    assert "expected" in (rec.error or "")
    assert "pidfd_send_signal" not in sys_.calls and "process_mrelease" not in sys_.calls
    assert rec.steps.signal_sent_ns is None
    assert alive(child.pid)


def test_dry_run_signals_nothing(children: Children) -> None:
    child = children.victim(16)
    sys_ = ScriptedSyscalls()
    killer = Killer(sys_)
    rec = killer.kill(killer.snapshot(child.pid), dry_run=True)
    killer.close()
    assert rec.outcome is Outcome.DRY_RUN and rec.dry_run
    assert rec.victim.rss_anon_kib is not None and rec.victim.rss_anon_kib >= 16 * 1024
    assert sys_.calls == ["pidfd_open"]
    assert alive(child.pid)


def _kill_with(children: Children, fail: dict[str, int], times: int | None = None) -> tuple[object, ...]:
    child = children.victim(8)
    sys_ = ScriptedSyscalls(fail, times)
    killer = Killer(sys_, options=KillOptions(exit_timeout_ns=5_000_000_000))
    rec = killer.kill(killer.snapshot(child.pid))
    killer.close()
    return rec, sys_, child


@pytest.mark.parametrize(
    ("call", "err", "outcome"),
    [
        ("pidfd_open", errno.ESRCH, Outcome.GONE),
        ("pidfd_open", errno.EPERM, Outcome.SIGNAL_FAILED),
        ("pidfd_open", errno.EINVAL, Outcome.SIGNAL_FAILED),
        ("pidfd_send_signal", errno.ESRCH, Outcome.GONE),
        ("pidfd_send_signal", errno.EPERM, Outcome.SIGNAL_FAILED),
        ("pidfd_send_signal", errno.EBADF, Outcome.SIGNAL_FAILED),
    ],
)
def test_errno_before_the_signal(children: Children, call: str, err: int, outcome: Outcome) -> None:
    rec, sys_, child = _kill_with(children, {call: err})
    assert rec.outcome is outcome  # type: ignore[attr-defined]
    assert errno.errorcode[err] in (rec.error or "")  # type: ignore[attr-defined]
    assert rec.mrelease.status is MreleaseStatus.NOT_ATTEMPTED  # type: ignore[attr-defined]
    assert "process_mrelease" not in sys_.calls  # type: ignore[attr-defined]
    assert alive(child.pid)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("err", "status", "note"),
    [
        (errno.ESRCH, MreleaseStatus.ALREADY_RELEASED, "dropped its mm"),
        (errno.EINVAL, MreleaseStatus.ERROR, "not dying"),
        (errno.EBADF, MreleaseStatus.ERROR, "not a pidfd"),
        (errno.EPERM, MreleaseStatus.ERROR, "not permitted"),
        (errno.EINTR, MreleaseStatus.ERROR, "retried 1x"),
        (errno.EAGAIN, MreleaseStatus.ERROR, "MMU notifier"),
        (errno.ENOSYS, MreleaseStatus.UNSUPPORTED, "5.15"),
    ],
)
def test_mrelease_errno_still_a_kill(children: Children, err: int, status: MreleaseStatus, note: str) -> None:
    rec, _, child = _kill_with(children, {"process_mrelease": err})
    assert rec.outcome is Outcome.KILLED, rec.error  # type: ignore[attr-defined]
    m = rec.mrelease  # type: ignore[attr-defined]
    assert m.status is status
    assert m.errno == err and m.errno_name == errno.errorcode[err]
    assert note in (m.note or "")
    assert child.wait(timeout=10) == -9  # type: ignore[attr-defined]


def test_transient_eintr_is_retried_once_and_succeeds(children: Children) -> None:
    rec, sys_, _ = _kill_with(children, {"process_mrelease": errno.EINTR}, times=1)
    assert sys_.calls.count("process_mrelease") == 2  # type: ignore[attr-defined]
    assert rec.mrelease.status in (MreleaseStatus.OK, MreleaseStatus.ALREADY_RELEASED)  # type: ignore[attr-defined]


def test_enosys_falls_back_to_kill_only_for_later_kills(children: Children) -> None:
    sys_ = ScriptedSyscalls({"process_mrelease": errno.ENOSYS})
    killer = Killer(sys_)
    first = killer.kill(killer.snapshot(children.victim(8).pid))
    second = killer.kill(killer.snapshot(children.victim(8).pid))
    killer.close()
    assert first.mrelease.status is second.mrelease.status is MreleaseStatus.UNSUPPORTED
    assert second.outcome is Outcome.KILLED
    assert sys_.calls.count("process_mrelease") == 1  # not tried again after ENOSYS


def test_real_mrelease_after_sigkill_frees_memory(children: Children) -> None:
    killer = Killer(LinuxSyscalls())
    victim = children.victim(256)
    rec = killer.kill(killer.snapshot(victim.pid))
    killer.close()
    assert rec.outcome is Outcome.KILLED
    assert rec.mrelease.status in (MreleaseStatus.OK, MreleaseStatus.ALREADY_RELEASED)
    assert rec.mrelease.wall_ns is not None and rec.mrelease.wall_ns > 0
    # MemAvailable is system-wide: allow for other activity, but most of the 256 MiB must show.
    assert rec.mem_recovered_kib is not None and rec.mem_recovered_kib > 96 * 1024


def test_gone_process_is_recorded_not_raised(children: Children) -> None:
    child = children.sleeper()
    killer = Killer(LinuxSyscalls())
    snap = killer.snapshot(child.pid)
    child.kill()
    child.wait()
    rec = killer.kill(snap)
    killer.close()
    assert rec.outcome is Outcome.GONE


def test_no_mrelease_option_is_a_baseline(children: Children) -> None:
    killer = Killer(ScriptedSyscalls(), options=KillOptions(mrelease=False))
    victim = children.victim(32)
    rec = killer.kill(Victim(pid=victim.pid))
    killer.close()
    assert rec.outcome is Outcome.KILLED and rec.mrelease.status is MreleaseStatus.DISABLED
