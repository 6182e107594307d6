"""PSI triggers on this kernel: the 2 s window rule for writers without CAP_SYS_RESOURCE."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest
import structlog

from lmkd_py.config import Level
from lmkd_py.psi import PollingSource, TriggerSource, TriggerUnavailable, has_cap_sys_resource, open_source

SYSTEM = Path("/proc/pressure/memory")
pytestmark = pytest.mark.skipif(not SYSTEM.exists(), reason="kernel without PSI (/proc/pressure/memory)")
ONE_SECOND = Level(name="medium", stall="some", threshold_us=150_000, window_us=1_000_000, min_oom_score_adj=800)


@pytest.mark.skipif(has_cap_sys_resource(), reason="this process has CAP_SYS_RESOURCE: any window is accepted")
def test_unprivileged_window_is_adapted_on_the_real_kernel() -> None:
    # First the kernel's rule itself: the configured trigger, written as is, is refused.
    fd = os.open(SYSTEM, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, b"some 150000 1000000\0")
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    with structlog.testing.capture_logs() as logs:
        src = TriggerSource(SYSTEM, [ONE_SECOND])
    try:
        assert src.effective == {"medium": (300_000, 2_000_000)}
        adapted = [e for e in logs if e["event"] == "psi.window_adapted"]
        assert len(adapted) == 1 and adapted[0]["effective"] == "some 300000 2000000"
    finally:
        src.close()


def test_kernel_einval_is_adapted_even_when_the_cap_check_says_privileged() -> None:
    if has_cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: the kernel accepts a 1 s window")
    # privileged=True makes the first write use the 1 s window; the kernel answers EINVAL; we adapt.
    lv = dataclasses.replace(ONE_SECOND, window_us=1_000_000)
    with structlog.testing.capture_logs() as logs:
        try:
            src = TriggerSource(SYSTEM, [lv], privileged=True)
        except TriggerUnavailable as exc:
            pytest.fail(f"not adapted after EINVAL: {exc}")
    try:
        assert src.effective["medium"] == (300_000, 2_000_000)
        assert any(e["event"] == "psi.window_adapted" and e["reason"] == "EINVAL from the kernel" for e in logs)
    finally:
        src.close()


def test_unwritable_psi_file_falls_back_to_polling(tmp_path: Path) -> None:
    ro = Path("/proc/self/stat")  # exists and is readable, but refuses to be opened for writing
    with structlog.testing.capture_logs() as logs:
        src = open_source("auto", ro, [ONE_SECOND], 1_000_000_000)
    assert isinstance(src, PollingSource)
    assert any(e["event"] == "psi.polling_fallback" for e in logs)
    with pytest.raises(TriggerUnavailable):
        open_source("trigger", ro, [ONE_SECOND], 1_000_000_000)
    with pytest.raises(FileNotFoundError, match="no PSI file"):
        open_source("auto", tmp_path / "missing", [ONE_SECOND], 1_000_000_000)


def test_service_wraps_the_system_source_with_the_memory_floor() -> None:
    from lmkd_py.builder import Builder
    from lmkd_py.config import Config, PressureConfig, SignalsConfig
    from lmkd_py.procfs import ProcFs
    from lmkd_py.signals import AdaptiveSource, FloorCheck

    asm = Builder(ProcFs(), None)
    src = asm.source(Config())
    try:
        assert isinstance(src, AdaptiveSource) and "floor 5 %" in src.description
        assert any(isinstance(c, FloorCheck) for c in src.checks)
        free, total = asm.proc.free_and_total_kib() or (0, 0)
        assert 0 < free <= total
        if free < total * 0.05:
            pytest.skip("this machine is below its own 5 % memory floor right now")
        assert src.check(0) == []
    finally:
        src.close()
    off = asm.source(Config(pressure=PressureConfig(mem_floor_pct=None),
                            signals=SignalsConfig(lmkd_reasons=False)))
    try:
        assert not isinstance(off, AdaptiveSource)
    finally:
        off.close()
