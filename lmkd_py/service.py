"""Process life: config, one-instance lock, self-protection, signals, sd_notify; then ``daemon.build``.

``daemon.py`` holds the loop and owns its parts (built whole, swapped whole on SIGHUP, closed by
itself); this module runs it as a process (``cmd_daemon``). Every refusal at start is one line on
stderr naming the culprit and an exit code: 2 for a bad config, 1 for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from lmkd_py import log as logsetup
from lmkd_py.config import Config, ConfigError, PendingConfig, load_config_isolated
from lmkd_py.daemon import build
from lmkd_py.procfs import CAP_KILL, self_has_capability
from lmkd_py.records import open_writer
from lmkd_py.sdnotify import Notifier
from lmkd_py.status import claim as claim_status
from lmkd_py.status import runtime_dir  # the directory of the lock and of the status file
from lmkd_py.syscalls import LinuxSyscalls

log = structlog.get_logger("lmkd_py.service")

LOCK_NAME = "lmkd-py.lock"


class AlreadyRunning(Exception):
    """Another lmkd-py holds the lock; the message names its pid and the lock file."""


def apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    """CLI flags over the config file (CLI wins)."""
    update: dict[str, Any] = {}
    if getattr(args, "dry_run", None):
        update["dry_run"] = True
    if getattr(args, "tracing", None):
        update["tracing"] = args.tracing
    if getattr(args, "log_level", None):
        update["log_level"] = args.log_level
    if getattr(args, "records", None):
        update["records"] = dataclasses.replace(cfg.records, path=args.records)
    if getattr(args, "cgroup", None):
        update["pressure"] = dataclasses.replace(cfg.pressure, cgroup=args.cgroup)
    return dataclasses.replace(cfg, **update) if update else cfg


@contextlib.contextmanager
def instance_lock(directory: Path) -> Iterator[Path]:
    """Hold ``directory/lmkd-py.lock`` (flock) for the block: two killers on one machine would kill twice
    for one shortage. Raises AlreadyRunning naming the holder's pid. The file holds our pid; the lock,
    not the file, is what counts, so a file left by a crash does not block a restart."""
    # 0755: the status file beside the lock is for ordinary users to read (lmkd-py status).
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise AlreadyRunning(f"another lmkd-py (pid {holder}) already runs here: it holds {path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def _startup_warnings(cfg: Config) -> None:
    """Say at start what would otherwise surface only at the first kill."""
    if not cfg.dry_run and not self_has_capability(CAP_KILL):
        log.warning("daemon.no_cap_kill", reason="without CAP_KILL only this user's own processes can be killed")


def cmd_daemon(args: argparse.Namespace, pending: PendingConfig | None = None) -> int:
    """The daemon. ``pending``: the config file's validation, started early by cli.main."""
    try:
        cfg = apply_overrides((pending or PendingConfig(args.config)).result(), args)
    except ConfigError as exc:
        print(f"lmkd-py: invalid config:\n{exc}", file=sys.stderr)
        return 2
    logsetup.configure(args.log_format, cfg.log_level)
    if cfg.mode == "observe":
        from lmkd_py.observe import serve

        # As a service (Restart=always), observe waits for tracefs rather than exit into a restart loop.
        return serve(cfg, records=cfg.records.path, duration_s=args.duration, cgroup=cfg.pressure.cgroup,
                     status_dir=runtime_dir(), wait_for_tracefs=True)
    lock_dir = None if cfg.dry_run else runtime_dir()
    try:
        with contextlib.ExitStack() as stack:
            if lock_dir is not None:
                stack.enter_context(instance_lock(lock_dir))
            elif not cfg.dry_run:
                log.warning("daemon.no_lock", reason="no runtime directory: a second instance would not be noticed")
            return _serve(cfg, args)
    except (AlreadyRunning, OSError) as exc:
        log.error("daemon.start_failed", reason=str(exc))
        print(f"lmkd-py: cannot start: {exc}", file=sys.stderr)
        return 1


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from lmkd_py.journal import JournalSender
    from lmkd_py.sdnotify import SdNotifier
    from lmkd_py.tracing import TracingUnavailable

    notifier: Notifier = SdNotifier.from_env()
    _startup_warnings(cfg)
    if not cfg.dry_run:
        from lmkd_py.protect import protect_self

        protect_self(cfg.self_protection, LinuxSyscalls())
    writer = open_writer(cfg)
    writer.check()  # an unsafe or unwritable records path is refused now, not found at the first kill
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    try:
        try:
            daemon = build(cfg, sink=writer, wake_fd=rfd, notifier=notifier, journal=JournalSender.from_env())
        except TracingUnavailable as exc:
            raise OSError(f"tracing = \"on\" but the kernel timeline is unavailable: {exc.reason}") from None
        with daemon:
            daemon.status = claim_status(runtime_dir(), log)
            daemon.load_config = lambda: apply_overrides(load_config_isolated(args.config), args)
            daemon.on_reloaded = lambda new: logsetup.configure(args.log_format, new.log_level)

            def on_stop(signum: int, _frame: FrameType | None) -> None:
                daemon.stop_requested = True

            def on_hup(signum: int, _frame: FrameType | None) -> None:
                daemon.reload_requested = True

            signal.signal(signal.SIGTERM, on_stop)
            signal.signal(signal.SIGINT, on_stop)
            signal.signal(signal.SIGHUP, on_hup)
            log.info("daemon.start", records=str(writer.path), dry_run=cfg.dry_run, config=str(args.config),
                     config_hash=cfg.digest(), pid=os.getpid())
            duration = int(args.duration * 1e9) if args.duration is not None else None
            rc = daemon.run(duration)
            stats = getattr(daemon.sink, "stats", None)  # the sink a reload put in place, if any
            if stats is not None and stats.dropped:
                log.error("records.dropped_total", dropped=stats.dropped, written=stats.written)
            return rc
    finally:
        signal.set_wakeup_fd(old_wakeup)
        os.close(rfd)
        os.close(wfd)
