"""Observe mode on this machine's kernel: real kills by others, real kernel OOM kills, real tracefs.

Two ways of running the observer: in a thread of this process (``run_observe``, with a 100 ms warm-table
refresh so victims started by the test are in it) and as the command a user runs (``python -m lmkd_py.cli
observe``, stopped by SIGTERM/SIGINT/--duration). Kills are made by helper processes the test starts, on
processes the test starts; OOM kills happen inside a v1 memcg with a 32 MiB limit. Every test checks that
no ``lmkd-py-*`` tracefs instance of this process or of a finished observer is left (autouse fixture).

Mounts: the ``tracefs_root`` fixture (tests/conftest.py) mounts tracefs at /sys/kernel/tracing when it is
not mounted yet and unmounts it at the end of the module when it mounted it and nobody else has an instance
in it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from lmkd_py.config import Config
from lmkd_py.journal import JournalSender
from lmkd_py.observe import run_observe
from lmkd_py.records import KillRecord, ListSink, MreleaseStatus, Outcome, read_records, record_json
from lmkd_py.stress import PressureCgroup
from tests.conftest import Children, check_no_instance_left, needs_root
from tests.journald import JournalReceiver

pytestmark = [needs_root, pytest.mark.root]

V1_MEMORY = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup/unified")
needs_cgroups = pytest.mark.skipif(
    not V1_MEMORY.is_dir() or not V2_ROOT.is_dir(),
    reason="needs the cgroup v1 memory controller and the cgroup v2 hierarchy (hybrid layout)",
)


@pytest.fixture(autouse=True)
def no_instance_left(tracefs_root: Path) -> Iterator[None]:
    yield from check_no_instance_left(tracefs_root)


# ---------------------------------------------------------------------------------------------------------
# Observers


class ThreadObserver:
    """``run_observe`` on a thread of this process, records into a ListSink."""

    def __init__(self, tracefs_root: Path, cgroup: Path | None = None, **options: Any) -> None:
        self.sink = ListSink()
        self.rc: int | None = None
        self._stop = threading.Event()
        self._rfd, self._wfd = os.pipe()
        self._args: dict[str, Any] = {"cgroup": cgroup, "tracefs_root": tracefs_root, **options}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.rc = run_observe(
            Config(), sink=self.sink, duration_ns=None, stop=self._stop.is_set, wake_fd=self._rfd,
            warm_refresh_ns=100_000_000, **self._args,
        )

    def start(self, logs: Sequence[Mapping[str, Any]]) -> None:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not any(e.get("event") == "observe.ready" for e in logs):
            assert self._thread.is_alive(), f"observer ended (rc {self.rc}): {logs}"
            assert time.monotonic() < deadline, "observe.ready not logged within 20 s"
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wfd, b"x")
        self._thread.join(20)
        os.close(self._rfd)
        os.close(self._wfd)
        assert not self._thread.is_alive(), "observer did not stop"
        assert self.rc == 0

    def record_for(self, pid: int, timeout_s: float = 15) -> KillRecord:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = [r for r in self.sink.records if r.victim.pid == pid]
            if got:
                assert len(got) == 1, got
                return got[0]
            assert self._thread.is_alive(), f"observer ended (rc {self.rc})"
            time.sleep(0.02)
        have = [r.victim.pid for r in self.sink.records]
        raise AssertionError(f"no record for pid {pid} within {timeout_s} s; have {have}")


@pytest.fixture
def observer(tracefs_root: Path) -> Iterator[ThreadObserver]:
    with capture_logs() as logs:
        obs = ThreadObserver(tracefs_root)
        obs.start(logs)
        try:
            yield obs
        finally:
            obs.stop()


class CliObserver:
    """``lmkd-py observe`` as a user runs it, in a subprocess."""

    def __init__(self, records: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmkd_py.cli", "observe", "--records", str(records), "--log-format", "json",
             *extra],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []

    def wait_ready(self, timeout_s: float = 20) -> dict[str, Any]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if not ready:
                continue
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"observe exited early (rc {self.proc.wait()}): {self.lines}")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "observe.ready":
                return dict(event)
        raise AssertionError(f"observe.ready not logged within {timeout_s} s: {self.lines}")

    def stop(self, sig: int | None = signal.SIGTERM, timeout_s: float = 20) -> int:
        if sig is not None:
            self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout_s)
        self.lines.extend(err.splitlines())
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def cli_observers() -> Iterator[list[CliObserver]]:
    made: list[CliObserver] = []
    try:
        yield made
    finally:
        for o in made:
            o.kill()


def _assert_exit(rec: KillRecord) -> None:
    """The exit is the proc connector's exit event of the victim, or, when the victim was gone before
    observe subscribed (a few ms after the kill; a busy machine can make it later), the end of exit_mmap
    or the last sched_process_exit, noted."""
    k = rec.kernel
    assert k is not None and k.signal_generate_ns is not None and k.exit_mmap_end_ns is not None
    exit_ns = rec.steps.exit_observed_ns
    if k.proc_exit_ns is not None:
        assert exit_ns == k.proc_exit_ns >= k.exit_mmap_end_ns
    else:
        assert any(n.startswith("exit_observed_ns: no proc-connector exit") for n in rec.notes), rec.notes
        assert exit_ns is not None and exit_ns >= k.exit_mmap_end_ns
    assert rec.kill_to_exit_ns == exit_ns - k.signal_generate_ns > 0


# ---------------------------------------------------------------------------------------------------------
# A foreign killer: pidfd + SIGKILL + process_mrelease, like Android lmkd or a vendor daemon

FOREIGN_KILLER = textwrap.dedent(
    """
    import ctypes, json, os, signal, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    pids = [int(p) for p in sys.argv[1].split(",")]
    fds = {p: os.pidfd_open(p) for p in pids}
    for p in pids:  # signal every victim first, then reap them in the same order
        signal.pidfd_send_signal(fds[p], signal.SIGKILL)
    calls = {}
    for p in pids:
        t0 = time.monotonic_ns()
        ret = libc.syscall(448, fds[p], 0)  # process_mrelease(pidfd, 0)
        calls[p] = [t0, time.monotonic_ns(), ret, ctypes.get_errno() if ret < 0 else 0]
    # Keep the pidfds open a moment: observe reads the pidfd's target from /proc/PID/fdinfo when the
    # call's trace event wakes it (~0.1 ms later); a call that fails at once with ESRCH is over by then.
    time.sleep(0.3)
    print(json.dumps({"pid": os.getpid(), "comm": open("/proc/self/comm").read().strip(), "calls": calls}))
    """
)


def test_foreign_killer_is_recorded_with_its_mrelease_matched(
    observer: ThreadObserver, children: Children
) -> None:
    a, b = children.victim(128), children.victim(128)
    time.sleep(0.4)  # a warm-table refresh (every 100 ms here) sees both
    out = subprocess.run([sys.executable, "-c", FOREIGN_KILLER, f"{a.pid},{b.pid}"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    helper = json.loads(out.stdout)
    assert a.wait(10) == -9 and b.wait(10) == -9
    for victim in (a, b):
        rec = observer.record_for(victim.pid)
        t0, t1, ret, err = helper["calls"][str(victim.pid)]
        assert rec.observed and rec.outcome is Outcome.OBSERVED and not rec.dry_run
        assert rec.killer is not None
        assert (rec.killer.kind, rec.killer.pid, rec.killer.comm) == ("process", helper["pid"], helper["comm"])
        # Signal A, signal B, reap A, reap B: a match by "the killer's latest signal" would swap the two
        # calls; the pidfd's target read from fdinfo does not, and this call's timestamps prove it.
        assert rec.killer.match == "fdinfo", rec.notes
        k = rec.kernel
        assert k is not None and k.unavailable_reason is None
        assert k.mrelease_enter_ns is not None and k.mrelease_exit_ns is not None
        assert t0 <= k.mrelease_enter_ns <= k.mrelease_exit_ns <= t1
        assert rec.mrelease.reaper_tid == helper["pid"]
        assert rec.mrelease.wall_ns == k.mrelease_exit_ns - k.mrelease_enter_ns
        if ret == 0:
            assert rec.mrelease.status is MreleaseStatus.OK and k.reaper_work_ns == rec.mrelease.wall_ns
        else:
            assert rec.mrelease.errno == err and rec.mrelease.status is MreleaseStatus.ALREADY_RELEASED
        # The kill itself precedes the call; the exit is complete and timed on the same clock.
        assert k.signal_generate_ns is not None and k.signal_generate_ns < t0
        assert rec.steps.start_ns == rec.steps.signal_sent_ns == k.signal_generate_ns
        assert rec.steps.mrelease_start_ns == k.mrelease_enter_ns
        assert k.exit_mmap_end_ns is not None and k.exit_mmap_ns is not None and k.exit_mmap_ns > 0
        _assert_exit(rec)
        assert k.reap_total_ns == k.exit_mmap_ns + (k.reaper_work_ns or 0)
        # Sizes as last seen before the kill (the warm table), not the half-freed ones after it.
        assert rec.victim.rss_anon_kib is not None and rec.victim.rss_anon_kib >= 120 * 1024, rec.notes
        assert rec.mem_available_before_kib is not None and rec.mem_available_after_kib is not None


# ---------------------------------------------------------------------------------------------------------
# The kernel's OOM killer in a v1 memcg

OOM_CHILD = textwrap.dedent(
    """
    import os, sys
    print(os.getpid(), flush=True)
    for procs in sys.argv[1:]:
        with open(procs, "w") as fh:
            fh.write(str(os.getpid()))
    b = bytearray(128 << 20)
    b[::4096] = b"\\1" * len(range(0, 128 << 20, 4096))  # touch every page: past the 32 MiB limit
    """
)

# Holds the OOM victim at its PTRACE_EVENT_EXIT stop (before exit_mm) for a while, so the kernel's
# oom_reaper (which starts 2 s after the kill) finds the victim's memory still there and reaps it.
HOLDING_TRACER = textwrap.dedent(
    """
    import ctypes, os, signal, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    TRACEME, CONT, SETOPTIONS = 0, 7, 0x4200
    O_TRACEEXIT, O_EXITKILL, EVENT_EXIT = 0x40, 0x100000, 6
    hold_s, procs = float(sys.argv[1]), sys.argv[2:]
    pid = os.fork()
    if pid == 0:
        libc.ptrace(TRACEME, 0, None, None)
        os.kill(os.getpid(), signal.SIGSTOP)
        for p in procs:
            with open(p, "w") as fh:
                fh.write(str(os.getpid()))
        b = bytearray(128 << 20)
        b[::4096] = b"\\1" * len(range(0, 128 << 20, 4096))
        os._exit(0)
    os.waitpid(pid, 0)  # its SIGSTOP
    print(pid, flush=True)
    libc.ptrace(SETOPTIONS, pid, None, O_TRACEEXIT | O_EXITKILL)
    libc.ptrace(CONT, pid, None, None)
    held = False
    while True:
        _, st = os.waitpid(pid, 0)
        if os.WIFSTOPPED(st) and st >> 16 == EVENT_EXIT:
            held = True
            time.sleep(hold_s)
            libc.ptrace(CONT, pid, None, None)
        elif os.WIFSTOPPED(st):
            libc.ptrace(CONT, pid, None, os.WSTOPSIG(st))
        else:
            print("held" if held else "not-held", os.WTERMSIG(st) if os.WIFSIGNALED(st) else -1, flush=True)
            break
    """
)


@pytest.fixture
def memcg() -> Iterator[PressureCgroup]:
    with PressureCgroup(f"lmkd-py-test-observe-{os.getpid()}", limit_mib=32) as cg:
        oom_control = cg.v1_path / "memory.oom_control"
        oom_control.write_text("0")  # the memcg OOM killer on (oom_kill_disable 0)
        assert "oom_kill_disable 0" in oom_control.read_text()
        yield cg


def _assert_kernel_oom(rec: KillRecord, pid: int) -> None:
    assert rec.observed and rec.outcome is Outcome.OBSERVED
    assert rec.killer is not None and rec.killer.kind == "kernel_oom" and rec.killer.pid is None, rec.killer
    assert rec.mrelease.status is MreleaseStatus.NOT_ATTEMPTED
    k = rec.kernel
    assert k is not None and k.signal_generate_ns is not None and k.signal_deliver_ns is not None
    assert k.exit_mmap_end_ns is not None and k.exit_mmap_ns is not None
    _assert_exit(rec)
    # Sizes from the OOM killer's own count at the kill: anonymous memory up to the 32 MiB limit, give or
    # take the interpreter's pages charged before it joined the memcg.
    anon = rec.victim.rss_anon_kib
    assert rec.victim.pid == pid and anon is not None and 16 * 1024 <= anon <= 40 * 1024, rec.victim
    assert "victim sizes: from the OOM killer's mark_victim event, at the kill" in rec.notes


@needs_cgroups
def test_memcg_oom_kill_is_recorded_as_the_kernel_oom_killer(
    observer: ThreadObserver, memcg: PressureCgroup
) -> None:
    child = subprocess.run([sys.executable, "-c", OOM_CHILD, *map(str, memcg.procs_files)], timeout=60,
                           capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    assert memcg.oom_kill_count() == 1
    pid = int(child.stdout)
    rec = observer.record_for(pid)
    _assert_kernel_oom(rec, pid)
    k = rec.kernel
    assert k is not None
    # The victim exits in milliseconds, well within the oom_reaper's 2 s delay: the reaper is woken
    # (and then only skips) or, as usual, never runs, and the record says which.
    reaper_notes = [n for n in k.notes if n.startswith("oom_reaper:")]
    if k.oom_reaper_start_ns is None:
        assert reaper_notes, k.notes
    assert k.reap_total_ns is not None


@needs_cgroups
def test_oom_reaper_start_and_finish_are_recorded(observer: ThreadObserver, memcg: PressureCgroup) -> None:
    tracer = subprocess.Popen([sys.executable, "-c", HOLDING_TRACER, "2.6", *map(str, memcg.procs_files)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout is not None
        pid = int(tracer.stdout.readline())
        memcg.adopt(pid)  # killed by the cgroup's cleanup if the test fails half-way
        held, sig = tracer.stdout.readline().split()
        assert tracer.wait(30) == 0
    finally:
        if tracer.poll() is None:
            tracer.kill()  # PTRACE_O_EXITKILL takes the victim along
        tracer.wait()
    assert (held, sig) == ("held", "9")
    rec = observer.record_for(pid)
    _assert_kernel_oom(rec, pid)
    k = rec.kernel
    assert k is not None and k.signal_generate_ns is not None and k.exit_start_ns is not None
    assert k.proc_exit_ns is not None  # the victim was held for seconds: subscribed long before its exit
    assert k.oom_reaper_start_ns is not None and k.oom_reaper_end_ns is not None, k.notes
    # The reaper starts OOM_REAPER_DELAY (2 s) after the kill, reaps while the victim is held, and the
    # victim's own exit comes after that.
    assert k.signal_generate_ns + 1_900_000_000 <= k.oom_reaper_start_ns < k.oom_reaper_end_ns <= k.exit_start_ns
    assert k.reaper_work_ns == k.oom_reaper_end_ns - k.oom_reaper_start_ns > 0
    assert k.reap_total_ns == k.reaper_work_ns + k.exit_mmap_ns  # type: ignore[operator]
    assert rec.kill_to_exit_ns is not None and rec.kill_to_exit_ns >= 2_600_000_000


# ---------------------------------------------------------------------------------------------------------
# Scope, noise, and the command's life

@needs_cgroups
def test_cgroup_scope_records_only_victims_inside(tracefs_root: Path, children: Children) -> None:
    with PressureCgroup(f"lmkd-py-test-observe-scope-{os.getpid()}", limit_mib=None) as cg, capture_logs() as logs:
        obs = ThreadObserver(tracefs_root, cgroup=cg.v2_path)
        obs.start(logs)
        try:
            inside, outside = children.victim(16), children.victim(16)
            cg.add(inside.pid)
            time.sleep(0.3)
            inside.kill()
            outside.kill()
            assert inside.wait(10) == -9 and outside.wait(10) == -9
            rec = obs.record_for(inside.pid)
            assert rec.victim.cgroup == "/" + cg.name and rec.killer is not None and rec.killer.pid == os.getpid()
            time.sleep(0.3)
            assert [r.victim.pid for r in obs.sink.records] == [inside.pid]
        finally:
            obs.stop()


def test_without_mrelease_tracing_kills_are_still_recorded(tracefs_root: Path, children: Children) -> None:
    with capture_logs() as logs:
        obs = ThreadObserver(tracefs_root, trace_mrelease=False)
        obs.start(logs)
        try:
            ready = next(e for e in logs if e.get("event") == "observe.ready")
            assert not [e for e in ready["events"] if e.startswith("syscalls:")]  # no syscall slow path
            victim = children.victim(32)
            out = subprocess.run([sys.executable, "-c", FOREIGN_KILLER, str(victim.pid)], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            rec = obs.record_for(victim.pid)
        finally:
            obs.stop()
    assert rec.killer is not None and rec.killer.pid == json.loads(out.stdout)["pid"] and rec.killer.match is None
    assert rec.mrelease.status is MreleaseStatus.NOT_ATTEMPTED and rec.mrelease.note == "process_mrelease not traced"
    k = rec.kernel
    assert k is not None and k.mrelease_enter_ns is None and k.exit_mmap_ns is not None and k.reap_total_ns is None
    _assert_exit(rec)


# A victim whose name tries to smuggle a field into the journal entry (comm holds 15 bytes).
HOSTILE_COMM = "x\nLMKD_OUTCOME="
HOSTILE_VICTIM = textwrap.dedent(
    """
    import ctypes, sys, time
    ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
    b = bytearray(32 << 20)
    b[::4096] = b"\\1" * len(range(0, 32 << 20, 4096))
    print("ready", flush=True)
    time.sleep(3600)
    """
)


def test_each_observed_kill_is_a_structured_journal_entry(
    tracefs_root: Path, children: Children, tmp_path: Path
) -> None:
    """Issue 14 item 6: the record observe writes also goes, field by field, to a socket speaking
    journald's native protocol; the victim's hostile name stays inside its own field."""
    receiver = JournalReceiver(tmp_path / "journal.sock")
    try:
        with capture_logs() as logs:
            obs = ThreadObserver(tracefs_root, journal=JournalSender(str(receiver.path)))
            obs.start(logs)
            try:
                victim = subprocess.Popen([sys.executable, "-c", HOSTILE_VICTIM, HOSTILE_COMM],
                                          stdout=subprocess.PIPE, text=True)
                children.procs.append(victim)
                assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
                assert Path(f"/proc/{victim.pid}/comm").read_text() == HOSTILE_COMM + "\n"
                time.sleep(0.3)  # a warm-table refresh sees it
                out = subprocess.run([sys.executable, "-c", FOREIGN_KILLER, str(victim.pid)], capture_output=True,
                                     text=True, timeout=30)
                assert out.returncode == 0, out.stderr
                assert victim.wait(10) == -9
                rec = obs.record_for(victim.pid)
                entry = receiver.recv()
            finally:
                obs.stop()
    finally:
        receiver.close()
    names = [n for n, _ in entry.fields]
    assert len(names) == len(set(names)), names
    assert entry["LMKD_OUTCOME"] == "observed" and entry["PRIORITY"] == "5"
    assert entry["LMKD_VICTIM_PID"] == str(victim.pid) and entry["LMKD_RECORD_ID"] == rec.record_id
    assert entry.all("LMKD_VICTIM_COMM") == [HOSTILE_COMM.encode()]
    helper = json.loads(out.stdout)
    assert entry["LMKD_KILLER"] == "process" and entry["LMKD_KILLER_PID"] == str(helper["pid"])
    assert rec.kill_to_exit_ns is not None and entry["LMKD_KILL_TO_EXIT_MS"] == f"{rec.kill_to_exit_ns / 1e6:.3f}"
    k = rec.kernel
    assert k is not None and k.exit_mmap_ns is not None
    assert entry["LMKD_EXIT_MMAP_MS"] == f"{k.exit_mmap_ns / 1e6:.3f}"
    if k.reap_total_ns is not None:
        assert entry["LMKD_REAP_TOTAL_MS"] == f"{k.reap_total_ns / 1e6:.3f}"
    message = entry["MESSAGE"]
    assert "\n" not in message and message.startswith(f"{helper['comm']} (pid {helper['pid']}) killed x\\n")
    assert "exit after" in message


SHORT_LIVED = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    pids = [os.getpid()]
    for _ in range(int(sys.argv[1])):  # fork + _exit
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        pids.append(pid)
        os.waitpid(pid, 0)
    for _ in range(int(sys.argv[2])):  # fork + exec
        p = subprocess.Popen(["/bin/true"])
        pids.append(p.pid)
        assert p.wait() == 0
    code = "import threading, time, os\\n" \\
           "[threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(4)]\\n" \\
           "time.sleep(0.05); os._exit(0)"
    for _ in range(5):  # exit_group of a multi-threaded process: its threads take an internal SIGKILL
        p = subprocess.Popen([sys.executable, "-c", code])
        pids.append(p.pid)
        assert p.wait() == 0
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGSEGV):  # killed, but not by SIGKILL
        p = subprocess.Popen(["sleep", "60"])
        pids.append(p.pid)
        time.sleep(0.02)
        p.send_signal(sig)
        p.wait()
    print(json.dumps(pids), flush=True)
    """
)


def test_short_lived_processes_make_no_records(
    tmp_path: Path, tracefs_root: Path, cli_observers: list[CliObserver], children: Children
) -> None:
    records = tmp_path / "observed.jsonl"
    obs = CliObserver(records)
    cli_observers.append(obs)
    obs.wait_ready()
    out = subprocess.run([sys.executable, "-c", SHORT_LIVED, "400", "200"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    short_lived = set(json.loads(out.stdout))
    assert len(short_lived) == 1 + 400 + 200 + 5 + 3
    # One real SIGKILL at the end: observe was live all along (otherwise "no records" proves nothing).
    last = children.sleeper()
    time.sleep(0.1)
    last.kill()
    assert last.wait(10) == -9
    deadline = time.monotonic() + 10
    while str(last.pid) not in (records.read_text() if records.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert obs.stop(signal.SIGTERM) == 0, obs.lines
    got = read_records([records])
    assert not got.problems
    # The machine may be shared (other test runs kill their own processes): judge only our processes.
    ours = [r for r in got.records if r.victim.pid in short_lived | {last.pid}]
    assert [r.victim.pid for r in ours] == [last.pid], [record_json(r) for r in ours]
    assert ours[0].killer is not None and ours[0].killer.pid == os.getpid()
    assert not [p for p in (tracefs_root / "instances").iterdir() if p.name.startswith(f"lmkd-py-{obs.proc.pid}")]


def test_command_stops_cleanly_and_sweeps_stale_instances(
    tmp_path: Path, tracefs_root: Path, cli_observers: list[CliObserver]
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tracefs_root / "instances" / f"lmkd-py-{dead.pid}-observe"  # as a crashed observer leaves it
    stale.mkdir()
    try:
        for how in ("sigint", "duration"):
            extra = ("--duration", "0.5") if how == "duration" else ()
            obs = CliObserver(tmp_path / f"{how}.jsonl", *extra)
            cli_observers.append(obs)
            ready = obs.wait_ready()
            assert not stale.exists()
            assert ready["instance"] == str(tracefs_root / "instances" / f"lmkd-py-{obs.proc.pid}-observe")
            assert (tracefs_root / "instances" / f"lmkd-py-{obs.proc.pid}-observe-exit").is_dir()
            rc = obs.stop(signal.SIGINT if how == "sigint" else None)
            assert rc == 0, obs.lines
            assert any('"observe.stop"' in line for line in obs.lines)
            ours = f"lmkd-py-{obs.proc.pid}"
            assert not [p for p in (tracefs_root / "instances").iterdir() if p.name.startswith(ours)]
    finally:
        if stale.exists():
            stale.rmdir()
