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
from collections import deque
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

    def learn_recovery(self, kill_to_mem_back_ns: int) -> None:
        """A kill's kill→memory-back time, for the checks that lead by it (FloorCheck)."""
        for c in self.checks:
            if isinstance(c, FloorCheck):
                c.learn_recovery(kill_to_mem_back_ns)

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


# The fall of free memory is measured from the newest sample at least RATE_SPAN_NS old (closer ones are
# noise: per-CPU counters drift by pages), so a recovery shows at once; none older than RATE_STALE_NS.
RATE_SPAN_NS = 100_000_000
RATE_STALE_NS = 2_000_000_000
# The lead may raise the floor to at most this many times the percentage floor.
LEAD_CAP = 4
MAX_LEAD_NS = 10_000_000_000  # a learned lead longer than the longest configurable one is not believed


class FloorCheck:
    """Free memory (MemAvailable + per-CPU free lists) against ``floor_pct`` of MemTotal, system-wide.

    PSI measures stalls; a machine with no swap and little page cache can run out of memory with hardly
    any (the arm64 lab's diskless guest: ~20 ms of stall before the kernel OOM kill), so a floor backs
    the triggers up, as earlyoom's threshold does.

    A fixed floor is too low when memory falls fast: a kill gives memory back only some time after the
    signal (kill→memory back: ~10 ms for a small victim on hardware, ~200 ms under emulation), and the
    kernel's OOM killer does not wait for it. So while free memory is falling, the floor is at least what
    the measured fall uses in ``lead_ns`` — the configured lead, or the last kill's own kill→memory-back
    time when that was longer (``learn_recovery``) — up to ``LEAD_CAP`` times the percentage floor."""

    name = "free memory floor"

    def __init__(self, read_free: Callable[[], tuple[int, int] | None], floor_pct: float, level: Level,
                 *, lead_ms: int = 0) -> None:
        self.read_free = read_free
        self.floor_pct = floor_pct
        self.level = level
        self.lead_ns = lead_ms * 1_000_000
        self.learned_ns = 0
        self.name = f"free memory floor {floor_pct:g} %" + (f" (lead {lead_ms} ms)" if lead_ms else "")
        self._samples: deque[tuple[int, int]] = deque()
        self._unreadable_logged = False

    def learn_recovery(self, kill_to_mem_back_ns: int) -> None:
        """The last kill's kill→memory-back time: the lead is at least this long until the next kill says
        otherwise (a lead of 0 — off — stays off)."""
        self.learned_ns = min(max(0, kill_to_mem_back_ns), MAX_LEAD_NS)

    def fall_kib_s(self, now_ns: int, free_kib: int) -> int:
        """Record a sample; how fast free memory has been falling (KiB/s, 0 when rising or unknown)."""
        samples = self._samples
        samples.append((now_ns, free_kib))
        while len(samples) > 1 and now_ns - samples[1][0] >= RATE_SPAN_NS:
            samples.popleft()  # the next one is old enough too: the first is not the newest such
        t0, free0 = samples[0]
        span = now_ns - t0
        if not RATE_SPAN_NS <= span <= RATE_STALE_NS:
            return 0
        return max(0, (free0 - free_kib) * 1_000_000_000 // span)

    def floor_kib(self, now_ns: int, free_kib: int, total_kib: int) -> tuple[int, int]:
        """(the floor now, the fall rate in KiB/s it was raised by)."""
        base = round(total_kib * self.floor_pct / 100)
        fall = self.fall_kib_s(now_ns, free_kib)
        if not self.lead_ns or not fall:
            return base, fall
        lead = fall * max(self.lead_ns, self.learned_ns) // 1_000_000_000
        return max(base, min(lead, LEAD_CAP * base)), fall

    def check(self, now_ns: int) -> CheckResult:
        got = self.read_free()
        if got is None:
            if not self._unreadable_logged:
                log.warning("signals.floor_unreadable", reason="no MemAvailable/MemTotal or zoneinfo unreadable")
                self._unreadable_logged = True
            return CheckResult()
        free_kib, total_kib = got
        floor_kib, fall = self.floor_kib(now_ns, free_kib, total_kib)
        margin = free_kib - floor_kib
        if margin >= 0:
            return CheckResult(margin_kib=margin)
        signals = {"free_kib": free_kib, "floor_kib": floor_kib}
        reason = f"free {free_kib} KiB < {floor_kib} KiB"
        if floor_kib > round(total_kib * self.floor_pct / 100):
            signals["fall_kib_s"] = fall
            reason += f" (falling {fall // 1024} MiB/s)"
        event = PressureEvent(self.level, now_ns, "mem_floor", reason,
                              kill_reason="mem_floor", signals=signals, still=lambda: self.below(floor_kib))
        return CheckResult([event], 0)

    def below(self, floor_kib: int) -> bool:
        """Whether free memory is below ``floor_kib`` — the floor the event fired at — now (False when
        unreadable: do not kill blind). Not the floor recomputed: the fall's rate jitters from one sample to
        the next (an allocator's steps), and a re-check against a floor 10 MiB lower skipped kills that the
        kernel's OOM killer then made (arm64 lab, 7.3.4)."""
        got = self.read_free()
        return got is not None and got[0] < floor_kib

    def wake_fds(self) -> Mapping[int, int]:
        return {}

    def close(self) -> None:
        pass
