"""Kill records as numeric columns, for ``report`` and ``compare`` (part of the optional ``report`` extra).

Reading keeps the rules of ``records.iter_records`` (a truncated, damaged or overlong line, or a record of a
newer schema version, is skipped and noted as ``file:line``) and the same validation: every line goes through
``records.adapter().validate_json`` (the KillRecord dataclasses), so the schema lives only in
``records.py``. What differs is what is kept: instead of a list of model objects (several KiB each, too
heavy at a million records) each record leaves a few float64 and category values in compact arrays, and
the model object is dropped at once. Validating in pydantic's Rust core costs about as much as ``json.loads``
(~12 µs for a full record here), so there is no cheaper path worth a second copy of the schema.

Missing values are NaN in the float columns (a record field that is ``None``); statistics drop them per
metric. ``mrelease_wall`` and ``reaper_work`` leave out calls that reaped nothing (see ``_Builder.add``). Times stay in
nanoseconds here; the metric table says how to scale them for display.
"""

from __future__ import annotations

import dataclasses
import math
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from lmkd_py.records import Confounders, KillRecord, MreleaseStatus, Outcome, Problems, errno_name
from lmkd_py.report.cluster import Hist, hist_of
from lmkd_py.report.sources import Source, iter_records

FloatArray = npt.NDArray[np.float64]
NS_PER_MS = 1e6
KIB_PER_GIB = float(1 << 20)


@dataclass(frozen=True)
class Metric:
    """One reported quantity: ``column`` of the table, multiplied by ``scale`` for display in ``unit``."""

    name: str
    unit: str
    column: str
    scale: float = 1.0


# The metrics of the issue, in table order. Columns named "<dict>.<side>" (lock waits by side) are added
# after their total by ``metrics_for`` because the sides are whatever keys the tracer wrote.
BASE_METRICS: tuple[Metric, ...] = (
    Metric("kill_to_exit", "ms", "kill_to_exit_ns", 1 / NS_PER_MS),
    Metric("mrelease_wall", "ms", "mrelease_wall_ns", 1 / NS_PER_MS),
    Metric("reaper_work", "ms", "reaper_work_ns", 1 / NS_PER_MS),
    Metric("exit_mmap", "ms", "exit_mmap_ns", 1 / NS_PER_MS),
    Metric("reap_total", "ms", "reap_total_ns", 1 / NS_PER_MS),
    Metric("mmap_lock_wait", "ms", "mmap_lock_wait_ns", 1 / NS_PER_MS),
    Metric("lock_contention", "ms", "lock_contention_ns", 1 / NS_PER_MS),
    Metric("freed_by_reaper_share", "%", "freed_by_reaper_share", 100.0),
    Metric("reap_throughput", "MiB/s", "reap_throughput_mib_s"),
    Metric("kill_to_mem_recovered", "ms", "kill_to_mem_recovered_ns", 1 / NS_PER_MS),
    Metric("victim_rss", "MiB", "rss_kib", 1 / 1024),
)
SIDED_COLUMNS = ("mmap_lock_wait_ns", "lock_contention_ns")
# The sides the tracer writes (tracing/timeline.py ``_lock_waits``); a newer tracer may add a few more.
KNOWN_SIDES = {
    "mmap_lock_wait_ns": frozenset({"reaper", "victim"}),
    "lock_contention_ns": frozenset({"reaper", "victim", "reaper_sleep", "victim_sleep"}),
}
MAX_EXTRA_SIDES = 8
_SIDE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
# The settings besides the kernel that sway reap latency (records.Confounders), one category each:
# compare warns when its sides differ in one, report --group-by splits by one.
CONFOUNDERS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Confounders))
# Where each record came from, for the cluster bootstrap (cluster.py): the board (the app-specific machine
# id; a record without one counts its boot as its board) and the boot.
UNITS = ("board", "boot")
CATEGORIES = ("kernel_release", "machine_model", "outcome", "mrelease_status", "errno", *UNITS, *CONFOUNDERS)
MAX_UNIT_CHARS = 128
# A confounder's value is kept to this many characters as a label (a hostile file could hold megabytes).
MAX_CONFOUNDER_CHARS = 512


@dataclass
class Categorical:
    """A string column stored as codes into ``labels`` (``None`` is a label like any other)."""

    codes: npt.NDArray[np.int32]
    labels: list[str | None]

    def counts(self, mask: npt.NDArray[np.bool_] | None = None) -> dict[str | None, int]:
        """How often each label occurs (in rows where ``mask`` is true), most frequent first."""
        codes = self.codes if mask is None else self.codes[mask]
        hist = np.bincount(codes, minlength=len(self.labels))
        # Sort only the labels present: a group of one record among 8k distinct labels (a hostile file)
        # must not sort all 8k, once per group.
        present = np.flatnonzero(hist).tolist()
        order = sorted(present, key=lambda i: (-int(hist[i]), str(self.labels[i])))
        return {self.labels[i]: int(hist[i]) for i in order}


@dataclass
class RecordTable:
    """Columns of a record set: one row per record, in file order."""

    rows: int
    columns: dict[str, FloatArray]
    categories: dict[str, Categorical]
    dry_run: npt.NDArray[np.bool_]
    problems: Problems = field(default_factory=Problems)

    def select(self, mask: npt.NDArray[np.bool_]) -> RecordTable:
        """The rows where ``mask`` is true (problems are kept: they belong to the files, not to rows)."""
        return RecordTable(
            rows=int(mask.sum()),
            columns={k: v[mask] for k, v in self.columns.items()},
            categories={k: Categorical(c.codes[mask], c.labels) for k, c in self.categories.items()},
            dry_run=self.dry_run[mask],
            problems=self.problems,
        )

    def values(self, column: str) -> FloatArray:
        """The present values of ``column`` over the rows that count for latency (not dry runs)."""
        col = self.columns.get(column)
        if col is None:
            return np.empty(0)
        col = col[~self.dry_run]
        return col[~np.isnan(col)]

    def counts(self, category: str) -> dict[str | None, int]:
        """How often each value of ``category`` occurs, most frequent first."""
        return self.categories[category].counts()

    def distinct(self, unit: str) -> int:
        """How many known boards or boots (``unit``: one of UNITS) the records come from."""
        return sum(1 for k in self.counts(unit) if k is not None)

    @property
    def dry_runs(self) -> int:
        return int(self.dry_run.sum())

    def hist(self, column: str, scale: float = 1.0) -> Hist:
        """The present values of ``column`` x ``scale`` (not dry runs) as a per-boot histogram."""
        col = self.columns.get(column)
        return self.hist_of(np.full(self.rows, np.nan) if col is None else col * scale)

    def hist_of(self, full: FloatArray) -> Hist:
        """``full`` (one value per row, NaN for none) over the rows that count, as a per-boot histogram."""
        keep = ~self.dry_run & np.isfinite(full)
        board, boot = self.categories["board"], self.categories["boot"]
        rows = ~self.dry_run  # every boot of the side is a unit, with values of this column or not
        return hist_of(full[keep], board.codes[keep], boot.codes[keep], board.labels,
                       (board.codes[rows], boot.codes[rows]))


@dataclass
class DigestTable:
    """A record set as the columnar engine hands it over (columnar.py): counts and per-boot histograms,
    never the records. ``hists`` are keyed by column (``rss_kib``, ``mmap_lock_wait_ns.reaper``, and
    ``<column>/gib`` for the per-GiB values) and hold values already in their metric's display unit."""

    rows: int
    dry_runs: int
    category_counts: dict[str, dict[str | None, int]]
    hists: dict[str, Hist]
    problems: Problems = field(default_factory=Problems)
    # Known boards and boots (UNITS), counted by the engine: a month of a fleet has ~10^5 of them, too
    # many to hand over one by one when only their number is asked for.
    units: dict[str, int] = field(default_factory=dict)

    @property
    def columns(self) -> dict[str, Hist]:
        return self.hists

    def counts(self, category: str) -> dict[str | None, int]:
        return self.category_counts.get(category, {})

    def distinct(self, unit: str) -> int:
        return self.units.get(unit, 0)

    def hist(self, column: str, scale: float = 1.0) -> Hist:
        """The histogram of ``column``, already in display units (``scale`` is for RecordTable's sake)."""
        h = self.hists.get(column)
        return h if h is not None else empty_hist()


def empty_hist() -> Hist:
    none = np.empty(0, dtype=np.int64)
    return Hist(none, none, none, none, [], 0.0)


AnyTable = RecordTable | DigestTable


def metrics_for(*tables: AnyTable) -> list[Metric]:
    """BASE_METRICS plus one row per side of the sided columns present in any table, after its total."""
    out: list[Metric] = []
    for m in BASE_METRICS:
        out.append(m)
        if m.column in SIDED_COLUMNS:
            prefix = m.column + "."
            sides = sorted({k[len(prefix) :] for t in tables for k in t.columns if k.startswith(prefix)})
            out.extend(Metric(f"{m.name}.{s}", m.unit, f"{m.column}.{s}", m.scale) for s in sides)
    return out


class _Builder:
    """Appends one validated record at a time into compact arrays."""

    def __init__(self) -> None:
        self.rows = 0
        self.floats: dict[str, array[float]] = {name: array("d") for name in [m.column for m in BASE_METRICS]}
        self.sparse: dict[str, tuple[array[int], array[float]]] = {}
        self.codes: dict[str, array[int]] = {name: array("i") for name in CATEGORIES}
        self.label_ids: dict[str, dict[str | None, int]] = {name: {} for name in CATEGORIES}
        self.dry: array[int] = array("b")
        self.extra_sides: dict[str, set[str]] = {}
        self.dropped_sides: dict[str, int] = {}

    def _code(self, category: str, label: str | None) -> None:
        ids = self.label_ids[category]
        code = ids.get(label)
        if code is None:
            code = ids[label] = len(ids)
        self.codes[category].append(code)

    def _sided(self, column: str, by_side: dict[str, int] | None) -> float:
        if by_side is None:
            return _NAN
        for side, value in by_side.items():
            name = f"{column}.{side}"
            slot = self.sparse.get(name)
            if slot is None:
                # Each side kept becomes a full column (8 bytes x every row) and a report row: keep
                # the tracer's own sides and a few more, never one per distinct key of a hostile file
                # (issue 18: 8k records of fresh keys took 2.1 GB). The total below still counts every key.
                if not self._keeps_side(column, side):
                    self.dropped_sides[column] = self.dropped_sides.get(column, 0) + 1
                    continue
                slot = self.sparse[name] = (array("q"), array("d"))
            slot[0].append(self.rows)
            slot[1].append(float(value))
        return _f(sum(by_side.values()))

    def _keeps_side(self, column: str, side: str) -> bool:
        if side in KNOWN_SIDES[column]:
            return True
        extra = self.extra_sides.setdefault(column, set())
        if len(extra) >= MAX_EXTRA_SIDES or not _SIDE_NAME.fullmatch(side):
            return False
        extra.add(side)
        return True

    def note_dropped_sides(self, problems: Problems) -> None:
        """One note per lock map whose keys were not all kept as columns (their values stay in the total)."""
        for column, n in self.dropped_sides.items():
            problems.append(
                f"{column}: {n} value(s) under keys beyond the tracer's own and {MAX_EXTRA_SIDES} others "
                f"(or not short names) left out of the per-side rows; the totals include them"
            )

    def add(self, rec: KillRecord) -> None:
        f = self.floats
        k = rec.kernel
        mr = rec.mrelease
        prov = rec.provenance
        f["kill_to_exit_ns"].append(_f(rec.kill_to_exit_ns))
        # Reaper times count only where a reaper did the reaping: process_mrelease returned 0, or it was
        # not ours to call (the kernel's oom_reaper, observe mode). An ESRCH return (the victim dropped
        # its mm first, ~half the kills on a 2-core machine) takes microseconds and reaps nothing: as a
        # "reaper work" sample it would only measure the race. It stays in the status histogram, and
        # exit_mmap, reap_total and the freed-by-reaper share (0 %) still count it.
        reaped = mr.status in _REAPED
        f["mrelease_wall_ns"].append(_f(mr.wall_ns) if reaped else _NAN)
        f["kill_to_mem_recovered_ns"].append(_f(rec.kill_to_mem_recovered_ns))
        f["rss_kib"].append(_f(rec.victim.rss_kib))
        if k is None:
            for col in (
                "reaper_work_ns",
                "exit_mmap_ns",
                "reap_total_ns",
                "reap_throughput_mib_s",
                "mmap_lock_wait_ns",
                "lock_contention_ns",
                "freed_by_reaper_share",
            ):
                f[col].append(_NAN)
        else:
            f["reaper_work_ns"].append(_f(k.reaper_work_ns) if reaped else _NAN)
            f["exit_mmap_ns"].append(_f(k.exit_mmap_ns))
            f["reap_total_ns"].append(_f(k.reap_total_ns))
            f["reap_throughput_mib_s"].append(_f(k.reap_throughput_mib_s))
            f["mmap_lock_wait_ns"].append(self._sided("mmap_lock_wait_ns", k.mmap_lock_wait_ns))
            f["lock_contention_ns"].append(self._sided("lock_contention_ns", k.lock_contention_ns))
            f["freed_by_reaper_share"].append(_share(k.freed_by_reaper_kib, k.freed_by_victim_kib))
        self._code("kernel_release", prov.kernel_release)
        self._code("machine_model", prov.machine_model)
        boot = prov.boot_id[:MAX_UNIT_CHARS] if prov.boot_id is not None else None
        board = prov.machine_id[:MAX_UNIT_CHARS] if prov.machine_id is not None else None
        self._code("board", board if board is not None else (None if boot is None else "boot:" + boot))
        self._code("boot", boot)
        self._code("outcome", rec.outcome.value)
        self._code("mrelease_status", mr.status.value)
        self._code("errno", mr.errno_name or errno_name(mr.errno))
        cf = prov.confounders
        for name in CONFOUNDERS:
            setting = getattr(cf, name) if cf is not None else None
            value = setting.value if setting is not None else None
            self._code(name, value[:MAX_CONFOUNDER_CHARS] if value is not None else None)
        self.dry.append(1 if rec.dry_run or rec.outcome is Outcome.DRY_RUN else 0)
        self.rows += 1

    def build(self, problems: Problems) -> RecordTable:
        columns = {name: np.frombuffer(col, dtype=np.float64).copy() for name, col in self.floats.items()}
        for name, (rows, vals) in self.sparse.items():
            full = np.full(self.rows, np.nan)
            full[np.frombuffer(rows, dtype=np.int64)] = np.frombuffer(vals, dtype=np.float64)
            columns[name] = full
        categories = {
            name: Categorical(np.frombuffer(self.codes[name], dtype=np.int32).copy(), list(self.label_ids[name]))
            for name in CATEGORIES
        }
        dry = np.frombuffer(self.dry, dtype=np.int8).astype(bool)
        return RecordTable(self.rows, columns, categories, dry, problems)


_NAN = float("nan")
_REAPED = (MreleaseStatus.OK, MreleaseStatus.NOT_ATTEMPTED)


def _f(value: float | None) -> float:
    # Infinity (a JSON 1e400 parses to it) is as unknown as a missing value: one must not decide a mean.
    if value is None:
        return _NAN
    x = float(value)
    return x if math.isfinite(x) else _NAN


def _share(reaper: dict[str, int] | None, victim: dict[str, int] | None) -> float:
    # Both sides must be known: a missing side is "not measured", not "freed nothing".
    if reaper is None or victim is None:
        return _NAN
    by_reaper = sum(reaper.values())
    total = by_reaper + sum(victim.values())
    return by_reaper / total if total > 0 else _NAN


def load_table(paths: Sequence[Path | Source], problems: Problems | None = None) -> RecordTable:
    """Read the JSONL records of ``paths`` (plain or compressed: ``sources.Source``, or paths read as
    plain JSONL) into a RecordTable, streaming (memory stays O(records x columns)).

    Raises OSError (a file that cannot be opened). Lines that are not records (see ``records.parse_line``:
    damaged, too long, a newer schema version) are skipped and counted in ``RecordTable.problems``
    as ``file:line: skipped: why``; so are lock-map keys beyond what a table keeps (``_Builder``) and
    compressed files corrupt part way (``sources.iter_records``).
    """
    problems = problems if problems is not None else Problems()
    builder = _Builder()
    for item in paths:
        src = item if isinstance(item, Source) else Source(Path(item), "jsonl")
        for rec in iter_records(src, problems):
            builder.add(rec)
    builder.note_dropped_sides(problems)
    return builder.build(problems)
