"""Anomaly maps: turn an image and its reconstruction(s) into per-pixel maps and image scores.

Every map is ``(B, 1, H, W)``, higher = more anomalous. The reconstructions they compare:
:mod:`diffpath.methods.localization`; the definitions of ``pixel``, ``ssim``, ``feature`` and
``combined`` and why: ``docs/methods.md``. Model-free baselines (no reconstruction, no UNet):

``gradient``
    Sobel gradient magnitude of the image (channel mean): edges are "anomalous". A floor that any
    reconstruction-based map must clear.
``median``
    |x − median₃ₓ₃…(x)| with a ``k×k`` median filter (default k = 5 at 28–32 px): what a
    non-learned "reconstruction" by local smoothing leaves out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffpath.core.ssim import gaussian_filter, ssim_map
from diffpath.models.hooks import UNetFeatures

__all__ = [
    "MAP_KINDS",
    "MODEL_FREE",
    "pixel_distance_map",
    "ssim_distance_map",
    "feature_distance_map",
    "gradient_magnitude_map",
    "median_residual_map",
    "model_free_map",
    "gaussian_smooth",
    "default_smooth_sigma", "SMOOTH_SIGMA_AT_32",
    "anomaly_maps",
    "map_scales",
    "combine_maps",
    "image_scores",
    "to_image_grid",
]

#: The reconstruction-based map kinds, in the order they are reported.
MAP_KINDS: tuple[str, ...] = ("pixel", "ssim", "feature", "combined")
#: The model-free map kinds.
MODEL_FREE: tuple[str, ...] = ("gradient", "median")


#: The default map smoothing, in pixels at 32 px: the σ the study's localisation table was tuned to
#: on its own split (params.yaml ``localization.smooth_sigma``; a test keeps the two equal).
#: DIVAD blurs its DINO map with 5 px at 256 px (:data:`diffpath.methods.dino.DINO_SIGMA`); at 32 px
#: that would be 0.6 px, too little for the pixel map of a small model: its reconstructions' edge
#: errors then outshine a pasted patch.
SMOOTH_SIGMA_AT_32 = 3.0


def default_smooth_sigma(size: int) -> float:
    """σ = :data:`SMOOTH_SIGMA_AT_32` px at 32 px, scaled to ``size`` (the table's patches cover a
    fixed share of the image): the default when no σ is given."""
    return SMOOTH_SIGMA_AT_32 * size / 32.0


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
    kinds: Sequence[str] = ("pixel", "ssim"),
    *,
    model: Any = None,
    features: UNetFeatures | None = None,
    feature_t: int = 50,
    pixel_power: int = 1,
    smooth_sigma: float | None = None,
) -> dict[str, torch.Tensor]:
    """The requested maps (``"pixel"``, ``"ssim"``, ``"feature"``), each (B, 1, H, W), smoothed.

    ``"combined"`` in ``kinds`` is ignored here (it needs set-level scales; see
    :func:`combine_maps`). ``"feature"`` needs ``features`` or ``model``.
    """
    unknown = set(kinds) - set(MAP_KINDS)
    if unknown:
        raise ValueError(f"unknown map kinds {sorted(unknown)}; known: {list(MAP_KINDS)}")
    sigma = default_smooth_sigma(x.shape[-1]) if smooth_sigma is None else float(smooth_sigma)
    out: dict[str, torch.Tensor] = {}
    for m in kinds:
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


def gradient_magnitude_map(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude, channel mean: (B, C, H, W) → (B, 1, H, W) (replicate border)."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8.0
    g = x.float().mean(1, keepdim=True)
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(gp, k.view(1, 1, 3, 3))
    gy = F.conv2d(gp, k.t().contiguous().view(1, 1, 3, 3))
    return torch.sqrt(gx * gx + gy * gy)


def median_residual_map(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """|x − median_k×k(x)|, channel mean: (B, C, H, W) → (B, 1, H, W) (reflect border, odd k)."""
    if k < 3 or k % 2 == 0:
        raise ValueError(f"the median window must be odd and >= 3, got {k}")
    xf = x.float()
    r = k // 2
    patches = F.unfold(F.pad(xf, (r, r, r, r), mode="reflect"), k)  # (B, C·k², H·W)
    B, C, H, W = xf.shape
    med = patches.view(B, C, k * k, H * W).median(2).values.view(B, C, H, W)
    return (xf - med).abs().mean(1, keepdim=True)


def model_free_map(x: torch.Tensor, kind: str, *, smooth_sigma: float | None = None) -> torch.Tensor:
    """A model-free map (``"gradient"`` or ``"median"``), Gaussian-smoothed as the other maps."""
    if kind == "gradient":
        raw = gradient_magnitude_map(x)
    elif kind == "median":
        raw = median_residual_map(x)
    else:
        raise ValueError(f"unknown model-free map {kind!r}; known: {list(MODEL_FREE)}")
    sigma = default_smooth_sigma(x.shape[-1]) if smooth_sigma is None else float(smooth_sigma)
    return gaussian_smooth(raw, sigma)
