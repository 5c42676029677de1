"""Zero-shot anomaly localisation by partial DDIM inversion and reconstruction (DIVAD-style).

An image x0 is DDIM-inverted (η = 0) to an intermediate timestep ``t0`` and then DDIM-denoised back
to 0 with the *same* model. A model trained on normal data pulls the path towards normal images, so
the reconstruction x̂0 keeps what looks normal and repairs what does not; the discrepancy between
x0 and x̂0 is the anomaly map.

Pipeline (all pure functions; the notebook ``notebooks/30_localization.ipynb`` strings them)::

    rec = reconstruct(model, x0, t0=400, steps=10)            # 2·steps UNet evaluations / image
    maps = anomaly_maps(x0, rec.x_hat, model=model,
                        methods=("pixel", "ssim", "feature"))  # (B, 1, H, W) each, smoothed
    maps["combined"] = combine_maps(maps)                      # weighted sum of scaled maps
    scores = image_scores(maps["combined"])                    # (B,) max of a k×k average

Reconstruction schedule
-----------------------
``steps`` timesteps are kept, evenly spaced on [0, t0): s_j = round(j·t0/steps), j = 0..steps−1.

* inversion visits x0 (taken as the state at s_0 = 0, where the model is first evaluated)
  → ᾱ_{s_1} → … → ᾱ_{s_{steps−1}} → ᾱ_{t0}: ``steps`` model evaluations at s_0 … s_{steps−1};
* denoising walks the same grid back: ᾱ_{t0} → ᾱ_{s_{steps−1}} → … → ᾱ_{s_1} → clean (ᾱ = 1, the
  final x̂0): ``steps`` model evaluations at t0, s_{steps−1}, …, s_1.

Both directions use the same timesteps, so an exact ε-model (one that returns the ε consistent
with a fixed clean image) reconstructs that image exactly. The public DIVAD reference code instead
inverts along a 50-step schedule and starts the denoising from that latent on a 100-step schedule,
i.e. at a timestep whose noise level does not match the latent it is given; we keep the two
consistent on purpose (``reconstruct(..., denoise_t0=t1)`` with t1 > t0 restores such a mismatch
for ablations). ``t0`` is given in the model's own training timesteps (0 … T−1).

A consequence worth keeping in mind: deterministic DDIM inversion followed by denoising on the same
grid is the identity in the limit of many steps, for normal and anomalous content alike. What
repairs anomalies is the coarse discretisation (few, large steps, along which ε is evaluated at
states the model finds unlikely) and the x̂0 clipping; ``t0`` and ``steps`` therefore act together
and are best tuned jointly.

Anomaly maps (each ``(B, 1, H, W)`` at the input's size, higher = more anomalous)
-------------------------------------------------------------------------------
``"pixel"``
    |x0 − x̂0| averaged over channels (``pixel_power=2``: the squared difference).
``"ssim"``
    1 − SSIM(x0, x̂0) averaged over channels (:func:`diffpath.core.ssim.ssim_map`, 11-tap Gaussian
    window of σ = 1.5, data range 2); in [0, 2].
``"feature"``
    1 − cosine similarity over channels between the diffusion UNet's *own* intermediate
    activations of x0 and of x̂0, both evaluated at a small timestep ``feature_t`` (default 50 of
    1000, no added noise: the network is only used as a feature extractor, see
    :class:`UNetFeatures`), upsampled bilinearly to the image size and averaged over the chosen
    layers. Default layers: decoder (up-block) outputs at two resolutions, the highest ones below
    the input size first (16 and 8 px for a 4-level 32 px model; 16 and 32 px for a 3-level one).
    Costs 2 extra UNet evaluations per image.

Every map is then Gaussian-smoothed with σ = ``smooth_sigma`` pixels (default ``4·H/256``: DIVAD's
σ = 4 px at 256 px scaled to the image, 0.5 px at 32 px; 0 turns smoothing off).

``"combined"`` (:func:`combine_maps`) is Σ_k w_k · map_k / scale_k. No per-image min-max
normalisation (it would erase the difference between a clean and an anomalous image); each map is
instead divided by one *set-level* scale, by default its mean over every pixel of every image
passed (label-free, but transductive: pass ``scales`` computed on other images to avoid that).
Dividing by a positive constant keeps each map's ranking, so only the mix changes.

Image score (:func:`image_scores`): the maximum of the map after a k×k average pool (stride 1, no
padding), k = ``max(1, H // 8)`` by default (DIVAD pools 8×8 eight times at 256 px).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffpath.core.sampling import StepCallback, ddim_denoise, ddim_invert, partial_ddim_coefficients
from diffpath.core.schedule import alphas_cumprod_of
from diffpath.core.ssim import gaussian_filter, ssim_map
from diffpath.models import EpsFn
from diffpath.models.hooks import UNetFeatures

__all__ = [
    "METHODS",
    "CountingModel",
    "Reconstruction",
    "reconstruct",
    "pixel_distance_map",
    "ssim_distance_map",
    "feature_distance_map",
    "gaussian_smooth",
    "default_smooth_sigma",
    "anomaly_maps",
    "map_scales",
    "combine_maps",
    "image_scores",
    "to_image_grid",
    "LocalizationResult",
    "localize",
]

#: The map kinds :func:`localize` knows, in the order they are reported.
METHODS: tuple[str, ...] = ("pixel", "ssim", "feature", "combined")


# ----------------------------------------------------------------------------------------------
# reconstruction


class CountingModel:
    """Wraps an ε-model and counts its evaluations, per image (``images`` sums the batch sizes)."""

    def __init__(self, model: EpsFn):
        self.model = model
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += int(x.shape[0])
        return self.model(x, t)

    def __getattr__(self, name: str) -> Any:  # schedule, net, image_size, … of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


@dataclass
class Reconstruction:
    """What :func:`reconstruct` gives.

    Attributes:
        x_hat: (B, C, H, W) the reconstruction in [-1, 1] (with clipping).
        x_t0: (B, C, H, W) the inverted latent at ``t0``.
        t0, steps: the settings.
        nfe: UNet evaluations per image (2·steps).
    """

    x_hat: torch.Tensor
    x_t0: torch.Tensor
    t0: int
    steps: int
    nfe: int


@torch.no_grad()
def reconstruct(
    model: EpsFn,
    x0: torch.Tensor,
    t0: int,
    steps: int,
    *,
    alphas_cumprod: np.ndarray | None = None,
    clip_denoised: bool = True,
    denoise_t0: int | None = None,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """Invert x0 to ``t0`` along ``steps`` DDIM steps and denoise back with the same timesteps.

    Args:
        model: ε-model ``(x, t) -> ε``; its ``.schedule`` gives ᾱ unless ``alphas_cumprod`` is given.
        x0: (B, C, H, W) float images in [-1, 1], on the model's device.
        t0: intermediate timestep (model training timesteps, ``steps <= t0 <= T − 1``).
        steps: DDIM steps per direction.
        clip_denoised: clip every x̂0 to [-1, 1] (both directions).
        denoise_t0: ablation only. Denoise as if the latent sat at ``denoise_t0`` (its own
            ``steps`` evenly spaced timesteps) instead of ``t0``. ``None`` (default) keeps the two
            directions consistent; a value above ``t0`` imitates the reference code's mismatch
            (a latent inverted to t0 denoised on a schedule that starts at a higher noise level).
        callback: forwarded to both loops; each step dict gets ``"phase"``: ``"invert"`` or
            ``"denoise"``.

    Returns:
        :class:`Reconstruction`.
    """
    ac = alphas_cumprod_of(model, alphas_cumprod)
    inv, den = partial_ddim_coefficients(ac, t0, steps)
    if denoise_t0 is not None and int(denoise_t0) != int(t0):
        den = partial_ddim_coefficients(ac, int(denoise_t0), steps)[1]

    def tag(phase: str):
        if callback is None:
            return None
        return lambda step: callback({**step, "phase": phase})

    x_t0 = ddim_invert(model, x0, inv, clip_denoised=clip_denoised, callback=tag("invert"))
    x_hat = ddim_denoise(model, x_t0, den, clip_denoised=clip_denoised, callback=tag("denoise"))
    return Reconstruction(x_hat=x_hat, x_t0=x_t0, t0=int(t0), steps=int(steps), nfe=2 * int(steps))


# ----------------------------------------------------------------------------------------------
# maps


def default_smooth_sigma(size: int) -> float:
    """σ = 4 px at 256 px, scaled to ``size`` (0.5 px at 32)."""
    return 4.0 * size / 256.0


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) maps, σ in pixels, 2·⌈4σ⌉+1 taps (scipy's
    ``truncate=4``), symmetric (edge-repeating) border extension as in :mod:`diffpath.core.ssim`.
    ``sigma <= 0`` returns the maps unchanged."""
    if sigma <= 0:
        return maps
    return gaussian_filter(maps, sigma, max(1, int(math.ceil(4.0 * sigma))))


def pixel_distance_map(x: torch.Tensor, x_hat: torch.Tensor, power: int = 1) -> torch.Tensor:
    """|x − x̂|^power averaged over channels: (B, C, H, W) → (B, 1, H, W)."""
    if power not in (1, 2):
        raise ValueError(f"power must be 1 (absolute) or 2 (squared), got {power}")
    d = (x.float() - x_hat.float()).abs()
    return (d if power == 1 else d * d).mean(1, keepdim=True)


def ssim_distance_map(
    x: torch.Tensor, x_hat: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """1 − SSIM averaged over channels, (B, 1, H, W) in [0, 2] (images in [-1, 1])."""
    s = ssim_map(x.float(), x_hat.float(), window_size=window_size, sigma=sigma, data_range=2.0)
    return (1.0 - s).mean(1, keepdim=True).clamp(0.0, 2.0)  # float error can put SSIM a hair above 1


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-8).unsqueeze(1)


@torch.no_grad()
def feature_distance_map(
    features: UNetFeatures,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    *,
    t: int = 50,
) -> torch.Tensor:
    """Mean over ``features.layers`` of 1 − cos(f(x), f(x̂)) over channels, upsampled bilinearly
    to the image size: (B, 1, H, W) in [0, 2]. Both images go through the model at timestep ``t``
    in one batch (2 UNet evaluations per image)."""
    B, _, H, W = x.shape
    tt = torch.full((2 * B,), int(t), dtype=torch.long, device=x.device)
    feats = features(torch.cat([x, x_hat]).float(), tt)
    acc = torch.zeros(B, 1, H, W, device=x.device)
    for f in feats.values():
        d = _cosine_distance(f[:B], f[B:])
        acc += F.interpolate(d, size=(H, W), mode="bilinear", align_corners=False)
    return acc / len(feats)


def anomaly_maps(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    methods: Sequence[str] = ("pixel", "ssim"),
    *,
    model: Any = None,
    features: UNetFeatures | None = None,
    feature_t: int = 50,
    pixel_power: int = 1,
    smooth_sigma: float | None = None,
) -> dict[str, torch.Tensor]:
    """The requested maps (``"pixel"``, ``"ssim"``, ``"feature"``), each (B, 1, H, W), smoothed.

    ``"combined"`` in ``methods`` is ignored here (it needs set-level scales; see
    :func:`combine_maps`). ``"feature"`` needs ``features`` or ``model``.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
    sigma = default_smooth_sigma(x.shape[-1]) if smooth_sigma is None else float(smooth_sigma)
    out: dict[str, torch.Tensor] = {}
    for m in methods:
        if m == "pixel":
            raw = pixel_distance_map(x, x_hat, pixel_power)
        elif m == "ssim":
            raw = ssim_distance_map(x, x_hat)
        elif m == "feature":
            if features is None:
                if model is None:
                    raise ValueError("the feature map needs the model (or a UNetFeatures)")
                features = UNetFeatures(model)
            raw = feature_distance_map(features, x, x_hat, t=feature_t)
        else:
            continue
        out[m] = gaussian_smooth(raw, sigma)
    return out


def map_scales(maps: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, float]:
    """Set-level scale of each map: its mean over all pixels of all images (≥ 1e-12)."""
    return {k: max(float(torch.as_tensor(v).double().mean()), 1e-12) for k, v in maps.items()}


def combine_maps(
    maps: Mapping[str, torch.Tensor | np.ndarray],
    weights: Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
) -> torch.Tensor | np.ndarray:
    """Σ_k w_k · map_k / scale_k over the maps given (``"combined"`` itself skipped).

    Args:
        maps: name → (B, 1, H, W) tensor or (B, H, W) array, all the same shape.
        weights: name → weight (default 1 each; a missing name gets 0).
        scales: name → positive scale (default :func:`map_scales` of ``maps``).
    """
    parts = {k: v for k, v in maps.items() if k != "combined"}
    if not parts:
        raise ValueError("no maps to combine")
    w = {k: 1.0 for k in parts} if weights is None else {k: float(weights.get(k, 0.0)) for k in parts}
    sc = map_scales(parts) if scales is None else {k: float(scales[k]) for k in parts}
    total = None
    for k, v in parts.items():
        if w[k] == 0.0:
            continue
        term = v * (w[k] / sc[k])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("all weights are zero")
    return total


def image_scores(maps: torch.Tensor | np.ndarray, k: int | None = None) -> np.ndarray:
    """Image anomaly score: max of the k×k average-pooled map (stride 1, no padding).

    Args:
        maps: (B, 1, H, W) or (B, H, W).
        k: pooling window, default ``max(1, H // 8)``; clipped to the map size.

    Returns:
        (B,) float64.
    """
    m = torch.as_tensor(np.asarray(maps) if isinstance(maps, np.ndarray) else maps).double()
    if m.ndim == 3:
        m = m.unsqueeze(1)
    H, W = m.shape[-2:]
    k = max(1, H // 8) if k is None else int(k)
    k = max(1, min(k, H, W))
    pooled = F.avg_pool2d(m, k, stride=1) if k > 1 else m
    return pooled.flatten(1).max(1).values.cpu().numpy()


def to_image_grid(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bring (B, 1, S, S) model-resolution maps back to the original (H, W) image grid.

    When the image was zero-padded to the model size (``to_model_input``'s ``"pad"``: S − H and
    S − W even), the centre is cropped; otherwise the map is resized bilinearly. Returns
    (B, H, W) float32.
    """
    m = torch.as_tensor(np.asarray(maps) if isinstance(maps, np.ndarray) else maps).float()
    if m.ndim == 3:
        m = m.unsqueeze(1)
    S_h, S_w = m.shape[-2:]
    H, W = int(size[0]), int(size[1])
    dh, dw = S_h - H, S_w - W
    if dh == 0 and dw == 0:
        out = m
    elif 0 < dh <= 4 and 0 < dw <= 4 and dh % 2 == 0 and dw % 2 == 0:
        out = m[..., dh // 2 : dh // 2 + H, dw // 2 : dw // 2 + W]
    else:
        out = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
    return out[:, 0].cpu().numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------
# the whole thing, batched


@dataclass
class LocalizationResult:
    """What :func:`localize` gives for N images (numpy, on the CPU).

    Attributes:
        maps: method → (N, H, W) float32 anomaly maps (model resolution, or ``out_size``).
        scores: method → (N,) float64 image scores (:func:`image_scores`).
        x_hat: (N, C, H, W) float32 reconstructions.
        scales: the set-level scales used by ``"combined"``.
        nfe: UNet evaluations per image, counted (2·steps, + 2 with the feature map).
        settings: the parameters used.
    """

    maps: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    x_hat: np.ndarray
    scales: dict[str, float]
    nfe: float
    settings: dict[str, Any] = field(default_factory=dict)


def localize(
    model: Any,
    x0: np.ndarray | torch.Tensor,
    *,
    t0: int,
    steps: int,
    methods: Sequence[str] = METHODS,
    batch_size: int = 64,
    feature_t: int = 50,
    feature_layers: Sequence[str] | None = None,
    pixel_power: int = 1,
    smooth_sigma: float | None = None,
    weights: Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
    pool: int | None = None,
    out_size: tuple[int, int] | None = None,
    clip_denoised: bool = True,
    denoise_t0: int | None = None,
) -> LocalizationResult:
    """Reconstruct N images and compute every requested map and image score.

    Args:
        model: an :class:`~diffpath.models.EpsModel` (or any ε-model with ``.schedule``; the
            feature map also needs ``.net``).
        x0: (N, C, H, W) float32 in [-1, 1] (e.g. from :func:`diffpath.data.to_model_input`).
        t0, steps, clip_denoised, denoise_t0: see :func:`reconstruct`.
        methods: any of :data:`METHODS`; ``"combined"`` mixes the other *computed* maps (all of
            pixel, ssim and feature are computed for it even when not listed).
        batch_size: images per UNet batch.
        feature_t, feature_layers: see :func:`feature_distance_map` and :class:`UNetFeatures`.
        pixel_power, smooth_sigma: see :func:`anomaly_maps`.
        weights, scales: see :func:`combine_maps` (scales default to set-level means over these N
            images).
        pool: image-score window (:func:`image_scores`; default ``max(1, H // 8)`` of the grid
            the scores are taken on).
        out_size: the images' original (H, W): maps are brought back to that grid with
            :func:`to_image_grid` (centre crop of a zero-pad, else bilinear) *before* the image
            scores are taken; default: keep the model's resolution.
    """
    methods = list(methods)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
    base = [m for m in METHODS if m != "combined" and (m in methods or "combined" in methods)]
    if "combined" in methods and weights is not None:
        base = [m for m in base if m in methods or float(weights.get(m, 0.0)) != 0.0]
    counter = CountingModel(model)
    dev = getattr(model, "device", torch.device("cpu"))
    x_all = torch.as_tensor(np.asarray(x0) if isinstance(x0, np.ndarray) else x0).float()
    N = int(x_all.shape[0])
    feats = UNetFeatures(counter, feature_layers) if "feature" in base else None
    probe_images = counter.images  # the default-layer probe is not a per-image cost
    per: dict[str, list[torch.Tensor]] = {m: [] for m in base}
    x_hats = []
    for lo in range(0, N, batch_size):
        xb = x_all[lo : lo + batch_size].to(dev)
        rec = reconstruct(counter, xb, t0, steps, clip_denoised=clip_denoised, denoise_t0=denoise_t0)
        mp = anomaly_maps(
            xb, rec.x_hat, base, features=feats, feature_t=feature_t,
            pixel_power=pixel_power, smooth_sigma=smooth_sigma,
        )
        for m in base:
            per[m].append(mp[m].cpu())
        x_hats.append(rec.x_hat.cpu())
    maps_t = {m: torch.cat(v) for m, v in per.items()}
    used_scales: dict[str, float] = {}
    if "combined" in methods:
        used_scales = map_scales(maps_t) if scales is None else {k: float(scales[k]) for k in maps_t}
        maps_t["combined"] = combine_maps(maps_t, weights, used_scales)  # type: ignore[assignment]
    if out_size is not None:
        maps = {m: to_image_grid(maps_t[m], out_size) for m in methods}
    else:
        maps = {m: maps_t[m][:, 0].numpy().astype(np.float32) for m in methods}
    scores = {m: image_scores(maps[m], pool) for m in methods}
    grid = int(next(iter(maps.values())).shape[-2]) if maps else int(x_all.shape[-2])
    nfe = (counter.images - probe_images) / max(N, 1)
    return LocalizationResult(
        maps=maps,
        scores=scores,
        x_hat=torch.cat(x_hats).numpy() if x_hats else np.zeros((0,) + tuple(x_all.shape[1:]), np.float32),
        scales=used_scales,
        nfe=float(nfe),
        settings={
            "t0": int(t0), "steps": int(steps), "methods": methods,
            "denoise_t0": None if denoise_t0 is None else int(denoise_t0), "feature_t": int(feature_t),
            "feature_layers": None if feats is None else list(feats.layers),
            "pixel_power": pixel_power,
            "smooth_sigma": default_smooth_sigma(int(x_all.shape[-1])) if smooth_sigma is None else float(smooth_sigma),
            "pool": max(1, grid // 8) if pool is None else int(pool),
            "out_size": None if out_size is None else tuple(int(v) for v in out_size),
            "weights": dict(weights) if weights is not None else {m: 1.0 for m in base},
        },
    )
