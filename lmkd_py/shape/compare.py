"""How close a replica's shape is to the original's, class by class. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from lmkd_py.shape.model import CLASSES, Shape


@dataclass(frozen=True)
class ClassFidelity:
    """One class in both shapes: VMA counts and resident KiB, and the replica's deviation from the
    original (a fraction: 0.03 is 3 % more; None when the original has none)."""

    cls: str
    vmas_a: int
    vmas_b: int
    rss_kib_a: int
    rss_kib_b: int
    dirty_kib_a: int
    dirty_kib_b: int

    @property
    def vmas_dev(self) -> float | None:
        return _dev(self.vmas_a, self.vmas_b)

    @property
    def rss_dev(self) -> float | None:
        return _dev(self.rss_kib_a, self.rss_kib_b)


def _dev(a: int, b: int) -> float | None:
    return (b - a) / a if a else None


def compare(original: Shape, replica: Shape) -> list[ClassFidelity]:
    """Every class that either shape has, in CLASSES order, then the total as class ``all``."""
    sa, sb = original.summary(), replica.summary()
    rows = [ClassFidelity(c, sa[c].vmas, sb[c].vmas, sa[c].rss_kib, sb[c].rss_kib, sa[c].dirty_kib, sb[c].dirty_kib)
            for c in CLASSES if sa[c].vmas or sb[c].vmas]
    rows.append(ClassFidelity("all", sum(r.vmas_a for r in rows), sum(r.vmas_b for r in rows),
                              sum(r.rss_kib_a for r in rows), sum(r.rss_kib_b for r in rows),
                              sum(r.dirty_kib_a for r in rows), sum(r.dirty_kib_b for r in rows)))
    return rows


def within(row: ClassFidelity, tolerance: float, floor_kib: int = 0) -> bool:
    """Both the VMA count and the resident memory of ``row`` within ``tolerance`` of the original; a
    resident difference of at most ``floor_kib`` passes too (a few pages of a tiny class)."""
    vmas_ok = abs(row.vmas_b - row.vmas_a) <= tolerance * row.vmas_a
    rss_ok = abs(row.rss_kib_b - row.rss_kib_a) <= max(tolerance * row.rss_kib_a, floor_kib)
    return vmas_ok and rss_ok


def format_table(rows: list[ClassFidelity]) -> str:
    lines = [f"{'class':<13} {'VMAs':>7} {'replica':>7} {'dev':>7}   {'RSS MiB':>8} {'replica':>8} {'dev':>7}"]
    for r in rows:
        lines.append(f"{r.cls:<13} {r.vmas_a:>7} {r.vmas_b:>7} {_pct(r.vmas_dev):>7}   "
                     f"{r.rss_kib_a / 1024:>8.1f} {r.rss_kib_b / 1024:>8.1f} {_pct(r.rss_dev):>7}")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:+.1f}%"
