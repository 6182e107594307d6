"""Optional kernel-side timeline of each kill: a private tracefs instance plus the proc connector.

Use::

    tracer = open_tracer(cfg.tracing)          # "auto" | "on" | "off"
    tracer.before_kill(pid, reaper_tid)        # after the identity check, before SIGKILL
    ... SIGKILL, process_mrelease on the reaper thread, wait for the pidfd ...
    timeline = tracer.after_kill(pid, reaper_tid, rss_before_kib, mrelease_wall_ns)
    tracer.close()                             # also run by atexit; idempotent

The instance ``instances/lmkd-py-<pid>`` is ours alone: the top-level buffer other tools use is
never touched. It uses ``trace_clock`` = ``mono`` (timestamps comparable with ``time.monotonic_ns()``)
and keeps the events of kernel-notes.md enabled for its whole life with ``tracing_on`` = 0 between
kills, because enabling an event costs 5-15 ms (static-key patching) — far too slow for the kill path.
While tracing is off, an enabled event costs the kernel only the early exit of the ring-buffer
reservation.

The noisy events (kmem:rss_stat, lock:contention_*, mmap_lock:*) are narrowed to the victim's threads
and the reaper thread by *event filters* on ``common_pid``, written in ``before_kill``. Measured on
this machine's 6.18: writing a filter where none is set costs ~10-50 µs per event, while replacing or
clearing one waits in ``tracepoint_synchronize_unregister()`` (~16-24 ms each); ``set_event_pid`` costs
~0.6-1 ms to set and ~75 ms to change. So ``before_kill`` only ever sets filters on clean events, and
``after_kill`` hands the clearing to one background worker thread, which the next ``before_kill`` (or
``close``) waits for. The rare events (signals with a ``sig == 9`` filter, process_mrelease, exits,
exit_mmap) are traced system-wide and matched by their fields, so SIGKILL may come from any thread.

The buffers are read in binary (``per_cpu/cpuN/trace_pipe_raw``, see ringbuf.py) for
nanosecond timestamps; reading consumes them, so no clear (~16 ms) is needed between kills.

Modules: this one opens tracers (``open_tracer``, ``NullTracer``, finding or mounting tracefs);
instance.py runs the kill windows; raw.py makes, reads and removes the instance;
ringbuf.py decodes the buffers; timeline.py turns events into the record's
``KernelTimeline``; connector.py reads the proc connector.
pyroute2 is not used: see connector.py for why, with the measured import cost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from lmkd_py.records import KernelTimeline
from lmkd_py.tracing.instance import TracefsTracer, parse_kernel_version
from lmkd_py.tracing.raw import TracingUnavailable

if TYPE_CHECKING:  # the protocol lives with its one caller; no run-time import of a higher layer
    from lmkd_py.killer import KillTracer

DEFAULT_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
# The systemd unit bind-mounts tracefs read-write here (ProtectKernelTunables= makes /sys/kernel/tracing
# read-only) and names the mount in this variable; every mode (daemon, observe, kill) honours it.
TRACEFS_ENV = "LMKD_PY_TRACEFS"
MODES = ("auto", "on", "off")


class NullTracer:
    """A tracer that traces nothing; every timeline carries ``unavailable_reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def before_kill(
        self, victim_pid: int, reaper_tid: int, *, rss_baseline_kib: Mapping[str, int] | None = None
    ) -> None:
        return None

    def after_kill(
        self, victim_pid: int, reaper_tid: int, rss_before_kib: int | None, mrelease_wall_ns: int | None
    ) -> KernelTimeline:
        return KernelTimeline(unavailable_reason=self.reason)

    def close(self) -> None:
        return None

    def __enter__(self) -> NullTracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_tracefs(root: Path | None, log: Any) -> Path:
    """The tracefs mount to use: the one tracefs locator of lmkd-py. An explicit ``root``, else
    ``$LMKD_PY_TRACEFS``, is used as is (never mounted on); otherwise the usual places are tried and,
    as root, tracefs is mounted at /sys/kernel/tracing (harmless; left mounted). Raises
    TracingUnavailable."""
    if root is None and os.environ.get(TRACEFS_ENV):
        root = Path(os.environ[TRACEFS_ENV])
    if root is not None:
        if not (root / "instances").is_dir():
            raise TracingUnavailable(f"{root} is not a tracefs mount (no instances/ directory)")
        if _read_only(root):
            raise TracingUnavailable(f"{root} (named by ${TRACEFS_ENV} or the caller) is mounted read-only: "
                                     "mount tracefs read-write there")
        return root
    found = [c for c in DEFAULT_ROOTS if (c / "instances").is_dir()]
    writable = [c for c in found if not _read_only(c)]
    if writable:
        return writable[0]
    if found:
        raise TracingUnavailable(
            f"{found[0]} is mounted read-only (a sandbox such as systemd's ProtectKernelTunables=yes?): "
            f"bind-mount tracefs read-write elsewhere and name that path in ${TRACEFS_ENV} (the shipped "
            "unit does: BindPaths=-/sys/kernel/tracing:/run/lmkd-py/tracefs)")
    target = DEFAULT_ROOTS[0]
    import subprocess  # only to mount tracefs: ~0.4 MiB a daemon that finds it mounted never loads

    try:
        proc = subprocess.run(
            ["mount", "-t", "tracefs", "nodev", str(target)], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TracingUnavailable(f"tracefs not mounted and mount could not run: {exc}") from None
    if proc.returncode != 0 or not (target / "instances").is_dir():
        raise TracingUnavailable(f"tracefs not mounted and mounting it failed: {proc.stderr.strip()}")
    log.info("tracing.tracefs_mounted", path=str(target))
    return target


def _read_only(root: Path) -> bool:
    """Whether ``root``'s mount is read-only. Checked up front because a read-only tracefs (systemd's
    ProtectKernelTunables=yes remounts /sys/kernel/tracing so) would otherwise fail later, at
    ``mkdir instances/...``, with a bare EROFS that names neither cause nor cure."""
    try:
        return bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except OSError:
        return False  # cannot tell: let the instance's own mkdir say what is wrong


def open_tracer(
    mode: str,
    log: Any = None,  # a structlog bound logger; Any because structlog's loggers are untyped
    *,
    tracefs_root: Path | None = None,
    instance_name: str | None = None,
    proc_connector: bool = True,
    kernel_release: str | None = None,
    buffer_kib_per_cpu: int | None = None,
) -> KillTracer:
    """Open the tracer the configuration asks for.

    ``mode`` "off": a NullTracer ("tracing off"). "auto": the real tracer when running as root with
    a usable tracefs, else a NullTracer with the reason and one warning (``tracing.unavailable``).
    "on": the real tracer, or TracingUnavailable(reason). Raises ValueError for another mode.
    ``tracefs_root`` overrides where tracefs is looked for (and disables mounting); tests use it.
    """
    if mode not in MODES:
        raise ValueError(f"tracing mode must be one of {MODES}, got {mode!r}")
    log = log if log is not None else structlog.get_logger()
    if mode == "off":
        return NullTracer("tracing off")
    try:
        if os.geteuid() != 0:
            raise TracingUnavailable("not root: tracefs instances need root")
        root = find_tracefs(tracefs_root, log)
        return TracefsTracer(
            root,
            name=instance_name,
            kernel_version=parse_kernel_version(kernel_release) if kernel_release else None,
            proc_connector=proc_connector,
            buffer_kib_per_cpu=buffer_kib_per_cpu,
            log=log,
        )
    except TracingUnavailable as exc:
        if mode == "on":
            raise
        log.warning("tracing.unavailable", reason=exc.reason)
        return NullTracer(exc.reason)
