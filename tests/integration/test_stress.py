"""The workload generator against the real kernel: every option checked from /proc/PID/maps and
/proc/PID/status, cgroup placement and cleanup, a real PSI-producing thrasher, and the ``stress`` command
cleaning up after SIGINT/SIGTERM (and its children dying with it after a SIGKILL)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from lmkd_py.procfs import ProcStatus, parse_pressure, parse_status
from lmkd_py.stress import (
    PressureCgroup,
    Region,
    StressChildError,
    StressVictim,
    VictimSpec,
    expected_rss_kib,
    plan_layout,
    scenario_specs,
    spawn_victim,
    start_thrasher,
)

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup/unified")
CAP_SYS_RESOURCE = 24


def _cgroups_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not (V1_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {V1_ROOT}"
    if not (V2_ROOT / "memory.pressure").exists() and not (V2_ROOT / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy with PSI at {V2_ROOT}"
    return None


_NO_CGROUPS = _cgroups_usable()
needs_cgroups = pytest.mark.skipif(_NO_CGROUPS is not None, reason=_NO_CGROUPS or "")


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


# --- reading the victim back from /proc ----------------------------------------------------------------


def maps_ranges(pid: int) -> list[tuple[int, int]]:
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = line.split()[0].split("-")
        out.append((int(lo, 16), int(hi, 16)))
    return out


def vmas_inside(pid: int, region: Region) -> int:
    """VMAs lying wholly inside ``region``; fails the test if one straddles its edge (a merge)."""
    n = 0
    for lo, hi in maps_ranges(pid):
        if lo >= region.start and hi <= region.end:
            n += 1
        else:
            assert hi <= region.start or lo >= region.end, f"VMA {lo:#x}-{hi:#x} straddles {region}"
    return n


def status(pid: int) -> ProcStatus:
    return parse_status(Path(f"/proc/{pid}/status").read_text())


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def gone(pid: int) -> bool:
    """The pid names no process, or only a zombie (a reparented child nobody reaps yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_until(pred: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


# --- fixtures: everything started here is killed and removed, also on failure ----------------------------


class Spawner:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.victims: list[StressVictim] = []

    def __call__(self, spec: VictimSpec, cgroup: PressureCgroup | None = None, ready: bool = True) -> StressVictim:
        v = spawn_victim(spec, cgroup, workdir=self.workdir)
        self.victims.append(v)
        if ready:
            v.wait_ready(60)
        return v

    def cleanup(self) -> None:
        for v in self.victims:
            v.kill()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    s = Spawner(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], tuple[int, ProcStatus]]]:
    """maps line count and status of a minimal victim (1 MiB anon, 1 VMA) with N threads: what the
    interpreter itself brings, measured, not assumed."""
    cache: dict[int, tuple[int, ProcStatus]] = {}
    s = Spawner(tmp_path_factory.mktemp("baseline"))

    def get(threads: int) -> tuple[int, ProcStatus]:
        if threads not in cache:
            v = s(VictimSpec(size_mib=1, vmas=1, threads=threads))
            cache[threads] = (len(maps_ranges(v.pid)), status(v.pid))
            v.kill()
        return cache[threads]

    try:
        yield get
    finally:
        s.cleanup()


def _empty(procs: Path) -> Callable[[], bool]:
    return lambda: not procs.read_text().strip()


@pytest.fixture
def cgroup_name() -> Iterator[str]:
    """A unique cgroup name; whatever is left under it (after the test's own cleanup) is removed."""
    name = f"lmkd-py-test-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        for root in (V1_ROOT, V2_ROOT):
            path = root / name
            if path.exists():
                wait_until(_empty(path / "cgroup.procs"), 10)
                for _ in range(100):
                    try:
                        path.rmdir()
                        break
                    except OSError:
                        time.sleep(0.05)


# --- the victim's options, read back from /proc ---------------------------------------------------------

LAYOUTS = [
    VictimSpec(size_mib=64, vmas=1, kind="anon"),
    VictimSpec(size_mib=32, vmas=2000, kind="anon"),
    VictimSpec(size_mib=32, vmas=300, kind="file"),
    VictimSpec(size_mib=32, vmas=300, kind="shmem"),
    VictimSpec(size_mib=48, vmas=400, kind="mixed", threads=5, adj=700),
    VictimSpec(size_mib=64, vmas=500, kind="anon", touch="sparse"),
    VictimSpec(size_mib=64, vmas=10, kind="file", touch="sparse"),
    VictimSpec(size_mib=64, vmas=10, kind="shmem", touch="sparse", threads=3, adj=1000),
    VictimSpec(size_mib=100, vmas=20000, kind="anon"),
]


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: f"{s.kind}-{s.vmas}vmas-{s.touch}-{s.threads}t")
def test_victim_is_what_its_spec_says(
    spec: VictimSpec, spawn: Spawner, baseline: Callable[[int], tuple[int, ProcStatus]]
) -> None:
    v = spawn(spec)
    # VMAs: exactly spec.vmas between the guards of each kind...
    plans = plan_layout(spec)
    assert [(r.kind, r.vmas) for r in v.regions] == [(p.kind, p.vmas) for p in plans]
    for r in v.regions:
        assert vmas_inside(v.pid, r) == r.vmas, r
    # ...and in /proc/PID/maps as a whole, against a measured baseline child (1 VMA + 2 guards).
    base_lines, base = baseline(spec.threads)
    expected_delta = spec.vmas + 2 * len(plans) - 3
    delta = len(maps_ranges(v.pid)) - base_lines
    assert abs(delta - expected_delta) <= 4, (delta, expected_delta)
    # RSS by kind: the victim's memory on top of the baseline's.
    st = status(v.pid)
    want = expected_rss_kib(spec)
    want["anon"] -= 1024  # the baseline victim's own 1 MiB
    got = {
        "anon": (st.rss_anon_kib or 0) - (base.rss_anon_kib or 0),
        "file": (st.rss_file_kib or 0) - (base.rss_file_kib or 0),
        "shmem": (st.rss_shmem_kib or 0) - (base.rss_shmem_kib or 0),
    }
    for kind in want:
        assert abs(got[kind] - want[kind]) <= 2048 + want[kind] // 50, (kind, got, want)
    assert st.threads == spec.threads
    assert oom_score_adj(v.pid) == (spec.adj if spec.adj is not None else oom_score_adj(os.getpid()))
    assert Path(f"/proc/{v.pid}/comm").read_text().strip() == "lmkd-py-victim"


def test_file_memory_leaves_no_file_behind(spawn: Spawner) -> None:
    v = spawn(VictimSpec(size_mib=8, vmas=4, kind="mixed"))
    assert os.listdir(spawn.workdir) == []  # unnamed from the start (O_TMPFILE)
    file_lines = [ln for ln in Path(f"/proc/{v.pid}/maps").read_text().splitlines() if str(spawn.workdir) in ln]
    assert len(file_lines) == 1 and file_lines[0].endswith("(deleted)"), file_lines
    v.kill()
    assert os.listdir(spawn.workdir) == []


def test_kill_is_idempotent_and_reaps(spawn: Spawner) -> None:
    v = spawn(VictimSpec(size_mib=4))
    v.kill()
    v.kill()
    assert v.poll() == -signal.SIGKILL
    assert not Path(f"/proc/{v.pid}").exists()


def test_wait_exit_reaps_after_someone_else_killed_it(spawn: Spawner) -> None:
    v = spawn(VictimSpec(size_mib=4))
    assert v.wait_exit(0.1) is None  # still alive
    pidfd = os.pidfd_open(v.pid)  # our unreaped child: the pid cannot have been reused
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)
    assert v.wait_exit(10) == -signal.SIGKILL


def test_negative_adj_follows_cap_sys_resource(spawn: Spawner) -> None:
    v = spawn(VictimSpec(size_mib=1, adj=-100), ready=False)
    if has_cap_sys_resource():
        v.wait_ready(30)
        assert oom_score_adj(v.pid) == -100
    else:
        with pytest.raises(StressChildError, match="PermissionError"):
            v.wait_ready(30)


def test_wait_ready_times_out_without_killing(spawn: Spawner) -> None:
    v = spawn(VictimSpec(size_mib=256, vmas=1), ready=False)
    with pytest.raises(TimeoutError):
        v.wait_ready(0.001)
    v.wait_ready(60)  # still alive, still becomes ready
    assert (status(v.pid).rss_anon_kib or 0) >= 256 * 1024


# --- cgroups ----------------------------------------------------------------------------------------------


@needs_cgroups
def test_victim_is_charged_to_the_cgroup_and_removed_with_it(spawn: Spawner, cgroup_name: str) -> None:
    with PressureCgroup(cgroup_name, 256) as cg:
        assert (cg.v1_path / "memory.limit_in_bytes").read_text().strip() == str(256 << 20)
        v = spawn(VictimSpec(size_mib=64, kind="anon"), cg)
        assert v.pid in cg.pids()
        assert str(v.pid) in (cg.v1_path / "cgroup.procs").read_text().split()
        usage = int((cg.v1_path / "memory.usage_in_bytes").read_text())
        assert usage >= 64 << 20, usage  # allocated after joining: charged here
        assert cg.pressure_file.exists()
        assert cg.oom_kill_count() == 0
    assert v.wait_exit(5) == -signal.SIGKILL
    assert not cg.v1_path.exists() and not cg.v2_path.exists()


@needs_cgroups
def test_victim_over_the_limit_is_oom_killed_in_the_memcg(spawn: Spawner, cgroup_name: str) -> None:
    with PressureCgroup(cgroup_name, 32) as cg:
        v = spawn(VictimSpec(size_mib=64), cg, ready=False)
        with pytest.raises(StressChildError, match="status -9"):
            v.wait_ready(30)
        assert cg.oom_kill_count() >= 1


@needs_cgroups
def test_added_process_is_killed_on_exit(cgroup_name: str) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with PressureCgroup(cgroup_name, None) as cg:
            cg.add(sleeper.pid)
            assert cg.pids() == [sleeper.pid]
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()


@needs_cgroups
def test_existing_cgroup_is_not_adopted(cgroup_name: str) -> None:
    (V2_ROOT / cgroup_name).mkdir()
    with pytest.raises(FileExistsError):
        PressureCgroup(cgroup_name, 64).__enter__()
    assert (V2_ROOT / cgroup_name).is_dir()  # left alone: not ours
    assert not (V1_ROOT / cgroup_name).exists()  # what we had made was removed


@needs_cgroups
def test_thrasher_makes_real_memory_pressure(cgroup_name: str, tmp_path: Path) -> None:
    with PressureCgroup(cgroup_name, 96) as cg:
        t0 = time.monotonic()
        thrasher = start_thrasher(cg, 192, tmp_path)
        try:
            ready_s = time.monotonic() - t0
            assert thrasher.pid in cg.pids()
            assert os.listdir(tmp_path) == []  # unlinked once opened
            before = parse_pressure(cg.pressure_file.read_text()).some.total_us
            start = time.monotonic()
            grown = 0
            while time.monotonic() - start < 10 and grown < 500_000:
                time.sleep(0.25)
                grown = parse_pressure(cg.pressure_file.read_text()).some.total_us - before
            elapsed = time.monotonic() - start
            usage_mib = int((cg.v1_path / "memory.usage_in_bytes").read_text()) >> 20
            print(f"\nthrasher: file written in {ready_s:.2f} s; memory.pressure some total grew "
                  f"{grown / 1000:.0f} ms in {elapsed:.2f} s; memcg usage {usage_mib} MiB of 96")
            assert grown >= 100_000, f"only {grown} us of 'some' stall in {elapsed:.1f} s"
            assert cg.oom_kill_count() == 0
        finally:
            thrasher.stop()
        assert thrasher.poll() == -signal.SIGKILL
        assert not thrasher.path.exists()
    assert not cg.v1_path.exists()


# --- the command ------------------------------------------------------------------------------------------


def stress_cmd(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "lmkd_py.cli", "stress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_stdout(proc: subprocess.Popen[bytes], timeout_s: float, lines: int = 1) -> list[str]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout_s
    while buf.count(b"\n") < lines:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no output in {timeout_s} s")
        data = os.read(fd, 1 << 20)
        if not data:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"stress exited with {proc.wait()}: {err}")
        buf += data
    return buf.decode().splitlines()


@pytest.fixture
def commands() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@needs_cgroups
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stress_command_cleans_up_on_signal(
    sig: signal.Signals, cgroup_name: str, commands: list[subprocess.Popen[bytes]]
) -> None:
    proc = stress_cmd("--json", "--count", "2", "--size-mib", "16", "--vmas", "30", "--kind", "mixed",
                      "--threads", "2", "--adj", "600", "--pressure", "--limit-mib", "96", "--cgroup", cgroup_name)
    commands.append(proc)
    doc: dict[str, Any] = json.loads(read_stdout(proc, 60)[0])
    pids = doc["pids"]
    thrasher = doc["thrasher"]["pid"]
    assert len(pids) == 2 and set(pids) | {thrasher} <= set(map(int, (V2_ROOT / cgroup_name / "cgroup.procs")
                                                               .read_text().split()))
    for entry in doc["victims"]:
        assert [(r["kind"], r["vmas"]) for r in entry["regions"]] == [("anon", 16), ("file", 7), ("shmem", 7)]
        assert oom_score_adj(entry["pid"]) == 600 and status(entry["pid"]).threads == 2
    assert doc["cgroup"]["pressure_file"] == str(V2_ROOT / cgroup_name / "memory.pressure")
    workdir = Path(doc["workdir"])
    assert workdir.is_dir()
    proc.send_signal(sig)
    assert proc.wait(20) == 0, proc.stderr.read().decode() if proc.stderr else ""
    assert all(gone(p) for p in [*pids, thrasher])
    assert not (V1_ROOT / cgroup_name).exists() and not (V2_ROOT / cgroup_name).exists()
    assert not workdir.exists()


@needs_cgroups
def test_stress_command_cleans_up_when_interrupted_while_starting(
    cgroup_name: str, commands: list[subprocess.Popen[bytes]]
) -> None:
    proc = stress_cmd("--count", "6", "--size-mib", "256", "--vmas", "2000", "--cgroup", cgroup_name,
                      "--limit-mib", "4096")
    commands.append(proc)
    assert wait_until(lambda: (V2_ROOT / cgroup_name / "cgroup.procs").exists()
                      and len((V2_ROOT / cgroup_name / "cgroup.procs").read_text().split()) >= 2, 30)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    assert not (V1_ROOT / cgroup_name).exists() and not (V2_ROOT / cgroup_name).exists()


def test_stress_command_ends_after_duration(commands: list[subprocess.Popen[bytes]]) -> None:
    proc = stress_cmd("--count", "3", "--size-mib", "8", "--vmas", "5", "--kind", "file", "--duration", "1")
    commands.append(proc)
    pids = [int(x) for x in read_stdout(proc, 60, lines=3)]
    assert len(pids) == 3 and not any(gone(p) for p in pids)
    assert proc.wait(20) == 0
    assert all(gone(p) for p in pids)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--pressure"], "--limit-mib"), (["--kind", "mixed", "--vmas", "2"], "one VMA per kind"),
     (["--scenario", "nope"], "app-like")],
)
def test_stress_command_refuses_bad_options(args: list[str], message: str) -> None:
    res = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "stress", *args], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert message in res.stderr


@needs_cgroups
def test_children_die_with_a_sigkilled_stress_command(
    cgroup_name: str, commands: list[subprocess.Popen[bytes]]
) -> None:
    proc = stress_cmd("--json", "--count", "2", "--size-mib", "8", "--pressure", "--limit-mib", "64",
                      "--cgroup", cgroup_name)
    commands.append(proc)
    doc = json.loads(read_stdout(proc, 60)[0])
    workdir = Path(doc["workdir"])
    try:
        proc.kill()  # no cleanup possible: the children see EOF on stdin and exit by themselves
        proc.wait()
        children = [*doc["pids"], doc["thrasher"]["pid"]]
        assert wait_until(lambda: all(gone(p) for p in children), 10)
        assert wait_until(lambda: not (V2_ROOT / cgroup_name / "cgroup.procs").read_text().strip(), 10)
        assert os.listdir(workdir) == []  # the thrasher's file was unlinked as soon as it was opened
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("name", ["app-like", "many-vmas"])
def test_scenario_command_is_seeded_and_laid_out(name: str, commands: list[subprocess.Popen[bytes]]) -> None:
    proc = stress_cmd("--json", "--scenario", name, "--seed", "3")
    commands.append(proc)
    doc = json.loads(read_stdout(proc, 120)[0])
    specs = scenario_specs(name, 3)
    assert [e["spec"] for e in doc["victims"]] == [asdict(s) for s in specs]
    for entry, spec in zip(doc["victims"], specs, strict=True):
        pid = entry["pid"]
        for r in entry["regions"]:
            assert vmas_inside(pid, Region(**r)) == r["vmas"]
        assert sum(r["vmas"] for r in entry["regions"]) == spec.vmas
        assert status(pid).threads == spec.threads
        assert oom_score_adj(pid) == spec.adj
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert all(gone(p) for p in doc["pids"])
