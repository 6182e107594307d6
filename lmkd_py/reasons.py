"""Android lmkd's system-wide kill reasons: swap left, thrashing, zone watermarks, direct reclaim.

Follows lmkd's ``mp_event_psi`` (platform/system/memory/lmkd, lmkd.cpp), re-expressed, not copied:

- swap is low when free swap < ``swap_free_low_pct`` of SwapTotal; free swap is the least of SwapFree,
  the room left on each swap device (on zram also under its ``mem_limit``, scaled by the device's
  compression ratio: zram.rst ``mm_stat``) and (MemFree + Inactive(file)) x ``swap_compression_ratio``
  (lmkd's ``get_free_swap``: zram swap takes the RAM it frees);
- thrashing = file refaults (``workingset_refault_file``, ``workingset_refault`` before 5.9) within the
  current 1 s window as % of the file LRU (``nr_active_file + nr_inactive_file``) at the window's start,
  plus the previous window's amount halved per window passed — kept whole when it was over the limit
  in a single window, so a kill that found no victim is retried (lmkd's ``prev_thrash_growth``);
- the watermark breached: MemFree (less CmaFree) against min/low/high summed over populated zones, each
  raised by the zone's largest lowmem reserve (``calc_zone_watermarks``), re-read once a minute;
- reclaim: ``pgscan_direct`` grew since the last look = direct reclaim, else ``pgscan_kswapd`` = kswapd;
  nothing grew and no refault either: no decision (lmkd's early ``no_kill``).

The reasons, in lmkd's order: ``pressure_after_kill`` (the look after a kill, below the low watermark),
``low_swap_and_thrashing``, ``low_mem_and_swap``, ``low_mem_and_swap_util``, ``low_mem_and_thrashing``,
``direct_recl_and_thrashing``, ``low_filecache_after_thrashing``. ``not_responding`` (PSI full stall) is
the PSI critical level's business in the daemon. lmkd's band floor: 0, or ``PERCEPTIBLE_APP_ADJ + 1`` when
the min watermark holds and thrashing is below critical (both configurable).

lmkd learns that a kill freed memory; a source does not. An event is taken as a kill: the thrashing
base is reset and a thrashing reason cuts the limit by ``thrashing_limit_decay_pct`` (until the next
window). If the daemon dropped the event (cooldown), thrashing that goes on fires again within a window.

Cost per look, measured on this 6.18 machine: ~90 us without swap (/proc/vmstat read and parse ~55 us,
16 us of it the parse; /proc/meminfo ~40 us); /proc/swaps and each zram mm_stat add ~10 us each;
/proc/zoneinfo (~140 us) is read once a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import structlog

from lmkd_py.config import Level, SignalsConfig
from lmkd_py.procfs import (
    PAGE_KIB,
    ProcFs,
    ProcParseError,
    SwapDevice,
    Watermarks,
    ZramMmStat,
    parse_meminfo,
    parse_swaps,
    parse_vmstat,
    parse_zoneinfo_watermarks,
    parse_zram_mm_stat,
)
from lmkd_py.psi import PressureEvent
from lmkd_py.signals import CheckResult, signal_level

log = structlog.get_logger("lmkd_py.reasons")
Clock = Callable[[], int]

THRASHING_WINDOW_NS = 1_000_000_000  # lmkd THRASHING_RESET_INTERVAL_MS
WATERMARK_REFRESH_NS = 60_000_000_000  # lmkd re-reads zoneinfo once a minute


class Wmark(IntEnum):
    """The lowest watermark free memory is below (lmkd's ``zone_watermark``; smaller = worse)."""

    MIN = 0
    LOW = 1
    HIGH = 2
    NONE = 3


def breached(free_pages: int, wm: Watermarks) -> Wmark:
    if free_pages < wm.min_pages:
        return Wmark.MIN
    if free_pages < wm.low_pages:
        return Wmark.LOW
    if free_pages < wm.high_pages:
        return Wmark.HIGH
    return Wmark.NONE


def zram_room_kib(dev: SwapDevice, mm: ZramMmStat | None) -> int:
    """Free swap on one device; on zram with a ``mem_limit`` at most the memory left under it, times the
    device's compression ratio so far (1 before anything was stored)."""
    free = max(0, dev.size_kib - dev.used_kib)
    if mm is None or mm.mem_limit_bytes == 0:
        return free
    left = max(0, mm.mem_limit_bytes - mm.mem_used_total_bytes)
    ratio = max(1.0, mm.orig_data_bytes / mm.compr_data_bytes) if mm.compr_data_bytes else 1.0
    return min(free, int(left * ratio) // 1024)


def swap_free_kib(meminfo: Mapping[str, int], swaps: Sequence[SwapDevice] | None,
                  zram: Mapping[str, ZramMmStat], compression_ratio: int) -> int | None:
    """Usable free swap (KiB, module docstring), or None when there is no swap."""
    if not meminfo.get("SwapTotal"):
        return None
    free = meminfo.get("SwapFree", 0)
    if swaps:
        free = min(free, sum(zram_room_kib(d, zram.get(d.zram) if d.zram else None) for d in swaps))
    if compression_ratio:
        easy = meminfo.get("MemFree", 0) + meminfo.get("Inactive(file)", 0)
        free = min(free, easy * compression_ratio)
    return max(0, free)


def swap_util_pct(meminfo: Mapping[str, int]) -> int:
    """Swapped-out share of all swappable memory (lmkd ``calc_swap_utilization``), %."""
    used = meminfo.get("SwapTotal", 0) - meminfo.get("SwapFree", 0)
    swappable = (meminfo.get("Active(anon)", 0) + meminfo.get("Inactive(anon)", 0) + meminfo.get("Shmem", 0)
                 + used)
    return used * 100 // swappable if swappable > 0 else 0


def refaults(vmstat: Mapping[str, int]) -> int:
    # Linux 5.9 (commit 170b04b7ae49) split workingset_refault into _anon and _file.
    return vmstat.get("workingset_refault_file", vmstat.get("workingset_refault", 0))


def file_lru_pages(vmstat: Mapping[str, int]) -> int:
    return vmstat.get("nr_active_file", 0) + vmstat.get("nr_inactive_file", 0)


@dataclass
class Thrashing:
    """lmkd's thrashing estimate with its decay (module docstring). Percent of the file LRU."""

    limit_pct: int
    decay_pct: int
    window_ns: int = THRASHING_WINDOW_NS
    limit: int = 0  # the current limit: limit_pct, cut after thrashing kills, restored each window
    base_lru: int = 0
    base_refault: int = 0
    reset_ns: int = 0
    prev_growth: int = 0
    started: bool = False

    def reset(self, refault: int, lru: int, now_ns: int) -> None:
        """Start over from now (the first look, and after a kill)."""
        self.base_lru, self.base_refault, self.reset_ns = lru, refault, now_ns
        self.prev_growth = 0
        self.limit = self.limit or self.limit_pct
        self.started = True

    def update(self, refault: int, lru: int, now_ns: int) -> int:
        if not self.started:
            self.reset(refault, lru, now_ns)
        growth = (refault - self.base_refault) * 100 // (self.base_lru + 1)
        since = now_ns - self.reset_ns
        if since > self.window_ns:
            windows = since // self.window_ns
            self.prev_growth = growth
            # Keep an over-the-limit amount from the one window just passed (no victim was found then).
            if windows > 1 or self.prev_growth < self.limit:
                self.prev_growth = self.prev_growth >> windows if windows < 63 else 0
            self.base_lru, self.base_refault, self.reset_ns = lru, refault, now_ns
            self.limit = self.limit_pct
            current = 0
        else:
            current = growth
        return current + self.prev_growth

    def cut(self) -> None:
        """After a thrashing kill: lower the limit until the next window."""
        self.limit = self.limit * (100 - self.decay_pct) // 100


@dataclass(frozen=True)
class Decision:
    reason: str
    min_oom_score_adj: int
    signals: dict[str, float | int | None]
    needs_low_mem: bool  # the condition includes a watermark breach (still() re-reads it)
    needs_low_swap: bool
    thrashing_reason: bool


@dataclass
class Sample:
    """One look at the system (all sizes KiB unless named pages)."""

    meminfo: Mapping[str, int]
    vmstat: Mapping[str, int]
    swap_free_kib: int | None  # None: no swap
    wmark: Wmark
    watermarks: Watermarks


@dataclass
class LmkdState:
    cfg: SignalsConfig
    thrashing: Thrashing
    last_pgscan_direct: int | None = None
    last_pgscan_kswapd: int | None = None
    last_refault: int | None = None
    after_kill: bool = False
    check_filecache: bool = False
    max_thrashing: int = 0
    log_once: set[str] = field(default_factory=set)


def decide(sample: Sample, st: LmkdState, now_ns: int) -> Decision | None:
    """lmkd's reasons in lmkd's order (module docstring); updates ``st``. Pure apart from ``st``."""
    cfg, vs, mi = st.cfg, sample.vmstat, sample.meminfo
    refault = refaults(vs)
    direct = st.last_pgscan_direct is not None and vs.get("pgscan_direct", 0) > st.last_pgscan_direct
    kswapd = st.last_pgscan_kswapd is not None and vs.get("pgscan_kswapd", 0) > st.last_pgscan_kswapd
    changed = direct or kswapd or (st.last_refault is not None and refault != st.last_refault)
    first = st.last_refault is None
    st.last_pgscan_direct, st.last_pgscan_kswapd = vs.get("pgscan_direct", 0), vs.get("pgscan_kswapd", 0)
    st.last_refault = refault
    thrashing = st.thrashing.update(refault, file_lru_pages(vs), now_ns)
    st.max_thrashing = max(st.max_thrashing, thrashing)
    after_kill, st.after_kill = st.after_kill, False
    if first or not changed:
        return None  # not thrashing, not reclaiming: nothing to decide (lmkd's early no_kill)
    total_swap = mi.get("SwapTotal", 0)
    low_threshold = total_swap * cfg.swap_free_low_pct / 100
    swap_low = sample.swap_free_kib is not None and sample.swap_free_kib < low_threshold
    wmark = sample.wmark
    critical = cfg.thrashing_critical_pct if cfg.thrashing_critical_pct is not None else 2 * cfg.thrashing_limit_pct
    spare = cfg.perceptible_min_oom_score_adj
    floor = cfg.min_oom_score_adj
    wm = sample.watermarks
    values: dict[str, float | int | None] = {
        "thrashing_pct": thrashing, "thrashing_limit_pct": st.thrashing.limit,
        "mem_free_kib": mi.get("MemFree"), "wmark_high_kib": wm.high_pages * PAGE_KIB,
        "wmark_low_kib": wm.low_pages * PAGE_KIB, "wmark_min_kib": wm.min_pages * PAGE_KIB,
        "swap_free_kib": sample.swap_free_kib, "swap_low_kib": round(low_threshold) if total_swap else None,
        "direct_reclaim": int(direct),
    }

    def pick(reason: str, adj: int, *, mem: bool, swap: bool, thrash: bool) -> Decision:
        return Decision(reason, adj, values, mem, swap, thrash)

    if after_kill and wmark < Wmark.LOW:
        return pick("pressure_after_kill", floor, mem=True, swap=False, thrash=False)
    spare_unless_min = spare if wmark > Wmark.MIN and thrashing < critical else floor
    if swap_low and thrashing > cfg.thrashing_limit_pct:
        st.check_filecache = True
        return pick("low_swap_and_thrashing", spare_unless_min, mem=False, swap=True, thrash=True)
    if swap_low and wmark < Wmark.HIGH:
        return pick("low_mem_and_swap", spare_unless_min, mem=True, swap=True, thrash=False)
    if wmark < Wmark.HIGH and cfg.swap_util_max_pct < 100 and total_swap:
        util = swap_util_pct(mi)
        if util > cfg.swap_util_max_pct:
            values["swap_util_pct"] = util
            return pick("low_mem_and_swap_util", floor, mem=True, swap=False, thrash=False)
    spare_unless_critical = spare if thrashing < critical else floor
    if wmark < Wmark.HIGH and thrashing > st.thrashing.limit:
        st.check_filecache = True
        return pick("low_mem_and_thrashing", spare_unless_critical, mem=True, swap=False, thrash=True)
    if direct and thrashing > st.thrashing.limit:
        st.check_filecache = True
        return pick("direct_recl_and_thrashing", spare_unless_critical, mem=False, swap=False, thrash=True)
    if st.check_filecache:
        lru_kib = file_lru_pages(vs) * PAGE_KIB
        if lru_kib < cfg.filecache_min_kib:
            values["filecache_kib"], values["filecache_min_kib"] = lru_kib, cfg.filecache_min_kib
            return pick("low_filecache_after_thrashing", spare, mem=False, swap=False, thrash=False)
        st.check_filecache = False
    return None


def took_kill(st: LmkdState, d: Decision, sample: Sample, now_ns: int) -> None:
    """What lmkd does after a kill that freed memory (module docstring: an event is taken as a kill)."""
    st.after_kill = True
    st.max_thrashing = 0
    if d.thrashing_reason:
        st.thrashing.cut()
    limit = st.thrashing.limit
    st.thrashing.reset(refaults(sample.vmstat), file_lru_pages(sample.vmstat), now_ns)
    st.thrashing.limit = limit


class LmkdCheck:
    """Reads /proc (meminfo, vmstat, swaps, zoneinfo) and /sys/block/zram*/mm_stat and applies ``decide``.

    Degrades: no swap disables the swap reasons, no zoneinfo the watermark reasons, no zram only its
    bound; each absence is logged once."""

    name = "lmkd reasons"

    def __init__(self, cfg: SignalsConfig, proc: ProcFs, *, sys_root: Path = Path("/sys"),
                 clock: Clock = time.monotonic_ns) -> None:
        self.cfg = cfg
        self.proc = proc
        self.sys_root = sys_root
        self.clock = clock
        self.state = LmkdState(cfg, Thrashing(cfg.thrashing_limit_pct, cfg.thrashing_limit_decay_pct))
        self._watermarks: Watermarks | None = None
        self._wm_read_ns: int | None = None
        self._levels: dict[tuple[str, int], Level] = {}

    def _once(self, key: str, **kw: object) -> None:
        if key not in self.state.log_once:
            self.state.log_once.add(key)
            log.warning(key, **kw)

    def _read(self, name: str) -> str | None:
        try:
            with open(f"{self.proc.root}/{name}") as fh:
                return fh.read()
        except OSError as exc:
            self._once(f"signals.{name}_unavailable", path=f"{self.proc.root}/{name}", reason=str(exc))
            return None

    def watermarks(self, now_ns: int) -> Watermarks | None:
        if self._wm_read_ns is None or now_ns - self._wm_read_ns >= WATERMARK_REFRESH_NS:
            self._wm_read_ns = now_ns
            text = self._read("zoneinfo")
            try:
                self._watermarks = parse_zoneinfo_watermarks(text) if text is not None else None
            except ProcParseError as exc:
                self._once("signals.zoneinfo_unusable", reason=str(exc),
                           effect="the watermark reasons are off")
                self._watermarks = None
        return self._watermarks

    def zram(self, swaps: Sequence[SwapDevice]) -> dict[str, ZramMmStat]:
        out = {}
        for d in swaps:
            if d.zram is None:
                continue
            try:
                out[d.zram] = parse_zram_mm_stat((self.sys_root / "block" / d.zram / "mm_stat").read_text())
            except (OSError, ProcParseError) as exc:
                self._once(f"signals.zram_unreadable.{d.zram}", device=d.zram, reason=str(exc),
                           effect="its mem_limit is not counted")
        return out

    def sample(self, now_ns: int) -> Sample | None:
        mi_text, vs_text = self._read("meminfo"), self._read("vmstat")
        if mi_text is None or vs_text is None:
            return None
        try:
            mi, vs = parse_meminfo(mi_text), parse_vmstat(vs_text)
        except ProcParseError as exc:
            self._once("signals.proc_unusable", reason=str(exc))
            return None
        swaps: list[SwapDevice] | None = None
        if mi.get("SwapTotal"):
            text = self._read("swaps")
            try:
                swaps = parse_swaps(text) if text is not None else None
            except ProcParseError as exc:
                self._once("signals.swaps_unusable", reason=str(exc))
        else:
            self._once("signals.no_swap", effect="low_swap_and_thrashing, low_mem_and_swap and "
                       "low_mem_and_swap_util are off while SwapTotal is 0")
        free = swap_free_kib(mi, swaps, self.zram(swaps or []), self.cfg.swap_compression_ratio)
        wm = self.watermarks(now_ns)
        free_pages = (mi.get("MemFree", 0) - mi.get("CmaFree", 0)) // PAGE_KIB
        if wm is None:
            # Without zoneinfo no watermark can be breached: the reasons that need one stay quiet.
            return Sample(mi, vs, free, Wmark.NONE, Watermarks(0, 0, 0))
        return Sample(mi, vs, free, breached(free_pages, wm), wm)

    def _level(self, reason: str, adj: int) -> Level:
        key = (reason, adj)
        if key not in self._levels:
            self._levels[key] = signal_level(reason, adj)
        return self._levels[key]

    def check(self, now_ns: int) -> CheckResult:
        sample = self.sample(now_ns)
        if sample is None:
            return CheckResult()
        d = decide(sample, self.state, now_ns)
        # The reasons that need memory need it below the low watermark (lmkd's "wmark < WMARK_HIGH"):
        # the margin is the distance to it. Without zoneinfo: unknown (check slowly).
        margin: int | None = None
        if sample.watermarks.low_pages:
            free_pages = (sample.meminfo.get("MemFree", 0) - sample.meminfo.get("CmaFree", 0)) // PAGE_KIB
            margin = max(0, (free_pages - sample.watermarks.low_pages) * PAGE_KIB)
        low_swap_line = self.cfg.swap_free_low_pct / 100 * sample.meminfo.get("SwapTotal", 0)
        if sample.swap_free_kib is not None and sample.swap_free_kib < low_swap_line:
            margin = 0  # lmkd polls fast while swap is low
        if d is None:
            return CheckResult(margin_kib=margin)
        took_kill(self.state, d, sample, now_ns)
        desc = f"{d.reason}: thrashing {d.signals['thrashing_pct']} %, {sample.wmark.name.lower()} watermark"
        event = PressureEvent(self._level(d.reason, d.min_oom_score_adj), now_ns, "signals", desc,
                              kill_reason=d.reason, signals=d.signals, still=lambda: self.still(d))
        return CheckResult([event], 0)

    def still(self, d: Decision) -> bool:
        """Whether the memory side of ``d`` holds now: the watermark still breached, swap still low
        (thrashing is a rate over a window and cannot be re-read in a moment: it counts as holding)."""
        sample = self.sample(self.clock())
        if sample is None:
            return False
        if d.needs_low_mem and sample.wmark >= Wmark.HIGH:
            return False
        if d.needs_low_swap:
            line = self.cfg.swap_free_low_pct / 100 * sample.meminfo.get("SwapTotal", 0)
            if sample.swap_free_kib is None or sample.swap_free_kib >= line:
                return False
        return True

    def wake_fds(self) -> Mapping[int, int]:
        return {}

    def close(self) -> None:
        pass
