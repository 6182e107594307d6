"""The columnar path: ``report`` and ``compare`` on Parquet datasets (``export``), through DuckDB.

DuckDB scans only the columns a query needs and aggregates as it streams, so what comes back to Python
is bounded by the groups, never by the records: per side, counts per category value, a histogram per
metric on the 0.1 % bins of cluster.py, and, for the bootstrap, counts per boot on the small windows
``cluster.resampled_medians`` asks for. 30 M records are never in Python's memory; DuckDB itself runs
under ``export.ENGINE_MEMORY`` and spills beyond it.

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
from lmkd_py.report.cluster import LOG_STEP, OFFSET, Hist, IntArray, Window, board_medians, quantiles
from lmkd_py.report.data import (
    BASE_METRICS,
    CONFOUNDERS,
    KNOWN_SIDES,
    MAX_CONFOUNDER_CHARS,
    MAX_UNIT_CHARS,
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

    def _from(self) -> str:
        return (f"read_parquet($files, union_by_name=true) WHERE schema_version <= {SCHEMA_VERSION} "
                f"AND ({self.where})")

    def query(self, sql: str, extra: dict[str, Any] | None = None) -> Any:
        return self.con.execute(sql, {**self.params, **(extra or {})})

    def digest(self, problems: Problems) -> DigestTable:
        """Counts and pooled histograms of this side (two scans of the columns they need)."""
        if not self.ds.files:
            return DigestTable(0, 0, {}, {}, problems)
        names = list(CATEGORY_SQL)
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
        total, dry = self.query(f"SELECT count(*), coalesce(sum(CAST({DRY} AS BIGINT)), 0) FROM {self._from()}"
                                ).fetchone()
        hists = self._pooled()
        return DigestTable(int(total), int(dry), counts, hists, problems)

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
        return out

    def fetch_matrices(self, todo: list[tuple[ColumnarHist, Window]]) -> None:
        """One scan: per (metric, unit, window column) counts for each (metric, window) of ``todo``."""
        exprs = metric_sql()
        names = list(exprs)
        wanted = sorted({h.index for h, _ in todo})
        select = ", ".join(f"{exprs[names[i]]} AS m{i}" for i in wanted)
        values = ", ".join(f"({h.index}, {w.lo}, {w.factor}, {w.width})" for h, w in todo)
        col = "least(greatest((b - w.lo) // w.factor + 1, 0), w.width + 1)"
        got = self.query(
            f"WITH w(metric, lo, factor, width) AS (VALUES {values}), "
            f"u AS (SELECT hb, hu, CAST(substr(metric, 2) AS INTEGER) AS metric, {_bin('v')} AS b FROM "
            f"(UNPIVOT (SELECT {_UNIT_KEYS}, {select} FROM "
            f"{self._from()} AND NOT {DRY}) ON {', '.join(f'm{i}' for i in wanted)} INTO NAME metric VALUE v) "
            f"WHERE isfinite(v)) "
            f"SELECT u.metric, hb, hu, {col} AS col, count(*) AS c FROM u JOIN w ON u.metric = w.metric GROUP BY ALL"
        ).fetchnumpy()
        metric = np.asarray(got["metric"])
        for h, w in todo:
            sel = metric == h.index
            h.store(w, np.asarray(got["hb"])[sel].astype(np.uint64), np.asarray(got["hu"])[sel].astype(np.uint64),
                    np.asarray(got["col"])[sel].astype(np.int64), np.asarray(got["c"])[sel].astype(np.int64))


_UNIT_KEYS = (f"CASE WHEN {BOARD} IS NULL THEN 0 ELSE hash({BOARD}) END AS hb, "
              f"hash({BOARD}, {BOOT}) AS hu")


def prefetch(sides: list[Side], hists: list[list[ColumnarHist]], windows: list[list[Window | None]]) -> None:
    """Ask DuckDB, in one scan per side, for the per-unit counts of every metric in its window (the
    bootstrap's matrices), so a comparison costs a few scans per side, not a few per metric."""
    for side, hs, ws in zip(sides, hists, windows, strict=True):
        todo = [(h, w) for h, w in zip(hs, ws, strict=True) if w is not None and h.key(w) not in h.cache]
        if todo:
            side.fetch_matrices(todo)


class ColumnarHist(Hist):
    """A metric of a Side: pooled bins held; per-unit counts per window fetched by ``prefetch`` (or one
    query per window when asked first: cluster.Counts)."""

    def __init__(self, side: Side, index: int, expr: str, bins: IntArray, count: IntArray, total: float) -> None:
        order = np.argsort(bins)
        none = np.empty(0, dtype=np.int64)
        super().__init__(none, bins[order], count[order], none, [], total)
        self.side = side
        self.index = index
        self.expr = expr
        self.cache: dict[tuple[int, int, int], npt.NDArray[np.float32]] = {}
        self._unit_cache: tuple[npt.NDArray[np.uint64], IntArray, bool] | None = None  # hu, board index, known

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

    def store(self, w: Window, hb: npt.NDArray[np.uint64], hu: npt.NDArray[np.uint64], col: IntArray,
              count: IntArray) -> None:
        """Counts per (unit, column) from DuckDB; the units (and their order) are fixed by the first call."""
        if self._unit_cache is None:
            units, first = np.unique(hu, return_index=True)
            _, board_idx = np.unique(hb[first], return_inverse=True)
            self._unit_cache = (units, board_idx.reshape(-1).astype(np.int64), bool((hb != 0).any()))
        units = self._unit_cache[0]
        m = np.zeros((units.size, w.width + 2), dtype=np.float32)
        np.add.at(m, (np.searchsorted(units, hu), col), count.astype(np.float32))
        self.cache[self.key(w)] = m

    def matrix(self, w: Window) -> npt.NDArray[np.float32]:
        if self.key(w) not in self.cache:
            self.side.fetch_matrices([(self, w)])
        return self.cache[self.key(w)]

    def _unit_info(self) -> tuple[npt.NDArray[np.uint64], IntArray, bool]:
        if self._unit_cache is None:
            from lmkd_py.report.cluster import wide_window

            self.matrix(wide_window(self))
        assert self._unit_cache is not None  # set by the first matrix
        return self._unit_cache

    def unit_boards(self) -> IntArray:
        return self._unit_info()[1]

    @property
    def boards(self) -> int:
        return int(np.unique(self._unit_info()[1]).size)

    @property
    def boots(self) -> int:
        return int(self._unit_info()[0].size)

    @property
    def known(self) -> bool:
        return self._unit_info()[2]

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


__all__ = ["ColumnarHist", "Dataset", "Side", "board_medians", "check_files", "metric_sql", "open_engine", "prefetch"]
