"""Real memcg episodes for the decision signals (issue 12): lmkd-py must kill before the kernel's
memcg OOM killer does.

(a) headroom: a v1 memcg with a limit, no swap (swappiness 0), nothing to reclaim, one process of the
    test's (oom_score_adj 900) growing anonymous memory at ~150 MiB/s; the daemon, scoped to the
    test's v2 cgroup, must kill it with kill_reason cgroup_headroom and the memcg's oom_kill count
    must not rise.
(b) zram: a zram swap device the test makes (and always removes), a memcg with a limit and a memsw
    limit; a grower of compressible memory must be killed with a swap-related reason before the kernel
    OOM kill, and a process that merely swaps (well below its memsw limit) must not be.

The daemon's scope is the test's own v2 cgroup, which holds only the processes the test started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmkd_py.stress import PressureCgroup
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.slow]

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")
ZRAM_CONTROL = Path("/sys/class/zram-control")
MIB = 1 << 20

# Grows anonymous memory by step_mib every period_ms once it reads "go" (rate = step / period), up to
# cap_mib, then holds. fill "text" writes compressible (but not same-filled) pages, "one" one byte per page.
GROWER_CODE = """
import mmap, sys, time
step_mib, period_ms, cap_mib, fill = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
open("/proc/self/oom_score_adj", "w").write(sys.argv[5])
page = (b"lmkd-py grows compressible memory, page after page. " * 100)[:4096]
print("ready", flush=True)
sys.stdin.readline()
maps, grown, t = [], 0, time.monotonic()
while grown < cap_mib:
    m = mmap.mmap(-1, step_mib << 20)
    if fill == "text":
        for off in range(0, step_mib << 20, 4096):
            m[off:off + 4096] = page
    else:
        for off in range(0, step_mib << 20, 4096):
            m[off] = 1
    maps.append(m)
    grown += step_mib
    t += period_ms / 1000
    time.sleep(max(0.0, t - time.monotonic()))
print("capped", flush=True)
time.sleep(3600)
"""


def _missing() -> str | None:
    if not (V1 / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if not (V2 / "cgroup.procs").exists():
        return "no cgroup v2 hierarchy at /sys/fs/cgroup/unified"
    return None


class Grower:
    def __init__(self, step_mib: int, period_ms: int, cap_mib: int, fill: str = "one", adj: int = 900) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", GROWER_CODE, str(step_mib), str(period_ms), str(cap_mib),
                                   fill, str(adj)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"
        self.pid = self.p.pid

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


@pytest.fixture
def cgroup() -> Iterator[PressureCgroup]:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    with PressureCgroup(f"lmkd-h-signals-{uuid.uuid4().hex[:8]}", limit_mib=256) as cg:
        yield cg


class Daemon:
    """``lmkd-py`` (real mode) scoped to the test's v2 cgroup; stderr collected by a thread."""

    def __init__(self, tmp: Path, scope: Path, config: str | None = None) -> None:
        """``config``: TOML text; None runs on the built-in defaults (no --config), as a new user would."""
        self.records = tmp / "records.jsonl"
        args = []
        if config is not None:
            (tmp / "lmkd.toml").write_text(config)
            args = ["--config", str(tmp / "lmkd.toml")]
        self.p = subprocess.Popen(
            [sys.executable, "-m", "lmkd_py.cli", *args, "--cgroup", str(scope), "--records",
             str(self.records), "--duration", "60", "--tracing", "off", "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()
        assert self.ready.wait(30), "daemon not ready in 30 s:\n" + "".join(self.lines[-30:])

    def _drain(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line)
            if '"daemon.ready"' in line:
                self.ready.set()

    def recs(self) -> list[dict[str, Any]]:
        if not self.records.exists():
            return []
        return [json.loads(x) for x in self.records.read_text().splitlines() if x.strip()]

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        code = self.p.wait(30)
        self._t.join(5)
        return code

    def log(self) -> str:
        return "".join(self.lines[-40:])


def _wait(pred: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_headroom_kills_the_grower_before_the_memcg_oom_killer(cgroup: PressureCgroup, tmp_path: Path) -> None:
    cg = cgroup
    (cg.v1_path / "memory.swappiness").write_text("0")  # no swap, whatever the host has
    oom_before = cg.oom_kill_count()
    grower = Grower(step_mib=3, period_ms=20, cap_mib=2048)  # 150 MiB/s, far past the 256 MiB limit
    try:
        cg.add(grower.pid)
        d = Daemon(tmp_path, cg.v2_path)  # the built-in defaults
        try:
            t0 = time.monotonic()
            grower.go()
            assert _wait(lambda: grower.p.poll() is not None, 20), "the grower is still alive after 20 s"
            died_s = time.monotonic() - t0
            assert _wait(lambda: d.recs(), 5), "no record:\n" + d.log()
        finally:
            code = d.stop()
        recs = d.recs()
        assert code == 0, d.log()
        first = recs[0]
        assert first["victim"]["pid"] == grower.pid, first
        assert first["outcome"] == "killed", first
        pressure = first["pressure"]
        assert pressure["kill_reason"] == "cgroup_headroom", pressure
        sig = pressure["signals"]
        assert sig["limit_kib"] == 256 * 1024 and sig["headroom_kib"] < sig["threshold_kib"], sig
        assert grower.p.returncode == -signal.SIGKILL
        assert cg.oom_kill_count() == oom_before, "the kernel's memcg OOM killer acted"
        print(f"grower killed {died_s * 1000:.0f} ms after go at usage {sig['usage_kib']} KiB, decision "
              f"{pressure['decision_latency_ns'] / 1e6:.2f} ms; signals {sig}")
    finally:
        grower.kill()


# -- (b) zram -----------------------------------------------------------------------------------------

def _swap_used_kib(dev: Path) -> int | None:
    """KiB in use on ``dev`` per /proc/swaps, None when it is not a swap area (any more)."""
    from lmkd_py.procfs import parse_swaps

    for d in parse_swaps(Path("/proc/swaps").read_text()):
        if d.name == str(dev):
            return d.used_kib
    return None


def _swapoff_when_only_ours(dev: Path, sysdir: Path, idx: int, wait_s: float = 120.0) -> None:
    """swapoff once nothing is left on ``dev``. While it exists it is every memcg's swap: other people's
    processes at their limit swap into it, and swapping their pages off charges them back to their
    memcgs, whose OOM killer then kills them (seen on this host: four processes of a benchmark's memcg).
    Ours are dead by now, so wait for the rest to go; if it does not, leave the device and say how to
    remove it rather than kill what we did not start."""
    deadline = time.monotonic() + wait_s
    used = _swap_used_kib(dev)
    while used and time.monotonic() < deadline:
        time.sleep(0.5)
        used = _swap_used_kib(dev)
    if used:
        raise RuntimeError(
            f"{dev} still holds {used} KiB of other processes' swap after {wait_s:.0f} s: not swapped off (that "
            f"would OOM-kill them in their memcgs). Remove it later: swapoff {dev} && echo 1 > {sysdir}/reset "
            f"&& echo {idx} > {ZRAM_CONTROL}/hot_remove")
    if used is not None:
        subprocess.run(["swapoff", str(dev)], check=True, capture_output=True)


@contextlib.contextmanager
def zram_swap(disksize_mib: int) -> Iterator[Path]:
    """A zram swap device of its own (hot_add); swapoff (see _swapoff_when_only_ours), reset and
    hot_remove afterwards, also on failure. A failed clean-up raises: it must not go unnoticed."""
    if not (ZRAM_CONTROL / "hot_add").exists():
        pytest.skip("no /sys/class/zram-control (zram module not loaded)")
    idx = int((ZRAM_CONTROL / "hot_add").read_text())
    dev = Path(f"/dev/zram{idx}")
    sysdir = Path(f"/sys/block/zram{idx}")
    try:
        (sysdir / "disksize").write_text(str(disksize_mib * MIB))
        for _ in range(50):  # udev may take a moment to make the node
            if dev.exists():
                break
            time.sleep(0.05)
        subprocess.run(["mkswap", str(dev)], check=True, capture_output=True)
        subprocess.run(["swapon", str(dev)], check=True, capture_output=True)
        yield sysdir
    finally:
        _swapoff_when_only_ours(dev, sysdir, idx)
        (sysdir / "reset").write_text("1")
        (ZRAM_CONTROL / "hot_remove").write_text(str(idx))


NO_PSI_KILLS = """
[[pressure.levels]]
name = "low"
stall = "some"
threshold_us = 140000
window_us = 2000000
min_oom_score_adj = 1001
"""


def _set_memsw(cg: PressureCgroup, memsw_mib: int) -> None:
    v1 = cg.v1_path
    if not (v1 / "memory.memsw.limit_in_bytes").exists():
        pytest.skip("no memory.memsw.* (swap accounting off: swapaccount=0)")
    (v1 / "memory.swappiness").write_text("60")
    (v1 / "memory.memsw.limit_in_bytes").write_text(str(memsw_mib * MIB))


def test_zram_grower_is_killed_for_swap_and_a_mere_swapper_is_not(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.skip(missing)
    # 320 MiB: what this test needs (128 MiB for the grower, ~80 MiB for the swapper) and no more, since
    # every memcg on the host may swap into it while it exists.
    with zram_swap(320) as zdir, \
            PressureCgroup(f"lmkd-h-signals-{uuid.uuid4().hex[:8]}", limit_mib=128) as swapper_cg, \
            PressureCgroup(f"lmkd-h-signals-{uuid.uuid4().hex[:8]}", limit_mib=128) as grower_cg:
        _set_memsw(swapper_cg, 512)
        _set_memsw(grower_cg, 256)
        scope = V2 / f"lmkd-h-signals-scope-{uuid.uuid4().hex[:8]}"
        scope.mkdir()
        sub_a, sub_b = scope / "swapper", scope / "grower"
        try:
            sub_a.mkdir()
            sub_b.mkdir()
            oom_before = (swapper_cg.oom_kill_count(), grower_cg.oom_kill_count())
            # The swapper: 200 MiB of compressible memory in a 128 MiB memcg, 512 MiB memsw: swaps ~80 MiB.
            swapper = Grower(step_mib=4, period_ms=40, cap_mib=200, fill="text", adj=900)
            grower = Grower(step_mib=3, period_ms=20, cap_mib=2048, fill="text", adj=900)
            try:
                for g, cg, sub in ((swapper, swapper_cg, sub_a), (grower, grower_cg, sub_b)):
                    cg.adopt(g.pid)
                    (cg.v1_path / "cgroup.procs").write_text(str(g.pid))
                    (sub / "cgroup.procs").write_text(str(g.pid))
                # PSI levels that never kill: the swapping makes some stall, and this test is about the
                # swap signal deciding (a PSI kill of the swapper would be the PSI levels' business).
                d = Daemon(tmp_path, scope, NO_PSI_KILLS)
                try:
                    swapper.go()
                    assert swapper.p.stdout is not None
                    line = swapper.p.stdout.readline().strip()
                    assert line == "capped", f"the swapper died ({swapper.p.wait()}): {d.recs()}\n{d.log()}"
                    swapped_kib = int((swapper_cg.v1_path / "memory.memsw.usage_in_bytes").read_text()) // 1024 \
                        - int((swapper_cg.v1_path / "memory.usage_in_bytes").read_text()) // 1024
                    assert swapped_kib > 32 * 1024, f"the swapper swapped only {swapped_kib} KiB"
                    time.sleep(1.0)  # the swapper holds; no kill may come for it
                    assert d.recs() == [], d.recs()
                    grower.go()
                    assert _wait(lambda: grower.p.poll() is not None, 30), "the grower is still alive after 30 s"
                    assert _wait(lambda: d.recs(), 5), "no record:\n" + d.log()
                    time.sleep(1.0)
                finally:
                    code = d.stop()
                recs = d.recs()
                assert code == 0, d.log()
                assert [r["victim"]["pid"] for r in recs] == [grower.pid], recs
                pressure = recs[0]["pressure"]
                assert pressure["kill_reason"] == "low_mem_and_swap", pressure
                assert pressure["signals"]["swap_used_kib"] > 0, pressure
                assert grower.p.returncode == -signal.SIGKILL
                assert swapper.p.poll() is None, "the swapper was killed"
                assert (swapper_cg.oom_kill_count(), grower_cg.oom_kill_count()) == oom_before
                mm = (zdir / "mm_stat").read_text().split()
                print(f"zram mm_stat at the end: orig {int(mm[0]) >> 20} MiB compr {int(mm[1]) >> 20} MiB; "
                      f"signals {pressure['signals']}")
            finally:
                grower.kill()
                swapper.kill()
        finally:
            for sub in (sub_a, sub_b, scope):
                with contextlib.suppress(OSError):
                    sub.rmdir()


# -- the kernel's notifications wake the adaptive check ------------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "poll"])
def test_a_kernfs_notification_wakes_the_loop_at_once(mode: str) -> None:
    """v2 memory.events is watched with POLLPRI (kernfs_notify). This host's v2 tree has no memory
    controller, so the same mechanism is proven on cgroup.events (notified when a process joins)."""
    missing = _missing()
    if missing:
        pytest.skip(missing)
    import select as sel

    from lmkd_py.config import Level
    from lmkd_py.psi import open_source
    from lmkd_py.signals import AdaptiveSource, CheckResult

    class EventsFile:
        name = "cgroup.events"

        def __init__(self, fd: int) -> None:
            self.fd, self.calls = fd, 0

        def check(self, now_ns: int) -> CheckResult:
            self.calls += 1
            os.pread(self.fd, 4096, 0)  # re-arms the notification
            return CheckResult(margin_kib=1 << 40)  # far from anything: the period is the 5 s maximum

        def wake_fds(self) -> dict[int, int]:
            return {self.fd: sel.POLLPRI}

        def close(self) -> None:
            pass

    d = V2 / f"lmkd-h-signals-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    sleeper = None
    try:
        level = Level(name="low", stall="some", threshold_us=500_000, window_us=2_000_000, min_oom_score_adj=1001)
        inner = open_source(mode, d / "memory.pressure", [level], 10_000_000_000)
        fd = os.open(d / "cgroup.events", os.O_RDONLY)
        check = EventsFile(fd)
        src = AdaptiveSource(inner, [check], rate_kib_s=1 << 20, min_ns=10_000_000, max_ns=5_000_000_000)
        try:
            src.wait(None)
            assert check.calls == 1 and src.last_period_ns == 5_000_000_000
            sleeper = subprocess.Popen(["sleep", "60"])
            threading.Timer(0.2, lambda: (d / "cgroup.procs").write_text(str(sleeper.pid))).start()
            t0 = time.monotonic()
            src.wait(None)
            woke_s = time.monotonic() - t0
            assert check.calls == 2 and woke_s < 1.0, f"woke after {woke_s:.3f} s, {check.calls} looks"
        finally:
            src.close()
            os.close(fd)
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        for _ in range(50):
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def test_a_v1_usage_threshold_wakes_the_headroom_check(cgroup: PressureCgroup) -> None:
    """The eventfd armed at twice the kill threshold below the limit (256 - 64 MiB) fires when a grower
    crosses it, long before the adaptive period (set to 5 s here) would have looked again."""
    from lmkd_py.config import Level, SignalsConfig
    from lmkd_py.headroom import HeadroomCheck
    from lmkd_py.procfs import ProcFs
    from lmkd_py.psi import open_source
    from lmkd_py.signals import AdaptiveSource

    cg = cgroup
    (cg.v1_path / "memory.swappiness").write_text("0")
    grower = Grower(step_mib=8, period_ms=20, cap_mib=208)  # 400 MiB/s up to 208 MiB: past 192, below 224
    try:
        cg.add(grower.pid)
        level = Level(name="low", stall="some", threshold_us=500_000, window_us=2_000_000, min_oom_score_adj=1001)
        inner = open_source("auto", cg.pressure_file, [level], 10_000_000_000)
        check = HeadroomCheck.open(cg.v2_path, SignalsConfig(), ProcFs())
        src = AdaptiveSource(inner, [check], rate_kib_s=1, min_ns=10_000_000, max_ns=5_000_000_000)
        try:
            assert src.wait(None) == [] and len(check.wake_fds()) == 1  # armed at the first look
            assert src.last_period_ns == 5_000_000_000  # a 1 KiB/s "allocation rate": the longest period
            grower.go()
            t0 = time.monotonic()
            events = src.wait(None)
            woke_s = time.monotonic() - t0
            usage_mib = int((cg.v1_path / "memory.usage_in_bytes").read_text()) >> 20
            assert woke_s < 2.0, f"no wake from the usage threshold ({woke_s:.2f} s)"
            assert usage_mib >= 190 and events == [], (usage_mib, events)
            print(f"threshold wake {woke_s * 1000:.0f} ms after go at {usage_mib} MiB")
        finally:
            src.close()
    finally:
        grower.kill()
