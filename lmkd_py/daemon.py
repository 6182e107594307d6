"""The loop: event -> rank (warm table) -> re-check -> kill -> record -> cool down.

``build(cfg, ...)`` assembles the parts; ``Daemon.run`` owns timing and signals. One kill is in flight
at a time: ``Killer.kill`` returns only once the victim exited and its memory came back (or a timeout),
and no kill follows sooner than ``kill.min_interval_ms`` after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from lmkd_py.candidates import CandidateTable
from lmkd_py.config import NEVER_KILL_ADJ, Config
from lmkd_py.killer import Killer
from lmkd_py.policy import Choice
from lmkd_py.procfs import Psi
from lmkd_py.psi import PressureEvent, PressureSource, TriggerUnavailable
from lmkd_py.records import KillRecord, Outcome, Pressure, Victim
from lmkd_py.sdnotify import Notifier

log = structlog.get_logger("lmkd_py.daemon")
Clock = Callable[[], int]
DONE_OUTCOMES = (Outcome.KILLED, Outcome.EXIT_TIMEOUT, Outcome.DRY_RUN)


class Sink(Protocol):
    def write(self, record: KillRecord) -> bool: ...


@dataclass
class Stats:
    events: int = 0
    kills: int = 0
    dry_runs: int = 0
    failed: int = 0
    skipped_cooldown: int = 0
    skipped_recovered: int = 0
    no_candidate: int = 0
    loop_errors: int = 0
    records_dropped: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        source: PressureSource,
        killer: Killer,
        table: CandidateTable,
        sink: Sink,
        clock: Clock = time.monotonic_ns,
        notifier: Notifier | None = None,
        reopen_source: Callable[[], PressureSource] | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.killer = killer
        self.table = table
        self.sink = sink
        self.clock = clock
        self.notifier = notifier
        self.reopen_source = reopen_source
        self.stats = Stats()
        self.stop_requested = False
        self.reload_requested = False
        self.reload: Callable[[], None] | None = None
        self._cooldown_until = 0
        self._next_refresh = 0
        self._last_watchdog = 0

    @property
    def dry_run(self) -> bool:
        return self.cfg.dry_run

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, duration_ns: int | None = None) -> int:
        deadline = None if duration_ns is None else self.clock() + duration_ns
        self.table.refresh()
        self._next_refresh = self.clock() + self.cfg.candidates.refresh_interval_ms * 1_000_000
        log.info("daemon.ready", source=self.source.description, candidates=len(self.table),
                 dry_run=self.dry_run, refresh_ms=_ms(self.table.last_refresh_cost_ns))
        if self.notifier is not None:
            self.notifier.ready(f"watching {self.source.description}")
        while not self.stop_requested:
            now = self.clock()
            if deadline is not None and now >= deadline:
                break
            try:
                self.iterate(self._timeout(now, deadline))
            except Exception as exc:  # the loop's one catch-all: log, carry on (design.md, style 3)
                self.stats.loop_errors += 1
                log.error("loop.error", error=repr(exc), exc_info=True)
                time.sleep(min(1.0, 0.01 * self.stats.loop_errors))
        log.info("daemon.stop", **{k: v for k, v in vars(self.stats).items() if v})
        if self.notifier is not None:
            self.notifier.stopping()
        return 0

    def _timeout(self, now: int, deadline: int | None) -> int:
        t = self._next_refresh - now
        if deadline is not None:
            t = min(t, deadline - now)
        if self.notifier is not None and self.notifier.watchdog_interval_ns:
            t = min(t, self._last_watchdog + self.notifier.watchdog_interval_ns - now)
        return max(0, t)

    def iterate(self, timeout_ns: int) -> None:
        """One turn: wait for pressure (or a timer), then act. Pings the watchdog only when a turn
        completes, so a stuck loop stops the pings and systemd restarts us."""
        try:
            events = self.source.wait(timeout_ns)
        except TriggerUnavailable as exc:
            log.warning("psi.source_lost", reason=str(exc))
            events = []
            self._reopen()
        if self.reload_requested and self.reload is not None:
            self.reload_requested = False
            self.reload()
        now = self.clock()
        if events:
            self.handle(events)
        elif now >= self._next_refresh:
            self.table.refresh()
        if now >= self._next_refresh:
            self._next_refresh = now + self.cfg.candidates.refresh_interval_ms * 1_000_000
        wd = self.notifier.watchdog_interval_ns if self.notifier is not None else None
        # watchdog_interval_ns is already half of WATCHDOG_USEC (sd_watchdog_enabled's advice)
        if self.notifier is not None and wd and self.clock() - self._last_watchdog >= wd:
            self.notifier.watchdog()
            self._last_watchdog = self.clock()

    def _reopen(self) -> None:
        self.source.close()
        if self.reopen_source is None:
            self.source = _Retry(self.source.description, "no way to reopen", self.clock)
            return
        try:
            self.source = self.reopen_source()
            log.info("psi.reopened", source=self.source.description)
        except OSError as exc:
            log.error("psi.reopen_failed", reason=str(exc), retry_s=_Retry.PERIOD_NS / 1e9)
            self.source = _Retry(self.source.description, str(exc), self.clock)

    # -- one pressure event -----------------------------------------------------------------------
    def handle(self, events: list[PressureEvent]) -> None:
        self.stats.events += len(events)
        # The most severe level that fired decides: the lowest band floor.
        event = min(events, key=lambda e: e.level.min_oom_score_adj)
        psi = self.source.read()
        log.info("psi.event", psi_level=event.level.name, mechanism=event.mechanism,
                 some_avg10=psi.some.avg10 if psi else None)
        if event.level.min_oom_score_adj >= NEVER_KILL_ADJ:
            self.table.refresh()  # the low level: get the table ready for what may follow
            return
        if event.t_ns < self._cooldown_until:
            self.stats.skipped_cooldown += 1
            log.info("kill.cooldown", psi_level=event.level.name,
                     remaining_ms=_ms(self._cooldown_until - event.t_ns))
            return
        min_adj = event.level.min_oom_score_adj
        choices = self._choices(event, min_adj)
        if not choices:
            # The table may predate the process that is eating memory now (started since the last
            # refresh): pay for one refresh rather than let the kernel's OOM killer act.
            self.table.refresh()
            choices = self._choices(event, min_adj)
        if not choices:
            self.stats.no_candidate += 1
            log.warning("kill.no_candidate", psi_level=event.level.name, min_adj=min_adj, table=len(self.table))
            return
        # An event that can re-check itself (floor, headroom, lmkd reasons) says whether it still holds;
        # a PSI stall is re-checked from the stall totals; other events are not stalls: no re-check.
        if event.still is not None:
            gone = not event.still()
        else:
            gone = event.mechanism in ("trigger", "poll") and self._recovered(event, psi)
        if self.cfg.kill.recheck_pressure and gone:
            self.stats.skipped_recovered += 1
            log.info("kill.skipped", reason="pressure gone while selecting the victim", psi_level=event.level.name)
            return
        for rank, choice in enumerate(choices[: self.cfg.kill.max_attempts]):
            record = self.killer.kill(
                _victim(choice), dry_run=self.dry_run, pressure=_pressure(event, psi, choice, rank)
            )
            self._store(record)
            if record.outcome in DONE_OUTCOMES:
                break
        self._cooldown_until = self.clock() + self.cfg.kill.min_interval_ms * 1_000_000
        self.table.refresh()

    def _choices(self, event: PressureEvent, min_adj: int) -> list[Choice]:
        ranked = self.table.rank(min_adj)
        if event.victims is not None:  # e.g. only the processes of the memcg that runs out
            ranked = [c for c in ranked if c.candidate.pid in event.victims]
        return self.table.recheck(ranked, self.cfg.candidates.recheck_top, min_adj)

    def _recovered(self, event: PressureEvent, at_event: Psi | None) -> bool:
        """earlyoom's 'memory situation has recovered while selecting victim': the level's stall total
        has not grown since the event and its avg10 is 0."""
        now = self.source.read()
        if now is None or at_event is None:
            return False
        before = at_event.some if event.level.stall == "some" else at_event.full
        after = now.some if event.level.stall == "some" else now.full
        if before is None or after is None:
            return False
        return after.total_us == before.total_us and after.avg10 == 0.0

    def _store(self, record: KillRecord) -> None:
        self.stats.outcomes[record.outcome.value] = self.stats.outcomes.get(record.outcome.value, 0) + 1
        if record.outcome is Outcome.KILLED:
            self.stats.kills += 1
        elif record.outcome is Outcome.DRY_RUN:
            self.stats.dry_runs += 1
        else:
            self.stats.failed += 1
        if not self.sink.write(record):
            self.stats.records_dropped += 1
            log.error("records.dropped", dropped=self.stats.records_dropped,
                      reason=getattr(getattr(self.sink, "stats", None), "last_error", None))
        if record.dry_run:
            v = record.victim
            log.info("kill.would_kill", pid=v.pid, comm=v.comm, rss_kib=v.rss_kib, adj=v.oom_score_adj,
                     reason=record.pressure.reason if record.pressure else None)


class _Retry:
    """Stands in for a pressure source that could not be reopened (e.g. its cgroup was removed):
    waits one retry period, then reports itself lost so the loop tries to reopen the real one."""

    PERIOD_NS = 1_000_000_000

    def __init__(self, description: str, reason: str, clock: Clock) -> None:
        self.description = f"{description} (lost: {reason})"
        self.reason = reason
        self._due = clock() + self.PERIOD_NS
        self._clock = clock

    def wait(self, timeout_ns: int | None) -> list[PressureEvent]:
        left = self._due - self._clock()
        if timeout_ns is not None and timeout_ns < left:
            time.sleep(max(0, timeout_ns) / 1e9)
            return []
        time.sleep(max(0, left) / 1e9)
        raise TriggerUnavailable(19, f"pressure source still lost: {self.reason}")

    def read(self) -> Psi | None:
        return None

    def close(self) -> None:
        pass


def _victim(choice: Choice) -> Victim:
    c = choice.candidate
    return Victim(pid=c.pid, comm=c.comm, cmdline=c.cmdline, uid=c.uid, start_time_ticks=c.start_time_ticks,
                  oom_score_adj=c.oom_score_adj, cgroup=c.cgroup)


def _pressure(event: PressureEvent, psi: Psi | None, choice: Choice, rank: int) -> Pressure:
    return Pressure(
        level=event.level.name,
        source=event.source,
        mechanism=event.mechanism,
        some_avg10=psi.some.avg10 if psi else None,
        full_avg10=psi.full.avg10 if psi and psi.full else None,
        some_total_us=psi.some.total_us if psi else None,
        full_total_us=psi.full.total_us if psi and psi.full else None,
        event_ns=event.t_ns,
        rank=rank,
        reason=choice.reason,
        kill_reason=event.kill_reason or f"psi_{event.level.name}",
        signals=dict(event.signals) if event.signals is not None else None,
    )


def _ms(ns: int | None) -> float | None:
    return round(ns / 1e6, 3) if ns is not None else None
