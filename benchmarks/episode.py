"""End-to-end pressure episode in a memcg: lmkd-py vs no daemon (the kernel's memcg OOM killer).

    python benchmarks/episode.py [--limit-mib 384] [--file-mib 256] [--runs 1] [--cgroup-prefix P] [--smoke]

Each run, per mode, in a fresh memcg (v1 limit + v2 cgroup for PSI): a file-thrashing process keeps a
page-cache working set; a "grower" (oom_score_adj 900) allocates 8 MiB every 100 ms towards 2 GiB, so the
cgroup runs out of memory. Mode "lmkd-py" runs the daemon scoped to the cgroup; mode "none" leaves it to
the kernel. Prints, per mode: time from the grower's start to its death, PSI some/full stall accumulated
in the cgroup over the episode, the kernel OOM kills, and who died. Needs root. Kills only what it
started; removes its cgroups (named ``--cgroup-prefix`` + a random suffix).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

from lmkd_py import log as logsetup
from lmkd_py.procfs import parse_pressure
from lmkd_py.stress import PressureCgroup, start_thrasher

GROWER = """
import os, sys, time
open("/proc/self/oom_score_adj", "w").write("900")
for path in sys.argv[1:]:
    open(path, "w").write(str(os.getpid()))
print("ready", flush=True)
chunks = []
for _ in range(256):
    b = bytearray(8 << 20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    chunks.append(b)
    time.sleep(0.1)
time.sleep(3600)
"""

CONFIG = """
[pressure]
poll_interval_ms = 250
[[pressure.levels]]
name = "medium"
stall = "some"
threshold_us = 100000
window_us = 2000000
min_oom_score_adj = 800
[kill]
min_interval_ms = 2000
"""


def psi_totals(cg: PressureCgroup) -> tuple[int, int]:
    p = parse_pressure(cg.pressure_file.read_text())
    return p.some.total_us, p.full.total_us if p.full else 0


def episode(mode: str, limit_mib: int, file_mib: int, workdir: Path, prefix: str) -> dict[str, object]:
    with contextlib.ExitStack() as stack, PressureCgroup(f"{prefix}{uuid.uuid4().hex[:8]}",
                                                          limit_mib=limit_mib) as cg:
        thrasher = start_thrasher(cg, file_mib=file_mib, workdir=workdir)
        daemon = None
        try:
            if mode == "lmkd-py":
                cfg = workdir / "lmkd.toml"
                cfg.write_text(CONFIG)
                log_fh = stack.enter_context(open(workdir / f"{mode}.log", "w"))
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "lmkd_py.cli", "--config", str(cfg), "--cgroup", str(cg.v2_path),
                     "--records", str(workdir / f"{mode}.jsonl"), "--tracing", "off", "--log-format", "json"],
                    stderr=log_fh)
                time.sleep(1.5)  # armed
            time.sleep(2.0)  # the thrasher's steady state
            oom0 = cg.oom_kill_count()
            some0, full0 = psi_totals(cg)
            grower = subprocess.Popen([sys.executable, "-c", GROWER, *map(str, cg.procs_files)],
                                      stdout=subprocess.PIPE, text=True)
            assert grower.stdout is not None and grower.stdout.readline().strip() == "ready"
            cg.adopt(grower.pid)
            t0 = time.monotonic()
            try:
                rc = grower.wait(timeout=60)
                dead_s: float | None = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                rc, dead_s = None, None
            time.sleep(1.0)
            some1, full1 = psi_totals(cg)
            thrasher_alive = thrasher.poll() is None
            return {
                "mode": mode,
                "grower_dead_after_s": dead_s,
                "grower_exit": rc,
                "some_stall_ms": (some1 - some0) / 1000,
                "full_stall_ms": (full1 - full0) / 1000,
                "kernel_oom_kills": cg.oom_kill_count() - oom0,
                "thrasher_survived": thrasher_alive,
            }
        finally:
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=30)
            if "grower" in locals() and grower.poll() is None:
                grower.kill()
                grower.wait()
            thrasher.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit-mib", type=int, default=384)
    ap.add_argument("--file-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cgroup-prefix", default="lmkd-py-bench-", help="name prefix of the cgroups it makes")
    args = parse_args(ap, smoke={"limit_mib": 192, "file_mib": 96})
    logsetup.configure("console", "warning")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmkd-py-episode-", dir="/var/tmp") as tmp:
        for _ in range(args.runs):
            for mode in ("lmkd-py", "none"):
                rows.append(episode(mode, args.limit_mib, args.file_mib, Path(tmp), args.cgroup_prefix))
    dead = [r for r in rows if r["grower_dead_after_s"] is None]
    if dead:
        broken(f"the grower outlived a {args.limit_mib} MiB memcg in mode(s) {[r['mode'] for r in dead]}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"memcg {args.limit_mib} MiB, thrashed file {args.file_mib} MiB, grower +80 MiB/s at oom_score_adj 900")
    print(f"{'mode':<8} {'grower dead after s':>19} {'exit':>5} {'some stall ms':>13} {'full stall ms':>13} "
          f"{'kernel OOM kills':>16} {'thrasher ok':>11}")
    for r in rows:
        dead = f"{r['grower_dead_after_s']:.2f}" if r["grower_dead_after_s"] is not None else "alive"
        print(f"{r['mode']:<8} {dead:>19} {r['grower_exit']!s:>5} {r['some_stall_ms']:>13.0f} "
              f"{r['full_stall_ms']:>13.0f} {r['kernel_oom_kills']:>16} {r['thrasher_survived']!s:>11}")


if __name__ == "__main__":
    main()
