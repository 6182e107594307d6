"""Cgroup headroom: how much the scope's processes may still allocate before a memcg OOM kill.

A memory cgroup with no swap and no page cache runs out of memory with almost no PSI stall, so the
kernel's memcg OOM killer wins unless something watches usage against the limit (kernel-notes). The
limits that matter are those of the memcgs the scope's processes are in, and their ancestors':

- cgroup v2 with the memory controller: ``memory.current`` against the lower of ``memory.max`` and
  ``memory.high`` (above high the kernel throttles and reclaims hard), swap from ``memory.swap.*``;
- hybrid hosts (memory controller on v1, the scope a v2 directory): the v1 memcg named by each pid's
  ``memory`` line in /proc/PID/cgroup, ``memory.usage_in_bytes`` against ``memory.limit_in_bytes``,
  swap from ``memory.memsw.*`` (usage + swap, Documentation/admin-guide/cgroup-v1/memory.rst).

Headroom = (limit - usage) + its file cache (the kernel reclaims that before an OOM kill; a memcg full
of page cache is not out of memory, and its thrashing is PSI's to see) + the swap the memcg may still
use: the least of its own swap allowance
(memsw limit - memsw usage - RAM room, or swap.max - swap.current) and the system's usable free swap
(reasons.swap_free_kib: zram mem_limit aware). A memcg at its limit that swaps into zram is working as
designed; it runs out when the swap it may use runs out. A v1 memcg with ``memory.swappiness`` 0 does
not swap (memory.rst 5.3). The event's ``kill_reason`` is ``cgroup_headroom``, or ``low_mem_and_swap``
(lmkd's name, within the memcg) once the memcg has swapped.

Memcgs are found per pid and cached; only pids new since the last look are resolved. On v1 the kernel
also signals a usage threshold crossing through ``cgroup.event_control`` + eventfd (memory.rst 9):
one is armed at twice the kill threshold below each limit, so the loop wakes at the crossing whatever
its period; on v2 ``memory.events`` polls POLLPRI when the memcg hits high or max.
Cost per look, measured here: ~95 us for one v1 memcg on a host without swap (the scope's
cgroup.procs ~38 us, two memcg files ~35 us, /proc/swaps ~10 us); with swap add meminfo and the memsw
files (~70 us).
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from lmkd_py.config import Level, SignalsConfig
from lmkd_py.procfs import (
    ProcFs,
    ProcParseError,
    cgroup_v2_path,
    memcg_v1_path,
    parse_flat_keyed,
    parse_memcg_bytes,
    parse_meminfo,
    parse_swaps,
    parse_zram_mm_stat,
    subtree_pids,
)
from lmkd_py.psi import PressureEvent
from lmkd_py.reasons import swap_free_kib
from lmkd_py.signals import CheckResult, signal_level

log = structlog.get_logger("lmkd_py.headroom")
CHAINS_TTL_NS = 10_000_000_000  # how long the list of a memcg's limited ancestors is trusted


@dataclass(frozen=True)
class Reading:
    """One memcg now, KiB. ``swap_room_kib``: its own swap allowance left (None: unlimited);
    ``swap_used_kib``: what it has in swap (None: unknown)."""

    usage_kib: int
    limit_kib: int
    swap_room_kib: int | None
    swap_used_kib: int | None


def headroom(r: Reading, sys_swap_free_kib: int | None, can_swap: bool) -> tuple[int, int]:
    """(RAM room, swap room) in KiB: what may still be allocated before the memcg OOM-kills."""
    ram = max(0, r.limit_kib - r.usage_kib)
    if not can_swap or not sys_swap_free_kib:
        return ram, 0
    room = sys_swap_free_kib if r.swap_room_kib is None else min(max(0, r.swap_room_kib), sys_swap_free_kib)
    return ram, room


def threshold_kib(limit_kib: int, cfg: SignalsConfig) -> int:
    return max(round(limit_kib * cfg.headroom_min_pct / 100), cfg.headroom_min_kib)


def _read_bytes(path: str) -> int | None:
    with open(path) as fh:
        return parse_memcg_bytes(fh.read())


@dataclass
class Memcg:
    """A memcg with a limit; ``directory`` is its path on this machine, ``label`` its cgroup path."""

    directory: str
    label: str
    v1: bool
    can_swap: bool
    efd: int | None = None
    usage_fd: int | None = None
    armed_limit_kib: int | None = None

    def read(self, swap: bool = True) -> Reading | None:
        """Usage and limits now; None when no limit is set any more. ``swap`` False skips the swap files
        (the system has no swap: ~15 us a file). Raises OSError when the memcg is gone (ENOENT, or
        ENODEV while it is being removed)."""
        d = self.directory
        if self.v1:
            limit = _read_bytes(f"{d}/memory.limit_in_bytes")
            usage = _read_bytes(f"{d}/memory.usage_in_bytes") or 0
            sw_limit = sw_usage = None
            if swap:
                with contextlib.suppress(FileNotFoundError):  # swapaccount=0: the memcg's swap is unknown
                    sw_limit = _read_bytes(f"{d}/memory.memsw.limit_in_bytes")
                    sw_usage = _read_bytes(f"{d}/memory.memsw.usage_in_bytes") or 0
            if limit is None and sw_limit is None:
                return None
            limit = limit if limit is not None else sw_limit
            assert limit is not None
            used = None if sw_usage is None else max(0, sw_usage - usage)
            room = None if sw_limit is None or sw_usage is None else (sw_limit - sw_usage) - (limit - usage)
            return Reading(usage // 1024, limit // 1024, None if room is None else room // 1024,
                           None if used is None else used // 1024)
        limits = [x for x in (_read_bytes(f"{d}/memory.max"), _read_bytes(f"{d}/memory.high")) if x is not None]
        if not limits:
            return None
        usage = _read_bytes(f"{d}/memory.current") or 0
        sw_max = sw_cur = None
        if swap:
            with contextlib.suppress(FileNotFoundError):  # no swap controller files
                sw_max = _read_bytes(f"{d}/memory.swap.max")
                sw_cur = _read_bytes(f"{d}/memory.swap.current") or 0
        room = None if sw_max is None or sw_cur is None else sw_max - sw_cur
        return Reading(usage // 1024, min(limits) // 1024, None if room is None else room // 1024,
                       None if sw_cur is None else sw_cur // 1024)

    def arm(self, limit_kib: int, at_kib: int) -> None:
        """Ask the kernel to wake the loop: v1, an eventfd when usage crosses ``limit - at`` (re-armed when
        the limit moves); v2, POLLPRI on ``memory.events`` (it changes on high/max/oom events:
        cgroup_file_notify -> kernfs_notify; a read re-arms it)."""
        if not self.v1:
            if self.efd is None and self.armed_limit_kib is None:
                try:
                    self.efd = os.open(f"{self.directory}/memory.events", os.O_RDONLY | os.O_CLOEXEC)
                    os.pread(self.efd, 4096, 0)
                except OSError:
                    self.disarm()
                self.armed_limit_kib = limit_kib
            return
        if self.armed_limit_kib == limit_kib or limit_kib <= at_kib:
            return
        self.disarm()
        try:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.usage_fd = os.open(f"{self.directory}/memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
            with open(f"{self.directory}/cgroup.event_control", "w") as fh:
                fh.write(f"{self.efd} {self.usage_fd} {(limit_kib - at_kib) * 1024}")
            self.armed_limit_kib = limit_kib
        except OSError as exc:
            log.info("headroom.threshold_unavailable", memcg=self.label, reason=str(exc),
                     effect="the adaptive period alone watches this memcg")
            self.disarm()
            self.armed_limit_kib = limit_kib  # do not retry every look

    def drain(self) -> None:
        if self.efd is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError: nothing crossed since the last look
            if self.v1:
                os.eventfd_read(self.efd)
            else:
                os.pread(self.efd, 4096, 0)

    def file_lru_kib(self) -> int:
        """Page cache on the memcg's LRU lists (active + inactive file, its subtree included): the kernel
        reclaims it before it OOM-kills. Shmem sits on the anon lists and does not count. Raises OSError
        when the memcg is gone."""
        with open(f"{self.directory}/memory.stat") as fh:
            stat = parse_flat_keyed(fh.read())
        prefix = "total_" if self.v1 else ""  # v1: the total_* lines cover the subtree, as usage does
        return (stat.get(prefix + "inactive_file", 0) + stat.get(prefix + "active_file", 0)) // 1024

    @property
    def wake_events(self) -> int:
        return select.POLLIN if self.v1 else select.POLLPRI

    def disarm(self) -> None:
        # Closing the eventfd removes the kernel's registration (memcg_event_wake on EPOLLHUP).
        for fd in (self.efd, self.usage_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.efd = self.usage_fd = None
        self.armed_limit_kib = None


def _mounts(text: str) -> tuple[str | None, str | None]:
    """(v1 memory controller mount, cgroup2 mount) from /proc/self/mounts text."""
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup" and "memory" in parts[3].split(","):
            v1 = v1 or parts[1]
        elif parts[2] == "cgroup2":
            v2 = v2 or parts[1]
    return v1, v2


@dataclass
class HeadroomCheck:
    """The headroom of the memcgs of ``scope_dir``'s processes (module docstring)."""

    scope_dir: Path
    cfg: SignalsConfig
    proc: ProcFs
    v1_root: str | None
    v2_root: str | None
    sys_root: Path = Path("/sys")
    name: str = "cgroup headroom"
    level: Level = field(init=False)
    swap_level: Level = field(init=False)
    _pid_leaf: dict[int, str | None] = field(default_factory=dict)
    _memcgs: dict[str, Memcg] = field(default_factory=dict)
    _chains: dict[str, list[str]] = field(default_factory=dict)  # leaf dir -> limited dirs (leaf first)
    _logged: set[str] = field(default_factory=set)
    _v2: bool = False
    _chains_ns: int = -(1 << 62)

    def __post_init__(self) -> None:
        self.level = signal_level("cgroup_headroom", self.cfg.headroom_min_oom_score_adj)
        self.swap_level = signal_level("low_mem_and_swap", self.cfg.headroom_min_oom_score_adj)
        self.name = f"cgroup headroom of {self.scope_dir}"
        # The memory controller is either enabled for the scope's v2 tree or on v1: decided once.
        self._v2 = (self.scope_dir / "memory.current").exists()

    @classmethod
    def open(cls, scope_dir: Path, cfg: SignalsConfig, proc: ProcFs, *, sys_root: Path = Path("/sys"),
             mounts_path: Path = Path("/proc/self/mounts")) -> HeadroomCheck:
        try:
            v1, v2 = _mounts(mounts_path.read_text())
        except OSError:
            v1, v2 = None, None
        return cls(scope_dir, cfg, proc, v1, v2, sys_root)

    def _once(self, key: str, level: str = "warning", **kw: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            getattr(log, level)(key.split("|")[0], **kw)

    # -- finding the memcgs ----------------------------------------------------------------------------
    def _native_v2(self) -> bool:
        return self._v2

    def _leaf(self, pid: int) -> str | None:
        """The memcg directory a pid is charged to, or None (gone, or no memory controller)."""
        try:
            entries = self.proc.cgroup(pid)
        except (OSError, ProcParseError):
            return None
        if self._native_v2():
            path = cgroup_v2_path(entries)
            root = self.v2_root
        else:
            path = memcg_v1_path(entries)
            root = self.v1_root
        if path is None or root is None:
            return None
        return root.rstrip("/") + (path if path != "/" else "")

    def _chain(self, leaf: str) -> list[str]:
        """``leaf`` and its ancestors (below the mount root) that have a limit."""
        v1 = not self._native_v2()
        root = (self.v1_root if v1 else self.v2_root) or "/"
        out = []
        d = leaf
        while len(d) > len(root.rstrip("/")):
            memcg = self._memcgs.get(d) or Memcg(d, d[len(root.rstrip("/")):] or "/", v1, self._can_swap(d, v1))
            try:
                if memcg.read() is not None:
                    self._memcgs[d] = memcg
                    out.append(d)
            except (OSError, ProcParseError):
                pass
            d = os.path.dirname(d)
        return out

    @staticmethod
    def _can_swap(d: str, v1: bool) -> bool:
        if not v1:
            return True
        try:
            with open(f"{d}/memory.swappiness") as fh:
                return fh.read().strip() != "0"
        except OSError:
            return True

    def refresh(self, now_ns: int = 0) -> None:
        """Resolve the memcgs of pids new to the scope; forget pids that left. The limited ancestors of
        each memcg are looked up again every CHAINS_TTL_NS, so a limit set later is picked up."""
        if now_ns - self._chains_ns >= CHAINS_TTL_NS:
            self._chains_ns = now_ns
            self._chains.clear()
        pids = subtree_pids(self.scope_dir)
        if not pids and not self.scope_dir.exists():
            self._once("headroom.scope_gone", scope=str(self.scope_dir), effect="no headroom to watch")
        for pid in set(self._pid_leaf) - pids:
            del self._pid_leaf[pid]
        for pid in pids - set(self._pid_leaf):
            self._pid_leaf[pid] = self._leaf(pid)
        for leaf in set(self._pid_leaf.values()):
            if leaf is not None and leaf not in self._chains:
                self._chains[leaf] = self._chain(leaf)
        live = {d for leaf in set(self._pid_leaf.values()) if leaf for d in self._chains.get(leaf, [])}
        for d in set(self._memcgs) - live:
            self._memcgs.pop(d).disarm()
        if pids and not self._memcgs:
            self._once("headroom.no_limit", "info", scope=str(self.scope_dir),
                       reason="none of the scope's processes is in a memory cgroup with a limit")

    def _forget(self, d: str, reason: str) -> None:
        self._once(f"headroom.memcg_gone|{d}", "info", memcg=d, reason=reason)
        m = self._memcgs.pop(d, None)
        if m is not None:
            m.disarm()
        self._chains.clear()
        self._pid_leaf.clear()  # re-resolve everyone at the next look

    # -- the look ------------------------------------------------------------------------------------
    def sys_swap_free(self) -> int | None:
        """Usable free swap of the system (KiB), None without swap. /proc/swaps first: with no swap
        device that one small read is all (meminfo costs ~40 us)."""
        try:
            swaps = parse_swaps(Path(f"{self.proc.root}/swaps").read_text())
            if not swaps:
                return None
            mi = parse_meminfo(Path(f"{self.proc.root}/meminfo").read_text())
        except (OSError, ProcParseError):
            return None
        zram = {}
        for d in swaps:
            if d.zram:
                with contextlib.suppress(OSError, ProcParseError):
                    zram[d.zram] = parse_zram_mm_stat((self.sys_root / "block" / d.zram / "mm_stat").read_text())
        return swap_free_kib(mi, swaps, zram, self.cfg.swap_compression_ratio)

    def measure(self, m: Memcg, sys_swap: int | None) -> tuple[Reading, int, int, int, int] | None:
        """(reading, RAM room, swap room, threshold, file cache counted) of one memcg; None when gone or
        unlimited. The RAM room includes the memcg's file cache, but memory.stat (~70 us here) is only
        read when the room without it is below the threshold: a full memcg of page cache is not out of
        memory (its thrashing is PSI's to see)."""
        try:
            r = m.read(swap=sys_swap is not None)
            if r is None:
                return None
            ram, swap = headroom(r, sys_swap, m.can_swap)
            thr = threshold_kib(r.limit_kib, self.cfg)
            cache = m.file_lru_kib() if ram + swap < thr else 0
        except (OSError, ProcParseError) as exc:
            self._forget(m.directory, str(exc))
            return None
        return r, ram + cache, swap, thr, cache

    def check(self, now_ns: int) -> CheckResult:
        for m in self._memcgs.values():
            m.drain()
        self.refresh(now_ns)
        if not self._memcgs:
            return CheckResult()
        sys_swap = self.sys_swap_free()
        worst: tuple[int, Memcg, tuple[Reading, int, int, int, int]] | None = None
        for m in list(self._memcgs.values()):
            got = self.measure(m, sys_swap)
            if got is None:
                continue
            r, ram, swap, thr, _cache = got
            m.arm(r.limit_kib, 2 * thr)
            margin = ram + swap - thr
            if worst is None or margin < worst[0]:
                worst = (margin, m, got)
        if worst is None:
            return CheckResult()
        margin, m, (r, ram, swap, thr, cache) = worst
        if margin >= 0:
            return CheckResult(margin_kib=margin)
        swapped = bool(r.swap_used_kib)
        reason = "low_mem_and_swap" if swapped else "cgroup_headroom"
        signals: dict[str, float | int | None] = {
            "usage_kib": r.usage_kib, "limit_kib": r.limit_kib, "headroom_kib": ram + swap,
            "threshold_kib": thr, "swap_free_kib": swap, "swap_used_kib": r.swap_used_kib, "file_cache_kib": cache,
        }
        event = PressureEvent(self.swap_level if swapped else self.level, now_ns, "headroom",
                              f"memcg {m.label}: headroom {ram + swap} KiB < {thr} KiB", kill_reason=reason,
                              signals=signals, still=lambda: self.still(m), victims=self.members(m))
        return CheckResult([event], 0)

    def members(self, m: Memcg) -> frozenset[int]:
        """The scope's pids charged to ``m`` or below it: the only kills that give ``m`` memory back."""
        return frozenset(pid for pid, leaf in self._pid_leaf.items()
                         if leaf is not None and m.directory in self._chains.get(leaf, ()))

    def still(self, m: Memcg) -> bool:
        """Whether ``m``'s headroom is below its threshold now (False when unreadable: never kill blind)."""
        got = self.measure(m, self.sys_swap_free())
        if got is None:
            return False
        _r, ram, swap, thr, _cache = got
        return ram + swap < thr

    def wake_fds(self) -> Mapping[int, int]:
        return {m.efd: m.wake_events for m in self._memcgs.values() if m.efd is not None}

    def close(self) -> None:
        for m in self._memcgs.values():
            m.disarm()
        self._memcgs.clear()
