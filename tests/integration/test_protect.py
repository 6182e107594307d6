"""Self-protection on the real kernel, in a child process (mlockall and SCHED_FIFO would otherwise
apply to the test runner itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lmkd_py.procfs import CAP_IPC_LOCK, self_has_capability
from lmkd_py.psi import has_cap_sys_resource

CHILD = """
import json, os
from lmkd_py.config import SelfProtectionConfig
from lmkd_py.protect import protect_self
from lmkd_py.syscalls import LinuxSyscalls
res = protect_self(SelfProtectionConfig(mlockall=True, oom_score_adj=-1000, sched_fifo_priority=1), LinuxSyscalls())
status = open("/proc/self/status").read()
vmlck = int([l for l in status.splitlines() if l.startswith("VmLck:")][0].split()[1])
print(json.dumps({"results": [r.__dict__ for r in res], "vmlck_kib": vmlck,
                  "adj": int(open("/proc/self/oom_score_adj").read()),
                  "policy": os.sched_getscheduler(0)}))
"""


def test_each_step_reports_truthfully_and_none_is_fatal() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    by = {r["step"]: r for r in got["results"]}
    assert set(by) == {"mlockall", "oom_score_adj", "sched_fifo"}
    # each result matches what the kernel really did
    assert by["mlockall"]["ok"] == (got["vmlck_kib"] > 0)
    assert by["oom_score_adj"]["ok"] == (got["adj"] == -1000)
    assert by["sched_fifo"]["ok"] == (got["policy"] == os.SCHED_FIFO)
    # and with the capabilities this machine gives root: CAP_IPC_LOCK yes, CAP_SYS_RESOURCE no
    if self_has_capability(CAP_IPC_LOCK):
        assert by["mlockall"]["ok"], by["mlockall"]
    if not has_cap_sys_resource():
        assert not by["oom_score_adj"]["ok"] and "CAP_SYS_RESOURCE" in by["oom_score_adj"]["detail"]
