"""PNG plots of record sets: an ECDF and a box plot per metric (optional ``report`` extra: matplotlib).

Uses ``matplotlib.figure.Figure`` directly rather than pyplot: no global figure registry and no GUI
backend is touched, so this works headless and leaves no state behind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from lmkd_py.report.data import FloatArray, Metric
from lmkd_py.text import printable

ECDF_POINTS = 4000  # a set larger than this is drawn through this many quantiles: same curve, small file
MAX_SERIES = 12  # more groups than this: the largest are drawn (a figure 1.6 in wider per box has a limit)
LABEL_CHARS = 60
# as TeX ("$\frac{$" raises at savefig) and usetex would hand it to a TeX process. Plain text only.


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def _ecdf_xy(values: FloatArray) -> tuple[FloatArray, FloatArray]:
    if values.size > ECDF_POINTS:
        y = np.linspace(0.0, 1.0, ECDF_POINTS)
        return np.quantile(values, y), y
    x = np.sort(values)
    # Start the curve at 0 on the smallest value, so the first step is drawn like the others.
    return np.concatenate(([x[0]], x)), np.arange(0, x.size + 1) / x.size


def plot_metric(directory: Path, metric: Metric, series: Sequence[tuple[str, FloatArray]]) -> list[Path]:
    """Write ``<metric>_ecdf.png`` and ``<metric>_box.png`` for the labelled value sets (display units).

    Sets without values are left out; nothing is written when none has values. Returns the paths written.
    """
    present = [(printable(label, max_chars=LABEL_CHARS), v) for label, v in series if v.size]
    if not present:
        return []
    title_note = ""
    if len(present) > MAX_SERIES:
        title_note = f" ({MAX_SERIES} largest of {len(present)} groups)"
        present = sorted(present, key=lambda lv: -lv[1].size)[:MAX_SERIES]
    # Labels come from record files (kernel release, machine model): with mathtext on, a "$" in one is
    # parsed as TeX ("$\\frac{$" raises at savefig), and usetex would hand it to a TeX process.
    with mpl.rc_context({"text.parse_math": False, "text.usetex": False}):
        return _draw(directory, metric, present, title_note)


def _draw(directory: Path, metric: Metric, present: list[tuple[str, FloatArray]], title_note: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    xlabel = f"{metric.name} ({metric.unit})"
    written = []

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for label, v in present:
        x, y = _ecdf_xy(v)
        ax.step(x, y, where="post", label=f"{label} (n={v.size})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of kills ≤ x")
    ax.set_title(f"{metric.name}: ECDF{title_note}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path = directory / f"{_safe(metric.name)}_ecdf.png"
    fig.savefig(path, dpi=100)
    written.append(path)

    fig = Figure(figsize=(max(4.0, 1.6 * len(present) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(
        [v for _, v in present],
        tick_labels=[label for label, _ in present],
        showmeans=True,
        flierprops={"markersize": 2, "alpha": 0.4},
    )
    ax.set_ylabel(xlabel)
    ax.set_title(f"{metric.name}{title_note}\n(whiskers 1.5 IQR, triangle = mean)", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)
    if len(present) > 2:
        ax.tick_params(axis="x", labelrotation=20)
    path = directory / f"{_safe(metric.name)}_box.png"
    fig.savefig(path, dpi=100)
    written.append(path)
    return written
