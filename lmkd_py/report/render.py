"""Rendering of reports and comparisons: terminal table, Markdown and JSON (no third-party imports).

JSON of a comparison (the contract the kernel reviewers' tooling reads)::

    {"a_label": ..., "b_label": ...,
     "metrics": [{"name", "unit", "a": {"n", "median", "ci": [lo, hi], "p90", "mean"}, "b": {...},
                  "diff_median", "diff_pct", "diff_ci": [lo, hi], "p_value"}],
     "warnings": [...], "problems": [...]}

Differences are B - A; ``diff_pct`` is relative to A's median. Unknown values are ``null`` (never NaN,
which is not JSON). Times are milliseconds; units are given per metric.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lmkd_py.records import Problems
from lmkd_py.report.stats import Comparison, GroupReport, Row, Side, Units
from lmkd_py.text import printable

PROBLEMS_SHOWN = 20  # skipped-line notes printed in text output; JSON carries up to 1000
LABEL_CHARS = 120  # a kernel release or machine model longer than this is cut (and says so)
NOTE_CHARS = 1000  # a warning or a skipped-line note (they quote labels and paths)
_MD_SPECIAL = re.compile(r"([\\`*{}\[\]<>()#+!|~&$])")


def md_escape(text: str) -> str:
    """``text`` with every Markdown/HTML-active character backslash-escaped (CommonMark escapes any ASCII
    punctuation): a label cannot open a link, an image, an HTML tag or a table cell. ``_`` is left alone:
    inside a word it is not emphasis, and metric names are full of it."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def label(text: str | None, markdown: bool, max_chars: int = LABEL_CHARS) -> str:
    """A value from the records (kernel release, machine model, errno name...) made safe to show:
    control characters escaped (no ANSI sequence or newline reaches the terminal), cut to ``max_chars``,
    and Markdown-escaped in Markdown."""
    shown = "unknown" if text is None else printable(text, max_chars=max_chars)
    return md_escape(shown) if markdown else shown


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/infinite float replaced by None: JSON has no NaN (``allow_nan=False`` below
    proves none is left)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(_finite(doc), indent=2, allow_nan=False)


def fmt(x: float | None) -> str:
    """A number at a precision that suits a table cell; ``-`` for unknown."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _ci(ci: tuple[float | None, float | None]) -> str:
    return "-" if ci[0] is None or ci[1] is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _grid(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    """A table of cells already made safe to show: values from records go in through ``label``, which
    escapes them for the format; the rest (metric names, numbers, units) is this module's own text."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        # First column (names) left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def problems_text(problems: Problems, markdown: bool) -> list[str]:
    """The first PROBLEMS_SHOWN notes on skipped input, indented, escaped, and how many more there were."""
    shown = [f"  {label(p, markdown, NOTE_CHARS)}" for p in problems[:PROBLEMS_SHOWN]]
    if len(problems) > PROBLEMS_SHOWN:
        shown.append(f"  ... and {len(problems) - PROBLEMS_SHOWN} more")
    return shown


def _hist(counts: dict[str | None, int], markdown: bool, shown: int = 12) -> str:
    items = list(counts.items())
    text = ", ".join(f"{label(k, markdown)} {v}" for k, v in items[:shown]) or "none"
    return text + (f", and {len(items) - shown} other values" if len(items) > shown else "")


def _bin_label(lo: float, hi: float) -> str:
    def size(mib: float) -> str:
        return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib:g} MiB"

    return f">= {size(lo)}" if math.isinf(hi) else f"{size(lo)}-{size(hi)}"


def render_report(groups: list[GroupReport], problems: Problems, fmt_name: str) -> str:
    """The report in ``fmt_name`` ("table", "markdown" or "json")."""
    if fmt_name == "json":
        return _json(
            {
                "groups": [_group_json(g) for g in groups],
                "problems": list(problems[:1000]),
                "problems_total": len(problems),
            }
        )
    md = fmt_name == "markdown"
    out: list[str] = []
    if not groups:
        out.append("no records")
    for g in groups:
        title = f"kernel {label(g.kernel_release, md)} / machine {label(g.machine_model, md)}"
        if g.setting is not None:
            title += f" / {g.setting[0]} {label(g.setting[1], md)}"
        out += [f"## {title}" if md else title, ""]
        out.append(f"records: {g.records} ({g.dry_runs} dry runs, not in the latencies)")
        out.append(f"outcomes: {_hist(g.outcomes, md)}")
        out.append(f"process_mrelease: {_hist(g.mrelease_status, md)}")
        out.append(f"errno: {_hist(g.errno, md)}")
        out.append("")
        rows = [
            [m.name, m.unit, str(s.n), fmt(s.median), fmt(s.p90), fmt(s.p99), fmt(s.mean)] for m, s in g.metrics if s.n
        ]
        if rows:
            out += _grid(["metric", "unit", "n", "median", "p90", "p99", "mean"], rows, md)
        else:
            out.append("no latency values (all dry runs, or no metric fields filled)")
        missing = [m.name for m, s in g.metrics if not s.n]
        if missing and rows:
            out += ["", f"no values: {', '.join(missing)}"]
        out.append("")
        out += _grid(["victim RSS", "records"], [[_bin_label(lo, hi), str(c)] for lo, hi, c in g.size_bins], md)
        out.append("")
    if problems:
        out += ["skipped lines:", *problems_text(problems, md)]
    return "\n".join(out).rstrip() + "\n"


def _group_json(g: GroupReport) -> dict[str, Any]:
    return {
        "kernel_release": g.kernel_release,
        "machine_model": g.machine_model,
        **({"setting": {"name": g.setting[0], "value": g.setting[1]}} if g.setting is not None else {}),
        "records": g.records,
        "dry_runs": g.dry_runs,
        "outcomes": _keyed(g.outcomes),
        "mrelease_status": _keyed(g.mrelease_status),
        "errno": _keyed(g.errno),
        "metrics": [
            {"name": m.name, "unit": m.unit, "n": s.n, "median": s.median, "p90": s.p90, "p99": s.p99, "mean": s.mean}
            for m, s in g.metrics
        ],
        "victim_rss_bins": [
            {"lo_mib": lo, "hi_mib": None if math.isinf(hi) else hi, "count": c} for lo, hi, c in g.size_bins
        ],
    }


def _keyed(counts: dict[str | None, int]) -> dict[str, int]:
    return {("unknown" if k is None else k): v for k, v in counts.items()}


def _side_json(s: Side) -> dict[str, Any]:
    return {"n": s.n, "median": s.median, "ci": list(s.ci), "p90": s.p90, "mean": s.mean}


def _row_json(r: Row) -> dict[str, Any]:
    return {
        "name": r.name,
        "unit": r.unit,
        "a": _side_json(r.a),
        "b": _side_json(r.b),
        "diff_median": r.diff_median,
        "diff_pct": r.diff_pct,
        "diff_ci": list(r.diff_ci),
        "diff_pct_ci": list(r.diff_pct_ci),
        "p_value": r.p_value,
    }


# The seed thread's table: one row per kernel, the medians the reviewers asked for (ms), n and boards.
SEED_COLUMNS = (("total", "reap_total"), ("exit_mmap", "exit_mmap"), ("reaper work", "reaper_work"),
                ("lock wait", "mmap_lock_wait"))


def _units_json(u: Units | None) -> dict[str, Any] | None:
    return None if u is None else {"records": u.records, "boards": u.boards, "boots": u.boots, "design": u.design}


def seed_table(cmp: Comparison, md: bool) -> list[str]:
    """The seed thread's table shape: kernel, total, exit_mmap, reaper work, lock wait (medians in ms with
    95 % CIs), n, boards; and the difference B - A with its CI and the relative change."""
    rows = {r.name: r for r in cmp.rows}
    units = cmp.units
    out = []
    for i, name in enumerate((cmp.label_a, cmp.label_b)):
        cells = [label(name, md)]
        for _, metric in SEED_COLUMNS:
            r = rows.get(metric)
            side = None if r is None else (r.a if i == 0 else r.b)
            cells.append("-" if side is None or side.median is None else f"{fmt(side.median)} {_ci(side.ci)}")
        cells.append(str(units[i].records) if units else "-")
        cells.append(str(units[i].boards) if units else "-")
        out.append(cells)
    diff = [f"{label(cmp.label_b, md)} - {label(cmp.label_a, md)}"]
    for _, metric in SEED_COLUMNS:
        r = rows.get(metric)
        if r is None or r.diff_median is None:
            diff.append("-")
        else:
            pct = "" if r.diff_pct is None else f" ({r.diff_pct:+.1f}%)"
            diff.append(f"{fmt(r.diff_median)} {_ci(r.diff_ci)}{pct}")
    out.append([*diff, "", ""])
    header = ["kernel", *(f"{h} (ms)" for h, _ in SEED_COLUMNS), "n", "boards"]
    return _grid(header, out, md)


def render_comparison(cmp: Comparison, problems: Problems, fmt_name: str, gate: str | None = None) -> str:
    """The comparison in ``fmt_name`` ("table", "markdown" or "json"); B - A in the differences.
    ``gate``: the --fail-if verdict line (the caller prints it first; JSON carries it as "gate")."""
    if fmt_name == "json":
        return _json(
            {
                "a_label": cmp.label_a,
                "b_label": cmp.label_b,
                **({"gate": gate} if gate is not None else {}),
                "sides": {"a": _units_json(cmp.units[0] if cmp.units else None),
                          "b": _units_json(cmp.units[1] if cmp.units else None)},
                "paired_boards": cmp.paired_boards,
                "metrics": [_row_json(r) for r in cmp.rows],
                "warnings": cmp.warnings,
                "problems": list(problems[:1000]),
                "problems_total": len(problems),
            }
        )
    md = fmt_name == "markdown"
    a, b = label(cmp.label_a, md), label(cmp.label_b, md)
    header = [
        "metric",
        "unit",
        f"{a} n",
        f"{a} median [95% CI]",
        f"{a} p90",
        f"{a} mean",
        f"{b} n",
        f"{b} median [95% CI]",
        f"{b} p90",
        f"{b} mean",
        "diff median",
        "diff %",
        "diff 95% CI",
        "MWU p",
    ]
    rows = []
    for r in cmp.rows:
        if r.a.n == 0 and r.b.n == 0:
            continue  # listed in the warnings; an all-dash row only hides the others
        rows.append(
            [
                r.name,
                r.unit,
                str(r.a.n),
                f"{fmt(r.a.median)} {_ci(r.a.ci)}",
                fmt(r.a.p90),
                fmt(r.a.mean),
                str(r.b.n),
                f"{fmt(r.b.median)} {_ci(r.b.ci)}",
                fmt(r.b.p90),
                fmt(r.b.mean),
                fmt(r.diff_median),
                "-" if r.diff_pct is None else f"{r.diff_pct:+.1f}%",
                _ci(r.diff_ci),
                fmt_p(r.p_value),
            ]
        )
    out = [f"## {b} vs {a}" if md else f"{b} vs {a} (differences are {b} - {a})", ""]
    if cmp.units:
        for name, u in ((a, cmp.units[0]), (b, cmp.units[1])):
            out.append(f"{name}: {u.records} records, {u.boards} board(s), {u.boots} boot(s)"
                       + ("" if u.design == "records" else f"; CIs resampled over {u.design}"))
        if cmp.paired_boards is not None:
            out.append(f"paired: {cmp.paired_boards} board(s) ran both; differences within boards, then across")
        out.append("")
    if md and rows:
        out += [*seed_table(cmp, md), ""]
    out += _grid(header, rows, md) if rows else ["no values to compare"]
    if cmp.warnings:
        out += ["", "warnings:", *(f"- {label(w, md, NOTE_CHARS)}" for w in cmp.warnings)]
    if problems:
        out += ["", "skipped lines:", *problems_text(problems, md)]
    return "\n".join(out).rstrip() + "\n"
