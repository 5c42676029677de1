"""The detector's decision rule: a split-conformal threshold and percentiles from held-out scores.

The threshold is calibrated on n *calibration* scores: log-densities of normal images the scorer
was **not** fitted on (its own training images score optimistically high). With the calibration
scores sorted, s_(1) ≤ … ≤ s_(n), and

    k = ⌊(1 − accept)·(n + 1)⌋,    threshold = s_(k)    (k = 0: no threshold, nothing is flagged),

``is_ood = score < threshold``. For a new normal image whose score is exchangeable with the
calibration scores (drawn from the same distribution as the normal images, the calibration part
chosen at random),

    P(accepted) = P(score ≥ s_(k)) ≥ (n + 1 − k)/(n + 1) = ⌈accept·(n + 1)⌉/(n + 1) ≥ accept,

the probability taken over the calibration images and the new image together (split-conformal
prediction; Vovk et al. 2005, Lei et al. 2018). Without ties it is also below that bound plus
1/(n + 1). For one fitted detector (its calibration images fixed) the acceptance rate is a draw
from Beta(n + 1 − k, k), whose spread is about √(accept·(1 − accept)/n).

``accept`` is read as the decimal number it is written as (0.95 = 95/100), so k is exact.
A score's *percentile* is the percentage of calibration scores strictly below it.

The calibration part (:func:`calibration_split`) is ⌊fraction·N⌋ of the N normal images (at least
one, leaving at least one for the scorer), drawn at random with a seed, so that it is exchangeable
with new images drawn from the same distribution.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ["calibration_size", "calibration_split", "check_accept", "check_calibration", "conformal_rank",
           "guarantee", "min_calibration", "percentiles", "threshold_at"]


def check_accept(accept: float) -> float:
    """``accept`` as a float in (0, 1], or ValueError (also for NaN, booleans and strings)."""
    if isinstance(accept, bool) or not isinstance(accept, (int, float, np.integer, np.floating)):
        raise ValueError(f"accept must be a number in (0, 1], got {accept!r}")
    accept = float(accept)
    if not (0.0 < accept <= 1.0):
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    return accept


def conformal_rank(n: int, accept: float) -> int:
    """k = ⌊(1 − accept)·(n + 1)⌋ (1-based rank of the threshold among n calibration scores; 0:
    there is no threshold). ``accept`` is taken as its shortest decimal form (exact)."""
    if n < 1:
        raise ValueError("no calibration scores")
    a = Fraction(repr(check_accept(accept)))
    return min(n, math.floor((1 - a) * (n + 1)))


def min_calibration(accept: float) -> int | None:
    """The fewest calibration scores that give a threshold at ``accept`` (k ≥ 1):
    ⌈1/(1 − accept)⌉ − 1 (19 at 0.95); None for ``accept`` = 1 (never)."""
    a = Fraction(repr(check_accept(accept)))
    return None if a == 1 else math.ceil(1 / (1 - a)) - 1


def guarantee(n: int, accept: float) -> float:
    """The split-conformal lower bound (n + 1 − k)/(n + 1) = ⌈accept·(n + 1)⌉/(n + 1) on the
    probability that a new normal image is accepted, with n calibration scores."""
    return (n + 1 - conformal_rank(n, accept)) / (n + 1)


def threshold_at(calibration_scores: np.ndarray, accept: float) -> float:
    """The k-th lowest of the calibration scores (n,), k = :func:`conformal_rank`; ``-inf`` when
    k = 0 (too few calibration scores for ``accept``: nothing is flagged)."""
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    k = conformal_rank(len(s), accept)
    return float(s[k - 1]) if k >= 1 else -math.inf


def percentiles(calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(M,) percentage of the calibration scores (n,) strictly lower than each of ``scores`` (M,)."""
    s = np.sort(np.asarray(calibration_scores, np.float64))
    return 100.0 * np.searchsorted(s, np.asarray(scores, np.float64), side="left") / len(s)


def check_calibration(calibration: float) -> float:
    """The calibration share as a float in (0, 1), or ValueError."""
    ok = isinstance(calibration, (int, float, np.integer, np.floating)) and not isinstance(calibration, bool)
    if not ok or not 0.0 < float(calibration) < 1.0:
        raise ValueError(f"calibration must be a fraction in (0, 1), got {calibration!r}")
    return float(calibration)


def calibration_size(n_images: int, fraction: float) -> int:
    """How many of ``n_images`` normal images calibrate the threshold: ⌊fraction·N⌋ (the fraction
    read as the decimal it is written as), at least 1 and leaving at least 1 for the scorer."""
    return min(max(1, math.floor(Fraction(repr(float(fraction))) * n_images)), n_images - 1)


def calibration_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibration) indices of n images, each sorted: a random calibration part of
    :func:`calibration_size` images (``seed``), the rest for the scorer."""
    perm = np.random.default_rng(seed).permutation(n)
    n_cal = calibration_size(n, fraction)
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])
