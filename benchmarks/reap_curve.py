"""Reap time vs victim size and VMA count: where the teardown order can matter.

    python benchmarks/reap_curve.py [--sizes 64 256 1024] [--vmas 1 64 4096] [--kills 5] [--tracing auto] [--smoke]

For each (size, VMA count) it starts equal stress victims (anonymous, fully touched, 2 threads), kills
each with lmkd-py's kill path (SIGKILL + process_mrelease on the reaper thread) and prints medians of
process_mrelease wall time, kill->exit, and, with tracing, the kernel's reaper work and exit_mmap times.
Kills only the victims it started. Never fails on a time.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

from lmkd_py import log as logsetup
from lmkd_py.killer import Killer
from lmkd_py.procfs import ProcFs
from lmkd_py.records import KillRecord, Outcome
from lmkd_py.stress import VictimSpec, spawn_victim
from lmkd_py.syscalls import LinuxSyscalls


def med_ms(recs: list[KillRecord], get: Callable[[KillRecord], int | None]) -> str:
    vals = [v for v in (get(r) for r in recs) if v is not None]
    return f"{statistics.median(vals) / 1e6:8.2f}" if vals else "     n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024], help="MiB")
    ap.add_argument("--vmas", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tracing", choices=["auto", "on", "off"], default="auto")
    args = parse_args(ap, smoke={"sizes": [16], "vmas": [1, 64], "kills": 1})
    logsetup.configure("console", "error")
    killer = Killer(LinuxSyscalls(), ProcFs())
    tracer = None
    if args.tracing != "off":
        from lmkd_py.tracing import open_tracer

        tracer = open_tracer(args.tracing)
        killer.tracer = tracer
    print(f"{args.kills} kills per cell, anonymous memory, {args.threads} threads per victim; medians in ms")
    print(f"{'size MiB':>8} {'VMAs':>6} {'n':>3} {'mrelease':>8} {'kill->exit':>10} {'reaper':>8} {'exit_mmap':>9} "
          f"{'sum':>8}")
    killed = 0
    try:
        for size in args.sizes:
            for vmas in args.vmas:
                recs = []
                for _ in range(args.kills):
                    v = spawn_victim(VictimSpec(size_mib=size, vmas=vmas, threads=args.threads))
                    try:
                        v.wait_ready(120)
                        rec = killer.kill(killer.snapshot(v.pid))
                    finally:
                        v.kill()
                    if rec.outcome is Outcome.KILLED:
                        recs.append(rec)
                    else:
                        print(f"  ({rec.outcome.value}: {rec.error})")
                killed += len(recs)
                print(f"{size:>8} {vmas:>6} {len(recs):>3} {med_ms(recs, lambda r: r.mrelease.wall_ns)} "
                      f"{med_ms(recs, lambda r: r.kill_to_exit_ns):>10} "
                      f"{med_ms(recs, lambda r: r.kernel.reaper_work_ns if r.kernel else None)} "
                      f"{med_ms(recs, lambda r: r.kernel.exit_mmap_ns if r.kernel else None):>9} "
                      f"{med_ms(recs, lambda r: r.kernel.reap_total_ns if r.kernel else None)}")
    finally:
        killer.close()
        if tracer is not None:
            tracer.close()
    if not killed:
        broken("no kill succeeded")


if __name__ == "__main__":
    main()
