"""Footprint of the running daemon with the default config: start-up time, steady RSS, idle CPU.

    python benchmarks/footprint.py [--idle 60] [--dry-run] [--smoke]

Starts `lmkd-py` (real mode as root unless --dry-run; default config; records into a temp dir), waits for
`daemon.ready`, then samples /proc/PID/status (VmRSS, VmLck) and /proc/PID/stat CPU ticks over --idle
seconds. Targets (issue 8): RSS <= 24 MiB, idle CPU ~ 0. Prints figures; never fails on them.
Also prints the RSS cost of importing pyroute2, measured in a fresh interpreter next to a bare one.

``--smoke`` samples for 2 s and runs the daemon with ``--dry-run``: a real-mode daemon on the default
config watches the whole machine's PSI, and on a shared CI machine someone else's memcg pressure could
make it kill a process the benchmark did not start. Start-up, RSS and CPU sampling are the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

TICK = os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def import_rss(module: str | None) -> int | None:
    """RSS (KiB) of a fresh interpreter after importing ``module``; None if it is not installed."""
    code = (f"import {module}\n" if module else "") + (
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds of idle sampling")
    ap.add_argument("--dry-run", action="store_true")
    args = parse_args(ap, smoke={"idle": 2.0, "dry_run": True})
    with tempfile.TemporaryDirectory(prefix="lmkd-py-bench-") as tmp:
        cmd = [sys.executable, "-m", "lmkd_py.cli", "--records", f"{tmp}/r.jsonl", "--log-format", "json"]
        if args.dry_run:
            cmd.append("--dry-run")
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stderr is not None
            ready = False
            for line in p.stderr:
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if ev.get("event") == "daemon.ready":
                    ready = True
                    break
            if not ready:
                broken(f"the daemon exited with {p.wait()} before daemon.ready")
            startup = time.monotonic() - t0
            time.sleep(1.0)
            c0, w0 = cpu_ticks(p.pid), time.monotonic()
            rss, anon = [], []
            while time.monotonic() - w0 < args.idle:
                rss.append(status_kib(p.pid, "VmRSS"))
                anon.append(status_kib(p.pid, "RssAnon"))
                time.sleep(1.0)
            cpu_s = (cpu_ticks(p.pid) - c0) / TICK
            wall = time.monotonic() - w0
            lck = status_kib(p.pid, "VmLck")
            if not rss:
                broken("no RSS sample")
        finally:
            p.terminate()
            p.wait(timeout=30)
    mode = "dry-run" if args.dry_run else "real (root)"
    print(f"lmkd-py daemon, default config, {mode}")
    print(f"  start-up to daemon.ready: {startup * 1000:.0f} ms")
    print(f"  steady RSS: median {sorted(rss)[len(rss) // 2] / 1024:.1f} MiB, max {max(rss) / 1024:.1f} MiB "
          f"(target <= 24 MiB); locked {lck / 1024:.1f} MiB")
    print(f"    of which private anonymous (RssAnon): median {sorted(anon)[len(anon) // 2] / 1024:.1f} MiB; the rest "
          f"is file pages of the interpreter and libraries")
    print(f"  idle CPU over {wall:.0f} s: {cpu_s:.2f} s = {100 * cpu_s / wall:.3f} %")
    bare, pr2 = import_rss(None), import_rss("pyroute2")
    if bare is not None and pr2 is not None:
        print(f"  importing pyroute2 would cost {(pr2 - bare) / 1024:.1f} MiB RSS "
              f"(bare interpreter {bare / 1024:.1f} MiB); lmkd-py does not import it")


if __name__ == "__main__":
    main()
