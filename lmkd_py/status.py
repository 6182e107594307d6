"""What the running daemon sees now, in a small JSON file under its runtime directory, and ``lmkd-py status``.

The daemon (kill mode or observe mode) hands a plain dict to ``StatusFile.update`` from its loop; the file
is rewritten (temp file + rename, so a reader never sees half of it) only when the content changed and at
most once per ``min_interval_ns``, or at once when asked (after a kill). It is made 0644: an ordinary user
may run ``lmkd-py status`` wherever the directory lets them in. Writing it never raises: a status file
that cannot be kept is logged once and the loop goes on.

``lmkd-py status`` reads it, checks the writer still lives (pid *and* start time, so a reused pid is not
taken for the daemon) and prints a summary, or the JSON with ``--json``. Text in it that processes chose
(comm, argv) is escaped on output with ``text.printable``; the file itself is written by root but is
still read as untrusted (bounded size, any shape).

Stdlib json only: this runs inside the daemon, whose footprint is counted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmkd_py.text import printable

# Where the one-instance lock and this file live: the unit's RuntimeDirectory as root; $XDG_RUNTIME_DIR
# otherwise. LMKD_PY_RUNTIME_DIR overrides both (a second, deliberately separate instance, e.g. in a test).
RUNTIME_DIR_ENV = "LMKD_PY_RUNTIME_DIR"
SYSTEM_RUNTIME_DIR = Path("/run/lmkd-py")
STATUS_NAME = "status.json"
CLAIM_NAME = "status.lock"
STATUS_VERSION = 1
MAX_STATUS_BYTES = 1 << 20  # a status file is a few KiB; anything bigger is not ours
DEFAULT_INTERVAL_NS = 5_000_000_000
# Shown at most this many characters of any one value a process chose (comm, argv).
MAX_SHOWN_CHARS = 120


def runtime_dir() -> Path | None:
    """The daemon's runtime directory, or None when there is no safe one (an ordinary user without
    $XDG_RUNTIME_DIR: a file in a shared /tmp could be planted by anyone)."""
    if os.environ.get(RUNTIME_DIR_ENV):
        return Path(os.environ[RUNTIME_DIR_ENV])
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "lmkd-py" if xdg else None


def start_time_ticks(pid: int, proc_root: Path = Path("/proc")) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when there is no such process."""
    try:
        text = (proc_root / str(pid) / "stat").read_text()
        return int(text[text.rfind(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def claim(directory: Path | None, log: Any) -> StatusFile | None:
    """A StatusFile for ``directory``, or None (logged) when there is no runtime directory or another
    lmkd-py keeps the status there. One writer per directory, held by an flock for the writer's life:
    dry runs and observe mode take no instance lock (they may run beside the killer), so without this a
    dry run started by hand would overwrite the running daemon's status."""
    if directory is None:
        log.info("status.not_kept", reason="no runtime directory")
        return None
    try:
        # 0755: an ordinary user may read the status (the lock and status files hold nothing secret).
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(directory / CLAIM_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.warning("status.not_kept", path=str(directory), reason=exc.strerror or str(exc))
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            log.warning("status.not_kept", path=str(directory), reason=exc.strerror or str(exc))
        else:
            log.info("status.not_kept", path=str(directory), reason=f"lmkd-py pid {printable(holder)} keeps it")
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return StatusFile(directory, claim_fd=fd, log=log)


class StatusFile:
    """Keeps ``directory/status.json`` in step with what the loop hands it (module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        min_interval_ns: int = DEFAULT_INTERVAL_NS,
        clock: Callable[[], int] = time.monotonic_ns,
        log: Any = None,  # a structlog logger (untyped); None: say nothing
        claim_fd: int | None = None,
    ) -> None:
        self.path = directory / STATUS_NAME
        self._claim_fd = claim_fd
        self._closed = False
        self.min_interval_ns = min_interval_ns
        self.clock = clock
        self.log = log
        self.writes = 0
        self._last: Mapping[str, Any] | None = None
        self._last_ns: int | None = None
        self._failed = False
        self._header = {"status_version": STATUS_VERSION, "pid": os.getpid(),
                        "start_time_ticks": start_time_ticks(os.getpid())}

    def due(self, now_ns: int | None = None) -> bool:
        """Whether an ``update`` now could write (the interval passed): lets the caller skip building
        the state at all."""
        now = self.clock() if now_ns is None else now_ns
        return self._last_ns is None or now - self._last_ns >= self.min_interval_ns

    def update(self, state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Write ``state`` (JSON-able) when it differs from the last one written and the interval passed,
        or ``force``. Returns whether the file was written."""
        now = self.clock()
        if not force and not self.due(now):
            return False
        if state == self._last:
            return False
        body = {**self._header, "updated_unix_s": round(time.time(), 3), **state}
        try:
            self._write(json.dumps(body, separators=(",", ":"), default=str).encode())
        except OSError as exc:
            if not self._failed and self.log is not None:
                self.log.warning("status.write_failed", path=str(self.path), error=exc.strerror or str(exc))
            self._failed = True
            return False
        self._failed = False
        self._last, self._last_ns = dict(state), now
        self.writes += 1
        return True

    def _write(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{STATUS_NAME}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # the unit's UMask=0077 would make it root's alone
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one

    def close(self) -> None:
        """Remove the file (a leftover would only say "not running") and let the claim go. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
        if self._claim_fd is not None:
            os.close(self._claim_fd)
            self._claim_fd = None


# --- reading ---------------------------------------------------------------------------------------


class StatusUnavailable(Exception):
    """No usable status: the message says where it looked and why."""


def candidate_dirs() -> list[Path]:
    """Where ``lmkd-py status`` looks, in order: $LMKD_PY_RUNTIME_DIR, the system daemon's directory,
    then this user's own (an unprivileged daemon's)."""
    dirs = []
    if os.environ.get(RUNTIME_DIR_ENV):
        dirs.append(Path(os.environ[RUNTIME_DIR_ENV]))
    dirs.append(SYSTEM_RUNTIME_DIR)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        dirs.append(Path(xdg) / "lmkd-py")
    return list(dict.fromkeys(dirs))


def read_status(directory: Path, proc_root: Path = Path("/proc")) -> dict[str, Any]:
    """The status in ``directory``, with ``running`` added (the writer lives: same pid and start time).
    Raises StatusUnavailable naming the file and the reason."""
    path = directory / STATUS_NAME
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_STATUS_BYTES + 1)
    except FileNotFoundError:
        raise StatusUnavailable(f"{path}: no status file (is lmkd-py running here?)") from None
    except OSError as exc:
        raise StatusUnavailable(f"{path}: {exc.strerror}") from None
    if len(data) > MAX_STATUS_BYTES:
        raise StatusUnavailable(f"{path}: larger than {MAX_STATUS_BYTES} bytes: not a status file")
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise StatusUnavailable(f"{path}: not JSON ({printable(str(exc), max_chars=MAX_SHOWN_CHARS)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        raise StatusUnavailable(f"{path}: not an lmkd-py status file")
    started = start_time_ticks(state["pid"], proc_root)
    state["running"] = started is not None and started == state.get("start_time_ticks")
    return state


def _s(value: object) -> str:
    return printable(str(value), max_chars=MAX_SHOWN_CHARS)


def _num(value: object, digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a" if value is None else _s(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _lines_of(items: object) -> list[dict[str, Any]]:
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


def format_status(state: Mapping[str, Any], now_unix_s: float | None = None) -> str:
    """A human summary of a status (every value escaped and bounded: the file is read as untrusted)."""
    now = time.time() if now_unix_s is None else now_unix_s
    updated = state.get("updated_unix_s")
    age = f", updated {now - updated:.0f} s ago" if isinstance(updated, int | float) else ""
    out = [f"lmkd-py {_s(state.get('version', '?'))}: mode {_s(state.get('mode', '?'))}, pid {_s(state.get('pid'))}"
           f"{'' if state.get('running') else ' (NOT RUNNING: the file is stale)'}{age}"]
    if state.get("config_hash"):
        out.append(f"  config {_s(state['config_hash'])}")
    sources = state.get("sources")
    if isinstance(sources, list):
        out.append("  sources: " + ("; ".join(_s(s) for s in sources) if sources else "none armed"))
    if state.get("degraded"):
        out.append(f"  degraded: {_s(state['degraded'])}")
    signals = _lines_of(state.get("signals"))
    if signals:
        out.append("  signals (value / threshold):")
        out += [f"    {_s(s.get('name'))}: {_num(s.get('value'))} / {_num(s.get('threshold'))}"
                + (f" {_s(s['unit'])}" if s.get("unit") else "") for s in signals]
    cands = _lines_of(state.get("candidates"))
    if cands:
        out.append("  top candidates:")
        out += [f"    {_num(c.get('pid'))} {_s(c.get('comm'))} adj {_num(c.get('oom_score_adj'))} "
                f"size {_num(c.get('size_kib'))} KiB: {_s(c.get('reason'))}" for c in cands]
    kills = _lines_of(state.get("last_kills"))
    out.append("  last kills:" if kills else "  last kills: none")
    out += [f"    {_s(k.get('at', '?'))} pid {_num(k.get('pid'))} {_s(k.get('comm'))}: {_s(k.get('outcome'))}"
            f" ({_s(k.get('reason'))}), memory back {_num(k.get('mem_back_ms'), 1)} ms" for k in kills]
    return "\n".join(out)


def cmd_status(args: argparse.Namespace) -> int:
    """``lmkd-py status``: exit 0 when a running daemon's status was shown; 1 when none runs (no file,
    or the file's writer is gone) or when its status cannot be read."""
    dirs = [args.runtime_dir] if args.runtime_dir is not None else candidate_dirs()
    problems = []
    for directory in dirs:
        try:
            state = read_status(directory)
        except StatusUnavailable as exc:
            problems.append(str(exc))
            continue
        if args.json:
            print(json.dumps(state, indent=2, ensure_ascii=True))
        else:
            print(format_status(state))
        if not state["running"]:
            print(f"lmkd-py: the daemon that wrote {directory / STATUS_NAME} (pid {_s(state['pid'])}) is gone",
                  file=sys.stderr)
            return 1
        return 0
    print("lmkd-py: no running daemon's status found:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 1
