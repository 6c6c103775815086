"""Uncertainty for the report: 95 % bootstrap intervals over seeds and test images, paired differences and the
probability of improvement. Pure numpy / scipy on numbers the run folders hold; docs/protocol.md says how to read them.

- A cell's interval (:func:`cell_interval`) resamples the runs (seeds, subset seeds) and, inside each run, its test
  images stratified by class. Resampling the n_c images of a class with replacement, of which k_c are right, draws
  its correct count from Binomial(n_c, k_c / n_c): that is exact, needs only the per-class accuracies and test counts
  result.json records, and keeps the tail's few images counting as few. scipy's ``bootstrap`` resamples one flat
  sample and cannot nest images in runs or stratify, so this one resampling is written here. The runs share each
  image resample (a quantile coupling), as they were evaluated on the same images; per-image pairing would need
  per-image correctness, which result.json does not keep.
- Without per-class test counts (runs recorded before them) the interval is over runs only (``scipy.stats.bootstrap``).
- A paired difference (:func:`paired_difference`) is the mean of per-seed differences against a baseline trained on
  the same seed and subset, with its percentile interval from ``scipy.stats.bootstrap``; it is significant when the
  interval excludes 0. The probability of improvement is P(X > Y) over all pairs of runs (ties count half), the
  Mann-Whitney U statistic over n*m (Agarwal et al., NeurIPS 2021), from ``scipy.stats.mannwhitneyu``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
RESAMPLES = 2000  # enough for the 2.5 / 97.5 % points to a few hundredths of a point on these tables
SEED = 0  # fixed: the same run folders always give the same intervals


@dataclass(frozen=True)
class RunClasses:
    """What a run's test evaluation holds per class: accuracy in % (NaN for an absent class) and image count."""

    accuracy: np.ndarray
    counts: np.ndarray


def group_metric(correct: np.ndarray, counts: np.ndarray, classes: Sequence[int] | None) -> np.ndarray:
    """top-1 (``classes`` None: all correct over all images) or a group's mean per-class accuracy, in %, along the
    last axis of resampled correct counts."""
    if classes is None:
        return 100.0 * correct.sum(axis=-1) / counts.sum()
    idx = [c for c in classes if counts[c] > 0]
    if not idx:
        return np.full(correct.shape[:-1], np.nan)
    return 100.0 * (correct[..., idx] / counts[idx]).mean(axis=-1)


def cell_interval(runs: Sequence[RunClasses], classes: Sequence[int] | None,
                  resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The 95 % percentile interval of a cell's mean over runs, resampling runs and test images by class (see the
    module docstring). The runs of a cell were evaluated on the same test images, so one image resample is shared
    by all of them: per class, every run's binomial draws are sorted and dealt to the resamples in one shared random
    order (a quantile coupling: a resample that is hard for one run is hard for all)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(np.argsort(rng.random((resamples, len(runs[0].counts))), axis=0), axis=0)
    values = np.empty((len(runs), resamples))
    for r, run in enumerate(runs):
        right = np.rint(np.nan_to_num(run.accuracy) / 100.0 * run.counts)
        p = np.divide(right, run.counts, out=np.zeros(len(right)), where=run.counts > 0)
        draws = np.sort(rng.binomial(run.counts, p, size=order.shape), axis=0)
        values[r] = group_metric(np.take_along_axis(draws, order, axis=0), run.counts, classes)
    picks = rng.integers(0, len(runs), size=(resamples, len(runs)))
    return _percentiles(values[picks, np.arange(resamples)[:, None]].mean(axis=1))


def seed_interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The 95 % percentile interval of a mean over runs alone (scipy's bootstrap); NaN with fewer than two runs."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(data) < 2:
        return math.nan, math.nan
    if np.all(data == data[0]):
        return float(data[0]), float(data[0])
    result = sps.bootstrap((data,), np.mean, confidence_level=CONFIDENCE, n_resamples=resamples,
                           method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class Paired:
    """A method against the baseline over the seeds both have: mean difference, its interval, P(improvement)."""

    mean: float
    low: float
    high: float
    p_improve: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (a single pair has no interval, hence no significance)."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def paired_difference(values: Sequence[float], baseline: Sequence[float], lower_is_better: bool = False,
                      resamples: int = RESAMPLES, seed: int = SEED) -> Paired:
    """``values[i] - baseline[i]`` per pair, their mean and bootstrap interval; P(a run beats a baseline run)."""
    a, b = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    low, high = seed_interval(a - b, resamples, seed)
    better, worse = (b, a) if lower_is_better else (a, b)
    u = sps.mannwhitneyu(better, worse, alternative="two-sided").statistic
    return Paired(float(np.mean(a - b)), low, high, float(u) / (len(a) * len(b)), len(a))


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return math.nan, math.nan
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)
