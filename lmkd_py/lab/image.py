"""Deterministic initramfs archives (cpio "newc", gzip) and an ELF ``DT_NEEDED`` reader.

The same inputs always give the same bytes: entries sorted by path, every mtime 0, uid/gid 0,
inode numbers counted in path order, hard links written as separate files, and a gzip header with
mtime 0 and no file name. So two builds from the same cache can be compared by sha256.

The ELF reader exists because the guest's binaries are arm64 and ``ldd`` cannot run them here; it
reads the dynamic section (64-bit little-endian only, which is what arm64 Debian ships).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

NEWC_MAGIC: Final = b"070701"
TRAILER: Final = "TRAILER!!!"
S_IFCHR: Final = 0o020000


@dataclass(frozen=True)
class Entry:
    """One archive member. ``path`` is relative, without a leading slash. Exactly one of ``data``
    (regular file), ``target`` (symlink) is set, or ``rdev`` for a character device; none for a dir."""

    path: str
    mode: int  # full st_mode, type bits included
    data: bytes | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None


def _header(ino: int, e: Entry, filesize: int) -> bytes:
    name = e.path.encode() + b"\0"
    major, minor = e.rdev if e.rdev is not None else (0, 0)
    fields = (ino, e.mode, 0, 0, 1, 0, filesize, 0, 0, major, minor, len(name), 0)
    head = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    return head + name + b"\0" * (-(len(head) + len(name)) % 4)


def write_newc(entries: Iterable[Entry], out: BinaryIO) -> None:
    """Write ``entries`` (in the order given) and the trailer as a newc archive."""
    for ino, e in enumerate(entries, start=1):
        body = e.data if e.data is not None else (e.target.encode() if e.target is not None else b"")
        out.write(_header(ino, e, len(body)))
        out.write(body)
        out.write(b"\0" * (-len(body) % 4))
    out.write(_header(0, Entry(TRAILER, 0), 0))


def read_newc(data: bytes) -> Iterator[Entry]:
    """Parse a newc archive (tests and inspection). Raises ValueError on a bad header."""
    pos = 0
    while pos < len(data):
        if data[pos : pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad newc magic at offset {pos}")
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == TRAILER:
            return
        if stat.S_ISLNK(mode):
            yield Entry(name, mode, target=body.decode())
        elif stat.S_ISREG(mode):
            yield Entry(name, mode, data=bytes(body))
        elif stat.S_ISCHR(mode):
            yield Entry(name, mode, rdev=(rmaj, rmin))
        else:
            yield Entry(name, mode)


def gzip_bytes(raw: bytes, level: int = 6) -> bytes:
    """gzip with a fixed header (mtime 0, no name), so equal input gives equal output."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=level) as gz:
        gz.write(raw)
    return buf.getvalue()


def tree_entries(root: Path, prefix: str = "") -> list[Entry]:
    """Entries for everything under ``root`` (directories, files, symlinks), with permission bits as
    found and all else normalised. Sorted by path."""
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in [*dirnames, *sorted(filenames)]:
            p = base / name
            rel = (prefix + "/" if prefix else "") + str(p.relative_to(root))
            st = p.lstat()
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry(rel, stat.S_IFLNK | 0o777, target=os.readlink(p)))
            elif stat.S_ISDIR(st.st_mode):
                out.append(Entry(rel, stat.S_IFDIR | perm))
            elif stat.S_ISREG(st.st_mode):
                out.append(Entry(rel, stat.S_IFREG | perm, data=p.read_bytes()))
    return sorted(out, key=lambda e: e.path)


def with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` plus a 0755 directory for every parent that has none, sorted by path (a parent
    sorts before its children). A later entry for the same path replaces an earlier one."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        by_path[e.path] = e
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            by_path.setdefault(parent, Entry(parent, stat.S_IFDIR | 0o755))
    return [by_path[p] for p in sorted(by_path)]


# --- ELF -----------------------------------------------------------------------------------------

DT_NEEDED: Final = 1
DT_SONAME: Final = 14
SHT_DYNAMIC: Final = 6


def elf_dynamic(data: bytes) -> tuple[list[str], str | None] | None:
    """``(needed sonames, own soname)`` of a 64-bit little-endian ELF file; None if ``data`` is not
    one or has no dynamic section (a static binary). Raises ValueError on a truncated file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    try:
        shoff = struct.unpack_from("<Q", data, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    except struct.error as exc:
        raise ValueError(f"truncated ELF section table: {exc}") from exc
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if sh_type != SHT_DYNAMIC:
            continue
        str_off, str_size = sections[link][4], sections[link][5]
        strtab = data[str_off : str_off + str_size]

        def string(i: int, tab: bytes = strtab) -> str:
            return tab[i : tab.index(b"\0", i)].decode()

        needed: list[str] = []
        soname: str | None = None
        for pos in range(offset, offset + size, entsize or 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                needed.append(string(val))
            elif tag == DT_SONAME:
                soname = string(val)
        return needed, soname
    return None


def unresolved_libraries(files: dict[str, bytes], lib_dirs: Iterable[str]) -> dict[str, list[str]]:
    """For every ELF among ``files`` (path -> content; symlinks given as the target's content), the
    NEEDED sonames that no file in ``lib_dirs`` provides. Only paths with a problem are returned."""
    dirs = [d.strip("/") for d in lib_dirs]
    have = {p.rsplit("/", 1)[-1] for p in files if p.rsplit("/", 1)[0] in dirs}
    out: dict[str, list[str]] = {}
    for path, data in files.items():
        dyn = elf_dynamic(data)
        if dyn is None:
            continue
        missing = [n for n in dyn[0] if n not in have]
        if missing:
            out[path] = missing
    return out
