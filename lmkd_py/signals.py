"""Decision signals besides PSI, checked on an adaptive period, and the one composition the daemon calls.

``wrap_sources(inner, cfg, proc, scope_dir=...)`` wraps a PSI source with the checks that apply:

- the free-memory floor (system-wide, ``pressure.mem_floor_pct``; not under ``pressure.cgroup``),
- cgroup headroom (under ``pressure.cgroup``; headroom.py),
- Android lmkd's system-wide kill reasons from swap, thrashing, watermarks and direct reclaim (reasons.py).

Each check returns its events and its *margin*: how many KiB may still be allocated before it fires.
The next check comes after ``margin / signals.alloc_rate_mib_s`` (earlyoom's rule: never sleep longer
than the fastest plausible allocation needs to use the margin up), clamped to
``check_min_interval_ms..check_max_interval_ms`` (10 ms near a threshold, 1 s far from it). A check
that can wake the loop by itself (v1 memcg usage thresholds through eventfd) hands its fds over; they
are polled together with the PSI triggers, so a crossing is seen at once whatever the period.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from lmkd_py.config import Level
from lmkd_py.procfs import Psi
from lmkd_py.psi import PressureEvent, PressureSource

log = structlog.get_logger("lmkd_py.signals")
Clock = Callable[[], int]


def signal_level(name: str, min_oom_score_adj: int) -> Level:
    """A Level for a non-PSI signal: only its name and band floor matter (the trigger fields are unused)."""
    return Level(name=name, stall="some", threshold_us=1, window_us=2_000_000, min_oom_score_adj=min_oom_score_adj)


@dataclass
class CheckResult:
    """What one look found: events to act on, and the KiB that may still be allocated before the check
    fires (0 while it fires; None when unknown, e.g. an input is unreadable: check slowly)."""

    events: list[PressureEvent] = field(default_factory=list)
    margin_kib: int | None = None


class Check(Protocol):
    name: str

    def check(self, now_ns: int) -> CheckResult: ...

    def wake_fds(self) -> Mapping[int, int]:
        """{fd: poll events} that wake the loop when the check should run now (drained by ``check``)."""
        ...

    def close(self) -> None: ...


def period_ns(margin_kib: int | None, rate_kib_s: int, min_ns: int, max_ns: int) -> int:
    """How long until the next check: the time ``rate_kib_s`` needs to use ``margin_kib`` up, clamped
    to [min_ns, max_ns]; ``max_ns`` when the margin is unknown."""
    if margin_kib is None:
        return max_ns
    if margin_kib <= 0:
        return min_ns
    return max(min_ns, min(max_ns, margin_kib * 1_000_000_000 // rate_kib_s))


class AdaptiveSource:
    """Wraps a pressure source and runs ``checks`` on an adaptive period (module docstring)."""

    def __init__(
        self,
        inner: PressureSource,
        checks: Sequence[Check],
        *,
        rate_kib_s: int,
        min_ns: int,
        max_ns: int,
        repeat_ns: int = 0,
        clock: Clock = time.monotonic_ns,
    ) -> None:
        self.inner = inner
        self.checks = list(checks)
        self.rate_kib_s, self.min_ns, self.max_ns = rate_kib_s, min_ns, max_ns
        self.repeat_ns = repeat_ns
        self._reported: dict[tuple[int, str | None], int] = {}  # (check, kill_reason) -> last report (ns)
        self.clock = clock
        self._next = clock()
        self._watched: dict[int, int] = {}
        self.last_period_ns: int | None = None
        self.description = inner.description + "".join(f" + {c.name}" for c in self.checks)
        self.last_margins: dict[str, int | None] = {}

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        self._sync_fds()
        now = self.clock()
        until_check = max(0, self._next - now)
        budget = until_check if timeout_ns is None else min(timeout_ns, until_check)
        events = self.inner.wait(budget)
        now = self.clock()
        if now >= self._next or self._fd_ready():
            events = events + self.check(now)
        return events

    def check(self, now: int) -> list[PressureEvent]:
        """Run every check once and schedule the next look from the smallest margin."""
        events: list[PressureEvent] = []
        margins: list[int | None] = []
        for i, c in enumerate(self.checks):
            got = c.check(now)
            events += self._throttle(i, got.events, now)
            margins.append(got.margin_kib)
            self.last_margins[c.name] = got.margin_kib  # what ``lmkd-py status`` shows
        known = [m for m in margins if m is not None]
        margin = min(known) if known else None
        self.last_period_ns = period_ns(margin, self.rate_kib_s, self.min_ns, self.max_ns)
        self._next = now + self.last_period_ns
        return events

    def _throttle(self, i: int, got: list[PressureEvent], now: int) -> list[PressureEvent]:
        """Drop reports of a condition that still holds within ``repeat_ns`` of its last report; forget
        the conditions this check no longer reports (the next one is new and goes out at once)."""
        held = {e.kill_reason for e in got}
        for key in [k for k in self._reported if k[0] == i and k[1] not in held]:
            del self._reported[key]
        out = []
        for e in got:
            last = self._reported.get((i, e.kill_reason))
            if last is not None and now - last < self.repeat_ns:
                continue
            self._reported[(i, e.kill_reason)] = now
            out.append(e)
        return out

    def _sync_fds(self) -> None:
        """Hand the checks' wake fds to the inner source's poller (memcgs come and go)."""
        add = getattr(self.inner, "add_wake_fd", None)
        remove = getattr(self.inner, "remove_wake_fd", None)
        if add is None or remove is None:
            return
        want: dict[int, int] = {}
        for c in self.checks:
            want.update(c.wake_fds())
        for fd in set(self._watched) - set(want):
            remove(fd)
        for fd, events in want.items():
            if self._watched.get(fd) != events:
                remove(fd)
                add(fd, events)
        self._watched = want

    def _fd_ready(self) -> bool:
        if not self._watched:
            return False
        poller = select.poll()
        for fd, events in self._watched.items():
            poller.register(fd, events)
        return bool(poller.poll(0))

    def read(self) -> Psi | None:
        return self.inner.read()

    def close(self) -> None:
        remove = getattr(self.inner, "remove_wake_fd", None)
        for fd in self._watched:
            if remove is not None:
                remove(fd)
        self._watched.clear()
        for c in self.checks:
            c.close()
        self.inner.close()


class FloorCheck:
    """Free memory (MemAvailable + per-CPU free lists) against ``floor_pct`` of MemTotal, system-wide.

    PSI measures stalls; a machine with no swap and little page cache can run out of memory with hardly
    any (the arm64 lab's diskless guest: ~20 ms of stall before the kernel OOM kill), so a floor backs
    the triggers up, as earlyoom's threshold does."""

    name = "free memory floor"

    def __init__(self, read_free: Callable[[], tuple[int, int] | None], floor_pct: float, level: Level) -> None:
        self.read_free = read_free
        self.floor_pct = floor_pct
        self.level = level
        self.name = f"free memory floor {floor_pct:g} %"
        self._unreadable_logged = False

    def check(self, now_ns: int) -> CheckResult:
        got = self.read_free()
        if got is None:
            if not self._unreadable_logged:
                log.warning("signals.floor_unreadable", reason="no MemAvailable/MemTotal or zoneinfo unreadable")
                self._unreadable_logged = True
            return CheckResult()
        free_kib, total_kib = got
        floor_kib = round(total_kib * self.floor_pct / 100)
        margin = free_kib - floor_kib
        if margin >= 0:
            return CheckResult(margin_kib=margin)
        event = PressureEvent(self.level, now_ns, "mem_floor", f"free {free_kib} KiB < {floor_kib} KiB",
                              kill_reason="mem_floor", signals={"free_kib": free_kib, "floor_kib": floor_kib},
                              still=self.below)
        return CheckResult([event], 0)

    def below(self) -> bool:
        """Whether free memory is below the floor now (False when unreadable: do not kill blind)."""
        got = self.read_free()
        return got is not None and got[0] < got[1] * self.floor_pct / 100

    def wake_fds(self) -> Mapping[int, int]:
        return {}

    def close(self) -> None:
        pass
