"""What a stress victim is: ``VictimSpec``, its memory layout plan, and the seeded scenario presets.

Pure: no I/O, no processes. ``proc`` turns a spec into a running child.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

KINDS: Final = ("anon", "file", "shmem", "mixed")
TOUCHES: Final = ("all", "sparse")
PAGE_SIZE_DEFAULT: Final = 4096
# vm.max_map_count defaults to 65530; the interpreter, thread stacks and the two guard pages per kind
# need some of them.
MAX_VMAS: Final = 60_000
MAX_THREADS: Final = 4096
# kind="mixed": quarters of the size (and of the VMAs) per kind, anon-heavy like an app process.
MIXED_QUARTERS: Final = (("anon", 2), ("file", 1), ("shmem", 1))


@dataclass(frozen=True)
class VictimSpec:
    """One victim process. ``size_mib`` is the memory it maps and (with ``touch="all"``) makes resident,
    on top of the interpreter's own ~12 MiB; ``vmas`` is how many distinct VMAs that memory is split into;
    ``threads`` is the total thread count of the process. Raises ValueError for impossible values."""

    size_mib: int = 64
    vmas: int = 1
    kind: str = "anon"
    threads: int = 1
    touch: str = "all"
    adj: int | None = None

    def __post_init__(self) -> None:
        problems = spec_problems(self)
        if problems:
            raise ValueError("; ".join(problems))


def spec_problems(spec: VictimSpec, page_size: int = PAGE_SIZE_DEFAULT) -> list[str]:
    """Every reason ``spec`` cannot be made, as readable sentences (empty when it can)."""
    out: list[str] = []
    if spec.kind not in KINDS:
        out.append(f"kind must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    if spec.touch not in TOUCHES:
        out.append(f"touch must be one of {', '.join(TOUCHES)}, not {spec.touch!r}")
    if spec.size_mib < 1:
        out.append(f"size_mib must be at least 1, not {spec.size_mib}")
    if not 1 <= spec.vmas <= MAX_VMAS:
        out.append(f"vmas must be in 1..{MAX_VMAS} (vm.max_map_count), not {spec.vmas}")
    if not 1 <= spec.threads <= MAX_THREADS:
        out.append(f"threads must be in 1..{MAX_THREADS}, not {spec.threads}")
    if spec.adj is not None and not -1000 <= spec.adj <= 1000:
        out.append(f"adj (oom_score_adj) must be in -1000..1000, not {spec.adj}")
    if spec.kind == "mixed" and spec.vmas < len(MIXED_QUARTERS):
        out.append(f"kind mixed needs vmas >= {len(MIXED_QUARTERS)} (one VMA per kind), not {spec.vmas}")
    if not out:
        for plan in plan_layout(spec, page_size):
            if plan.vmas > plan.pages:
                out.append(
                    f"{plan.kind}: {plan.pages} pages cannot be split into {plan.vmas} VMAs "
                    "(each VMA needs at least one page); raise size_mib or lower vmas"
                )
    return out


@dataclass(frozen=True)
class KindPlan:
    """The part of a victim's memory of one kind: ``pages`` pages in ``vmas`` VMAs."""

    kind: str  # anon | file | shmem
    pages: int
    vmas: int


def plan_layout(spec: VictimSpec, page_size: int = PAGE_SIZE_DEFAULT) -> list[KindPlan]:
    """How ``spec``'s memory is divided between kinds. ``mixed`` gives anon half and file and shmem a
    quarter each of both the pages and the VMAs (rounding goes to anon)."""
    pages = spec.size_mib * (1 << 20) // page_size
    if spec.kind != "mixed":
        return [KindPlan(spec.kind, pages, spec.vmas)]
    plans: list[KindPlan] = []
    for kind, quarters in MIXED_QUARTERS[1:]:
        plans.append(KindPlan(kind, pages * quarters // 4, max(1, spec.vmas * quarters // 4)))
    anon = KindPlan("anon", pages - sum(p.pages for p in plans), spec.vmas - sum(p.vmas for p in plans))
    return [anon, *plans]


def expected_rss_kib(spec: VictimSpec, page_size: int = PAGE_SIZE_DEFAULT) -> dict[str, int]:
    """RSS per kind (KiB) the victim's own memory adds once ready, keyed ``anon``/``file``/``shmem``.
    ``sparse`` touches every 4th page of a kind, so ceil(pages / 4)."""
    out = {"anon": 0, "file": 0, "shmem": 0}
    for plan in plan_layout(spec, page_size):
        touched = plan.pages if spec.touch == "all" else -(-plan.pages // 4)
        out[plan.kind] += touched * page_size // 1024
    return out


# --- scenarios -----------------------------------------------------------------------------------------
# Sizes stay modest so a whole scenario starts in seconds on a 2-core test machine; the shapes follow
# what an Android app process looks like (hundreds to thousands of VMAs, dozens of threads, a mix of
# anonymous heap, mapped files and shared memory, cached-app oom_score_adj values).


def _app_like(rng: random.Random) -> list[VictimSpec]:
    adjs = [950, 900, 800, 700]
    rng.shuffle(adjs)
    return [
        VictimSpec(
            size_mib=rng.randrange(48, 161, 16),
            vmas=rng.randint(400, 2500),
            kind="mixed",
            threads=rng.randint(8, 40),
            touch=rng.choice(("all", "all", "sparse")),
            adj=adj,
        )
        for adj in adjs
    ]


def _many_vmas(rng: random.Random) -> list[VictimSpec]:
    return [
        VictimSpec(size_mib=rng.randrange(64, 129, 32), vmas=rng.randint(8000, 16000), kind="anon",
                   threads=rng.randint(1, 4), adj=adj)
        for adj in (900, 800)
    ]


def _big_anon(rng: random.Random) -> list[VictimSpec]:
    return [VictimSpec(size_mib=rng.randrange(512, 1025, 128), vmas=1, kind="anon", threads=1, adj=900)]


_SCENARIO_BUILDERS: Final[Mapping[str, Callable[[random.Random], list[VictimSpec]]]] = MappingProxyType(
    {"app-like": _app_like, "many-vmas": _many_vmas, "big-anon": _big_anon}
)


def scenario_names() -> list[str]:
    return sorted(_SCENARIO_BUILDERS)


def scenario_specs(name: str, seed: int) -> list[VictimSpec]:
    """The victims of scenario ``name``; the same ``seed`` always gives the same list.

    Raises KeyError naming the known scenarios."""
    try:
        build = _SCENARIO_BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r} (known: {', '.join(scenario_names())})") from None
    return build(random.Random(f"{name}:{seed}"))
