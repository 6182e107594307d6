"""The columnar path: ``report`` and ``compare`` on Parquet datasets (``export``), through DuckDB.

DuckDB scans only the columns a query needs and aggregates as it streams, so what comes back to Python
is bounded by the groups, never by the records: per side, counts per category value (boards and boots
only counted), a histogram per metric on the 0.1 % bins of cluster.py, and, for the bootstrap, per boot
and metric the count of values, of values below the pooled median, below and above the metric's window
(``cluster.side_medians``), and inside it per window column — about six scans per side in all. 30 M
records are never in Python's memory; DuckDB itself runs under ``export.ENGINE_MEMORY`` and spills
beyond it.

The metric definitions are those of ``data._Builder.add`` written in SQL (reaper times only where a
reaper reaped; lock waits summed over sides; the freed-by-reaper share only where both sides are known);
tests/unit/test_fleet.py holds the two paths' numbers equal on the same records. Per-side lock rows
are the tracer's own sides (``data.KNOWN_SIDES``); other keys count in the totals only.

Input checks, each a note naming the file, the rest analysed: a file that is not Parquet or whose footer
cannot be read, Parquet not written by ``export`` (no ``lmkd_py.format`` key: a foreign schema), a
dataset of a newer record schema, rows of a newer schema version. Footers are read, never whole files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from lmkd_py.records import SCHEMA_VERSION, Problems, errno_name
from lmkd_py.report.cluster import (
    LOG_STEP,
    OFFSET,
    Hist,
    IntArray,
    Window,
    WindowCounts,
    board_medians,
    median_bin,
    quantiles,
    spread_of,
)
from lmkd_py.report.data import (
    BASE_METRICS,
    CONFOUNDERS,
    KNOWN_SIDES,
    MAX_CONFOUNDER_CHARS,
    MAX_UNIT_CHARS,
    UNITS,
    DigestTable,
)
from lmkd_py.report.export import connect
from lmkd_py.report.schema import FORMAT_KEY
from lmkd_py.report.sources import Source

_REAPED = "mrelease.status IN ('ok', 'not_attempted')"


def _lock_total(col: str) -> str:
    m = f"kernel.{col}"
    return f"CASE WHEN {m} IS NULL THEN NULL ELSE coalesce(list_sum(map_values({m})), 0) END"


def _share() -> str:
    r = "coalesce(list_sum(map_values(kernel.freed_by_reaper_kib)), 0)"
    v = "coalesce(list_sum(map_values(kernel.freed_by_victim_kib)), 0)"
    both = "kernel.freed_by_reaper_kib IS NOT NULL AND kernel.freed_by_victim_kib IS NOT NULL"
    return f"CASE WHEN {both} AND {r} + {v} > 0 THEN {r} / ({r} + {v}) END"


# Each column of data.BASE_METRICS as SQL over the exported record schema, in its raw unit.
RAW: dict[str, str] = {
    "kill_to_exit_ns": "kill_to_exit_ns",
    "mrelease_wall_ns": f"CASE WHEN {_REAPED} THEN mrelease.wall_ns END",
    "reaper_work_ns": f"CASE WHEN {_REAPED} THEN kernel.reaper_work_ns END",
    "exit_mmap_ns": "kernel.exit_mmap_ns",
    "reap_total_ns": "kernel.reap_total_ns",
    "mmap_lock_wait_ns": _lock_total("mmap_lock_wait_ns"),
    "lock_contention_ns": _lock_total("lock_contention_ns"),
    "freed_by_reaper_share": _share(),
    "reap_throughput_mib_s": "kernel.reap_throughput_mib_s",
    "kill_to_mem_recovered_ns": "kill_to_mem_recovered_ns",
    "rss_kib": "victim.rss_kib",
}
for _col, _sides in KNOWN_SIDES.items():
    for _side in sorted(_sides):
        RAW[f"{_col}.{_side}"] = f"map_extract_value(kernel.{_col}, '{_side}')"
_SCALE = {m.column: m.scale for m in BASE_METRICS}


def metric_sql() -> dict[str, str]:
    """Column -> SQL of its value in display units (the metric's scale applied), ``<column>/gib`` too."""
    out = {}
    for col, expr in RAW.items():
        scale = _SCALE[col.split(".")[0]]
        out[col] = f"CAST(({expr}) AS DOUBLE) * {scale!r}"
    for m in BASE_METRICS:
        if m.unit == "ms":
            out[f"{m.column}/gib"] = (
                f"CASE WHEN victim.rss_kib > 0 THEN {out[m.column]} / (victim.rss_kib / 1048576.0) END"
            )
    return out


def _bin(v: str) -> str:
    mag = f"CAST(floor(ln(abs({v})) / {LOG_STEP!r}) AS BIGINT) + {OFFSET}"
    return f"CASE WHEN {v} > 0 THEN {mag} WHEN {v} < 0 THEN -({mag}) ELSE 0 END"


BOARD = (f"coalesce(left(provenance.machine_id, {MAX_UNIT_CHARS}), "
         f"'boot:' || left(provenance.boot_id, {MAX_UNIT_CHARS}))")
BOOT = f"left(provenance.boot_id, {MAX_UNIT_CHARS})"
DRY = "(dry_run OR outcome = 'dry_run')"
CATEGORY_SQL: dict[str, str] = {
    "kernel_release": "provenance.kernel_release",
    "machine_model": "provenance.machine_model",
    "outcome": "outcome",
    "mrelease_status": "mrelease.status",
    "errno": "coalesce(mrelease.errno_name, CAST(mrelease.errno AS VARCHAR))",
    "board": BOARD,
    "boot": BOOT,
    **{name: f"left(provenance.confounders.{name}.value, {MAX_CONFOUNDER_CHARS})" for name in CONFOUNDERS},
}


@dataclass
class Dataset:
    """The Parquet files of one or more arguments that passed the schema check."""

    files: list[str] = field(default_factory=list)


def check_files(con: Any, sources: list[Source], problems: Problems) -> Dataset:
    """The files of ``sources`` that are record datasets of a known schema version; the others noted."""
    files = [str(s.path) for s in sources if s.kind == "parquet"]
    ds = Dataset()
    if not files:
        return ds
    try:
        found = dict(con.execute(
            "SELECT file_name, value FROM parquet_kv_metadata($f) WHERE key = $k", {"f": files, "k": FORMAT_KEY}
        ).fetchall())
    except duckdb.Error:  # a damaged footer fails the whole scan: find which file, one at a time
        found = {}
        for f in files:
            try:
                found.update(dict(con.execute(
                    "SELECT file_name, value FROM parquet_kv_metadata($f) WHERE key = $k", {"f": f, "k": FORMAT_KEY}
                ).fetchall()))
            except duckdb.Error as exc:
                first = str(exc).splitlines()[0][:200]
                problems.append(f"{f}: skipped: not a readable Parquet file ({first})")
                found[f] = None
    for f in files:
        value = found.get(f, b"")
        if value is None:
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        kind, _, version = text.partition("/")
        if kind != "kill-records":
            problems.append(f"{f}: skipped: Parquet without lmkd-py's {FORMAT_KEY} key (a foreign schema)")
        elif not version.isdigit() or int(version) > SCHEMA_VERSION:
            problems.append(f"{f}: skipped: record schema {text[:40]!r} is newer than this lmkd-py understands "
                            f"({SCHEMA_VERSION}); upgrade lmkd-py to read it")
        else:
            ds.files.append(f)
    return ds


class Side:
    """One side (or report group) of a dataset: ``where`` selects its rows (SQL, with ``params``)."""

    def __init__(self, con: Any, ds: Dataset, where: str = "TRUE", params: dict[str, Any] | None = None) -> None:
        self.con = con
        self.ds = ds
        self.where = where
        self.params = {"files": ds.files, **(params or {})}
        self._units: SideUnits | None = None
        self._hists: list[ColumnarHist | None] = []  # by metric_sql index, once digest has run

    def _from(self) -> str:
        return (f"read_parquet($files, union_by_name=true) WHERE schema_version <= {SCHEMA_VERSION} "
                f"AND ({self.where})")

    def query(self, sql: str, extra: dict[str, Any] | None = None) -> Any:
        return self.con.execute(sql, {**self.params, **(extra or {})})

    def digest(self, problems: Problems) -> DigestTable:
        """Counts and pooled histograms of this side (three scans of the columns they need). Boards and
        boots are counted, not listed (a month of a fleet has 10^5 of each)."""
        if not self.ds.files:
            return DigestTable(0, 0, {}, {}, problems)
        names = [n for n in CATEGORY_SQL if n not in UNITS]
        sets = ", ".join(f"({n})" for n in names)
        cols = ", ".join(f"{CATEGORY_SQL[n]} AS {n}" for n in names)
        grouping = ", ".join(f"GROUPING({n})" for n in names)
        rows = self.query(
            f"SELECT [{grouping}], {', '.join(names)}, count(*) FROM (SELECT {cols} FROM {self._from()}) "
            f"GROUP BY GROUPING SETS ({sets})"
        ).fetchall()
        counts: dict[str, dict[str | None, int]] = {n: {} for n in names}
        for row in rows:
            flags, values, n = row[0], row[1:-1], row[-1]
            i = flags.index(0)
            value = values[i]
            if names[i] == "errno" and value is not None and value.lstrip("-").isdigit():
                value = errno_name(int(value))
            counts[names[i]][value] = counts[names[i]].get(value, 0) + n
        for n in names:
            counts[n] = dict(sorted(counts[n].items(), key=lambda kv: (-kv[1], str(kv[0]))))
        total, dry, boards, boots = self.query(
            f"SELECT count(*), coalesce(sum(CAST({DRY} AS BIGINT)), 0), count(DISTINCT {BOARD}), "
            f"count(DISTINCT {BOOT}) FROM {self._from()}").fetchone()
        hists = self._pooled()
        return DigestTable(int(total), int(dry), counts, hists, problems, {"board": int(boards), "boot": int(boots)})

    def _pooled(self) -> dict[str, Hist]:
        exprs = metric_sql()
        names = list(exprs)
        select = ", ".join(f"{exprs[n]} AS m{i}" for i, n in enumerate(names))
        unpivot = ", ".join(f"m{i}" for i in range(len(names)))
        got = self.query(
            f"SELECT metric, {_bin('v')} AS b, count(*) AS c, sum(v) AS s FROM "
            f"(UNPIVOT (SELECT {select} FROM {self._from()} AND NOT {DRY}) ON {unpivot} INTO NAME metric VALUE v) "
            f"WHERE isfinite(v) GROUP BY ALL"
        ).fetchnumpy()
        metric = np.array([int(m[1:]) for m in got["metric"]], dtype=np.int64) if len(got["metric"]) else np.empty(0)
        out: dict[str, Hist] = {}
        for i, name in enumerate(names):
            sel = metric == i
            if not sel.any():
                continue
            out[name] = ColumnarHist(self, i, exprs[name], got["b"][sel].astype(np.int64),
                                     got["c"][sel].astype(np.int64), float(got["s"][sel].sum()))
        self._hists = [h if isinstance(h := out.get(name), ColumnarHist) else None for name in names]
        return out

    def units(self) -> SideUnits:
        """The side's units (boots, by hash of board and boot) and, per unit and metric, the count of
        values and of values below the metric's pooled median bin (cluster.spread_of): one scan, the
        first time a metric's units are asked for."""
        if self._units is None:
            exprs = list(metric_sql().values())
            medians = {i: median_bin(*h.pooled()) for i, h in enumerate(self._hists) if h is not None}
            counts = ", ".join(f"CAST(count_if(isfinite({e})) AS INTEGER) AS n{i}" for i, e in enumerate(exprs))
            below = ", ".join(f"CAST(count_if({_bin(f'CASE WHEN isfinite({exprs[i]}) THEN {exprs[i]} END')} < {m}) "
                              f"AS INTEGER) AS c{i}" for i, m in medians.items())
            got = self.query(f"SELECT {_UNIT_KEYS}, {', '.join(filter(None, (counts, below)))} FROM {self._from()} "
                             f"AND NOT {DRY} GROUP BY ALL").fetchnumpy()
            hu = np.asarray(got["hu"]).astype(np.uint64)
            order = np.argsort(hu)
            hb = np.asarray(got["hb"]).astype(np.uint64)[order]
            _, board = np.unique(hb, return_inverse=True)
            n = np.zeros((hu.size, len(exprs)), dtype=np.int32)
            c = np.zeros((hu.size, len(exprs)), dtype=np.int32)
            for i in range(len(exprs)):
                n[:, i] = np.asarray(got[f"n{i}"])[order]
                if i in medians:
                    c[:, i] = np.asarray(got[f"c{i}"])[order]
            self._units = SideUnits(hu[order], board.reshape(-1).astype(np.int64), hb != 0, n, c)
        return self._units

    def fetch_windows(self, todo: list[tuple[ColumnarHist, Window]]) -> None:
        """Two scans for every (metric, window) of ``todo``: per unit, the values below and above the
        window (conditional counts); inside it, per (unit, metric, window column) counts of the values
        there only (UNPIVOT, filtered) — a few per unit, whatever the size of the side."""
        exprs = list(metric_sql().values())
        units = self.units()
        wanted = sorted({h.index for h, _ in todo})
        binned = ", ".join(f"{_bin(f'CASE WHEN isfinite({exprs[i]}) THEN {exprs[i]} END')} AS b{i}" for i in wanted)
        src = f"(SELECT hu, {binned} FROM (SELECT {_UNIT_KEYS}, * FROM {self._from()} AND NOT {DRY}))"
        edges = ", ".join(f"CAST(count_if(b{h.index} < {w.lo}) AS INTEGER) AS lo{j}, "
                          f"CAST(count_if(b{h.index} > {w.hi}) AS INTEGER) AS hi{j}" for j, (h, w) in enumerate(todo))
        got = self.query(f"SELECT hu, {edges} FROM {src} GROUP BY hu").fetchnumpy()
        at = np.searchsorted(units.hu, np.asarray(got["hu"]).astype(np.uint64))
        cols = ", ".join(f"CASE WHEN b{h.index} BETWEEN {w.lo} AND {w.hi} THEN CAST((b{h.index} - {w.lo}) // "
                         f"{w.factor} + 1 AS INTEGER) END AS w{j}" for j, (h, w) in enumerate(todo))
        # UNPIVOT drops the NULLs: only values inside a window come out, one row each.
        inner = self.query(
            f"SELECT CAST(substr(j, 2) AS INTEGER) AS j, hu, col, CAST(count(*) AS INTEGER) AS c FROM "
            f"(UNPIVOT (SELECT hu, {cols} FROM {src}) ON {', '.join(f'w{j}' for j in range(len(todo)))} "
            f"INTO NAME j VALUE col) GROUP BY ALL ORDER BY j"
        ).fetchnumpy()
        j_of = np.asarray(inner["j"])
        cuts = np.searchsorted(j_of, np.arange(len(todo) + 1))
        unit_of = np.searchsorted(units.hu, np.asarray(inner["hu"]).astype(np.uint64))
        col, count = np.asarray(inner["col"]).astype(np.int64), np.asarray(inner["c"]).astype(np.float32)
        for j, (h, w) in enumerate(todo):
            below = np.zeros(units.hu.size, dtype=np.float32)
            above = np.zeros(units.hu.size, dtype=np.float32)
            below[at], above[at] = np.asarray(got[f"lo{j}"]), np.asarray(got[f"hi{j}"])
            sl = slice(int(cuts[j]), int(cuts[j + 1]))
            h.cache[h.key(w)] = WindowCounts(below, above, unit_of[sl], col[sl], count[sl])


@dataclass
class SideUnits:
    """A side's units, sorted by ``hu`` (hash of board and boot); ``board``: index of each unit's board;
    ``known``: whether its board is known; per unit and metric (metric_sql order): ``n`` values present,
    ``below`` values below the metric's pooled median bin."""

    hu: npt.NDArray[np.uint64]
    board: IntArray
    known: npt.NDArray[np.bool_]
    n: npt.NDArray[np.int32]
    below: npt.NDArray[np.int32]


_UNIT_KEYS = (f"CASE WHEN {BOARD} IS NULL THEN 0 ELSE hash({BOARD}) END AS hb, "
              f"hash({BOARD}, {BOOT}) AS hu")


def fetch_windows(pairs: list[tuple[Any, Window]]) -> None:
    """The window counts of every columnar metric among ``pairs``, in two scans per side."""
    by_side: dict[int, tuple[Side, list[tuple[ColumnarHist, Window]]]] = {}
    for h, w in pairs:
        if isinstance(h, ColumnarHist) and h.key(w) not in h.cache:
            by_side.setdefault(id(h.side), (h.side, []))[1].append((h, w))
    for side, todo in by_side.values():
        side.fetch_windows(todo)


class ColumnarHist(Hist):
    """A metric of a Side: pooled bins held; its units and window counts from the side's scans
    (``fetch_windows`` for many metrics at once, or one metric's when asked first: cluster.Counts)."""

    def __init__(self, side: Side, index: int, expr: str, bins: IntArray, count: IntArray, total: float) -> None:
        order = np.argsort(bins)
        none = np.empty(0, dtype=np.int64)
        super().__init__(none, bins[order], count[order], none, [], total)
        self.side = side
        self.index = index
        self.expr = expr
        self.cache: dict[tuple[int, int, int], WindowCounts] = {}

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def pooled(self) -> tuple[IntArray, IntArray]:
        return self.bins, self.count

    def quantiles(self, qs: list[float]) -> list[float | None]:
        return quantiles(self.bins, self.count, qs)

    @staticmethod
    def key(w: Window) -> tuple[int, int, int]:
        return (w.lo, w.factor, w.width)

    def window_counts(self, w: Window) -> WindowCounts:
        if self.key(w) not in self.cache:
            self.side.fetch_windows([(self, w)])
        return self.cache[self.key(w)]

    def _mine(self) -> tuple[SideUnits, npt.NDArray[np.int32]]:
        units = self.side.units()
        return units, units.n[:, self.index]

    def unit_boards(self) -> IntArray:
        return self.side.units().board

    def spread(self) -> float:
        units, n = self._mine()
        return spread_of(units.board, n, units.below[:, self.index])

    @property
    def boards(self) -> int:
        units, n = self._mine()
        return int(np.unique(units.board[n > 0]).size)

    @property
    def boots(self) -> int:
        return int((self._mine()[1] > 0).sum())

    @property
    def known(self) -> bool:
        units, n = self._mine()
        return bool(units.known[n > 0].any())

    def _values(self) -> str:
        return f"SELECT {BOARD} AS board, {self.expr} AS v FROM {self.side._from()} AND NOT {DRY}"

    def board_set(self) -> set[str]:
        got = self.side.query(f"SELECT DISTINCT board FROM ({self._values()}) WHERE isfinite(v) AND board IS NOT NULL")
        return {row[0] for row in got.fetchall()}

    def board_medians(self) -> dict[str, float]:
        got = self.side.query(
            f"SELECT board, median(v) FROM ({self._values()}) WHERE isfinite(v) AND board IS NOT NULL GROUP BY board"
        ).fetchall()
        return {b: float(m) for b, m in got if m is not None and math.isfinite(m)}


def open_engine(tmp: Path | None = None) -> Any:
    """A DuckDB connection for the analysis (bounded memory and threads)."""
    return connect(tmp)


__all__ = ["ColumnarHist", "Dataset", "Side", "board_medians", "check_files", "fetch_windows", "metric_sql",
           "open_engine"]
