"""``lmkd-py stress``: spawn victims (and optionally a memcg-limited pressure source) that live until killed.

The parts live in ``spec`` (what a victim is, scenarios), ``proc`` (the child processes),
``cgroup`` (the pressure cgroup) and ``child`` (the program the children run); this module
holds the command; ``lmkd_py.stress`` is the family's public face.

The command prints the victims' pids (one per line, or one JSON object with ``--json``), then holds
until SIGINT/SIGTERM/SIGHUP or ``--duration`` and removes everything it made on every way out: victims,
thrasher, cgroups, files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog

from lmkd_py import log as logsetup
from lmkd_py.shape import ShapeError
from lmkd_py.stress.cgroup import PressureCgroup, validate_cgroup_name
from lmkd_py.stress.proc import (
    StressChildError,
    StressVictim,
    Thrasher,
    spawn_victim,
    start_thrasher,
)
from lmkd_py.stress.replay import ShapeVictim, spawn_shape_victim
from lmkd_py.stress.spec import (
    VictimSpec,
    scenario_names,
    scenario_specs,
)

if TYPE_CHECKING:
    from lmkd_py.shape import Shape

# The presets at seed 0, for reading; ``scenario_specs(name, seed)`` gives other seeds.
SCENARIOS: Final[dict[str, list[VictimSpec]]] = {n: scenario_specs(n, 0) for n in scenario_names()}

V1_ROOT: Final = Path("/sys/fs/cgroup/memory")
V2_ROOT: Final = Path("/sys/fs/cgroup/unified")
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_READY_TIMEOUT_S: Final = 120.0
_HOLD_TICK_S: Final = 0.2


class StressInterrupted(Exception):
    """Raised from the signal handler to unwind into the cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class StressOptions:
    """The command's options, validated. ``cgroup_name`` is relative to both cgroup roots."""

    specs: list[VictimSpec]
    cgroup_name: str | None
    limit_mib: int | None
    pressure: bool
    file_mib: int | None
    json: bool
    duration_s: float | None
    scenario: str | None
    seed: int
    shape: Shape | None = None  # replay this captured shape (``count`` replicas) instead of ``specs``
    scale: float = 1.0
    count: int = 1


def _cgroup_name(arg: Path | str, v1_root: Path, v2_root: Path) -> str:
    path = Path(arg)
    if path.is_absolute():
        for root in (v1_root, v2_root):
            if path.is_relative_to(root) and path != root:
                return validate_cgroup_name(str(path.relative_to(root)))
        raise ValueError(f"--cgroup {arg}: a path must lie under {v1_root} or {v2_root}")
    return validate_cgroup_name(str(arg))


def options_from_args(
    args: argparse.Namespace, *, pid: int | None = None, v1_root: Path = V1_ROOT, v2_root: Path = V2_ROOT
) -> StressOptions:
    """Validate the ``stress`` Namespace (attributes as cli.py defines them; missing ones take their
    defaults). Raises ValueError with a message for the user, KeyError for an unknown scenario."""

    def get(name: str, default: Any) -> Any:
        return getattr(args, name, default)

    count = int(get("count", 1))
    if count < 0:
        raise ValueError(f"--count must be >= 0, not {count}")
    scenario: str | None = get("scenario", None)
    seed = int(get("seed", 0))
    if scenario is not None:
        # --count N repeats the scenario's set N times.
        specs = scenario_specs(scenario, seed) * count
    else:
        specs = [
            VictimSpec(
                size_mib=int(get("size_mib", 64)),
                vmas=int(get("vmas", 1)),
                kind=str(get("kind", "anon")),
                threads=int(get("threads", 1)),
                touch=str(get("touch", "all")),
                adj=get("adj", None),
            )
        ] * count
    pressure = bool(get("pressure", False))
    limit_mib: int | None = get("limit_mib", None)
    file_mib: int | None = get("file_mib", None)
    cgroup_arg: Path | str | None = get("cgroup", None)
    if pressure and limit_mib is None:
        raise ValueError("--pressure needs --limit-mib (the memcg limit the file is thrashed against)")
    if limit_mib is not None and limit_mib < 1:
        raise ValueError(f"--limit-mib must be >= 1, not {limit_mib}")
    if file_mib is not None and not pressure:
        raise ValueError("--file-mib only makes sense with --pressure")
    if pressure and file_mib is None:
        file_mib = 2 * int(limit_mib or 0)  # twice the limit: no pass can stay cached
    if file_mib is not None and file_mib < 1:
        raise ValueError(f"--file-mib must be >= 1, not {file_mib}")
    name: str | None = None
    if cgroup_arg is not None:
        name = _cgroup_name(cgroup_arg, v1_root, v2_root)
    elif pressure or limit_mib is not None:
        name = f"lmkd-py-stress-{pid if pid is not None else os.getpid()}"
    duration: float | None = get("duration", None)
    if duration is not None and duration < 0:
        raise ValueError(f"--duration must be >= 0, not {duration}")
    shape_path: Path | None = get("shape", None)
    scale = float(get("scale", 1.0))
    shape = None
    if shape_path is not None:
        if scenario is not None:
            raise ValueError("--shape and --scenario exclude each other")
        from lmkd_py.shape import find_shape, read_shape  # ShapeError is a ValueError: the caller reports it

        try:
            shape = read_shape(find_shape(shape_path))
        except OSError as exc:
            raise ValueError(f"--shape {shape_path}: {exc.strerror or exc}") from None
        specs = []
    elif scale != 1.0:
        raise ValueError("--scale only makes sense with --shape")
    return StressOptions(specs=specs, cgroup_name=name, limit_mib=limit_mib, pressure=pressure,
                         file_mib=file_mib, json=bool(get("json", False)), duration_s=duration,
                         scenario=scenario, seed=seed, shape=shape, scale=scale, count=count)


class _SignalGuard:
    """While installed, SIGINT/SIGTERM/SIGHUP raise StressInterrupted once; after the first one, or once
    disarmed for the cleanup, they are ignored so that they cannot cut the cleanup short."""

    def __init__(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def handler(self, signum: int, frame: object) -> None:
        if self.armed:
            self.armed = False
            raise StressInterrupted(signum)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_SignalGuard]:
    """Install a _SignalGuard; outside the main thread signals cannot be handled: nothing is installed."""
    guard = _SignalGuard()
    old: dict[signal.Signals, Any] = {}
    try:
        for sig in _STOP_SIGNALS:
            old[sig] = signal.signal(sig, guard.handler)
    except ValueError:
        pass  # not the main thread
    try:
        yield guard
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold the stop signals back while a resource is created and registered for cleanup, so that no
    interruption falls between the two; a signal that came meanwhile is handled on unblocking."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _describe(v: StressVictim | ShapeVictim) -> dict[str, Any]:
    if isinstance(v, ShapeVictim):
        return {"pid": v.pid, "shape": {"vmas": len(v.target.vmas), "threads": v.target.threads,
                                        "rss_kib": v.target.rss_kib, "warnings": v.warnings},
                "regions": [asdict(r) for r in v.regions]}
    return {"pid": v.pid, "spec": asdict(v.spec), "regions": [asdict(r) for r in v.regions]}


def _output(opts: StressOptions, victims: list[StressVictim | ShapeVictim], cgroup: PressureCgroup | None,
            thrasher: Thrasher | None, workdir: Path) -> str:
    if not opts.json:
        return "".join(f"{v.pid}\n" for v in victims)
    doc: dict[str, Any] = {
        "pids": [v.pid for v in victims],
        "victims": [_describe(v) for v in victims],
        "cgroup": None if cgroup is None else {
            "name": cgroup.name,
            "v1_path": str(cgroup.v1_path),
            "v2_path": str(cgroup.v2_path),
            "pressure_file": str(cgroup.pressure_file),
            "limit_mib": cgroup.limit_mib,
        },
        "thrasher": None if thrasher is None else {"pid": thrasher.pid, "file_mib": thrasher.file_mib},
        "workdir": str(workdir),
        "scenario": opts.scenario,
        "seed": opts.seed,
        "scale": opts.scale if opts.shape is not None else None,
    }
    return json.dumps(doc) + "\n"


def _kill_all(victims: list[StressVictim | ShapeVictim]) -> None:
    for v in victims:
        v.kill()


def _hold(opts: StressOptions, victims: list[StressVictim | ShapeVictim], thrasher: Thrasher | None) -> None:
    """Sleep until the duration ends (forever without one), reaping children others killed."""
    log = structlog.get_logger()
    deadline = None if opts.duration_s is None else time.monotonic() + opts.duration_s
    running: list[StressVictim | ShapeVictim | Thrasher] = [*victims, *([thrasher] if thrasher is not None else [])]
    while deadline is None or time.monotonic() < deadline:
        left = _HOLD_TICK_S if deadline is None else min(_HOLD_TICK_S, deadline - time.monotonic())
        time.sleep(max(0.0, left))
        for child in list(running):
            rc = child.poll()
            if rc is not None:
                running.remove(child)
                log.info("stress.child_exit", pid=child.pid, what=child.what, returncode=rc)


def _run(opts: StressOptions, stack: contextlib.ExitStack) -> None:
    log = structlog.get_logger()
    cgroup: PressureCgroup | None = None
    if opts.cgroup_name is not None:
        with _signals_blocked():
            cgroup = stack.enter_context(PressureCgroup(opts.cgroup_name, opts.limit_mib))
    with _signals_blocked():
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lmkd-py-stress-")))
    victims: list[StressVictim | ShapeVictim] = []
    stack.callback(_kill_all, victims)
    if opts.pressure and opts.limit_mib is not None:
        total_mib = sum(s.size_mib for s in opts.specs)
        if total_mib >= opts.limit_mib:
            log.warning("stress.victims_exceed_limit", victims_mib=total_mib, limit_mib=opts.limit_mib)
    for spec in opts.specs:
        with _signals_blocked():
            victims.append(spawn_victim(spec, cgroup, workdir=workdir))
    if opts.shape is not None:
        for _ in range(opts.count):
            with _signals_blocked():
                victims.append(spawn_shape_victim(opts.shape, scale=opts.scale, cgroup=cgroup, workdir=workdir))
            victims[-1].wait_ready(_READY_TIMEOUT_S)  # one at a time: the next one's memory check sees it
            for warning in victims[-1].warnings if isinstance(victims[-1], ShapeVictim) else []:
                log.warning("stress.shape_differs", pid=victims[-1].pid, what=warning)
    for v in victims:
        v.wait_ready(_READY_TIMEOUT_S)
    thrasher: Thrasher | None = None
    if opts.pressure and cgroup is not None and opts.file_mib is not None:
        # start_thrasher kills its child itself if interrupted while it writes the file; the cgroup's
        # cleanup covers the instant between its return and the registration below.
        thrasher = start_thrasher(cgroup, opts.file_mib, workdir)
        stack.callback(thrasher.stop)
    sys.stdout.write(_output(opts, victims, cgroup, thrasher, workdir))
    sys.stdout.flush()
    log.info("stress.ready", pids=[v.pid for v in victims], cgroup=opts.cgroup_name,
             thrasher=thrasher.pid if thrasher else None)
    _hold(opts, victims, thrasher)


def cmd_stress(args: argparse.Namespace) -> int:
    """The ``lmkd-py stress`` command. Returns 0 after the duration or a stop signal, 1 when a child or
    a cgroup could not be made, 2 for bad options. Everything made is removed before it returns."""
    if not structlog.is_configured():
        logsetup.configure(getattr(args, "log_format", "auto"), getattr(args, "log_level", None) or "info")
    log = structlog.get_logger()
    try:
        opts = options_from_args(args)
    except (ValueError, KeyError) as exc:
        print(f"lmkd-py stress: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    try:
        with _stop_on_signals() as guard, contextlib.ExitStack() as stack:
            try:
                _run(opts, stack)
            except StressInterrupted as exc:
                log.info("stress.interrupted", signal=str(exc))
            finally:
                guard.disarm()  # before the stack unwinds: the cleanup runs to its end
    except (StressChildError, TimeoutError, OSError) as exc:
        print(f"lmkd-py stress: {exc}", file=sys.stderr)
        return 1
    except ShapeError as exc:  # this machine cannot hold the shape: refused before allocating it
        print(f"lmkd-py stress: --shape refused: {exc}", file=sys.stderr)
        return 1
    return 0
