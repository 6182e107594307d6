"""Configuration: frozen dataclasses validated by pydantic, TOML loading, defaults, JSON Schema export.

Every knob has a unit in its name and a description. Unknown keys are errors (a typo must not silently
fall back to a default on a board). ``load_config`` raises ``ConfigError`` whose message names the key.

The classes are stdlib dataclasses whose field metadata carries pydantic's constraints and descriptions
(pydantic reads ``dataclasses.field(metadata=...)`` as ``Field`` arguments) and whose ``__post_init__``
holds the cross-field rules. So one definition serves both sides: ``parse_config`` validates through a
pydantic ``TypeAdapter`` built on first use, while the daemon, which only reads a config, never loads
pydantic at all (issue 13: ~17 MiB resident): it reads a file through ``lean_parse``, which builds the
Config from the same definitions for any document strict validation would accept unchanged, and hands
anything else to ``load_config_isolated``'s short-lived child process, where pydantic gives its verdict.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmkd_py.lean import sha256_hex
from lmkd_py.patterns import PatternError, compile_pattern
from lmkd_py.plain import plain

if TYPE_CHECKING:
    from pydantic import TypeAdapter

NEVER_KILL_ADJ = 1001  # a level whose min_oom_score_adj is above 1000 wakes the daemon but kills nothing

# The watchdog of systemd/lmkd-py.service (a unit test keeps the two equal). The loop pings every
# WatchdogSec/2 (sd_watchdog_enabled(3)), so a turn may start up to 15 s after the last ping and must
# end within the other 15 s. A pressure event blocks the loop for at most max_attempts exit timeouts
# plus one memory-recovery wait (every victim stuck but the last, which exits late and then frees
# slowly); the rest of the turn (two candidate refreshes, ~20-40 ms for 1,000 processes; PSI reads; a
# record's fsync, which can take seconds under writeback pressure) gets the remaining 3 s.
WATCHDOG_SEC = 30
KILL_BUDGET_MS = WATCHDOG_SEC * 1000 // 2 - 3000


# strict: a TOML boolean is true or false, never "off", "yes" or 0, and a number is not a string or a
# boolean (pydantic's lax mode takes all of those). The document is validated as JSON (parse_config), where
# strict mode still reads an array as a tuple and a string as a Path: what TOML has for those types.
_STRICT = {"extra": "forbid", "strict": True}  # pydantic's ConfigDict for a stdlib dataclass


def Field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field whose metadata pydantic reads as ``pydantic.Field`` arguments (ge, le, gt,
    min_length, description), without importing pydantic here."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


class _FieldError(ValueError):
    """A rule of one field checked in ``__post_init__``: ``parse_config`` names the field in the key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field




@dataclasses.dataclass(frozen=True, kw_only=True)
class Level:
    """One pressure level: a PSI trigger and the lowest oom_score_adj it may kill."""

    __pydantic_config__ = _STRICT

    name: str = Field(description="level name used in logs and records, e.g. 'medium', 'critical'")
    stall: Literal["some", "full"] = Field(description="PSI line: 'some' or 'full' memory stall")
    threshold_us: int = Field(gt=0, description="stall time within one window that fires the level (us)")
    window_us: int = Field(
        ge=500_000,
        le=10_000_000,
        description="PSI window (us), 0.5-10 s. Without CAP_SYS_RESOURCE the kernel (6.5+) accepts only "
        "multiples of 2 s; lmkd-py then widens the window and scales the threshold to keep the ratio.",
    )
    min_oom_score_adj: int = Field(
        ge=-999,
        le=NEVER_KILL_ADJ,
        description="only processes with oom_score_adj >= this are candidates at this level; "
        f"{NEVER_KILL_ADJ} = never kill (the level only refreshes the candidate table)",
    )
    poll_avg10_pct: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="polling fallback: fire when avg10 of this stall line reaches this percentage "
        "(default: threshold_us / window_us * 100)",
    )

    def __post_init__(self) -> None:
        if self.threshold_us > self.window_us:
            raise ValueError(f"threshold_us {self.threshold_us} exceeds window_us {self.window_us}")


def _default_levels() -> tuple[Level, ...]:
    # Android lmkd's PSI defaults (some 70/100 ms, full 70 ms per 1 s) scaled to a 2 s window, which
    # every writer may use (see kernel-notes: no CAP_SYS_RESOURCE -> multiples of 2 s only).
    return (
        Level(name="low", stall="some", threshold_us=140_000, window_us=2_000_000,
              min_oom_score_adj=NEVER_KILL_ADJ),
        Level(name="medium", stall="some", threshold_us=200_000, window_us=2_000_000,
              min_oom_score_adj=800),
        Level(name="critical", stall="full", threshold_us=140_000, window_us=2_000_000,
              min_oom_score_adj=0),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PressureConfig:
    __pydantic_config__ = _STRICT
    source: Literal["auto", "trigger", "poll"] = Field(
        default="auto",
        description="auto: PSI triggers, polling when no trigger can be armed; trigger: triggers or fail; "
        "poll: read the PSI file every poll_interval_ms",
    )
    cgroup: Path | None = Field(
        default=None,
        description="cgroup v2 directory whose memory.pressure is watched and whose subtree holds the only "
        "candidates (default: system-wide /proc/pressure/memory, all processes)",
    )
    poll_interval_ms: int = Field(default=1000, ge=10, le=60_000, description="polling fallback period (ms)")
    levels: tuple[Level, ...] = Field(default_factory=_default_levels, min_length=1)
    mem_floor_pct: float | None = Field(
        default=5.0,
        ge=0,
        le=50.0,
        description="also act when free memory (MemAvailable + per-CPU free lists) falls below this % of "
        "MemTotal: without swap or page cache, memory runs out before PSI stalls build up and the kernel OOM "
        "killer would act first. Checked on the signals' adaptive period (signals.alloc_rate_mib_s). 0: off "
        "(TOML has no null, and a missing key means the default). Otherwise 0.1-50. System-wide, so not "
        "used with pressure.cgroup (there cgroup headroom watches the limit)",
    )
    mem_floor_min_oom_score_adj: int = Field(
        default=0, ge=-999, le=1000, description="lowest oom_score_adj the memory floor may kill"
    )
    mem_floor_lead_ms: int = Field(
        default=250, ge=0, le=10_000,
        description="while free memory is falling, raise the floor to what the measured fall uses in this "
        "long (or in the last kill's own kill->memory-back time, when longer): a kill gives memory back only "
        "after a while, and the kernel OOM killer does not wait. At most 4x mem_floor_pct. 0: a fixed floor",
    )

    def __post_init__(self) -> None:
        pct = self.mem_floor_pct
        if pct == 0:
            object.__setattr__(self, "mem_floor_pct", None)  # off; the daemon reads None as "no floor"
        elif pct is not None and pct < 0.1:
            raise _FieldError("mem_floor_pct", f"{pct}: 0 (off) or 0.1-50")
        names = [lv.name for lv in self.levels]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise _FieldError("levels", f"duplicate level names: {sorted(dup)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SignalsConfig:
    """Decision signals besides PSI (issue 12): cgroup headroom and Android lmkd's system-wide reasons,
    checked on an adaptive period (signals.py)."""

    __pydantic_config__ = _STRICT

    alloc_rate_mib_s: int = Field(
        default=1024, ge=16, le=65536,
        description="the fastest plausible allocation rate (MiB/s). A check never sleeps longer than this rate "
        "needs to use up the margin left before a signal fires (earlyoom's idea), within "
        "check_min_interval_ms..check_max_interval_ms",
    )
    check_min_interval_ms: int = Field(default=10, ge=1, le=1000, description="shortest check period (ms)")
    check_max_interval_ms: int = Field(
        default=1000, ge=10, le=60_000, description="longest check period, far from every threshold (ms)"
    )
    repeat_interval_ms: int = Field(
        default=100, ge=0, le=60_000,
        description="a signal that keeps holding is reported again at most this often (ms); one that had cleared "
        "is reported at once. Bounds the loop's work while it cools down after a kill or finds no victim",
    )
    cgroup_headroom: bool = Field(
        default=True,
        description="under pressure.cgroup, kill when the memory cgroup(s) of the scope's processes come close "
        "to their limit (v2 memory.max/memory.high, or the v1 memcg of each process on hybrid hosts), counting "
        "the swap they may still use: without swap or page cache memory runs out with no stall for PSI to see",
    )
    headroom_min_pct: float = Field(
        default=5.0, ge=0, le=50,
        description="kill when a memcg's headroom (limit - usage + swap it may still use) is below this % of its "
        "limit, or below headroom_min_kib, whichever is larger",
    )
    headroom_min_kib: int = Field(
        default=32768, ge=0,
        description="kill when a memcg's headroom is below this (KiB). 32 MiB lasts ~31 ms at 1 GiB/s: the time "
        "to check, decide, kill and reap before the kernel's memcg OOM killer would act",
    )
    headroom_min_oom_score_adj: int = Field(
        default=0, ge=-999, le=1000, description="lowest oom_score_adj a headroom kill may take"
    )
    lmkd_reasons: bool = Field(
        default=True,
        description="Android lmkd's system-wide kill reasons from swap left, thrashing, zone watermarks and direct "
        "reclaim (low_swap_and_thrashing, low_mem_and_swap, low_mem_and_swap_util, low_mem_and_thrashing, "
        "direct_recl_and_thrashing, low_filecache_after_thrashing)",
    )
    swap_free_low_pct: float = Field(
        default=10.0, ge=0, le=100,
        description="swap is low below this % of SwapTotal free (lmkd ro.lmk.swap_free_low_percentage, 10). "
        "Free swap is the least of SwapFree, the room left under each zram device's mem_limit (scaled by its "
        "compression ratio) and easily available memory x swap_compression_ratio. 0: swap is never low",
    )
    swap_compression_ratio: int = Field(
        default=1, ge=0, le=100,
        description="free swap counts at most (MemFree + Inactive(file)) x this, since zram swap takes RAM "
        "(lmkd ro.lmk.swap_compression_ratio, 1); 0: ignore available memory",
    )
    swap_util_max_pct: int = Field(
        default=100, ge=0, le=100,
        description="low_mem_and_swap_util: below the high watermark with more than this % of anon memory swapped "
        "out (lmkd ro.lmk.swap_util_max, 100 = off)",
    )
    thrashing_limit_pct: int = Field(
        default=100, ge=0, le=10_000,
        description="thrashing: file refaults within a 1 s window as % of the file cache (Active(file) + "
        "Inactive(file)) at the window's start, plus the previous windows' amount halved per window "
        "(lmkd ro.lmk.thrashing_limit, 100; 30 on low-RAM devices)",
    )
    thrashing_limit_decay_pct: int = Field(
        default=10, ge=0, le=100,
        description="after each thrashing kill the limit drops by this % until the next 1 s window "
        "(lmkd ro.lmk.thrashing_limit_decay, 10; 50 on low-RAM devices)",
    )
    thrashing_critical_pct: int | None = Field(
        default=None, ge=0,
        description="thrashing this heavy may kill perceptible processes (lmkd ro.lmk.thrashing_limit_critical; "
        "default None = 2 x thrashing_limit_pct)",
    )
    filecache_min_kib: int = Field(
        default=0, ge=0,
        description="low_filecache_after_thrashing: keep killing while the file cache is below this after a "
        "thrashing kill (lmkd ro.lmk.filecache_min_kb, 0 = off)",
    )
    min_oom_score_adj: int = Field(
        default=0, ge=-999, le=1000,
        description="lowest oom_score_adj an lmkd-reason kill may take (lmkd: 0)",
    )
    perceptible_min_oom_score_adj: int = Field(
        default=201, ge=-999, le=1000,
        description="the floor lmkd uses to spare perceptible processes when the min watermark holds and "
        "thrashing is below critical (lmkd: PERCEPTIBLE_APP_ADJ + 1 = 201)",
    )

    def __post_init__(self) -> None:
        if self.check_min_interval_ms > self.check_max_interval_ms:
            raise ValueError("check_min_interval_ms exceeds check_max_interval_ms")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExeIdentity:
    """An executable together with the uid running it: identity a process cannot forge. The path
    alone is not enough: an unprivileged user can bind-mount any file at /usr/sbin/sshd inside a user
    and mount namespace of their own, and /proc/PID/exe then reads "/usr/sbin/sshd" (d_path within that
    namespace); that process still runs under the user's own uid."""

    __pydantic_config__ = _STRICT

    path: str = Field(
        description="absolute path of the executable as /proc/PID/exe shows it (symlinks resolved, e.g. "
        "/usr/sbin/sshd); ending in '/': every executable under that directory. No globs. Name only "
        "files and directories that users cannot write to"
    )
    uid: int = Field(ge=0, le=4_294_967_294, description="the uid that must own the process (owner of /proc/PID)")

    def __post_init__(self) -> None:
        # /proc/PID/exe holds a canonical path: an entry that is not canonical could never match, and a
        # glob character would be read as a literal. Refuse both rather than protect nothing silently.
        path = self.path
        if not path.startswith("/"):
            raise _FieldError("path", f"{path!r}: not an absolute path")
        if "\0" in path:
            raise _FieldError("path", f"{path!r}: contains NUL")
        if any(ch in path for ch in "*?["):
            raise _FieldError(
                "path", f"{path!r}: globs are not supported; end a directory with '/' to cover what it holds"
            )
        parts = path.rstrip("/").split("/")[1:]
        if path != "/" and any(p in ("", ".", "..") for p in parts):
            raise _FieldError("path", f"{path!r}: not canonical (empty, '.' or '..' component)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    __pydantic_config__ = _STRICT
    # comm and cmdline are chosen by each process itself (prctl(PR_SET_NAME), argv): those keys are
    # forgeable. They are matched with RE2 (lmkd_py/patterns.py), linear in the text.
    protect_comm: tuple[str, ...] = Field(
        default=(),
        description="RE2 regexes (full match) of comm never killed. FORGEABLE: any process can name itself "
        "so (prctl PR_SET_NAME); use protect_exe, protect_cgroup or protect_uid to protect",
    )
    protect_cmdline: tuple[str, ...] = Field(
        default=(),
        description="RE2 regexes (search) of the cmdline (argv joined by spaces, first 512 characters) never "
        "killed. FORGEABLE: any process chooses its own argv",
    )
    protect_cgroup: tuple[str, ...] = Field(
        default=(),
        description="cgroup v2 path prefixes never killed. Not forgeable by an unprivileged process, except "
        "inside a subtree delegated to its user (systemd delegates user@UID.service): protect system "
        "cgroups, not user ones",
    )
    protect_exe: tuple[ExeIdentity, ...] = Field(
        default=(),
        description="executables never killed, each with the uid that must run it: "
        "{path = '/usr/sbin/sshd', uid = 0}; a path ending in '/' covers a directory. Not forgeable: "
        "/proc/PID/exe is set by the kernel at exec (the uid guards against a path faked in a private "
        "mount namespace). Needs CAP_SYS_PTRACE to read other users' exe; unreadable means not protected",
    )
    protect_uid: tuple[int, ...] = Field(
        default=(),
        description="uids (owner of /proc/PID: the effective uid) whose processes are never killed. Not "
        "forgeable without privilege",
    )
    prefer_comm: tuple[str, ...] = Field(
        default=(), description="RE2 regexes (full match) of comm killed first"
    )
    prefer_cmdline: tuple[str, ...] = Field(
        default=(), description="RE2 regexes (search) of cmdline killed first"
    )
    prefer_cgroup: tuple[str, ...] = Field(
        default=(), description="cgroup v2 path prefixes killed first"
    )
    prefer_adj_bonus: int = Field(
        default=300, ge=0, le=2000,
        description="added to a preferred process' oom_score_adj (capped at 1000) for eligibility and order",
    )
    min_rss_kib: int = Field(default=1024, ge=0, description="processes smaller than this (RSS+swap, KiB) are skipped")

    def __post_init__(self) -> None:
        # Compiled with the engine policy.py matches with (RE2), so that check-config refuses exactly
        # what the daemon could not run in linear time.
        for key in ("protect_comm", "protect_cmdline", "prefer_comm", "prefer_cmdline"):
            for i, p in enumerate(getattr(self, key)):
                try:
                    compile_pattern(p, "fullmatch" if key.endswith("_comm") else "search")
                except PatternError as exc:
                    raise _FieldError(key, f"pattern {i} {p!r}: {exc}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class KillConfig:
    __pydantic_config__ = _STRICT
    mrelease: bool = Field(default=True, description="call process_mrelease right after SIGKILL")
    exit_timeout_ms: int = Field(
        default=3000, ge=100, le=120_000,
        description="wait this long for the exit (ms). A victim still there after SIGKILL and process_mrelease "
        "for this long is stuck (frozen, D state); exits took 20 us-250 ms when measured",
    )
    mem_recovery_timeout_ms: int = Field(
        default=2000, ge=0, le=60_000, description="after the exit, wait this long for MemAvailable (ms)"
    )
    mem_recovery_fraction: float = Field(
        default=0.9,
        gt=0,
        le=1.0,
        description="memory is back when MemAvailable rose by this share of the victim's anon+shmem RSS. "
        "Not 1.0: other activity and page tables vary. Measured as MemAvailable plus the per-CPU free "
        "lists, which MemAvailable does not count",
    )
    min_interval_ms: int = Field(default=1000, ge=0, le=600_000, description="minimum time between kills (ms)")
    max_attempts: int = Field(default=3, ge=1, le=20, description="victims tried per event when kills fail")
    recheck_pressure: bool = Field(
        default=True, description="re-read PSI after choosing and skip the kill if pressure has gone"
    )
    unit: Literal["process", "cgroup"] = Field(
        default="process",
        description="what one kill takes: the victim process, or its whole cgroup (cgroup.kill, Linux 5.14+; "
        "one pidfd per member before), with process_mrelease for each member and one record per member "
        "linked by kill_id. A cgroup whose memory.oom.group is 1 is always killed whole, as the kernel "
        "would. Never the root cgroup, and never a cgroup holding a process that may not be killed (then "
        "only its killable members, one by one)",
    )

    def __post_init__(self) -> None:
        worst_ms = self.max_attempts * self.exit_timeout_ms + self.mem_recovery_timeout_ms
        if worst_ms > KILL_BUDGET_MS:
            raise ValueError(
                f"max_attempts {self.max_attempts} x exit_timeout_ms {self.exit_timeout_ms} + "
                f"mem_recovery_timeout_ms {self.mem_recovery_timeout_ms} = {worst_ms} ms: one pressure event "
                f"could hold the loop longer than {KILL_BUDGET_MS} ms, and systemd's watchdog "
                f"(WatchdogSec={WATCHDOG_SEC}s) would kill the daemon mid-kill"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CandidatesConfig:
    __pydantic_config__ = _STRICT
    refresh_interval_ms: int = Field(
        default=10_000, ge=100, le=600_000, description="warm candidate table refresh period (ms)"
    )
    recheck_top: int = Field(default=5, ge=1, le=100, description="candidates re-read at decision time")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordsConfig:
    __pydantic_config__ = _STRICT
    path: Path | None = Field(
        default=None,
        description="JSONL records file (default: /var/lib/lmkd-py/records.jsonl as root, else "
        "$XDG_STATE_HOME/lmkd-py/records.jsonl)",
    )
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=4096, description="rotate the file at this size (bytes)")
    keep: int = Field(default=3, ge=0, le=100, description="rotated files kept")
    fsync: bool = Field(default=True, description="fsync after each record (kills are rare; data is precious)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfProtectionConfig:
    __pydantic_config__ = _STRICT
    mlockall: bool = Field(default=True, description="lock the daemon's memory (MCL_CURRENT|FUTURE|ONFAULT)")
    oom_score_adj: int | None = Field(
        default=-1000, ge=-1000, le=1000, description="own oom_score_adj at start (None: leave it)"
    )
    sched_fifo_priority: int | None = Field(
        default=None, ge=1, le=99, description="run the loop SCHED_FIFO at this priority (None: normal)"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObserveConfig:
    __pydantic_config__ = _STRICT
    min_rss_kib: int = Field(
        default=16 * 1024, ge=0, description="observe mode: processes at least this large (KiB) are kept in the "
        "warm table whose sizes go into a record when one of them is killed"
    )
    refresh_interval_ms: int = Field(default=5000, ge=100, le=600_000, description="warm table refresh period (ms)")
    trace_mrelease: bool = Field(
        default=True,
        description="trace process_mrelease calls of other killers; enabling any syscall event costs every "
        "syscall on the system ~50-85 ns (measured on 6.18), so false trades those numbers for that cost",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    __pydantic_config__ = _STRICT

    textfile: Path | None = Field(
        default=None,
        description="Prometheus metrics for node_exporter's textfile collector: this .prom file is rewritten "
        "(atomically, mode 0644) after each kill record and every 30 s. Its directory must exist and, like the "
        "records', belong to root or the user lmkd-py runs as and not be writable by group or others. "
        "Unset (default): no metrics",
    )

    def __post_init__(self) -> None:
        # node_exporter reads only *.prom files: any other name would be written and never collected.
        if self.textfile is not None and self.textfile.suffix != ".prom":
            raise _FieldError(
                "textfile", f"{self.textfile}: must end in .prom (node_exporter's textfile collector reads only those)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    __pydantic_config__ = _STRICT
    mode: Literal["kill", "observe"] = Field(
        default="kill",
        description="kill: the low-memory killer; observe: never kill, record the kills others make",
    )
    dry_run: bool = Field(default=False, description="decide and record, never signal or reap")
    tracing: Literal["auto", "on", "off"] = Field(
        default="auto", description="kernel timeline from tracefs: auto = when root and tracefs works"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    pressure: PressureConfig = Field(default_factory=PressureConfig)
    signals: SignalsConfig = Field(default_factory=SignalsConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    kill: KillConfig = Field(default_factory=KillConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    records: RecordsConfig = Field(default_factory=RecordsConfig)
    self_protection: SelfProtectionConfig = Field(default_factory=SelfProtectionConfig)
    observe: ObserveConfig = Field(default_factory=ObserveConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    def digest(self) -> str:
        """sha256 of the canonical JSON of this config (stamped on records). The JSON is byte for byte
        what pydantic's model_dump_json wrote when the config was a pydantic model, so records keep
        their config hash across that change (tests/unit/test_config.py)."""
        text = json.dumps(plain(self), ensure_ascii=False, separators=(",", ":"))
        return sha256_hex(text.encode())[:16]

    def records_path(self) -> Path:
        if self.records.path is not None:
            return self.records.path
        if os.geteuid() == 0:
            return Path("/var/lib/lmkd-py/records.jsonl")
        state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(state) / "lmkd-py" / "records.jsonl"


MAX_CONFIG_BYTES = 1 << 20  # the shipped config is ~10 KiB; a larger file is a mistake or an attack


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


def _not_json(value: object) -> str:
    # TOML has dates and times; no key takes one. The marker fails validation naming the key.
    return f"<TOML {type(value).__name__} {value}>"


@cache
def _adapter() -> TypeAdapter[Config]:
    from pydantic import TypeAdapter

    return TypeAdapter(Config)


def parse_config(data: dict[str, object], source: str = "<config>") -> Config:
    """Validate a decoded TOML document. Raises ConfigError naming every bad key."""
    from pydantic import ValidationError

    try:
        # As JSON, so that strict mode reads a TOML table as a dataclass and an array as a tuple.
        return _adapter().validate_json(json.dumps(data, default=_not_json))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            msg = err["msg"]
            cause = err.get("ctx", {}).get("error")
            if isinstance(cause, _FieldError):
                loc.append(cause.field)
                msg = f"Value error, {cause}"
            if err["type"] == "extra_forbidden" or err["type"] == "unexpected_keyword_argument":
                msg = "unknown key (typo?)"
            lines.append(f"{source}: {'.'.join(loc) or '(top level)'}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: Path | None) -> Config:
    """Load a TOML config file; None gives the defaults. Raises ConfigError."""
    if path is None:
        return Config()
    import tomllib  # here, not at the top: the daemon reads its file through load_config_isolated
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes; a config is at most {MAX_CONFIG_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (TOML must be): byte {exc.start} is {raw[exc.start]:#04x}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib recurses per nesting level: thousands of nested arrays or tables exhaust the stack.
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    return parse_config(data, str(path))


# The child that validates for load_config_isolated: TOML file in, the Config pickled on stdout (rc 0) or
# the ConfigError's message on stderr (rc 2).
_CHILD = "from lmkd_py.config import _validate_child; _validate_child()"
_CHILD_TIMEOUT_S = 60.0


def _validate_child() -> None:
    try:
        cfg = load_config(Path(sys.argv[1]))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    sys.stdout.buffer.write(pickle.dumps(cfg, protocol=pickle.HIGHEST_PROTOCOL))


class _ConfigUnpickler(pickle.Unpickler):
    """Only this module's dataclasses and paths: what a Config is made of, and nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and isinstance(getattr(sys.modules[__name__], name, None), type):
            cls = getattr(sys.modules[__name__], name)
            if dataclasses.is_dataclass(cls):
                return cls
        if (module, name) == ("pathlib", "PosixPath"):
            return Path
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a config")


class _NotLean(Exception):
    """A value lean_parse does not vouch for: the pydantic validator decides (and names the culprit)."""


_LEAN_META = {"ge", "le", "gt", "min_length", "description"}


@cache
def _hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _lean_value(value: object, tp: Any, meta: Any) -> object:
    import types
    import typing

    if not meta.keys() <= _LEAN_META:
        raise _NotLean
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None: TOML has no null, so the value is an X
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if type(value) is not str or value not in args:
            raise _NotLean
        return value
    if origin is tuple:
        if type(value) is not list or len(value) < meta.get("min_length", 0):
            raise _NotLean
        return tuple(_lean_value(v, args[0], {}) for v in value)
    if dataclasses.is_dataclass(tp):
        return _lean_dataclass(value, tp)
    if tp is bool:
        if type(value) is not bool:
            raise _NotLean
        return value
    if tp is int or tp is float:
        if type(value) is not int and not (tp is float and type(value) is float):
            raise _NotLean  # strict: a bool is not a number, a float not an int
        num: int | float = float(value) if tp is float else value
        if num != num or num in (float("inf"), float("-inf")):
            raise _NotLean
        if ("ge" in meta and not num >= meta["ge"]) or ("le" in meta and not num <= meta["le"]) \
                or ("gt" in meta and not num > meta["gt"]):
            raise _NotLean
        return num
    if tp is str:
        if type(value) is not str:
            raise _NotLean
        return value
    if tp is Path:
        if type(value) is not str or not value or "\0" in value:
            raise _NotLean
        return Path(value)
    raise _NotLean


def _lean_dataclass(value: object, cls: Any) -> object:
    if type(value) is not dict:
        raise _NotLean
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not value.keys() <= fields.keys():
        raise _NotLean  # an unknown key: the validator says which
    hints = _hints(cls)
    kwargs = {name: _lean_value(v, hints[name], fields[name].metadata) for name, v in value.items()}
    try:
        return cls(**kwargs)  # __post_init__: the cross-field rules, as under pydantic
    except (TypeError, ValueError):  # a required key left out, a rule broken
        raise _NotLean from None


def lean_parse(data: dict[str, object]) -> Config | None:
    """The Config a decoded TOML document means, built without pydantic — or None when the document holds
    anything this reader does not vouch for (a wrong type, a value out of range, an unknown key, a broken
    rule), which then goes to the validator (``parse_config``) for its verdict and its message.

    Reads the same definitions the validator reads (field types; ge/le/gt/min_length from the field
    metadata; ``__post_init__``) and only what strict validation accepts, converted the same way (an int
    for a float field becomes a float, a string a Path): whatever it accepts, ``parse_config`` gives an equal
    Config with the same digest (tests/unit/test_config.py holds that over generated documents). So the
    daemon validates an ordinary config file without pydantic or a child process (~140 ms of start-up)."""
    try:
        cfg = _lean_dataclass(data, Config)
    except (_NotLean, RecursionError):
        return None
    return cfg if isinstance(cfg, Config) else None


def _read_toml_if_small(path: Path) -> dict[str, object] | None:
    """The decoded document, or None when anything about it is unusual (the validator will say what)."""
    try:
        raw = Path(path).read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            return None
        import tomllib

        return tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


class PendingConfig:
    """A config file read for the daemon: by ``lean_parse`` when it vouches for it (no pydantic), else
    validated in a child process, which the daemon starts first and imports its own modules meanwhile, so
    that the child's ~170 ms (interpreter, pydantic, validators) overlap its start-up."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._proc: Any = None
        self._error: str | None = None
        self._lean: Config | None = None
        if path is None:
            return
        data = _read_toml_if_small(path)
        self._lean = lean_parse(data) if data is not None else None
        if self._lean is not None:
            return  # an ordinary file (the shipped one among them): no child, no pydantic (~140 ms)
        import subprocess  # ~0.4 MiB the daemon needs only here

        try:
            self._proc = subprocess.Popen([sys.executable, "-c", _CHILD, os.fspath(path)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            self._error = f"{path}: the config validator did not run: {exc}"

    def result(self) -> Config:
        """The validated Config (the defaults for no file). Raises ConfigError with the child's message
        (naming file and key), as ``load_config`` would."""
        path = self.path
        if path is None:
            return Config()
        if self._lean is not None:
            return self._lean
        if self._error is not None:
            raise ConfigError(self._error)
        import subprocess

        try:
            stdout, stderr = self._proc.communicate(timeout=_CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise ConfigError(f"{path}: the config validator did not answer in {_CHILD_TIMEOUT_S:.0f} s") from None
        if self._proc.returncode != 0:
            message = stderr.decode(errors="replace").strip()
            if self._proc.returncode == 2 and message:
                raise ConfigError(message)
            raise ConfigError(f"{path}: the config validator failed (exit {self._proc.returncode}): {message[-500:]}")
        try:
            cfg = _ConfigUnpickler(io.BytesIO(stdout)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: the config validator's answer was not a config: {exc}") from None
        if not isinstance(cfg, Config):
            raise ConfigError(f"{path}: the config validator's answer was not a config")
        return cfg


def load_config_isolated(path: Path | None) -> Config:
    """``load_config`` for the daemon: the file is read and validated in a short-lived child process,
    which hands back the validated Config, so that pydantic and its built validators (~17 MiB resident)
    never load into the long-running process. None gives the defaults, which need no validation.
    Raises ConfigError with the child's message (naming file and key), as ``load_config`` would."""
    return PendingConfig(path).result()


def json_schema() -> dict[str, object]:
    return _adapter().json_schema()
