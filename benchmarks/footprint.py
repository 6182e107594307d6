"""Footprint of the running daemon (issue 13): start-up, RSS, locked memory, idle CPU, per-import costs.

    python benchmarks/footprint.py [--idle 10] [--smoke] [--no-peers]

Targets: RSS <= 22 MiB and locked <= 22 MiB at idle after the first kill, in kill mode and observe mode,
with tracing, the proc connector and the records writer on; start-up to ``daemon.ready`` <= 250 ms.
Prints figures; never fails on them.

Runs, each a real ``lmkd-py`` started as the service starts it (``--config config/lmkd-py.toml``, root):

1. kill mode on the whole machine, the free-memory floor on, with ``policy.min_rss_kib`` so large that no
   process is eligible (this is a shared machine: a real-mode daemon must not kill anyone's process):
   start-up time and the idle footprint before any kill;
2. kill mode scoped (``--cgroup``) to a memory cgroup with a limit holding only this benchmark's grower
   (oom_score_adj 900, 150 MiB/s): the footprint at idle after its first kill;
3. observe mode after recording a kill this benchmark makes (SIGKILL of its own process);
4. the peers, where installed (``--no-peers`` skips; without ``--smoke`` the benchmark installs the Debian
   packages ``earlyoom`` and ``nohang`` when missing): earlyoom ``--dryrun`` and nohang idle, same run.

Start-up is timed from compiled bytecode, as an installed lmkd-py starts (PYTHONDONTWRITEBYTECODE is
dropped for the daemons and the bytecode written once first). Figures: VmRSS; Locked (smaps_rollup:
locked and resident, what mlockall costs the machine); VmLck (what the kernel counts against
RLIMIT_MEMLOCK: every VMA flagged locked, resident or not); idle CPU. Then the resident cost of each
import on the daemon's path in a fresh interpreter, in the order the daemon makes them.

``--smoke``: 2 s of idle per run and no peer installation (it still measures peers already installed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from _bench import broken, parse_args  # benchmarks/ is on sys.path when run as a script

from lmkd_py.stress import PressureCgroup

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "lmkd-py.toml"
TICK = os.sysconf("SC_CLK_TCK")
MIB = 1024.0

GROWER = """
import mmap, sys, time
open("/proc/self/oom_score_adj", "w").write("900")
print("ready", flush=True)
sys.stdin.readline()
maps = []
while len(maps) < 512:
    m = mmap.mmap(-1, 3 << 20)
    for off in range(0, 3 << 20, 4096):
        m[off] = 1
    maps.append(m)
    time.sleep(0.02)
time.sleep(3600)
"""

# Imports on the daemon's path, in its order (cli.main defers asyncio first, as the daemon does).
IMPORT_STEPS = ("structlog", "lmkd_py.config", "lmkd_py.records", "lmkd_py.procfs", "lmkd_py.policy",
                "lmkd_py.candidates", "lmkd_py.psi", "lmkd_py.signals", "lmkd_py.headroom", "lmkd_py.reasons",
                "lmkd_py.killer", "lmkd_py.tracing", "lmkd_py.metrics", "lmkd_py.status", "lmkd_py.daemon",
                "lmkd_py.service", "lmkd_py.observe")
# What the daemon does not load, for comparison: each in a fresh interpreter after the daemon's imports.
NOT_LOADED = ("asyncio", "pydantic", "hashlib", "re2", "numpy")
IMPORT_PROBE = """
import ctypes, gc, sys
from lmkd_py.lean import defer_asyncio
defer_asyncio()
trim = ctypes.CDLL(None).malloc_trim
def rss():
    gc.collect(); trim(0)
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1])
print("(bare interpreter)", rss())
for name in sys.argv[1:]:
    if name.startswith("+"):
        name = name[1:]
        sys.modules.pop(name, None)  # the placeholder, for asyncio
    __import__(name)
    print(name, rss())
"""


def status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmLck", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Locked:"):
                out["Locked"] = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_ticks"] = int(fields[11]) + int(fields[12])
    return out


# Start-up as an installed lmkd-py starts: from compiled bytecode (pip compiles it at install time). An
# environment with PYTHONDONTWRITEBYTECODE (this project's machines have it) would otherwise compile ~50
# modules at every start (~50 ms here).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def warm_bytecode() -> None:
    subprocess.run([sys.executable, "-c", "import lmkd_py.cli, lmkd_py.service, lmkd_py.observe, lmkd_py.config"],
                   env=ENV, check=True, timeout=120)


class Lmkd:
    """One lmkd-py process; stderr (JSON logs) drained by a thread that notes when it is ready."""

    def __init__(self, args: list[str]) -> None:
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([sys.executable, "-m", "lmkd_py.cli", *args, "--log-format", "json"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines: list[str] = []
        self.ready_s: float | None = None
        self._ready = threading.Event()
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        deadline = time.monotonic() + 30
        while not self._ready.wait(0.05) and self.p.poll() is None and time.monotonic() < deadline:
            pass
        if not self._ready.is_set():
            self.stop()
            self._t.join(2)
            broken("lmkd-py not ready in 30 s:\n" + "".join(self.lines[-20:]))

    def _drain(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line)
            if self.ready_s is None and ('"daemon.ready"' in line or '"observe.ready"' in line):
                self.ready_s = time.monotonic() - self.t0
                self._ready.set()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def idle(pid: int, seconds: float) -> dict[str, float]:
    """Median RSS and the last locked figures over ``seconds``, and CPU % over them."""
    first = status(pid)
    t0 = time.monotonic()
    rss = []
    last = first
    while time.monotonic() - t0 < seconds:
        time.sleep(min(1.0, seconds / 4))
        last = status(pid)
        rss.append(last["VmRSS"])
    wall = time.monotonic() - t0
    return {"rss": sorted(rss)[len(rss) // 2] / MIB, "anon": last.get("RssAnon", 0) / MIB,
            "locked": last.get("Locked", 0) / MIB, "vmlck": last.get("VmLck", 0) / MIB,
            "cpu_pct": 100.0 * (last["cpu_ticks"] - first["cpu_ticks"]) / TICK / wall}


@contextlib.contextmanager
def grower_in(cg: PressureCgroup) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        cg.add(p.pid)
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def wait_until(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def run_whole_machine(tmp: Path, seconds: float) -> tuple[float, dict[str, float]]:
    cfg = tmp / "none-eligible.toml"
    # The shipped file with one override in its [policy] table: no process is large enough to be eligible.
    text, n = re.subn(r"(?m)^min_rss_kib = \d+", "min_rss_kib = 1099511627776", SHIPPED.read_text(), count=1)
    if n != 1:
        broken(f"{SHIPPED}: no min_rss_kib line to override")
    cfg.write_text(text)
    d = Lmkd(["--config", str(cfg), "--records", str(tmp / "whole.jsonl")])
    try:
        figures = idle(d.p.pid, seconds)
    finally:
        d.stop()
    assert d.ready_s is not None
    return d.ready_s, figures


def run_after_kill(tmp: Path, seconds: float, prefix: str) -> tuple[float, dict[str, float], dict[str, object]]:
    out = tmp / "scoped.jsonl"
    with PressureCgroup(f"{prefix}{uuid.uuid4().hex[:8]}", limit_mib=256) as cg:
        (cg.v1_path / "memory.swappiness").write_text("0")
        with grower_in(cg) as g:
            d = Lmkd(["--config", str(SHIPPED), "--cgroup", str(cg.v2_path), "--records", str(out)])
            try:
                assert g.stdin is not None
                g.stdin.write("go\n")
                g.stdin.flush()
                if not wait_until(lambda: records(out), 20):
                    broken("kill mode: no record 20 s after the grower started:\n" + "".join(d.lines[-20:]))
                time.sleep(1.0)
                figures = idle(d.p.pid, seconds)
            finally:
                d.stop()
    assert d.ready_s is not None
    return d.ready_s, figures, records(out)[0]


def run_observe(tmp: Path, seconds: float) -> tuple[float, dict[str, float]]:
    out = tmp / "observed.jsonl"
    victim = subprocess.Popen([sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'\\1' * (16384);"
                               "print('ready', flush=True); import time; time.sleep(3600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        o = Lmkd(["observe", "--config", str(SHIPPED), "--records", str(out)])
        try:
            victim.send_signal(signal.SIGKILL)  # a kill made by someone else: this benchmark
            victim.wait()
            if not wait_until(lambda: any(r["victim"]["pid"] == victim.pid for r in records(out)), 20):  # type: ignore[index]
                broken("observe mode recorded no kill:\n" + "".join(o.lines[-20:]))
            time.sleep(1.0)
            figures = idle(o.p.pid, seconds)
        finally:
            o.stop()
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait()
    assert o.ready_s is not None
    return o.ready_s, figures


def ensure_peers(install: bool) -> None:
    missing = [p for p in ("earlyoom", "nohang") if shutil.which(p) is None]
    if missing and install:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=600)


def run_peer(argv: list[str], seconds: float) -> dict[str, float] | None:
    """A peer daemon in a mode that kills nothing, sampled after 2 s of settling; None when absent."""
    if shutil.which(argv[0]) is None:
        return None
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2.0)
        if p.poll() is not None:
            return None
        return idle(p.pid, seconds)
    finally:
        if p.poll() is None:
            p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)
        if p.poll() is None:
            p.kill()
            p.wait()


def import_costs() -> list[tuple[str, float]]:
    steps = [*IMPORT_STEPS, *(f"+{m}" if m == "asyncio" else m for m in NOT_LOADED)]
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *steps], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    rows = []
    prev = None
    for line in out.stdout.splitlines():
        name, kib = line.rsplit(" ", 1)
        cur = int(kib) / MIB
        rows.append((name, cur - prev if prev is not None else cur))
        prev = cur
    if not rows:
        broken(f"import probe failed: {out.stderr[-500:]}")
    return rows


def row(name: str, ready_s: float | None, f: dict[str, float] | None) -> str:
    if f is None:
        return f"| {name} | not installed | | | | |"
    ready = f"{ready_s * 1000:.0f} ms" if ready_s is not None else "-"
    return (f"| {name} | {ready} | {f['rss']:.1f} MiB | {f['locked']:.1f} MiB | {f['vmlck']:.1f} MiB | "
            f"{f['cpu_pct']:.3f} % |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle sampling per run")
    ap.add_argument("--no-peers", action="store_true", help="do not measure earlyoom and nohang")
    ap.add_argument("--cgroup-prefix", default="lmkd-py-bench-footprint-", help="name prefix of the memcg made")
    args = parse_args(ap, smoke={"idle": 2.0})
    if os.geteuid() != 0:
        broken("needs root (real mode, memory cgroups, tracefs)")
    warm_bytecode()
    with tempfile.TemporaryDirectory(prefix="lmkd-py-bench-") as tmp_s:
        tmp = Path(tmp_s)
        whole_ready, whole = run_whole_machine(tmp, args.idle)
        kill_ready, killed, rec = run_after_kill(tmp, args.idle, args.cgroup_prefix)
        obs_ready, observed = run_observe(tmp, args.idle)
    peers: dict[str, dict[str, float] | None] = {}
    if not args.no_peers:
        ensure_peers(install=not args.smoke)
        peers["earlyoom 1.x (C), --dryrun"] = run_peer(["earlyoom", "--dryrun"], args.idle)
        peers["nohang (Python), its default config"] = run_peer(
            ["nohang", "--monitor", "--config", "/etc/nohang/nohang.conf"], args.idle)
    kernel = rec.get("kernel")
    traced = isinstance(kernel, dict) and kernel.get("exit_mmap_ns") is not None
    print("lmkd-py footprint (issue 13 targets: RSS <= 22 MiB, locked <= 22 MiB, start-up <= 250 ms)")
    print("| daemon, run | start-up to ready | RSS | locked (smaps) | VmLck | idle CPU |")
    print("|---|---|---|---|---|---|")
    print(row("lmkd-py kill mode, whole machine, floor on, before any kill (a config that is not the defaults: "
              "read by config.lean_parse, no child)", whole_ready, whole))
    print(row(f"lmkd-py kill mode, scoped, after its first kill (tracing {'on' if traced else 'OFF'}; shipped config)",
              kill_ready, killed))
    print(row("lmkd-py observe mode, after recording a kill (shipped config)", obs_ready, observed))
    for name, f in peers.items():
        print(row(name, None, f))
    print()
    print("Resident cost of each import on the daemon's path (fresh interpreter, cumulative order):")
    for name, mib in import_costs():
        print(f"  {name:28s} {mib:+6.2f} MiB")


if __name__ == "__main__":
    main()
