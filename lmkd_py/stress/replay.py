"""A replica of a captured memory shape (``lmkd-py stress --shape``): a stress child that maps what the
shape family plans for it.

The child starts its threads and says so; this side then captures the child's own memory (the
*baseline*: interpreter, libraries, thread stacks), plans what is still missing class by class, and
sends that plan; the child maps it (disk files it creates in a directory of its own under ``workdir``,
removed by this side once the child is gone; shmem files in a directory of its own under ``/dev/shm``,
unlinked as soon as they are mapped) and says it is ready. Everything the
machine cannot hold is refused before the child is started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import structlog

from lmkd_py.shape import Machine, Shape, ShapeError, Target, capture, check_fits, replay_plan, target_for, this_machine
from lmkd_py.stress.cgroup import PressureCgroup
from lmkd_py.stress.proc import VICTIM_COMM, _Child, _start

SHM_ROOT: Final = Path("/dev/shm")


class ShapeVictim(_Child):
    """A started replica: ``target`` is what it should look like, ``warnings`` what the plan or the child
    could not do as the shape says, ``baseline`` the replica's own memory before the plan."""

    what = "shape replica"

    def __init__(self, popen: subprocess.Popen[bytes], target: Target, shmdir: Path, filedir: Path) -> None:
        super().__init__(popen)
        self.target = target
        self.shmdir = shmdir
        self.filedir = filedir
        self.warnings: list[str] = list(target.warnings)
        self.baseline: Shape | None = None

    def _on_ready(self, ready: dict[str, Any]) -> None:
        self.warnings.extend(str(w) for w in ready.get("warnings", []))
        shutil.rmtree(self.shmdir, ignore_errors=True)  # its files were unlinked once mapped

    def _remove_files(self) -> None:
        """Once the child is gone (reaped): its directories and the files in them."""
        shutil.rmtree(self.shmdir, ignore_errors=True)
        shutil.rmtree(self.filedir, ignore_errors=True)

    def kill(self) -> None:
        super().kill()
        self._remove_files()

    def wait_exit(self, timeout_s: float) -> int | None:
        rc = super().wait_exit(timeout_s)
        if rc is not None:
            self._remove_files()
        return rc


def _shmdir(workdir: Path) -> Path:
    """A private directory for shmem files: under /dev/shm when it is a directory we can write, else in
    ``workdir`` (then those files are shmem only where ``workdir`` is a tmpfs, as in the lab's guest)."""
    root = SHM_ROOT if SHM_ROOT.is_dir() else workdir
    try:
        return Path(tempfile.mkdtemp(prefix="lmkd-py-shape-", dir=root))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="lmkd-py-shape-", dir=workdir))


def spawn_shape_victim(
    shape: Shape,
    *,
    scale: float = 1.0,
    cgroup: PressureCgroup | None = None,
    python: str = sys.executable,
    workdir: Path | None = None,
    machine: Machine | None = None,
    adj: int | None = None,
    baseline_timeout_s: float = 60.0,
) -> ShapeVictim:
    """Start a replica of ``shape`` (times ``scale``); call ``wait_ready()`` before measuring it.

    Raises ShapeError before starting anything when this machine cannot hold it (memory, VMAs,
    threads) or the scale is out of range; StressChildError or TimeoutError (the child is then killed)
    when the child fails before it is planned."""
    machine = machine or this_machine()
    target = target_for(shape, machine, scale)
    check_fits(target, machine)  # raises before anything exists
    work = workdir if workdir is not None else Path(tempfile.gettempdir())
    filedir = Path(tempfile.mkdtemp(prefix="lmkd-py-shape-", dir=work))
    try:
        shmdir = _shmdir(work)
    except BaseException:
        shutil.rmtree(filedir, ignore_errors=True)
        raise
    cfg: dict[str, Any] = {"mode": "shape", "adj": adj, "comm": VICTIM_COMM, "threads": target.threads,
                           "workdir": str(filedir), "shmdir": str(shmdir)}
    try:
        # LC_ALL=C: the interpreter then maps no locale files, one VMA fewer of its own in file_private.
        victim = ShapeVictim(_start(cfg, python, cgroup, env={"LC_ALL": "C"}), target, shmdir, filedir)
    except BaseException:
        shutil.rmtree(shmdir, ignore_errors=True)
        shutil.rmtree(filedir, ignore_errors=True)
        raise
    try:
        victim._next_message(baseline_timeout_s, "started")
        victim.baseline = capture(victim.pid)
        plan, warnings = replay_plan(target, victim.baseline, machine)
        victim.warnings.extend(warnings)
        stdin = victim._popen.stdin
        assert stdin is not None
        stdin.write(json.dumps(plan, separators=(",", ":")).encode() + b"\n")
        stdin.flush()
    except BaseException:
        victim.kill()
        raise
    structlog.get_logger().debug("stress.shape_started", pid=victim.pid, comm=shape.provenance.comm,
                                 vmas=len(target.vmas), threads=target.threads, scale=scale)
    return victim


__all__ = ["ShapeError", "ShapeVictim", "spawn_shape_victim"]
