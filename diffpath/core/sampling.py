"""One deterministic DDIM walk, in the style of k-diffusion's samplers.

A *walk* is a short pure loop over a list of steps ``(t, ᾱ_t, ᾱ_next)``: at each step the ε-model
is evaluated at timestep ``t``, the clean image is predicted, and the state moves to the noise level
ᾱ_next. The same loop serves every use in the study; only the list of steps differs:

=====================  =====================================================================
use                    steps
=====================  =====================================================================
inversion (DiffPath)   kept timesteps ascending, ᾱ_next = the next kept ᾱ (0 after the last)
denoising / sampling   kept timesteps descending, ᾱ_next = the previous kept ᾱ (1 after the
                       first kept timestep, so the last step returns x̂0)
partial round trip     inversion to ᾱ_{t0} on ``partial_timesteps(t0, k)``, then denoising back
=====================  =====================================================================

:class:`DDIMCoefficients` holds the kept timesteps of a respaced process with their neighbours'
ᾱ and hands out both lists. A ``callback`` sees every step as a dict
``{"i", "t", "x", "eps", "x0_hat", "x_next"}`` without changing the loop.

Precision: per-step coefficients are computed in float64 and rounded once to float32, as
improved-diffusion does when it casts its float64 numpy coefficients, and the whole table moves to
the device in one copy (no synchronising transfers inside the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffpath.models import EpsFn

__all__ = [
    "Step",
    "StepCallback",
    "DDIMCoefficients",
    "ddim_coefficients",
    "partial_timesteps",
    "partial_ddim_coefficients",
    "coefficient_table",
    "ddim_walk",
    "ddim_invert",
    "ddim_denoise",
    "ddim_sample",
]

#: One step of a walk: (timestep t, ᾱ_t, ᾱ at the level the step moves to).
Step = tuple[int, float, float]
StepCallback = Callable[[dict[str, Any]], None]


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

    def inversion_steps(self) -> list[Step]:
        """Ascending steps from the clean image towards noise: ``(t_i, ᾱ_i, ᾱ_next,i)``."""
        return [(t, float(a), float(n)) for t, a, n in
                zip(self.timesteps, self.alpha_bar, self.alpha_bar_next)]

    def denoising_steps(self) -> list[Step]:
        """Descending steps from the last kept timestep to the clean image: ``(t_i, ᾱ_i, ᾱ_prev,i)``."""
        return [(t, float(a), float(p)) for t, a, p in
                zip(self.timesteps[::-1], self.alpha_bar[::-1], self.alpha_bar_prev[::-1])]


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


def partial_timesteps(t0: int, steps: int) -> list[int]:
    """The ``steps`` kept timesteps of a partial inversion to ``t0``: round(j·t0/steps), j < steps.

    Strictly increasing, starting at 0; the inversion's last step lands on ᾱ_{t0}.
    """
    t0, steps = int(t0), int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if t0 < steps:
        raise ValueError(f"t0 must be >= steps (one distinct timestep per step), got t0={t0}, steps={steps}")
    return [int(round(j * t0 / steps)) for j in range(steps)]


def partial_ddim_coefficients(
    alphas_cumprod: np.ndarray, t0: int, steps: int
) -> tuple[DDIMCoefficients, DDIMCoefficients]:
    """DDIM coefficients to invert from clean to ``t0`` and to denoise from ``t0`` back to clean.

    With s_j = :func:`partial_timesteps` and s_steps := t0:

    * ``invert``: timesteps s_0 … s_{steps−1}, ``alpha_bar_next[j]`` = ᾱ_{s_{j+1}} (the last one
      ᾱ_{t0}); :func:`ddim_invert` then returns x_{t0}.
    * ``denoise``: timesteps s_1 … s_steps (= t0), ``alpha_bar_prev[j]`` = ᾱ_{s_j} for j ≥ 1 and 1
      for the first (the final step returns x̂0); :func:`ddim_denoise` starts from x_{t0}.

    Args:
        alphas_cumprod: (T,) float64 ᾱ of the model's training schedule.
        t0: the intermediate timestep, ``steps <= t0 <= T − 1``.
        steps: number of DDIM steps in each direction.

    Returns:
        ``(invert, denoise)``.
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if not 0 < int(t0) < len(ac):
        raise ValueError(f"t0 must lie in [1, {len(ac) - 1}], got {t0}")
    grid = partial_timesteps(t0, steps) + [int(t0)]  # s_0 … s_steps
    ab = ac[grid]
    invert = DDIMCoefficients(
        timesteps=tuple(grid[:-1]),
        alpha_bar=ab[:-1].copy(),
        alpha_bar_next=ab[1:].copy(),
        alpha_bar_prev=np.r_[1.0, ab[:-2]],
    )
    denoise = DDIMCoefficients(
        timesteps=tuple(grid[1:]),
        alpha_bar=ab[1:].copy(),
        alpha_bar_next=np.r_[ab[2:], 0.0],
        alpha_bar_prev=np.r_[1.0, ab[1:-1]],
    )
    return invert, denoise


def coefficient_table(columns: Sequence[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    """Per-step coefficients, computed in float64 and rounded once to float32, as one (T, K)
    tensor on ``like``'s device (one host→device copy for the whole walk)."""
    table = np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
    return torch.from_numpy(table).to(like.device, torch.float32)


@torch.no_grad()
def ddim_walk(
    model: EpsFn,
    x: torch.Tensor,
    steps: Sequence[Step],
    *,
    clip_denoised: bool = True,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Walk ``x`` along ``steps`` with DDIM updates; returns the final state.

    At step i, with (t, ᾱ, ᾱ') = ``steps[i]``:

    * ε_θ = model(x, t)
    * x̂0 = x/√ᾱ − √(1/ᾱ − 1)·ε_θ, clipped to [-1, 1] when ``clip_denoised``
    * ε = (x/√ᾱ − x̂0)/√(1/ᾱ − 1)      (re-derived from the clipped x̂0)
    * x' = √ᾱ'·x̂0 + √(1 − ᾱ' − σ²)·ε + σ·z, with σ = η·√((1−ᾱ')/(1−ᾱ))·√(1 − ᾱ/ᾱ') for a
      denoising step (ᾱ' > ᾱ) and σ = 0 otherwise; z ~ N(0, I) from ``generator``.

    Args:
        model: ε-model ``(x, t) -> ε`` with ``t`` (B,) int64 original timesteps.
        x: (B, C, H, W) float32 start state (a clean image for an inversion, a latent otherwise).
        steps: the walk, see the module docstring.
        clip_denoised: clip x̂0 to [-1, 1] (DiffPath does).
        eta: DDIM's η: 0 is the deterministic walk; 1 is DDPM-like ancestral sampling.
        generator: the source of z when ``eta > 0`` (on ``x``'s device).
        callback: called after each step with ``{"i", "t", "x", "eps", "x0_hat", "x_next"}``.

    Returns:
        (B, C, H, W) the state after the last step.
    """
    x = x.float()
    B = x.shape[0]
    ab = np.array([s[1] for s in steps], dtype=np.float64)
    ab_next = np.array([s[2] for s in steps], dtype=np.float64)
    sigma = np.zeros_like(ab)
    if eta > 0:
        down = ab_next > ab
        sigma[down] = eta * np.sqrt((1 - ab_next[down]) / (1 - ab[down]) * (1 - ab[down] / ab_next[down]))
    table = coefficient_table(
        [np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1.0), np.sqrt(ab_next),
         np.sqrt(1.0 - ab_next - sigma**2), sigma], x
    )
    for i, (t, _, _) in enumerate(steps):
        c1, c2, c_next, s_next, sig = table[i].unbind()
        tt = torch.full((B,), int(t), dtype=torch.long, device=x.device)
        eps_model = model(x, tt)
        x0_hat = c1 * x - c2 * eps_model
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps = (c1 * x - x0_hat) / c2
        x_next = x0_hat * c_next + s_next * eps
        if sigma[i] > 0:
            x_next = x_next + sig * torch.randn(x.shape, generator=generator, device=x.device)
        if callback is not None:
            callback({"i": i, "t": int(t), "x": x, "eps": eps, "x0_hat": x0_hat, "x_next": x_next})
        x = x_next
    return x


def ddim_invert(model: EpsFn, x0: torch.Tensor, coeffs: DDIMCoefficients, *,
                clip_denoised: bool = True, callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion of (B, C, H, W) images ``x0`` along ``coeffs``' timesteps;
    returns the (B, C, H, W) latent (x_T, or x_{t0} for partial coefficients)."""
    return ddim_walk(model, x0, coeffs.inversion_steps(), clip_denoised=clip_denoised, callback=callback)


def ddim_denoise(model: EpsFn, x_start: torch.Tensor, coeffs: DDIMCoefficients, *,
                 clip_denoised: bool = True, eta: float = 0.0, generator: torch.Generator | None = None,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """DDIM denoising of a (B, C, H, W) latent at ``coeffs.timesteps[-1]`` down to the clean image
    (the last step returns x̂0); deterministic for ``eta = 0``."""
    return ddim_walk(model, x_start, coeffs.denoising_steps(), clip_denoised=clip_denoised, eta=eta,
                     generator=generator, callback=callback)


@torch.no_grad()
def ddim_sample(
    model: Any,
    n: int,
    steps: int = 50,
    seed: int = 0,
    *,
    clip_denoised: bool = True,
    batch_size: int = 256,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM samples (η = 0) from an :class:`~diffpath.models.EpsModel`.

    Args:
        model: needs ``schedule``, ``image_size``, ``channels`` and ``device``.
        n: number of samples.
        steps: DDIM steps over ``model.schedule.respaced_timesteps(steps)``.
        seed: seeds the initial noise x_T ~ N(0, I) (drawn on the CPU, so any device gives the
            same start).
        clip_denoised: clip x̂0 to [-1, 1] at every step.
        batch_size: samples per network call.
        callback: forwarded to :func:`ddim_walk`.

    Returns:
        (n, C, S, S) float32 in [-1, 1] on the CPU.
    """
    coeffs = ddim_coefficients(model.schedule.alphas_cumprod, model.schedule.respaced_timesteps(steps))
    c, s = int(model.channels), int(model.image_size)
    device = getattr(model, "device", torch.device("cpu"))
    x_all = torch.randn((n, c, s, s), generator=torch.Generator().manual_seed(int(seed)))
    outs = []
    for i0 in range(0, n, batch_size):
        x = ddim_denoise(model, x_all[i0 : i0 + batch_size].to(device), coeffs,
                         clip_denoised=clip_denoised, callback=callback)
        outs.append(x.clamp(-1.0, 1.0).float().cpu())
    return torch.cat(outs, dim=0)
