"""The kernel timeline on this machine's kernel: real tracefs instance, real kills, real proc connector.

Mounts: the ``tracefs`` fixture MOUNTS tracefs at /sys/kernel/tracing when it is not mounted yet (the
tracer needs it; mounting tracefs is harmless) and unmounts it again at the end of the module, since
it was not there before. Two tests mount a small tmpfs under ``tmp_path`` (unmounted in ``finally``).
Every test checks that no ``lmkd-py-*`` instance is left behind (autouse fixture).
"""

from __future__ import annotations

import mmap
import os
import re
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from lmkd_py.killer import Killer, KillTracer
from lmkd_py.records import KernelTimeline, Outcome
from lmkd_py.syscalls import SIGKILL, LinuxSyscalls
from lmkd_py.tracing import (
    DEFAULT_ROOTS,
    TRACEFS_ENV,
    NullTracer,
    TracefsTracer,
    TracingUnavailable,
    find_tracefs,
    open_tracer,
    parse_kernel_version,
)
from lmkd_py.tracing.connector import ProcConnector
from tests.conftest import Children, check_no_instance_left, needs_root

pytestmark = [needs_root, pytest.mark.root]

SYS = LinuxSyscalls()


class Tracefs:
    def __init__(self, root: Path, mounted_by_us: bool) -> None:
        self.root = root
        self.mounted_by_us = mounted_by_us


def _mounted(root: Path) -> bool:
    return (root / "instances").is_dir()


@pytest.fixture(scope="module")
def tracefs() -> Iterator[Tracefs]:
    """The tracefs mount; mounted here (and unmounted afterwards) when it was not mounted."""
    for root in DEFAULT_ROOTS:
        if _mounted(root):
            yield Tracefs(root, mounted_by_us=False)
            return
    root = DEFAULT_ROOTS[0]
    out = subprocess.run(["mount", "-t", "tracefs", "nodev", str(root)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"tracefs is not mounted and cannot be mounted here: {out.stderr.strip()}")
    try:
        yield Tracefs(root, mounted_by_us=True)
    finally:
        # Unmount only when nobody else has started using it meanwhile (an instance of theirs).
        if _mounted(root) and not any((root / "instances").iterdir()):
            subprocess.run(["umount", str(root)], capture_output=True)


@pytest.fixture(autouse=True)
def no_instance_left(tracefs: Tracefs) -> Iterator[None]:
    yield from check_no_instance_left(tracefs.root)


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class Reaper:
    """A thread that sends SIGKILL through a pidfd and at once calls process_mrelease (as the
    killer's reaper thread does), optionally pinned to one CPU."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self.tid = 0
        self.wall_ns: int | None = None
        self.ret: int | None = None
        self.sent_ns = 0
        self._go = threading.Event()
        self._ready = threading.Event()
        self.pidfd = -1
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        self.tid = threading.get_native_id()
        self._ready.set()
        self._go.wait()
        SYS.pidfd_send_signal(self.pidfd, SIGKILL)
        self.sent_ns = time.monotonic_ns()
        t0 = time.monotonic_ns()
        try:
            self.ret = SYS.process_mrelease(self.pidfd, 0)
        except OSError as exc:
            self.ret = -(exc.errno or 0)
        self.wall_ns = time.monotonic_ns() - t0

    def kill(self, pidfd: int) -> None:
        self.pidfd = pidfd
        self._go.set()
        self._thread.join(10)


def manual_kill(
    tracer: TracefsTracer | NullTracer, victim: subprocess.Popen[str], cpu: int | None
) -> tuple[KernelTimeline, Reaper, int, int, int]:
    """Kill ``victim`` with the tracer around it. Returns (timeline, reaper, rss_before_kib,
    before_kill_ns, exit_observed_ns)."""
    reaper = Reaper(cpu)
    rss_before = _status_kib(victim.pid, "VmRSS")
    pidfd = SYS.pidfd_open(victim.pid)
    try:
        t_before = time.monotonic_ns()
        tracer.before_kill(victim.pid, reaper.tid)
        reaper.kill(pidfd)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        assert poller.poll(10_000), "victim did not exit within 10 s"
        exit_ns = time.monotonic_ns()
        tl = tracer.after_kill(victim.pid, reaper.tid, rss_before, reaper.wall_ns)
    finally:
        os.close(pidfd)
    assert victim.wait(10) == -9
    return tl, reaper, rss_before, t_before, exit_ns


@pytest.mark.parametrize("placement", ["reaper-first", "race"])
def test_256_mib_kill_timeline_is_complete_and_consistent(
    tracefs: Tracefs, children: Children, placement: str
) -> None:
    victim = children.victim(256)
    cpu = None
    if placement == "reaper-first":
        # The victim may run only when the reaper's CPU is otherwise idle, so the reaper does the
        # bulk of the teardown: this proves the reaper's side is seen and attributed.
        cpu = 0
        os.sched_setaffinity(victim.pid, {cpu})
        os.sched_setscheduler(victim.pid, os.SCHED_IDLE, os.sched_param(0))
    with open_tracer("on", tracefs_root=tracefs.root) as tracer:
        assert isinstance(tracer, TracefsTracer)
        tl, reaper, rss_before, t_before, exit_ns = manual_kill(tracer, victim, cpu)
    assert tl.unavailable_reason is None, tl.notes
    assert tl.source == "tracefs+proc_connector"
    for name in (
        "signal_generate_ns", "signal_deliver_ns", "mrelease_enter_ns", "mrelease_exit_ns", "mrelease_ret",
        "exit_start_ns", "exit_mmap_end_ns", "proc_exit_ns", "freed_by_reaper_kib", "freed_by_victim_kib",
        "mmap_lock_wait_ns", "lock_contention_ns", "lock_contention_count", "reaper_work_ns", "exit_mmap_ns",
        "reap_total_ns", "reap_throughput_mib_s",
    ):
        assert getattr(tl, name) is not None, (name, tl.notes)
    # Kernel timestamps are on the clock of time.monotonic_ns(): they fall inside our own marks.
    assert t_before <= tl.signal_generate_ns <= reaper.sent_ns
    order = [tl.signal_generate_ns, tl.signal_deliver_ns, tl.exit_start_ns, tl.exit_mmap_end_ns, tl.proc_exit_ns]
    assert order == sorted(order), tl
    assert tl.proc_exit_ns <= exit_ns + 1_000_000  # the pidfd turns readable just before the event
    assert tl.signal_generate_ns <= tl.mrelease_enter_ns <= tl.mrelease_exit_ns
    assert reaper.wall_ns is not None and tl.reaper_work_ns <= reaper.wall_ns
    assert tl.reaper_work_ns == tl.mrelease_exit_ns - tl.mrelease_enter_ns
    assert tl.reap_total_ns == tl.reaper_work_ns + tl.exit_mmap_ns
    assert tl.mrelease_ret == reaper.ret
    kinds = ("file", "anon", "shmem")
    freed = sum(tl.freed_by_reaper_kib[k] + tl.freed_by_victim_kib[k] for k in kinds)
    assert abs(freed - rss_before) <= rss_before / 10, (freed, rss_before, tl)
    if placement == "reaper-first":
        assert tl.mrelease_ret == 0
        assert tl.freed_by_reaper_kib["anon"] > tl.freed_by_victim_kib["anon"], tl
    assert not [n for n in tl.notes if "out of order" in n or "exceeds" in n], tl.notes


THREADED_VICTIM = textwrap.dedent(
    """
    import sys, threading, time
    threads = [threading.Thread(target=time.sleep, args=(3600,), daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    b = bytearray(128 << 20)
    b[::4096] = b"\\1" * len(range(0, 128 << 20, 4096))
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def test_multithreaded_victim(tracefs: Tracefs, children: Children) -> None:
    victim = subprocess.Popen([sys.executable, "-c", THREADED_VICTIM], stdout=subprocess.PIPE, text=True)
    children.procs.append(victim)
    assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
    assert len(os.listdir(f"/proc/{victim.pid}/task")) == 9
    with open_tracer("on", tracefs_root=tracefs.root) as tracer:
        tl, _, rss_before, _, _ = manual_kill(tracer, victim, None)
    assert tl.unavailable_reason is None, tl.notes
    assert tl.exit_start_ns is not None and tl.exit_mmap_end_ns is not None
    assert tl.signal_deliver_ns <= tl.exit_start_ns <= tl.exit_mmap_end_ns
    assert tl.exit_mmap_ns is not None and 0 < tl.exit_mmap_ns <= tl.exit_mmap_end_ns - tl.exit_start_ns
    freed = sum(tl.freed_by_reaper_kib[k] + tl.freed_by_victim_kib[k] for k in ("file", "anon", "shmem"))
    assert abs(freed - rss_before) <= rss_before / 10, (freed, rss_before, tl)


def test_real_killer_fills_kernel_timeline(tracefs: Tracefs, children: Children) -> None:
    victim = children.victim(256)
    with open_tracer("on", tracefs_root=tracefs.root) as tracer:
        killer = Killer(SYS, tracer=tracer)
        try:
            rec = killer.kill(killer.snapshot(victim.pid))
        finally:
            killer.close()
    assert rec.outcome is Outcome.KILLED
    k = rec.kernel
    assert k is not None and k.unavailable_reason is None, k
    s = rec.steps
    assert s.identity_checked_ns is not None and s.signal_sent_ns is not None
    assert s.identity_checked_ns <= k.signal_generate_ns <= s.signal_sent_ns
    assert s.mrelease_start_ns <= k.mrelease_enter_ns <= k.mrelease_exit_ns <= s.mrelease_end_ns
    assert rec.mrelease.wall_ns is not None and k.reaper_work_ns <= rec.mrelease.wall_ns
    assert k.exit_mmap_end_ns <= s.exit_observed_ns
    assert k.exit_mmap_ns and k.exit_mmap_ns > 0


def _kill_sleepers(tracer: KillTracer, children: Children, n: int) -> list[KernelTimeline]:
    out = []
    for _ in range(n):
        p = children.sleeper()
        time.sleep(0.05)
        fd = SYS.pidfd_open(p.pid)
        try:
            tracer.before_kill(p.pid, threading.get_native_id())
            SYS.pidfd_send_signal(fd, SIGKILL)
            assert p.wait(10) == -9  # the kill happens whatever the tracer could do
            out.append(tracer.after_kill(p.pid, threading.get_native_id(), None, None))
        finally:
            os.close(fd)
    return out


def _warnings(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e.get("log_level") == "warning"]


def test_no_tracefs_at_root_gives_null_timelines_and_one_warning(tmp_path: Path, children: Children) -> None:
    with capture_logs() as logs:
        tracer = open_tracer("auto", tracefs_root=tmp_path)
        timelines = _kill_sleepers(tracer, children, 3)
        tracer.close()
    assert isinstance(tracer, NullTracer)
    assert [e["event"] for e in _warnings(logs)] == ["tracing.unavailable"]
    for tl in timelines:
        assert tl.unavailable_reason and "not a tracefs mount" in tl.unavailable_reason
        assert tl.signal_generate_ns is None and tl.freed_by_reaper_kib is None
    with pytest.raises(TracingUnavailable, match="not a tracefs mount"):
        open_tracer("on", tracefs_root=tmp_path)


def test_read_only_tracefs_gives_null_timelines_and_says_what_to_do(
    tmp_path: Path, children: Children, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    # A read-only tmpfs that looks like tracefs (what ProtectKernelTunables=yes makes of /sys/kernel/tracing).
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(ro)], check=True)
    try:
        (ro / "instances").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with capture_logs() as logs:
            tracer = open_tracer("auto", tracefs_root=ro)
            timelines = _kill_sleepers(tracer, children, 3)
            tracer.close()
        with pytest.raises(TracingUnavailable, match="mounted read-only"):
            open_tracer("on", tracefs_root=ro)
        # Found in the usual places (no $LMKD_PY_TRACEFS): the message names the path and the cure.
        monkeypatch.delenv(TRACEFS_ENV, raising=False)
        monkeypatch.setattr("lmkd_py.tracing.tracer.DEFAULT_ROOTS", (ro,))
        with pytest.raises(TracingUnavailable) as info:
            find_tracefs(None, None)
        assert str(ro) in info.value.reason and TRACEFS_ENV in info.value.reason
        assert "ProtectKernelTunables" in info.value.reason
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert [e["event"] for e in _warnings(logs)] == ["tracing.unavailable"]
    assert all(tl.unavailable_reason and "read-only" in tl.unavailable_reason for tl in timelines)


def test_instance_removed_under_us_warns_once_and_never_raises(tracefs: Tracefs, children: Children) -> None:
    with capture_logs() as logs:
        tracer = open_tracer("on", tracefs_root=tracefs.root)
        assert isinstance(tracer, TracefsTracer)
        tracer.path.rmdir()  # someone removes our instance (no file of it is open between kills)
        timelines = _kill_sleepers(tracer, children, 3)
        tracer.close()
    assert [e["event"] for e in _warnings(logs)] == ["tracing.kill_window_failed"]
    for tl in timelines:
        assert tl.unavailable_reason and "reading the trace failed" in tl.unavailable_reason
        assert any("tracing_on could not be set" in n for n in tl.notes)


def test_exception_in_the_middle_of_a_kill_removes_the_instance(tracefs: Tracefs, children: Children) -> None:
    victim = children.victim(64)
    path = None
    with pytest.raises(RuntimeError, match="boom"), open_tracer("on", tracefs_root=tracefs.root) as tracer:
        assert isinstance(tracer, TracefsTracer)
        path = tracer.path
        tracer.before_kill(victim.pid, threading.get_native_id())
        assert (path / "tracing_on").read_text().strip() == "1"
        victim.kill()
        raise RuntimeError("boom")
    assert path is not None and not path.exists()


SIGTERM_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from lmkd_py.tracing import open_tracer
    tracer = open_tracer("on")
    mode = sys.argv[1]
    if mode == "close":  # what the daemon does: close() from its SIGTERM handling
        def on_term(signum, frame):
            tracer.close()
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    elif mode == "exit":  # SystemExit from the handler: the atexit belt removes it
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    # in the middle of a kill window (ourselves as the "victim": nothing is killed)
    tracer.before_kill(os.getpid(), threading.get_native_id())
    print("PATH=" + str(tracer.path), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("mode", ["close", "exit", "default"])
def test_sigterm_leaves_no_instance(tracefs: Tracefs, mode: str) -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, mode], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2]
    )
    try:
        assert p.stdout is not None
        line = ""
        while not line.startswith("PATH="):  # structlog's default output shares stdout
            line = p.stdout.readline()
            assert line, "child ended before opening its tracer"
        path = Path(line.strip().removeprefix("PATH="))
        assert path.name == f"lmkd-py-{p.pid}" and path.exists()
        p.terminate()
        p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if mode != "default":
        assert not path.exists()
        return
    # Default SIGTERM disposition: nothing can run, the instance stays; the next run removes it.
    assert path.exists()
    with capture_logs() as logs:
        tracer = open_tracer("on", tracefs_root=tracefs.root)
        tracer.close()
    assert not path.exists()
    assert {"event": "tracing.stale_instance_removed", "instance": path.name, "log_level": "info"} in logs


def test_stale_sweep_spares_live_pids(tracefs: Tracefs, children: Children) -> None:
    live = children.sleeper()
    kept = tracefs.root / "instances" / f"lmkd-py-{live.pid}"
    kept.mkdir()
    try:
        tracer = open_tracer("on", tracefs_root=tracefs.root)
        tracer.close()
        assert kept.exists()
    finally:
        kept.rmdir()


def test_stale_sweep_removes_an_instance_whose_pid_was_reused(tracefs: Tracefs, tmp_path: Path) -> None:
    """Issue 18 item 8: /proc/PID alone is not the maker. A fake /proc gives the pid a start time after
    the instance's creation (a younger process reusing the pid): the instance is the crashed maker's."""
    from lmkd_py.tracing.raw import remove_stale_instances

    stale = tracefs.root / "instances" / "lmkd-py-999999"
    stale.mkdir()
    try:
        created = stale.stat().st_mtime
        proc = tmp_path / "proc"
        (proc / "999999").mkdir(parents=True)
        ticks = os.sysconf("SC_CLK_TCK")
        btime = int(created) - 1000
        (proc / "stat").write_text(f"cpu 1 2 3\nbtime {btime}\n")

        def started_at(wall_s: float) -> None:
            start = int((wall_s - btime) * ticks)
            (proc / "999999" / "stat").write_text(f"999999 (sleep) S 1 1 1 0 -1 0 {'0 ' * 12}{start} 0 0\n")

        started_at(created - 50)  # older than the instance: may be its maker, kept
        assert remove_stale_instances(tracefs.root, structlog.get_logger(), proc) == [] and stale.exists()
        started_at(created + 50)  # younger: the pid was reused, removed
        assert remove_stale_instances(tracefs.root, structlog.get_logger(), proc) == [stale.name]
        assert not stale.exists()
    finally:
        if stale.exists():
            stale.rmdir()


def test_full_buffer_is_noted(tracefs: Tracefs, children: Children) -> None:
    p = children.sleeper()
    tid = threading.get_native_id()
    with open_tracer("on", tracefs_root=tracefs.root, buffer_kib_per_cpu=8) as tracer:
        tracer.before_kill(p.pid, tid)
        for _ in range(20000):  # mmap_lock events from the "reaper" (this thread) overflow 8 KiB
            mmap.mmap(-1, 1 << 16).close()
        p.kill()
        p.wait()
        tl = tracer.after_kill(p.pid, tid, None, None)
    assert any(re.fullmatch(r"cpu\d+: trace buffer full, \d+ events lost", n) for n in tl.notes), tl.notes


def test_proc_connector_sees_exit_of_a_killed_child(children: Children) -> None:
    conn = ProcConnector(parse_kernel_version(os.uname().release))
    try:
        p = children.sleeper()
        time.sleep(0.05)
        conn.listen()
        fd = SYS.pidfd_open(p.pid)
        t_kill = time.monotonic_ns()
        SYS.pidfd_send_signal(fd, SIGKILL)
        os.close(fd)
        exits = conn.exits_of(p.pid, 2_000_000_000)
        t_after = time.monotonic_ns()
        conn.ignore()
    finally:
        conn.close()
    leader = [e for e in exits if e.pid == p.pid]
    assert leader, exits
    assert leader[0].exit_code & 0x7F == SIGKILL
    assert t_kill <= leader[0].timestamp_ns <= t_after


def test_top_level_settings_untouched(tracefs: Tracefs, children: Children) -> None:
    names = ["tracing_on", "trace_clock", "set_event", "set_event_pid", "current_tracer", "buffer_size_kb"]
    before = {n: (tracefs.root / n).read_text() for n in names}
    with open_tracer("on", tracefs_root=tracefs.root) as tracer:
        _kill_sleepers(tracer, children, 1)
    assert {n: (tracefs.root / n).read_text() for n in names} == before


def test_window_narrows_then_clears_filters(tracefs: Tracefs, children: Children) -> None:
    p = children.sleeper()
    tid = threading.get_native_id()
    with open_tracer("on", tracefs_root=tracefs.root) as tracer:
        assert isinstance(tracer, TracefsTracer)
        filt = tracer.path / "events/kmem/rss_stat/filter"
        assert filt.read_text().strip() == "none"
        tracer.before_kill(p.pid, tid)
        assert str(p.pid) in filt.read_text() and str(tid) in filt.read_text()
        assert (tracer.path / "tracing_on").read_text().strip() == "1"
        # No kill: the exit-timeout path. Nothing raises; the missing parts say why.
        tl = tracer.after_kill(p.pid, tid, None, None)
        assert (tracer.path / "tracing_on").read_text().strip() == "0"
        assert tl.exit_mmap_end_ns is None and tl.proc_exit_ns is None
        assert any(n.startswith("proc_exit_ns: no exit event") for n in tl.notes)
        deadline = time.monotonic() + 5
        while filt.read_text().strip() != "none" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert filt.read_text().strip() == "none"


def test_open_mounts_tracefs_when_missing(tracefs: Tracefs) -> None:
    if not tracefs.mounted_by_us:
        pytest.skip("tracefs was mounted before these tests; not unmounting what someone else mounted")
    if any((tracefs.root / "instances").iterdir()):
        pytest.skip("another process uses tracefs instances now; not unmounting under it")
    assert subprocess.run(["umount", str(tracefs.root)]).returncode == 0
    with capture_logs() as logs:
        tracer = open_tracer("on")  # mounts tracefs again (the fixture unmounts it at the end)
        tracer.close()
    assert _mounted(tracefs.root)
    assert any(e["event"] == "tracing.tracefs_mounted" for e in logs)

