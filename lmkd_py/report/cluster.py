"""Statistics that respect where kills come from: histograms per boot, and the cluster bootstrap over
boards (boots within boards) and the paired comparison (optional ``report`` extra).

Kills on one board, in one boot, are not independent: a board's memory, firmware and workload move all
its kills together. Resampling kills as if independent then gives intervals that are too narrow (the
synthetic fleets of tests/unit/test_fleet.py show it). The cluster bootstrap resamples whole boards
with replacement and, within each board drawn, its boots with replacement; a median is then taken over
every kill of the boots drawn, each counted as often as it was drawn.

Values are kept as histograms: per boot, the count of values in each bin of a log-spaced grid of
relative width ``REL_WIDTH`` (0.1 %; a bin's value is its geometric middle, so any quantile read from
it is within 0.05 % of the exact one). Memory is then bounded by boots x bins occupied, never by
records, which is what lets the columnar engine hand over a month of a fleet (columnar.py). A resample
needs of each boot only its counts near the median (side_medians): one matrix product for the counts
below and above a narrow window, one sparse product inside it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
AnyIntArray = npt.NDArray[np.signedinteger[Any]]  # int32 where memory counts (hist_of), else int64
FloatArray = npt.NDArray[np.float64]

REL_WIDTH = 1e-3
LOG_STEP = math.log1p(REL_WIDTH)
# Bin numbers: 0 is the value 0; positive values from OFFSET up (ln of 1e-300 / LOG_STEP is > -OFFSET);
# negative values (none in a sane record, but the input is untrusted) mirror them below zero.
OFFSET = 1 << 20
def to_bins(values: FloatArray) -> IntArray:
    """The bin number of each (finite) value."""
    out = np.zeros(values.shape, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mags = np.floor(np.log(np.abs(values)) / LOG_STEP).astype(np.int64) + OFFSET
    pos, neg = values > 0, values < 0
    out[pos] = mags[pos]
    out[neg] = -mags[neg]
    return out


def bin_values(bins: IntArray) -> FloatArray:
    """The value each bin stands for: its geometric middle (0 for bin 0)."""
    mag = np.exp((np.abs(bins) - OFFSET + 0.5) * LOG_STEP)
    return np.where(bins == 0, 0.0, np.sign(bins) * mag)


@dataclass
class Hist:
    """The values of one metric on one side, as counts per (boot, bin).

    ``boot``, ``bins``, ``count``: one entry per boot and bin that holds values. ``boot_board``: the
    board of each boot (indices into ``board_labels``). ``total``: the sum of the values (for the mean).
    """

    boot: AnyIntArray
    bins: AnyIntArray
    count: AnyIntArray
    boot_board: IntArray
    board_labels: list[str | None]
    total: float

    @property
    def n(self) -> int:
        return int(self.count.sum())

    @property
    def boards(self) -> int:
        """Boards with values (a record without board or boot id is on the unknown board, None)."""
        return len({self.board_labels[int(b)] for b in np.unique(self.boot_board[self.boot])})

    @property
    def boots(self) -> int:
        return int(np.unique(self.boot).size)

    def pooled(self) -> tuple[IntArray, IntArray]:
        """Bins (sorted) and their counts over every boot."""
        bins, inverse = np.unique(self.bins, return_inverse=True)
        return bins, np.bincount(inverse.reshape(-1), weights=self.count, minlength=bins.size).astype(np.int64)

    @property
    def known(self) -> bool:
        """Whether any record says where it came from (a board or boot id)."""
        return any(lab is not None for lab in self.board_labels)

    def board_set(self) -> set[str]:
        """The known boards with values."""
        return {lab for b in np.unique(self.boot_board[self.boot]) if (lab := self.board_labels[int(b)]) is not None}

    def board_medians(self) -> dict[str, float]:
        return board_medians(self)

    def unit_boards(self) -> IntArray:
        return self.boot_board

    def spread(self) -> float:
        """spread_of this metric's units (the unknown board, None, is one board, as resampling has it)."""
        units = self.boot_board.size
        n = np.bincount(self.boot, weights=self.count, minlength=units)
        low = self.bins < median_bin(*self.pooled())
        below = np.bincount(self.boot[low], weights=self.count[low], minlength=units)
        return spread_of(self.boot_board, n, below)

    def window_counts(self, w: Window) -> WindowCounts:
        units = self.boot_board.size
        col = w.column(self.bins)
        count = self.count.astype(np.float32)
        below, above, inside = col == 0, col == w.width + 1, (col > 0) & (col <= w.width)
        return WindowCounts(
            np.bincount(self.boot[below], weights=count[below], minlength=units).astype(np.float32),
            np.bincount(self.boot[above], weights=count[above], minlength=units).astype(np.float32),
            self.boot[inside], col[inside], count[inside],
        )

    def quantiles(self, qs: list[float]) -> list[float | None]:
        return quantiles(*self.pooled(), qs)


def quantiles(bins: IntArray, counts: IntArray, qs: list[float]) -> list[float | None]:
    """Quantiles (0..1) of binned values (``bins`` sorted), interpolated between order statistics as
    numpy's default does."""
    n = int(counts.sum())
    if n == 0:
        return [None for _ in qs]
    vals = bin_values(bins)
    cum = np.cumsum(counts)
    out: list[float | None] = []
    for q in qs:
        rank = q * (n - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        v_lo = vals[np.searchsorted(cum, lo, side="right")]
        v_hi = vals[np.searchsorted(cum, hi, side="right")]
        out.append(float(v_lo + (v_hi - v_lo) * (rank - lo)))
    return out


def hist_of(values: FloatArray, board_codes: npt.NDArray[np.int32], boot_codes: npt.NDArray[np.int32],
            board_labels: list[str | None], universe: tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]] | None = None
            ) -> Hist:
    """The Hist of finite ``values`` whose records came from ``board_codes``/``boot_codes`` (codes of
    one table's categories; a boot is told apart by its board and boot code together). ``universe``: the
    board and boot codes of every record of the side, whose boots are then the units (shared by the
    side's metrics); else the boots of these values."""
    keys = board_codes.astype(np.int64) << 32 | boot_codes.astype(np.int64)
    if universe is None:
        ukeys, boot = np.unique(keys, return_inverse=True)
    else:
        ukeys = np.unique(universe[0].astype(np.int64) << 32 | universe[1].astype(np.int64))
        boot = np.searchsorted(ukeys, keys)
    pairs = boot.reshape(-1).astype(np.int64) << 40 | (to_bins(values) + (1 << 39))
    upairs, count = np.unique(pairs, return_counts=True)
    # Held as int32 (bins are within +-2^21, boots and counts far below 2^31): the in-memory compare holds
    # every metric's Hist of both sides at once (~one entry per value), half the memory of int64.
    return Hist(
        boot=(upairs >> 40).astype(np.int32),
        bins=((upairs & ((1 << 40) - 1)) - (1 << 39)).astype(np.int32),
        count=count.astype(np.int32),
        boot_board=ukeys >> 32,
        board_labels=board_labels,
        total=float(values.sum()),
    )


@dataclass
class Design:
    """How a side is resampled: "boards" (boots within boards), "boots" (one board, several boots) or
    "records" (nothing says where records came from: resampled as independent)."""

    kind: str
    boards: int
    boots: int


def design_of(h: Counts) -> Design:
    boards, boots = h.boards, h.boots
    if boards >= 2 and h.known:
        return Design("boards", boards, boots)
    if boots >= 2 and h.known:
        return Design("boots", boards, boots)
    return Design("records", boards, boots)


class Window:
    """Where the bootstrap reads a median: columns of ``factor`` fine bins from bin ``lo`` on, ``width``
    of them, with column 0 for every value below and ``width + 1`` for every value above."""

    def __init__(self, lo: int, hi: int, columns: int) -> None:
        self.lo = lo
        self.factor = max(1, math.ceil((hi - lo + 1) / columns))
        self.width = (hi - lo) // self.factor + 1
        self.hi = lo + self.width * self.factor - 1  # the last fine bin inside (>= the hi asked for)
        inner = bin_values(lo + np.arange(self.width, dtype=np.int64) * self.factor + (self.factor - 1) // 2)
        self.values = np.concatenate([[bin_values(np.array([lo]))[0]], inner,
                                      [bin_values(np.array([lo + self.width * self.factor - 1]))[0]]])

    def column(self, bins: IntArray) -> IntArray:
        return np.clip((bins - self.lo) // self.factor + 1, 0, self.width + 1)


@dataclass
class WindowCounts:
    """One metric's values per unit (a boot of the side's unit universe) against a Window: ``below`` and
    ``above`` it per unit, and inside it as (unit, column 1..width, count) triplets — sparse, since a
    unit holds few values in the narrow window the bootstrap reads its medians from."""

    below: npt.NDArray[np.float32]
    above: npt.NDArray[np.float32]
    unit: IntArray
    col: IntArray
    count: npt.NDArray[np.float32]


class Counts(Protocol):
    """One side's values of one metric as the bootstrap needs them: pooled fine bins, and counts per unit
    (a boot) against a window. The units are the side's, shared by all its metrics (a unit may hold no
    value of a metric); ``unit_boards``: the board of each unit, in unit order."""

    @property
    def n(self) -> int: ...

    @property
    def total(self) -> float: ...

    @property
    def boards(self) -> int: ...

    @property
    def boots(self) -> int: ...

    @property
    def known(self) -> bool: ...

    def quantiles(self, qs: list[float]) -> list[float | None]: ...

    def board_set(self) -> set[str]: ...

    def board_medians(self) -> dict[str, float]: ...

    def pooled(self) -> tuple[IntArray, IntArray]: ...

    def unit_boards(self) -> IntArray: ...

    def spread(self) -> float: ...

    def window_counts(self, w: Window) -> WindowCounts: ...


def median_bin(bins: IntArray, counts: IntArray) -> int:
    """The fine bin that holds the pooled median (``bins`` sorted)."""
    cum = np.cumsum(counts)
    return int(bins[min(int(np.searchsorted(cum, 0.5 * float(cum[-1]), side="left")), bins.size - 1)])


def spread_of(board: IntArray, n: npt.NDArray[np.generic], below: npt.NDArray[np.generic]) -> float:
    """How far resampling can move the share of values below the pooled median: a bound on its standard
    deviation, from each unit's count of values (``n``) and of values below the median's bin (``below``),
    ``board`` the board of each unit.

    With p the pooled share below, d_u = below_u - p n_u and D_b the sum of a board's d_u, drawing boards
    with replacement moves the count below by sum D_b^2 in variance, drawing boots within the boards drawn
    by at most sum d_u^2 more, drawing values independently by p (1 - p) N; the sum of the three bounds
    every design (the covariances left out are negative)."""
    nf, bf = np.asarray(n, dtype=np.float64), np.asarray(below, dtype=np.float64)
    total = float(nf.sum())
    if total <= 0:
        return 1.0
    p = float(bf.sum()) / total
    d = bf - p * nf
    per_board = np.bincount(board, weights=d) if board.size else np.zeros(0)
    var = float((per_board * per_board).sum() + (d * d).sum()) + p * (1 - p) * total
    return math.sqrt(var) / total


# The window's half-width, in shares of the pooled values either side of the median: Z_WINDOW x spread
# (spread_of: a bound on the standard deviation of the share below the median under resampling). The
# largest of 2,000 resampled deviations is ~3.9 of them; should a resampled median fall outside all the
# same, the window widens (side_medians).
Z_WINDOW = 6.0
FINE_COLUMNS = 2048  # columns of the window: fine bins (0.1 %) unless it spans more than 2,048 of them
WIDEN = 4.0


def window_for(c: Counts, half: float) -> Window:
    """The window over the pooled values' quantiles 0.5 - half .. 0.5 + half (all of them from 0.5 on)."""
    bins, counts = c.pooled()
    cum = np.cumsum(counts)
    total = int(cum[-1])
    if half >= 0.5:
        return Window(int(bins[0]), int(bins[-1]), FINE_COLUMNS)
    lo = int(bins[int(np.searchsorted(cum, (0.5 - half) * total, side="left"))])
    hi = int(bins[min(int(np.searchsorted(cum, (0.5 + half) * total, side="left")), bins.size - 1)])
    return Window(lo, hi, FINE_COLUMNS)


class _Drawer:
    """How often each unit is drawn, resample by resample: boards drawn with replacement, then, within
    each board drawn, its boots with replacement (a board of k boots drawn m times draws m*k boots);
    or (``resample_boots`` false) every unit its own board's count.

    Drawn as uniform integers and counted one resample at a time: a row's counts fit in the cache, where
    counting a whole batch at once scattered over 100 MB (6x slower at 300,000 boots); numpy's
    multinomial and binomial with array arguments were slower still."""

    def __init__(self, board_of_unit: IntArray, resample_boots: bool) -> None:
        boards, unit_board = np.unique(board_of_unit, return_inverse=True)
        self.unit_board = unit_board.reshape(-1)
        self.boards, self.units = boards.size, self.unit_board.size
        self.resample_boots = resample_boots
        self.k = np.bincount(self.unit_board, minlength=self.boards)
        self.order = np.argsort(self.unit_board, kind="stable")  # units grouped by board
        self.starts = np.concatenate([[0], np.cumsum(self.k)[:-1]]).astype(np.int64)
        self.sizes = [int(k) for k in np.unique(self.k)]

    def draw(self, rng: np.random.Generator, batch: int) -> npt.NDArray[np.float32]:
        """``batch`` resamples x units."""
        out = np.empty((batch, self.units), dtype=np.float32)
        for r in range(batch):
            drawn = rng.integers(0, self.boards, size=self.boards)  # the boards of this resample
            if not self.resample_boots:
                out[r] = np.bincount(drawn, minlength=self.boards)[self.unit_board]
                continue
            of_size = self.k[drawn] if len(self.sizes) > 1 else None
            row = np.zeros(self.units, dtype=np.int64)
            for kk in self.sizes:
                sel = drawn if of_size is None else drawn[of_size == kk]
                # Each drawn board of kk boots draws kk of them with replacement.
                unit = self.order[(self.starts[sel][:, None] + rng.integers(0, kk, size=(sel.size, kk))).ravel()]
                row += np.bincount(unit, minlength=self.units)
            out[r] = row
        return out


def _medians_of(hists: npt.NDArray[np.float32], w: Window) -> tuple[FloatArray, bool]:
    """The median of each row of ``hists`` (counts per window column), NaN for an empty row; and whether
    any fell outside the window (in column 0 or width + 1: read there, it would be the edge's value)."""
    cum = np.cumsum(hists, axis=1, dtype=np.float64)
    total = cum[:, -1]
    # The lower and upper middle order statistics (0-based ranks), averaged as numpy's median does.
    r_lo, r_hi = np.floor((total - 1) / 2), np.ceil((total - 1) / 2)
    lo = (cum > r_lo[:, None]).argmax(axis=1)
    hi = (cum > r_hi[:, None]).argmax(axis=1)
    med = (w.values[lo] + w.values[hi]) / 2
    some = total > 0
    outside = bool(((lo[some] == 0) | (hi[some] == w.width + 1)).any())
    return np.where(some, med, np.nan), outside


BATCH_CELLS = 1 << 23  # resamples x units per batch: 32 MiB of float32 weights
DRAW_VALUES = 20_000  # up to this many values, an independent resample draws values, not counts


def _batch(units: int) -> int:
    return max(16, min(512, BATCH_CELLS // max(units, 1)))


def _records_medians(c: Counts, w: Window, resamples: int, rng: np.random.Generator) -> tuple[FloatArray, bool]:
    """Resampled medians when nothing says where values came from: values drawn independently."""
    bins, counts = c.pooled()
    col = np.bincount(w.column(bins), weights=counts, minlength=w.width + 2)
    n = round(float(col.sum()))
    cols = np.arange(col.size)
    # Few values: draw them (b x n draws); many: draw the counts per column (cost independent of n).
    per_value = np.repeat(cols, col.astype(np.int64)) if n <= DRAW_VALUES else None
    out = np.empty(resamples)
    missed = False
    for start in range(0, resamples, 64):
        b = min(64, resamples - start)
        if per_value is not None:
            drawn = per_value[rng.integers(0, n, size=(b, n))] + (np.arange(b) * col.size)[:, None]
            counts_b = np.bincount(drawn.reshape(-1), minlength=b * col.size).reshape(b, -1)
        else:
            counts_b = rng.multinomial(n, col / col.sum(), size=b)
        out[start : start + b], miss = _medians_of(counts_b.astype(np.float32), w)
        missed |= miss
    return out, missed


def _cluster_medians(items: list[tuple[Counts, Window]], design: str, resamples: int, seed: list[int]
                     ) -> list[tuple[FloatArray, bool]]:
    """Resampled medians of metrics that share their units (one side), all from the same resamples:
    boards with replacement and boots within them ("boards") or boots alone ("boots"). Per batch of
    resamples: the weights of every unit once, every metric's counts below and above its window in one
    matrix product, its counts inside from a sparse product (scipy.sparse)."""
    import scipy.sparse as sp

    board = items[0][0].unit_boards()
    units = board.size
    if design != "boards":
        board = np.arange(units, dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawer = _Drawer(board, design == "boards")
    parts = [c.window_counts(w) for c, w in items]
    edges = np.empty((units, 2 * len(items)), dtype=np.float32)
    inner = []
    for j, ((_, w), p) in enumerate(zip(items, parts, strict=True)):
        edges[:, 2 * j], edges[:, 2 * j + 1] = p.below, p.above
        inner.append(sp.csr_matrix((p.count, (p.col - 1, p.unit)), shape=(w.width, units), dtype=np.float32))
    out = [np.empty(resamples) for _ in items]
    missed = [False for _ in items]
    step = _batch(units)
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        weights = drawer.draw(rng, b)  # resamples x units
        outside = weights @ edges
        by_unit = np.ascontiguousarray(weights.T)
        for j, (_, w) in enumerate(items):
            hists = np.empty((b, w.width + 2), dtype=np.float32)
            hists[:, 0], hists[:, -1] = outside[:, 2 * j], outside[:, 2 * j + 1]
            hists[:, 1:-1] = (inner[j] @ by_unit).T
            out[j][start : start + b], miss = _medians_of(hists, w)
            missed[j] |= miss
    return list(zip(out, missed, strict=True))


_DESIGN_STREAM = {"boards": 1, "boots": 2}


def side_medians(items: dict[str, tuple[Counts, str]], resamples: int, seed: list[int],
                 fetch: Callable[[list[tuple[Counts, Window]]], None] | None = None) -> dict[str, FloatArray]:
    """``resamples`` bootstrap medians of each metric of one side, keyed as ``items`` (name -> its counts
    and design: "boards", "boots" or "records"; a metric needs n >= 2).

    No pass over the values is needed to find where the resampled medians fall: each metric's window
    spans the pooled quantiles 0.5 -/+ Z_WINDOW x spread (see Z_WINDOW), on fine bins, and a unit's
    values outside it count only as "below" or "above". The metrics of one design share their resamples
    (the same boards drawn for all: a bootstrap of the same design, and one draw of weights per batch
    for them all). A metric whose resampled median falls outside its window is redone on a window
    WIDEN times wider (the same resamples: the weights are a function of ``seed``), up to all values.
    ``fetch``: called with the (counts, window) pairs before their window_counts are asked for (a
    columnar source fetches them all in one scan).
    """
    out: dict[str, FloatArray] = {}
    todo = {name: (c, d, min(0.5, Z_WINDOW * c.spread())) for name, (c, d) in items.items()}
    while todo:
        windows = {name: window_for(c, half) for name, (c, _, half) in todo.items()}
        if fetch is not None:
            fetch([(c, windows[name]) for name, (c, d, _) in todo.items() if d != "records"])
        got: dict[str, tuple[FloatArray, bool]] = {}
        groups: dict[tuple[str, bytes], list[str]] = {}
        for name, (c, d, _) in todo.items():
            if d == "records":
                rng = np.random.default_rng([*seed, zlib.crc32(name.encode())])
                got[name] = _records_medians(c, windows[name], resamples, rng)
            else:  # metrics of the same units (a side's, normally all) share their resamples
                groups.setdefault((d, c.unit_boards().tobytes()), []).append(name)
        for (design, _), names in groups.items():
            together = _cluster_medians([(todo[n][0], windows[n]) for n in names], design, resamples,
                                        [*seed, _DESIGN_STREAM[design]])
            got.update(zip(names, together, strict=True))
        again = {}
        for name, (res, missed) in got.items():
            c, d, half = todo[name]
            if missed and half < 0.5:
                again[name] = (c, d, min(0.5, half * WIDEN))
            else:
                out[name] = res
        todo = again
    return out


def board_medians(h: Hist) -> dict[str, float]:
    """The median of each known board's values."""
    board = h.boot_board[h.boot]
    out: dict[str, float] = {}
    for b in np.unique(board):
        label = h.board_labels[int(b)]
        if label is None:
            continue
        sel = board == b
        sub = Hist(h.boot[sel], h.bins[sel], h.count[sel], h.boot_board, h.board_labels, 0.0)
        med = sub.quantiles([0.5])[0]
        if med is not None:
            out[label] = med
    return out


@dataclass
class Paired:
    """A paired comparison over the boards that ran both sides: the ratio B/A of each board's medians,
    summarised by its geometric mean across boards (a kernel's effect on a board's latency is a
    factor; a board's own speed cancels in the ratio)."""

    boards: int
    ratio: float | None
    ratio_ci: tuple[float | None, float | None]


def paired(a: Counts, b: Counts, resamples: int, rng: np.random.Generator, confidence: float) -> Paired:
    """Boards common to ``a`` and ``b``: the geometric mean of their B/A median ratios with a percentile
    bootstrap CI over boards. Boards whose median is not positive on a side are left out."""
    ma, mb = a.board_medians(), b.board_medians()
    common = sorted(k for k in ma.keys() & mb.keys() if ma[k] > 0 and mb[k] > 0)
    if not common:
        return Paired(0, None, (None, None))
    logs = np.log(np.array([mb[k] / ma[k] for k in common]))
    ratio = float(np.exp(logs.mean()))
    if len(common) < 2:
        return Paired(1, ratio, (None, None))
    idx = rng.integers(0, logs.size, size=(resamples, logs.size))
    means = logs[idx].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return Paired(len(common), ratio, (float(np.exp(lo)), float(np.exp(hi))))
