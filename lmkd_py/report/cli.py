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
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lmkd_py.records import Problems
from lmkd_py.text import printable

if TYPE_CHECKING:
    from lmkd_py.report.data import RecordTable

EXTRA_HINT = "install the report extra: pip install 'lmkd-py[report]'"
FORMATS = ("table", "markdown", "json")
BY_CATEGORY = {"kernel": "kernel_release", "machine": "machine_model"}


class _BadInput(Exception):
    """Input the user must fix; the message is printed as is and the command exits 2."""


def missing_extra(plots: bool) -> str | None:
    """None when the report extra is importable, else the message to print."""
    modules = ["numpy", "scipy.stats"] + (["matplotlib"] if plots else [])
    for name in modules:
        try:
            __import__(name)
        except ImportError as exc:
            return f"{name} is not available ({exc}); {EXTRA_HINT}"
    return None


def _load(paths: Sequence[Path]) -> RecordTable:
    from lmkd_py.report.data import load_table

    if not paths:
        raise _BadInput("no record files given")
    for path in paths:
        _check_file(Path(path))
    try:
        return load_table(paths)
    except OSError as exc:
        raise _BadInput(f"{printable(str(exc.filename or ''))}: {exc.strerror or exc}") from exc


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

    ``args``: ``files`` (list of Path), ``format`` ("table" | "markdown" | "json"), ``plots`` (Path or
    None: directory for PNG ECDF and box plots). Returns 0, or 2 on bad input (message on stderr).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        fmt, plots = _check_common(args)
        table = _load(list(args.files))
    except _BadInput as exc:
        print(f"lmkd-py report: {exc}", file=err)
        return 2
    from lmkd_py.report.render import render_report
    from lmkd_py.report.stats import report_groups

    groups = report_groups(table, getattr(args, "group_by", None))
    _problems(table.problems, err)
    out.write(render_report(groups, table.problems, fmt))
    if plots is not None:
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


def _split_by(args: argparse.Namespace, by: str) -> tuple[RecordTable, RecordTable, str, str]:
    from lmkd_py.report.stats import groups

    category = BY_CATEGORY.get(by)
    if category is None:
        raise _BadInput(f"--by {by!r}: choose one of {', '.join(BY_CATEGORY)}")
    if getattr(args, "a", None) or getattr(args, "b", None):
        raise _BadInput("give either --a/--b or --by with files, not both")
    table = _load(list(getattr(args, "files", None) or []))
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
    return parts[label_a], parts[label_b], label_a, label_b


def _found(parts: dict[str, RecordTable], shown: int = 10) -> str:
    """The values found, as a reader can take them: escaped, cut short, at most ``shown`` of them."""
    names = [printable(repr(k[:80])) for k in sorted(parts)]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def cmd_compare(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Compare two record sets metric by metric (B - A), or one set split ``--by`` kernel or machine.

    ``args``: ``a``/``b`` (lists of Path, or None with ``by``), ``by`` ("kernel" | "machine" | None),
    ``files`` (with ``by``), ``format``, ``plots``, ``seed`` (bootstrap seed, default 0), ``resamples``
    (default 2000), ``label_a``/``label_b`` (names of the sides; with ``by``, the two values to compare).
    Returns 0, or 2 on bad input (message on stderr).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        fmt, plots = _check_common(args)
        resamples = getattr(args, "resamples", None)
        resamples = 2000 if resamples is None else int(resamples)
        if resamples < 100:
            raise _BadInput(f"--resamples {resamples}: use at least 100 for a 95 % interval")
        by = getattr(args, "by", None)
        if by:
            a, b, label_a, label_b = _split_by(args, by)
            problems = a.problems
        else:
            if not getattr(args, "a", None) or not getattr(args, "b", None):
                raise _BadInput("give record files for both sides (--a FILE... --b FILE...) or --by with files")
            a, b = _load(list(args.a)), _load(list(args.b))
            label_a = getattr(args, "label_a", None) or "A"
            label_b = getattr(args, "label_b", None) or "B"
            problems = Problems.combined(a.problems, b.problems)
    except _BadInput as exc:
        print(f"lmkd-py compare: {exc}", file=err)
        return 2
    from lmkd_py.report.render import render_comparison
    from lmkd_py.report.stats import BootstrapOptions, compare_tables

    seed = getattr(args, "seed", None)
    opts = BootstrapOptions(resamples=resamples, seed=0 if seed is None else int(seed))
    cmp = compare_tables(a, b, label_a, label_b, opts)
    _problems(problems, err)
    out.write(render_comparison(cmp, problems, fmt))
    if plots is not None:
        from lmkd_py.report.data import metrics_for
        from lmkd_py.report.plots import plot_metric

        try:
            for m in metrics_for(a, b):
                sides = [(label_a, a.values(m.column) * m.scale), (label_b, b.values(m.column) * m.scale)]
                plot_metric(plots, m, sides)
        except OSError as exc:
            return _plots_failed("compare", exc, err)
    return 0
