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
            out[name] = ColumnarHist(self, exprs[name], got["b"][sel].astype(np.int64),
                                     got["c"][sel].astype(np.int64), float(got["s"][sel].sum()))
        return out


class ColumnarHist(Hist):
    """A metric of a Side: pooled bins held, per-boot counts asked of DuckDB per window (cluster.Counts)."""

    def __init__(self, side: Side, expr: str, bins: IntArray, count: IntArray, total: float) -> None:
        order = np.argsort(bins)
        none = np.empty(0, dtype=np.int64)
        super().__init__(none, bins[order], count[order], none, [], total)
        self.side = side
        self.expr = expr
        self._unit_info: tuple[IntArray, list[str | None], int] | None = None

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def pooled(self) -> tuple[IntArray, IntArray]:
        return self.bins, self.count

    def quantiles(self, qs: list[float]) -> list[float | None]:
        return quantiles(self.bins, self.count, qs)

    def _values(self) -> str:
        return f"SELECT {BOARD} AS board, {BOOT} AS boot, {self.expr} AS v FROM {self.side._from()} AND NOT {DRY}"

    def _units(self) -> IntArray:
        return np.arange(self._info()[0].size)

    def _info(self) -> tuple[IntArray, list[str | None], int]:
        """Each unit's board index (units ordered by board, boot), the board labels, and the boots."""
        if self._unit_info is None:
            got = self.side.query(
                f"SELECT board, count(DISTINCT coalesce(boot, '')) FROM ({self._values()}) WHERE isfinite(v) "
                f"GROUP BY board ORDER BY board NULLS LAST"
            ).fetchall()
            labels: list[str | None] = [row[0] for row in got]
            per_board = [int(row[1]) for row in got]
            boards = np.repeat(np.arange(len(labels), dtype=np.int64), per_board)
            self._unit_info = (boards, labels, int(sum(per_board)))
        return self._unit_info

    @property
    def boards(self) -> int:
        return len(self._info()[1])

    @property
    def boots(self) -> int:
        return self._info()[2]

    @property
    def known(self) -> bool:
        return any(lab is not None for lab in self._info()[1])

    def board_set(self) -> set[str]:
        return {lab for lab in self._info()[1] if lab is not None}

    def unit_boards(self) -> IntArray:
        return self._info()[0]

    def matrix(self, w: Window) -> npt.NDArray[np.float32]:
        col = f"least(greatest(({_bin('v')} - {w.lo}) // {w.factor} + 1, 0), {w.width + 1})"
        got = self.side.query(
            f"WITH u AS (SELECT board, coalesce(boot, '') AS boot, v FROM ({self._values()}) WHERE isfinite(v)), "
            f"k AS (SELECT board, boot, row_number() OVER (ORDER BY board NULLS LAST, boot) - 1 AS unit "
            f"FROM (SELECT DISTINCT board, boot FROM u)) "
            f"SELECT k.unit, {col} AS col, count(*) AS c FROM u JOIN k ON u.board IS NOT DISTINCT FROM k.board "
            f"AND u.boot = k.boot GROUP BY ALL"
        ).fetchnumpy()
        m = np.zeros((self._info()[2], w.width + 2), dtype=np.float32)
        np.add.at(m, (got["unit"].astype(np.int64), got["col"].astype(np.int64)), got["c"].astype(np.float32))
        return m

    def board_medians(self) -> dict[str, float]:
        got = self.side.query(
            f"SELECT board, median(v) FROM ({self._values()}) WHERE isfinite(v) AND board IS NOT NULL GROUP BY board"
        ).fetchall()
        return {b: float(m) for b, m in got if m is not None and math.isfinite(m)}


def open_engine(tmp: Path | None = None) -> Any:
    """A DuckDB connection for the analysis (bounded memory and threads)."""
    return connect(tmp)


__all__ = ["ColumnarHist", "Dataset", "Side", "board_medians", "check_files", "metric_sql", "open_engine"]
