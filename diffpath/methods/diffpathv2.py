"""DiffPathV2: forward-noised score errors, SSIM weighting, and their 6-D summary.

Per image x0 and kept timestep t_k (k = 0 … K−1, ascending): known noise ε forward-noises x0
(:meth:`~diffpath.core.schedule.NoiseSchedule.q_sample`), the network predicts ε̂, the score error
is e_k = ε̂ − ε, the reconstruction x̂0 = ``predict_x0(x_t, t, ε̂)``, and the weighted error
w_k = (1 − SSIM(x0, x̂0)) ⊙ e_k; Δe and Δw are their temporal differences scaled by K, as
DiffPath's Δε. :func:`score_error_path` reduces e, Δe, w, Δw to per-image moments on the device
(:mod:`diffpath.core.moments`); :func:`diffpathv2_features` sums the 1st/2nd/3rd-order norms.

Shapes: images (B, C, H, W); moments (B, K, 5) and (B, K−1, 5), float64. Notation and the step
dict: :mod:`diffpath.core.sampling`. The choices the paper leaves open (timesteps, norms,
weighting, clipping, noise keying) and why: ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffpath.core.moments import MOMENTS, as_moments, moment, moments, order_norm_sums
from diffpath.core.noise import gaussian_noise, image_keys
from diffpath.core.protocols import EpsFn
from diffpath.core.sampling import StepCallback
from diffpath.core.schedule import NoiseSchedule, schedule_of
from diffpath.core.ssim import ssim_map

__all__ = [
    "MAP_NAMES",
    "SCORE_ERROR_KEYS",
    "SCORE_ERROR_MAP_KEYS",
    "ScoreErrorConfig",
    "ScoreErrorResult",
    "score_error_step",
    "score_error_path",
    "diffpathv2_features",
    "diffpathv2_1d",
]

#: The per-pixel maps a pass can keep, by their cache names, and the step-dict key of each.
_MAP_SOURCES: dict[str, str] = {"xt": "x_t", "eps_hat": "eps_hat", "err": "err", "x0_hat": "x0_hat",
                                "ssim": "ssim", "werr": "werr"}
MAP_NAMES: tuple[str, ...] = tuple(_MAP_SOURCES)
#: The error cache's keys of a DiffPathV2 pass (:meth:`ScoreErrorResult.as_cache`).
SCORE_ERROR_KEYS: dict[str, str] = {"err": "v2_err", "derr": "v2_derr", "werr": "v2_werr",
                                    "dwerr": "v2_dwerr", "ssim": "v2_ssim"}
#: ... and of its per-pixel maps, kept for a few images only.
SCORE_ERROR_MAP_KEYS: dict[str, str] = {name: f"maps_v2_{name}" for name in MAP_NAMES}

# --------------------------------------------------------------------------------------------
# the score-error pass


@dataclass(frozen=True)
class ScoreErrorConfig:
    """Knobs of a DiffPathV2 pass (``docs/methods.md`` says why these defaults).

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
    """What one DiffPathV2 pass over a batch gives (moments on the model's device; K steps).

    Attributes:
        err_moments: (B, K, 5) float64, :func:`~diffpath.core.moments.moments` of e_k = ε̂_k − ε_k.
        derr_moments: (B, K−1, 5) float64, moments of Δe_k = (e_{k+1} − e_k)·K.
        werr_moments: (B, K, 5) float64, moments of w_k = (1 − SSIM_k)·e_k.
        dwerr_moments: (B, K−1, 5) float64, moments of Δw_k = (w_{k+1} − w_k)·K.
        ssim_mean: (B, K) float64, mean of the SSIM map over all pixels and channels.
        maps: only with ``keep_maps``: :data:`MAP_NAMES` → (B, K, C, H, W) on the CPU (float32,
            or float64 for a float64 pass); otherwise ``None``.
    """

    err_moments: torch.Tensor
    derr_moments: torch.Tensor
    werr_moments: torch.Tensor
    dwerr_moments: torch.Tensor
    ssim_mean: torch.Tensor
    maps: dict[str, torch.Tensor] | None = None

    def as_cache(self) -> dict[str, torch.Tensor]:
        """The error cache's arrays of this pass (:data:`SCORE_ERROR_KEYS`, and
        :data:`SCORE_ERROR_MAP_KEYS` when the maps were kept), as the tensors computed."""
        k = SCORE_ERROR_KEYS
        out = {k["err"]: self.err_moments, k["derr"]: self.derr_moments, k["werr"]: self.werr_moments,
               k["dwerr"]: self.dwerr_moments, k["ssim"]: self.ssim_mean}
        for name, v in (self.maps or {}).items():
            out[SCORE_ERROR_MAP_KEYS[name]] = v
        return out


def _checked_timesteps(timesteps: Sequence[int], T: int) -> list[int]:
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if ts != sorted(ts) or len(set(ts)) != len(ts):
        raise ValueError(f"timesteps must be strictly increasing, got {ts}")
    if ts[0] < 0 or ts[-1] >= T:
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {ts}")
    return ts


def _noise_keys(x0: torch.Tensor, keys: torch.Tensor | None, config: ScoreErrorConfig) -> torch.Tensor:
    """(B,) int64 noise keys on x0's device: given, or the images' content keys."""
    if keys is None:
        if config.noise_key == "index":
            raise ValueError("noise_key='index' needs the global image indices passed as keys")
        keys = image_keys(x0)
    keys = torch.as_tensor(keys).to(x0.device)  # integer dtype checked by gaussian_noise
    if keys.shape != (x0.shape[0],):
        raise ValueError(f"keys must have shape ({x0.shape[0]},), got {tuple(keys.shape)}")
    return keys


def score_error_step(model: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor, t: int,
                     keys: torch.Tensor, config: ScoreErrorConfig) -> dict[str, Any]:
    """One timestep of the pass: the step dict ``{"t", "x_t", "eps_true", "eps_hat", "err",
    "x0_hat", "ssim", "werr"}``, tensors (B, C, H, W) in x0's dtype, on its device.

    ε_true = :func:`~diffpath.core.noise.gaussian_noise` of (keys, t, seed); x_t =
    ``schedule.q_sample(x0, t, ε_true)``; ε̂ = model(x_t, t); e = ε̂ − ε_true; x̂0 =
    ``schedule.predict_x0(x_t, t, ε̂)`` (clipped with ``config.clip_x0_hat``); SSIM(x0, x̂0);
    w = (1 − SSIM)·e.
    """
    B, C, H, W = x0.shape
    eps_true = gaussian_noise(keys, t, (C, H, W), config.seed).to(x0.dtype)
    x_t = schedule.q_sample(x0, t, eps_true)
    eps_hat = model(x_t, torch.full((B,), t, dtype=torch.long, device=x0.device)).to(x0.dtype)
    err = eps_hat - eps_true
    x0_hat = schedule.predict_x0(x_t, t, eps_hat)
    if config.clip_x0_hat:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    s = ssim_map(x0, x0_hat, window_size=config.ssim_window, sigma=config.ssim_sigma,
                 data_range=config.ssim_data_range, k1=config.ssim_k1, k2=config.ssim_k2)
    return {"t": t, "x_t": x_t, "eps_true": eps_true, "eps_hat": eps_hat, "err": err,
            "x0_hat": x0_hat, "ssim": s, "werr": (1.0 - s) * err}


class _Moments:
    """Running per-step moments of e and w and of their K-scaled differences; only the previous
    step's e and w are held (and every map with ``keep_maps``)."""

    def __init__(self, K: int, keep_maps: bool):
        self.K, self.keep_maps = K, keep_maps
        self.lists: dict[str, list[torch.Tensor]] = {k: [] for k in ("err", "derr", "werr", "dwerr", "ssim")}
        self.maps: dict[str, list[torch.Tensor]] = {name: [] for name in MAP_NAMES}
        self.prev: dict[str, torch.Tensor] | None = None

    def add(self, step: dict[str, Any]) -> None:
        err, werr, B = step["err"], step["werr"], step["err"].shape[0]
        self.lists["err"].append(moments(err))
        self.lists["werr"].append(moments(werr))
        self.lists["ssim"].append(step["ssim"].reshape(B, -1).double().mean(1))
        if self.prev is not None:
            self.lists["derr"].append(moments((err - self.prev["err"]) * self.K))
            self.lists["dwerr"].append(moments((werr - self.prev["werr"]) * self.K))
        self.prev = {"err": err, "werr": werr}
        if self.keep_maps:
            for name, key in _MAP_SOURCES.items():
                self.maps[name].append(step[key].detach().cpu())

    def result(self, B: int, device: torch.device) -> ScoreErrorResult:
        def stack(ms: list[torch.Tensor]) -> torch.Tensor:
            if ms:
                return torch.stack(ms, 1)
            return torch.zeros(B, 0, len(MOMENTS), dtype=torch.float64, device=device)

        m = self.lists
        return ScoreErrorResult(
            err_moments=stack(m["err"]), derr_moments=stack(m["derr"]), werr_moments=stack(m["werr"]),
            dwerr_moments=stack(m["dwerr"]), ssim_mean=torch.stack(m["ssim"], 1),
            maps={k: torch.stack(v, 1) for k, v in self.maps.items()} if self.keep_maps else None,
        )


@torch.no_grad()
def score_error_path(
    model: EpsFn,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    *,
    schedule: NoiseSchedule | None = None,
    keys: torch.Tensor | None = None,
    config: ScoreErrorConfig = ScoreErrorConfig(),
    keep_maps: bool = False,
    callback: StepCallback | None = None,
) -> ScoreErrorResult:
    """DiffPathV2's per-step score errors of a batch, reduced to moments on the device.

    Args:
        model: ε-model ``(x, t) -> ε̂``, ``t`` (B,) int64 original timesteps.
        x0: (B, C, H, W) images in [-1, 1]. The pass runs in float32, or in float64 when x0 is
            float64 (for analytic models and reference computations; the model then receives
            float64 inputs, which a float32 network will refuse).
        timesteps: K strictly increasing original timesteps (the study's default: the
            schedule's ``respaced_timesteps(K)``); K also scales the derivatives.
        schedule: ᾱ (default ``model.schedule``).
        keys: (B,) int64 noise keys; ``None`` → :func:`image_keys` of x0 (content keys). With
            ``config.noise_key == "index"`` the caller must pass the global image indices.
        config: seed, noise keying, clipping and SSIM settings.
        keep_maps: also return every per-pixel map (B, K, C, H, W) on the CPU (small subsets only).
        callback: sees each step's dict (:func:`score_error_step`, plus ``"i"``).

    Nothing of size B×K×C×H×W exists unless ``keep_maps``.
    """
    if x0.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x0.shape)}")
    sched = schedule_of(model, schedule)
    ts = _checked_timesteps(timesteps, sched.num_timesteps)
    x0 = x0.to(torch.float64 if x0.dtype == torch.float64 else torch.float32)
    keys = _noise_keys(x0, keys, config)
    acc = _Moments(len(ts), keep_maps)
    for i, t in enumerate(ts):
        step = {"i": i, **score_error_step(model, sched, x0, t, keys, config)}
        acc.add(step)
        if callback is not None:
            callback(step)
    return acc.result(x0.shape[0], x0.device)


# --------------------------------------------------------------------------------------------
# features


def diffpathv2_features(
    err_moments: np.ndarray | torch.Tensor, derr_moments: np.ndarray | torch.Tensor, *, kind: str = "norm", derivative: bool = True
) -> np.ndarray:
    """DiffPathV2's feature from per-step moments of an error and of its derivative.

    Pass ``werr_moments, dwerr_moments`` for the paper's SSIM-weighted feature, or
    ``err_moments, derr_moments`` for the unweighted ablation.

    Args:
        err_moments: (B, K, 5) moments of the error at each step.
        derr_moments: (B, K−1, 5) moments of its derivative (ignored without ``derivative``).
        kind: ``"norm"``: Σ_k ‖q_k‖₁, Σ_k ‖q_k‖₂, Σ_k ‖q_k‖₃; ``"power"``: Σ_k Σ|q_k|,
            Σ_k Σq_k², Σ_k Σ|q_k|³ (see :func:`diffpath.core.moments.order_norm_sums`).
        derivative: append the same three sums of the derivative.

    Returns:
        (B, 6) float64 with ``derivative`` (error half first), (B, 3) without.
    """
    first = order_norm_sums(err_moments, kind=kind)
    if not derivative:
        return first
    return np.concatenate([first, order_norm_sums(derr_moments, kind=kind)], axis=1)


def diffpathv2_1d(dmoments: np.ndarray | torch.Tensor) -> np.ndarray:
    """(B,) √(Σ_k Σ_pixels (Δq_k)²) from (B, K−1, 5) derivative moments: the analogue of
    DiffPath's curvature (pass ``dwerr_moments`` for the weighted error)."""
    return np.sqrt(moment(as_moments(dmoments), "sq").sum(axis=1))
