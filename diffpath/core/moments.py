"""Per-image moments of a per-pixel quantity, and the order-p sums every feature is built from.

The model passes reduce each per-pixel quantity ``q`` of shape (B, C, H, W) (ε along the DDIM path,
a score error, a weighted error, their temporal differences) to five per-image sums on the device,
in the order of :data:`MOMENTS`:

====== ===========
sum     Σ q
abs     Σ |q|
sq      Σ q²
cb      Σ q³
abs_cb  Σ |q|³
====== ===========

These cover every feature of the study: DiffPath's sums of ε, ε², ε³ (signed), the norms of
DiffPathV2 (‖q‖₁ = abs, ‖q‖₂ = √sq, ‖q‖₃ = ∛abs_cb) and plain power sums.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MOMENTS", "moments", "as_moments", "moment", "order_norm_sums"]

MOMENTS: tuple[str, ...] = ("sum", "abs", "sq", "cb", "abs_cb")
_IDX = {name: i for i, name in enumerate(MOMENTS)}


def moments(q: torch.Tensor) -> torch.Tensor:
    """Per-image sums of powers of ``q``.

    Args:
        q: (B, ...) any float tensor.

    Returns:
        (B, 5) float64 on ``q``'s device: Σq, Σ|q|, Σq², Σq³, Σ|q|³ (see :data:`MOMENTS`).
    """
    x = q.reshape(q.shape[0], -1).double()
    a = x.abs()
    x2 = x * x
    return torch.stack(
        [x.sum(1), a.sum(1), x2.sum(1), (x2 * x).sum(1), (x2 * a).sum(1)], dim=1
    )


def as_moments(m: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-step moments as a float64 numpy array, checked to be (B, K, 5) (K steps)."""
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 3 or m.shape[-1] != len(MOMENTS):
        raise ValueError(f"moments must have shape (B, K, {len(MOMENTS)}), got {m.shape}")
    return m


def moment(m: np.ndarray, name: str) -> np.ndarray:
    """The (B, K) slice of one named moment of (B, K, 5) moments."""
    return m[..., _IDX[name]]


def order_norm_sums(m: np.ndarray | torch.Tensor, kind: str = "norm") -> np.ndarray:
    """Sums over steps of the 1st-, 2nd- and 3rd-order sizes of a per-pixel quantity.

    Args:
        m: (B, K, 5) moments of the quantity at each of K steps.
        kind: ``"norm"``: Σ_k ‖q_k‖₁, Σ_k ‖q_k‖₂, Σ_k ‖q_k‖₃ (vector p-norms over pixels);
            ``"power"``: Σ_k Σ|q_k|, Σ_k Σq_k², Σ_k Σ|q_k|³ (absolute power sums, DiffPath-style).

    Returns:
        (B, 3) float64.
    """
    m = as_moments(m)
    a1, s2, a3 = moment(m, "abs"), moment(m, "sq"), moment(m, "abs_cb")
    if kind == "norm":
        parts = (a1, np.sqrt(s2), np.cbrt(a3))
    elif kind == "power":
        parts = (a1, s2, a3)
    else:
        raise ValueError(f"kind must be 'norm' or 'power', got {kind!r}")
    return np.stack([p.sum(axis=1) for p in parts], axis=1)
