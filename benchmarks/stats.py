"""AUC and bootstrap intervals over test subjects.

Every interval here is a percentile bootstrap over the test subjects of one training run: it says how much the
figure would move with another test set of the same size, not how much it would move with another training seed.
Gains compare two rows on the SAME test subjects (a paired bootstrap: each resample draws the same subjects for
both). AUC resamples positives and negatives separately (stratified), so every resample holds both classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_BOOTSTRAP = 2000
LEVEL = 0.95


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if not len(positives) or not len(negatives):
        return None
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def resamples(n: int, strata: Sequence[int] | None = None, n_bootstrap: int = N_BOOTSTRAP,
              seed: int = 0) -> np.ndarray:
    """`(n_bootstrap, n)` index arrays drawn with replacement; within each stratum when `strata` is given."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(n_bootstrap, n))
    strata = np.asarray(strata)
    if len(strata) != n:
        raise ValueError(f"{len(strata)} strata for {n} items")
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    return np.concatenate([g[rng.integers(0, len(g), size=(n_bootstrap, len(g)))] for g in groups], axis=1)


def percentile_interval(samples: Sequence[float], level: float = LEVEL) -> list[float]:
    """The central `level` percentile interval of bootstrap samples."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(samples, dtype=float), [tail, 100 - tail])
    return [float(low), float(high)]


def _interval(statistic: Callable[[np.ndarray], float], n: int, strata: Sequence[int] | None,
              seed: int) -> list[float]:
    return percentile_interval([statistic(index) for index in resamples(n, strata, seed=seed)])


def mean_interval(values: Sequence[float], seed: int = 0) -> list[float]:
    """95 % bootstrap interval of the mean of per-subject values (e.g. Dice)."""
    values = np.asarray(values, dtype=float)
    return percentile_interval(values[resamples(len(values), seed=seed)].mean(axis=1))


def auc_interval(scores: Sequence[float], labels: Sequence[int], seed: int = 0) -> list[float]:
    """95 % stratified bootstrap interval of the AUC."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    return _interval(lambda i: auc(scores[i], labels[i]), len(labels), labels, seed)


def gain_interval(random: Sequence[float], pretrained: Sequence[float], labels: Sequence[int] | None = None,
                  seed: int = 0) -> list[float]:
    """95 % paired bootstrap interval of `metric(pretrained) - metric(random)` over the same test subjects.

    Args:
        random: Per-subject values (Dice) or scores (with `labels`: AUC) of the randomly initialised row.
        pretrained: The same of the pretrained row, subject for subject.
        labels: Class labels; given, the metric is the AUC (stratified resampling), else the mean.
        seed: Seed of the resampling.
    """
    a, b = np.asarray(random, dtype=float), np.asarray(pretrained, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.shape} vs {b.shape}")
    if labels is None:
        return _interval(lambda i: float(b[i].mean() - a[i].mean()), len(a), None, seed)
    y = np.asarray(labels)
    return _interval(lambda i: auc(b[i], y[i]) - auc(a[i], y[i]), len(y), y, seed)
