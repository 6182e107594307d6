"""Pure parsers for a shape: ``/proc/PID/smaps`` entries, the VMA class of each, and the devices of
tmpfs and hugetlbfs mounts from ``/proc/PID/mountinfo``. No I/O.

smaps (Documentation/filesystems/proc.rst): each VMA is a header line
``start-end perms offset major:minor inode [pathname]`` followed by ``Key: value kB`` lines and a final
``VmFlags:`` line. The pathname may hold spaces and ends in `` (deleted)`` for an unlinked file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

# Header: the pathname is everything after the inode (it may contain spaces).
_HEADER = re.compile(r"([0-9a-f]+)-([0-9a-f]+) ([r-][w-][x-][ps]) [0-9a-f]+ ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)")
SPECIAL_NAMES: Final = frozenset({"[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]", "[sigpage]",
                                  "[vectors]"})
# Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS) lives on the kernel's internal shmem mount; older
# kernels name it "/dev/zero (deleted)", 6.x with a name set by prctl "[anon_shmem:NAME]".
_ANON_SHARED_NAMES: Final = ("/dev/zero (deleted)", "/dev/zero", "[anon_shmem")
# memfd_create() files and SysV segments are shmem objects without a mount in mountinfo.
_SHMEM_NAMES: Final = ("/memfd:", "/SYSV")


class SmapsParseError(ValueError):
    """An smaps text this parser cannot read; the message names the line."""


@dataclass(frozen=True)
class SmapsVma:
    """One VMA of ``/proc/PID/smaps``; ``kib`` holds its ``Key: N kB`` fields, ``flags`` its VmFlags."""

    start: int
    end: int
    perms: str  # "rw-p"
    dev: tuple[int, int]
    inode: int
    path: str | None
    kib: dict[str, int] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()

    @property
    def size_kib(self) -> int:
        return (self.end - self.start) // 1024

    def get(self, key: str) -> int:
        return self.kib.get(key, 0)


def parse_smaps(text: str) -> list[SmapsVma]:
    """Every VMA in ``text``, in address order. Raises SmapsParseError on a line that is neither a
    header nor a field (a truncated last entry is kept with the fields it has)."""
    out: list[SmapsVma] = []
    cur: dict[str, object] | None = None

    def flush() -> None:
        if cur is not None:
            out.append(SmapsVma(**cur))  # type: ignore[arg-type]

    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        m = _HEADER.fullmatch(line)
        if m:
            flush()
            start, end, perms, major, minor, inode, path = m.groups()
            cur = {"start": int(start, 16), "end": int(end, 16), "perms": perms,
                   "dev": (int(major, 16), int(minor, 16)), "inode": int(inode), "path": path or None,
                   "kib": {}, "flags": frozenset()}
            continue
        key, sep, value = line.partition(":")
        if not sep or cur is None:
            raise SmapsParseError(f"line {n}: not an smaps header or field: {line[:80]!r}")
        if key == "VmFlags":
            cur["flags"] = frozenset(value.split())
            continue
        parts = value.split()
        if parts and parts[0].isdigit():
            kib = cur["kib"]
            assert isinstance(kib, dict)
            kib[key] = int(parts[0])
    flush()
    return out


def parse_mountinfo_devices(text: str) -> dict[tuple[int, int], str]:
    """``{(major, minor): fstype}`` of every mount in a ``/proc/PID/mountinfo`` text (proc(5): field 3
    is major:minor, the filesystem type follows the `` - `` separator). Bad lines are skipped."""
    out: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or " - " not in line:
            continue
        major, sep, minor = fields[2].partition(":")
        after = line.split(" - ", 1)[1].split()
        if not sep or not after or not major.isdigit() or not minor.isdigit():
            continue
        out[(int(major), int(minor))] = after[0]
    return out


def classify(vma: SmapsVma, fstypes: dict[tuple[int, int], str], page_size: int) -> str:
    """The shape class of ``vma`` (one of model.CLASSES). ``fstypes`` maps devices to filesystem types
    (tmpfs files shared -> shmem, hugetlbfs -> hugetlb); with an empty map, names decide alone."""
    path = vma.path or ""
    shared = vma.perms[3] == "s"
    if "ht" in vma.flags or fstypes.get(vma.dev) == "hugetlbfs" or vma.get("KernelPageSize") > page_size // 1024:
        return "hugetlb"
    if path == "[heap]":
        return "heap"
    if path == "[stack]":
        return "stack"
    if path in SPECIAL_NAMES:
        return "special"
    if path.startswith(_ANON_SHARED_NAMES):
        return "anon_shared"
    if vma.inode == 0 and (not path or path.startswith("[")):
        # Anonymous: no file at all, or a name set with prctl(PR_SET_VMA_ANON_NAME) ("[anon:NAME]").
        return "anon_shared" if shared else "anon_private"
    shmem_file = path.startswith(_SHMEM_NAMES) or fstypes.get(vma.dev) == "tmpfs"
    if shared:
        return "shmem" if shmem_file else "file_shared"
    # A private mapping of a tmpfs file is copy-on-write over shmem pages: it behaves as a private file
    # mapping (its clean pages are the file's, its written ones anonymous).
    return "file_private"
