"""The loop and the life of its parts: event -> rank (warm table) -> re-check -> kill -> record -> cool down.

``build(cfg, ...)`` makes every config-dependent part through one ``Builder``; the ``Daemon`` owns them
from then on: it swaps them whole on reload (``reload``: all made first, then swapped, or nothing
changes) and closes them itself (``close``, or leaving its ``with`` block). One kill is in flight at a
time: ``Killer.kill`` returns only once the victim exited and its memory came back (or a timeout), and
no kill follows sooner than ``kill.min_interval_ms`` after it.

How many processes one event may kill (design.md, rule 9; issue 18 item 5): the first that dies ends
the event. A victim that was gone before the signal freed its memory by itself, so another victim is
killed only when the event's source can re-check precisely that it is still needed (``still``); a PSI
stall cannot be re-read in a moment, so its event ends there and the next trigger decides. A victim that
does not exit in time is remembered by pid and start time and never picked again (a frozen or D-state
task would otherwise be re-picked on every event); unless its memory came back anyway (process_mrelease
can reap a frozen task), the next candidate is killed at once with the reason ``not_responding``.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import structlog

from lmkd_py.builder import Builder
from lmkd_py.candidates import CandidateTable
from lmkd_py.config import NEVER_KILL_ADJ, Config, ConfigError
from lmkd_py.journal import JournalSender
from lmkd_py.killer import Killer, KillOptions
from lmkd_py.metrics import Metrics
from lmkd_py.policy import Choice, hard_exclusion
from lmkd_py.procfs import ProcFs, ProcParseError, Psi, cgroup_v2_path, subtree_pids
from lmkd_py.psi import PressureEvent, PressureSource, TriggerUnavailable
from lmkd_py.records import KillRecord, Outcome, Pressure, Victim, open_writer
from lmkd_py.sdnotify import Notifier
from lmkd_py.status import StatusFile

log = structlog.get_logger("lmkd_py.daemon")
# A refresh put off (memory close to a threshold) is looked at again after this long, or after what the
# last refresh cost, whichever is longer.
REFRESH_RETRY_NS = 50_000_000
Clock = Callable[[], int]

# Keys whose change needs a restart: they decide what the process watches and holds open.
RESTART_KEYS = ("pressure.cgroup", "tracing")
# A PSI event this soon after the last kill ended is pressure the kill did not relieve (lmkd's
# "pressure_after_kill"): one window of the default triggers.
PRESSURE_AFTER_KILL_NS = 2_000_000_000
# What the status file shows (lmkd-py status): the head of the ranking and the latest kills.
STATUS_CANDIDATES = 5
STATUS_KILLS = 5


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
    not_responding: int = 0
    loop_errors: int = 0
    records_dropped: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def build(
    cfg: Config,
    *,
    sink: Sink,
    wake_fd: int | None = None,
    procfs: ProcFs | None = None,
    notifier: Notifier | None = None,
    journal: JournalSender | None = None,
) -> Daemon:
    """Assemble a daemon that owns its parts. Raises OSError when no pressure source can be had at
    all and TracingUnavailable when ``tracing = "on"`` cannot be honoured; nothing is left open then."""
    builder = Builder(procfs or ProcFs(), wake_fd)
    scope_dir, _ = builder.scope(cfg)
    source = builder.source(cfg)
    try:
        killer = builder.killer(cfg)
    except BaseException:
        source.close()
        raise
    hold = cfg.candidates.recheck_top + cfg.kill.max_attempts
    table = CandidateTable(builder.proc, builder.rules(cfg), scope_dir=scope_dir, clock=time.monotonic_ns,
                           pidfd_open=killer.sys.pidfd_open, hold=hold)
    return Daemon(cfg, source=source, killer=killer, table=table, sink=sink, notifier=notifier, builder=builder,
                  journal=journal)


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
        builder: Builder | None = None,
        metrics: Metrics | None = None,
        journal: JournalSender | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.killer = killer
        self.table = table
        self.sink = sink
        self.clock = clock
        self.notifier = notifier
        self.builder = builder
        self.reopen_source: Callable[[], PressureSource] | None = (
            (lambda: builder.source(self.cfg)) if builder is not None else None
        )
        # Reload: where the new config comes from (raises ConfigError) and what follows a good one.
        self.load_config: Callable[[], Config] | None = None
        self.on_reloaded: Callable[[Config], None] | None = None
        self.stats = Stats()
        # Fed from the records written (_store), so metrics and records never disagree.
        self.metrics = metrics or Metrics(cfg.metrics.textfile, mode="kill", read_pressure=self._read_avg10)
        # One structured journal entry per record stored (journal.py); None or disabled off systemd.
        self.journal = journal
        self.stop_requested = False
        self.reload_requested = False
        self.stuck: set[tuple[int, int]] = set()  # (pid, start time) of victims that did not exit
        self._cooldown_until = 0
        self._last_kill_end: int | None = None
        self._next_refresh = 0
        self._last_refresh = 0
        self._refresh_cost_ns = 0  # the last refresh with its garbage collection
        self._deferring = False
        self._last_watchdog = 0
        self._closed = False
        # The status file (service.py hands one over): rewritten from the loop, never before a kill.
        self.status: StatusFile | None = None
        self.last_kills: deque[dict[str, Any]] = deque(maxlen=STATUS_KILLS)
        self._killed_since_status = False

    @property
    def dry_run(self) -> bool:
        return self.cfg.dry_run

    # -- life --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the reaper thread, remove the tracefs instance, close the triggers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.status is not None:
            self.status.close()
        self.table.close()
        self.killer.close()
        if self.killer.tracer is not None:
            self.killer.tracer.close()
        self.source.close()
        if self.journal is not None:
            self.journal.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def reload(self, new: Config) -> str | None:
        """Swap ``new`` in, all or nothing. Returns None when applied, else the reason it was rejected."""
        old = self.cfg
        for key in RESTART_KEYS:
            section, _, name = key.rpartition(".")
            a = getattr(getattr(old, section), name) if section else getattr(old, name)
            b = getattr(getattr(new, section), name) if section else getattr(new, name)
            if a != b:
                return f"{key} changed ({a!r} -> {b!r}): that needs a restart"
        if self.builder is None:
            return "this daemon was not built from a config: nothing to reload"
        try:
            rules = self.builder.rules(new)
            changed = (new.pressure, new.signals) != (old.pressure, old.signals)
            source = self.builder.source(new) if changed else None
            sink = open_writer(new) if new.records != old.records else None
            if sink is not None:
                sink.check()
        except OSError as exc:
            return f"cannot apply: {exc}"
        # Everything could be made: swap.
        self.cfg = new
        self.table.rules = rules
        self.killer.options = KillOptions.from_config(new.kill)
        self.killer.provenance = self.builder.provenance(new)  # new config hash, confounders read again
        if source is not None:
            self.source.close()
            self.source = source
        if sink is not None:
            self.sink = sink
        if new.metrics != old.metrics:
            self.metrics.retarget(new.metrics.textfile)
            self.metrics.write()
        self.table.refresh()
        return None

    def _reload_from_file(self) -> None:
        """SIGHUP: RELOADING=1, then READY=1 on every way out, so systemd never hangs in 'reloading'."""
        if self.load_config is None:
            return
        if self.notifier is not None:
            self.notifier.reloading()
        why: str | None = "reload failed"
        try:
            try:
                new = self.load_config()
            except ConfigError as exc:
                why = str(exc)
            else:
                why = self.reload(new)
                if why is None:
                    if self.on_reloaded is not None:
                        self.on_reloaded(new)
                    log.info("config.reloaded", config_hash=new.digest())
        finally:
            if why is not None:
                log.error("config.reload_rejected", reason=why, kept=self.cfg.digest())
            if self.notifier is not None:
                self.notifier.ready(f"config {self.cfg.digest()}" + (" (reload rejected)" if why else ""))

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, duration_ns: int | None = None) -> int:
        deadline = None if duration_ns is None else self.clock() + duration_ns
        self.table.refresh()
        self._last_refresh = self.clock()
        self._refresh_cost_ns = self.table.last_refresh_cost_ns or 0
        self._next_refresh = self._last_refresh + self.cfg.candidates.refresh_interval_ms * 1_000_000
        log.info("daemon.ready", source=self.source.description, candidates=len(self.table),
                 dry_run=self.dry_run, refresh_ms=_ms(self.table.last_refresh_cost_ns))
        if self.notifier is not None:
            self.notifier.ready(f"watching {self.source.description}")
        self.metrics.write()  # lmkd_py_up 1 at once; an unwritable path is logged now (and retried)
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
        self.metrics.stop()
        if self.notifier is not None:
            self.notifier.stopping()
        return 0

    def _timeout(self, now: int, deadline: int | None) -> int:
        t = self._next_refresh - now
        if deadline is not None:
            t = min(t, deadline - now)
        if self.notifier is not None and self.notifier.watchdog_interval_ns:
            t = min(t, self._last_watchdog + self.notifier.watchdog_interval_ns - now)
        metrics_due = self.metrics.due_in(now)
        if metrics_due is not None:
            t = min(t, metrics_due)
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
        if self.reload_requested:
            self.reload_requested = False
            self._reload_from_file()
        now = self.clock()
        if events:
            self.handle(events)
        elif now >= self._next_refresh and self._defer_refresh(now):
            self._next_refresh = now + max(self._refresh_cost_ns, REFRESH_RETRY_NS)
        elif now >= self._next_refresh:
            self._refresh()
        if now >= self._next_refresh:
            self._next_refresh = now + self.cfg.candidates.refresh_interval_ms * 1_000_000
        self._end_turn()

    def _defer_refresh(self, now: int) -> bool:
        """Whether to put the periodic refresh off: while a signal may fire sooner (at the fastest plausible
        allocation rate) than twice what a refresh costs, the loop stays watching — no check runs during a
        refresh and its garbage collection (20-60 ms in the arm64 lab's guest, ~135 ms at 5,000 processes
        here). The table stays usable (newcomers are ranked without a scan); the put-off is bounded by a
        second refresh interval."""
        period = getattr(self.source, "last_period_ns", None)  # the adaptive signals' next check
        interval = self.cfg.candidates.refresh_interval_ms * 1_000_000
        close = period is not None and period < 2 * self._refresh_cost_ns
        if close and now - self._last_refresh < 2 * interval:
            if not self._deferring:
                log.info("table.refresh_deferred", next_check_ms=_ms(period),
                         refresh_ms=_ms(self._refresh_cost_ns))
            self._deferring = True
            return True
        self._deferring = False
        return False

    def _end_turn(self) -> None:
        self.metrics.tick(self.clock())
        wd = self.notifier.watchdog_interval_ns if self.notifier is not None else None
        # watchdog_interval_ns is already half of WATCHDOG_USEC (sd_watchdog_enabled's advice)
        if self.notifier is not None and wd and self.clock() - self._last_watchdog >= wd:
            self.notifier.watchdog()
            self._last_watchdog = self.clock()
        if self.status is not None and (self._killed_since_status or self.status.due()):
            # After the turn (so after any kill): a kill shows at once, anything else on a slow cadence.
            self.status.update(status_of(self), force=self._killed_since_status)
            self._killed_since_status = False

    def _refresh(self) -> None:
        t0 = self.clock()
        self.table.refresh()
        if self.stuck:  # forget stuck victims that are gone at last
            self.stuck = {key for key in self.stuck if self.table.holds(*key)}
        # The refresh leaves thousands of objects behind; collect now, off the decision path, so that no
        # collection of the old generation falls due inside the next decision (see handle).
        gc.collect()
        self._last_refresh = self.clock()
        self._refresh_cost_ns = self._last_refresh - t0

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
        # No cyclic garbage collection while deciding and killing: one that fell due here (after a refresh
        # of 5,000 candidates, a full one) took the decision's p99 from ~0.8 to ~1.3 ms
        # (benchmarks/decision_latency.py). What the event leaves is collected with the refresh after it.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._handle(events)
        finally:
            if enabled:
                gc.enable()

    def _handle(self, events: list[PressureEvent]) -> None:
        self.stats.events += len(events)
        # The most severe level that fired decides: the lowest band floor.
        event = min(events, key=lambda e: e.level.min_oom_score_adj)
        psi = self.source.read()
        log.info("psi.event", psi_level=event.level.name, mechanism=event.mechanism, kill_reason=event.kill_reason,
                 some_avg10=psi.some.avg10 if psi else None, why=event.source)
        for e in events:
            self.metrics.pressure_event(e.level.name, *_avg10(psi))
        if event.level.min_oom_score_adj >= NEVER_KILL_ADJ:
            self._refresh()  # the low level: get the table ready for what may follow
            return
        if event.t_ns < self._cooldown_until:
            self.stats.skipped_cooldown += 1
            log.info("kill.cooldown", psi_level=event.level.name,
                     remaining_ms=_ms(self._cooldown_until - event.t_ns))
            return
        min_adj = event.level.min_oom_score_adj
        choices = self._choices(event, min_adj)
        if not choices:
            self.stats.no_candidate += 1
            log.warning("kill.no_candidate", psi_level=event.level.name, min_adj=min_adj, table=len(self.table),
                        stuck=len(self.stuck))
            return
        if self.cfg.kill.recheck_pressure and not self._still_needed(event, psi):
            self.stats.skipped_recovered += 1
            log.info("kill.skipped", reason="pressure gone while selecting the victim", psi_level=event.level.name)
            return
        self._kill_for(event, psi, choices)
        self._cooldown_until = self.clock() + self.cfg.kill.min_interval_ms * 1_000_000
        self._last_kill_end = self.clock()
        self._refresh()

    def _choices(self, event: PressureEvent, min_adj: int) -> list[Choice]:
        """The ranking for a band floor: processes that appeared since the last refresh first ranked
        in (no scan: ``CandidateTable.newcomers``), only the event's own victims when it names them (the
        processes of the memcg that runs out), the head re-read, stuck victims left out."""
        newcomers = self.table.newcomers(min_adj)
        # A decision tries at most max_attempts victims after re-reading recheck_top (plus whatever the
        # stuck ones and an event's own victims set aside): the rest of the ranking is not copied.
        limit = None if event.victims is not None else (
            self.cfg.candidates.recheck_top + self.cfg.kill.max_attempts + len(self.stuck))
        ranked = newcomers + self.table.rank(min_adj, limit)
        if event.victims is not None:
            ranked = [c for c in ranked if c.candidate.pid in event.victims]
            newcomers = [c for c in newcomers if c.candidate.pid in event.victims]
        choices = self.table.recheck(ranked, self.cfg.candidates.recheck_top + len(newcomers), min_adj)
        if self.stuck:
            choices = [c for c in choices if (c.candidate.pid, c.candidate.start_time_ticks) not in self.stuck]
        return choices

    def _kill_for(self, event: PressureEvent, psi: Psi | None, choices: list[Choice]) -> None:
        """Kill for one event, at most ``kill.max_attempts`` victims, and no more than it needs."""
        reason = event.kill_reason or self._psi_reason(event)
        for rank, choice in enumerate(choices[: self.cfg.kill.max_attempts]):
            c = choice.candidate
            pressure = _pressure(event, psi, choice, rank, reason)
            group = self._group_of(choice)
            if group is None:
                records = [self.killer.kill(_victim(choice), dry_run=self.dry_run, pressure=pressure,
                                            pidfd=self.table.pidfd(c.pid, c.start_time_ticks))]
            else:
                records = self.killer.kill_group(group.members, kill_file=group.kill_file, dry_run=self.dry_run,
                                                 pressure=pressure)
            for r in records:
                self._store(r)
                if r.outcome is Outcome.EXIT_TIMEOUT and r.victim.start_time_ticks is not None:
                    self.stuck.add((r.victim.pid, r.victim.start_time_ticks))
                    self.stats.not_responding += 1
                    log.warning("kill.not_responding", pid=r.victim.pid, comm=r.victim.comm, remembered=len(self.stuck))
            # The chosen victim's record decides what follows (in a group kill, the others' too).
            record = next((r for r in records if r.victim.pid == c.pid), records[0]) if records else None
            if record is None:
                return
            if any(r.outcome in (Outcome.KILLED, Outcome.DRY_RUN) for r in records):
                return
            if record.outcome is Outcome.EXIT_TIMEOUT:
                if self._memory_released(record):
                    return  # its memory came back all the same (process_mrelease reaped it)
                reason = "not_responding"
            elif record.outcome is Outcome.GONE and not (event.still is not None and event.still()):
                # It freed its memory by itself; only a precise re-check may ask for another victim.
                log.info("kill.victim_gone", pid=choice.candidate.pid, reason="one event, one kill: wait for the next")
                return

    def _memory_released(self, record: KillRecord) -> bool:
        """Whether a victim that did not exit has lost its memory anyway (process_mrelease reaps a frozen
        or D-state task). Read from the victim itself: its anon + shmem RSS now against the record's
        before the kill. Free memory (``mem_recovered_ns``) is system-wide, and on a busy machine others
        freeing as much in that second made a stuck victim look reaped and spared the next candidate."""
        v = record.victim
        before = (v.rss_anon_kib or 0) + (v.rss_shmem_kib or 0)
        try:
            st = self.table.proc.status(v.pid)
        except (FileNotFoundError, ProcessLookupError, ProcParseError):
            return True  # gone now: whatever it held is freed
        if before <= 0 or st.rss_anon_kib is None:
            return record.steps.mem_recovered_ns is not None  # nothing to compare: fall back to free memory
        now = st.rss_anon_kib + (st.rss_shmem_kib or 0)
        return now <= before * (1.0 - self.cfg.kill.mem_recovery_fraction)

    def _group_of(self, choice: Choice) -> _Group | None:
        """The members to kill with ``choice`` when the kill takes its whole cgroup (``kill.unit =
        "cgroup"``, or the cgroup's ``memory.oom.group`` is 1), else None. Never the root cgroup; when a
        member may not be killed (protected, lmkd-py itself, -1000...) the others go one by one and
        ``cgroup.kill`` is not used, for it would take that member too."""
        c = choice.candidate
        root = self.builder.cgroup2_root() if self.builder is not None else None
        if root is None:
            return None
        try:  # the cgroup now: the table's may predate a move
            cgroup = cgroup_v2_path(self.table.proc.cgroup(c.pid))
        except (FileNotFoundError, ProcessLookupError, ProcParseError):
            return None
        if cgroup is None:
            return None
        directory = root / cgroup.lstrip("/")
        whole = self.cfg.kill.unit == "cgroup" or _read_flag(directory / "memory.oom.group")
        if not whole:
            return None
        if cgroup == "/":
            log.warning("kill.group_refused", cgroup=cgroup, reason="the root cgroup is never killed whole")
            return None
        members, refused = [], []
        for pid in sorted(subtree_pids(directory) | {c.pid}):
            m = self.table.read_candidate(pid)
            if m is None:
                continue
            why = hard_exclusion(m, self.table.rules)
            if why is not None:
                refused.append((pid, why))
                continue
            members.append(Victim(pid=m.pid, comm=m.comm, cmdline=m.cmdline, uid=m.uid, cgroup=m.cgroup,
                                  start_time_ticks=m.start_time_ticks, oom_score_adj=m.oom_score_adj))
        kill_file = directory / "cgroup.kill"
        if refused:
            log.warning("kill.group_partial", cgroup=cgroup, spared=refused)
        use_file = not refused and kill_file.exists()
        return _Group(members, kill_file if use_file else None) if members else None

    def _psi_reason(self, event: PressureEvent) -> str:
        if self._last_kill_end is not None and event.t_ns - self._last_kill_end < PRESSURE_AFTER_KILL_NS:
            return "pressure_after_kill"
        return f"psi_{event.level.name}"

    def _read_avg10(self) -> tuple[float | None, float | None] | None:
        """For the metrics' slow rewrite: PSI avg10 (some, full) of the source now; None when unreadable."""
        psi = self.source.read()
        return _avg10(psi) if psi is not None else None

    def _still_needed(self, event: PressureEvent, at_event: Psi | None) -> bool:
        """Re-check after choosing: the source's own precise check when it has one; for a PSI stall,
        earlyoom's 'memory situation has recovered while selecting victim' (the level's stall total has
        not grown since the event and its avg10 is 0); any other event is no stall, so the stall totals
        cannot say it is over (a stall-free headroom event would look 'recovered')."""
        if event.still is not None:
            return event.still()
        if event.mechanism not in ("trigger", "poll"):
            return True
        now = self.source.read()
        if now is None or at_event is None:
            return True
        before = at_event.some if event.level.stall == "some" else at_event.full
        after = now.some if event.level.stall == "some" else now.full
        if before is None or after is None:
            return True
        return not (after.total_us == before.total_us and after.avg10 == 0.0)

    def _store(self, record: KillRecord) -> None:
        self.stats.outcomes[record.outcome.value] = self.stats.outcomes.get(record.outcome.value, 0) + 1
        if record.outcome is Outcome.KILLED:
            self.stats.kills += 1
            learn = getattr(self.source, "learn_recovery", None)  # the free-memory floor leads by it
            if learn is not None and record.kill_to_mem_recovered_ns is not None:
                learn(record.kill_to_mem_recovered_ns)
        elif record.outcome is Outcome.DRY_RUN:
            self.stats.dry_runs += 1
        else:
            self.stats.failed += 1
        self._killed_since_status = True
        v = record.victim
        self.last_kills.appendleft({
            "at": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": v.pid, "comm": v.comm, "outcome": record.outcome.value,
            "reason": record.pressure.kill_reason if record.pressure else None,
            "mem_back_ms": _ms(record.kill_to_mem_recovered_ns)})
        stored = self.sink.write(record)
        self.metrics.record(record, stored=stored)
        if self.journal is not None:
            self.journal.kill(record)  # never raises; a failure is logged once
        if not stored:
            self.stats.records_dropped += 1
            log.error("records.dropped", dropped=self.stats.records_dropped,
                      reason=getattr(getattr(self.sink, "stats", None), "last_error", None))
        if record.dry_run:
            v = record.victim
            log.info("kill.would_kill", pid=v.pid, comm=v.comm, rss_kib=v.rss_kib, adj=v.oom_score_adj,
                     reason=record.pressure.reason if record.pressure else None)


def status_of(d: Daemon) -> dict[str, Any]:
    """What ``lmkd-py status`` shows of a kill-mode daemon: plain JSON-able values. Reads PSI and free
    memory once each and copies the head of the warm ranking (no /proc scan)."""
    cfg = d.cfg
    signals: list[dict[str, Any]] = []
    psi = d.source.read()
    for level in cfg.pressure.levels:
        line = psi.some if psi is not None and level.stall == "some" else (psi.full if psi is not None else None)
        # A trigger fires on threshold_us of stall within window_us: as a share of the window, comparable
        # (roughly: another window) with the avg10 share PSI reports.
        signals.append({"name": f"psi {level.stall} avg10, level {level.name}", "value": line.avg10 if line else None,
                        "threshold": round(100 * level.threshold_us / level.window_us, 2), "unit": "%"})
    if cfg.pressure.mem_floor_pct is not None and cfg.pressure.cgroup is None:
        free = d.table.proc.free_and_total_kib()
        signals.append({"name": "free memory (floor)", "value": free[0] if free else None,
                        "threshold": int(free[1] * cfg.pressure.mem_floor_pct / 100) if free else None, "unit": "KiB"})
    for name, margin in getattr(d.source, "last_margins", {}).items():
        signals.append({"name": f"{name}: margin", "value": margin, "threshold": 0, "unit": "KiB"})
    floor = min(level.min_oom_score_adj for level in cfg.pressure.levels)
    candidates = [{"pid": c.candidate.pid, "comm": c.candidate.comm, "oom_score_adj": c.candidate.oom_score_adj,
                   "size_kib": c.candidate.size_kib, "reason": c.reason}
                  for c in d.table.rank(floor, STATUS_CANDIDATES)]
    return {
        "mode": "dry-run" if cfg.dry_run else "kill",
        "version": d.killer.provenance.lmkd_py_version,
        "config_hash": d.killer.provenance.config_hash,
        "sources": [d.source.description],
        "signals": signals,
        "candidates": candidates,
        "last_kills": list(d.last_kills),
        "stats": {k: v for k, v in vars(d.stats).items() if v and not isinstance(v, dict)},
    }


@dataclass(frozen=True)
class _Group:
    members: list[Victim]
    kill_file: Path | None  # cgroup.kill, when every member may die and the kernel has it


def _read_flag(path: Path) -> bool:
    try:
        return path.read_text().strip() == "1"
    except OSError:
        return False


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


def _pressure(event: PressureEvent, psi: Psi | None, choice: Choice, rank: int, kill_reason: str) -> Pressure:
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
        kill_reason=kill_reason,
        signals=dict(event.signals) if event.signals is not None else None,
    )


def _avg10(psi: Psi | None) -> tuple[float | None, float | None]:
    if psi is None:
        return None, None
    return psi.some.avg10, psi.full.avg10 if psi.full is not None else None


def _ms(ns: int | None) -> float | None:
    return round(ns / 1e6, 3) if ns is not None else None
