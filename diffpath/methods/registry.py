"""The detection methods of the study, by name: features from the error cache + a scorer.

=====================  ======  ======  ========================================================
method                 dims    scorer  features
=====================  ======  ======  ========================================================
``diffpath``           6       gmm     DiffPath-6D: Σε, Σε², Σε³, ΣΔε, ΣΔε², ΣΔε³
``diffpath_1d``        1       kde     DiffPath-1D: curvature √Σ‖Δε‖²
``score_error``        6       gmm     score error e_t without SSIM weighting (norm sums + Δ)
``diffpathv2``         6       gmm     DiffPathV2: SSIM-weighted e_t, norm sums + Δ (full method)
``diffpathv2_power``   6       gmm     ablation: power sums Σ|w|^p instead of p-norms
``diffpathv2_noderiv`` 3       gmm     ablation: no temporal-derivative half
``diffpathv2_1d``      1       kde     1-D: √Σ‖Δw‖², the weighted error's curvature
=====================  ======  ======  ========================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from diffpath.methods.diffpath import DIFFPATH_KEYS, diffpath_1d, diffpath_6d, diffpath_statistics
from diffpath.methods.diffpathv2 import SCORE_ERROR_KEYS, diffpathv2_1d, diffpathv2_features

__all__ = ["Method", "METHODS", "get_method", "method_features"]


def _v2(err: str, kind: str = "norm", derivative: bool = True) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """Features of the error ``err`` (``"err"`` or ``"werr"``) and of its derivative."""
    def f(cache: Mapping[str, np.ndarray]) -> np.ndarray:
        return diffpathv2_features(cache[SCORE_ERROR_KEYS[err]], cache[SCORE_ERROR_KEYS["d" + err]],
                                   kind=kind, derivative=derivative)

    return f


def _v2_1d(cache: Mapping[str, np.ndarray]) -> np.ndarray:
    return diffpathv2_1d(cache[SCORE_ERROR_KEYS["dwerr"]])


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # the cache pass it needs: "diffpath" or "diffpathv2"
    dims: int
    scorer: str  # "gmm" or "kde"
    description: str
    fn: Callable[[Mapping[str, np.ndarray]], np.ndarray]

    def features(self, cache: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N, dims) float64 features of every image in ``cache``."""
        missing = [k for k in _NEEDS[self.family] if k not in cache]
        if missing:
            raise KeyError(f"method {self.name!r} needs cache arrays {missing}; rerun the errors "
                           f"pass with family {self.family!r}")
        f = np.asarray(self.fn(cache), dtype=np.float64)
        return f.reshape(len(f), -1)


_NEEDS = {"diffpath": (DIFFPATH_KEYS["eps"], DIFFPATH_KEYS["deps"]),
          "diffpathv2": tuple(SCORE_ERROR_KEYS[k] for k in ("err", "derr", "werr", "dwerr"))}


def _dp_stats(c: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return diffpath_statistics(c[DIFFPATH_KEYS["eps"]], c[DIFFPATH_KEYS["deps"]])


def _dp6(c: Mapping[str, np.ndarray]) -> np.ndarray:
    return diffpath_6d(_dp_stats(c))


def _dp1(c: Mapping[str, np.ndarray]) -> np.ndarray:
    return diffpath_1d(_dp_stats(c))


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("diffpath", "diffpath", 6, "gmm", "DiffPath-6D (Heng et al. 2024)", _dp6),
        Method("diffpath_1d", "diffpath", 1, "kde", "DiffPath-1D curvature", _dp1),
        Method("score_error", "diffpathv2", 6, "gmm", "score error, no SSIM weighting", _v2("err")),
        Method("diffpathv2", "diffpathv2", 6, "gmm", "DiffPathV2: SSIM-weighted score error", _v2("werr")),
        Method("diffpathv2_power", "diffpathv2", 6, "gmm", "DiffPathV2 with power sums", _v2("werr", "power")),
        Method("diffpathv2_noderiv", "diffpathv2", 3, "gmm", "DiffPathV2 without the derivative half",
               _v2("werr", derivative=False)),
        Method("diffpathv2_1d", "diffpathv2", 1, "kde", "DiffPathV2-1D weighted-error curvature", _v2_1d),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def method_features(name: str, cache: Mapping[str, np.ndarray]) -> np.ndarray:
    return get_method(name).features(cache)
