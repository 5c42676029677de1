"""One deterministic DDIM walk, in the style of k-diffusion's samplers; the study's notation.

Notation (names in the code → the papers' symbols)
--------------------------------------------------
===================  ==========  ==================================================================
name                 symbol      meaning
===================  ==========  ==================================================================
``x0``               x₀          clean images, (B, C, H, W) in [-1, 1]
``x_t``              x_t         the state at timestep t: √ᾱ_t·x₀ + √(1−ᾱ_t)·ε for forward noise
``eps_true``         ε           noise *known* to the caller (DiffPathV2's forward noising)
``eps_hat``          ε̂ = ε_θ     the network's output at (x_t, t)
``eps``              ε           the noise a DDIM step uses: re-derived from the (clipped) x̂₀;
                                 DiffPath's path records it
``x0_hat``           x̂₀          the clean image implied by ε̂: √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂
``alphas_cumprod``   ᾱ_t         float64 signal fraction after training timestep t
``T``                T           number of training timesteps of the base model (t ∈ 0 … T−1)
``K``                K (N)       number of kept steps of a walk or pass (DiffPath's 10 DDIM steps)
``t0``               t₀          the intermediate timestep of a localisation round trip
``err``              e_t         DiffPathV2's score error ε̂ − ε
``werr``             w_t         the SSIM-weighted error (1 − SSIM(x₀, x̂₀))·e_t
``d…`` (``deps``)    Δ           a temporal difference scaled by K: Δq_k = (q_{k+1} − q_k)·K
===================  ==========  ==================================================================

The walk
--------
A *walk* is a short pure loop over a list of steps ``(t, t_next)``: at each step the ε-model is
evaluated at timestep ``t``, the clean image is predicted, and the state moves to the noise level
of ``t_next``: a timestep, or :data:`CLEAN` (ᾱ = 1: the step returns x̂₀), or ``T`` (ᾱ = 0: pure
noise, the end of DiffPath's full inversion, improved-diffusion's ``alphas_cumprod_next``). The same
loop serves every use in the study; only the list of steps differs:

=====================  =====================================================================
use                    steps
=====================  =====================================================================
inversion (DiffPath)   kept timesteps ascending, each to the next (``T`` after the last):
                       :func:`inversion_steps`
denoising / sampling   kept timesteps descending, each to the previous (:data:`CLEAN` after the
                       first): :func:`denoising_steps`
partial round trip     inversion to t0 on ``partial_timesteps(t0, K)``, then denoising back on
                       the same grid: :func:`round_trip_steps`
=====================  =====================================================================

Every walk and pass receives the schedule one way: ``schedule=None`` (the model's own
``model.schedule``) or a :class:`~diffpath.core.schedule.NoiseSchedule`.

The step dict
-------------
A ``callback`` sees every step of every loop (:func:`ddim_walk`, DiffPathV2's
:func:`~diffpath.methods.diffpathv2.score_error_path`, the localisation round trips) as one dict,
without changing the loop; tensors are (B, C, H, W) on the device:

* ``i``: the step's index in its loop; ``t``: its timestep;
* ``x_t``: the state the model is evaluated at; ``eps_hat``: the network's output there;
* ``x0_hat``: the clean image predicted from ``eps_hat`` (clipped when the walk clips);
* walks: ``eps``, the noise the step uses, and ``x_next``, the state after the step;
* score errors: ``eps_true``, ``err``, ``ssim``, ``werr``;
* round trips add ``phase`` (``"invert"`` / ``"denoise"``), ``draw`` for stochastic draws, and
  ``t0`` in :func:`~diffpath.methods.localization.localize`.

Precision: per-step coefficients are computed in float64 and rounded once to float32, as
improved-diffusion does when it casts its float64 numpy coefficients; no host→device copy happens
inside the loop (:meth:`~diffpath.core.schedule.NoiseSchedule.coefficients`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffpath.core.protocols import EpsFn
from diffpath.core.schedule import NoiseSchedule, schedule_of

__all__ = [
    "CLEAN",
    "Step",
    "StepCallback",
    "inversion_steps",
    "denoising_steps",
    "partial_timesteps",
    "round_trip_steps",
    "ddim_walk",
    "ddim_invert",
    "ddim_denoise",
    "ddim_sample",
]

#: One step of a walk: (timestep t the model is evaluated at, the level it moves to).
Step = tuple[int, int]
StepCallback = Callable[[dict[str, Any]], None]
#: The level after the last denoising step: ᾱ = 1, the clean image (ᾱ_{−1} = 1).
CLEAN = -1


def _check_increasing(ts: Sequence[int]) -> list[int]:
    out = [int(t) for t in ts]
    if not out or out != sorted(out) or len(set(out)) != len(out):
        raise ValueError(f"timesteps must be non-empty and strictly increasing, got {out}")
    return out


def inversion_steps(timesteps: Sequence[int], to: int) -> list[Step]:
    """Ascending steps from the clean image towards noise: ``(t_k, t_{k+1})``, and the last kept
    timestep to the level ``to`` (a timestep, or ``T`` for pure noise)."""
    ts = _check_increasing(timesteps)
    return list(zip(ts, ts[1:] + [int(to)]))


def denoising_steps(timesteps: Sequence[int]) -> list[Step]:
    """Descending steps from the last kept timestep to the clean image: ``(t_k, t_{k−1})``, and
    the first kept timestep to :data:`CLEAN` (the final step returns x̂₀)."""
    ts = _check_increasing(timesteps)
    return list(zip(ts[::-1], ts[-2::-1] + [CLEAN]))


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


def round_trip_steps(t0: int, steps: int) -> tuple[list[Step], list[Step]]:
    """The two walks of a partial round trip through ``t0``, on one grid s_0 … s_{K−1}, s_K = t0
    (s_j = :func:`partial_timesteps`, K = ``steps``):

    * inversion: (s_0 → s_1), …, (s_{K−1} → t0): the model at s_0 … s_{K−1}; returns x_{t0};
    * denoising: (t0 → s_{K−1}), …, (s_1 → clean): the model at t0, s_{K−1}, …, s_1.
    """
    grid = partial_timesteps(t0, steps)
    return inversion_steps(grid, to=int(t0)), denoising_steps(grid[1:] + [int(t0)])


def _level(schedule: NoiseSchedule, t: int) -> float:
    """ᾱ of a walk level: ᾱ_t, 1 for :data:`CLEAN`, 0 for ``T`` (pure noise)."""
    if t == CLEAN:
        return 1.0
    if t == schedule.num_timesteps:
        return 0.0
    return float(schedule.alpha_bar(t))


def _move_table(schedule: NoiseSchedule, steps: Sequence[Step], eta: float,
                like: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Per-step coefficients of the move to the next level, (K, 3) float32 on ``like``'s device
    (one copy): √ᾱ', √(1 − ᾱ' − σ²), σ, with σ = η·√((1−ᾱ')/(1−ᾱ))·√(1 − ᾱ/ᾱ') on denoising steps
    (ᾱ' > ᾱ) and 0 otherwise; also σ in float64."""
    ab = np.array([_level(schedule, t) for t, _ in steps], dtype=np.float64)
    ab_next = np.array([_level(schedule, n) for _, n in steps], dtype=np.float64)
    sigma = np.zeros_like(ab)
    if eta > 0:
        down = ab_next > ab
        sigma[down] = eta * np.sqrt((1 - ab_next[down]) / (1 - ab[down]) * (1 - ab[down] / ab_next[down]))
    table = np.stack([np.sqrt(ab_next), np.sqrt(1.0 - ab_next - sigma**2), sigma], axis=1)
    return torch.from_numpy(table).to(like.device, torch.float32), sigma


@torch.no_grad()
def ddim_walk(
    model: EpsFn,
    x: torch.Tensor,
    steps: Sequence[Step],
    *,
    schedule: NoiseSchedule | None = None,
    clip_denoised: bool = True,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Walk ``x`` along ``steps`` with DDIM updates; returns the final state.

    At step i, with (t, t') = ``steps[i]`` and ᾱ, ᾱ' their levels:

    * ε̂ = model(x_t, t); x̂₀ = ``schedule.predict_x0(x_t, t, ε̂)``, clipped to [-1, 1] when
      ``clip_denoised``; ε = ``schedule.predict_eps(x_t, t, x̂₀)`` (re-derived from the clipped x̂₀)
    * x' = √ᾱ'·x̂₀ + √(1 − ᾱ' − σ²)·ε + σ·z (σ: :func:`_move_table`; z ~ N(0, I) from ``generator``).

    Args:
        model: ε-model ``(x, t) -> ε̂`` with ``t`` (B,) int64 original timesteps.
        x: (B, C, H, W) start state (a clean image for an inversion, a latent otherwise); float32.
        steps: the walk, see the module docstring.
        schedule: ᾱ (default ``model.schedule``).
        clip_denoised: clip x̂₀ to [-1, 1] (DiffPath does).
        eta: DDIM's η: 0 is the deterministic walk; 1 is DDPM-like ancestral sampling.
        generator: the source of z when ``eta > 0`` (on ``x``'s device).
        callback: called after each step with the step dict (module docstring).

    Returns:
        (B, C, H, W) the state after the last step.
    """
    sched = schedule_of(model, schedule)
    x = x.float()
    B = x.shape[0]
    table, sigma = _move_table(sched, steps, eta, x)
    for i, (t, _) in enumerate(steps):
        c_next, s_next, sig = table[i].unbind()
        eps_hat = model(x, torch.full((B,), int(t), dtype=torch.long, device=x.device))
        x0_hat = sched.predict_x0(x, int(t), eps_hat)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        eps = sched.predict_eps(x, int(t), x0_hat)
        x_next = x0_hat * c_next + s_next * eps
        if sigma[i] > 0:
            x_next = x_next + sig * torch.randn(x.shape, generator=generator, device=x.device)
        if callback is not None:
            callback({"i": i, "t": int(t), "x_t": x, "eps_hat": eps_hat, "x0_hat": x0_hat, "eps": eps,
                      "x_next": x_next})
        x = x_next
    return x


def ddim_invert(model: EpsFn, x0: torch.Tensor, timesteps: Sequence[int], *,
                schedule: NoiseSchedule | None = None, to: int | None = None,
                clip_denoised: bool = True, callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion of (B, C, H, W) images ``x0`` along the ascending kept
    ``timesteps``, the last step to ``to`` (default ``T``: pure noise, as DiffPath and
    improved-diffusion's ``ddim_reverse_sample``); returns the (B, C, H, W) latent."""
    sched = schedule_of(model, schedule)
    steps = inversion_steps(timesteps, sched.num_timesteps if to is None else to)
    return ddim_walk(model, x0, steps, schedule=sched, clip_denoised=clip_denoised, callback=callback)


def ddim_denoise(model: EpsFn, x_start: torch.Tensor, timesteps: Sequence[int], *,
                 schedule: NoiseSchedule | None = None, clip_denoised: bool = True, eta: float = 0.0,
                 generator: torch.Generator | None = None,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """DDIM denoising of a (B, C, H, W) latent at ``timesteps[-1]`` down the ascending kept
    ``timesteps`` to the clean image (the last step returns x̂₀); deterministic for ``eta = 0``."""
    return ddim_walk(model, x_start, denoising_steps(timesteps), schedule=schedule,
                     clip_denoised=clip_denoised, eta=eta, generator=generator, callback=callback)


@torch.no_grad()
def ddim_sample(
    model: Any,
    n: int,
    steps: int = 50,
    seed: int = 0,
    *,
    schedule: NoiseSchedule | None = None,
    clip_denoised: bool = True,
    batch_size: int = 256,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM samples (η = 0) from an :class:`~diffpath.models.EpsModel`.

    Args:
        model: needs ``image_size``, ``channels`` and ``device`` (and ``schedule`` unless given).
        n: number of samples.
        steps: K, DDIM steps over ``schedule.respaced_timesteps(K)``.
        seed: seeds the initial noise x_T ~ N(0, I) (drawn on the CPU, so any device gives the
            same start).
        clip_denoised: clip x̂₀ to [-1, 1] at every step.
        batch_size: samples per network call.
        callback: forwarded to :func:`ddim_walk`.

    Returns:
        (n, C, S, S) float32 in [-1, 1] on the CPU.
    """
    sched = schedule_of(model, schedule)
    ts = sched.respaced_timesteps(steps)
    c, s = int(model.channels), int(model.image_size)
    device = getattr(model, "device", torch.device("cpu"))
    x_all = torch.randn((n, c, s, s), generator=torch.Generator().manual_seed(int(seed)))
    outs = []
    for i0 in range(0, n, batch_size):
        x = ddim_denoise(model, x_all[i0 : i0 + batch_size].to(device), ts, schedule=sched,
                         clip_denoised=clip_denoised, callback=callback)
        outs.append(x.clamp(-1.0, 1.0).float().cpu())
    return torch.cat(outs, dim=0)
