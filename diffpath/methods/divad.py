"""DIVAD's latent round trip as its code runs it, on matched timesteps, and its baselines.

DIVAD (Hicsonmez et al., reference code giddyyupp/DIVAD, ``ddim_inversion.py --nis 50 --inf_step 100
--ss 40 --sd_version 21``) inverts a Stable Diffusion latent and denoises it back. Its timesteps come
from diffusers' ``DDIMScheduler`` with the model's scheduler configuration (``"leading"`` spacing;
Stable Diffusion 2.1-base has ``steps_offset = 1``): a K-step grid is ``(0 … K−1)·(T // K) +
steps_offset`` (:func:`ddim_grid`: K = 50 → 1, 21, …, 981; K = 100 → 1, 11, …, 991). Then:

* **inversion** on the ascending ``invert_steps``-grid g (its ``invert`` loop, i = 1 … K−2): the
  latent at level max(0, g[i] − T // K) = g[i−1] moves to level g[i] with ε evaluated at timestep
  g[i], the *destination* (the rule of diffusers' ``DDIMInverseScheduler.step``); the first step
  takes the clean latent z0 to be at level g[0] = 1. It keeps the K−2 latents at levels g[1] …
  g[K−2];
* **hand-over**: the sampler receives the latent kept at index −(ss+1): level g[K−2−ss] = **161**
  (K = 50, ss = 40). Only the first K−2−ss = 8 inversion steps matter; the code runs all 48;
* **sampling** on the descending ``sample_steps``-grid h (its ``sample`` loop) from index ss:
  timesteps **591**, 581, …, 11, 1; each step moves from level t to max(1, t − T // sample_steps),
  the plain DDIM update (η = 0, no clipping), so the last step (1 → 1) is the identity and the
  result is the latent at level 1.

The sampler therefore treats a latent whose noise has standard deviation √(1 − ᾱ_161) = 0.43 as if
it had √(1 − ᾱ_591) = 0.91 (ᾱ of Stable Diffusion's ``scaled_linear`` schedule). Rows of the study:

``divad_code`` (:meth:`RoundTripSpec.plan`)
    exactly that: 8 + 60 guided steps (the code's 48 + 60: the 40 unused inversion steps change
    nothing but the cost, :attr:`RoundTripPlan.reference_steps`).
``matched``
    the same inversion, and the same sampler started where the latent really is: from level 161
    on the 100-step grid (161, 151, …, 1): 8 + 17 guided steps.
``stochastic``
    AnoDDPM-style: z0 forward-noised to ``t0`` (default: 591, where DIVAD's sampler starts) with
    seeded noise, then ``draws`` ancestral DDIM walks (η = 1) of ``steps`` steps to the clean latent
    (:func:`diffpath.core.sampling.round_trip_steps`); 2 × 34 steps cost what ``divad_code`` costs.
``vae``
    no UNet: D(E(x)), the floor every latent round trip inherits from the autoencoder.

Every walk is :func:`diffpath.core.sampling.ddim_walk`; the inversion's "ε at the destination" is an
ε-model that evaluates the UNet at another timestep than the walk's level (:class:`EvalAt`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from diffpath.core.sampling import Step, ddim_walk, round_trip_steps
from diffpath.methods.latent import ConditionalEps, LatentDiffusion

__all__ = ["ROUND_TRIPS", "ddim_grid", "EvalAt", "RoundTripPlan", "RoundTripSpec", "RoundTripResult",
           "latent_round_trip", "to_uint8"]

ROUND_TRIPS: tuple[str, ...] = ("divad_code", "matched", "stochastic", "vae")


def ddim_grid(scheduler_config: Mapping[str, Any], steps: int) -> list[int]:
    """The ascending timesteps of diffusers' ``DDIMScheduler.set_timesteps(steps)`` for this
    scheduler configuration (diffusers computes them: its spacing and ``steps_offset`` rules)."""
    import warnings

    from diffusers import DDIMScheduler

    with warnings.catch_warnings():  # a PNDM configuration has keys DDIM ignores
        warnings.simplefilter("ignore")
        sched = DDIMScheduler.from_config(dict(scheduler_config))
    sched.set_timesteps(int(steps))
    return sorted(int(t) for t in sched.timesteps)


class EvalAt:
    """An ε-model that evaluates ``model`` at ``at[t]`` when a walk asks for timestep t (t itself
    when absent): DIVAD's inversion evaluates ε at the step's destination level."""

    def __init__(self, model: Any, at: Mapping[int, int]):
        self.model = model
        self.at = dict(at)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, torch.full_like(t, self.at.get(int(t[0]), int(t[0]))))


@dataclass(frozen=True)
class RoundTripPlan:
    """The walks of one round trip (levels are timesteps of the model's schedule).

    Attributes:
        kind: one of :data:`ROUND_TRIPS`.
        invert: inversion steps (level, next level); ``eval_at`` maps a level to the timestep ε is
            evaluated at (DIVAD: the destination).
        denoise: denoising steps (t, next level), ε evaluated at t.
        latent_level: the noise level of the latent handed to the denoising walk.
        sample_from: the timestep the denoising walk starts at (≠ ``latent_level``: mismatched).
        draws, eta: stochastic rows: independent walks and DDIM η.
        reference_steps: guided steps DIVAD's code runs for this row (``divad_code`` only).
    """

    kind: str
    invert: tuple[Step, ...] = ()
    eval_at: tuple[tuple[int, int], ...] = ()
    denoise: tuple[Step, ...] = ()
    latent_level: int | None = None
    sample_from: int | None = None
    draws: int = 1
    eta: float = 0.0
    reference_steps: int | None = None

    def unet_steps(self) -> int:
        """Guided steps per image (each one or two UNet evaluations)."""
        return len(self.invert) + self.draws * len(self.denoise)

    def nfe(self, guidance_scale: float) -> int:
        """UNet evaluations per image (two per step under classifier-free guidance)."""
        return self.unet_steps() * (1 if guidance_scale == 1.0 else 2)

    def vae_evals(self) -> int:
        """VAE evaluations per image: one encoding, one decoding per draw."""
        return 1 + self.draws


@dataclass(frozen=True)
class RoundTripSpec:
    """One row of the localisation paper profile (params ``industrial.rows``).

    Attributes:
        kind: ``divad_code``, ``matched``, ``stochastic`` or ``vae``.
        invert_steps, sample_steps, start_step: DIVAD's ``--nis``, ``--inf_step``, ``--ss``.
        t0: ``stochastic``: forward-noise timestep (None: DIVAD's sampler start).
        steps, draws, eta: ``stochastic``: DDIM steps per draw, draws, η.
    """

    kind: str = "divad_code"
    invert_steps: int = 50
    sample_steps: int = 100
    start_step: int = 40
    t0: int | None = None
    steps: int = 34
    draws: int = 2
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ROUND_TRIPS:
            raise ValueError(f"unknown round trip {self.kind!r}; known: {list(ROUND_TRIPS)}")
        if not 0 <= self.start_step <= self.invert_steps - 3 or self.start_step >= self.sample_steps:
            raise ValueError(f"start_step {self.start_step} must be < sample_steps and <= invert_steps − 3")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundTripSpec:
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def divad_levels(self, scheduler_config: Mapping[str, Any]) -> tuple[int, int]:
        """(level of the latent DIVAD's code hands over, timestep its sampler starts at):
        (161, 591) for Stable Diffusion 2.1-base at ``--nis 50 --inf_step 100 --ss 40``."""
        g = ddim_grid(scheduler_config, self.invert_steps)
        h = ddim_grid(scheduler_config, self.sample_steps)[::-1]
        return g[self.invert_steps - 2 - self.start_step], h[self.start_step]

    def plan(self, scheduler_config: Mapping[str, Any]) -> RoundTripPlan:
        """The walks of this row for a model with ``scheduler_config`` (module docstring)."""
        if self.kind == "vae":
            return RoundTripPlan("vae", draws=1)
        level, start = self.divad_levels(scheduler_config)
        T = int(scheduler_config.get("num_train_timesteps", 1000))
        if self.kind == "stochastic":
            t0 = start if self.t0 is None else int(self.t0)
            return RoundTripPlan("stochastic", denoise=tuple(round_trip_steps(t0, self.steps)[1]), latent_level=t0,
                                 sample_from=t0, draws=self.draws, eta=self.eta)
        g = ddim_grid(scheduler_config, self.invert_steps)
        n_inv = self.invert_steps - 2 - self.start_step
        # DIVAD's source level: max(0, t − T // K) (= g[i − 1] on a "leading" grid); ε at t
        invert = tuple((max(0, g[i] - T // self.invert_steps), g[i]) for i in range(1, n_inv + 1))
        h = ddim_grid(scheduler_config, self.sample_steps)[::-1]
        first = self.start_step if self.kind == "divad_code" else _index_on(h, level, self.sample_steps)
        stride = T // self.sample_steps
        denoise = tuple((t, max(1, t - stride)) for t in h[first:])
        return RoundTripPlan(self.kind, invert=invert, eval_at=tuple((a, b) for a, b in invert), denoise=denoise,
                             latent_level=level, sample_from=h[first],
                             reference_steps=(self.invert_steps - 2 + len(denoise)) if self.kind == "divad_code"
                             else None)


def _index_on(grid: list[int], level: int, steps: int) -> int:
    if level not in grid:
        raise ValueError(f"the inverted latent's level {level} is not on the {steps}-step sampling grid; "
                         "choose sample_steps whose grid contains it")
    return grid.index(level)


@dataclass
class RoundTripResult:
    """x_hat: (draws, B, 3, H, W) reconstructions in [-1, 1]; x_vae: (B, 3, H, W) D(E(x));
    nfe_unet / nfe_vae: evaluations per image."""

    x_hat: torch.Tensor
    x_vae: torch.Tensor
    nfe_unet: int
    nfe_vae: int


@torch.no_grad()
def latent_round_trip(
    ld: LatentDiffusion,
    x0: torch.Tensor,
    plan: RoundTripPlan,
    *,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 3.5,
    generator: torch.Generator | None = None,
    vae_sample: bool = False,
) -> RoundTripResult:
    """Run ``plan`` on (B, 3, H, W) images ``x0`` in [-1, 1] (on ``ld``'s device).

    ``cond`` / ``uncond``: (1 or B, L, D) prompt and negative-prompt embeddings; ``generator``:
    the stochastic row's noise and, with ``vae_sample``, the VAE posterior draw (default: its mean).
    """
    eps = ConditionalEps(ld.unet, cond, ld.schedule, uncond=uncond, guidance_scale=guidance_scale)
    z0 = ld.encode(x0.float(), sample=vae_sample, generator=generator)
    x_vae = ld.decode(z0)
    if plan.kind == "vae":
        return RoundTripResult(x_vae[None], x_vae, 0, 2)
    kw: dict[str, Any] = {"schedule": ld.schedule, "clip_denoised": False}
    if plan.kind == "stochastic":
        outs = []
        for _ in range(plan.draws):
            noise = torch.randn(z0.shape, generator=generator, device=z0.device)
            z_t = ld.schedule.q_sample(z0, int(plan.latent_level), noise)  # type: ignore[arg-type]
            outs.append(ld.decode(ddim_walk(eps, z_t, plan.denoise, eta=plan.eta, generator=generator, **kw)))
        x_hat = torch.stack(outs)
    else:
        z_t = ddim_walk(EvalAt(eps, dict(plan.eval_at)), z0, plan.invert, **kw)
        x_hat = ld.decode(ddim_walk(eps, z_t, plan.denoise, **kw))[None]
    return RoundTripResult(x_hat, x_vae, plan.nfe(guidance_scale), plan.vae_evals())


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) images in [-1, 1] → (..., H, W, 3) uint8, as diffusers' ``decode_latents`` and
    ``numpy_to_pil`` quantise DIVAD's reconstruction: round(255·clamp(x/2 + 1/2, 0, 1))."""
    u = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return u.movedim(-3, -1)
