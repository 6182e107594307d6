"""What leaving ``lmkd-py observe`` on costs: a fork/exit-heavy load with observe on and off, alternating.

    sudo python benchmarks/observe_overhead.py [--rounds 10] [--forks 2000] [--spawns 1000] [--kills 20] [--smoke]

Each round runs one load process (``--forks`` x ``os.fork()`` + ``_exit`` + ``waitpid``, then ``--spawns``
x fork + exec of ``/bin/true``; every exit fires ``sched_process_exit`` and ``exit_mmap``, every exec one
more ``exit_mmap``), once with no observer and once with ``lmkd-py observe`` running (started before the
round, ready, stopped after it), in alternating order. Prints the median wall time and CPU time of the
load in each mode and their ratios (the cost everyone pays: the kernel's tracepoints; the CPU time is the
steadier figure on a shared machine), the observer's own CPU time
during the load (from /proc/PID/schedstat), its CPU time when idle, its CPU time per observed kill of a
small sleeper, and what it adds to every syscall on the machine (the syscall events that see
process_mrelease put every syscall on the kernel's tracing slow path; measured with and without them).
Needs root and tracefs; never fails on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _bench import parse_args  # benchmarks/ is on sys.path when run as a script

LOAD = textwrap.dedent(
    """
    import os, subprocess, sys, time
    t, c = time.perf_counter_ns(), os.times()
    for _ in range(int(sys.argv[1])):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    for _ in range(int(sys.argv[2])):
        subprocess.run(["/bin/true"], check=True)
    e = os.times()
    cpu = sum(getattr(e, f) - getattr(c, f) for f in ("user", "system", "children_user", "children_system"))
    print(time.perf_counter_ns() - t, cpu)
    """
)
SYSCALLS = textwrap.dedent(
    """
    import os, sys, time
    n = int(sys.argv[1])
    t = time.perf_counter_ns()
    for _ in range(n):
        os.getppid()
    print((time.perf_counter_ns() - t) / n)
    """
)


def cpu_s(pid: int) -> float:
    """CPU time of all threads of ``pid`` so far, seconds (``schedstat``: ns, unlike the tick-grained
    ``stat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


class Observer:
    def __init__(self, records: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmkd_py.cli", "observe", "--records", str(records), "--log-format", "json",
             "--log-level", "warning"],
            stderr=subprocess.PIPE, text=True,
        )
        # Ready is logged at info; with warning level, wait for the instance instead.
        inst = Path(f"/sys/kernel/tracing/instances/lmkd-py-{self.proc.pid}-observe-exit")
        deadline = time.monotonic() + 30
        while not inst.is_dir():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"observe did not start: {self.proc.communicate()[1]}")
            time.sleep(0.05)
        time.sleep(0.3)  # past the first warm-table refresh

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        if self.proc.returncode != 0:
            print(f"observe exited {self.proc.returncode}: {err}", file=sys.stderr)


def run_load(forks: int, spawns: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds (the load and its children, user + system) of one load run. The CPU
    time is what the kernel's tracepoints add to the load itself; it is far less disturbed than the
    wall time by whatever else runs on the machine."""
    out = subprocess.run([sys.executable, "-c", LOAD, str(forks), str(spawns)], capture_output=True, text=True,
                         check=True)
    wall_ns, cpu = out.stdout.split()
    return int(wall_ns) / 1e9, float(cpu)


def kills(n: int, records: Path) -> tuple[float, int]:
    """Observer CPU seconds per kill of a small sleeper, and the number of records written."""
    obs = Observer(records)
    try:
        c0 = cpu_s(obs.proc.pid)
        for _ in range(n):
            p = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None
            p.stdout.readline()
            p.kill()
            p.wait()
            time.sleep(0.1)  # let the observer finish the record: kills are rare, not a storm
        time.sleep(0.5)
        used = cpu_s(obs.proc.pid) - c0
    finally:
        obs.stop()
    written = sum(1 for line in records.read_text().splitlines() if line.strip()) if records.exists() else 0
    return used / max(n, 1), written


class ThreadObserver:
    """``run_observe`` on a thread of this process, with options the command does not offer."""

    def __init__(self, **options: object) -> None:
        import threading

        from lmkd_py.config import Config
        from lmkd_py.observe import run_observe
        from lmkd_py.records import ListSink

        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=run_observe,
            args=(Config(),),
            kwargs={"sink": ListSink(), "duration_ns": None, "cgroup": None, "stop": self._stop.is_set, **options},
            daemon=True,
        )
        self._thread.start()
        time.sleep(1.0)  # set up and past the first warm-table refresh

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def syscall_cost(rounds: int, n: int, tmp: Path) -> dict[str, float]:
    """Median ns per ``os.getppid()`` (a trivial syscall, plus Python's ~0.3 us around it) with no
    observer, with ``lmkd-py observe``, and with an observer that leaves the syscall events off."""
    out: dict[str, list[float]] = {"off": [], "on": [], "on, no mrelease tracing": []}

    def one() -> float:
        r = subprocess.run([sys.executable, "-c", SYSCALLS, str(n)], capture_output=True, text=True, check=True)
        return float(r.stdout)

    for _ in range(rounds):
        out["off"].append(one())
        obs = Observer(tmp / "sys.jsonl")
        try:
            out["on"].append(one())
        finally:
            obs.stop()
        tobs = ThreadObserver(trace_mrelease=False)
        try:
            out["on, no mrelease tracing"].append(one())
        finally:
            tobs.stop()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--forks", type=int, default=2000)
    ap.add_argument("--spawns", type=int, default=1000)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--syscall-rounds", type=int, default=5)
    ap.add_argument("--syscall-calls", type=int, default=300_000, help="getppid() calls per measurement")
    args = parse_args(ap, smoke={"rounds": 1, "forks": 200, "spawns": 40, "idle_s": 1.0, "kills": 1,
                                 "syscall_rounds": 1, "syscall_calls": 30_000})
    if os.geteuid() != 0:
        print("needs root (tracefs)", file=sys.stderr)
        return 2
    from lmkd_py import log as logsetup

    logsetup.configure("console", "warning")  # the in-process observer of syscall_cost()
    tmp = Path(tempfile.mkdtemp(prefix="lmkd-py-observe-bench-"))
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args: argparse.Namespace, tmp: Path) -> int:
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpus: dict[str, list[float]] = {"off": [], "on": []}
    obs_cpu: list[float] = []
    run_load(args.forks // 10, args.spawns // 10)  # warm the page cache and the interpreter
    for r in range(args.rounds):
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            obs = Observer(tmp / f"round{r}.jsonl") if mode == "on" else None
            try:
                c0 = cpu_s(obs.proc.pid) if obs else 0.0
                wall, cpu = run_load(args.forks, args.spawns)
                if obs:
                    obs_cpu.append(cpu_s(obs.proc.pid) - c0)
            finally:
                if obs:
                    obs.stop()
            times[mode].append(wall)
            cpus[mode].append(cpu)
        print(f"round {r}: wall off {times['off'][-1]:.3f} s, on {times['on'][-1]:.3f} s; "
              f"cpu off {cpus['off'][-1]:.3f} s, on {cpus['on'][-1]:.3f} s", flush=True)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    coff, con = statistics.median(cpus["off"]), statistics.median(cpus["on"])
    exits = args.forks + args.spawns
    print(f"\nload: {args.forks} fork+_exit and {args.spawns} fork+exec(/bin/true), {args.rounds} rounds each mode")
    print(f"  median wall, observe off: {off:.3f} s ({off / exits * 1e6:.0f} us per process), on: {on:.3f} s")
    ratios = [b / a for a, b in zip(times["off"], times["on"], strict=True)]
    print(f"  wall ratio on/off: {on / off:.3f} (median of per-round ratios {statistics.median(ratios):.3f},"
          f" range {min(ratios):.3f}-{max(ratios):.3f})")
    cratios = [b / a for a, b in zip(cpus["off"], cpus["on"], strict=True)]
    print(f"  median CPU of the load, observe off: {coff:.3f} s, on: {con:.3f} s; ratio {con / coff:.3f}"
          f" (median of per-round ratios {statistics.median(cratios):.3f},"
          f" range {min(cratios):.3f}-{max(cratios):.3f})")
    med_cpu = statistics.median(obs_cpu)
    print(f"  observer CPU during the load: {med_cpu * 1e3:.0f} ms median ({med_cpu / on * 100:.2f} % of one CPU)")
    obs = Observer(tmp / "idle.jsonl")
    try:
        c0 = cpu_s(obs.proc.pid)
        time.sleep(args.idle_s)
        idle = cpu_s(obs.proc.pid) - c0
    finally:
        obs.stop()
    print(f"  observer CPU when idle: {idle * 1e3:.0f} ms in {args.idle_s:.0f} s ({idle / args.idle_s * 100:.2f} %)")
    if args.kills:
        per_kill, written = kills(args.kills, tmp / "kills.jsonl")
        print(f"  observer CPU per observed kill: {per_kill * 1e3:.1f} ms ({written} records for {args.kills} kills"
              " + any other SIGKILLs on the machine)")
    sys_ns: dict[str, float] = {}
    if args.syscall_rounds:
        sys_ns = syscall_cost(args.syscall_rounds, args.syscall_calls, tmp)
        print("  ns per getppid() from Python (syscall-tracing slow path): "
              + ", ".join(f"{k} {v:.0f}" for k, v in sys_ns.items())
              + f"; added by observe: {sys_ns['on'] - sys_ns['off']:.0f} ns,"
              f" without mrelease tracing: {sys_ns['on, no mrelease tracing'] - sys_ns['off']:.0f} ns")
    print(json.dumps({"syscall_ns": sys_ns, "off_s": off, "on_s": on, "ratio": on / off,
                      "ratio_paired": statistics.median(ratios), "cpu_ratio": con / coff,
                      "observer_cpu_load_s": med_cpu, "observer_cpu_idle_pct": idle / args.idle_s * 100}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
