"""Noise schedules in float64, and respacing to a few DDIM steps.

This is the one place that knows ᾱ. Everything is kept in float64 numpy arrays (as
improved-diffusion does) and only turned into tensors of the working precision at the last moment,
by :meth:`NoiseSchedule.coefficients`; :meth:`~NoiseSchedule.q_sample`,
:meth:`~NoiseSchedule.predict_x0` and :meth:`~NoiseSchedule.predict_eps` are the study's one
noising formula and its two inversions. Notation (T, K, ᾱ_t, ...): :mod:`diffpath.core.sampling`.

Conventions
-----------
* ``T`` is the number of training timesteps of the base model (1000 for most DDPMs, 4000 for
  DiffPath's improved-diffusion checkpoints); timesteps are integers ``0 .. T-1``.
* ``alphas_cumprod[t]`` is ᾱ_t, the signal fraction *after* step ``t``: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.
* A *respaced* schedule keeps ``K`` of the ``T`` timesteps; its own betas are re-derived from the
  kept ᾱ values (``1 − ᾱ_k / ᾱ_{k-1}``), exactly as improved-diffusion's ``SpacedDiffusion`` does.
* A pass receives the schedule one way: ``schedule=None`` means the model's own
  ``model.schedule`` (:func:`schedule_of`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "NoiseSchedule",
    "linear_betas",
    "cosine_betas",
    "betas_for",
    "space_timesteps",
    "schedule_of",
]


def linear_betas(num_timesteps: int) -> np.ndarray:
    """The linear schedule of Ho et al., scaled so that any ``T`` spans the same total noise.

    For ``T = 1000`` this is ``linspace(1e-4, 0.02, 1000)``; improved-diffusion scales both ends by
    ``1000 / T`` for other lengths.
    """
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (2021).

    ᾱ(u) = cos²(((u + s) / (1 + s))·π/2) for u = t/T; β_t = 1 − ᾱ((t+1)/T)/ᾱ(t/T), clipped at
    ``max_beta``.
    """

    def abar(u: float) -> float:
        return math.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2

    betas = [
        min(1.0 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def betas_for(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of a named schedule: ``"linear"`` or ``"cosine"`` (diffusers' ``squaredcos_cap_v2``)."""
    key = name.lower()
    if key in ("linear",):
        return linear_betas(num_timesteps)
    if key in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; expected 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, n_steps: int) -> list[int]:
    """Evenly spaced timesteps, improved-diffusion's ``"ddimN"`` rule.

    The stride is the smallest integer for which ``range(0, T, stride)`` has exactly ``n_steps``
    elements, so the kept timesteps are ``0, stride, 2·stride, ...`` (for T=4000, N=10:
    0, 400, ..., 3600). If no integer stride gives exactly ``n_steps`` elements, falls back to the
    rounded, evenly spaced section rule (improved-diffusion's plain ``"N"`` respacing).
    """
    if not 1 <= n_steps <= num_timesteps:
        raise ValueError(f"n_steps must be in [1, {num_timesteps}], got {n_steps}")
    for stride in range(1, num_timesteps + 1):
        kept = list(range(0, num_timesteps, stride))
        if len(kept) == n_steps:
            return kept
        if len(kept) < n_steps:
            break
    if n_steps == 1:
        return [0]
    frac = (num_timesteps - 1) / (n_steps - 1)
    return sorted({int(round(i * frac)) for i in range(n_steps)})


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete DDPM noise schedule (float64).

    Attributes:
        betas: ``(T,)`` float64.
        name: a label (``"linear"``, ``"cosine"`` or ``"custom"``).
    """

    betas: np.ndarray
    name: str = "custom"
    #: (device, dtype) → name → (T,) coefficient tensor, built once (see :meth:`coefficients`)
    _tables: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or len(b) == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not np.all((b > 0) & (b <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", b)

    @classmethod
    def named(cls, name: str, num_timesteps: int) -> NoiseSchedule:
        """improved-diffusion's named schedules (``noise_schedule`` over ``diffusion_steps``)."""
        return cls(betas_for(name, num_timesteps), name=name.lower())

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any]) -> NoiseSchedule:
        """The training schedule of a diffusers scheduler config (``scheduler_config.json``).

        ``beta_schedule``: ``"linear"`` (``linspace(beta_start, beta_end, T)``: diffusers does not
        rescale by 1000/T as improved-diffusion does), ``"scaled_linear"`` (Stable Diffusion's:
        β on a square-root grid) or ``"squaredcos_cap_v2"`` (the cosine schedule). Missing keys take
        diffusers' defaults (T = 1000, β from 1e-4 to 0.02, linear).
        """
        T = int(cfg.get("num_train_timesteps", 1000))
        kind = str(cfg.get("beta_schedule", "linear"))
        start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if kind == "linear":
            return cls(np.linspace(start, end, T, dtype=np.float64), name="linear")
        if kind == "scaled_linear":
            return cls(np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2, name="scaled_linear")
        if kind == "squaredcos_cap_v2":
            return cls.named("cosine", T)
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r} "
                         "(expected linear, scaled_linear or squaredcos_cap_v2)")

    @property
    def num_timesteps(self) -> int:
        return int(len(self.betas))

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0..T-1, float64 ``(T,)``."""
        return np.cumprod(1.0 - self.betas)

    def alpha_bar(self, timesteps: int | Sequence[int] | np.ndarray) -> np.ndarray:
        """ᾱ at the given integer timesteps (float64, the shape of ``timesteps``)."""
        t = np.asarray(timesteps, dtype=np.int64)
        if np.any(t < 0) or np.any(t >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        return self.alphas_cumprod[t]

    def coefficients(self, names: Sequence[str], t: int | torch.Tensor,
                     like: torch.Tensor) -> list[torch.Tensor]:
        """Per-timestep coefficients as tensors that broadcast against ``like`` (B, ...).

        Computed in float64 from ᾱ_t and rounded once to ``like``'s dtype, as improved-diffusion's
        ``_extract_into_tensor``. The (T,) table of each coefficient moves to ``like``'s device once
        per schedule, device and dtype; later calls only index it there (no host→device copy
        inside a loop). ``t`` is one integer timestep (0-d results) or a (B,) int64 tensor
        (results (B, 1, ..., 1)). ``names``: ``"sqrt_ab"`` √ᾱ, ``"sqrt_1m_ab"`` √(1−ᾱ),
        ``"sqrt_recip_ab"`` √(1/ᾱ), ``"sqrt_recipm1_ab"`` √(1/ᾱ − 1).
        """
        table = self._device_table(like.device, like.dtype)
        if isinstance(t, torch.Tensor):
            if t.device.type == "cpu":  # checked where it is free; on a GPU the gather asserts
                self.alpha_bar(t.numpy())
            idx = t.to(like.device, torch.long)
            shape = (-1,) + (1,) * (like.ndim - 1)
            return [table[name].index_select(0, idx).reshape(shape) for name in names]
        self.alpha_bar(int(t))
        return [table[name][int(t)] for name in names]

    def _device_table(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._tables:
            ab = self.alphas_cumprod
            self._tables[key] = {name: torch.from_numpy(np.asarray(f(ab), dtype=np.float64)).to(device, dtype)
                                 for name, f in _COEFFICIENTS.items()}
        return self._tables[key]

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward noising: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (improved-diffusion's ``q_sample``).

        Args:
            x0: (B, C, H, W) clean images.
            t: one timestep, or (B,) int64 timesteps.
            noise: ε, the shape of ``x0``.
        """
        a, s = self.coefficients(("sqrt_ab", "sqrt_1m_ab"), t, x0)
        return a * x0 + s * noise

    def predict_x0(self, x_t: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The clean image implied by ε at x_t: x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε
        (improved-diffusion's ``_predict_xstart_from_eps``); shapes as :meth:`q_sample`."""
        r, rm1 = self.coefficients(("sqrt_recip_ab", "sqrt_recipm1_ab"), t, x_t)
        return r * x_t - rm1 * eps

    def predict_eps(self, x_t: torch.Tensor, t: int | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise implied by a clean image at x_t: ε = (√(1/ᾱ_t)·x_t − x0) / √(1/ᾱ_t − 1)
        (improved-diffusion's ``_predict_eps_from_xstart``); shapes as :meth:`q_sample`."""
        r, rm1 = self.coefficients(("sqrt_recip_ab", "sqrt_recipm1_ab"), t, x_t)
        return (r * x_t - x0) / rm1

    def respaced_timesteps(self, n_steps: int) -> list[int]:
        """The ``n_steps`` original timesteps a DDIM-``n_steps`` process visits (ascending)."""
        return space_timesteps(self.num_timesteps, n_steps)

    def respace(self, timesteps: Sequence[int]) -> NoiseSchedule:
        """The schedule of the process that keeps only ``timesteps``; its betas are re-derived
        from the kept ᾱ values (``β_k = 1 − ᾱ_k/ᾱ_{k−1}``, with ᾱ_{−1} = 1)."""
        kept = self.alpha_bar(sorted(timesteps))
        prev = np.concatenate([[1.0], kept[:-1]])
        return NoiseSchedule(1.0 - kept / prev, name=f"{self.name}-respaced")


#: float64 coefficients of ᾱ (see :meth:`NoiseSchedule.coefficients`)
_COEFFICIENTS = {
    "sqrt_ab": np.sqrt,
    "sqrt_1m_ab": lambda ab: np.sqrt(1.0 - ab),
    "sqrt_recip_ab": lambda ab: np.sqrt(1.0 / ab),
    "sqrt_recipm1_ab": lambda ab: np.sqrt(1.0 / ab - 1.0),
}


def schedule_of(model: Any, schedule: NoiseSchedule | None = None) -> NoiseSchedule:
    """The schedule a pass uses: ``schedule`` when given, else the model's own ``model.schedule``
    (an :class:`~diffpath.models.EpsModel` carries the schedule it was trained under)."""
    if schedule is not None:
        return schedule
    sched = getattr(model, "schedule", None)
    if not isinstance(sched, NoiseSchedule):
        raise ValueError("pass schedule= for an ε-model without a .schedule")
    return sched
