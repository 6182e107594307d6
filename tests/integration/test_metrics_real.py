"""Metrics on a real kill (issue 14 item 3): the real daemon loop, table, killer and syscalls kill a
victim the test started inside its own memory cgroup; the scripted part is only the pressure event.
The textfile must show that kill; a textfile that cannot be written must cost the kill nothing. And
observe mode's textfile shows a kill another process made (tracefs: mounted for that test when it is
not, and unmounted again, as tests/integration/test_tracing.py does)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from lmkd_py import provenance
from lmkd_py.config import Config, KillConfig, Level, MetricsConfig
from lmkd_py.daemon import Daemon
from lmkd_py.psi import PressureEvent
from lmkd_py.records import ListSink, Outcome
from tests.conftest import Children, check_no_instance_left, needs_root
from tests.fakes import scoped_daemon

pytestmark = [needs_root]

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")
CRITICAL = Level(name="critical", stall="full", threshold_us=1, window_us=2_000_000, min_oom_score_adj=0)




@pytest.fixture
def cgroup() -> Iterator[object]:
    if not (V1 / "memory.limit_in_bytes").exists() or not (V2 / "cgroup.procs").exists():
        pytest.skip("needs the v1 memory controller at /sys/fs/cgroup/memory and cgroup v2 at /sys/fs/cgroup/unified")
    from lmkd_py.stress import PressureCgroup

    # PressureCgroup removes both directories on the way out, also when the test fails.
    with PressureCgroup(f"lmkd-test-metrics-{uuid.uuid4().hex[:8]}", limit_mib=256) as cg:
        yield cg


def _daemon(cg: object, textfile: Path) -> tuple[Daemon, ListSink]:
    from lmkd_py.stress import PressureCgroup

    assert isinstance(cg, PressureCgroup)
    cfg = Config(kill=KillConfig(recheck_pressure=False, min_interval_ms=0),
                 metrics=MetricsConfig(textfile=textfile))
    # Provenance as the daemon's builder makes it: the kernel release comes from there.
    return scoped_daemon(cg, cfg, provenance.collect(cfg.digest()))


def _kill_one(cg: object, textfile: Path) -> tuple[ListSink, list[dict[str, object]], int]:
    from lmkd_py.stress import PressureCgroup, VictimSpec, spawn_victim

    assert isinstance(cg, PressureCgroup)
    victim = spawn_victim(VictimSpec(size_mib=64, adj=900), cg)
    victim.wait_ready()
    d, sink = _daemon(cg, textfile)
    with d, capture_logs() as logs:
        d.table.refresh()
        d.metrics.write()
        d.handle([PressureEvent(CRITICAL, time.monotonic_ns(), "signals", "test", kill_reason="low_mem_and_swap",
                                still=lambda: True)])
    assert victim.wait_exit(10) == -9, "the victim died by SIGKILL"
    return sink, logs, victim.pid


def test_a_real_kill_shows_in_the_textfile(cgroup: object, tmp_path: Path) -> None:
    prom = tmp_path / "lmkd_py.prom"
    sink, logs, pid = _kill_one(cgroup, prom)
    (rec,) = sink.records
    assert rec.outcome is Outcome.KILLED and rec.victim.pid == pid
    assert rec.kill_to_exit_ns is not None
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    krel = (("kernel_release", os.uname().release),)
    key = (("kernel_release", os.uname().release), ("outcome", "killed"), ("reason", "low_mem_and_swap"))
    assert samples[("lmkd_py_kills_total", key)] == 1
    assert samples[("lmkd_py_up", ())] == 1
    assert samples[("lmkd_py_kill_to_exit_seconds_count", krel)] == 1
    assert samples[("lmkd_py_kill_to_exit_seconds_sum", krel)] == pytest.approx(rec.kill_to_exit_ns / 1e9)
    reaped = rec.mrelease.status.value == "ok"
    assert samples[("lmkd_py_mrelease_wall_seconds_count", krel)] == (1 if reaped else 0)
    assert not [e for e in logs if e["event"].startswith("metrics.")], logs


def test_an_unwritable_textfile_costs_the_kill_nothing(cgroup: object, tmp_path: Path) -> None:
    prom = tmp_path / "no-such-dir" / "lmkd_py.prom"
    sink, logs, pid = _kill_one(cgroup, prom)
    (rec,) = sink.records
    assert rec.outcome is Outcome.KILLED and rec.victim.pid == pid
    failed = [e for e in logs if e["event"] == "metrics.write_failed"]
    assert len(failed) == 1 and failed[0]["path"] == str(prom), logs
    assert not prom.parent.exists(), "the metrics directory is the operator's to make, never created"


@pytest.fixture
def no_instance_left(tracefs_root: Path) -> Iterator[None]:
    yield from check_no_instance_left(tracefs_root)


def test_observe_mode_counts_a_kill_made_by_another_process(
    tracefs_root: Path, no_instance_left: None, children: Children, tmp_path: Path
) -> None:
    from lmkd_py.observe import run_observe

    prom = tmp_path / "lmkd_py.prom"
    cfg = Config(metrics=MetricsConfig(textfile=prom))
    stop = threading.Event()
    rc: list[int] = []
    sink = ListSink()
    thread = threading.Thread(target=lambda: rc.append(run_observe(
        cfg, sink=sink, duration_ns=None, cgroup=None, stop=stop.is_set, tracefs_root=tracefs_root,
        warm_refresh_ns=100_000_000)), daemon=True)
    victim = children.victim(32)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not prom.exists():  # written once observe is ready
            assert thread.is_alive() and time.monotonic() < deadline, f"observe never wrote {prom} (rc {rc})"
            time.sleep(0.05)
        subprocess.run(["kill", "-KILL", str(victim.pid)], check=True, timeout=30)
        assert victim.wait(10) == -9
        while not [r for r in sink.records if r.victim.pid == victim.pid]:
            assert thread.is_alive() and time.monotonic() < deadline, "no record of the kill"
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    assert rc == [0]
    (rec,) = [r for r in sink.records if r.victim.pid == victim.pid]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    release = rec.provenance.kernel_release
    assert release is not None
    observed = [v for (name, labels), v in samples.items()
                if name == "lmkd_py_kills_total" and ("outcome", "observed") in labels]
    assert sum(observed) == len(sink.records) >= 1
    assert samples[("lmkd_py_kills_total", (("kernel_release", release), ("outcome", "observed"),
                                            ("reason", "process")))] >= 1
    assert samples[("lmkd_py_build_info", (("mode", "observe"), ("version", rec.provenance.lmkd_py_version)))] == 1
    assert samples[("lmkd_py_up", ())] == 0, "a clean stop writes up 0"
