"""``lmkd-py report`` and ``lmkd-py compare``: offline summaries and A/B comparison of kill records.

This module is what ``cli.py`` imports, so it imports nothing from the optional ``report`` extra at
module level: numpy, scipy and matplotlib are loaded inside the commands (through ``data``,
``stats``, ``render`` and ``plots``), and a daemon installed without the extra
never needs them.

Both commands return 0 on success and 2 on bad input (a file that cannot be opened, a directory or a device
given as a record file, a plot that cannot be written), with a message naming the file on stderr. Record
files are untrusted: lines that are not records (damaged, truncated, longer than 1 MiB, of a newer schema
version) are skipped, counted and named as ``file:line`` on stderr and in the JSON output; they do not make
the command fail, and the other records are analysed. Values from the records are escaped in the text and
Markdown output (control characters, Markdown/HTML), and JSON output never holds NaN or Infinity.
"""

from __future__ import annotations

import argparse
import shutil
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from lmkd_py.records import Problems
from lmkd_py.text import printable

if TYPE_CHECKING:
    from lmkd_py.report.columnar import Dataset, Side
    from lmkd_py.report.data import AnyTable, RecordTable
    from lmkd_py.report.gate import Gate
    from lmkd_py.report.sources import Source
    from lmkd_py.report.stats import Comparison, GroupReport

EXTRA_HINT = "install the report extra: pip install 'lmkd-py[report]'"
FORMATS = ("table", "markdown", "json")
BY_CATEGORY = {"kernel": "kernel_release", "machine": "machine_model"}


class _BadInput(Exception):
    """Input the user must fix; the message is printed as is and the command exits 2."""


def missing_extra(plots: bool) -> str | None:
    """None when the report extra is importable, else the message to print."""
    import importlib.util

    # Found, not imported: scipy.stats alone takes 0.8 s, and the columnar compare never needs it.
    modules = ["numpy", "scipy.stats"] + (["matplotlib"] if plots else [])
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError as exc:
            return f"{name} is not available ({exc}); {EXTRA_HINT}"
        if not found:
            return f"{name} is not available; {EXTRA_HINT}"
    return None


def _sources(paths: Sequence[Path], problems: Problems) -> list[Source]:
    from lmkd_py.report.sources import InputError, expand

    if not paths:
        raise _BadInput("no record files given")
    try:
        return expand(list(paths), problems)
    except InputError as exc:
        raise _BadInput(str(exc)) from exc


def _load(paths: Sequence[Path], engines: list[_Engine]) -> AnyTable:
    """The records of ``paths`` (files, directories, globs): in memory when all are JSONL, else (any
    Parquet dataset among them) as a digest from the columnar engine (JSONL among them exported first).
    The engine is appended to ``engines``: the digest asks it for more while it is compared; the
    caller closes it."""
    from lmkd_py.report.data import load_table

    problems = Problems()
    sources = _sources(paths, problems)
    if any(s.kind == "parquet" for s in sources):
        if not engines:
            engines.append(_Engine())
        return engines[0].side(sources, problems).digest(problems)
    try:
        return load_table(sources, problems)
    except OSError as exc:
        raise _BadInput(f"{printable(str(exc.filename or ''))}: {exc.strerror or exc}") from exc


class _Engine:
    """The columnar engine for one command: a DuckDB connection, and a temporary dataset for JSONL
    inputs given beside Parquet ones (removed at close)."""

    def __init__(self) -> None:
        try:
            from lmkd_py.report.columnar import open_engine
        except ImportError as exc:
            raise _BadInput(f"Parquet needs duckdb, which is not available ({exc}); {EXTRA_HINT}") from exc

        self._tmp = Path(tempfile.mkdtemp(prefix="lmkd-py-report-"))
        self.con = open_engine(self._tmp)

    def dataset(self, sources: list[Source], problems: Problems) -> Dataset:
        from lmkd_py.report.columnar import check_files
        from lmkd_py.report.export import export
        from lmkd_py.report.sources import expand

        jsonl = [s for s in sources if s.kind != "parquet"]
        parquet = [s for s in sources if s.kind == "parquet"]
        if jsonl:
            staged = Path(tempfile.mkdtemp(prefix="jsonl-", dir=self._tmp))
            try:
                export(jsonl, staged, problems)
            except OSError as exc:
                raise _BadInput(f"cannot stage JSONL records for the columnar engine: {exc}") from exc
            parquet += expand([staged], problems)
        return check_files(self.con, parquet, problems)

    def side(self, sources: list[Source], problems: Problems) -> Side:
        from lmkd_py.report.columnar import Side

        return Side(self.con, self.dataset(sources, problems))

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def _check_file(path: Path) -> None:
    """A regular file or a pipe (``<(zcat ...)``); a device such as /dev/zero or /dev/urandom never ends
    and holds no records, so it is refused up front rather than read forever."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise _BadInput(f"{printable(str(path))}: {exc.strerror or exc}") from exc
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "a device or socket"
        raise _BadInput(f"{printable(str(path))}: not a record file ({kind})")


def _problems(problems: Problems, err: TextIO) -> None:
    from lmkd_py.report.render import problems_text

    if not problems:
        return
    print(f"skipped {len(problems)} unreadable line(s) or value(s):", file=err)
    for line in problems_text(problems, markdown=False):
        print(line, file=err)


def _check_common(args: argparse.Namespace) -> tuple[str, Path | None]:
    fmt = getattr(args, "format", "table") or "table"
    if fmt not in FORMATS:
        raise _BadInput(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    plots = getattr(args, "plots", None)
    if plots is not None and Path(plots).exists() and not Path(plots).is_dir():
        raise _BadInput(f"{plots}: --plots needs a directory, this is a file")
    msg = missing_extra(plots is not None)
    if msg:
        raise _BadInput(msg)
    return fmt, None if plots is None else Path(plots)


def cmd_report(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Summarise record files per kernel release and machine model.

    ``args``: ``files`` (files, directories, globs), ``format`` ("table" | "markdown" | "json"), ``plots``
    (Path or None: directory for PNG ECDF and box plots; JSONL inputs only), ``group_by``. Returns 0, or 2
    on bad input (message on stderr).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    engines: list[_Engine] = []
    try:
        try:
            fmt, plots = _check_common(args)
            problems = Problems()
            sources = _sources(list(args.files), problems)
            columnar = any(s.kind == "parquet" for s in sources)
            if columnar and plots is not None:
                raise _BadInput("--plots needs the records themselves: give JSONL files, not a Parquet dataset")
        except _BadInput as exc:
            print(f"lmkd-py report: {exc}", file=err)
            return 2
        from lmkd_py.report.render import render_report
        from lmkd_py.report.stats import report_groups

        group_by = getattr(args, "group_by", None)
        if columnar:
            engines.append(_Engine())
            groups = _columnar_groups(engines[0], sources, problems, group_by)
        else:
            from lmkd_py.report.data import load_table

            try:
                table = load_table(sources, problems)
            except OSError as exc:
                print(f"lmkd-py report: {printable(str(exc.filename or ''))}: {exc.strerror or exc}", file=err)
                return 2
            groups = report_groups(table, group_by)
        _problems(problems, err)
        out.write(render_report(groups, problems, fmt))
        if plots is not None and not columnar:
            return _report_plots(table, plots, err)
        return 0
    finally:
        for e in engines:
            e.close()


def _columnar_groups(engine: _Engine, sources: list[Source], problems: Problems, group_by: str | None
                     ) -> list[GroupReport]:
    from lmkd_py.report.columnar import CATEGORY_SQL, Side
    from lmkd_py.report.fleetstats import digest_report

    ds = engine.dataset(sources, problems)
    keys = ["kernel_release", "machine_model"] + ([group_by] if group_by else [])
    if not ds.files:
        return []
    probe = Side(engine.con, ds)
    cols = ", ".join(f"{CATEGORY_SQL[k]} AS k{i}" for i, k in enumerate(keys))
    found = probe.query(f"SELECT DISTINCT {cols} FROM {probe._from()}").fetchall()
    out = []
    for key in sorted(found, key=lambda k: tuple("" if x is None else x for x in k)):
        where = " AND ".join(f"{CATEGORY_SQL[k]} IS NOT DISTINCT FROM $k{i}" for i, k in enumerate(keys))
        side = Side(engine.con, ds, where, {f"k{i}": v for i, v in enumerate(key)})
        out.append(digest_report(key, side.digest(problems), group_by))
    return out


def _report_plots(table: RecordTable, plots: Path, err: TextIO) -> int:
    from lmkd_py.report.data import metrics_for
    from lmkd_py.report.plots import plot_metric
    from lmkd_py.report.stats import groups as split

    parts = split(table, ("kernel_release", "machine_model"))
    try:
        for m in metrics_for(*(t for _, t in parts)):
            series = [(" / ".join(k or "unknown" for k in key), t.values(m.column) * m.scale) for key, t in parts]
            plot_metric(plots, m, series)
    except OSError as exc:
        return _plots_failed("report", exc, err)
    return 0


def _plots_failed(cmd: str, exc: OSError, err: TextIO) -> int:
    # The summary is already out; say which plot could not be written rather than show a traceback.
    print(f"lmkd-py {cmd}: cannot write plots: {printable(str(exc.filename or ''))}: {exc.strerror or exc}", file=err)
    return 2


def _split_by(args: argparse.Namespace, by: str, engines: list[_Engine]) -> tuple[AnyTable, AnyTable, str, str]:
    from lmkd_py.report.stats import groups

    category = BY_CATEGORY.get(by)
    if category is None:
        raise _BadInput(f"--by {by!r}: choose one of {', '.join(BY_CATEGORY)}")
    if getattr(args, "a", None) or getattr(args, "b", None):
        raise _BadInput("give either --a/--b or --by with files, not both")
    problems = Problems()
    sources = _sources(list(getattr(args, "files", None) or []), problems)
    if any(s.kind == "parquet" for s in sources):
        engines.append(_Engine())
        parts = _columnar_parts(engines[0], sources, problems, category)
    else:
        from lmkd_py.report.data import load_table

        table = load_table(sources, problems)
        parts = {("unknown" if key[0] is None else key[0]): t for key, t in groups(table, (category,))}
    label_a, label_b = getattr(args, "label_a", None), getattr(args, "label_b", None)
    if label_a is None and label_b is None:
        if len(parts) != 2:
            raise _BadInput(
                f"--by {by} needs exactly two values of {category} in the files, found {len(parts)}: "
                f"{_found(parts)}; pick two with --label-a and --label-b"
            )
        label_a, label_b = sorted(parts)
    for label in (label_a, label_b):
        if label not in parts:
            raise _BadInput(f"no records with {category} {printable(repr(label))}; found: {_found(parts)}")
    assert label_a is not None and label_b is not None  # both checked against parts just above
    a, b = parts[label_a], parts[label_b]
    a = a.digest() if isinstance(a, _Deferred) else a
    b = b.digest() if isinstance(b, _Deferred) else b
    return a, b, label_a, label_b


def _columnar_parts(engine: _Engine, sources: list[Source], problems: Problems, category: str) -> dict[str, Any]:
    from lmkd_py.report.columnar import CATEGORY_SQL, Side

    ds = engine.dataset(sources, problems)
    if not ds.files:
        return {}
    probe = Side(engine.con, ds)
    found = [r[0] for r in probe.query(f"SELECT DISTINCT {CATEGORY_SQL[category]} FROM {probe._from()}").fetchall()]
    out: dict[str, Any] = {}
    for value in found:
        side = Side(engine.con, ds, f"{CATEGORY_SQL[category]} IS NOT DISTINCT FROM $v", {"v": value})
        out["unknown" if value is None else value] = _Deferred(side, problems)
    return out


class _Deferred:
    def __init__(self, side: Side, problems: Problems) -> None:
        self.side, self.problems = side, problems

    def digest(self) -> AnyTable:
        return self.side.digest(self.problems)


def _found(parts: dict[str, Any], shown: int = 10) -> str:
    """The values found, as a reader can take them: escaped, cut short, at most ``shown`` of them."""
    names = [printable(repr(k[:80])) for k in sorted(parts)]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def cmd_compare(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Compare two record sets metric by metric (B - A), or one set split ``--by`` kernel or machine.

    ``args``: ``a``/``b`` (files, directories, globs; or None with ``by``), ``by`` ("kernel" | "machine" |
    None), ``files`` (with ``by``), ``format``, ``plots``, ``seed`` (bootstrap seed, default 0),
    ``resamples`` (default 2000), ``label_a``/``label_b`` (names of the sides; with ``by``, the two values
    to compare), ``paired`` (compare within boards), ``fail_if`` (list of gates, see gate.py).
    Returns 0; 1 when a --fail-if gate fails (the verdict is the first line of the output); 2 on bad
    input (message on stderr).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    engines: list[_Engine] = []
    try:
        return _compare(args, out, err, engines)
    finally:
        for e in engines:
            e.close()


def _compare(args: argparse.Namespace, out: TextIO, err: TextIO, engines: list[_Engine]) -> int:
    from lmkd_py.report.gate import GateError, parse

    try:
        fmt, plots = _check_common(args)
        resamples = getattr(args, "resamples", None)
        resamples = 2000 if resamples is None else int(resamples)
        if resamples < 100:
            raise _BadInput(f"--resamples {resamples}: use at least 100 for a 95 % interval")
        try:
            gates = [parse(g) for g in getattr(args, "fail_if", None) or []]
        except GateError as exc:
            raise _BadInput(str(exc)) from exc
        by = getattr(args, "by", None)
        if by:
            a, b, label_a, label_b = _split_by(args, by, engines)
            problems = a.problems
        else:
            if not getattr(args, "a", None) or not getattr(args, "b", None):
                raise _BadInput("give record files for both sides (--a FILE... --b FILE...) or --by with files")
            a, b = _load(list(args.a), engines), _load(list(args.b), engines)
            label_a = getattr(args, "label_a", None) or "A"
            label_b = getattr(args, "label_b", None) or "B"
            problems = Problems.combined(a.problems, b.problems)
        if plots is not None and not (isinstance(a, RecordTableType()) and isinstance(b, RecordTableType())):
            raise _BadInput("--plots needs the records themselves: give JSONL files, not a Parquet dataset")
    except _BadInput as exc:
        print(f"lmkd-py compare: {exc}", file=err)
        return 2
    from lmkd_py.report.render import render_comparison
    from lmkd_py.report.stats import BootstrapOptions, compare_tables

    seed = getattr(args, "seed", None)
    opts = BootstrapOptions(resamples=resamples, seed=0 if seed is None else int(seed),
                            paired=bool(getattr(args, "paired", False)))
    cmp = compare_tables(a, b, label_a, label_b, opts)
    try:
        verdict = _gates(gates, cmp)
    except _BadInput as exc:
        print(f"lmkd-py compare: {exc}", file=err)
        return 2
    _problems(problems, err)
    if verdict is not None:
        if fmt == "json":
            print(verdict[0], file=err)  # the JSON document stays parseable; its "gate" key holds it too
        else:
            out.write(verdict[0] + "\n\n")
    out.write(render_comparison(cmp, problems, fmt, gate=None if verdict is None else verdict[0]))
    if plots is not None:
        from lmkd_py.report.data import metrics_for
        from lmkd_py.report.plots import plot_metric

        assert isinstance(a, RecordTableType()) and isinstance(b, RecordTableType())  # checked above
        try:
            for m in metrics_for(a, b):
                sides = [(label_a, a.values(m.column) * m.scale), (label_b, b.values(m.column) * m.scale)]
                plot_metric(plots, m, sides)
        except OSError as exc:
            return _plots_failed("compare", exc, err)
    return 1 if verdict is not None and verdict[1] else 0


def RecordTableType() -> type[RecordTable]:  # a class, imported on use (numpy)
    from lmkd_py.report.data import RecordTable

    return RecordTable


def _gates(gates: list[Gate], cmp: Comparison) -> tuple[str, bool] | None:
    """The verdict line and whether any gate failed; None without gates."""
    from lmkd_py.report.gate import judge, summary

    if not gates:
        return None
    rows = {r.name: r for r in cmp.rows}
    verdicts = []
    for g in gates:
        row = rows.get(g.metric)
        if row is None:
            raise _BadInput(f"--fail-if {g.text}: no metric {g.metric!r}; choose one of {', '.join(rows)}")
        if g.unit == "%":
            verdicts.append(judge(g, row.name, "%", row.diff_pct, row.diff_pct_ci))
        elif g.unit == row.unit:
            verdicts.append(judge(g, row.name, row.unit, row.diff_median, row.diff_ci))
        else:
            raise _BadInput(f"--fail-if {g.text}: {g.metric} is in {row.unit}; give the threshold in % or {row.unit}")
    line = summary(verdicts)
    return line, any(v.failed for v in verdicts)


def cmd_export(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Write the records of ``args.files`` into the Parquet dataset ``args.parquet`` (appending).

    Returns 0 (skipped lines and files named on stderr), or 2 on bad input or an unwritable directory.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    problems = Problems()
    try:
        try:
            import duckdb  # noqa: F401  # only to say what is missing before reading anything
        except ImportError as exc:
            raise _BadInput(f"duckdb is not available ({exc}); {EXTRA_HINT}") from exc
        sources = _sources(list(args.files), problems)
        from lmkd_py.report.export import export

        try:
            result = export(sources, Path(args.parquet), problems)
        except OSError as exc:
            raise _BadInput(f"{printable(str(exc.filename or args.parquet))}: {exc.strerror or exc}") from exc
    except _BadInput as exc:
        print(f"lmkd-py export: {exc}", file=err)
        return 2
    _problems(problems, err)
    print(f"exported {result.records} records from {result.files} file(s) to {printable(str(args.parquet))}", file=out)
    return 0
