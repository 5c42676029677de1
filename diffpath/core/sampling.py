"""Deterministic DDIM paths and per-step moments (DiffPath).

The loops here are short pure functions in the style of k-diffusion's samplers: they take an
ε-model, images and the timesteps to visit, and expose every step through an optional ``callback``
without changing the loop. Nothing of size B×T×C×H×W is kept unless asked for: per-image,
per-step *moments* are reduced on the model's device as the loop runs.

Moments
-------
For a per-pixel quantity ``q`` of shape (B, C, H, W), :func:`moments` gives, per image, the five
sums over all pixels and channels, in the order of :data:`MOMENTS`:

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffpath.models import EpsFn

__all__ = [
    "MOMENTS",
    "moments",
    "DDIMCoefficients",
    "ddim_coefficients",
    "coefficient_table",
    "ddim_invert",
    "ddim_denoise",
    "DiffPathResult",
    "diffpath_path",
]

MOMENTS: tuple[str, ...] = ("sum", "abs", "sq", "cb", "abs_cb")


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


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per-step DDIM coefficients for an ascending list of kept timesteps (float64, (T,)).

    ``alpha_bar[i]`` is ᾱ at the i-th kept timestep; ``alpha_bar_next[i]`` the next kept one
    (0 after the last, as improved-diffusion's ``alphas_cumprod_next``); ``alpha_bar_prev[i]``
    the previous kept one (1 before the first).
    """

    timesteps: tuple[int, ...]
    alpha_bar: np.ndarray
    alpha_bar_next: np.ndarray
    alpha_bar_prev: np.ndarray


def ddim_coefficients(alphas_cumprod: np.ndarray, timesteps: Sequence[int]) -> DDIMCoefficients:
    """Coefficients of the DDIM process that keeps ``timesteps`` of a schedule with ``alphas_cumprod``."""
    ts = [int(t) for t in timesteps]
    if ts != sorted(ts) or len(set(ts)) != len(ts):
        raise ValueError(f"timesteps must be strictly increasing, got {ts}")
    ab = np.asarray(alphas_cumprod, dtype=np.float64)[ts]
    return DDIMCoefficients(
        timesteps=tuple(ts),
        alpha_bar=ab,
        alpha_bar_next=np.append(ab[1:], 0.0),
        alpha_bar_prev=np.insert(ab[:-1], 0, 1.0),
    )


def coefficient_table(columns: Sequence[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """Per-step coefficients, computed in float64 and rounded once to float32, as one (T, K)
    tensor on ``like``'s device.

    improved-diffusion keeps its coefficients in float64 numpy and casts each looked-up value to
    float32 before it meets the images; doing the same keeps results bit-comparable. Building the
    whole table with one host→device copy (rather than one per step and coefficient) keeps the
    loops free of synchronising transfers.
    """
    table = np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
    return torch.from_numpy(table).to(like.device, torch.float32)


StepCallback = Callable[[dict[str, Any]], None]


@torch.no_grad()
def ddim_invert(
    model: EpsFn,
    x0: torch.Tensor,
    coeffs: DDIMCoefficients,
    *,
    clip_denoised: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion (η = 0) from x0 along the kept timesteps.

    At step i (x_0 := x0 is the clean image; the first step evaluates the model on it):

    * ε_θ = model(x_i, t_i)
    * x̂0 = x_i/√ᾱ_i − √(1/ᾱ_i − 1)·ε_θ, clipped to [-1, 1] when ``clip_denoised``
    * ε = (x_i/√ᾱ_i − x̂0)/√(1/ᾱ_i − 1)      (re-derived from the clipped x̂0)
    * x_{i+1} = √ᾱ_{next}·x̂0 + √(1 − ᾱ_{next})·ε

    Args:
        model: ε-model ``(x, t) -> ε`` with ``t`` original int64 timesteps.
        x0: (B, C, H, W) float32 images in [-1, 1].
        coeffs: from :func:`ddim_coefficients`.
        clip_denoised: clip x̂0 to [-1, 1] (DiffPath does).
        callback: called after each step with ``{"i", "t", "x", "eps", "x0_hat", "x_next"}``.

    Returns:
        (B, C, H, W): the final latent x_T.
    """
    x = x0.float()
    B = x.shape[0]
    ab, ab_next = coeffs.alpha_bar, coeffs.alpha_bar_next
    table = coefficient_table(
        [np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1.0), np.sqrt(ab_next), np.sqrt(1.0 - ab_next)], x
    )
    for i, t in enumerate(coeffs.timesteps):
        c1, c2, c_next, s_next = table[i].unbind()
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        eps_model = model(x, tt)
        x0_hat = c1 * x - c2 * eps_model
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps = (c1 * x - x0_hat) / c2
        x_next = x0_hat * c_next + s_next * eps
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "eps": eps, "x0_hat": x0_hat, "x_next": x_next})
        x = x_next
    return x


@torch.no_grad()
def ddim_denoise(
    model: EpsFn,
    x_start: torch.Tensor,
    coeffs: DDIMCoefficients,
    *,
    clip_denoised: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM sampling (η = 0) from x at the *last* kept timestep down to x0.

    Walks ``coeffs.timesteps`` in descending order: at kept step i,
    x̂0 = x/√ᾱ_i − √(1/ᾱ_i − 1)·ε_θ (clipped), ε re-derived, and
    x_{i−1} = √ᾱ_{prev}·x̂0 + √(1 − ᾱ_{prev})·ε, with ᾱ_{prev} = 1 before the first kept step
    (so the last step returns x̂0).

    Args:
        x_start: (B, C, H, W) latent at timestep ``coeffs.timesteps[-1]``.

    Returns:
        (B, C, H, W): the reconstruction in [-1, 1] (when clipping).
    """
    x = x_start.float()
    B = x.shape[0]
    n = len(coeffs.timesteps)
    ab, ab_prev = coeffs.alpha_bar, coeffs.alpha_bar_prev
    table = coefficient_table(
        [np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1.0), np.sqrt(ab_prev), np.sqrt(1.0 - ab_prev)], x
    )
    for j, i in enumerate(reversed(range(n))):
        t = coeffs.timesteps[i]
        c1, c2, c_prev, s_prev = table[i].unbind()
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        eps_model = model(x, tt)
        x0_hat = c1 * x - c2 * eps_model
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps = (c1 * x - x0_hat) / c2
        x_prev = x0_hat * c_prev + s_prev * eps
        if callback is not None:
            callback({"i": j, "t": t, "x": x, "eps": eps, "x0_hat": x0_hat, "x_next": x_prev})
        x = x_prev
    return x


@dataclass
class DiffPathResult:
    """What one DiffPath pass over a batch gives.

    Attributes:
        eps_moments: (B, T, 5) float64, :func:`moments` of ε at each inversion step.
        deps_moments: (B, T−1, 5) float64, moments of Δε_i = (ε_{i+1} − ε_i)·T.
        xT: (B, C, H, W) the inverted latent.
        eps: (B, T, C, H, W) the ε path, only with ``keep_maps``.
        xt: (B, T, C, H, W) x after each step, only with ``keep_maps``.
    """

    eps_moments: torch.Tensor
    deps_moments: torch.Tensor
    xT: torch.Tensor
    eps: torch.Tensor | None = None
    xt: torch.Tensor | None = None


@torch.no_grad()
def diffpath_path(
    model: EpsFn,
    x0: torch.Tensor,
    coeffs: DDIMCoefficients,
    *,
    clip_denoised: bool = True,
    keep_maps: bool = False,
    callback: StepCallback | None = None,
) -> DiffPathResult:
    """DiffPath: DDIM-invert x0 and reduce the ε path to per-step moments on the device.

    The rate of change is Δε_i = (ε_{i+1} − ε_i)·T with T the number of steps (DiffPath's
    ``diff(ε)·T``).
    """
    T = len(coeffs.timesteps)
    eps_m: list[torch.Tensor] = []
    deps_m: list[torch.Tensor] = []
    eps_maps: list[torch.Tensor] = []
    xt_maps: list[torch.Tensor] = []
    prev: list[torch.Tensor | None] = [None]

    def record(step: dict[str, Any]) -> None:
        eps = step["eps"]
        eps_m.append(moments(eps))
        if prev[0] is not None:
            deps_m.append(moments((eps - prev[0]) * T))
        prev[0] = eps
        if keep_maps:
            eps_maps.append(eps.cpu())
            xt_maps.append(step["x_next"].cpu())
        if callback is not None:
            callback(step)

    xT = ddim_invert(model, x0, coeffs, clip_denoised=clip_denoised, callback=record)
    B = x0.shape[0]
    empty = torch.zeros(B, 0, len(MOMENTS), dtype=torch.float64, device=x0.device)
    return DiffPathResult(
        eps_moments=torch.stack(eps_m, 1),
        deps_moments=torch.stack(deps_m, 1) if deps_m else empty,
        xT=xT,
        eps=torch.stack(eps_maps, 1) if keep_maps else None,
        xt=torch.stack(xt_maps, 1) if keep_maps else None,
    )
