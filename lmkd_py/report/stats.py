"""Statistics of record sets: per-group summaries and the A/B comparison (optional ``report`` extra).

The comparison follows what the kernel reviewers asked for, per metric: n, the median with a 95 %
bootstrap CI, p90 and mean for each side; the difference of medians (B - A, absolute and relative to A)
with a 95 % bootstrap CI; a Mann-Whitney U p-value. One two-sample bootstrap per metric gives the three
intervals (each side's median and the difference). Intervals come from
``scipy.stats.bootstrap`` (percentile method: BCa's jackknife is quadratic in n and buys little for a
median) and tests from ``scipy.stats`` — nothing here re-implements them.

Large sets: bootstrapping a median costs resamples x n. Above ``BootstrapOptions.max_n`` values per side the
intervals are bootstrapped from a seeded random subsample of that size (the point estimates and the
p-value still use every value). Such an interval is wider than the full data warrants, never narrower,
and the output says so in a warning.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmkd_py.report.cluster import Counts, Design
from lmkd_py.report.data import (
    CONFOUNDERS,
    KIB_PER_GIB,
    AnyTable,
    FloatArray,
    Metric,
    RecordTable,
    metrics_for,
)

SMALL_N = 20  # below this a side gets a warning: CIs and p-values are rough
SIZE_DIFF_P = 0.05  # KS p-value on victim sizes below which per-GiB rows are added ...
# ... provided the sizes also differ by a share that matters: identical victims a few KiB apart (the
# interpreter's own pages vary by kernel) are "significantly different" to KS but not to latency.
SIZE_DIFF_MIN_SHARE = 0.05
CONFIDENCE = 0.95
# Victim size bins for the report, in MiB: [lo, hi).
SIZE_BINS_MIB = (0, 16, 64, 256, 1024, 4096, float("inf"))
# Metrics that are durations of work proportional to the memory torn down: normalised per GiB when the
# two sides' victims differ in size. Throughput and share are already size-free.
PER_GIB_UNITS = ("ms",)


@dataclass
class Summary:
    n: int
    median: float | None
    p90: float | None
    p99: float | None
    mean: float | None


def summarize(values: FloatArray) -> Summary:
    """n, median, p90, p99 and mean of ``values`` (already NaN-free); None for each when empty."""
    if values.size == 0:
        return Summary(0, None, None, None, None)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return Summary(int(values.size), float(p50), float(p90), float(p99), float(values.mean()))


@dataclass
class GroupReport:
    kernel_release: str | None
    machine_model: str | None
    records: int
    dry_runs: int
    outcomes: dict[str | None, int]
    mrelease_status: dict[str | None, int]
    errno: dict[str | None, int]
    metrics: list[tuple[Metric, Summary]]
    size_bins: list[tuple[float, float, int]]  # lo MiB, hi MiB, count
    setting: tuple[str, str | None] | None = None  # (confounder, its value) with report --group-by


def groups(table: RecordTable, by: tuple[str, ...]) -> list[tuple[tuple[str | None, ...], RecordTable]]:
    """Split ``table`` by the categories ``by`` (e.g. kernel_release, machine_model), in sorted order."""
    if table.rows == 0:
        return []
    cats = [table.categories[name] for name in by]
    keys = np.stack([c.codes for c in cats], axis=1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = []
    for i, row in enumerate(uniq):
        label = tuple(c.labels[int(code)] for c, code in zip(cats, row, strict=True))
        out.append((label, table.select(inverse == i)))
    out.sort(key=lambda kv: tuple("" if x is None else x for x in kv[0]))
    return out


def report_groups(table: RecordTable, group_by: str | None = None) -> list[GroupReport]:
    """One GroupReport per (kernel release, machine model) found in ``table``, and per value of the
    confounder ``group_by`` (one of data.CONFOUNDERS) when given."""
    out = []
    by = ("kernel_release", "machine_model") + ((group_by,) if group_by is not None else ())
    for key, sub in groups(table, by):
        kernel, machine = key[0], key[1]
        rss = sub.columns["rss_kib"]  # every record's victim, dry runs too: these are counts, not latencies
        rss_mib = rss[~np.isnan(rss)] / 1024
        counts, _ = np.histogram(rss_mib, bins=np.array(SIZE_BINS_MIB))
        bins = [(SIZE_BINS_MIB[i], SIZE_BINS_MIB[i + 1], int(c)) for i, c in enumerate(counts)]
        out.append(
            GroupReport(
                kernel_release=kernel,
                machine_model=machine,
                records=sub.rows,
                dry_runs=int(sub.dry_run.sum()),
                outcomes=sub.categories["outcome"].counts(),
                mrelease_status=sub.categories["mrelease_status"].counts(),
                errno={k: v for k, v in sub.categories["errno"].counts().items() if k is not None},
                metrics=[(m, summarize(sub.values(m.column) * m.scale)) for m in metrics_for(sub)],
                size_bins=bins,
                setting=(group_by, key[2]) if group_by is not None else None,
            )
        )
    return out


@dataclass
class Side:
    n: int
    median: float | None
    ci: tuple[float | None, float | None]
    p90: float | None
    mean: float | None


@dataclass
class Row:
    name: str
    unit: str
    a: Side
    b: Side
    diff_median: float | None
    diff_pct: float | None
    diff_ci: tuple[float | None, float | None]
    p_value: float | None
    # The CI of diff_pct, bootstrapped as a ratio (not diff_ci over A's median: A's median varies too).
    diff_pct_ci: tuple[float | None, float | None] = (None, None)


@dataclass(frozen=True)
class Units:
    """Where one side's records came from: how many, from how many boards and boots, and how its CIs
    were resampled ("boards": boots within boards; "boots"; "records": as if independent)."""

    records: int
    boards: int
    boots: int
    design: str


@dataclass
class Comparison:
    label_a: str
    label_b: str
    rows: list[Row]
    warnings: list[str] = field(default_factory=list)
    units: tuple[Units, Units] | None = None
    paired_boards: int | None = None  # with --paired: boards that ran both sides


@dataclass(frozen=True)
class BootstrapOptions:
    resamples: int = 2000
    seed: int = 0
    paired: bool = False  # compare within each board that ran both sides, then across boards
    max_n: int = 10_000  # values per side beyond which the CI is bootstrapped from a subsample
    batch: int = 100  # resamples per vectorised step: bounds memory at batch x max_n floats


def _median(x: Any, axis: int = -1) -> Any:
    return np.median(x, axis=axis)


def _medians_and_diff(a: Any, b: Any, axis: int = -1) -> Any:
    # One two-sample bootstrap gives all four intervals: A and B are resampled independently, so the
    # resampled median of A alone has exactly the one-sample bootstrap distribution (same for B).
    ma, mb = np.median(a, axis=axis), np.median(b, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(ma != 0, 100.0 * (mb - ma) / ma, np.nan)
    return np.stack([ma, mb, mb - ma, pct])


Interval = tuple[float | None, float | None]
NO_CI: Interval = (None, None)


def _interval(lo: Any, hi: Any) -> Interval:
    lo, hi = float(lo), float(hi)
    return (None if np.isnan(lo) else lo, None if np.isnan(hi) else hi)


def _subsample(x: FloatArray, rng: np.random.Generator, max_n: int) -> FloatArray:
    return x if x.size <= max_n else rng.choice(x, size=max_n, replace=False)


def _bootstrap(
    data: tuple[FloatArray, ...], statistic: Any, rng: np.random.Generator, opts: BootstrapOptions
) -> list[Interval]:
    """Percentile intervals of ``statistic`` (one per output) from ``scipy.stats.bootstrap``."""
    from scipy import stats  # 0.8 s to import: only the paths of independent records in memory need it

    with warnings.catch_warnings():
        # All-equal data give a degenerate (zero-width) interval: that is the right answer here.
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            tuple(_subsample(x, rng, opts.max_n) for x in data),
            statistic,
            n_resamples=opts.resamples,
            confidence_level=CONFIDENCE,
            method="percentile",
            vectorized=True,
            paired=False,
            batch=opts.batch,
            rng=rng,
        )
    lows, highs = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    return [_interval(lo, hi) for lo, hi in zip(lows, highs, strict=True)]


def _side(x: FloatArray, ci: Interval) -> Side:
    s = summarize(x)
    return Side(s.n, s.median, ci, s.p90, s.mean)


def compare_values(name: str, unit: str, a: FloatArray, b: FloatArray, opts: BootstrapOptions) -> Row:
    """One comparison row for the NaN-free values ``a`` and ``b`` (B - A for the differences).

    The random stream is seeded from ``opts.seed`` and ``name``, so a row does not change when other
    rows are added or reordered.
    """
    from scipy import stats

    rng = np.random.default_rng([opts.seed, zlib.crc32(name.encode())])
    ci_a = ci_b = diff_ci = pct_ci = NO_CI
    if a.size >= 2 and b.size >= 2:
        ci_a, ci_b, diff_ci, pct_ci = _bootstrap((a, b), _medians_and_diff, rng, opts)
    elif a.size >= 2:
        (ci_a,) = _bootstrap((a,), _median, rng, opts)
    elif b.size >= 2:
        (ci_b,) = _bootstrap((b,), _median, rng, opts)
    sa, sb = _side(a, ci_a), _side(b, ci_b)
    diff = diff_pct = p_value = None
    if sa.median is not None and sb.median is not None:
        diff = sb.median - sa.median
        diff_pct = 100.0 * diff / sa.median if sa.median != 0 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # all-equal values: p is NaN, reported as unknown
            p = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
        p_value = None if np.isnan(p) else p
    return Row(name, unit, sa, sb, diff, diff_pct, diff_ci, p_value, pct_ci)


def clustered(t: AnyTable) -> bool:
    """Whether ``t`` holds records of several known boards or boots (so kills are not independent)."""
    return any(t.distinct(unit) >= 2 for unit in ("board", "boot"))


def compare_tables(a: AnyTable, b: AnyTable, label_a: str, label_b: str, opts: BootstrapOptions) -> Comparison:
    """The comparison table of two record sets, with its warnings.

    Two in-memory tables of independent records (no side holds several boards or boots, no --paired)
    get exact statistics (``compare_values``); otherwise the rows come from histograms
    (``fleetstats.compare_hists``): cluster CIs, paired differences, and, for in-memory tables, exact
    point estimates all the same.
    """
    cmp = Comparison(label_a, label_b, [])
    metrics = metrics_for(a, b)
    exact = isinstance(a, RecordTable) and isinstance(b, RecordTable)
    binned = not exact or opts.paired or clustered(a) or clustered(b)
    designs: dict[str, tuple[Design, Design]] = {}
    if not binned:
        for m in metrics:
            assert isinstance(a, RecordTable) and isinstance(b, RecordTable)  # exact just above
            cmp.rows.append(
                compare_values(m.name, m.unit, a.values(m.column) * m.scale, b.values(m.column) * m.scale, opts)
            )
    else:
        cmp.rows.extend(_binned_rows([(m.name, m.unit, a.hist(m.column, m.scale), b.hist(m.column, m.scale),
                                       _exact(a, b, m.column, m.scale)) for m in metrics], opts, designs))
    _size_check(a, b, metrics, opts, cmp, designs if binned else None)
    cmp.units = _units(a, b, designs, binned)
    if opts.paired:
        from lmkd_py.report.fleetstats import paired_boards

        cmp.paired_boards = max((paired_boards(a.hist(m.column, m.scale), b.hist(m.column, m.scale))
                                 for m in metrics[:1]), default=0)
    _warn(a, b, cmp, opts)
    return cmp


Binned = tuple[str, str, Counts, Counts, "tuple[Summary, Summary] | None"]  # name, unit, A, B, exact summaries


def _binned_rows(todo: list[Binned], opts: BootstrapOptions, designs: dict[str, tuple[Design, Design]]) -> list[Row]:
    """Rows from histograms, every metric of a side resampled together (fleetstats.resample_pairs)."""
    from lmkd_py.report.fleetstats import compare_hists, resample_pairs

    done = resample_pairs({name: (ha, hb) for name, _, ha, hb, _ in todo}, opts)
    rows = []
    for name, unit, ha, hb, exact in todo:
        row, da, db = compare_hists(name, unit, ha, hb, opts, exact, done[name])
        designs[name] = (da, db)
        rows.append(row)
    return rows


def _exact(a: AnyTable, b: AnyTable, column: str, scale: float,
           full: tuple[FloatArray, FloatArray] | None = None) -> tuple[Summary, Summary] | None:
    """Both sides' summaries from every value, when they are in memory."""
    if not (isinstance(a, RecordTable) and isinstance(b, RecordTable)):
        return None
    va = full[0] if full is not None else a.columns.get(column, np.full(a.rows, np.nan)) * scale
    vb = full[1] if full is not None else b.columns.get(column, np.full(b.rows, np.nan)) * scale
    return summarize(va[~a.dry_run & np.isfinite(va)]), summarize(vb[~b.dry_run & np.isfinite(vb)])


def _units(a: AnyTable, b: AnyTable, designs: dict[str, tuple[Design, Design]], binned: bool) -> tuple[Units, Units]:
    out = []
    for i, t in enumerate((a, b)):
        boards, boots = t.distinct("board"), t.distinct("boot")
        kinds = {d[i].kind for d in designs.values()} if binned else {"records"}
        kind = "boards" if "boards" in kinds else "boots" if "boots" in kinds else "records"
        out.append(Units(t.rows, boards, boots, kind))
    return out[0], out[1]


def _per_gib(t: RecordTable, column: str, scale: float) -> FloatArray:
    """Every row's ``column`` x ``scale`` per GiB of its victim (NaN where either is unknown or the size 0)."""
    vals, rss = t.columns[column], t.columns["rss_kib"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = vals * scale / (rss / KIB_PER_GIB)
    return np.where(np.isfinite(out) & (rss > 0), out, np.nan)


def _size_check(a: AnyTable, b: AnyTable, metrics: list[Metric], opts: BootstrapOptions, cmp: Comparison,
                designs: dict[str, tuple[Design, Design]] | None) -> None:
    if isinstance(a, RecordTable) and isinstance(b, RecordTable):
        ra, rb = a.values("rss_kib") / 1024, b.values("rss_kib") / 1024
        if ra.size == 0 or rb.size == 0:
            return
        from scipy import stats

        p = float(stats.ks_2samp(ra, rb).pvalue)
        ma, mb = float(np.median(ra)), float(np.median(rb))
    else:
        from lmkd_py.report.fleetstats import ks_binned, median_of

        ha, hb = a.hist("rss_kib", 1 / 1024), b.hist("rss_kib", 1 / 1024)
        pk, mda, mdb = ks_binned(ha, hb), median_of(ha), median_of(hb)
        if pk is None or mda is None or mdb is None:
            return
        p, ma, mb = pk, mda, mdb
    if not p < SIZE_DIFF_P or abs(ma - mb) < SIZE_DIFF_MIN_SHARE * max(ma, mb):
        return
    cmp.warnings.append(
        f"victim sizes differ between the sides (two-sample KS p={p:.2g}; median "
        f"{ma:.0f} MiB vs {mb:.0f} MiB): latencies scale with size, "
        f"so per-GiB rows (value / victim RSS in GiB) are added"
    )
    measured = {r.name for r in cmp.rows if r.a.n or r.b.n}
    todo: list[Binned] = []
    for m in metrics:
        if m.unit in PER_GIB_UNITS and "." not in m.name and m.name in measured:
            name, unit = f"{m.name}_per_gib", f"{m.unit}/GiB"
            if designs is None:
                assert isinstance(a, RecordTable) and isinstance(b, RecordTable)  # the exact path
                va, vb = _per_gib(a, m.column, m.scale), _per_gib(b, m.column, m.scale)
                cmp.rows.append(compare_values(name, unit, va[~a.dry_run & np.isfinite(va)],
                                               vb[~b.dry_run & np.isfinite(vb)], opts))
            elif isinstance(a, RecordTable) and isinstance(b, RecordTable):
                full = (_per_gib(a, m.column, m.scale), _per_gib(b, m.column, m.scale))
                todo.append((name, unit, a.hist_of(full[0]), b.hist_of(full[1]), _exact(a, b, "", 1.0, full)))
            else:
                todo.append((name, unit, a.hist(f"{m.column}/gib"), b.hist(f"{m.column}/gib"), None))
    if todo and designs is not None:
        cmp.rows.extend(_binned_rows(todo, opts, designs))


def _warn(a: AnyTable, b: AnyTable, cmp: Comparison, opts: BootstrapOptions) -> None:
    empty = [r.name for r in cmp.rows if r.a.n == 0 and r.b.n == 0]
    if empty:
        cmp.warnings.append(f"no values on either side for: {', '.join(empty)}")
    for label, is_a in ((cmp.label_a, True), (cmp.label_b, False)):
        sides = [(r.name, r.a if is_a else r.b, r.a.n + r.b.n) for r in cmp.rows]
        small = [f"{name} (n={s.n})" for name, s, both in sides if s.n < SMALL_N and both]
        if small:
            cmp.warnings.append(
                f"{label}: fewer than {SMALL_N} values for {', '.join(small)}: CIs and p-values are rough"
            )
        big = max((s.n for _, s, _ in sides), default=0)
        if big > opts.max_n and (cmp.units is None or cmp.units[0 if is_a else 1].design == "records") \
                and isinstance(a, RecordTable) and not clustered(a) and not clustered(b) and not opts.paired:
            cmp.warnings.append(
                f"{label}: up to {big} values per metric; CIs bootstrapped from a random subsample of "
                f"{opts.max_n} (conservative: wider than the full data warrants)"
            )
    _confounder_warnings(a, b, cmp)
    _cluster_warnings(cmp, opts)
    for label, t in ((cmp.label_a, a), (cmp.label_b, b)):
        if t.rows and t.dry_runs == t.rows:
            cmp.warnings.append(f"{label}: all {t.rows} records are dry runs (no latencies)")
        for cat in ("kernel_release", "machine_model"):
            seen = [k for k in t.counts(cat) if k is not None]
            if len(seen) > 1:
                # A few of them, each cut short: a hostile file can hold thousands of long values.
                shown = ", ".join(repr(k[:80]) for k in seen[:5])
                shown += f" and {len(seen) - 5} more" if len(seen) > 5 else ""
                cmp.warnings.append(f"{label} mixes {len(seen)} values of {cat}: {shown}")


def _few(values: list[str], shown: int = 3) -> str:
    # A few of them, each cut short: a hostile file can hold thousands of long values.
    out = ", ".join(repr(v[:80]) for v in values[:shown])
    return out + (f" and {len(values) - shown} more" if len(values) > shown else "")


def _cluster_warnings(cmp: Comparison, opts: BootstrapOptions) -> None:
    """Say how the CIs were resampled when records come from several boards or boots, and what that
    means for the p-values; and when --paired found no board on both sides."""
    if cmp.units is None or all(u.design == "records" for u in cmp.units):
        return
    how = {"boards": "a cluster bootstrap over boards (boots within boards)", "boots": "a bootstrap over boots",
           "records": "a bootstrap over records (nothing says where they came from)"}
    for label, u in zip((cmp.label_a, cmp.label_b), cmp.units, strict=True):
        cmp.warnings.append(f"{label}: {u.records} records from {u.boards} board(s), {u.boots} boot(s): "
                            f"CIs from {how[u.design]}")
        if u.boards == 1 and u.design != "records":
            cmp.warnings.append(f"{label}: one board only: its CI cannot include board-to-board variation")
    cmp.warnings.append("no Mann-Whitney p-values: they assume independent kills, and kills of one board or "
                        "boot are not; read the cluster CIs")
    if opts.paired and not cmp.paired_boards:
        cmp.warnings.append("--paired: no board has records on both sides; nothing to pair")


def _confounder_warnings(a: AnyTable, b: AnyTable, cmp: Comparison) -> None:
    """A kernel A/B is only as good as what else was held equal: name each setting whose known values
    differ between the sides, and say when a side's records cannot tell (made before the block existed)."""
    for name in CONFOUNDERS:
        va = sorted(k for k in a.counts(name) if k is not None)
        vb = sorted(k for k in b.counts(name) if k is not None)
        if va and vb and va != vb:
            cmp.warnings.append(
                f"confounder {name} differs: {cmp.label_a} {_few(va)} vs {cmp.label_b} {_few(vb)}; "
                f"a difference may come from it rather than from the kernel"
            )
    # page_size is known whenever the block exists: where it is unknown, the block is missing. Said only
    # when some records have it (two sets of old records alone would get this line on every compare).
    missing = {label: t.counts("page_size").get(None, 0) for label, t in
               ((cmp.label_a, a), (cmp.label_b, b))}
    if sum(missing.values()) == a.rows + b.rows:
        return
    for label, t in ((cmp.label_a, a), (cmp.label_b, b)):
        if missing[label]:
            cmp.warnings.append(
                f"{label}: {missing[label]} of {t.rows} records carry no confounders (made by an older lmkd-py): "
                f"their settings cannot be checked"
            )
