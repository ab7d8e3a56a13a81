"""Summary statistics of a metric's scores: mean, standard deviation and a 95% bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
_CHUNK = 100


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``resamples`` means of ``n`` draws with replacement.

    Deterministic for a ``seed``; drawn in chunks so that 10k+ scores stay in little memory.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci of no values")
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[rng.integers(0, x.size, (min(_CHUNK, resamples - k), x.size))].mean(axis=1)
                            for k in range(0, resamples, _CHUNK)])
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, ddof=1; 0 for one value), "ci95": [lo, hi], "n"}`` of the scores."""
    x = np.asarray(values, dtype=np.float64)
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    lo, hi = bootstrap_ci(x)
    return {"mean": float(x.mean()), "std": std, "ci95": [lo, hi], "n": int(x.size)}


__all__ = ["bootstrap_ci", "summarize", "BOOTSTRAP_RESAMPLES"]
