"""What the kernel timeline (lmkd_py.tracing) costs: kills with tracing on and off, alternating.

    sudo python benchmarks/tracing_overhead.py [--kills 10] [--size-mib 256] [--no-idle] [--smoke]

Prints, per mode, the median kill->exit and kill->MemAvailable-back of equal victims killed by the real
Killer (SIGKILL + process_mrelease on its reaper thread), the ratio tracing / no tracing (target: at
most 1.10), the cost of ``before_kill`` (on the kill path) and ``after_kill`` (after the exit), and
the medians of the kernel timeline itself (the rows of the seed table in kernel-notes.md).

Unless ``--no-idle``, it also measures what the armed instance costs everyone else between kills
(events enabled, tracing off): the time a child needs to fault in fresh anonymous memory with and
without the instance, alternating. Needs root and tracefs; never fails on a time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Callable

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script
from _victims import med, one_kill

from lmkd_py import log as logsetup
from lmkd_py.killer import Killer
from lmkd_py.procfs import ProcFs
from lmkd_py.records import KillRecord, Outcome
from lmkd_py.syscalls import LinuxSyscalls
from lmkd_py.tracing import TracefsTracer, TracingUnavailable, open_tracer

FAULTER = """
import mmap, sys, time
size = int(sys.argv[1]) << 20
ones = b"\\1" * len(range(0, size, 4096))
best = None
for _ in range(int(sys.argv[2])):
    # Private anonymous memory in 4 KiB pages: one page fault (and one rss_stat event) per page.
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    t = time.perf_counter_ns()
    m[::4096] = ones
    dt = time.perf_counter_ns() - t
    best = dt if best is None else min(best, dt)
    m.close()
print(best)
"""


def fmt(v: float | None, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if v is not None else "n/a"


def fault_ns(size_mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTER, str(size_mib), "3"], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def kills(tracer: TracefsTracer, n: int, size_mib: int) -> None:
    syscalls = LinuxSyscalls()
    killers = {"tracing": Killer(syscalls, ProcFs(), tracer=tracer), "no tracing": Killer(syscalls, ProcFs())}
    results: dict[str, list[KillRecord]] = {k: [] for k in killers}
    before_ns: list[int] = []
    after_ns: list[int] = []
    for i in range(n * 2):
        mode = list(killers)[i % 2]  # alternate so drift hits both modes alike
        rec = one_kill(killers[mode], size_mib)
        if rec.outcome is not Outcome.KILLED:
            print(f"  ({mode}: {rec.outcome.value}: {rec.error})")
            continue
        results[mode].append(rec)
        if mode == "tracing" and tracer.last_before_kill_ns is not None and tracer.last_after_kill_ns is not None:
            before_ns.append(tracer.last_before_kill_ns)
            after_ns.append(tracer.last_after_kill_ns)
    for k in killers.values():
        k.close()
    for mode, recs in results.items():
        if not recs:
            broken(f"no kill succeeded in mode {mode}")

    print(f"kill path, {n} x {size_mib} MiB victims per mode, alternating (real Killer, process_mrelease on)")
    print(f"{'mode':<11} {'n':>3} {'kill->exit ms':>14} {'kill->mem back ms':>18} {'mrelease wall ms':>17}")
    meds: dict[str, float | None] = {}
    for mode, recs in results.items():
        e = med([r.kill_to_exit_ns for r in recs])
        m = med([r.kill_to_mem_recovered_ns for r in recs])
        w = med([r.mrelease.wall_ns for r in recs])
        meds[mode] = e
        print(f"{mode:<11} {len(recs):>3} {fmt(e):>14} {fmt(m):>18} {fmt(w):>17}")
    on, off = meds["tracing"], meds["no tracing"]
    if on and off:
        print(f"ratio tracing / no tracing, median kill->exit: {on / off:.3f} (target <= 1.10)")
    print(
        f"before_kill (on the kill path): median {fmt(med(before_ns, 1e3), 0)} us, "
        f"max {fmt(max(before_ns) / 1e3 if before_ns else None, 0)} us"
    )
    print(f"after_kill (after the exit): median {fmt(med(after_ns, 1e3), 0)} us")

    timelines = [r.kernel for r in results["tracing"] if r.kernel is not None]
    rows: list[tuple[str, Callable[[float | None], str], list[float | int | None], float]] = [
        ("reaper work (mrelease exit - enter) ms", fmt, [t.reaper_work_ns for t in timelines], 1e6),
        ("victim exit_mmap ms", fmt, [t.exit_mmap_ns for t in timelines], 1e6),
        ("total (reaper + exit_mmap) ms", fmt, [t.reap_total_ns for t in timelines], 1e6),
        ("reap throughput MiB/s", lambda v: fmt(v, 0), [t.reap_throughput_mib_s for t in timelines], 1.0),
        ("victim pte/spin lock wait ms", lambda v: fmt(v, 3),
         [t.lock_contention_ns["victim"] if t.lock_contention_ns else None for t in timelines], 1e6),
        ("reaper pte/spin lock wait ms", lambda v: fmt(v, 3),
         [t.lock_contention_ns["reaper"] if t.lock_contention_ns else None for t in timelines], 1e6),
        ("freed by the reaper MiB", lambda v: fmt(v, 0),
         [sum(t.freed_by_reaper_kib.values()) if t.freed_by_reaper_kib else None for t in timelines], 1024),
        ("freed by the victim MiB", lambda v: fmt(v, 0),
         [sum(t.freed_by_victim_kib.values()) if t.freed_by_victim_kib else None for t in timelines], 1024),
    ]
    print(f"kernel timeline, medians over {len(timelines)} traced kills:")
    for label, show, values, scale in rows:
        print(f"  {label:<40} {show(med(values, scale)):>10}")
    noted = sorted({n for t in timelines for n in t.notes})
    for note in noted:
        print(f"  note: {note}")


def idle(size_mib: int, rounds: int) -> None:
    with_inst: list[int] = []
    without: list[int] = []
    for _ in range(rounds):
        without.append(fault_ns(size_mib))
        tracer = open_tracer("on")
        try:
            with_inst.append(fault_ns(size_mib))
        finally:
            tracer.close()
    a, b = statistics.median(with_inst), statistics.median(without)
    print(f"idle cost: faulting in {size_mib} MiB (best of 3 per child), {rounds} rounds alternating")
    print(f"  no instance {b / 1e6:.1f} ms, instance armed (events on, tracing off) {a / 1e6:.1f} ms")
    print(f"  ratio armed / none: {a / b:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="kills per mode")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--no-idle", action="store_true", help="skip the idle (page fault) measurement")
    ap.add_argument("--idle-rounds", type=int, default=5)
    args = parse_args(ap, smoke={"kills": 2, "size_mib": 16, "idle_rounds": 1})
    logsetup.configure("console", "warning")
    try:
        tracer = open_tracer("on")
    except TracingUnavailable as exc:
        broken(f"tracing unavailable here: {exc.reason}")
    assert isinstance(tracer, TracefsTracer)
    try:
        kills(tracer, args.kills, args.size_mib)
    finally:
        tracer.close()
    if not args.no_idle:
        idle(args.size_mib, args.idle_rounds)


if __name__ == "__main__":
    main()
