"""Comparison rows from histograms (cluster.Counts): the cluster bootstrap, the paired comparison, and the
rank and size tests on binned values (optional ``report`` extra).

Used by ``compare`` whenever a side holds records of several boards or boots (the in-memory path, with
exact point estimates), and always by the columnar path (columnar.py), whose data never exist as one
array of values. On binned values a Mann-Whitney test treats a bin as a tie group (the normal
approximation with the tie correction, as scipy's asymptotic method) and a KS test compares the binned
CDFs; bins are 0.1 % wide, so both agree with the exact tests to the precision that matters here.

With clusters, no p-value is given: Mann-Whitney assumes independent kills, and kills of one board are
not; the cluster CI is the answer, and the output says so.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from lmkd_py.report.cluster import Counts, Design, FloatArray, bin_values, design_of, paired, side_medians
from lmkd_py.report.data import DigestTable, metrics_for
from lmkd_py.report.stats import (
    CONFIDENCE,
    NO_CI,
    SIZE_BINS_MIB,
    BootstrapOptions,
    GroupReport,
    Interval,
    Row,
    Side,
    Summary,
)


def summary_of(h: Counts) -> Summary:
    """n, median, p90, p99 and mean of a histogram's values (quantiles to the bin, the mean exact)."""
    if h.n == 0:
        return Summary(0, None, None, None, None)
    p50, p90, p99 = h.quantiles([0.5, 0.9, 0.99])
    return Summary(h.n, p50, p90, p99, h.total / h.n)


Resampled = tuple[FloatArray | None, FloatArray | None]


def resample_pairs(pairs: dict[str, tuple[Counts, Counts]], opts: BootstrapOptions
                   ) -> dict[str, tuple[Design, Design, Resampled]]:
    """Each side's designs and resampled medians of every metric of ``pairs`` (name -> A's and B's
    counts): per side, one cluster.side_medians for all its metrics, so they share their resamples and
    a columnar side is scanned a few times in all, not per metric."""
    from lmkd_py.report.columnar import fetch_windows

    designs = {name: (design_of(ha), design_of(hb)) for name, (ha, hb) in pairs.items()}
    res: list[dict[str, FloatArray]] = []
    for i in (0, 1):
        items = {name: (hs[i], designs[name][i].kind) for name, hs in pairs.items() if hs[i].n >= 2}
        res.append(side_medians(items, opts.resamples, [opts.seed, i], fetch_windows))
    return {name: (*designs[name], (res[0].get(name), res[1].get(name))) for name in pairs}


def _ci(x: np.ndarray) -> Interval:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return NO_CI
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(x, [tail, 100 - tail])
    return float(lo), float(hi)


def compare_hists(
    name: str,
    unit: str,
    ha: Counts,
    hb: Counts,
    opts: BootstrapOptions,
    exact: tuple[Summary, Summary] | None = None,
    done: tuple[Design, Design, Resampled] | None = None,
) -> tuple[Row, Design, Design]:
    """One comparison row (B - A) from histograms, and each side's resampling design.

    ``exact``: the sides' summaries from every value, when the caller has them (the in-memory path);
    else they are read from the histograms. CIs: each side's median resampled by its design, the
    difference and its ratio from the same resamples. With ``opts.paired`` the difference is A's median x
    (the geometric mean over common boards of B/A - 1), its CI bootstrapped over those boards.
    ``done``: the designs and resampled medians from resample_pairs (the metrics of one comparison
    resampled together); else they are made here for this metric alone.
    """
    rng = np.random.default_rng([opts.seed, zlib.crc32(name.encode())])
    sa, sb = exact if exact is not None else (summary_of(ha), summary_of(hb))
    da, db, res = done if done is not None else resample_pairs({name: (ha, hb)}, opts)[name]
    ci_a = _ci(res[0]) if res[0] is not None else NO_CI
    ci_b = _ci(res[1]) if res[1] is not None else NO_CI
    diff = diff_pct = None
    diff_ci = pct_ci = NO_CI
    if sa.median is not None and sb.median is not None:
        diff = sb.median - sa.median
        diff_pct = 100.0 * diff / sa.median if sa.median != 0 else None
    ra, rb = res
    if ra is not None and rb is not None:
        diff_ci = _ci(rb - ra)
        with np.errstate(divide="ignore", invalid="ignore"):
            pct_ci = _ci(100.0 * (rb - ra) / ra)
    if opts.paired:
        diff, diff_pct, diff_ci, pct_ci = _paired(ha, hb, sa, rng, opts)
    p_value = None
    if da.kind == "records" and db.kind == "records" and exact is None and not opts.paired:
        p_value = mwu_binned(ha, hb)
    sides = (Side(sa.n, sa.median, ci_a, sa.p90, sa.mean), Side(sb.n, sb.median, ci_b, sb.p90, sb.mean))
    return Row(name, unit, *sides, diff, diff_pct, diff_ci, p_value, pct_ci), da, db


def _paired(
    ha: Counts, hb: Counts, sa: Summary, rng: np.random.Generator, opts: BootstrapOptions
) -> tuple[float | None, float | None, Interval, Interval]:
    pr = paired(ha, hb, opts.resamples, rng, CONFIDENCE)
    if pr.ratio is None or sa.median is None:
        return None, None, NO_CI, NO_CI
    lo, hi = pr.ratio_ci
    pct_ci: Interval = NO_CI if lo is None or hi is None else (100 * (lo - 1), 100 * (hi - 1))
    diff_ci: Interval = NO_CI if lo is None or hi is None else (sa.median * (lo - 1), sa.median * (hi - 1))
    return sa.median * (pr.ratio - 1), 100 * (pr.ratio - 1), diff_ci, pct_ci


def paired_boards(ha: Counts, hb: Counts) -> int:
    """Boards (known) with values on both sides."""
    return len(ha.board_set() & hb.board_set())


def _merged(ha: Counts, hb: Counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ba, ca = ha.pooled()
    bb, cb = hb.pooled()
    bins = np.union1d(ba, bb)
    a = np.zeros(bins.size)
    b = np.zeros(bins.size)
    a[np.searchsorted(bins, ba)] = ca
    b[np.searchsorted(bins, bb)] = cb
    return bins, a, b


def mwu_binned(ha: Counts, hb: Counts) -> float | None:
    """Two-sided Mann-Whitney U p-value, bins as tie groups (normal approximation, tie-corrected,
    continuity-corrected). None when a side is empty or every value ties."""
    na, nb = ha.n, hb.n
    if na == 0 or nb == 0:
        return None
    _, a, b = _merged(ha, hb)
    t = a + b
    below = np.cumsum(t) - t
    mid_rank = below + (t + 1) / 2
    u = float((a * mid_rank).sum()) - na * (na + 1) / 2
    n = na + nb
    ties = float((t**3 - t).sum())
    var = na * nb / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return None
    z = (abs(u - na * nb / 2) - 0.5) / math.sqrt(var)
    return float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))))


def ks_binned(ha: Counts, hb: Counts) -> float | None:
    """Two-sample KS p-value (asymptotic) on the binned CDFs; None when a side is empty."""
    na, nb = ha.n, hb.n
    if na == 0 or nb == 0:
        return None
    _, a, b = _merged(ha, hb)
    d = float(np.abs(np.cumsum(a) / na - np.cumsum(b) / nb).max())
    en = math.sqrt(na * nb / (na + nb))
    return kolmogorov_sf(en * d)


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution (the limit of sqrt(n) x the KS statistic): the alternating
    series 2 sum (-1)^(k-1) exp(-2 k^2 x^2), which converges fast beyond x ~ 0.2; below, 1 to double
    precision. The same function as scipy's kstwobign.sf, without importing scipy.stats (0.8 s)."""
    if x <= 0.2:
        return 1.0
    total, k = 0.0, 1
    while True:
        term = math.exp(-2.0 * k * k * x * x)
        total += term if k % 2 else -term
        if term < 1e-17:
            return float(min(1.0, max(0.0, 2.0 * total)))
        k += 1


def digest_report(key: tuple[str | None, ...], t: DigestTable, group_by: str | None) -> GroupReport:
    """The report of one group (kernel release, machine model[, setting value]) from its digest."""
    rss = t.hist("rss_kib")
    bins, counts = rss.pooled()
    mib = bin_values(bins)
    edges = np.array(SIZE_BINS_MIB)
    which = np.searchsorted(edges, mib, side="right") - 1
    per_bin = np.bincount(which[which >= 0], weights=counts[which >= 0], minlength=len(edges) - 1)
    size_bins = [(SIZE_BINS_MIB[i], SIZE_BINS_MIB[i + 1], int(per_bin[i])) for i in range(len(edges) - 1)]
    return GroupReport(
        kernel_release=key[0],
        machine_model=key[1],
        records=t.rows,
        dry_runs=t.dry_runs,
        outcomes=t.counts("outcome"),
        mrelease_status=t.counts("mrelease_status"),
        errno={k: v for k, v in t.counts("errno").items() if k is not None},
        metrics=[(m, summary_of(t.hist(m.column))) for m in metrics_for(t)],
        size_bins=size_bins,
        setting=(group_by, key[2]) if group_by is not None else None,
    )


def median_of(h: Counts) -> float | None:
    return h.quantiles([0.5])[0]


__all__ = ["bin_values", "compare_hists", "ks_binned", "median_of", "mwu_binned", "paired_boards", "summary_of"]
