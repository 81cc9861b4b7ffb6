"""
Numbers you can trust on small test sets: a 95 % bootstrap interval over images for a metric that is a mean of
per-image scores (ROUGE-L, CIDEr-D with the set's document frequencies), for corpus BLEU (its per-image counts
resampled and summed), for METEOR (its per-image scores' interval, centred on the corpus score), and the paired bootstrap difference between
two sets of captions for the same images (eval.py --compare). Images are resampled with replacement, the same draws
for both sides of a pair, from a seeded generator: the same scores always give the same interval.

    from capkit.evaluation.bootstrap import interval, paired
    lo, hi = interval(per_image_cider)                   # 95 %: the 2.5th and 97.5th percentiles of 1,000 means
    d = paired(cider_a, cider_b)                         # {"difference", "interval", "b_better"}: B - A
"""
from __future__ import annotations

import numpy as np

RESAMPLES = 1000  # bootstrap draws (Koehn 2004 uses 1,000)
LEVEL = 0.95


def _means(x: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` draws of len(x) images with replacement -> (resamples,)."""
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    return x[idx].mean(axis=1)


def _bounds(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def interval(per_image, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """The (low, high) percentile interval of the mean over images; (nan, nan) for no images."""
    x = np.asarray(per_image, dtype=float)
    if not len(x):
        return float("nan"), float("nan")
    return _bounds(_means(x, resamples, seed), level)


def corpus_intervals(rows, score, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> list[tuple[float, float]]:
    """The intervals of corpus-level metrics (corpus BLEU-1..4: clipped n-gram counts summed over images, then a
    ratio): rows (N, D) each image's statistics; score(sums (R, D)) -> (K, R) K metrics of each draw's sums."""
    x = np.asarray(rows, dtype=float)
    if not len(x):
        return []
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    sums = np.concatenate([x[chunk].sum(axis=1) for chunk in np.array_split(idx, max(1, resamples // 100))])  # (R, D)
    return [_bounds(np.asarray(v), level) for v in score(sums)]


def shifted_interval(value: float, per_image, **kw) -> tuple[float, float]:
    """For a corpus score that only its own tool computes (METEOR's Java aggregate): the interval of the per-image
    scores' mean, moved to be centred as the corpus score is (value - mean of per_image)."""
    lo, hi = interval(per_image, **kw)
    shift = value - float(np.mean(per_image)) if len(per_image) else 0.0
    return lo + shift, hi + shift


def paired(a, b, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> dict:
    """B - A over the same images: the mean difference, its interval, and the share of draws in which B is ahead."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same images: {len(a)} vs {len(b)}")
    if not len(a):
        return {"difference": float("nan"), "interval": (float("nan"), float("nan")), "b_better": float("nan")}
    means = _means(b - a, resamples, seed)  # one set of draws for the interval and the share
    return {"difference": float((b - a).mean()), "interval": _bounds(means, level), "b_better": float((means > 0).mean())}


def with_interval(value: float, bounds) -> str:
    """0.2843 [0.2210, 0.3502]"""
    return f"{value:.4f} [{bounds[0]:.4f}, {bounds[1]:.4f}]"
