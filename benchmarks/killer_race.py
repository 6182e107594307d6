"""Who wins the race to a memcg running out: lmkd-py with its default config, or the kernel's OOM killer.

    python benchmarks/killer_race.py [--episodes 3] [--scenarios anon zram filecache many] [--smoke]

Each episode runs in a fresh memcg (a v1 limit, plus a v2 cgroup that is lmkd-py's scope and PSI source)
and is repeated per mode, alternating: "lmkd-py" (the daemon with the built-in defaults, scoped with
``--cgroup``) and "none" (the kernel alone). earlyoom acts on system-wide memory only, which a benchmark
may not exhaust here, so it meets lmkd-py in the lab's whole-guest episode (``lmkd-py lab --peers``) instead.

Scenarios, each with one designated victim (a "grower", oom_score_adj 900) and processes that must live:
- anon: anonymous memory at ~150 MiB/s, nothing to reclaim, no swap; an adj-0 bystander of 64 MiB.
- zram: the same grower writing compressible memory while a zram swap device (made here, removed after)
  takes what the memcg pushes out; the memcg may use limit + swap (memsw); swapping is not running out.
- filecache: a process thrashing a file larger than what the memcg leaves it (refault stalls), plus the
  grower at ~80 MiB/s.
- many: a few hundred small processes (2 MiB each, adj 0..800) and the grower.

Per episode: kernel OOM kills (``memory.oom_control``), time from the grower's start to the first death,
whether the grower died first, how many processes died, and PSI full stall of the cgroup from the start to
the first death. Needs root. Kills only what it started; removes every cgroup, zram device and file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

from lmkd_py import log as logsetup
from lmkd_py.procfs import parse_pressure
from lmkd_py.stress import PressureCgroup, start_thrasher

MIB = 1 << 20
GROWER = """
import os, sys, time
rate_mib_s, pattern = float(sys.argv[1]), sys.argv[2]
open("/proc/self/oom_score_adj", "w").write("900")
for path in sys.argv[3:]:
    open(path, "w").write(str(os.getpid()))
print("ready", flush=True)
chunk = 8 << 20
fill = (b"lmkd-py " * 512)[:4096] if pattern == "text" else None
chunks = []
while True:
    b = bytearray(chunk)
    for i in range(0, chunk, 4096):
        if fill is None:
            b[i] = 1
        else:
            b[i:i + 4096] = fill
    chunks.append(b)
    time.sleep(max(0.0, 8 / rate_mib_s - 0.005))
"""
SWARM = """
import os, sys, time
n, mib = int(sys.argv[1]), int(sys.argv[2])
for path in sys.argv[3:]:
    open(path, "w").write(str(os.getpid()))
for i in range(n):
    if os.fork() == 0:
        open("/proc/self/oom_score_adj", "w").write(str((i * 37) % 801))
        b = bytearray(mib << 20)
        for j in range(0, len(b), 4096):
            b[j] = 1
        time.sleep(3600)
        os._exit(0)
print("ready", flush=True)
time.sleep(3600)
"""
BYSTANDER = """
import os, sys, time
open("/proc/self/oom_score_adj", "w").write("0")
for path in sys.argv[2:]:
    open(path, "w").write(str(os.getpid()))
b = bytearray(int(sys.argv[1]) << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


@dataclass
class Watch:
    """Samples the memcg every 5 ms: OOM kills, PSI full total, and which watched pids have died."""

    cg: PressureCgroup
    pidfds: dict[int, int]
    deaths: list[tuple[float, int]] = field(default_factory=list)
    full_us: list[tuple[float, int]] = field(default_factory=list)
    oom: list[tuple[float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        alive = dict(self.pidfds)
        while not self.stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(OSError):
                p = parse_pressure(self.cg.pressure_file.read_text())
                self.full_us.append((now, p.full.total_us if p.full else 0))
            with contextlib.suppress(OSError):
                self.oom.append((now, self.cg.oom_kill_count()))
            for pid, fd in list(alive.items()):
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if poller.poll(0):
                    self.deaths.append((now, pid))
                    del alive[pid]
            time.sleep(0.005)


def _spawn(code: str, args: list[str], cg: PressureCgroup) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code, *args, *map(str, cg.procs_files)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        p.wait()
        broken(f"a helper process did not start: {code.splitlines()[1]}")
    cg.adopt(p.pid)
    return p


@contextlib.contextmanager
def zram_swap(mib: int) -> Iterator[str]:
    """A zram swap device of ``mib`` MiB, swapped on for the block, swapped off and removed after."""
    ctl = Path("/sys/class/zram-control")
    if not ctl.exists():
        broken("no /sys/class/zram-control (zram module not loaded): the zram scenario cannot run here")
    dev = int((ctl / "hot_add").read_text())
    sysdir = Path(f"/sys/block/zram{dev}")
    node = f"/dev/zram{dev}"
    on = False
    try:
        (sysdir / "disksize").write_text(str(mib * MIB))
        subprocess.run(["mkswap", node], check=True, capture_output=True)
        subprocess.run(["swapon", node], check=True, capture_output=True)
        on = True
        yield node
    finally:
        if on:
            subprocess.run(["swapoff", node], capture_output=True)
        with contextlib.suppress(OSError):
            (sysdir / "reset").write_text("1")
        with contextlib.suppress(OSError):
            (ctl / "hot_remove").write_text(str(dev))


@dataclass(frozen=True)
class Sizes:
    limit_mib: int
    bystander_mib: int
    file_mib: int
    swarm: int
    zram_mib: int


def _scenario_setup(name: str, cg: PressureCgroup, sz: Sizes, workdir: Path,
                    stack: contextlib.ExitStack) -> tuple[dict[int, int], float, str]:
    """Start what must live; returns (pidfds of them, grower rate MiB/s, grower fill pattern)."""
    keep: dict[int, int] = {}
    if name in ("anon", "zram"):
        b = _spawn(BYSTANDER, [str(sz.bystander_mib)], cg)
        keep[b.pid] = os.pidfd_open(b.pid)
        stack.callback(_reap, b)
    if name == "zram":
        memsw = cg.v1_path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str((sz.limit_mib + sz.zram_mib // 2) * MIB))
    if name == "filecache":
        thr = start_thrasher(cg, file_mib=sz.file_mib, workdir=workdir)
        stack.callback(thr.stop)
        keep[thr.pid] = os.pidfd_open(thr.pid)
        time.sleep(2.0)  # its steady state
    if name == "many":
        sw = _spawn(SWARM, [str(sz.swarm), "2"], cg)
        stack.callback(_reap, sw)
        time.sleep(0.5)  # the last children touch their memory
        for pid in cg.pids():
            with contextlib.suppress(OSError):
                keep[pid] = os.pidfd_open(pid)
    rate = 80.0 if name == "filecache" else 150.0
    return keep, rate, "text" if name == "zram" else "touch"


def _kill_all(cg: PressureCgroup) -> None:
    kill = cg.v2_path / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")
    for _ in range(250):
        if not cg.pids():
            return
        time.sleep(0.02)


def _reap(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def _daemon(cg: PressureCgroup, workdir: Path, stack: contextlib.ExitStack) -> Path:
    records = workdir / f"records-{uuid.uuid4().hex[:6]}.jsonl"
    log = workdir / "daemon.log"
    fh = stack.enter_context(log.open("w"))
    env = dict(os.environ, LMKD_PY_RUNTIME_DIR=str(workdir / "run"))
    d = subprocess.Popen([sys.executable, "-m", "lmkd_py.cli", "--cgroup", str(cg.v2_path), "--records",
                          str(records), "--tracing", "off", "--log-format", "json"], stderr=fh, env=env)

    def stop() -> None:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.kill()
            d.wait()

    stack.callback(stop)
    deadline = time.monotonic() + 20
    while "daemon.ready" not in log.read_text():
        if d.poll() is not None or time.monotonic() > deadline:
            broken(f"lmkd-py did not become ready: {log.read_text()[-500:]}")
        time.sleep(0.05)
    return records


def episode(scenario: str, mode: str, sz: Sizes, workdir: Path, prefix: str) -> dict[str, object]:
    # The swarm's own memory comes on top of the limit the other scenarios get.
    limit = sz.limit_mib + (sz.swarm * 3 if scenario == "many" else 0)
    with contextlib.ExitStack() as stack:
        if scenario == "zram":
            stack.enter_context(zram_swap(sz.zram_mib))
        cg = stack.enter_context(PressureCgroup(f"{prefix}{uuid.uuid4().hex[:8]}", limit_mib=limit))
        # Everything left in the v2 cgroup (the swarm's children) dies before the cgroup is removed.
        stack.callback(_kill_all, cg)
        keep, rate, pattern = _scenario_setup(scenario, cg, sz, workdir, stack)
        records = _daemon(cg, workdir, stack) if mode == "lmkd-py" else None
        oom0 = cg.oom_kill_count()
        grower = _spawn(GROWER, [str(rate), pattern], cg)
        stack.callback(_reap, grower)
        t0 = time.monotonic()
        watch = Watch(cg, {grower.pid: os.pidfd_open(grower.pid), **keep})
        th = threading.Thread(target=watch.run, daemon=True)
        th.start()
        deadline = t0 + 60
        while grower.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.0)  # anything that dies with it, and the records
        watch.stop.set()
        th.join()
        kills = 0
        if records is not None and records.exists():
            kills = sum(1 for line in records.read_text().splitlines() if '"outcome":"killed"' in line)
        oom = cg.oom_kill_count() - oom0
        first = watch.deaths[0] if watch.deaths else None
        first_t = first[0] if first else None
        full0 = watch.full_us[0][1] if watch.full_us else 0
        full_at = max((v for t, v in watch.full_us if first_t is None or t <= first_t), default=full0)
        for fd in watch.pidfds.values():
            os.close(fd)
        return {
            "scenario": scenario, "mode": mode, "limit_mib": limit, "kernel_oom_kills": oom, "lmkd_kills": kills,
            "first_death_s": round(first_t - t0, 3) if first_t is not None else None,
            "grower_first": first is not None and first[1] == grower.pid,
            "deaths": len(watch.deaths), "kept_alive": sum(1 for pid in keep if pid not in dict(
                (p, t) for t, p in watch.deaths)),
            "kept_total": len(keep), "full_stall_ms": round((full_at - full0) / 1000, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3, help="episodes per scenario and mode (alternated)")
    ap.add_argument("--scenarios", nargs="+", default=["anon", "zram", "filecache", "many"])
    ap.add_argument("--limit-mib", type=int, default=384)
    ap.add_argument("--swarm", type=int, default=300, help="small processes in the 'many' scenario")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cgroup-prefix", default="lmkd-py-bench-race-")
    args = parse_args(ap, smoke={"episodes": 1, "scenarios": ["anon", "many"], "limit_mib": 192, "swarm": 24})
    if os.geteuid() != 0:
        broken("needs root (memory cgroups)")
    logsetup.configure("console", "warning")
    sz = Sizes(limit_mib=args.limit_mib, bystander_mib=min(64, args.limit_mib // 4),
               file_mib=args.limit_mib * 2 // 3, swarm=args.swarm, zram_mib=512)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmkd-py-race-", dir="/var/tmp") as tmp:
        for scenario in args.scenarios:
            for _ in range(args.episodes):
                for mode in ("lmkd-py", "none"):
                    rows.append(episode(scenario, mode, sz, Path(tmp), args.cgroup_prefix))
    if not any(r["first_death_s"] is not None for r in rows):
        broken("no episode ended in a death: the memcg never ran out")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"memcg limit {sz.limit_mib} MiB (+3 MiB per small process in 'many'); grower oom_score_adj 900; "
          "lmkd-py with the built-in defaults")
    print(f"{'scenario':<10} {'mode':<8} {'kernel OOM':>10} {'lmkd kills':>10} {'first death s':>13} "
          f"{'grower first':>12} {'deaths':>6} {'kept alive':>10} {'full stall ms':>13}")
    for r in rows:
        fd = f"{r['first_death_s']:.3f}" if r["first_death_s"] is not None else "none"
        print(f"{r['scenario']:<10} {r['mode']:<8} {r['kernel_oom_kills']:>10} {r['lmkd_kills']:>10} {fd:>13} "
              f"{r['grower_first']!s:>12} {r['deaths']:>6} {r['kept_alive']!s:>5}/{r['kept_total']!s:<4} "
              f"{r['full_stall_ms']:>13.1f}")


if __name__ == "__main__":
    main()
