"""DiffPathV2: forward-noised score errors, SSIM weighting, and their 6-D summary.

Abdi et al. (ICCV 2025 workshop) publish no code; this module fixes the choices the paper leaves
open, and each is a switch so the study can ablate it.

The method, per image x0 and chosen timestep t_i (i = 0 .. T−1, ascending)
--------------------------------------------------------------------------
1. **Score error.** Draw *known* noise ε_i, forward-noise x_i = √ᾱ·x0 + √(1−ᾱ)·ε_i, predict
   ε̂_i = model(x_i, t_i) and keep the per-pixel error e_i = ε̂_i − ε_i.
2. **Reconstruction and SSIM weight.** x̂0_i = (x_i − √(1−ᾱ)·ε̂_i)/√ᾱ, S_i = SSIM map between x0
   and x̂0_i (:func:`diffpath.core.ssim.ssim_map`: Gaussian window σ = 1.5, 11×11, L = 2, K1 = 0.01,
   K2 = 0.03, per channel), weighted error w_i = (1 − S_i) ⊙ e_i.
3. **Temporal derivatives.** Δe_i = (e_{i+1} − e_i)·T and Δw_i = (w_{i+1} − w_i)·T, scaled by the
   number of chosen steps exactly as DiffPath scales Δε.
4. **Summary.** Per step, :func:`diffpath.core.sampling.moments` reduces each of e, Δe, w, Δw to five
   per-image sums on the device; the 6-D feature is the sums over steps of the 1st-, 2nd- and
   3rd-order norms of the error and of its derivative (:func:`diffpathv2_features`).

Choices made here, and why (all but the timesteps are switches)
--------------------------------------------------------------
* **Timesteps** (chosen by the caller): the default of the study is DiffPath's respaced timesteps,
  ``NoiseSchedule.respaced_timesteps(N)``, the same N evenly spaced original timesteps the DDIM
  path visits. The paper evaluates the error "at every timestep"; N evenly spaced steps are a
  Riemann sum of that integral (up to the constant factor 1000/N, which no density scorer sees)
  at N/1000 of the cost, span the whole noise range, and make DiffPath and DiffPathV2 features
  share steps so their per-step caches line up and compare directly.
* **Norms, not power sums** (``kind="norm"``): the paper's "1st, 2nd, 3rd order norms",
  ‖e‖₁, ‖e‖₂ = √Σe², ‖e‖₃ = ∛Σ|e|³ per step, summed over steps. The norms grow like n, √n, ∛n
  with the pixel count n, so the three dimensions weigh large, typical and extreme errors at
  comparable scales. ``kind="power"`` (Σ|e|, Σe², Σ|e|³, DiffPath-style) is the ablation.
* **Weighted** (``werr_moments``) is the paper's method; the unweighted error (``err_moments``)
  is always computed too, for the "no SSIM" ablation.
* **Derivative**: included (6-D); ``derivative=False`` gives the 3-D "magnitude only" ablation.
  :func:`diffpathv2_1d` is the analogue of DiffPath's 1-D curvature.
* **No clipping** of x̂0 by default: the reconstruction is the model's own estimate, and clipping
  to [-1, 1] (a sampling device) would hide exactly the discrepancies the SSIM is meant to see.
  ``clip_x0_hat=True`` clips before the SSIM.
* **Noise keyed by content** (``noise_key="content"``): ε_i is a deterministic function of
  (seed, image content, t_i, pixel), so an image gets the same noise whatever batch, order,
  split or dataset it appears in, on CPU or GPU; duplicated images get identical features, and a
  cache can be rebuilt bit for bit. ``noise_key="index"``: the caller passes global image indices
  as keys instead (identical images at different indices then get independent noise).
  The same noise is *not* shared across timesteps (t enters the key), as in DDPM training.

Deterministic noise: :mod:`diffpath.core.noise`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffpath.core.moments import MOMENTS, as_moments, moment, moments, order_norm_sums
from diffpath.core.noise import gaussian_noise, image_keys
from diffpath.core.ssim import ssim_map
from diffpath.models import EpsFn

__all__ = [
    "ScoreErrorConfig",
    "ScoreErrorResult",
    "MAP_NAMES",
    "score_error_path",
    "diffpathv2_features",
    "diffpathv2_1d",
]

MAP_NAMES: tuple[str, ...] = ("xt", "eps_hat", "err", "x0_hat", "ssim", "werr")

# --------------------------------------------------------------------------------------------
# the score-error pass


@dataclass(frozen=True)
class ScoreErrorConfig:
    """Knobs of a DiffPathV2 pass (see the module docstring for why these defaults).

    Attributes:
        seed: seed of the deterministic noise.
        noise_key: ``"content"`` (keys hash the quantised pixels; the default) or ``"index"``
            (the caller passes global image indices as keys).
        clip_x0_hat: clip the reconstruction x̂0 to [-1, 1] before the SSIM.
        ssim_window, ssim_sigma, ssim_data_range, ssim_k1, ssim_k2: :func:`diffpath.core.ssim.ssim_map`.
    """

    seed: int = 0
    noise_key: str = "content"
    clip_x0_hat: bool = False
    ssim_window: int = 11
    ssim_sigma: float = 1.5
    ssim_data_range: float = 2.0
    ssim_k1: float = 0.01
    ssim_k2: float = 0.03

    def __post_init__(self) -> None:
        if self.noise_key not in ("content", "index"):
            raise ValueError(f"noise_key must be 'content' or 'index', got {self.noise_key!r}")


@dataclass
class ScoreErrorResult:
    """What one DiffPathV2 pass over a batch gives (moments on the model's device).

    Attributes:
        err_moments: (B, T, 5) float64, :func:`~diffpath.core.sampling.moments` of e_i = ε̂_i − ε_i.
        derr_moments: (B, T−1, 5) float64, moments of Δe_i = (e_{i+1} − e_i)·T.
        werr_moments: (B, T, 5) float64, moments of w_i = (1 − SSIM_i)·e_i.
        dwerr_moments: (B, T−1, 5) float64, moments of Δw_i = (w_{i+1} − w_i)·T.
        ssim_mean: (B, T) float64, mean of the SSIM map over all pixels and channels.
        maps: only with ``keep_maps``: ``{"xt", "eps_hat", "err", "x0_hat", "ssim", "werr"}``,
            each (B, T, C, H, W) on the CPU (float32, or float64 for a float64 pass);
            otherwise ``None``.
    """

    err_moments: torch.Tensor
    derr_moments: torch.Tensor
    werr_moments: torch.Tensor
    dwerr_moments: torch.Tensor
    ssim_mean: torch.Tensor
    maps: dict[str, torch.Tensor] | None = None


@torch.no_grad()
def score_error_path(
    model: EpsFn,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: np.ndarray,
    *,
    keys: torch.Tensor | None = None,
    config: ScoreErrorConfig = ScoreErrorConfig(),
    keep_maps: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> ScoreErrorResult:
    """DiffPathV2's per-step score errors of a batch, reduced to moments on the device.

    Args:
        model: ε-model ``(x, t) -> ε``, ``t`` (B,) int64 original timesteps.
        x0: (B, C, H, W) images in [-1, 1]. The pass runs in float32, or in float64 when x0 is
            float64 (for analytic models and reference computations; the model then receives
            float64 inputs, which a float32 network will refuse).
        timesteps: strictly increasing original timesteps (the study's default: the schedule's
            ``respaced_timesteps(N)``); T = len(timesteps) also scales the derivatives.
        alphas_cumprod: ᾱ of the model's training schedule, float64 (num_timesteps,).
        keys: (B,) int64 noise keys; ``None`` → :func:`image_keys` of x0 (content keys). With
            ``config.noise_key == "index"`` the caller must pass the global image indices.
        config: seed, noise keying, clipping and SSIM settings.
        keep_maps: also return every per-pixel map (B, T, C, H, W) on the CPU (small subsets only).
        callback: called after each step with ``{"i", "t", "xt", "eps", "eps_hat", "err",
            "x0_hat", "ssim", "werr"}`` (tensors on the device, (B, C, H, W)).

    Only the previous step's e and w are held for the derivatives; nothing of size B×T×C×H×W
    exists unless ``keep_maps``.
    """
    if x0.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x0.shape)}")
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if ts != sorted(ts) or len(set(ts)) != len(ts):
        raise ValueError(f"timesteps must be strictly increasing, got {ts}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if ts[0] < 0 or ts[-1] >= len(abar):
        raise ValueError(f"timesteps must lie in [0, {len(abar) - 1}], got {ts}")

    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0 = x0.to(dtype)
    dev = x0.device
    B, C, H, W = x0.shape
    if keys is None:
        if config.noise_key == "index":
            raise ValueError("noise_key='index' needs the global image indices passed as keys")
        keys = image_keys(x0)
    keys = torch.as_tensor(keys).to(dev)  # integer dtype checked by gaussian_noise
    if keys.shape != (B,):
        raise ValueError(f"keys must have shape ({B},), got {tuple(keys.shape)}")

    T = len(ts)
    err_m, derr_m, werr_m, dwerr_m, ssim_m = [], [], [], [], []
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in MAP_NAMES}
    prev_err: torch.Tensor | None = None
    prev_werr: torch.Tensor | None = None
    # coefficients live in float64 and are rounded once to the working precision before they
    # meet the images (as in diffpath.core.sampling), all steps in one host→device copy
    a = abar[list(ts)]
    table = torch.from_numpy(np.stack([np.sqrt(a), np.sqrt(1.0 - a)], 1)).to(dev, dtype)
    for i, t in enumerate(ts):
        sa, sn = table[i].unbind()
        eps = gaussian_noise(keys, t, (C, H, W), config.seed).to(dtype)
        xt = sa * x0 + sn * eps
        eps_hat = model(xt, torch.full((B,), t, dtype=torch.long, device=dev)).to(dtype)
        err = eps_hat - eps
        x0_hat = (xt - sn * eps_hat) / sa
        if config.clip_x0_hat:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        s = ssim_map(
            x0,
            x0_hat,
            window_size=config.ssim_window,
            sigma=config.ssim_sigma,
            data_range=config.ssim_data_range,
            k1=config.ssim_k1,
            k2=config.ssim_k2,
        )
        werr = (1.0 - s) * err

        err_m.append(moments(err))
        werr_m.append(moments(werr))
        ssim_m.append(s.reshape(B, -1).double().mean(1))
        if prev_err is not None and prev_werr is not None:
            derr_m.append(moments((err - prev_err) * T))
            dwerr_m.append(moments((werr - prev_werr) * T))
        prev_err, prev_werr = err, werr

        if keep_maps:
            for name, v in zip(MAP_NAMES, (xt, eps_hat, err, x0_hat, s, werr)):
                kept[name].append(v.detach().cpu())
        if callback is not None:
            callback(
                {
                    "i": i,
                    "t": t,
                    "xt": xt,
                    "eps": eps,
                    "eps_hat": eps_hat,
                    "err": err,
                    "x0_hat": x0_hat,
                    "ssim": s,
                    "werr": werr,
                }
            )

    def stack(ms: list[torch.Tensor]) -> torch.Tensor:
        if ms:
            return torch.stack(ms, 1)
        return torch.zeros(B, 0, len(MOMENTS), dtype=torch.float64, device=dev)

    return ScoreErrorResult(
        err_moments=stack(err_m),
        derr_moments=stack(derr_m),
        werr_moments=stack(werr_m),
        dwerr_moments=stack(dwerr_m),
        ssim_mean=torch.stack(ssim_m, 1),
        maps={k: torch.stack(v, 1) for k, v in kept.items()} if keep_maps else None,
    )


# --------------------------------------------------------------------------------------------
# features


def diffpathv2_features(
    err_moments: np.ndarray | torch.Tensor, derr_moments: np.ndarray | torch.Tensor, *, kind: str = "norm", derivative: bool = True
) -> np.ndarray:
    """DiffPathV2's feature from per-step moments of an error and of its derivative.

    Pass ``werr_moments, dwerr_moments`` for the paper's SSIM-weighted feature, or
    ``err_moments, derr_moments`` for the unweighted ablation.

    Args:
        err_moments: (B, T, 5) moments of the error at each step.
        derr_moments: (B, T−1, 5) moments of its derivative (ignored without ``derivative``).
        kind: ``"norm"``: Σ_t ‖q_t‖₁, Σ_t ‖q_t‖₂, Σ_t ‖q_t‖₃; ``"power"``: Σ_t Σ|q_t|,
            Σ_t Σq_t², Σ_t Σ|q_t|³ (see :func:`diffpath.methods.diffpath.order_norm_sums`).
        derivative: append the same three sums of the derivative.

    Returns:
        (B, 6) float64 with ``derivative`` (error half first), (B, 3) without.
    """
    first = order_norm_sums(err_moments, kind=kind)
    if not derivative:
        return first
    return np.concatenate([first, order_norm_sums(derr_moments, kind=kind)], axis=1)


def diffpathv2_1d(dmoments: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B,) √(Σ_t Σ_pixels (Δq_t)²) from (B, T−1, 5) derivative moments: the analogue of
    DiffPath's curvature (pass ``dwerr_moments`` for the weighted error)."""
    return np.sqrt(moment(as_moments(dmoments), "sq").sum(axis=1))
