"""Kill path with vs without process_mrelease, alternating in one run on equal victims.

    python benchmarks/kill_path.py [--kills 20] [--size-mib 256] [--starve] [--smoke]

Prints the median kill->exit and kill->memory-back of each mode and their ratio. Needs permission to
kill its own children only (no root needed). Never fails on a time.

On an idle machine the victim runs at once after SIGKILL and usually drops its mm before the reaper
thread gets there (process_mrelease then returns ESRCH): both modes are the same. --starve shows the
case process_mrelease exists for: the victim is pinned, at nice 19, to a CPU kept busy by a nice-0 hog,
so it gets little CPU to tear itself down, while the killer runs on another CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script
from _victims import med, one_kill

from lmkd_py import log as logsetup
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.procfs import ProcFs
from lmkd_py.records import KillRecord, Outcome
from lmkd_py.syscalls import LinuxSyscalls

HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=20, help="kills per mode")
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--starve", action="store_true", help="victims at nice 19 on a CPU a hog keeps busy")
    args = parse_args(ap, smoke={"kills": 2, "size_mib": 16})
    logsetup.configure("console", "warning")
    syscalls = LinuxSyscalls()
    killers = {
        "mrelease": Killer(syscalls, ProcFs(), options=KillOptions(mrelease=True)),
        "kill-only": Killer(syscalls, ProcFs(), options=KillOptions(mrelease=False)),
    }
    results: dict[str, list[KillRecord]] = {k: [] for k in killers}
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.starve and len(cpus) > 1 else None
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(cpu)]) if cpu is not None else None
    if cpu is not None:
        os.sched_setaffinity(0, set(cpus[:-1]))  # the killer and its reaper thread stay off the hog's CPU
    try:
        for i in range(args.kills * 2):
            mode = list(killers)[i % 2]  # alternate so drift hits both modes alike
            rec = one_kill(killers[mode], args.size_mib, cpu)
            if rec.outcome is Outcome.KILLED:
                results[mode].append(rec)
            else:
                print(f"  ({mode}: {rec.outcome.value}: {rec.error})")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        for k in killers.values():
            k.close()
    for mode, recs in results.items():
        if not recs:
            broken(f"no kill succeeded in mode {mode}")
    where = f", victims starved on CPU {cpu} (nice 19 vs a busy nice-0 hog)" if cpu is not None else ", idle machine"
    print(f"kill path, {args.kills} x {args.size_mib} MiB anonymous victims per mode, alternating{where}")
    print(f"{'mode':<10} {'n':>3} {'kill->exit ms':>14} {'kill->mem back ms':>18} {'mrelease wall ms':>17}")
    medians: dict[str, tuple[float | None, float | None]] = {}
    for mode, recs in results.items():
        e = med([r.kill_to_exit_ns for r in recs])
        m = med([r.kill_to_mem_recovered_ns for r in recs])
        w = med([r.mrelease.wall_ns for r in recs])
        esrch = sum(1 for r in recs if r.mrelease.errno_name == "ESRCH")
        medians[mode] = (e, m)
        print(f"{mode:<10} {len(recs):>3} {_f(e):>14} {_f(m):>18} {_f(w):>17}"
              + (f"   (ESRCH: victim was faster in {esrch})" if mode == "mrelease" else ""))
    for idx, name in enumerate(("kill->exit", "kill->mem back")):
        a, b = medians["mrelease"][idx], medians["kill-only"][idx]
        if a and b:
            print(f"ratio mrelease / kill-only, median {name}: {a / b:.2f}")


def _f(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "n/a"


if __name__ == "__main__":
    main()
