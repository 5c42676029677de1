"""The detector's decision rule: threshold and percentiles from the normal images' scores.

``is_ood = score < threshold``, where the threshold is the k-th lowest of the N normal (training)
scores, k = ⌊(1 − accept)·N⌋ (0-based), so at least ``accept``·N of the normal images score at or
above it. A score's *percentile* is the percentage of normal scores strictly below it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_accept", "percentiles", "threshold_at"]


def check_accept(accept: float) -> float:
    """``accept`` as a float in (0, 1], or ValueError."""
    accept = float(accept)
    if not (0.0 < accept <= 1.0):
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    return accept


def threshold_at(train_scores: np.ndarray, accept: float) -> float:
    """The k-th lowest of the training scores (N,), k = ⌊(1 − accept)·N⌋: at least ``accept``·N
    of them are ≥ it (accepted as normal)."""
    s = np.sort(np.asarray(train_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no training scores")
    k = int(math.floor((1.0 - check_accept(accept)) * len(s) + 1e-9))
    return float(s[min(k, len(s) - 1)])


def percentiles(train_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(M,) percentage of the training scores (N,) strictly lower than each of ``scores`` (M,)."""
    s = np.sort(np.asarray(train_scores, np.float64))
    return 100.0 * np.searchsorted(s, np.asarray(scores, np.float64), side="left") / len(s)
