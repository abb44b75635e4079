"""Uncertainty for every number the book compares: one bootstrap, used by every chapter.

**Method.** A result rests on a few seeds (each seed = one test subset and one demonstration draw) and, within each
seed, on N test examples. The paper's aggregation is a statistic per seed, then the mean over seeds. We keep that
aggregation and put an interval on it with a **hierarchical bootstrap**: each replicate draws the seeds with
replacement, then resamples, with replacement, the N_s examples of every drawn seed, recomputes the statistic per
seed and averages. The 95% interval is the 2.5 and 97.5 percentiles of the replicates (percentile bootstrap); the
80% interval of the same replicates (``weak_low``, ``weak_high``) is what a verdict's "partly" needs.

*Why both levels.* Which demonstrations were drawn is the largest source of variance in in-context learning: seeds
can disagree by tens of points. An interval over test examples alone answers "would this curve look the same on
other test examples with these demonstrations?"; resampling the seeds too answers the question a reviewer asks,
"would it look the same with other demonstrations?". ``seeds=False`` gives the within-seed interval alone, and
:attr:`Estimate.seed_values` keeps the per-seed statistics (printed beside the pooled value). With one seed there is
nothing to resample between seeds: the interval is then the within-seed one (the verdicts say "too few seeds").
Estimates pooled over tasks draw the seeds within each task (:func:`pooled_over`). Both are reported as
``n = examples × seeds``.

The statistic may return a scalar (an accuracy, a loyalty) or an array (a curve over layers, a (3, L) flow), and may
be undefined on a replicate (NaN, e.g. an AUC when only one class is predicted): replicates are averaged over the
seeds where it is defined (``nanmean``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["layer_text", "Estimate", "bootstrap", "bootstrap_weighted", "resample_counts", "mean_estimate", "paired_difference",
           "N_BOOT", "LEVEL", "WEAK_LEVEL", "HIERARCHICAL", "pooled_over"]

N_BOOT = 1000
LEVEL = 0.95
WEAK_LEVEL = 0.80  # the weaker interval a verdict's "partly" needs (stated with the rules, helpers.core.findings)
# Resample the seeds too (a hierarchical bootstrap: seeds, then examples within each drawn seed), so an interval
# includes which demonstrations were drawn. The default for every estimate; ``seeds=False`` gives the within-seed
# interval alone.
HIERARCHICAL = True
_BLOCKS: contextvars.ContextVar[int] = contextvars.ContextVar("blocks", default=1)


@contextlib.contextmanager
def pooled_over(n_blocks: int):
    """Inside, a list of per-seed items is read as ``n_blocks`` equal blocks (tasks, task-major: every seed of the
    first task, then of the second, ...): the hierarchical bootstrap draws seeds within each block, so the tasks
    stay fixed and only which demonstrations were drawn varies. Used by the verdicts that pool the four tasks."""
    token = _BLOCKS.set(int(n_blocks))
    try:
        yield
    finally:
        _BLOCKS.reset(token)

PerSeed = Sequence  # a sequence over seeds; each item an array (examples first) or a tuple of such arrays


@dataclass(frozen=True)
class Estimate:
    """A statistic averaged over seeds, with its bootstrap interval and sample size.

    ``value``, ``low`` and ``high`` are floats for a scalar statistic and arrays for a curve. ``seed_values`` has
    one entry per seed (axis 0).
    """

    value: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    n_examples: int  # examples per seed (the smallest, if they differ)
    n_seeds: int
    seed_values: np.ndarray = field(repr=False)
    level: float = LEVEL
    weak_low: float | np.ndarray | None = None  # the same replicates' WEAK_LEVEL interval (verdict rules' "partly")
    weak_high: float | np.ndarray | None = None
    hierarchical: bool = False  # whether the interval includes the demonstration draw (seeds resampled too)

    @property
    def n(self) -> str:
        """``"32 × 3"``: examples per seed × seeds."""
        return f"{self.n_examples} × {self.n_seeds}"

    @property
    def n_total(self) -> int:
        return self.n_examples * self.n_seeds

    @property
    def seed_std(self) -> float | np.ndarray:
        """Standard deviation of the per-seed statistics (ddof=1; NaN with one seed)."""
        if self.n_seeds < 2:
            return np.full_like(np.asarray(self.value, dtype=float), np.nan)[()]
        return np.nanstd(self.seed_values, axis=0, ddof=1)[()]

    def scaled(self, factor: float) -> "Estimate":
        """The same estimate in other units (e.g. ``100`` for per cent)."""
        low, high = np.multiply(self.low, factor), np.multiply(self.high, factor)
        weak = (None, None)
        if self.weak_low is not None:
            wl, wh = np.multiply(self.weak_low, factor), np.multiply(self.weak_high, factor)
            weak = (np.minimum(wl, wh)[()], np.maximum(wl, wh)[()])
        return Estimate(  # a negative factor swaps the ends of the interval
            np.multiply(self.value, factor)[()], np.minimum(low, high)[()], np.maximum(low, high)[()],
            self.n_examples, self.n_seeds, np.asarray(self.seed_values) * factor, self.level, *weak,
            self.hierarchical,
        )

    def fmt(self, digits: int = 1, interval: bool = True) -> str:
        """``"62.5 [51.0, 73.9]"`` (a scalar estimate)."""
        if np.ndim(self.value):
            raise ValueError("fmt() formats a scalar estimate; this one is a curve")
        v = f"{self.value:.{digits}f}"
        return f"{v} [{self.low:.{digits}f}, {self.high:.{digits}f}]" if interval else v

    def __format__(self, spec: str) -> str:  # f"{est:.1f}" -> "62.5 [51.0, 73.9]"
        digits = int(spec[1:-1]) if spec.startswith(".") and spec.endswith("f") else 1
        return self.fmt(digits)

    def above(self, x: float) -> bool | np.ndarray:
        """Whether the whole interval lies above ``x`` (the claim "greater than x" is supported)."""
        return np.asarray(self.low) > x

    def below(self, x: float) -> bool | np.ndarray:
        """Whether the whole interval lies below ``x``."""
        return np.asarray(self.high) < x

    def contains(self, x: float) -> bool | np.ndarray:
        return (np.asarray(self.low) <= x) & (x <= np.asarray(self.high))


def _intervals(reps: np.ndarray, value, level: float) -> tuple:
    """(low, high, weak_low, weak_high): percentile intervals at ``level`` and :data:`WEAK_LEVEL`."""
    if not np.isfinite(reps).any():
        nan = np.full_like(np.asarray(value, dtype=float), np.nan)[()]
        return nan, nan, nan, nan
    alpha, weak = (1 - level) / 2, (1 - WEAK_LEVEL) / 2
    with np.errstate(all="ignore"):
        low, high, wl, wh = np.nanquantile(reps, [alpha, 1 - alpha, weak, 1 - weak], axis=0)
    return np.asarray(low)[()], np.asarray(high)[()], np.asarray(wl)[()], np.asarray(wh)[()]


def _seed_draw(rng: np.random.Generator, n_seeds: int, hierarchical: bool) -> np.ndarray:
    """The items of one replicate: all of them once (within-seed bootstrap), or S drawn with replacement, within
    each block of :func:`pooled_over` (the seeds of one task are drawn from that task's seeds)."""
    blocks = _BLOCKS.get()
    if not hierarchical or n_seeds < 2:
        return np.arange(n_seeds)
    if blocks > 1 and n_seeds % blocks == 0:
        size = n_seeds // blocks
        if size == 1:  # one seed per task: nothing to draw between seeds, and the tasks stay fixed
            return np.arange(n_seeds)
        return (np.arange(blocks)[:, None] * size + rng.integers(0, size, (blocks, size))).ravel()
    return rng.integers(0, n_seeds, n_seeds)


def _as_tuple(item) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a) for a in item) if isinstance(item, tuple) else (np.asarray(item),)


def bootstrap(
    per_seed: PerSeed,
    statistic: Callable[..., float | np.ndarray] = np.mean,
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    seeds: bool | None = None,
) -> Estimate:
    """Stratified bootstrap over examples within seeds of ``statistic`` averaged over seeds (``seeds=True``, the
    default when :data:`HIERARCHICAL`: the seeds are resampled too, then the examples within each drawn seed).

    Args:
        per_seed: one item per seed; an item is an array whose axis 0 is the examples, or a tuple of arrays aligned
            on axis 0 (e.g. ``(attention, pred)``), which are resampled together.
        statistic: called as ``statistic(*arrays)`` on one seed's (resampled) arrays; returns a scalar or an array.
            NaN marks "undefined on this sample".
        n_boot: bootstrap replicates.
        level: coverage of the percentile interval.
        seed: the bootstrap's own random seed (results are reproducible).
        seeds: resample the seeds as well (a hierarchical bootstrap); default :data:`HIERARCHICAL`.
    """
    hierarchical = HIERARCHICAL if seeds is None else bool(seeds)
    items = [_as_tuple(x) for x in per_seed]
    if not items:
        raise ValueError("bootstrap needs at least one seed")
    sizes = []
    for arrays in items:
        n = len(arrays[0])
        if n == 0 or any(len(a) != n for a in arrays):
            raise ValueError("each seed needs at least one example, and its arrays must share axis 0")
        sizes.append(n)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")

    seed_values = np.array([np.asarray(statistic(*arrays), dtype=float) for arrays in items])
    value = _nanmean0(seed_values)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        per = []
        for s in _seed_draw(rng, len(items), hierarchical):
            arrays, n = items[s], sizes[s]
            idx = rng.integers(0, n, n)
            per.append(np.asarray(statistic(*(a[idx] for a in arrays)), dtype=float))
        reps.append(_nanmean0(np.array(per)))
    reps = np.array(reps)
    low, high, wl, wh = _intervals(reps, value, level)
    return Estimate(np.asarray(value)[()], low, high, min(sizes), len(items), seed_values, level, wl, wh,
                    hierarchical and len(items) > 1)


def resample_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) multiplicities: row b counts how often each example appears in the b-th resample of n from n."""
    idx = rng.integers(0, n, (n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)


def bootstrap_weighted(
    per_seed: PerSeed,
    statistic: Callable[..., np.ndarray],
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
    then: Callable[[np.ndarray], np.ndarray] | None = None,
    seeds: bool | None = None,
) -> Estimate:
    """The bootstrap of :func:`bootstrap` for a statistic vectorised over replicates (fast for curves).

    A resample of a seed's N examples is the same as weighting each example by its multiplicity in the resample, so
    ``statistic(*arrays, weights=W)`` gets W of shape (B, N) (rows from :func:`resample_counts`; all ones for the
    point estimate) and must return (B, ...) values, NaN where undefined. Replicates are averaged over seeds as in
    :func:`bootstrap`. ``then``, if given, is applied to the seed average (e.g. R_l = f(mean AUC curve)); the
    point value is then ``then(mean over seeds)`` and ``seed_values`` are ``then`` of each seed's value. With
    ``seeds`` (default :data:`HIERARCHICAL`) each replicate draws the seeds with replacement and, for each drawn
    seed, one of its within-seed replicates at random.
    """
    hierarchical = HIERARCHICAL if seeds is None else bool(seeds)
    items = [_as_tuple(x) for x in per_seed]
    if not items:
        raise ValueError("bootstrap needs at least one seed")
    for arrays in items:
        n = len(arrays[0])
        if n == 0 or any(len(a) != n for a in arrays):
            raise ValueError("each seed needs at least one example, and its arrays must share axis 0")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    point = np.array([np.asarray(statistic(*a, weights=np.ones((1, len(a[0])))), dtype=float)[0] for a in items])
    reps = np.array([np.asarray(statistic(*a, weights=resample_counts(len(a[0]), n_boot, rng)), dtype=float)
                     for a in items])  # (S, B, ...)
    if hierarchical and len(items) > 1:  # replicate b: seeds drawn with replacement, each with a random replicate
        drawn = np.stack([_seed_draw(rng, len(items), True) for _ in range(n_boot)])
        column = rng.integers(0, n_boot, (n_boot, len(items)))
        reps = np.swapaxes(reps[drawn, column], 0, 1)  # (S, B, ...)
    reps = _nanmean0(reps)
    value = _nanmean0(point)
    seed_values = point
    if then is not None:
        value = np.asarray(then(value))
        reps = np.array([then(r) for r in reps])
        seed_values = np.array([then(p) for p in point])
    low, high, wl, wh = _intervals(reps, value, level)
    return Estimate(np.asarray(value)[()], low, high, min(len(a[0]) for a in items), len(items), seed_values, level,
                    wl, wh, hierarchical and len(items) > 1)


def layer_text(est: Estimate, n_layers: int) -> str:
    """A layer number (1-based) with its 95% interval, ``"12 [10, 14]"``; the interval's ends are rounded outwards
    to whole layers, and ``n_layers + 1`` (past the last layer: the event never happens) reads ``"never"`` (alone when
    every replicate agrees).
    Used in: Extraction (the peak layer, where R_l reaches 0.5), Anchors without meaning (the crossover layer)."""

    def one(x: float) -> str:
        if not np.isfinite(x):
            return "?"
        return "never" if x > n_layers else f"{int(x)}"

    value = float(est.value)
    low, high = float(np.floor(est.low)), float(np.ceil(est.high))
    if value > n_layers and low > n_layers:  # never, in every replicate
        return "never"
    return f"{one(np.round(value))} [{one(low)}, {one(high)}]"


def _nanmean0(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN, without the all-NaN warning (all-NaN gives NaN)."""
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    count = ok.sum(axis=0)
    total = np.where(ok, x, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def mean_estimate(per_seed: PerSeed, **kw) -> Estimate:
    """Mean of per-example values (e.g. 0/1 correctness, a loyalty per example) with its interval."""
    return bootstrap(per_seed, lambda a: np.mean(a, axis=0), **kw)


def paired_difference(a_per_seed: PerSeed, b_per_seed: PerSeed, **kw) -> Estimate:
    """Mean of a − b over the same examples (paired: resampled together), e.g. re-weighting minus ICL correctness."""
    pairs = []
    for a, b in zip(a_per_seed, b_per_seed, strict=True):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape:
            raise ValueError(f"paired_difference needs the same examples: shapes {a.shape} and {b.shape}")
        pairs.append(a - b)
    return mean_estimate(pairs, **kw)
