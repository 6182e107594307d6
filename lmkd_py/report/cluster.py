"""Statistics that respect where kills come from: histograms per boot, and the cluster bootstrap over
boards (boots within boards) and the paired comparison (optional ``report`` extra).

Kills on one board, in one boot, are not independent: a board's memory, firmware and workload move all
its kills together. Resampling kills as if independent then gives intervals that are too narrow (the
synthetic fleets of tests/unit/test_cluster.py show it). The cluster bootstrap resamples whole boards
with replacement and, within each board drawn, its boots with replacement; a median is then taken over
every kill of the boots drawn, each counted as often as it was drawn.

Values are kept as histograms: per boot, the count of values in each bin of a log-spaced grid of
relative width ``REL_WIDTH`` (0.1 %; a bin's value is its geometric middle, so any quantile read from
it is within 0.05 % of the exact one). Memory is then bounded by boots x bins occupied, never by
records, which is what lets the columnar engine hand over a month of a fleet (columnar.py) and what
makes a resample one matrix product (weights per boot x counts per boot and bin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

REL_WIDTH = 1e-3
LOG_STEP = math.log1p(REL_WIDTH)
# Bin numbers: 0 is the value 0; positive values from OFFSET up (ln of 1e-300 / LOG_STEP is > -OFFSET);
# negative values (none in a sane record, but the input is untrusted) mirror them below zero.
OFFSET = 1 << 20
# The bootstrap's widest window: the pooled values' quantiles WINDOW_Q .. 1 - WINDOW_Q on at most
# WINDOW_BINS columns (see resampled_medians for the narrower ones it uses first).
WINDOW_Q = 0.02
WINDOW_BINS = 1024
DRAW_VALUES = 20_000  # up to this many values, an independent resample draws values, not counts
BATCH = 64  # resamples per matrix product: bounds memory at BATCH x boots floats


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

    boot: IntArray
    bins: IntArray
    count: IntArray
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

    def _units(self) -> IntArray:
        return np.unique(self.boot)

    def unit_boards(self) -> IntArray:
        return self.boot_board[self._units()]

    def matrix(self, w: Window) -> npt.NDArray[np.float32]:
        units = self._units()
        m = np.zeros((units.size, w.width + 2), dtype=np.float32)
        np.add.at(m, (np.searchsorted(units, self.boot), w.column(self.bins)), self.count.astype(np.float32))
        return m

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
            board_labels: list[str | None]) -> Hist:
    """The Hist of finite ``values`` whose records came from ``board_codes``/``boot_codes`` (codes of
    one table's categories; a boot is told apart by its board and boot code together)."""
    keys = board_codes.astype(np.int64) << 32 | boot_codes.astype(np.int64)
    ukeys, boot = np.unique(keys, return_inverse=True)
    pairs = boot.reshape(-1).astype(np.int64) << 40 | (to_bins(values) + (1 << 39))
    upairs, count = np.unique(pairs, return_counts=True)
    return Hist(
        boot=upairs >> 40,
        bins=(upairs & ((1 << 40) - 1)) - (1 << 39),
        count=count.astype(np.int64),
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
        inner = bin_values(lo + np.arange(self.width, dtype=np.int64) * self.factor + (self.factor - 1) // 2)
        self.values = np.concatenate([[bin_values(np.array([lo]))[0]], inner,
                                      [bin_values(np.array([lo + self.width * self.factor - 1]))[0]]])

    def column(self, bins: IntArray) -> IntArray:
        return np.clip((bins - self.lo) // self.factor + 1, 0, self.width + 1)

    def bin_at(self, column: int) -> int:
        """The first fine bin of ``column`` (clamped to the window)."""
        return self.lo + (min(max(column, 1), self.width) - 1) * self.factor


class Counts(Protocol):
    """One side's values as the bootstrap needs them: pooled fine bins, and counts per unit (a boot)
    and window column; ``unit_boards``: the board of each unit, in the matrix's row order."""

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

    def matrix(self, w: Window) -> npt.NDArray[np.float32]: ...


def _pooled_window(c: Counts, columns: int) -> Window:
    bins, counts = c.pooled()
    cum = np.cumsum(counts)
    total = int(cum[-1])
    lo = int(bins[int(np.searchsorted(cum, WINDOW_Q * total, side="left"))])
    hi = int(bins[min(int(np.searchsorted(cum, (1 - WINDOW_Q) * total, side="left")), bins.size - 1)])
    return Window(lo, hi, columns)


def _weights(board_of_unit: IntArray, resample_boots: bool, rng: np.random.Generator, batch: int
             ) -> npt.NDArray[np.float32]:
    """How often each unit is drawn in ``batch`` resamples: boards drawn with replacement, then, within
    each board drawn, its boots with replacement (a board of k boots drawn m times draws m*k boots).

    Drawn as uniform integers and counted (``bincount``): numpy's multinomial and binomial with array
    arguments cost ~25 ms each per batch at 10,000 boards, this ~10 ms for both stages."""
    boards, unit_board = np.unique(board_of_unit, return_inverse=True)
    unit_board = unit_board.reshape(-1)
    nb, nu = boards.size, unit_board.size
    rows = np.arange(batch, dtype=np.int64)[:, None]
    drawn = rng.integers(0, nb, size=(batch, nb))  # the boards of each resample
    if not resample_boots:
        mb = np.bincount((drawn + rows * nb).ravel(), minlength=batch * nb).reshape(batch, nb)
        return mb[:, unit_board].astype(np.float32)
    k = np.bincount(unit_board, minlength=nb)
    order = np.argsort(unit_board, kind="stable")  # units grouped by board
    starts = np.concatenate([[0], np.cumsum(k)[:-1]])
    counts = np.zeros(batch * nu, dtype=np.int64)
    kk_of = k[drawn]
    for kk in np.unique(kk_of):
        mask = kk_of == kk
        sel, row = drawn[mask], np.broadcast_to(rows, drawn.shape)[mask]
        # Each drawn board of kk boots draws kk of them with replacement.
        unit = order[starts[sel][:, None] + rng.integers(0, kk, size=(sel.size, int(kk)))]
        counts += np.bincount((unit + (row * nu)[:, None]).ravel(), minlength=batch * nu)
    return counts.reshape(batch, nu).astype(np.float32)


class WeightCache:
    """The final pass's resample weights of one side, shared by every metric of that side whose units
    (boots, in board order) are the same. Drawing them (boards with replacement, boots within boards)
    took ~30 of 41 s of a 1 M-record compare, redrawn for each of ~15 metrics; shared, the metrics of a side
    are resampled jointly (the same boards drawn for all of them), which is a bootstrap of the same design.
    Stored as uint8 counts (multiplicities stay far below 256), so 2,000 resamples of 20,000 boots take
    ~40 MiB per side. Its own random stream, so results do not depend on the order of the metrics."""

    def __init__(self, seed: list[int]) -> None:
        self._rng = np.random.default_rng(seed)
        self._store: dict[tuple[bytes, bool, int, int], npt.NDArray[np.generic]] = {}

    def weights(self, board_of_unit: IntArray, resample_boots: bool, start: int, batch: int
                ) -> npt.NDArray[np.float32]:
        key = (board_of_unit.tobytes(), resample_boots, start, batch)
        stored = self._store.get(key)
        if stored is None:
            w = _weights(board_of_unit, resample_boots, self._rng, batch)
            stored = w.astype(np.uint8) if w.size and float(w.max()) < 256 else w
            self._store[key] = stored
        return stored.astype(np.float32)


def _medians_of(hists: npt.NDArray[np.float32], w: Window) -> FloatArray:
    """The median of each row of ``hists`` (counts per window column): NaN for an empty row."""
    cum = np.cumsum(hists, axis=1, dtype=np.float64)
    total = cum[:, -1]
    # The lower and upper middle order statistics (0-based ranks), averaged as numpy's median does.
    r_lo, r_hi = np.floor((total - 1) / 2), np.ceil((total - 1) / 2)
    lo = (cum > r_lo[:, None]).argmax(axis=1)
    hi = (cum > r_hi[:, None]).argmax(axis=1)
    med = (w.values[lo] + w.values[hi]) / 2
    return np.where(total > 0, med, np.nan)


def _resample(m: npt.NDArray[np.float32], boards: IntArray, w: Window, design: str, resamples: int,
              rng: np.random.Generator, cache: WeightCache | None = None) -> FloatArray:
    out = np.empty(resamples)
    if design == "records":
        col = m.sum(axis=0, dtype=np.float64)
        n = round(col.sum())
        cols = np.arange(col.size)
        # Few values: draw them (b x n draws); many: draw the counts per column (cost independent of n).
        per_value = np.repeat(cols, col.astype(np.int64)) if n <= DRAW_VALUES else None
        for start in range(0, resamples, BATCH):
            b = min(BATCH, resamples - start)
            if per_value is not None:
                drawn = per_value[rng.integers(0, n, size=(b, n))] + (np.arange(b) * col.size)[:, None]
                counts = np.bincount(drawn.reshape(-1), minlength=b * col.size).reshape(b, -1)
            else:
                counts = rng.multinomial(n, col / col.sum(), size=b)
            out[start : start + b] = _medians_of(counts.astype(np.float32), w)
        return out
    # Rows are boots; under "boards" the weights draw boards, then boots within them; under "boots"
    # (one board) each boot stands alone.
    board = boards if design == "boards" else np.arange(m.shape[0], dtype=np.int64)
    for start in range(0, resamples, BATCH):
        b = min(BATCH, resamples - start)
        weights = (cache.weights(board, design == "boards", start, b) if cache is not None
                   else _weights(board, design == "boards", rng, b))
        out[start : start + b] = _medians_of(weights @ m, w)
    return out


PILOT_RESAMPLES = 200
PILOT_COLUMNS = 64
FINE_COLUMNS = 256
PILOT_MARGIN = 3  # coarse columns beyond the pilot's extremes: 200 pilots bound 2000 resamples loosely


def wide_window(c: Counts) -> Window:
    """The pilot's window: the pooled 2-98 % range on PILOT_COLUMNS columns."""
    return _pooled_window(c, PILOT_COLUMNS)


def fine_window(c: Counts, design: str, pilot_rng: np.random.Generator) -> Window | None:
    """The final pass's window: the pilot's resampled medians, PILOT_MARGIN coarse columns either side,
    on at most FINE_COLUMNS columns. None when no resample has a median."""
    wide = wide_window(c)
    pilot = _resample(c.matrix(wide), c.unit_boards(), wide, design, PILOT_RESAMPLES, pilot_rng)
    pilot = pilot[np.isfinite(pilot)]
    if pilot.size == 0:
        return None
    cols = wide.column(to_bins(pilot))
    lo, hi = wide.bin_at(int(cols.min()) - PILOT_MARGIN), wide.bin_at(int(cols.max()) + PILOT_MARGIN + 1) - 1
    return Window(lo, max(hi, lo), FINE_COLUMNS)


def resampled_medians(c: Counts, design: str, resamples: int, rng: np.random.Generator,
                      pilot_rng: np.random.Generator, cache: WeightCache | None = None) -> FloatArray:
    """``resamples`` bootstrap medians of ``c`` under ``design`` ("boards", "boots" or "records").

    Two passes, so that a source that computes its matrix by scanning the data (columnar.py) is asked
    for two small matrices, never a full histogram per unit: a pilot (its own random stream, so a source
    can run every metric's pilot before any final pass) on a coarse window over the pooled 2-98 % range
    finds where the resampled medians fall; the final resamples use a window of at most FINE_COLUMNS
    columns around that place (fine bins where it is narrow). Should a resampled median fall outside,
    the pass is repeated on the wide window with fine columns. ``cache``: the final pass draws its
    weights from the side's WeightCache (shared across metrics) instead of ``rng``; the pilot never does,
    so that its window is the one a columnar source prefetched.
    """
    fine = fine_window(c, design, pilot_rng)
    if fine is None:
        return np.full(resamples, np.nan)
    boards = c.unit_boards()
    out = _resample(c.matrix(fine), boards, fine, design, resamples, rng, cache)
    outside = fine.column(to_bins(out[np.isfinite(out)]))
    if outside.size and (outside.min() == 0 or outside.max() == fine.width + 1):
        wide = _pooled_window(c, WINDOW_BINS)
        out = _resample(c.matrix(wide), boards, wide, design, resamples, rng, cache)
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
