"""Features from per-step moments.

Every feature of the study is a function of the per-image, per-step moments that
:mod:`diffpath.core.sampling` reduces on the device (see :data:`diffpath.core.sampling.MOMENTS`), so that
the expensive model passes are cached once and every variant is computed from the cache.

DiffPath (Heng et al., 2024)
----------------------------
Statistics are sums over *all* steps, pixels and channels of the ε path and of its rate of change
Δε = diff(ε)·T; DiffPath saves twelve of them under these names:

``eps_sum`` Σε, ``eps_sum_abs`` Σ|ε|, ``eps_sum_sq`` Σε², ``eps_sum_sq_sqrt`` √Σε²,
``eps_sum_cb`` Σε³, ``eps_sum_cb_cbrt`` ∛Σε³, and the same six of Δε as ``deps_dt``,
``deps_dt_abs``, ``deps_dt_sq``, ``deps_dt_sq_sqrt``, ``deps_dt_cb``, ``deps_dt_cb_cbrt``.

The 6-D feature stacks (eps_sum, eps_sum_sq, eps_sum_cb, deps_dt, deps_dt_sq, deps_dt_cb); the 1-D
feature is the path's curvature ``deps_dt_sq_sqrt`` = √Σ‖Δε‖².
"""

from __future__ import annotations

import numpy as np

from diffpath.core.sampling import MOMENTS

__all__ = [
    "DIFFPATH_STAT_NAMES",
    "diffpath_statistics",
    "diffpath_6d",
    "diffpath_1d",
    "order_norm_sums",
]

_IDX = {name: i for i, name in enumerate(MOMENTS)}

DIFFPATH_STAT_NAMES: tuple[str, ...] = (
    "eps_sum",
    "eps_sum_abs",
    "eps_sum_sq",
    "eps_sum_sq_sqrt",
    "eps_sum_cb",
    "eps_sum_cb_cbrt",
    "deps_dt",
    "deps_dt_abs",
    "deps_dt_sq",
    "deps_dt_sq_sqrt",
    "deps_dt_cb",
    "deps_dt_cb_cbrt",
)


def _as_np(m) -> np.ndarray:
    if hasattr(m, "detach"):
        m = m.detach().cpu().numpy()
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 3 or m.shape[-1] != len(MOMENTS):
        raise ValueError(f"moments must have shape (B, T, {len(MOMENTS)}), got {m.shape}")
    return m


def _six(m: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    total = m.sum(axis=1)  # over steps
    s1, a1, s2, s3 = (total[:, _IDX[k]] for k in ("sum", "abs", "sq", "cb"))
    return {
        f"{prefix}": s1,
        f"{prefix}_abs": a1,
        f"{prefix}_sq": s2,
        f"{prefix}_sq_sqrt": np.sqrt(s2),
        f"{prefix}_cb": s3,
        f"{prefix}_cb_cbrt": np.cbrt(s3),
    }


def diffpath_statistics(eps_moments, deps_moments) -> dict[str, np.ndarray]:
    """The twelve DiffPath statistics, each (B,) float64, from (B, T, 5) and (B, T−1, 5) moments."""
    eps = _six(_as_np(eps_moments), "eps_sum")
    deps = _six(_as_np(deps_moments), "deps_dt")
    return {**eps, **deps}


def diffpath_6d(stats: dict[str, np.ndarray]) -> np.ndarray:
    """(B, 6): eps_sum, eps_sum_sq, eps_sum_cb, deps_dt, deps_dt_sq, deps_dt_cb."""
    keys = ("eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt", "deps_dt_sq", "deps_dt_cb")
    return np.column_stack([stats[k] for k in keys])


def diffpath_1d(stats: dict[str, np.ndarray]) -> np.ndarray:
    """(B,): the curvature √Σ‖Δε‖² (``deps_dt_sq_sqrt``)."""
    return np.asarray(stats["deps_dt_sq_sqrt"], dtype=np.float64)


def order_norm_sums(m, kind: str = "norm") -> np.ndarray:
    """Sums over steps of the 1st-, 2nd- and 3rd-order sizes of a per-pixel quantity.

    Args:
        m: (B, T, 5) moments of the quantity at each step.
        kind: ``"norm"``: Σ_t ‖q_t‖₁, Σ_t ‖q_t‖₂, Σ_t ‖q_t‖₃ (vector p-norms over pixels);
            ``"power"``: Σ_t Σ|q_t|, Σ_t Σq_t², Σ_t Σ|q_t|³ (absolute power sums, DiffPath-style).

    Returns:
        (B, 3) float64.
    """
    m = _as_np(m)
    a1, s2, a3 = m[..., _IDX["abs"]], m[..., _IDX["sq"]], m[..., _IDX["abs_cb"]]
    if kind == "norm":
        parts = (a1, np.sqrt(s2), np.cbrt(a3))
    elif kind == "power":
        parts = (a1, s2, a3)
    else:
        raise ValueError(f"kind must be 'norm' or 'power', got {kind!r}")
    return np.stack([p.sum(axis=1) for p in parts], axis=1)
