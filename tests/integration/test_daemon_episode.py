"""A real pressure episode: a v1 memcg with a limit and a v2 cgroup for PSI, a file-thrashing process
making real refault stalls, a victim (high oom_score_adj) and a protected process (protect list; a
negative oom_score_adj cannot be set on these machines). The daemon, scoped with --cgroup, must kill
the victim, never the protected process, before the kernel's memcg OOM killer acts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NOBODY, needs_root

pytestmark = [needs_root, pytest.mark.slow]

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup/unified")
PROTECT_MARK = "--lmkd-test-protected"
PROTECTED_CODE = """
import sys, time
open("/proc/self/oom_score_adj", "w").write("1000")
b = bytearray(96 << 20)
for i in range(0, len(b), 4096):
    b[i] = 1
print("ready", flush=True)
time.sleep(3600)
"""

CONFIG = """
dry_run = {dry_run}
[pressure]
poll_interval_ms = 250
[[pressure.levels]]
name = "medium"
stall = "some"
threshold_us = 100000
window_us = 2000000
min_oom_score_adj = 800
[policy]
protect_cmdline = ["{mark}"]
min_rss_kib = 1024
[kill]
min_interval_ms = 2000
"""


def _have_cgroups() -> str | None:
    if not (V1 / "memory.limit_in_bytes").exists():
        return "no cgroup v1 memory controller at /sys/fs/cgroup/memory"
    if not (V2 / "cgroup.procs").exists():
        return "no cgroup v2 hierarchy at /sys/fs/cgroup/unified"
    return None


@pytest.fixture
def episode(tmp_path: Path) -> Iterator[dict[str, object]]:
    missing = _have_cgroups()
    if missing:
        pytest.skip(missing)
    from lmkd_py.stress import PressureCgroup, VictimSpec, spawn_victim, start_thrasher

    name = f"lmkd-py-test-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="lmkd-py-ep-", dir="/var/tmp"))
    with PressureCgroup(name, limit_mib=256) as cg:
        protected = subprocess.Popen([sys.executable, "-c", PROTECTED_CODE, PROTECT_MARK],
                                     stdout=subprocess.PIPE, text=True)
        try:
            assert protected.stdout is not None and protected.stdout.readline().strip() == "ready"
            cg.add(protected.pid)
            victim = spawn_victim(VictimSpec(size_mib=48, adj=900), cg)
            victim.wait_ready()
            thrasher = start_thrasher(cg, file_mib=512, workdir=workdir)
            try:
                yield {"cg": cg, "victim": victim, "protected": protected, "thrasher": thrasher}
            finally:
                thrasher.stop()
                victim.kill()
        finally:
            if protected.poll() is None:
                protected.kill()
            protected.wait()
            shutil.rmtree(workdir, ignore_errors=True)


def _run_daemon(cfg_text: str, cg_v2: Path, records: Path, until: float,
                as_nobody: tuple[list[str], dict[str, str]] | None = None) -> tuple[subprocess.Popen[str], float]:
    cfg = records.parent / "lmkd.toml"
    cfg.write_text(cfg_text)
    prefix = as_nobody[0] if as_nobody else [sys.executable, "-m", "lmkd_py.cli"]
    cmd = [*prefix, "--config", str(cfg), "--cgroup", str(cg_v2),
           "--records", str(records), "--duration", str(until), "--tracing", "off", "--log-format", "json"]
    kw: dict[str, object] = (
        {"user": NOBODY, "group": NOBODY, "extra_groups": [], "env": as_nobody[1]} if as_nobody else {}
    )
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=records.parent,
                         **kw)  # type: ignore[call-overload]
    return p, time.monotonic()


def _wait_for_record(records: Path, p: subprocess.Popen[str], timeout: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if records.exists() and records.read_text().strip():
            return [json.loads(x) for x in records.read_text().splitlines()]
        time.sleep(0.2)
    return []


def _stop(p: subprocess.Popen[str]) -> tuple[int, str]:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    return p.returncode, err


def test_daemon_kills_the_victim_not_the_protected_before_the_kernel(episode: dict, tmp_path: Path) -> None:
    cg, victim, protected = episode["cg"], episode["victim"], episode["protected"]
    oom_before = cg.oom_kill_count()
    records = tmp_path / "records.jsonl"
    p, _t0 = _run_daemon(CONFIG.format(dry_run="false", mark=PROTECT_MARK), cg.v2_path, records, 90)
    try:
        recs = _wait_for_record(records, p, 80)
    finally:
        code, err = _stop(p)
    assert recs, f"no record within 80 s; daemon stderr:\n{err[-3000:]}"
    assert code == 0, err[-2000:]
    first = recs[0]
    assert first["outcome"] == "killed", first
    assert first["victim"]["pid"] == victim.pid
    assert first["pressure"]["level"] == "medium" and first["pressure"]["mechanism"] == "trigger"
    assert first["pressure"]["decision_latency_ns"] > 0
    assert victim.wait_exit(10) == -signal.SIGKILL
    assert protected.poll() is None, "the protected process was killed"
    assert all(r["victim"]["pid"] != protected.pid for r in recs)
    assert cg.oom_kill_count() == oom_before, "the kernel's memcg OOM killer acted first"
    assert '"psi.armed"' in err


def test_dry_run_as_unprivileged_user_kills_nothing(
    episode: dict, nobody_python: tuple[list[str], dict[str, str]]
) -> None:
    cg, victim, protected = episode["cg"], episode["victim"], episode["protected"]
    shared = Path(tempfile.mkdtemp(prefix="lmkd-py-dry-"))
    try:
        # nobody's own directory: the writer refuses one others may write (issue 18, item 1)
        os.chown(shared, NOBODY, NOBODY)
        os.chmod(shared, 0o755)
        records = shared / "records.jsonl"
        p, _ = _run_daemon(CONFIG.format(dry_run="true", mark=PROTECT_MARK), cg.v2_path, records, 60,
                           as_nobody=nobody_python)
        try:
            recs = _wait_for_record(records, p, 50)
        finally:
            code, err = _stop(p)
        assert recs, f"no dry-run record; stderr:\n{err[-3000:]}"
        assert code == 0, err[-2000:]
        rec = recs[0]
        assert rec["dry_run"] is True and rec["outcome"] == "dry_run"
        assert rec["victim"]["pid"] == victim.pid and rec["pressure"]["reason"]
        assert rec["pressure"]["mechanism"] == "poll"  # nobody cannot write a root-owned memory.pressure
        assert '"psi.polling_fallback"' in err
        assert os.stat(records).st_uid == 65534
        assert protected.poll() is None and victim.poll() is None
        os.kill(victim.pid, 0)  # still alive
    finally:
        shutil.rmtree(shared, ignore_errors=True)
