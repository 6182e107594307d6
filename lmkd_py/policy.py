"""Victim ranking, as Android's lmkd does it: oom_score_adj bands first, then size. Pure: no I/O, no clock.

``rank_victims`` returns every eligible candidate in kill order, each with the reason for its place, so
a failed kill falls through to the next one (as oomd's rankForKilling). The order depends only on the
candidates' values (ties broken by pid), never on the order they were given in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lmkd_py.config import NEVER_KILL_ADJ, PolicyConfig
from lmkd_py.patterns import Pattern, compile_pattern
from lmkd_py.procfs import cgroup_under

OOM_SCORE_ADJ_MIN = -1000  # "never kill" per the kernel's own OOM killer


@dataclass(frozen=True, slots=True)
class Candidate:
    """A process as the candidate table last saw it."""

    pid: int
    start_time_ticks: int
    comm: str
    oom_score_adj: int
    rss_kib: int
    swap_kib: int = 0
    cmdline: str = ""
    uid: int | None = None  # owner of /proc/PID (the effective uid)
    exe: str | None = None  # /proc/PID/exe; None: unknown (unreadable, kernel thread, gone)
    cgroup: str | None = None  # cgroup v2 path
    ppid: int = 0
    kernel_thread: bool = False

    @property
    def size_kib(self) -> int:
        return self.rss_kib + self.swap_kib


@dataclass(frozen=True, slots=True)
class Choice:
    candidate: Candidate
    effective_adj: int
    rank: int
    reason: str


@dataclass(frozen=True)
class Rules:
    """PolicyConfig compiled once (regexes, with RE2: linear in the text, which users choose), plus what
    only the daemon knows (its own pids, the scope)."""

    protect_comm: tuple[Pattern, ...] = ()
    protect_cmdline: tuple[Pattern, ...] = ()
    protect_cgroup: tuple[str, ...] = ()
    protect_exe: tuple[tuple[str, int], ...] = ()  # (path or directory ending in "/", uid)
    protect_uid: frozenset[int] = frozenset()
    prefer_comm: tuple[Pattern, ...] = ()
    prefer_cmdline: tuple[Pattern, ...] = ()
    prefer_cgroup: tuple[str, ...] = ()
    prefer_adj_bonus: int = 300
    min_rss_kib: int = 0
    self_pids: frozenset[int] = field(default_factory=frozenset)
    scope_cgroup: str | None = None  # cgroup v2 path ("/a/b"); only its subtree may be killed

    @property
    def reads_cgroup(self) -> bool:
        """Whether any rule looks at a process' cgroup (the decision-time re-read skips it otherwise)."""
        return bool(self.protect_cgroup or self.prefer_cgroup or self.scope_cgroup is not None)

    @property
    def reads_owner(self) -> bool:
        """Whether any rule looks at a process' owner uid or executable."""
        return bool(self.protect_exe or self.protect_uid)

    @classmethod
    def from_config(
        cls, cfg: PolicyConfig, *, self_pids: Iterable[int] = (), scope_cgroup: str | None = None
    ) -> Rules:
        return cls(
            protect_comm=tuple(compile_pattern(p, "fullmatch") for p in cfg.protect_comm),
            protect_cmdline=tuple(compile_pattern(p, "search") for p in cfg.protect_cmdline),
            protect_cgroup=cfg.protect_cgroup,
            protect_exe=tuple((e.path, e.uid) for e in cfg.protect_exe),
            protect_uid=frozenset(cfg.protect_uid),
            prefer_comm=tuple(compile_pattern(p, "fullmatch") for p in cfg.prefer_comm),
            prefer_cmdline=tuple(compile_pattern(p, "search") for p in cfg.prefer_cmdline),
            prefer_cgroup=cfg.prefer_cgroup,
            prefer_adj_bonus=cfg.prefer_adj_bonus,
            min_rss_kib=cfg.min_rss_kib,
            self_pids=frozenset(self_pids),
            scope_cgroup=scope_cgroup,
        )


def hard_exclusion(c: Candidate, rules: Rules) -> str | None:
    """Why ``c`` may never be killed whatever its size (what spares a member of a whole-cgroup kill),
    or None when it may."""
    why = exclusion(c, rules)
    return None if why is not None and why.startswith("smaller than") else why


def exclusion(c: Candidate, rules: Rules) -> str | None:
    """Why ``c`` may never be killed, or None when it may."""
    if c.pid == 1:
        return "pid 1"
    if c.kernel_thread or c.pid == 2 or c.ppid == 2:
        return "kernel thread"
    if c.pid in rules.self_pids:
        return "lmkd-py itself"
    if c.oom_score_adj <= OOM_SCORE_ADJ_MIN:
        return "oom_score_adj -1000"
    if rules.scope_cgroup is not None and not cgroup_under(c.cgroup, rules.scope_cgroup):
        return f"outside scope {rules.scope_cgroup}"
    if protected_exe(c, rules.protect_exe):
        return "protected exe"
    if any(p.matches(c.comm) for p in rules.protect_comm):
        return "protected comm"
    if any(p.matches(c.cmdline) for p in rules.protect_cmdline):
        return "protected cmdline"
    if any(cgroup_under(c.cgroup, p) for p in rules.protect_cgroup):
        return "protected cgroup"
    if c.uid is not None and c.uid in rules.protect_uid:
        return "protected uid"
    if c.size_kib < rules.min_rss_kib:
        return f"smaller than {rules.min_rss_kib} KiB"
    return None


def protected_exe(c: Candidate, entries: tuple[tuple[str, int], ...]) -> bool:
    """Whether ``c``'s executable and owner match an entry: the exact path, or any path under an entry
    ending in "/". An unknown exe or uid matches nothing."""
    if c.exe is None or c.uid is None:
        return False
    for path, uid in entries:
        if uid == c.uid and (c.exe == path or (path.endswith("/") and c.exe.startswith(path))):
            return True
    return False


def preferred(c: Candidate, rules: Rules) -> bool:
    return (
        any(p.matches(c.comm) for p in rules.prefer_comm)
        or any(p.matches(c.cmdline) for p in rules.prefer_cmdline)
        or any(cgroup_under(c.cgroup, p) for p in rules.prefer_cgroup)
    )


def rank_victims(candidates: Iterable[Candidate], min_adj: int, rules: Rules) -> list[Choice]:
    """Eligible candidates in kill order: effective oom_score_adj descending, then RSS + swap
    descending, then pid. ``min_adj`` is the level's band floor; above 1000 nothing is eligible.

    A preferred process' effective adj is its adj plus ``prefer_adj_bonus`` (capped at 1000): it both
    sorts earlier and may enter a band its own adj would not reach.
    """
    if min_adj >= NEVER_KILL_ADJ:
        return []
    eligible: list[tuple[int, Candidate, bool]] = []
    for c in candidates:
        if exclusion(c, rules) is not None:
            continue
        pref = preferred(c, rules)
        eff = min(1000, c.oom_score_adj + rules.prefer_adj_bonus) if pref else c.oom_score_adj
        if eff < min_adj:
            continue
        eligible.append((eff, c, pref))
    eligible.sort(key=lambda e: (-e[0], -e[1].size_kib, e[1].pid))
    return [Choice(c, eff, rank, _reason(c, eff, pref, rules)) for rank, (eff, c, pref) in enumerate(eligible)]


def _reason(c: Candidate, eff: int, pref: bool, rules: Rules) -> str:
    why = f"oom_score_adj {c.oom_score_adj}"
    if pref:
        why += f" (+{rules.prefer_adj_bonus} preferred = {eff})"
    return why + f", {c.size_kib} KiB rss+swap"


def band_prefix(ranked: list[Choice], min_adj: int) -> list[Choice]:
    """The choices of a ranking made at a lower floor that also pass ``min_adj``: since rankings sort
    by effective adj first, they are a prefix. Lets a table rank once and answer every level."""
    if min_adj >= NEVER_KILL_ADJ:
        return []
    lo, hi = 0, len(ranked)
    while lo < hi:
        mid = (lo + hi) // 2
        if ranked[mid].effective_adj >= min_adj:
            lo = mid + 1
        else:
            hi = mid
    return ranked[:lo]
