"""Which timesteps carry the OOD signal: AUROC per timestep, per feature family, per window.

The error cache keeps per-image, per-step moments (:mod:`diffpath.cache`), so any subset of
timesteps can be scored without another model pass. For a *family* (one per-pixel quantity: ε along
the DDIM path, the score error, the SSIM-weighted error, or the temporal derivative of one of them)
and a contiguous *window* of steps [lo, hi), the feature of an image is the order-1/2/3 norm sums of
that quantity over the window (:func:`diffpath.core.moments.order_norm_sums`, 3-D). Windows of one
step give AUROC per timestep; longer windows show how much the summary gains from more steps
(DiffPathV2 leaves its timesteps open; later work uses only t = 100–300 of 1,000).

The density is deliberately light: one Gaussian (full covariance) on the standardised 3-D feature of
the in-distribution training images, so the whole table takes seconds; AUROC has the
in-distribution set positive, as everywhere in the study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler

from diffpath.core.moments import order_norm_sums
from diffpath.scoring.metrics import auroc

__all__ = ["FAMILIES", "window_feature", "gaussian_scores", "timestep_table"]

#: family name → (cache key, True when it is a temporal derivative with T − 1 steps)
FAMILIES: dict[str, tuple[str, bool]] = {
    "ε path": ("dp_eps", False),
    "Δε": ("dp_deps", True),
    "score error": ("v2_err", False),
    "Δ score error": ("v2_derr", True),
    "SSIM-weighted error": ("v2_werr", False),
    "Δ SSIM-weighted error": ("v2_dwerr", True),
}


def window_feature(cache: Mapping[str, np.ndarray], family: str, lo: int, hi: int) -> np.ndarray:
    """(N, 3) norm sums of ``family`` over steps ``lo .. hi − 1`` of a cache's (N, K, 5) moments."""
    key, _ = FAMILIES[family]
    m = np.asarray(cache[key], dtype=np.float64)
    if not 0 <= lo < hi <= m.shape[1]:
        raise ValueError(f"window [{lo}, {hi}) outside the {m.shape[1]} steps of {key}")
    return order_norm_sums(m[:, lo:hi])


def gaussian_scores(train: np.ndarray, tests: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Log-density under one full-covariance Gaussian fitted on standardised ``train`` (N, D)."""
    scaler = StandardScaler().fit(train)
    g = GaussianMixture(1, covariance_type="full", reg_covar=1e-6, random_state=0).fit(scaler.transform(train))
    return {name: g.score_samples(scaler.transform(x)) for name, x in tests.items()}


def timestep_table(
    train: Mapping[str, Mapping[str, np.ndarray]],
    test: Mapping[str, Mapping[str, np.ndarray]],
    in_dist: Sequence[str],
    timesteps: Sequence[int],
    families: Sequence[str] = tuple(FAMILIES),
) -> pd.DataFrame:
    """AUROC of every (family, in-distribution set, OOD set, window of steps).

    Args:
        train: ``{in_dist: cache}`` training-split caches of the in-distribution sets.
        test: ``{dataset: cache}`` test-split caches of every set.
        in_dist: the rows of the study.
        timesteps: the T original timesteps of the caches' steps (``dp_timesteps``); a derivative
            step i sits between timesteps i and i + 1 and is labelled by the later one.
        families: which of :data:`FAMILIES`.

    Returns:
        Columns ``family, in_dist, ood, lo, hi, t_first, t_last, steps, auroc``: every contiguous
        window [lo, hi) of the family's steps, ``t_first``/``t_last`` its timesteps.
    """
    rows = []
    for family in families:
        key, deriv = FAMILIES[family]
        n_steps = np.asarray(next(iter(test.values()))[key]).shape[1]
        for ind in in_dist:
            for lo in range(n_steps):
                for hi in range(lo + 1, n_steps + 1):
                    feats = {d: window_feature(c, family, lo, hi) for d, c in test.items()}
                    scores = gaussian_scores(window_feature(train[ind], family, lo, hi), feats)
                    for ood in test:
                        if ood == ind:
                            continue
                        rows.append({
                            "family": family, "in_dist": ind, "ood": ood, "lo": lo, "hi": hi,
                            "t_first": int(timesteps[lo + deriv]), "t_last": int(timesteps[hi - 1 + deriv]),
                            "steps": hi - lo, "auroc": auroc(scores[ind], scores[ood]),
                        })
    return pd.DataFrame(rows)
