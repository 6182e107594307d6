"""Kill path with vs without process_mrelease, alternating in one run on equal victims.

    python benchmarks/kill_path.py [--kills 20] [--size-mib 256]

Prints the median kill->exit and kill->MemAvailable-recovered of each mode and their ratio. Needs
permission to kill its own children only (no root needed). Never fails on a time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from lmkd_py import log as logsetup
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.records import KillRecord, Outcome
from lmkd_py.syscalls import LinuxSyscalls

VICTIM = """
import sys, time
size = int(sys.argv[1]) << 20
b = bytearray(size)
for i in range(0, size, 4096):
    b[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""


def one_kill(killer: Killer, size_mib: int) -> KillRecord:
    p = subprocess.Popen([sys.executable, "-c", VICTIM, str(size_mib)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return killer.kill(killer.snapshot(p.pid))
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def med_ms(values: list[int | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) / 1e6 if got else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=20, help="kills per mode")
    ap.add_argument("--size-mib", type=int, default=256)
    args = ap.parse_args()
    logsetup.configure("console", "warning")
    syscalls = LinuxSyscalls()
    killers = {
        "mrelease": Killer(syscalls, options=KillOptions(mrelease=True)),
        "kill-only": Killer(syscalls, options=KillOptions(mrelease=False)),
    }
    results: dict[str, list[KillRecord]] = {k: [] for k in killers}
    for i in range(args.kills * 2):
        mode = list(killers)[i % 2]  # alternate so drift hits both modes alike
        rec = one_kill(killers[mode], args.size_mib)
        if rec.outcome is Outcome.KILLED:
            results[mode].append(rec)
    for k in killers.values():
        k.close()
    print(f"kill path, {args.kills} x {args.size_mib} MiB anonymous victims per mode, alternating")
    print(f"{'mode':<10} {'n':>3} {'kill->exit ms':>14} {'kill->mem back ms':>18} {'mrelease wall ms':>17}")
    med: dict[str, tuple[float | None, float | None]] = {}
    for mode, recs in results.items():
        e = med_ms([r.kill_to_exit_ns for r in recs])
        m = med_ms([r.kill_to_mem_recovered_ns for r in recs])
        w = med_ms([r.mrelease.wall_ns for r in recs])
        med[mode] = (e, m)
        print(f"{mode:<10} {len(recs):>3} {_f(e):>14} {_f(m):>18} {_f(w):>17}")
    for idx, name in enumerate(("kill->exit", "kill->mem back")):
        a, b = med["mrelease"][idx], med["kill-only"][idx]
        if a and b:
            print(f"ratio mrelease / kill-only, median {name}: {a / b:.2f}")


def _f(v: float | None) -> str:
    return f"{v:.2f}" if v is not None else "n/a"


if __name__ == "__main__":
    main()
