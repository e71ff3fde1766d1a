"""Summary statistics of per-sample scores: mean, median, spread and a seeded bootstrap interval."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, *, level: float = 0.95, resamples: int = 1000, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; the same values and seed give the same interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    # chunks keep the index matrix small for large evaluations
    for start in range(0, resamples, 100):
        n = min(100, resamples - start)
        means[start:start + n] = values[rng.integers(0, values.size, size=(n, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def describe(values, *, seed: int = 0) -> dict:
    """{'n', 'mean', 'median', 'std', 'ci95': [low, high]} of a list of scores (NaN-free)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "ci95": [None, None]}
    low, high = bootstrap_ci(arr, seed=seed)
    return {"n": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "ci95": [low, high]}


def paired_difference(a, b, *, seed: int = 0) -> dict:
    """How `a` differs from `b`, sample by sample (the same test samples scored two ways).

    {'n', 'mean' of a - b, 'ci95': the seeded bootstrap interval of that mean (samples resampled as pairs),
    'wins': the share of samples where a > b, 'p_wilcoxon': the two-sided Wilcoxon signed-rank p-value
    (scipy; exact for small n without ties, the normal approximation otherwise; 1.0 when every difference is
    zero)}. A p-value says whether the gap could be chance over these samples, not how large it is.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return {"n": 0, "mean": None, "ci95": [None, None], "wins": None, "p_wilcoxon": None}
    low, high = bootstrap_ci(d, seed=seed)
    p = 1.0 if not np.any(d) else float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    return {"n": int(d.size), "mean": float(d.mean()), "ci95": [low, high], "wins": float(np.mean(d > 0)),
            "p_wilcoxon": p}


def distinct_ngrams(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of `texts` (1.0 = no n-gram repeats; falls when captions collapse)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_pairwise_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine between different rows of L2-normalised `embeddings` (rises when captions collapse)."""
    n = len(embeddings)
    if n < 2:
        return float("nan")
    total = embeddings.sum(axis=0)
    # sum over i != j of e_i . e_j = |sum e|^2 - sum |e_i|^2
    off_diagonal = float(total @ total) - float(np.sum(embeddings * embeddings))
    return off_diagonal / (n * (n - 1))
