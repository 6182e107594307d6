"""Decision latency (pressure event -> victim chosen and checked, ready to signal) vs number of processes.

    python benchmarks/decision_latency.py [--counts 100 1000 5000] [--events 200] [--smoke]

Spawns N sleeper processes (``sleep``, small), builds the real daemon pieces (candidate table on the real
/proc, policy, killer in dry-run mode: every step up to the signal), fires synthetic pressure events and
prints p50/p99 of event -> decision (the record's decision_latency_ns), next to the cost of one full
/proc scan (what a daemon that scans at decision time would pay). Kills nothing.

The synthetic pressure must survive the daemon's re-check after it chose a victim (``kill.recheck_pressure``,
on by default: skip the kill when the stall stopped growing). The source reports the machine's real PSI
with the stall totals raised at every read, as under a real stall, so each event goes through the whole
default decision path, re-check included, instead of turning the re-check off (which would measure a path
the daemon does not take) or short-cutting it with ``PressureEvent.still`` (meant for precise signals
such as the free-memory floor, not for a PSI trigger).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import time

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

from lmkd_py import log as logsetup
from lmkd_py.candidates import CandidateTable
from lmkd_py.config import Level, parse_config
from lmkd_py.daemon import Daemon
from lmkd_py.killer import Killer
from lmkd_py.policy import Rules
from lmkd_py.procfs import ProcFs, Psi
from lmkd_py.psi import PressureEvent
from lmkd_py.records import ListSink
from lmkd_py.syscalls import LinuxSyscalls

LEVEL = Level(name="bench", stall="some", threshold_us=100_000, window_us=2_000_000, min_oom_score_adj=0)


class Stalling:
    """A pressure source that fires at every wait and whose stall keeps growing.

    ``read`` returns the machine's real ``/proc/pressure/memory`` (the daemon pays for the same read as
    with a real trigger) with both totals raised by 1 ms more at every read: the re-check after choosing
    sees the stall still growing and goes on to the (dry-run) kill, as it would under real pressure."""

    description = "benchmark"
    STEP_US = 1000

    def __init__(self, proc: ProcFs) -> None:
        self.proc = proc
        self.reads = 0

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        return [PressureEvent(LEVEL, time.monotonic_ns(), "trigger", "bench")]

    def read(self) -> Psi | None:
        psi = self.proc.pressure("memory")
        self.reads += 1
        grown = self.reads * self.STEP_US
        return dataclasses.replace(
            psi,
            some=dataclasses.replace(psi.some, total_us=psi.some.total_us + grown),
            full=dataclasses.replace(psi.full, total_us=psi.full.total_us + grown) if psi.full else None,
        )

    def close(self) -> None:
        pass


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(count: int, events: int) -> None:
    sleepers = [subprocess.Popen(["sleep", "3600"]) for _ in range(count)]
    try:
        proc = ProcFs()
        # min_interval_ms 0: every event is measured, none is skipped by the cool-down after a kill.
        cfg = parse_config({"dry_run": True, "kill": {"min_interval_ms": 0}})
        table = CandidateTable(proc, Rules.from_config(cfg.policy), clock=time.monotonic_ns)
        sink = ListSink()
        killer = Killer(LinuxSyscalls(), proc)
        d = Daemon(cfg, source=Stalling(proc), killer=killer, table=table, sink=sink)
        scans = []
        for _ in range(5):
            table.refresh()
            assert table.last_refresh_cost_ns is not None
            scans.append(table.last_refresh_cost_ns / 1e6)
        lat = []
        try:
            for i in range(events):
                d.iterate(0)
                if len(sink.records) != i + 1:
                    broken(f"event {i} gave no record (daemon stats: {d.stats})")
                rec = sink.records[-1]
                if rec.pressure is None or rec.pressure.decision_latency_ns is None:
                    broken(f"record without decision_latency_ns: outcome {rec.outcome.value}, {rec.error}")
                lat.append(rec.pressure.decision_latency_ns / 1e6)
        finally:
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
    args = parse_args(ap, smoke={"counts": [20], "events": 20})
    logsetup.configure("console", "error")
    print("event -> decision (dry run: pidfd_open, identity, sizes; warm table, top-5 re-check)")
    for n in args.counts:
        run(n, args.events)


if __name__ == "__main__":
    main()
