"""The parts a config asks for, made alike at start and on reload: ``Builder`` (rules, pressure sources,
killer) and ``wrap_sources`` (the PSI source wrapped with the decision signals: the free-memory floor,
cgroup headroom, lmkd's kill reasons). ``daemon.build`` uses it; the ``Daemon`` owns what it makes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lmkd_py import provenance
from lmkd_py.config import Config
from lmkd_py.headroom import HeadroomCheck
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.policy import Rules
from lmkd_py.procfs import ProcFs, cgroup2_mount, cgroup_v2_relpath
from lmkd_py.psi import PressureSource, open_source, pressure_file
from lmkd_py.reasons import LmkdCheck
from lmkd_py.signals import AdaptiveSource, Check, Clock, FloorCheck, signal_level
from lmkd_py.syscalls import LinuxSyscalls

if TYPE_CHECKING:
    from lmkd_py.records import Provenance


class Builder:
    """Makes the parts a config asks for, at start and again on reload (so both make them alike)."""

    def __init__(self, proc: ProcFs, wake_fd: int | None = None) -> None:
        self.proc = proc
        self.wake_fd = wake_fd

    def scope(self, cfg: Config) -> tuple[Path | None, str | None]:
        """(directory, cgroup v2 path) of ``pressure.cgroup``, or (None, None) system-wide.
        Raises FileNotFoundError when the directory is not a cgroup v2 directory."""
        scope = cfg.pressure.cgroup
        if scope is None:
            return None, None
        if not (scope / "cgroup.procs").exists():
            raise FileNotFoundError(f"pressure.cgroup {scope}: not a cgroup v2 directory (no cgroup.procs)")
        return scope, cgroup_v2_relpath(scope, Path("/proc/self/mounts").read_text())

    def cgroup2_root(self) -> Path | None:
        """Where the cgroup v2 hierarchy is mounted, or None."""
        try:
            return cgroup2_mount(Path("/proc/self/mounts").read_text())
        except OSError:
            return None

    def rules(self, cfg: Config) -> Rules:
        return Rules.from_config(cfg.policy, self_pids={os.getpid()}, scope_cgroup=self.scope(cfg)[1])

    def source(self, cfg: Config) -> PressureSource:
        p = cfg.pressure
        src = open_source(p.source, pressure_file(p.cgroup), p.levels, p.poll_interval_ms * 1_000_000,
                          wake_fd=self.wake_fd)
        return wrap_sources(src, cfg, self.proc, scope_dir=p.cgroup)

    def provenance(self, cfg: Config) -> Provenance:
        """Where the records are made, confounders included: at start and on reload (a sysctl may have
        changed since), never on the kill path."""
        return provenance.collect(cfg.digest())

    def killer(self, cfg: Config) -> Killer:
        killer = Killer(LinuxSyscalls(), self.proc, options=KillOptions.from_config(cfg.kill),
                        provenance=self.provenance(cfg))
        if cfg.tracing != "off" and not cfg.dry_run:
            from lmkd_py.tracing import open_tracer  # tracefs code only when tracing is asked for

            killer.tracer = open_tracer(cfg.tracing)
        return killer


def wrap_sources(
    inner: PressureSource,
    cfg: Config,
    proc: ProcFs,
    *,
    scope_dir: Path | None,
    clock: Clock = time.monotonic_ns,
    sys_root: Path = Path("/sys"),
    mounts_path: Path = Path("/proc/self/mounts"),
) -> PressureSource:
    """Wrap ``inner`` (the PSI source) with the checks ``cfg`` asks for (module docstring). Returns
    ``inner`` itself when no check applies. Never raises for a missing input: each check degrades
    with one log line."""
    s = cfg.signals
    checks: list[Check] = []
    p = cfg.pressure
    if p.mem_floor_pct is not None and scope_dir is None:
        checks.append(FloorCheck(proc.free_and_total_kib, p.mem_floor_pct,
                                 signal_level("mem_floor", p.mem_floor_min_oom_score_adj),
                                 lead_ms=p.mem_floor_lead_ms))
    if scope_dir is not None and s.cgroup_headroom:
        checks.append(HeadroomCheck.open(scope_dir, s, proc, sys_root=sys_root, mounts_path=mounts_path))
    if s.lmkd_reasons:
        checks.append(LmkdCheck(s, proc, sys_root=sys_root, clock=clock))
    if not checks:
        return inner
    return AdaptiveSource(inner, checks, rate_kib_s=s.alloc_rate_mib_s * 1024,
                          min_ns=s.check_min_interval_ms * 1_000_000, max_ns=s.check_max_interval_ms * 1_000_000,
                          repeat_ns=s.repeat_interval_ms * 1_000_000, clock=clock)
