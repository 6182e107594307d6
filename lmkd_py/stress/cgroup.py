"""``PressureCgroup``: a memory-limited v1 memcg plus a v2 cgroup of the same name (for its PSI file).

On the project's machines the memory controller lives on cgroup v1 while the v2 hierarchy has no
controllers but still gives every cgroup a ``memory.pressure`` (kernel-notes, "PSI"). A process is put
into both, so the memcg limit makes the pressure and the v2 file measures it.
"""

from __future__ import annotations

import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

MIB = 1 << 20
_RMDIR_TIMEOUT_S = 3.0
_EXIT_WAIT_S = 10.0


def parse_oom_control(text: str) -> dict[str, int]:
    """Parse a v1 ``memory.oom_control`` (``oom_kill_disable 0``, ``under_oom 0``, ``oom_kill N``).
    Lines that are not ``key integer`` are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def parse_procs(text: str) -> list[int]:
    """Parse a ``cgroup.procs`` file: one pid per line."""
    return [int(tok) for tok in text.split()]


def validate_cgroup_name(name: str) -> str:
    """``name`` as a relative cgroup path (``a`` or ``a/b``). Raises ValueError for an empty name,
    an absolute path, ``.``/``..`` components or a newline."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\n" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad cgroup name {name!r}: use a relative name like 'lmkd-py-stress'")
    return name


@dataclass
class _Member:
    """A process this object started or added; ``pidfd`` was opened while it was known alive, so a later
    signal cannot hit a recycled pid."""

    pid: int
    pidfd: int


class PressureCgroup:
    """A v1 memcg with ``limit_mib`` (None: no limit) and a v2 cgroup of the same relative ``name``.

    Use as a context manager: ``__enter__`` creates both (FileExistsError if either exists: someone
    else's cgroup is never adopted); ``__exit__`` SIGKILLs the processes this object started or added
    that are still inside, waits for them, then removes both directories.
    """

    def __init__(
        self,
        name: str,
        limit_mib: int | None,
        *,
        v1_root: Path = Path("/sys/fs/cgroup/memory"),
        v2_root: Path = Path("/sys/fs/cgroup/unified"),
    ) -> None:
        if limit_mib is not None and limit_mib < 1:
            raise ValueError(f"limit_mib must be at least 1, not {limit_mib}")
        self.name = validate_cgroup_name(name)
        self.limit_mib = limit_mib
        self.v1_path = v1_root / name
        self.v2_path = v2_root / name
        self._members: list[_Member] = []
        self._created: list[Path] = []
        self._log = structlog.get_logger().bind(cgroup=name)

    @property
    def pressure_file(self) -> Path:
        """The v2 ``memory.pressure`` of this cgroup (PSI format, ``total`` in µs)."""
        return self.v2_path / "memory.pressure"

    @property
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid into to join both hierarchies."""
        return [self.v1_path / "cgroup.procs", self.v2_path / "cgroup.procs"]

    def __enter__(self) -> PressureCgroup:
        try:
            for path in (self.v1_path, self.v2_path):
                path.mkdir()
                self._created.append(path)
            if self.limit_mib is not None:
                (self.v1_path / "memory.limit_in_bytes").write_text(str(self.limit_mib * MIB))
        except BaseException:
            self._remove_dirs()
            raise
        self._log.info("stress.cgroup_created", v1=str(self.v1_path), v2=str(self.v2_path),
                       limit_mib=self.limit_mib)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    def close(self, raise_errors: bool = True) -> None:
        """Kill and wait for our processes still inside, close their pidfds, remove the directories.

        Raises OSError when a directory cannot be removed (something we did not start is still inside)
        and ``raise_errors``; otherwise logs it."""
        try:
            self._kill_members()
        finally:
            leftover = self._remove_dirs()
        if leftover:
            self._log.error("stress.cgroup_not_removed", paths=[str(p) for p in leftover])
            if raise_errors:
                raise OSError(f"could not remove {', '.join(map(str, leftover))}: processes still inside?")

    def adopt(self, pid: int) -> None:
        """Track ``pid`` (which joined by itself, e.g. a child that wrote its own pid) so that the cleanup
        kills it if it is still inside. Call it while ``pid`` is known to be alive (an unreaped child)."""
        self._members.append(_Member(pid, os.pidfd_open(pid)))

    def add(self, pid: int) -> None:
        """Move ``pid`` into both hierarchies and track it. Raises ProcessLookupError if it is gone."""
        self.adopt(pid)
        for procs in self.procs_files:
            procs.write_text(str(pid))

    def pids(self) -> list[int]:
        """Pids now in the v2 cgroup."""
        return parse_procs((self.v2_path / "cgroup.procs").read_text())

    def oom_kill_count(self) -> int:
        """How many processes the memcg's OOM killer killed (v1 ``memory.oom_control`` ``oom_kill``)."""
        return parse_oom_control((self.v1_path / "memory.oom_control").read_text()).get("oom_kill", 0)

    def _inside(self) -> set[int]:
        inside: set[int] = set()
        for procs in self.procs_files:
            try:
                inside.update(parse_procs(procs.read_text()))
            except FileNotFoundError:
                continue
        return inside

    def _kill_members(self) -> None:
        inside = self._inside() if self._members else set()
        waiting: list[_Member] = []
        for m in self._members:
            if m.pid in inside:
                try:
                    signal.pidfd_send_signal(m.pidfd, signal.SIGKILL)
                    waiting.append(m)
                    self._log.debug("stress.cgroup_kill", pid=m.pid)
                except ProcessLookupError:
                    self._log.debug("stress.cgroup_kill_gone", pid=m.pid)
        for m in waiting:
            # A pidfd polls readable once the process is a zombie, after it left the cgroup (kernel-notes).
            poller = select.poll()
            poller.register(m.pidfd, select.POLLIN)
            if not poller.poll(_EXIT_WAIT_S * 1000):
                self._log.error("stress.cgroup_kill_timeout", pid=m.pid)
        for m in self._members:
            os.close(m.pidfd)
        self._members.clear()

    def _remove_dirs(self) -> list[Path]:
        """rmdir what we created, children first; returns what could not be removed."""
        leftover: list[Path] = []
        for path in reversed(self._created):
            # A memcg rmdir can fail with EBUSY for a moment after its last task left.
            deadline = time.monotonic() + _RMDIR_TIMEOUT_S
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() >= deadline:
                        leftover.append(path)
                        break
                    time.sleep(0.02)
        self._created = leftover[::-1]
        return leftover

