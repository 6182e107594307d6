"""Assembly and service life: config -> parts -> Daemon; signals, SIGHUP reload, sd_notify, self-protection.

``daemon.py`` holds the loop; this module builds it (``build``), runs it as a process (``cmd_daemon``)
and swaps a new config in atomically on SIGHUP: every new part is made first, and only when all of
them could be made is anything replaced; a config that fails keeps the old one running.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog

from lmkd_py import log as logsetup
from lmkd_py import provenance
from lmkd_py.candidates import CandidateTable
from lmkd_py.config import Config, ConfigError, load_config
from lmkd_py.daemon import Daemon, Sink
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.policy import Rules
from lmkd_py.procfs import ProcFs, ProcParseError, cgroup_v2_relpath
from lmkd_py.psi import PressureSource, open_source, pressure_file
from lmkd_py.records import RecordWriter
from lmkd_py.sdnotify import Notifier
from lmkd_py.signals import wrap_sources
from lmkd_py.syscalls import LinuxSyscalls

log = structlog.get_logger("lmkd_py.service")

# Keys whose change needs a restart: they decide what the process watches and holds open.
RESTART_KEYS = ("pressure.cgroup", "tracing")


def apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    """CLI flags over the config file (CLI wins)."""
    update: dict[str, object] = {}
    if getattr(args, "dry_run", None):
        update["dry_run"] = True
    if getattr(args, "tracing", None):
        update["tracing"] = args.tracing
    if getattr(args, "log_level", None):
        update["log_level"] = args.log_level
    if getattr(args, "records", None):
        update["records"] = cfg.records.model_copy(update={"path": args.records})
    if getattr(args, "cgroup", None):
        update["pressure"] = cfg.pressure.model_copy(update={"cgroup": args.cgroup})
    return cfg.model_copy(update=update) if update else cfg


@dataclass
class Assembly:
    """How to make the config-dependent parts; used at start and again on reload."""

    proc: ProcFs
    wake_fd: int | None

    def scope(self, cfg: Config) -> tuple[Path | None, str | None]:
        scope = cfg.pressure.cgroup
        if scope is None:
            return None, None
        if not (scope / "cgroup.procs").exists():
            raise FileNotFoundError(f"pressure.cgroup {scope}: not a cgroup v2 directory (no cgroup.procs)")
        return scope, cgroup_v2_relpath(scope, Path("/proc/self/mounts").read_text())

    def rules(self, cfg: Config) -> Rules:
        return Rules.from_config(cfg.policy, self_pids={os.getpid()}, scope_cgroup=self.scope(cfg)[1])

    def source(self, cfg: Config) -> PressureSource:
        p = cfg.pressure
        src = open_source(p.source, pressure_file(p.cgroup), p.levels, p.poll_interval_ms * 1_000_000,
                          wake_fd=self.wake_fd)
        return wrap_sources(src, cfg, self.proc, scope_dir=p.cgroup)  # floor, headroom, lmkd reasons

    def free_memory(self) -> tuple[int, int] | None:
        """(MemAvailable + per-CPU free lists, MemTotal) in KiB, or None when unreadable."""
        try:
            info = self.proc.meminfo()
            avail, total = info.get("MemAvailable"), info.get("MemTotal")
            if avail is None or total is None:
                return None
            return avail + self.proc.pcp_free_kib(), total
        except (OSError, ProcParseError):
            return None

    @staticmethod
    def writer(cfg: Config) -> RecordWriter:
        return RecordWriter(cfg.records_path(), cfg.records.max_bytes, cfg.records.keep, cfg.records.fsync)


def build(cfg: Config, *, sink: Sink, wake_fd: int | None = None, procfs: ProcFs | None = None) -> Daemon:
    """Assemble a daemon. Raises OSError when no pressure source can be had at all."""
    asm = Assembly(procfs or ProcFs(), wake_fd)
    scope_dir, _ = asm.scope(cfg)
    table = CandidateTable(asm.proc, asm.rules(cfg), scope_dir=scope_dir, clock=time.monotonic_ns)
    killer = Killer(LinuxSyscalls(), asm.proc, options=KillOptions.from_config(cfg.kill),
                    provenance=provenance.collect(cfg.digest()))
    source = asm.source(cfg)
    if cfg.tracing != "off" and not cfg.dry_run:
        from lmkd_py.tracing import open_tracer

        # The systemd unit bind-mounts tracefs read-write here (ProtectKernelTunables= makes
        # /sys/kernel/tracing read-only) and says so in LMKD_PY_TRACEFS.
        tracefs_env = os.environ.get("LMKD_PY_TRACEFS")
        killer.tracer = open_tracer(cfg.tracing, tracefs_root=Path(tracefs_env) if tracefs_env else None)
    daemon = Daemon(cfg, source=source, killer=killer, table=table, sink=sink)
    daemon.reopen_source = lambda: asm.source(daemon.cfg)
    return daemon


def reconfigure(daemon: Daemon, new: Config, asm: Assembly) -> str | None:
    """Swap ``new`` in, all or nothing. Returns None when applied, else the reason it was rejected."""
    old = daemon.cfg
    for key in RESTART_KEYS:
        section, _, name = key.rpartition(".")
        a = getattr(getattr(old, section), name) if section else getattr(old, name)
        b = getattr(getattr(new, section), name) if section else getattr(new, name)
        if a != b:
            return f"{key} changed ({a!r} -> {b!r}): that needs a restart"
    try:
        rules = asm.rules(new)
        source = asm.source(new) if (new.pressure, new.signals) != (old.pressure, old.signals) else None
        writer = asm.writer(new) if new.records != old.records else None
    except OSError as exc:
        return f"cannot apply: {exc}"
    # Everything could be made: swap.
    daemon.cfg = new
    daemon.table.rules = rules
    daemon.killer.options = KillOptions.from_config(new.kill)
    daemon.killer.provenance = daemon.killer.provenance.model_copy(update={"config_hash": new.digest()})
    if source is not None:
        daemon.source.close()
        daemon.source = source
    if writer is not None:
        daemon.sink = writer
    daemon.table.refresh()
    return None


def cmd_daemon(args: argparse.Namespace) -> int:
    try:
        cfg = apply_overrides(load_config(args.config), args)
    except ConfigError as exc:
        print(f"lmkd-py: invalid config:\n{exc}", file=sys.stderr)
        return 2
    logsetup.configure(args.log_format, cfg.log_level)
    if cfg.mode == "observe":
        from lmkd_py.observe import serve

        return serve(cfg, records=cfg.records.path, duration_s=args.duration, cgroup=cfg.pressure.cgroup)
    from lmkd_py.sdnotify import SdNotifier

    notifier: Notifier = SdNotifier.from_env()
    if not cfg.dry_run:
        from lmkd_py.protect import protect_self

        protect_self(cfg.self_protection, LinuxSyscalls())
    writer = Assembly.writer(cfg)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    asm = Assembly(ProcFs(), rfd)
    try:
        daemon = build(cfg, sink=writer, wake_fd=rfd, procfs=asm.proc)
    except OSError as exc:
        log.error("daemon.start_failed", reason=str(exc))
        print(f"lmkd-py: cannot start: {exc}", file=sys.stderr)
        return 1
    daemon.notifier = notifier

    def reload() -> None:
        notifier.reloading()
        try:
            new = apply_overrides(load_config(args.config), args)
        except ConfigError as exc:
            why = str(exc)
        else:
            why = reconfigure(daemon, new, asm) or ""
            if not why:
                logsetup.configure(args.log_format, new.log_level)
                log.info("config.reloaded", config=str(args.config), config_hash=new.digest())
        if why:
            log.error("config.reload_rejected", config=str(args.config), reason=why,
                      kept=daemon.cfg.digest())
        notifier.ready(f"config {daemon.cfg.digest()}" + (" (reload rejected)" if why else ""))

    daemon.reload = reload

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        daemon.stop_requested = True

    def on_hup(signum: int, _frame: FrameType | None) -> None:
        daemon.reload_requested = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("daemon.start", records=str(writer.path), dry_run=cfg.dry_run, config=str(args.config),
             config_hash=cfg.digest(), pid=os.getpid())
    try:
        duration = int(args.duration * 1e9) if args.duration is not None else None
        return daemon.run(duration)
    finally:
        daemon.killer.close()
        if daemon.killer.tracer is not None:
            daemon.killer.tracer.close()
        daemon.source.close()
        stats = getattr(daemon.sink, "stats", None)
        if stats is not None and stats.dropped:
            log.error("records.dropped_total", dropped=stats.dropped, written=stats.written)
