"""What a memory shape is, and the one reader of shape files (which are untrusted input).

A shape is a process's memory without its contents or (unless asked) its file names: one entry per VMA
(class, protection, size, resident, dirty, swapped, THP and locked KiB, which of the class's files it
maps), the thread count, a few totals from ``/proc/PID/status``, and where it was captured. Pure: no
I/O here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

FORMAT: Final = "lmkd-py-shape"
VERSION: Final = 1

# The VMA classes, in the order tables show them. ``special`` holds what the kernel gives every process
# ([vdso], [vvar], [vsyscall], [uprobes]): counted, never replayed (the replica has its own).
CLASSES: Final = ("anon_private", "anon_shared", "file_private", "file_shared", "shmem", "heap", "stack",
                  "hugetlb", "special")
# Classes whose VMAs a replica maps itself; heap and stack are grown instead, special is the kernel's.
MAPPED_CLASSES: Final = ("anon_private", "anon_shared", "file_private", "file_shared", "shmem", "hugetlb")
FILE_CLASSES: Final = ("file_private", "file_shared", "shmem")

# Bounds for untrusted files. vm.max_map_count defaults to 65530; a machine may raise it, so the file
# format allows more and the replay checks the machine's own limit.
MAX_FILE_BYTES: Final = 64 << 20
MAX_VMAS: Final = 262_144
MAX_THREADS: Final = 65_536
MAX_VMA_KIB: Final = 1 << 36  # 64 TiB: more than any user address space holds in one VMA
MAX_TEXT: Final = 256
MAX_UNREADABLE: Final = 64
PAGE_SIZES: Final = tuple(1 << n for n in range(12, 21))  # 4 KiB .. 1 MiB
_PROT = re.compile(r"[r-][w-][x-]")
VMA_KIB_FIELDS: Final = ("size_kib", "rss_kib", "dirty_kib", "swap_kib", "thp_kib", "locked_kib")
STATUS_FIELDS: Final = ("vm_rss_kib", "rss_anon_kib", "rss_file_kib", "rss_shmem_kib", "vm_swap_kib",
                        "vm_lck_kib", "vm_pte_kib", "hugetlb_kib")


class ShapeError(ValueError):
    """A shape file that cannot be used; the message names the field (``vmas[12].rss_kib``) and why."""


@dataclass(frozen=True)
class ShapeVma:
    """One VMA: all sizes in KiB. ``file`` numbers the distinct files of its class (0, 1, ...), None for
    memory without a file; ``path`` is the file's name only when captured with ``--keep-paths``."""

    cls: str
    prot: str  # "rw-", "r-x", "---"
    size_kib: int
    rss_kib: int = 0
    dirty_kib: int = 0
    swap_kib: int = 0
    thp_kib: int = 0
    locked_kib: int = 0
    file: int | None = None
    path: str | None = None


@dataclass(frozen=True)
class ShapeProvenance:
    """Where and from what a shape was captured. ``page_size`` in bytes; ``hugepage_kib`` is the PMD
    (THP) size of the capturing machine."""

    comm: str | None
    kernel: str
    arch: str
    page_size: int
    hugepage_kib: int | None = None
    captured_at: str | None = None
    lmkd_py_version: str | None = None
    paths_kept: bool = False
    thp_enabled: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class ClassSummary:
    """The totals of one class (KiB), and its size distribution as ``{upper bound KiB: VMAs}`` in powers
    of two (a 12 KiB VMA counts under 16)."""

    vmas: int = 0
    files: int = 0
    size_kib: int = 0
    rss_kib: int = 0
    dirty_kib: int = 0
    swap_kib: int = 0
    thp_kib: int = 0
    locked_kib: int = 0
    size_histogram: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    provenance: ShapeProvenance
    threads: int
    vmas: tuple[ShapeVma, ...]
    status: Mapping[str, int | None] = field(default_factory=dict)
    unreadable: tuple[str, ...] = ()

    def summary(self) -> dict[str, ClassSummary]:
        """Per class (every class in CLASSES, empty ones too)."""
        return summarise(self.vmas)

    @property
    def rss_kib(self) -> int:
        return sum(v.rss_kib for v in self.vmas)


def size_bucket(size_kib: int) -> int:
    """The power of two (KiB) at or above ``size_kib``; 4 for anything up to 4 KiB."""
    return max(4, 1 << max(0, math.ceil(math.log2(max(1, size_kib)))))


def summarise(vmas: Iterable[ShapeVma]) -> dict[str, ClassSummary]:
    acc: dict[str, dict[str, int]] = {c: dict.fromkeys(VMA_KIB_FIELDS, 0) | {"vmas": 0} for c in CLASSES}
    files: dict[str, set[int]] = {c: set() for c in CLASSES}
    hist: dict[str, dict[int, int]] = {c: {} for c in CLASSES}
    for v in vmas:
        a = acc[v.cls]
        a["vmas"] += 1
        for name in VMA_KIB_FIELDS:
            a[name] += getattr(v, name)
        if v.file is not None:
            files[v.cls].add(v.file)
        b = size_bucket(v.size_kib)
        hist[v.cls][b] = hist[v.cls].get(b, 0) + 1
    return {c: ClassSummary(files=len(files[c]), size_histogram=dict(sorted(hist[c].items())), **acc[c])
            for c in CLASSES}


# --- JSON ----------------------------------------------------------------------------------------------


def shape_to_dict(shape: Shape) -> dict[str, Any]:
    """The file's JSON object. ``classes`` is derived (for people and for a check on reading)."""
    classes = {}
    for name, s in shape.summary().items():
        if s.vmas:
            classes[name] = {"vmas": s.vmas, "files": s.files, "size_kib": s.size_kib, "rss_kib": s.rss_kib,
                             "dirty_kib": s.dirty_kib, "swap_kib": s.swap_kib, "thp_kib": s.thp_kib,
                             "locked_kib": s.locked_kib,
                             "size_histogram_kib": {str(k): n for k, n in s.size_histogram.items()}}
    vmas = []
    for v in shape.vmas:
        d: dict[str, Any] = {"class": v.cls, "prot": v.prot}
        for name in VMA_KIB_FIELDS:
            value = getattr(v, name)
            if value or name == "size_kib":
                d[name] = value
        if v.file is not None:
            d["file"] = v.file
        if v.path is not None:
            d["path"] = v.path
        vmas.append(d)
    p = shape.provenance
    return {
        "format": FORMAT, "version": VERSION,
        "provenance": {"comm": p.comm, "kernel": p.kernel, "arch": p.arch, "page_size": p.page_size,
                       "hugepage_kib": p.hugepage_kib, "captured_at": p.captured_at,
                       "lmkd_py_version": p.lmkd_py_version, "paths_kept": p.paths_kept,
                       "thp_enabled": p.thp_enabled, "note": p.note},
        "threads": shape.threads,
        "status": dict(shape.status),
        "unreadable": list(shape.unreadable),
        "classes": classes,
        "vmas": vmas,
    }


def dumps(shape: Shape) -> str:
    """The shape as JSON text: one VMA per line, so a diff of two captures reads line by line."""
    doc = shape_to_dict(shape)
    vmas = doc.pop("vmas")
    head = json.dumps(doc, indent=1, sort_keys=False)
    body = ",\n".join("  " + json.dumps(v, separators=(",", ":")) for v in vmas)
    return head[:-2] + ',\n "vmas": [\n' + body + "\n ]\n}\n"


def _int(obj: Mapping[str, Any], key: str, where: str, lo: int, hi: int, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{where}{key}: must be an integer, not {value!r:.60}")
    if not lo <= value <= hi:
        raise ShapeError(f"{where}{key}: {value} is outside {lo}..{hi}")
    return value


def _text(obj: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ShapeError(f"{where}{key}: must be a string of at most {MAX_TEXT} characters")
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ShapeError(f"{where}: must be a JSON object")
    return value


def _vma(obj: Any, i: int) -> ShapeVma:
    where = f"vmas[{i}]."
    d = _object(obj, f"vmas[{i}]")
    cls = d.get("class")
    if cls not in CLASSES:
        raise ShapeError(f"{where}class: {cls!r:.40} is not one of {', '.join(CLASSES)}")
    prot = d.get("prot")
    if not isinstance(prot, str) or not _PROT.fullmatch(prot):
        raise ShapeError(f"{where}prot: {prot!r:.20} is not like 'rw-' or 'r-x'")
    kib = {name: _int(d, name, where, 0, MAX_VMA_KIB, 0) for name in VMA_KIB_FIELDS}
    if kib["size_kib"] < 1:
        raise ShapeError(f"{where}size_kib: must be at least 1")
    for name in ("rss_kib", "swap_kib", "locked_kib"):
        if kib[name] > kib["size_kib"]:
            raise ShapeError(f"{where}{name}: {kib[name]} is larger than size_kib {kib['size_kib']}")
    for name in ("dirty_kib", "thp_kib"):
        if kib[name] > kib["rss_kib"]:
            raise ShapeError(f"{where}{name}: {kib[name]} is larger than rss_kib {kib['rss_kib']}")
    if kib["rss_kib"] + kib["swap_kib"] > kib["size_kib"]:
        raise ShapeError(f"{where}swap_kib: resident plus swapped exceeds size_kib {kib['size_kib']}")
    file_no = d.get("file")
    if file_no is not None:
        file_no = _int(d, "file", where, 0, MAX_VMAS)
    elif cls in FILE_CLASSES:
        raise ShapeError(f"{where}file: a {cls} VMA needs the number of the file it maps")
    return ShapeVma(cls=cls, prot=prot, file=file_no, path=_text(d, "path", where), **kib)


def shape_from_dict(doc: Any) -> Shape:
    """Check and build a Shape from a parsed file. Raises ShapeError naming the field."""
    d = _object(doc, "shape")
    if d.get("format") != FORMAT:
        raise ShapeError(f"format: {d.get('format')!r:.40} is not {FORMAT!r} (not a shape file)")
    if d.get("version") != VERSION:
        raise ShapeError(f"version: {d.get('version')!r:.20} is not supported (this lmkd-py reads {VERSION})")
    p = _object(d.get("provenance"), "provenance")
    page_size = _int(p, "page_size", "provenance.", 0, 1 << 20)
    if page_size not in PAGE_SIZES:
        raise ShapeError(f"provenance.page_size: {page_size} is not a power of two from 4096 to 1 MiB")
    hp = p.get("hugepage_kib")
    prov = ShapeProvenance(
        comm=_text(p, "comm", "provenance."), kernel=_text(p, "kernel", "provenance.", required=True) or "",
        arch=_text(p, "arch", "provenance.", required=True) or "", page_size=page_size,
        hugepage_kib=None if hp is None else _int(p, "hugepage_kib", "provenance.", 4, 1 << 30),
        captured_at=_text(p, "captured_at", "provenance."), lmkd_py_version=_text(p, "lmkd_py_version", "provenance."),
        paths_kept=bool(p.get("paths_kept", False)), thp_enabled=_text(p, "thp_enabled", "provenance."),
        note=_text(p, "note", "provenance."),
    )
    threads = _int(d, "threads", "", 1, MAX_THREADS)
    raw_vmas = d.get("vmas")
    if not isinstance(raw_vmas, list) or not raw_vmas:
        raise ShapeError("vmas: must be a non-empty list")
    if len(raw_vmas) > MAX_VMAS:
        raise ShapeError(f"vmas: {len(raw_vmas)} VMAs, more than the {MAX_VMAS} a shape may hold")
    vmas = tuple(_vma(v, i) for i, v in enumerate(raw_vmas))
    status_in = _object(d.get("status", {}), "status")
    status: dict[str, int | None] = {}
    for name in STATUS_FIELDS:
        status[name] = None if status_in.get(name) is None else _int(status_in, name, "status.", 0, MAX_VMA_KIB)
    unreadable = d.get("unreadable", [])
    if not isinstance(unreadable, list) or len(unreadable) > MAX_UNREADABLE:
        raise ShapeError(f"unreadable: must be a list of at most {MAX_UNREADABLE} strings")
    notes = tuple(_text({"u": u}, "u", "unreadable[].") or "" for u in unreadable)
    shape = Shape(provenance=prov, threads=threads, vmas=vmas, status=status, unreadable=notes)
    _check_classes(d.get("classes"), shape)
    return shape


def _check_classes(classes: Any, shape: Shape) -> None:
    """The file's ``classes`` must agree with its VMAs (an edited file that says one thing and holds
    another is refused rather than replayed as either)."""
    if classes is None:
        return
    given = _object(classes, "classes")
    derived = shape.summary()
    for name, obj in given.items():
        if name not in CLASSES:
            raise ShapeError(f"classes.{name!s:.40}: not a VMA class ({', '.join(CLASSES)})")
        o = _object(obj, f"classes.{name}")
        for key in ("vmas", "rss_kib", "size_kib"):
            if key in o and o[key] != getattr(derived[name], key):
                raise ShapeError(f"classes.{name}.{key}: {o[key]!r:.20} but the vmas list adds up to "
                                 f"{getattr(derived[name], key)}")


def loads(text: str | bytes) -> Shape:
    """Parse a shape file's text. Raises ShapeError (too big, not JSON, or a bad field)."""
    if len(text) > MAX_FILE_BYTES:
        raise ShapeError(f"the file is {len(text)} bytes, more than the {MAX_FILE_BYTES} a shape may be")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShapeError(f"not JSON: {exc}") from None
    return shape_from_dict(doc)
