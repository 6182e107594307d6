"""Synthetic kill records with known distributions, for report tests, benchmarks and demos.

Lines are made from one template rendered by the real ``KillRecord`` model (so they are always valid
records of the current schema), with the numbers filled in by string formatting: a million lines take
seconds, not the minutes that building a model object per record would.

Latencies are log-normal around ``median_ms`` (x ``shift``, to plant a known effect) and scale with the
victim's size relative to 256 MiB, as teardown work does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from lmkd_py.records import (
    KernelTimeline,
    KillRecord,
    Mrelease,
    MreleaseStatus,
    Outcome,
    Provenance,
    Steps,
    Victim,
    record_json,
)

# Distinct numbers that appear nowhere else in the template; each is swapped for a format field.
_SLOTS = {
    "rss_kib": 900000000001,
    "wall_ns": 900000000002,
    "kill_to_exit_ns": 900000000003,
    "reaper_work_ns": 900000000004,
    "exit_mmap_ns": 900000000005,
    "reap_total_ns": 900000000006,
    "lock_reaper_ns": 900000000007,
    "lock_victim_ns": 900000000008,
    "freed_reaper_kib": 900000000009,
    "freed_victim_kib": 900000000010,
    "kill_to_mem_ns": 900000000011,
    "start_ns": 900000000012,
    "end_ns": 900000000013,
}
_TEXT_SLOTS = {"record_id": "@@ID@@", "kernel_release": "@@KREL@@", "machine_model": "@@MODEL@@",
               "machine_id": "@@MID@@", "boot_id": "@@BOOT@@"}
_FLOAT_SLOT = ("throughput", 900000000014.5)


def _template(timeline: bool) -> str:
    s = _SLOTS
    rec = KillRecord(
        record_id=_TEXT_SLOTS["record_id"],
        wall_time="2025-01-01T00:00:00.000000+00:00",
        outcome=Outcome.KILLED,
        victim=Victim(pid=4242, comm="victim", rss_kib=s["rss_kib"], rss_anon_kib=s["rss_kib"]),
        steps=Steps(start_ns=s["start_ns"], end_ns=s["end_ns"]),
        mrelease=Mrelease(status=MreleaseStatus.OK, ret=0, wall_ns=s["wall_ns"]),
        kill_to_exit_ns=s["kill_to_exit_ns"],
        kill_to_mem_recovered_ns=s["kill_to_mem_ns"],
        kernel=None
        if not timeline
        else KernelTimeline(
            source="synthetic",
            reaper_work_ns=s["reaper_work_ns"],
            exit_mmap_ns=s["exit_mmap_ns"],
            reap_total_ns=s["reap_total_ns"],
            reap_throughput_mib_s=_FLOAT_SLOT[1],
            mmap_lock_wait_ns={"reaper": s["lock_reaper_ns"], "victim": s["lock_victim_ns"]},
            lock_contention_ns={"reaper": s["lock_reaper_ns"], "victim": s["lock_victim_ns"]},
            freed_by_reaper_kib={"anon": s["freed_reaper_kib"]},
            freed_by_victim_kib={"anon": s["freed_victim_kib"]},
        ),
        provenance=Provenance(
            kernel_release=_TEXT_SLOTS["kernel_release"], machine_model=_TEXT_SLOTS["machine_model"], arch="x86_64",
            machine_id=_TEXT_SLOTS["machine_id"], boot_id=_TEXT_SLOTS["boot_id"],
        ),
    )
    text = record_json(rec).replace("{", "{{").replace("}", "}}")
    for name, value in _SLOTS.items():
        text = text.replace(str(value), "{" + name + "}")
    text = text.replace(repr(_FLOAT_SLOT[1]), "{" + _FLOAT_SLOT[0] + "}")
    for name, marker in _TEXT_SLOTS.items():
        text = text.replace(json.dumps(marker), "{" + name + "}")
    slots = (("outcome", '"killed"', "outcome"), ("dry_run", "false", "dry_run"), ("status", '"ok"', "status"))
    for key, literal, name in slots:
        before = f'"{key}":{literal}'
        if text.count(before) != 1:  # the model's JSON layout changed: fail loudly, not silently wrong
            raise RuntimeError(f"synthetic template: cannot place {key}")
        text = text.replace(before, f'"{key}":{{{name}}}')
    return text + "\n"


@dataclass(frozen=True)
class SynthSpec:
    """The distribution of one synthetic set."""

    n: int
    seed: int = 0
    median_ms: float = 20.0  # median reaper work at 256 MiB
    sigma: float = 0.35  # log-normal shape
    shift: float = 1.0  # multiplies every latency: the planted effect
    rss_mib: float = 256.0  # median victim size
    rss_sigma: float = 0.05
    kernel_release: str = "6.18.0-synthetic"
    machine_model: str = "synthetic machine"
    dry_run_share: float = 0.0
    timeline: bool = True  # False: no kernel timeline (as before tracing lands)
    # A fleet: records spread evenly over ``boards`` boards (0: no machine or boot id, as before), each
    # with ``boots`` boots; every latency of a board is multiplied by its own factor exp(N(0,
    # board_sigma)), drawn from ``board_seed`` and the board's number, so two specs with the same
    # board_seed (a paired design: the same boards on both kernels) share their boards' factors.
    boards: int = 0
    boots: int = 1
    board_sigma: float = 0.0
    board_seed: int = 0
    first_board: int = 0  # board numbers start here (two sides on different boards: disjoint ranges)


def board_factors(spec: SynthSpec) -> np.ndarray:
    """The latency factor of each of ``spec``'s boards."""
    return np.array([
        np.exp(np.random.default_rng([spec.board_seed, spec.first_board + b]).normal(0.0, spec.board_sigma))
        for b in range(spec.boards)
    ])


def _num(x: float) -> str:
    return "null" if math.isnan(x) else str(int(x))


def synthetic_lines(spec: SynthSpec) -> Iterator[str]:
    """JSON lines (each ending in a newline) of ``spec.n`` synthetic records."""
    full, bare = _template(True), _template(False)
    rng = np.random.default_rng(spec.seed)
    n = spec.n
    rss_kib = np.round(spec.rss_mib * 1024 * rng.lognormal(0.0, spec.rss_sigma, n))
    size = rss_kib / (256 * 1024)
    base_ns = spec.median_ms * 1e6 * spec.shift * size
    reaper = base_ns * rng.lognormal(0.0, spec.sigma, n)
    exit_mmap = base_ns * 1.2 * rng.lognormal(0.0, spec.sigma, n)
    total = reaper + exit_mmap
    wall = reaper * rng.lognormal(0.05, 0.05, n)
    kill_to_exit = np.maximum(reaper, exit_mmap) + 2e6 * rng.lognormal(0.0, 0.5, n)
    kill_to_mem = kill_to_exit + 5e6 * rng.lognormal(0.0, 0.5, n)
    lock_r = 1e5 * spec.shift * rng.lognormal(0.0, 1.0, n)
    lock_v = 2e5 * spec.shift * rng.lognormal(0.0, 1.0, n)
    share = rng.beta(5, 5, n)
    freed_r = np.round(rss_kib * share)
    freed_v = rss_kib - freed_r
    throughput = rss_kib / 1024 / (total / 1e9)
    dry = rng.random(n) < spec.dry_run_share
    board = np.arange(n) * max(spec.boards, 1) // max(n, 1)
    if spec.boards:
        factor = board_factors(spec)[board]
        for arr in (reaper, exit_mmap, total, wall, kill_to_exit, kill_to_mem, lock_r, lock_v):
            arr *= factor
        throughput = rss_kib / 1024 / (total / 1e9)
    release = json.dumps(spec.kernel_release)
    model = json.dumps(spec.machine_model)
    for i in range(n):
        timed = spec.timeline and not dry[i]
        b = spec.first_board + int(board[i])
        boot = (i * spec.boots * max(spec.boards, 1) // max(n, 1)) % spec.boots
        nan = float("nan")
        start = 1_000_000_000_000 + i * 1_000_000_000
        yield (full if timed else bare).format(
            record_id=f'"{spec.seed:08x}{i:024x}"',
            outcome='"dry_run"' if dry[i] else '"killed"',
            dry_run="true" if dry[i] else "false",
            status='"not_attempted"' if dry[i] else '"ok"',
            kernel_release=release,
            machine_model=model,
            machine_id=f'"board-{b:06d}"' if spec.boards else "null",
            boot_id=f'"boot-{b:06d}-{boot:03d}-{spec.seed}"' if spec.boards else "null",
            rss_kib=_num(rss_kib[i]),
            wall_ns=_num(nan if dry[i] else wall[i]),
            kill_to_exit_ns=_num(nan if dry[i] else kill_to_exit[i]),
            reaper_work_ns=_num(reaper[i]),
            exit_mmap_ns=_num(exit_mmap[i]),
            reap_total_ns=_num(total[i]),
            lock_reaper_ns=_num(lock_r[i]),
            lock_victim_ns=_num(lock_v[i]),
            freed_reaper_kib=_num(freed_r[i]),
            freed_victim_kib=_num(freed_v[i]),
            kill_to_mem_ns=_num(nan if dry[i] else kill_to_mem[i]),
            start_ns=start,
            end_ns=start + int(kill_to_mem[i]),
            throughput=f"{throughput[i]:.3f}",
        )
