"""trace-export on a real kill's record: the real killer with a real tracefs timeline kills a child the
test started; ``lmkd-py trace-export`` turns its record into a trace whose kernel slices are the
timeline's own numbers.

Mounts: when tracefs is not mounted, it is mounted at /sys/kernel/tracing for this module and unmounted
afterwards (as tests/integration/test_tracing.py does); every test checks no lmkd-py instance is left."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmkd_py.killer import Killer
from lmkd_py.records import Outcome, RecordWriter
from lmkd_py.syscalls import LinuxSyscalls
from lmkd_py.tracing import open_tracer
from tests.conftest import Children, check_no_instance_left, needs_root
from tests.unit.test_trace_export import check_format, slices

pytestmark = [needs_root, pytest.mark.root]


@pytest.fixture(autouse=True)
def no_instance_left(tracefs_root: Path) -> Iterator[None]:
    yield from check_no_instance_left(tracefs_root)


def test_a_real_kill_exports_its_kernel_timeline(tracefs_root: Path, children: Children, tmp_path: Path) -> None:
    victim = children.victim(128)
    with open_tracer("on", tracefs_root=tracefs_root) as tracer:
        killer = Killer(LinuxSyscalls(), tracer=tracer)
        try:
            rec = killer.kill(killer.snapshot(victim.pid))
        finally:
            killer.close()
    assert rec.outcome is Outcome.KILLED
    k = rec.kernel
    assert k is not None and k.unavailable_reason is None, k
    records = tmp_path / "records.jsonl"
    assert RecordWriter(records).write(rec)
    trace = tmp_path / "kill.json"
    out = subprocess.run([sys.executable, "-m", "lmkd_py.cli", "trace-export", str(records), "--kill", rec.record_id,
                          "-o", str(trace)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(trace.read_text())
    check_format(doc)
    s = slices(doc)
    assert k.signal_generate_ns is not None and k.signal_deliver_ns is not None
    assert s["SIGKILL generate -> deliver"]["dur"] == pytest.approx((k.signal_deliver_ns - k.signal_generate_ns) / 1000)
    assert k.exit_mmap_ns is not None
    assert s["exit_mmap"]["dur"] == pytest.approx(k.exit_mmap_ns / 1000)
    if k.mrelease_enter_ns is not None and k.mrelease_exit_ns is not None:
        assert s["process_mrelease (kernel)"]["dur"] == pytest.approx((k.mrelease_exit_ns - k.mrelease_enter_ns) / 1000)
    top = next(v for name, v in s.items() if name.startswith("kill "))
    assert top["args"]["record_id"] == rec.record_id and top["args"]["timeline"].startswith("tracefs")
