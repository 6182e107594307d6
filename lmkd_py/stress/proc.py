"""Running stress children: ``StressVictim`` (memory laid out per a ``VictimSpec``) and ``Thrasher`` (a
file-thrashing pressure source in a ``PressureCgroup``). The child program is ``child.py``.

Every child is our own ``Popen``: it is signalled through that handle only (``Popen.send_signal``
checks that the child has not been reaped, so a recycled pid is never hit) and it exits by itself when
its stdin reaches EOF, so even a SIGKILLed parent leaves no victims behind.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from lmkd_py.stress.cgroup import MIB, PressureCgroup
from lmkd_py.stress.spec import VictimSpec, plan_layout

CHILD_SCRIPT = Path(__file__).with_name("child.py")
VICTIM_COMM = "lmkd-py-victim"
THRASHER_COMM = "lmkd-py-thrash"
_STDERR_TAIL_CHARS = 4000


class StressChildError(RuntimeError):
    """A stress child exited before it was ready; the message carries its exit status and stderr."""


@dataclass(frozen=True)
class Region:
    """Where one kind of a child's memory lives: ``vmas`` VMAs, all inside ``[start, end)``."""

    kind: str
    start: int
    end: int
    vmas: int


class _Child:
    """A started stress child. The caller owns it: ``kill()`` it (or use ``with``)."""

    what = "child"

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.regions: list[Region] = []
        self._buf = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Return once the child has mapped and touched all its memory.

        Raises StressChildError (exit status and stderr) if it exited first, TimeoutError after
        ``timeout_s`` seconds (the child is left running: the caller owns it)."""
        if self.regions:
            return
        ready = self._next_message(timeout_s, "ready")
        self.regions = [Region(str(k), int(s), int(e), int(n)) for k, s, e, n in ready["regions"]]
        self._on_ready(ready)

    def _on_ready(self, ready: dict[str, Any]) -> None:
        """What a subclass takes from the ready message besides the regions."""

    def _next_message(self, timeout_s: float, what: str) -> dict[str, Any]:
        """The next JSON line the child prints. Raises StressChildError if it exited first,
        TimeoutError after ``timeout_s`` seconds (``what`` names the wait)."""
        stdout = self._popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.what} {self.pid} not {what} after {timeout_s:.1f} s")
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            data = os.read(fd, 65536)
            if not data:
                raise self._died()
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def _died(self) -> StressChildError:
        rc = reap(self._popen, 10.0)
        stderr = self._popen.stderr.read().decode(errors="replace") if self._popen.stderr else ""
        hint = " (SIGKILL: a memcg limit below its size?)" if rc == -9 else ""
        return StressChildError(
            f"{self.what} {self.pid} exited with status {rc}{hint} before it was ready: "
            f"{stderr.strip()[-_STDERR_TAIL_CHARS:] or '(no stderr)'}"
        )

    def poll(self) -> int | None:
        """Reap the child if it has exited; its returncode (negative: killed by that signal) or None."""
        return self._popen.poll()

    def kill(self) -> None:
        """SIGKILL the child through our own handle and wait for it. Idempotent."""
        if self._popen.poll() is None:
            self._popen.kill()
        self._popen.wait()
        self._close_pipes()

    def wait_exit(self, timeout_s: float) -> int | None:
        """Reap the child after someone else killed it; its returncode, or None if it still runs after
        ``timeout_s`` seconds."""
        rc = reap(self._popen, timeout_s)
        if rc is not None:
            self._close_pipes()
        return rc

    def _close_pipes(self) -> None:
        for pipe in (self._popen.stdin, self._popen.stdout, self._popen.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()


class StressVictim(_Child):
    """A started victim process (``pid``, ``spec``); its memory per kind is in ``regions`` once ready."""

    what = "victim"

    def __init__(self, popen: subprocess.Popen[bytes], spec: VictimSpec) -> None:
        super().__init__(popen)
        self.spec = spec


class Thrasher(_Child):
    """A process in a memcg that reads a file larger than the limit, round and round."""

    what = "thrasher"

    def __init__(self, popen: subprocess.Popen[bytes], path: Path, file_mib: int) -> None:
        super().__init__(popen)
        self.path = path
        self.file_mib = file_mib

    def stop(self) -> None:
        """Kill, reap, and delete the file (the child unlinks it at once; this covers a child that died
        before it could). Idempotent."""
        self.kill()
        self.path.unlink(missing_ok=True)


def reap(popen: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """Wait up to ``timeout_s`` seconds for ``popen``; its returncode, or None if it still runs."""
    try:
        return popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _start(cfg: dict[str, Any], python: str, cgroup: PressureCgroup | None,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    cfg["cgroup_procs"] = [str(p) for p in cgroup.procs_files] if cgroup is not None else []
    # -I -S: the child needs only the standard library, and must not pick up modules from the cwd.
    # A new session: a terminal's Ctrl-C goes to the stress command, which then cleans up in order.
    popen = subprocess.Popen(
        [python, "-I", "-S", str(CHILD_SCRIPT), json.dumps(cfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=None if env is None else {**os.environ, **env},
    )
    if cgroup is not None:
        try:
            # The child joins by itself, before it allocates; tracked so the cgroup's cleanup can kill it.
            cgroup.adopt(popen.pid)
        except BaseException:
            popen.kill()
            popen.wait()
            raise
    return popen


def spawn_victim(
    spec: VictimSpec,
    cgroup: PressureCgroup | None = None,
    python: str = sys.executable,
    *,
    workdir: Path | None = None,
) -> StressVictim:
    """Start a victim laid out per ``spec``; call ``wait_ready()`` before measuring it.

    With ``cgroup`` the child writes its own pid into both hierarchies before it maps anything, so its
    memory is charged to that memcg. ``workdir`` holds ``file`` memory (default: the temp directory; it
    must be a disk filesystem, on tmpfs the pages count as shmem); the file has no name, so nothing is
    left there even after a SIGKILL."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    cfg: dict[str, Any] = {
        "mode": "victim",
        "adj": spec.adj,
        "comm": VICTIM_COMM,
        "threads": spec.threads,
        "touch": spec.touch,
        "plans": [[p.kind, p.pages, p.vmas] for p in plan_layout(spec, page_size)],
        "workdir": str(workdir if workdir is not None else tempfile.gettempdir()),
    }
    victim = StressVictim(_start(cfg, python, cgroup), spec)
    structlog.get_logger().debug("stress.victim_started", pid=victim.pid, spec=asdict(spec))
    return victim


def start_thrasher(
    cgroup: PressureCgroup,
    file_mib: int,
    workdir: Path,
    python: str = sys.executable,
    *,
    ready_timeout_s: float = 120.0,
) -> Thrasher:
    """Start a process in ``cgroup`` that writes a ``file_mib`` MiB file in ``workdir`` from inside the
    memcg and then reads it through a mapping in a loop. With ``file_mib`` above the memcg limit every
    pass reclaims and refaults: real memory stalls in ``cgroup.pressure_file``. Returns once the file is
    written. Raises StressChildError or TimeoutError (after killing the child)."""
    if file_mib < 1:
        raise ValueError(f"file_mib must be at least 1, not {file_mib}")
    path = workdir / f"lmkd-py-thrash-{uuid.uuid4().hex[:12]}"
    cfg: dict[str, Any] = {
        "mode": "thrash",
        "adj": None,
        "comm": THRASHER_COMM,
        "file_bytes": file_mib * MIB,
        "file_path": str(path),
    }
    thrasher = Thrasher(_start(cfg, python, cgroup), path, file_mib)
    try:
        thrasher.wait_ready(ready_timeout_s)
    except BaseException:
        thrasher.stop()
        raise
    structlog.get_logger().debug("stress.thrasher_started", pid=thrasher.pid, file_mib=file_mib)
    return thrasher
