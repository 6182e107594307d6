"""Pure parsers for /proc text, and ``ProcFs``: the one reader, rooted anywhere (tests use tmp_path).

Every ``parse_*`` takes the file's text and returns a value or raises ``ProcParseError`` naming what is
wrong; none does I/O. ``ProcFs`` builds every path from its root and lets ``FileNotFoundError`` /
``ProcessLookupError`` through: a process that vanished is normal and its caller decides.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PF_KTHREAD = 0x00200000  # include/linux/sched.h: task is a kernel thread
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class ProcParseError(ValueError):
    """A /proc file whose content is not what the kernel writes (names the file kind and why)."""


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    comm: str
    state: str
    ppid: int
    flags: int
    num_threads: int
    start_time_ticks: int  # field 22: clock ticks after boot; with the pid, the identity of a process
    rss_pages: int

    @property
    def is_kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def parse_stat(text: str) -> ProcStat:
    """Parse /proc/PID/stat. ``comm`` may hold spaces, parentheses and newlines: it is everything
    between the first '(' and the LAST ')' (the kernel does not escape it)."""
    open_at = text.find("(")
    close_at = text.rfind(")")
    if open_at < 0 or close_at < open_at:
        raise ProcParseError("stat: no '(comm)' field")
    try:
        pid = int(text[:open_at].strip())
    except ValueError:
        raise ProcParseError(f"stat: bad pid field {text[:open_at].strip()!r}") from None
    rest = text[close_at + 1 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    if len(rest) < 22:
        raise ProcParseError(f"stat: {len(rest) + 2} fields, expected at least 24 (truncated?)")
    try:
        return ProcStat(
            pid=pid,
            comm=text[open_at + 1 : close_at],
            state=rest[0],
            ppid=int(rest[1]),
            flags=int(rest[6]),
            num_threads=int(rest[17]),
            start_time_ticks=int(rest[19]),
            rss_pages=int(rest[21]),
        )
    except ValueError as exc:
        raise ProcParseError(f"stat: non-numeric field ({exc})") from None


@dataclass(frozen=True, slots=True)
class ProcStatus:
    name: str | None
    tgid: int | None
    uid: int | None  # real uid
    threads: int | None
    vm_rss_kib: int | None
    rss_anon_kib: int | None
    rss_file_kib: int | None
    rss_shmem_kib: int | None
    vm_swap_kib: int | None

    def victim_fields(self) -> dict[str, Any]:
        """The fields of a records.Victim this status gives (uid, threads, sizes by kind)."""
        return {
            "uid": self.uid,
            "threads": self.threads,
            "rss_kib": self.vm_rss_kib,
            "rss_anon_kib": self.rss_anon_kib,
            "rss_file_kib": self.rss_file_kib,
            "rss_shmem_kib": self.rss_shmem_kib,
            "swap_kib": self.vm_swap_kib,
        }


_STATUS_KIB = {
    "VmRSS": "vm_rss_kib",
    "RssAnon": "rss_anon_kib",
    "RssFile": "rss_file_kib",
    "RssShmem": "rss_shmem_kib",
    "VmSwap": "vm_swap_kib",
}


def parse_status(text: str) -> ProcStatus:
    """Parse /proc/PID/status. Missing keys (kernel threads have no Vm* lines; a truncated read) are
    None. A present key whose value is not a number raises ProcParseError naming the key."""
    values: dict[str, int | str | None] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        try:
            if key in _STATUS_KIB:
                number, _, unit = value.partition(" ")
                if unit.strip() not in ("kB", ""):
                    raise ProcParseError(f"status: {key} has unit {unit.strip()!r}, expected kB")
                values[_STATUS_KIB[key]] = int(number)
            elif key == "Name":
                values["name"] = value
            elif key == "Tgid":
                values["tgid"] = int(value)
            elif key == "Threads":
                values["threads"] = int(value)
            elif key == "Uid":
                values["uid"] = int(value.split()[0])
        except (ValueError, IndexError):
            raise ProcParseError(f"status: {key} is not a number: {value!r}") from None
    return ProcStatus(
        name=_opt_str(values.get("name")),
        tgid=_opt_int(values.get("tgid")),
        uid=_opt_int(values.get("uid")),
        threads=_opt_int(values.get("threads")),
        vm_rss_kib=_opt_int(values.get("vm_rss_kib")),
        rss_anon_kib=_opt_int(values.get("rss_anon_kib")),
        rss_file_kib=_opt_int(values.get("rss_file_kib")),
        rss_shmem_kib=_opt_int(values.get("rss_shmem_kib")),
        vm_swap_kib=_opt_int(values.get("vm_swap_kib")),
    )


def parse_status_kib(text: str, key: str) -> int | None:
    """One ``kB`` value of a /proc/PID/status text (``VmRSS``, ``VmSwap``...) without parsing the rest,
    for the decision-time re-read; None when the line is absent (a kernel thread, a zombie)."""
    at = text.find(f"\n{key}:")
    if at < 0:
        return None
    end = text.find("\n", at + 1)
    fields = text[at + len(key) + 2 : end if end >= 0 else None].split()
    try:
        return int(fields[0])
    except (ValueError, IndexError):
        raise ProcParseError(f"status: {key} is not a number: {fields!r}") from None


def _opt_int(v: int | str | None) -> int | None:
    return v if isinstance(v, int) else None


def _opt_str(v: int | str | None) -> str | None:
    return v if isinstance(v, str) else None


CAP_KILL = 5
CAP_IPC_LOCK = 14
CAP_SYS_RESOURCE = 24


def has_capability(status_text: str, bit: int) -> bool:
    """Whether the ``CapEff`` line of a /proc/PID/status text has capability ``bit``; False when absent."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) & (1 << bit))
            except (ValueError, IndexError):
                return False
    return False


def self_has_capability(bit: int, status_path: Path = Path("/proc/self/status")) -> bool:
    """Whether this process has capability ``bit`` in its effective set (False if unreadable)."""
    try:
        return has_capability(status_path.read_text(), bit)
    except OSError:
        return False


def parse_oom_score_adj(text: str) -> int:
    """Parse /proc/PID/oom_score_adj (-1000..1000)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ProcParseError(f"oom_score_adj: not a number: {text.strip()[:40]!r}") from None
    if not -1000 <= value <= 1000:
        raise ProcParseError(f"oom_score_adj: {value} outside -1000..1000")
    return value


def parse_cmdline(data: bytes) -> list[str]:
    """Parse /proc/PID/cmdline (NUL-separated; empty for kernel threads and zombies)."""
    return [part.decode(errors="replace") for part in data.split(b"\0") if part] if data else []


DELETED_SUFFIX = " (deleted)"


def parse_exe_link(target: str) -> str:
    """The executable's path from a /proc/PID/exe link target. The kernel's d_path() appends
    " (deleted)" once the file was unlinked (a package upgrade replaces /usr/sbin/sshd under the
    running daemon); the path it names is still the one the process was started from. Only the final
    component grows, so stripping cannot move a path into another directory."""
    return target.removesuffix(DELETED_SUFFIX)


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


def parse_cgroup(text: str) -> list[CgroupEntry]:
    """Parse /proc/PID/cgroup: ``id:controllers:path`` lines; the v2 entry is ``0::/path``."""
    entries = []
    for line in text.splitlines():
        if not line:
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise ProcParseError(f"cgroup: line without three ':'-fields: {line[:80]!r}")
        try:
            hid = int(parts[0])
        except ValueError:
            raise ProcParseError(f"cgroup: bad hierarchy id {parts[0]!r}") from None
        controllers = tuple(c for c in parts[1].split(",") if c)
        entries.append(CgroupEntry(hid, controllers, parts[2]))
    return entries


def cgroup_v2_path(entries: list[CgroupEntry]) -> str | None:
    """The unified-hierarchy path of a process, or None when it has none."""
    for e in entries:
        if e.hierarchy_id == 0 and not e.controllers:
            return e.path
    return None


def cgroup_under(path: str | None, prefix: str) -> bool:
    """Whether cgroup v2 path ``path`` ("/a/b") lies in the subtree of ``prefix`` (itself included).
    A trailing "/" on the prefix is ignored; "/" holds every path; a None path lies nowhere."""
    if path is None:
        return False
    prefix = prefix.rstrip("/") or "/"
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def cgroup_v2_relpath(directory: Path, mounts_text: str) -> str | None:
    """The cgroup v2 path ("/a/b") of a directory under a cgroup2 mount, from /proc/self/mounts text."""
    directory = directory.resolve()
    best: Path | None = None
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            mnt = Path(parts[1])
            if (directory == mnt or mnt in directory.parents) and (best is None or len(mnt.parts) > len(best.parts)):
                best = mnt
    if best is None:
        return None
    rel = directory.relative_to(best).as_posix()
    return "/" if rel == "." else "/" + rel


def cgroup2_mount(mounts_text: str) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (the first cgroup2 line of /proc/self/mounts), or None."""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def subtree_pids(directory: Path) -> set[int]:
    """Pids in a cgroup v2 directory and all its descendants (``cgroup.procs`` of each). A directory
    that vanishes or cannot be read while walking is skipped: cgroups come and go.

    A cgroup directory's link count is 2 plus its number of child cgroups (kernfs), so a leaf costs one
    stat instead of a directory listing: ~45 us for a leaf here, against ~75 us with os.walk. Any other
    count is listed (btrfs, say, reports 1 for every directory of a fake tree)."""
    pids: set[int] = set()
    stack = [str(directory)]
    while stack:
        cur = stack.pop()
        try:
            with open(cur + "/cgroup.procs") as fh:
                pids.update(int(x) for x in fh.read().split())
            if os.stat(cur).st_nlink != 2:
                with os.scandir(cur) as it:
                    stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except (OSError, ValueError):
            continue
    return pids


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into ``{"MemAvailable": kib, ...}`` (HugePages_* counts are unitless)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            out[key.strip()] = int(value.split()[0])
        except (ValueError, IndexError):
            raise ProcParseError(f"meminfo: {key.strip()} is not a number: {value.strip()!r}") from None
    return out


def parse_mem_available(text: str) -> int | None:
    """The MemAvailable value (KiB) of a /proc/meminfo text, or None when the line is absent."""
    at = text.find("MemAvailable:")
    if at < 0:
        return None
    end = text.find("\n", at)
    fields = text[at + 13 : end if end >= 0 else None].split()
    try:
        return int(fields[0])
    except (ValueError, IndexError):
        raise ProcParseError(f"meminfo: MemAvailable is not a number: {fields!r}") from None


def parse_pcp_pages(zoneinfo: str) -> int:
    """Pages parked on the per-CPU free lists (sum of ``count:`` under every zone's ``pagesets``).

    Freed pages go to these lists first and are not counted in MemFree/MemAvailable until drained;
    since Linux 6.7 their size is auto-tuned and here held 360 MiB after a few kills, so a measure of
    "memory came back" must add them."""
    # Split on the key rather than walk ~200 lines: this runs on the kill path, before SIGKILL.
    total = 0
    for chunk in zoneinfo.split("count:")[1:]:
        first = chunk.split(None, 1)
        try:
            total += int(first[0])
        except (ValueError, IndexError):
            raise ProcParseError(f"zoneinfo: bad pageset count {chunk[:20]!r}") from None
    return total


@dataclass(frozen=True, slots=True)
class PsiLine:
    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True, slots=True)
class Psi:
    some: PsiLine
    full: PsiLine | None  # cpu pressure had no "full" line before 5.13


def parse_pressure(text: str) -> Psi:
    """Parse a PSI file (/proc/pressure/memory or a cgroup's memory.pressure)."""
    lines: dict[str, PsiLine] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        fields = dict(p.split("=", 1) for p in rest.split() if "=" in p)
        try:
            lines[kind] = PsiLine(
                avg10=float(fields["avg10"]),
                avg60=float(fields["avg60"]),
                avg300=float(fields["avg300"]),
                total_us=int(fields["total"]),
            )
        except (KeyError, ValueError) as exc:
            raise ProcParseError(f"pressure: bad {kind!r} line ({exc}): {line[:100]!r}") from None
    if "some" not in lines:
        raise ProcParseError("pressure: no 'some' line")
    return Psi(some=lines["some"], full=lines.get("full"))


def parse_loadavg_last_pid(text: str) -> int:
    """The last pid allocated, from /proc/loadavg ("0.1 0.2 0.3 2/97 11537")."""
    fields = text.split()
    try:
        return int(fields[4])
    except (IndexError, ValueError):
        raise ProcParseError(f"loadavg: no last-pid field in {text.strip()[:60]!r}") from None


def count_maps_lines(text: str) -> int:
    """Number of VMAs in a /proc/PID/maps text."""
    return sum(1 for line in text.splitlines() if line.strip())


_READ_CHUNK = 16384


class ProcFs:
    """Reads /proc (or a fake tree) under ``root``. Errors for a vanished pid propagate
    (FileNotFoundError or ProcessLookupError); parse errors raise ProcParseError.

    Paths are built as strings, not pathlib objects: a candidate refresh reads thousands of small files
    and pathlib's per-call overhead was most of its cost (measured in benchmarks/decision_latency.py)."""

    def __init__(self, root: Path = Path("/proc")) -> None:
        self.root = root
        self._root = str(root)

    def _read(self, path: str) -> str:
        # os.open/os.read, not open(): a decision reads ~20 small files, and the text layer (buffer, decoder,
        # newline translation) was half of each read's ~15 us (benchmarks/decision_latency.py).
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except ProcessLookupError:
            # Reading a file of a process that is exiting can give ESRCH; same as vanished.
            raise FileNotFoundError(path) from None
        try:
            data = os.read(fd, _READ_CHUNK)
            if len(data) == _READ_CHUNK:  # a larger file (zoneinfo, a long cmdline): read to the end
                parts = [data]
                while chunk := os.read(fd, _READ_CHUNK):
                    parts.append(chunk)
                data = b"".join(parts)
        except ProcessLookupError:
            raise FileNotFoundError(path) from None
        finally:
            os.close(fd)
        return data.decode(errors="replace")

    def _pid_file(self, pid: int, name: str) -> str:
        return f"{self._root}/{pid}/{name}"

    def pids(self) -> Iterator[int]:
        """Thread-group ids present now (the numeric entries of the root)."""
        for name in os.listdir(self._root):
            if name.isdigit():
                yield int(name)

    def stat(self, pid: int) -> ProcStat:
        return parse_stat(self._read(self._pid_file(pid, "stat")))

    def status(self, pid: int) -> ProcStatus:
        return parse_status(self._read(self._pid_file(pid, "status")))

    def rss_swap_kib(self, pid: int) -> tuple[int | None, int | None]:
        """(VmRSS, VmSwap) in KiB from /proc/PID/status, read without a full parse."""
        text = self._read(self._pid_file(pid, "status"))
        return parse_status_kib(text, "VmRSS"), parse_status_kib(text, "VmSwap")

    def oom_score_adj(self, pid: int) -> int:
        return parse_oom_score_adj(self._read(self._pid_file(pid, "oom_score_adj")))

    def cmdline(self, pid: int) -> list[str]:
        path = self._pid_file(pid, "cmdline")
        try:
            with open(path, "rb") as fh:
                return parse_cmdline(fh.read())
        except ProcessLookupError:
            raise FileNotFoundError(path) from None

    def exe(self, pid: int) -> str:
        """The executable's path (see parse_exe_link). Raises FileNotFoundError for kernel threads and
        vanished processes, PermissionError for another user's process without CAP_SYS_PTRACE (the
        kernel checks ptrace_may_access(PTRACE_MODE_READ_FSCREDS))."""
        path = self._pid_file(pid, "exe")
        try:
            return parse_exe_link(os.readlink(path))
        except ProcessLookupError:
            raise FileNotFoundError(path) from None

    def uid(self, pid: int) -> int:
        """Owner of the process' /proc directory (its effective uid at exec)."""
        return os.stat(f"{self._root}/{pid}").st_uid

    def cgroup(self, pid: int) -> list[CgroupEntry]:
        return parse_cgroup(self._read(self._pid_file(pid, "cgroup")))

    def vma_count(self, pid: int) -> int:
        return count_maps_lines(self._read(self._pid_file(pid, "maps")))

    def meminfo(self) -> dict[str, int]:
        return parse_meminfo(self._read(f"{self._root}/meminfo"))

    def mem_available_kib(self) -> int | None:
        """MemAvailable alone: sampled every few ms during a kill, so no full parse."""
        return parse_mem_available(self._read(f"{self._root}/meminfo"))

    def pcp_free_kib(self) -> int:
        """KiB on the per-CPU free lists (see parse_pcp_pages)."""
        return parse_pcp_pages(self._read(f"{self._root}/zoneinfo")) * PAGE_KIB

    def free_memory_kib(self) -> int | None:
        """Free memory as lmkd-py measures it everywhere (kill, floor, observe): MemAvailable plus the
        pages on the per-CPU free lists, which MemAvailable misses (360 MiB of them seen on 6.18 after a
        few kills). None when meminfo has no MemAvailable. Raises OSError or ProcParseError when
        meminfo or zoneinfo cannot be read."""
        avail = self.mem_available_kib()
        if avail is None:
            return None
        return avail + self.pcp_free_kib()

    def last_pid(self) -> int:
        """The pid the kernel allocated last (the fifth field of /proc/loadavg)."""
        return parse_loadavg_last_pid(self._read(f"{self._root}/loadavg"))

    def pid_max(self) -> int:
        try:
            return int(self._read(f"{self._root}/sys/kernel/pid_max").strip())
        except (OSError, ValueError):
            return 4_194_304  # PID_MAX_LIMIT on 64-bit: an upper bound that is always safe

    def free_and_total_kib(self) -> tuple[int, int] | None:
        """(free memory as ``free_memory_kib`` counts it, MemTotal) in KiB, or None when unreadable:
        what the memory floor compares."""
        try:
            free = self.free_memory_kib()
            total = self.meminfo().get("MemTotal")
        except (OSError, ProcParseError):
            return None
        return (free, total) if free is not None and total is not None else None

    def pressure(self, resource: str = "memory") -> Psi:
        return parse_pressure(self._read(f"{self._root}/pressure/{resource}"))


# -- decision signals: vmstat, zoneinfo watermarks, zram, memcg files (used by signals.py, headroom.py) --

VMSTAT_KEYS = frozenset({
    "nr_inactive_file", "nr_active_file", "workingset_refault", "workingset_refault_file",
    "pgscan_kswapd", "pgscan_direct", "allocstall_dma", "allocstall_dma32", "allocstall_normal",
    "allocstall_movable", "allocstall_device",
})


def parse_vmstat(text: str, keys: frozenset[str] | None = VMSTAT_KEYS) -> dict[str, int]:
    """Parse /proc/vmstat (``name value`` lines) into ``{name: value}``, keeping only ``keys`` (all
    when None). Counters are pages or events, as the kernel names them. Built for the adaptive check:
    one split per line, no regex (~75 us for the ~190 lines of 6.18 here, measured)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if keys is not None and name not in keys:
            continue
        try:
            out[name] = int(value)
        except ValueError:
            raise ProcParseError(f"vmstat: {name} is not a number: {value!r}") from None
    return out


@dataclass(frozen=True, slots=True)
class Watermarks:
    """Zone watermarks summed over populated zones, in pages (lmkd's ``calc_zone_watermarks``)."""

    min_pages: int
    low_pages: int
    high_pages: int


def parse_zoneinfo_watermarks(text: str) -> Watermarks:
    """Sum the min/low/high watermarks of every zone with ``present`` pages, each raised by the zone's
    largest lowmem reserve (the max of its ``protection:`` array), as Android lmkd does: free pages
    must clear the reserve too before an allocation from a higher zone may use them
    (mm/page_alloc.c, __zone_watermark_ok). Raises ProcParseError when no zone has watermarks."""
    zones: list[dict[str, int]] = []
    for line in text.splitlines():
        if line.startswith("Node "):
            zones.append({})
            continue
        if not zones:
            continue
        stripped = line.strip()
        name, _, value = stripped.partition(" ")
        zone = zones[-1]
        if name in ("min", "low", "high", "present") and name not in zone:
            try:
                zone[name] = int(value)
            except ValueError:
                raise ProcParseError(f"zoneinfo: {name} is not a number: {value.strip()!r}") from None
        elif name == "protection:" and "protection" not in zone:
            try:
                zone["protection"] = max((int(x) for x in value.strip(" ()").split(",") if x.strip()), default=0)
            except ValueError:
                raise ProcParseError(f"zoneinfo: bad protection {value.strip()!r}") from None
    wm = [0, 0, 0]
    seen = False
    for zone in zones:
        if not zone.get("present") or "high" not in zone:
            continue
        seen = True
        reserve = zone.get("protection", 0)
        for i, key in enumerate(("min", "low", "high")):
            wm[i] += zone.get(key, 0) + reserve
    if not seen:
        raise ProcParseError("zoneinfo: no populated zone with watermarks")
    return Watermarks(*wm)


@dataclass(frozen=True, slots=True)
class ZramMmStat:
    """/sys/block/zramN/mm_stat (Documentation/admin-guide/blockdev/zram.rst), sizes in bytes."""

    orig_data_bytes: int  # uncompressed size of the data stored
    compr_data_bytes: int  # compressed size of it
    mem_used_total_bytes: int  # memory allocated for it, incl. allocator overhead
    mem_limit_bytes: int  # 0: no limit


def parse_zram_mm_stat(text: str) -> ZramMmStat:
    """Parse a zram ``mm_stat`` line (at least four numeric columns)."""
    fields = text.split()
    try:
        nums = [int(x) for x in fields[:4]]
    except ValueError:
        raise ProcParseError(f"zram mm_stat: non-numeric column in {text.strip()[:80]!r}") from None
    if len(nums) < 4:
        raise ProcParseError(f"zram mm_stat: {len(nums)} columns, expected at least 4")
    return ZramMmStat(*nums)


@dataclass(frozen=True, slots=True)
class SwapDevice:
    name: str  # the path as /proc/swaps shows it, e.g. /dev/zram0
    size_kib: int
    used_kib: int

    @property
    def zram(self) -> str | None:
        """The zram device name (``zram0``) when this swap area is on zram, else None."""
        base = self.name.rsplit("/", 1)[-1]
        return base if base.startswith("zram") else None


def parse_swaps(text: str) -> list[SwapDevice]:
    """Parse /proc/swaps (a header, then ``Filename Type Size Used Priority`` lines, sizes in KiB)."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        try:
            out.append(SwapDevice(fields[0], int(fields[2]), int(fields[3])))
        except (ValueError, IndexError):
            raise ProcParseError(f"swaps: bad line {line[:80]!r}") from None
    return out


# The v1 "unlimited" value: PAGE_COUNTER_MAX pages, i.e. LONG_MAX rounded down to a page
# (mm/page_counter.c); anything this large means no limit.
MEMCG_UNLIMITED_BYTES = 1 << 62


def parse_memcg_bytes(text: str) -> int | None:
    """A memcg size file in bytes: v1 ``memory.limit_in_bytes``/``usage_in_bytes`` or v2
    ``memory.current``/``memory.max``. None for no limit (v2 ``max``, v1 PAGE_COUNTER_MAX)."""
    value = text.strip()
    if value == "max":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ProcParseError(f"memcg: not a size: {value[:40]!r}") from None
    return None if n >= MEMCG_UNLIMITED_BYTES else n


def parse_flat_keyed(text: str) -> dict[str, int]:
    """A cgroup "flat keyed" file (``key value`` lines: memory.stat, memory.events; cgroup-v2.rst
    "Interface Files"). memory.stat values are bytes, memory.events values counts."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if not value:
            continue
        try:
            out[key] = int(value)
        except ValueError:
            raise ProcParseError(f"cgroup file: {key} is not a number: {value.strip()[:40]!r}") from None
    return out


def memcg_v1_path(entries: list[CgroupEntry]) -> str | None:
    """The cgroup v1 memory controller path of a process (``4:memory:/a/b`` -> ``/a/b``), or None
    when the memory controller is not mounted as v1."""
    for e in entries:
        if e.hierarchy_id != 0 and "memory" in e.controllers:
            return e.path
    return None
