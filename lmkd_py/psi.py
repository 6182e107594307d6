"""Pressure sources: PSI triggers (system-wide or a cgroup v2 ``memory.pressure``) and a polling fallback.

A source's ``wait(timeout_ns)`` blocks until one or more levels fire (returns their events), the
timeout passes, or the wake fd becomes readable (a signal arrived: returns []). ``read()`` gives the PSI
values now, for records and for the re-check after a victim is chosen.

Trigger rules (Documentation/accounting/psi.rst, kernel/sched/psi.c): one trigger per open file,
written as ``some|full <threshold_us> <window_us>`` with a trailing NUL; POLLPRI when it fires, at most
once per window; POLLERR when the file's cgroup is gone. Since Linux 6.5 a writer without
CAP_SYS_RESOURCE may only use windows that are multiples of 2 s (EINVAL otherwise): such a writer gets
the nearest valid window with the threshold scaled to keep the ratio, and a log line saying so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from lmkd_py.config import Level
from lmkd_py.procfs import CAP_SYS_RESOURCE, ProcParseError, Psi, PsiLine, parse_pressure, self_has_capability

log = structlog.get_logger("lmkd_py.psi")
Clock = Callable[[], int]

UNPRIV_WINDOW_STEP_US = 2_000_000
MAX_WINDOW_US = 10_000_000


@dataclass(frozen=True)
class PressureEvent:
    """One reason to act, as a source saw it.

    ``kill_reason`` is the record's ``kill_reason`` (lmkd's names, e.g. ``low_mem_and_swap``, or this
    project's: ``mem_floor``, ``cgroup_headroom``); None means ``psi_<level>``. ``signals`` holds the
    values that decided, with units in their names, for the record. ``still`` re-checks the condition
    now (True while it holds) for a source that can tell precisely (free memory, headroom); None for
    a PSI stall, which is a rate over a window and cannot be re-read in a moment. ``victims``, when
    set, are the only pids this event may kill: e.g. the processes charged to the memcg that runs out
    (killing elsewhere frees nothing that memcg can use, as the kernel's memcg OOM killer knows).
    """

    level: Level
    t_ns: int  # when the loop woke for it (CLOCK_MONOTONIC)
    mechanism: str  # "trigger", "poll", "mem_floor", "signals", "headroom"
    source: str
    kill_reason: str | None = None
    signals: Mapping[str, float | int | None] | None = None
    still: Callable[[], bool] | None = field(default=None, compare=False)
    victims: frozenset[int] | None = None


class PressureSource(Protocol):
    description: str

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]: ...

    def read(self) -> Psi | None: ...

    def close(self) -> None: ...


class TriggerUnavailable(OSError):
    """No PSI trigger could be armed (old kernel, no permission, no such file)."""


def has_cap_sys_resource(status_path: Path = Path("/proc/self/status")) -> bool:
    """Whether this process has CAP_SYS_RESOURCE in its effective set."""
    return self_has_capability(CAP_SYS_RESOURCE, status_path)


def adapt_window(threshold_us: int, window_us: int) -> tuple[int, int]:
    """The nearest window an unprivileged writer may use (a multiple of 2 s, at most 10 s), with the
    threshold scaled so that threshold/window stays the same."""
    steps = max(1, round(window_us / UNPRIV_WINDOW_STEP_US))
    new_window = min(MAX_WINDOW_US, steps * UNPRIV_WINDOW_STEP_US)
    new_threshold = max(1, min(new_window, round(threshold_us * new_window / window_us)))
    return new_threshold, new_window


def _read_psi(path: Path) -> Psi | None:
    try:
        return parse_pressure(path.read_text())
    except (OSError, ProcParseError) as exc:
        log.warning("psi.read_failed", path=str(path), reason=str(exc))
        return None


def _line(psi: Psi, stall: str) -> PsiLine | None:
    return psi.some if stall == "some" else psi.full


class _Waker:
    """Drains the wake fd (signal.set_wakeup_fd's pipe) when it is readable."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def drain(self) -> None:
        if self.fd is None:
            return
        try:
            while os.read(self.fd, 512):
                pass
        except BlockingIOError:
            pass


class _ExtraWakeFds:
    """For a source that waits in ``self._poller``: more fds that end a wait early."""

    _poller: select.poll

    def add_wake_fd(self, fd: int, events: int = select.POLLIN) -> None:
        """Also return from ``wait`` (with no event) when ``fd`` polls ``events``; its owner drains it
        (signals.AdaptiveSource: v1 memcg thresholds through eventfd, v2 memory.events with POLLPRI)."""
        self._poller.register(fd, events)

    def remove_wake_fd(self, fd: int) -> None:
        with contextlib.suppress(KeyError):
            self._poller.unregister(fd)


class TriggerSource(_ExtraWakeFds):
    """PSI triggers, one open file per level, woken by POLLPRI."""

    def __init__(
        self,
        path: Path,
        levels: Sequence[Level],
        *,
        wake_fd: int | None = None,
        clock: Clock = time.monotonic_ns,
        privileged: bool | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self.description = f"PSI triggers on {path}"
        self._waker = _Waker(wake_fd)
        self._fds: dict[int, Level] = {}
        self.effective: dict[str, tuple[int, int]] = {}  # level -> (threshold_us, window_us) armed
        privileged = has_cap_sys_resource() if privileged is None else privileged
        try:
            for level in levels:
                self._arm(level, privileged)
        except OSError:
            self.close()
            raise
        self._poller = select.poll()
        for fd in self._fds:
            self._poller.register(fd, select.POLLPRI)
        if wake_fd is not None:
            self._poller.register(wake_fd, select.POLLIN)

    def _arm(self, level: Level, privileged: bool) -> None:
        threshold, window = level.threshold_us, level.window_us
        if not privileged and window % UNPRIV_WINDOW_STEP_US:
            threshold, window = adapt_window(threshold, window)
            log.warning(
                "psi.window_adapted",
                psi_level=level.name,
                reason="no CAP_SYS_RESOURCE: the kernel only accepts windows that are multiples of 2 s",
                configured=f"{level.stall} {level.threshold_us} {level.window_us}",
                effective=f"{level.stall} {threshold} {window}",
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TriggerUnavailable(exc.errno, f"cannot open {self.path} for writing: {exc.strerror}") from None
        try:
            self._write(fd, level.stall, threshold, window)
        except OSError as exc:
            if exc.errno == errno.EINVAL and window % UNPRIV_WINDOW_STEP_US:
                # The capability check said privileged, the kernel disagrees (e.g. a user namespace):
                # adapt now, the same way.
                threshold, window = adapt_window(threshold, window)
                log.warning("psi.window_adapted", psi_level=level.name, reason="EINVAL from the kernel",
                            effective=f"{level.stall} {threshold} {window}")
                try:
                    self._write(fd, level.stall, threshold, window)
                except OSError as exc2:
                    os.close(fd)
                    raise TriggerUnavailable(exc2.errno, f"{self.path}: trigger refused: {exc2.strerror}") from None
            else:
                os.close(fd)
                raise TriggerUnavailable(exc.errno, f"{self.path}: trigger refused: {exc.strerror}") from None
        self._fds[fd] = level
        self.effective[level.name] = (threshold, window)
        log.info("psi.armed", psi_level=level.name, path=str(self.path), trigger=f"{level.stall} {threshold} {window}")

    @staticmethod
    def _write(fd: int, stall: str, threshold: int, window: int) -> None:
        # The kernel overwrites the buffer's last byte with NUL: send one so nothing is cut.
        os.write(fd, f"{stall} {threshold} {window}\0".encode())

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        timeout_ms = None if timeout_ns is None else max(0, -(-timeout_ns // 1_000_000))
        ready = self._poller.poll(timeout_ms)
        now = self.clock()
        events = []
        for fd, mask in ready:
            if fd == self._waker.fd:
                self._waker.drain()
                continue
            level = self._fds.get(fd)
            if level is None:
                continue
            if mask & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                raise TriggerUnavailable(errno.ENODEV, f"{self.path}: trigger lost (cgroup removed?)")
            if mask & select.POLLPRI:
                events.append(PressureEvent(level, now, "trigger", str(self.path)))
        return events

    def read(self) -> Psi | None:
        return _read_psi(self.path)

    def close(self) -> None:
        for fd in list(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class PollingSource(_ExtraWakeFds):
    """Reads the PSI file every ``interval_ns`` and fires a level when its stall total grew by at least
    its threshold within its window (or, if set, avg10 reached ``poll_avg10_pct``); at most once per
    window per level, like a trigger."""

    def __init__(
        self,
        path: Path,
        levels: Sequence[Level],
        interval_ns: int,
        *,
        wake_fd: int | None = None,
        clock: Clock = time.monotonic_ns,
        reason: str | None = None,
    ) -> None:
        self.path = path
        self.levels = list(levels)
        self.interval_ns = interval_ns
        self.clock = clock
        self.description = f"polling {path} every {interval_ns // 1_000_000} ms" + (f" ({reason})" if reason else "")
        self._waker = _Waker(wake_fd)
        self._poller = select.poll()
        if wake_fd is not None:
            self._poller.register(wake_fd, select.POLLIN)
        self._history: dict[str, deque[tuple[int, int]]] = {"some": deque(), "full": deque()}
        self._last_fired: dict[str, int] = {}
        self._next_sample = clock()

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        now = self.clock()
        sleep_ns = max(0, self._next_sample - now)
        if timeout_ns is not None:
            sleep_ns = min(sleep_ns, timeout_ns)
        if sleep_ns:
            ready = self._poller.poll(-(-sleep_ns // 1_000_000))
            if ready:
                self._waker.drain()
                return []
        now = self.clock()
        if now < self._next_sample:
            return []
        self._next_sample = now + self.interval_ns
        psi = self.read()
        return self.evaluate(psi, now) if psi is not None else []

    def evaluate(self, psi: Psi, now: int) -> list[PressureEvent]:
        """Feed one sample; return the levels that fire. Pure apart from the source's own history."""
        horizon = max(lv.window_us for lv in self.levels) * 1000
        for stall in ("some", "full"):
            line = _line(psi, stall)
            if line is None:
                continue
            hist = self._history[stall]
            hist.append((now, line.total_us))
            while len(hist) > 2 and hist[1][0] <= now - horizon:
                hist.popleft()
        events = []
        for level in self.levels:
            line = _line(psi, level.stall)
            hist = self._history[level.stall]
            if line is None or not hist:
                continue
            window_ns = level.window_us * 1000
            last = self._last_fired.get(level.name)
            if last is not None and now - last < window_ns:
                continue
            # oldest sample still within the window (or the oldest we have)
            base_t, base_total = next(((t, tot) for t, tot in hist if t >= now - window_ns), hist[0])
            grew = line.total_us - base_total
            span = now - base_t
            by_total = span > 0 and grew >= level.threshold_us * min(1.0, span / window_ns)
            pct = level.poll_avg10_pct
            by_avg = pct is not None and line.avg10 >= pct
            if by_total or by_avg:
                self._last_fired[level.name] = now
                events.append(PressureEvent(level, now, "poll", str(self.path)))
        return events

    def read(self) -> Psi | None:
        return _read_psi(self.path)

    def close(self) -> None:
        pass


def pressure_file(cgroup: Path | None, proc_root: Path = Path("/proc")) -> Path:
    """The PSI file to watch: the cgroup's memory.pressure, or the system-wide one."""
    return cgroup / "memory.pressure" if cgroup is not None else proc_root / "pressure" / "memory"


def open_source(
    mode: str,
    path: Path,
    levels: Sequence[Level],
    poll_interval_ns: int,
    *,
    wake_fd: int | None = None,
    clock: Clock = time.monotonic_ns,
) -> PressureSource:
    """Arm triggers (mode "trigger" or "auto") or poll (mode "poll", or "auto" when no trigger can be
    armed, e.g. an ordinary user on a root-owned cgroup, or a kernel without PSI triggers).

    Raises TriggerUnavailable for mode "trigger" when triggers cannot be armed, and OSError when the PSI
    file cannot even be read (no PSI: kernel without CONFIG_PSI or booted with psi=0).
    """
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"{path}: no PSI file (kernel without CONFIG_PSI, or psi=0?)")
    if mode in ("auto", "trigger"):
        try:
            return TriggerSource(path, levels, wake_fd=wake_fd, clock=clock)
        except TriggerUnavailable as exc:
            if mode == "trigger":
                raise
            reason = f"no trigger: {exc.strerror or exc}"
            log.warning("psi.polling_fallback", path=str(path), reason=reason)
            return PollingSource(path, levels, poll_interval_ns, wake_fd=wake_fd, clock=clock, reason=reason)
    return PollingSource(path, levels, poll_interval_ns, wake_fd=wake_fd, clock=clock)
