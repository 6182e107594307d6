"""From a shape to what a replica maps on this machine. Pure: the machine's facts come in as arguments.

Two steps. ``target_for`` scales the shape (``--scale``) and adapts it to this machine's page size and
architecture (with a warning when they differ); ``check_fits`` refuses, before anything is allocated,
a target this machine cannot hold. ``replay_plan`` then subtracts what the replica process already has
of its own (its interpreter's libraries, heap, stack, thread stacks: the *baseline*, captured from the
started replica) so that replica = baseline + plan comes out like the target, class by class.

Scaling keeps each VMA's size and multiplies the number of VMAs: a class is sorted by size, largest first,
and VMA i is repeated ``ceil((i+1)F) - ceil(iF)`` times, so the count scales by F and the size
distribution stays that of the original; the class's resident and dirty memory are then set to F times
the original's, spread over the kept VMAs as far as their sizes allow. The heap and the stack (one VMA
each) are scaled in size.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from lmkd_py.shape.model import FILE_CLASSES, MAPPED_CLASSES, Shape, ShapeError, ShapeVma

MAX_SCALE: Final = 64.0
MAX_REPLAY_THREADS: Final = 4096  # the stress family's limit (one Python thread each)
# What the replica's interpreter itself needs on top of the plan (measured: ~12 MiB resident, ~80 VMAs
# for python3.11 with ctypes loaded); the memory check keeps this much spare.
REPLICA_OVERHEAD_KIB: Final = 32 << 10
REPLICA_OVERHEAD_VMAS: Final = 400
AVAILABLE_FRACTION: Final = 0.9  # never plan to use the last tenth of MemAvailable


@dataclass(frozen=True)
class Machine:
    """The facts of the machine a shape is replayed on."""

    arch: str
    page_size: int
    hugepage_kib: int | None = None
    mem_available_kib: int | None = None
    max_map_count: int | None = None
    swap_total_kib: int = 0
    hugetlb_free_kib: int = 0


@dataclass(frozen=True)
class Target:
    """What the replica should look like here: VMAs (page-rounded, scaled), threads, and what was changed
    on the way, for the user."""

    vmas: tuple[ShapeVma, ...]
    threads: int
    warnings: tuple[str, ...] = ()

    def of(self, cls: str) -> list[ShapeVma]:
        return [v for v in self.vmas if v.cls == cls]

    @property
    def rss_kib(self) -> int:
        return sum(v.rss_kib + v.swap_kib for v in self.vmas if v.cls != "special")


def _round_up(kib: int, unit: int) -> int:
    return -(-kib // unit) * unit


def _round(kib: int, unit: int) -> int:
    return round(kib / unit) * unit


def _on_pages(v: ShapeVma, page_kib: int) -> ShapeVma:
    size = max(page_kib, _round_up(v.size_kib, page_kib))
    rss = min(size, _round(v.rss_kib, page_kib))
    return dataclasses.replace(
        v, size_kib=size, rss_kib=rss, dirty_kib=min(rss, _round(v.dirty_kib, page_kib)),
        swap_kib=min(size - rss, _round(v.swap_kib, page_kib)), thp_kib=min(rss, v.thp_kib),
        locked_kib=min(size, _round(v.locked_kib, page_kib)),
    )


def _scale_one(v: ShapeVma, scale: float, page_kib: int) -> ShapeVma:
    def s(kib: int) -> int:
        return round(kib * scale)

    return dataclasses.replace(v, size_kib=max(page_kib, s(v.size_kib)), rss_kib=s(v.rss_kib),
                               dirty_kib=s(v.dirty_kib), swap_kib=s(v.swap_kib), thp_kib=s(v.thp_kib),
                               locked_kib=s(v.locked_kib))


def _scale_class(vmas: Sequence[ShapeVma], scale: float) -> list[ShapeVma]:
    """Stratified repeat/thin of one class (see the module docstring); file numbers are renumbered so
    each copy of a file is a file of its own, numbered from 0."""
    # Largest first with ceil: the largest VMA is always kept, which is where most memory usually is.
    order = sorted(range(len(vmas)), key=lambda i: (-vmas[i].size_kib, -vmas[i].rss_kib, i))
    picked: list[tuple[int, int]] = []  # (index in vmas, copy number)
    for rank, i in enumerate(order):
        copies = math.ceil(round((rank + 1) * scale, 9)) - math.ceil(round(rank * scale, 9))
        picked.extend((i, c) for c in range(copies))
    picked.sort()  # back in address order
    numbers: dict[tuple[int, int], int] = {}
    out = []
    for i, c in picked:
        v = vmas[i]
        if v.file is not None:
            v = dataclasses.replace(v, file=numbers.setdefault((v.file, c), len(numbers)))
        out.append(v)
    return out


def target_for(shape: Shape, machine: Machine, scale: float = 1.0) -> Target:
    """The shape as this machine should replay it. Raises ShapeError for a scale out of (0, 64]."""
    if not (0 < scale <= MAX_SCALE) or math.isnan(scale):
        raise ShapeError(f"scale: {scale} is outside (0, {MAX_SCALE:g}]")
    warnings: list[str] = []
    p = shape.provenance
    if p.arch != machine.arch:
        warnings.append(f"the shape was captured on {p.arch}, this machine is {machine.arch}: VMA sizes and "
                        "resident memory are replayed as they are; the programs' own code differs")
    if p.page_size != machine.page_size:
        warnings.append(f"the shape was captured with {p.page_size // 1024} KiB pages, this machine uses "
                        f"{machine.page_size // 1024} KiB: every VMA is rounded to whole pages here (counts kept, "
                        "sizes and resident memory change by up to a page per VMA)")
    if p.hugepage_kib and machine.hugepage_kib and p.hugepage_kib != machine.hugepage_kib:
        warnings.append(f"THP size differs ({p.hugepage_kib} KiB there, {machine.hugepage_kib} KiB here): "
                        "THP memory is replayed in this machine's huge pages")
    page_kib = machine.page_size // 1024
    vmas: list[ShapeVma] = []
    for cls in MAPPED_CLASSES:
        own = [v for v in shape.vmas if v.cls == cls]
        if scale == 1.0:
            vmas.extend(own)
            continue
        # Thinning or repeating whole VMAs scales memory only roughly (one large VMA in or out): the
        # resident and dirty totals are then set to exactly F times the original's, where sizes allow.
        scaled = _scale_class(own, scale)
        for field, cap in (("rss_kib", None), ("dirty_kib", "rss_kib")):
            want = round(sum(getattr(v, field) for v in own) * scale)
            scaled = _spread(scaled, field, want - sum(getattr(v, field) for v in scaled), cap, 1)
            scaled = [dataclasses.replace(v, dirty_kib=min(v.dirty_kib, v.rss_kib), thp_kib=min(v.thp_kib, v.rss_kib))
                      for v in scaled]
        vmas.extend(scaled)
    for v in shape.vmas:
        if v.cls in ("heap", "stack"):
            vmas.append(v if scale == 1.0 else _scale_one(v, scale, page_kib))
        elif v.cls == "special":
            vmas.append(v)
    vmas = [_on_pages(v, page_kib) for v in vmas]
    threads = max(1, round(shape.threads * scale))
    return Target(vmas=tuple(vmas), threads=threads, warnings=tuple(warnings))


def check_fits(target: Target, machine: Machine) -> list[str]:
    """Raise ShapeError when this machine cannot hold ``target`` (memory, VMAs, threads); else the
    warnings about what will be left out (swap without swap, hugetlb without free huge pages)."""
    need_kib = target.rss_kib + REPLICA_OVERHEAD_KIB
    if machine.mem_available_kib is not None and need_kib > machine.mem_available_kib * AVAILABLE_FRACTION:
        raise ShapeError(
            f"the shape needs {need_kib / 1024:.0f} MiB resident (with the replica's own "
            f"{REPLICA_OVERHEAD_KIB >> 10} MiB), more than {AVAILABLE_FRACTION:.0%} of the "
            f"{machine.mem_available_kib / 1024:.0f} MiB available here (MemAvailable): refused before "
            "allocating anything; a smaller --scale fits")
    mapped = sum(1 for v in target.vmas if v.cls in MAPPED_CLASSES)
    if machine.max_map_count is not None and mapped + REPLICA_OVERHEAD_VMAS > machine.max_map_count:
        raise ShapeError(f"the shape has {mapped} VMAs; with the replica's own that exceeds vm.max_map_count "
                         f"({machine.max_map_count}): a smaller --scale fits")
    if target.threads > MAX_REPLAY_THREADS:
        raise ShapeError(f"threads: {target.threads} threads, more than the {MAX_REPLAY_THREADS} a replica makes")
    out = []
    swap = sum(v.swap_kib for v in target.vmas)
    if swap and not machine.swap_total_kib:
        out.append(f"the shape has {swap} KiB swapped out; this machine has no swap: not replayed")
    huge = sum(v.size_kib for v in target.vmas if v.cls == "hugetlb")
    if huge and huge > machine.hugetlb_free_kib:
        out.append(f"the shape has {huge} KiB of hugetlb memory; only {machine.hugetlb_free_kib} KiB of free "
                   "huge pages here (vm.nr_hugepages): hugetlb VMAs not replayed")
    other_thp = sorted({v.cls for v in target.vmas if v.thp_kib and v.cls not in ("anon_private", "special")})
    if other_thp:
        out.append(f"THP in {', '.join(other_thp)} is replayed as small pages (only anon_private THP is made)")
    return out


def _match_out(targets: list[ShapeVma], have: Iterable[ShapeVma]) -> list[ShapeVma]:
    """``targets`` without, for each VMA the replica already ``have``s, the target of the nearest size."""
    rest = sorted(targets, key=lambda v: v.size_kib)
    sizes = [v.size_kib for v in rest]
    for h in sorted(have, key=lambda v: -v.size_kib):
        if not rest:
            break
        i = bisect.bisect_left(sizes, h.size_kib)
        if i == len(sizes) or (i > 0 and h.size_kib - sizes[i - 1] <= sizes[i] - h.size_kib):
            i -= 1
        del rest[i], sizes[i]
    return rest


def _grow_for(vmas: list[ShapeVma], short: int, page_kib: int) -> list[ShapeVma]:
    """When the VMAs left to map are too small to hold ``short`` more resident KiB (a VMA the replica
    already has stood in for a larger one of the shape), make the largest small-page one longer by that
    much, resident: the class keeps its resident total and its VMA count, at the cost of one size."""
    if short < page_kib or not vmas:
        return vmas
    grow = -(-short // page_kib) * page_kib
    plain = [i for i, v in enumerate(vmas) if not v.thp_kib] or list(range(len(vmas)))
    i = max(plain, key=lambda j: vmas[j].size_kib)
    v = vmas[i]
    return [*vmas[:i], dataclasses.replace(v, size_kib=v.size_kib + grow, rss_kib=v.rss_kib + grow), *vmas[i + 1:]]


def _spread(vmas: list[ShapeVma], field: str, delta: int, cap: str | None, page_kib: int) -> list[ShapeVma]:
    """Add ``delta`` KiB (may be negative) of ``field`` over ``vmas`` in proportion to what each can take
    (up to its ``cap`` field, or size), in whole pages. Whatever cannot be placed is dropped."""
    if not vmas or not delta:
        return vmas
    room = [((getattr(v, cap) if cap else v.size_kib) - getattr(v, field)) if delta > 0 else getattr(v, field)
            for v in vmas]
    total = sum(room)
    if total <= 0:
        return vmas
    want = min(abs(delta), total)
    shares = [min(r, want * r // total // page_kib * page_kib) for r in room]
    left = want - sum(shares)
    for i, r in enumerate(room):  # what whole pages of the proportional shares left over, in order
        if left < page_kib:
            break
        extra = min(r - shares[i], left // page_kib * page_kib)
        shares[i] += extra
        left -= extra
    sign = 1 if delta > 0 else -1
    return [dataclasses.replace(v, **{field: getattr(v, field) + sign * share})
            for v, share in zip(vmas, shares, strict=True)]


def _fit_class(cls: str, target: list[ShapeVma], have: list[ShapeVma], page_kib: int,
               warnings: list[str]) -> list[ShapeVma]:
    if len(have) > len(target):
        warnings.append(f"{cls}: the replica's interpreter alone has {len(have)} VMAs, the shape {len(target)}: "
                        "the replica has more")
    rest = _match_out(target, have)

    def wanted(field: str) -> int:  # what ``rest`` still lacks of ``field`` for the class to match
        total: int = sum(getattr(v, field) for v in target) - sum(getattr(v, field) for v in have) \
            - sum(getattr(v, field) for v in rest)
        return total

    for field, cap in (("rss_kib", None), ("dirty_kib", "rss_kib")):
        rest = _spread(rest, field, wanted(field), cap, page_kib)
        if field == "rss_kib":
            rest = _grow_for(rest, wanted(field), page_kib)
            # keep dirty <= rss after lowering rss
            rest = [dataclasses.replace(v, dirty_kib=min(v.dirty_kib, v.rss_kib),
                                        thp_kib=min(v.thp_kib, v.rss_kib)) for v in rest]
    short = wanted("rss_kib")
    if short < -1024:
        warnings.append(f"{cls}: the replica's interpreter alone holds {-short} KiB more resident than the shape")
    return rest


def replay_plan(target: Target, baseline: Shape, machine: Machine) -> tuple[dict[str, Any], list[str]]:
    """What the started replica (whose own memory is ``baseline``) must still map, as the JSON object
    the stress child executes, and the warnings. All sizes in the object are bytes."""
    warnings = check_fits(target, machine)
    page_kib = machine.page_size // 1024
    huge_kib = machine.hugepage_kib or 2048
    pieces: list[list[Any]] = []
    files: list[list[Any]] = []
    # The replica's reservation keeps a PROT_NONE guard page at each end (stress child): two VMAs of its own.
    guards = [ShapeVma(cls="anon_private", prot="---", size_kib=page_kib)] * 2
    for cls in MAPPED_CLASSES:
        want = target.of(cls)
        if cls == "hugetlb" and sum(v.size_kib for v in want) > machine.hugetlb_free_kib:
            continue
        have = [v for v in baseline.vmas if v.cls == cls] + (guards if cls == "anon_private" else [])
        rest = _fit_class(cls, want, have, page_kib, warnings)
        numbers: dict[int, int] = {}
        for v in rest:
            file_index = -1
            if cls in FILE_CLASSES and v.file is not None:
                if v.file not in numbers:
                    numbers[v.file] = len(files)
                    files.append(["shmem" if cls == "shmem" else "file", 0])
                file_index = numbers[v.file]
                files[file_index][1] += v.size_kib * 1024
            swap = v.swap_kib if machine.swap_total_kib else 0
            # Whole huge pages only: a partly wanted one would be faulted in whole (2 MiB for one page).
            thp = v.thp_kib // huge_kib * huge_kib if cls == "anon_private" else 0
            pieces.append([cls, v.prot, v.size_kib * 1024, v.rss_kib * 1024, v.dirty_kib * 1024, thp * 1024,
                           swap * 1024,
                           1 if v.locked_kib else 0, file_index])
    heap = target.of("heap")
    stack = target.of("stack")
    plan = {
        "page": machine.page_size,
        "hugepage": (machine.hugepage_kib or 2048) * 1024,
        "pieces": pieces,
        "files": files,
        "heap": [heap[0].size_kib * 1024, heap[0].rss_kib * 1024] if heap else None,
        "stack": [stack[0].rss_kib * 1024] if stack else None,
    }
    return plan, [*target.warnings, *warnings]
