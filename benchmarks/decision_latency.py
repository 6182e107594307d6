"""Decision latency (pressure event -> victim chosen and checked, ready to signal) vs number of processes.

    python benchmarks/decision_latency.py [--counts 100 1000 5000] [--events 200]

Spawns N sleeper processes (``sleep``, small), builds the real daemon pieces (candidate table on the real
/proc, policy, killer in dry-run mode: every step up to the signal), fires synthetic pressure events and
prints p50/p99 of event -> decision (the record's decision_latency_ns), next to the cost of one full
/proc scan (what a daemon that scans at decision time would pay). Kills nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from lmkd_py import log as logsetup
from lmkd_py.candidates import CandidateTable
from lmkd_py.config import Config, Level
from lmkd_py.daemon import Daemon
from lmkd_py.killer import Killer
from lmkd_py.policy import Rules
from lmkd_py.procfs import ProcFs, Psi
from lmkd_py.psi import PressureEvent
from lmkd_py.records import ListSink
from lmkd_py.syscalls import LinuxSyscalls

LEVEL = Level(name="bench", stall="some", threshold_us=100_000, window_us=2_000_000, min_oom_score_adj=0)


class OneShot:
    description = "benchmark"

    def __init__(self, proc: ProcFs) -> None:
        self.proc = proc

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        return [PressureEvent(LEVEL, time.monotonic_ns(), "trigger", "bench")]

    def read(self) -> Psi | None:
        return self.proc.pressure("memory")

    def close(self) -> None:
        pass


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(count: int, events: int) -> None:
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(count)]
    try:
        proc = ProcFs()
        cfg = Config(dry_run=True)
        table = CandidateTable(proc, Rules.from_config(cfg.policy), clock=time.monotonic_ns)
        sink = ListSink()
        killer = Killer(LinuxSyscalls(), proc)
        d = Daemon(cfg, source=OneShot(proc), killer=killer, table=table, sink=sink)
        scans = []
        for _ in range(5):
            table.refresh()
            assert table.last_refresh_cost_ns is not None
            scans.append(table.last_refresh_cost_ns / 1e6)
        lat = []
        for _ in range(events):
            d._cooldown_until = 0  # measure every event, not the cooldown
            d.iterate(0)
            rec = sink.records[-1]
            assert rec.pressure is not None and rec.pressure.decision_latency_ns is not None
            lat.append(rec.pressure.decision_latency_ns / 1e6)
        killer.close()
        total = sum(1 for _ in proc.pids())
        print(f"{count:>6} sleepers ({total:>6} processes, {len(table):>6} candidates): "
              f"decision p50 {statistics.median(lat):6.2f} ms  p99 {pct(lat, 0.99):6.2f} ms   "
              f"| full /proc scan p50 {statistics.median(scans):7.2f} ms")
    finally:
        for s in sleepers:
            s.kill()
        for s in sleepers:
            s.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--events", type=int, default=200)
    args = ap.parse_args()
    logsetup.configure("console", "error")
    print("event -> decision (dry run: pidfd_open, identity, sizes; warm table, top-5 re-check)")
    for n in args.counts:
        run(n, args.events)


if __name__ == "__main__":
    main()
