"""The one place where the method passes run for the cache, and the names of the arrays they give.

:func:`batch_arrays` is the only code that turns a pass result into cache arrays. When the pass
results return their own cache arrays (an ``as_cache()`` under these same keys), its two blocks
become ``out.update(r.as_cache(keep_maps))``.
"""

from __future__ import annotations

import torch

from diffpath.cache.config import CacheConfig
from diffpath.core.sampling import ddim_coefficients
from diffpath.methods.diffpath import diffpath_path
from diffpath.methods.diffpathv2 import score_error_path
from diffpath.models import EpsModel

__all__ = ["batch_arrays"]


def batch_arrays(model: EpsModel, x: torch.Tensor, idx: torch.Tensor, cfg: CacheConfig,
                 keep_maps: bool) -> dict[str, torch.Tensor]:
    """The cache arrays of one batch (keys: :mod:`diffpath.cache`), on the model's device.

    Args:
        model: the ε-model.
        x: (B, C, H, W) float32 images in [-1, 1] on the model's device.
        idx: (B,) int64 global image indices (DiffPathV2's noise keys when ``noise_key="index"``).
        cfg: which families, steps and settings.
        keep_maps: also return the per-pixel maps (keys ``maps_*``, (B, T, C, H, W)).
    """
    out: dict[str, torch.Tensor] = {}
    if "diffpath" in cfg.families:
        coeffs = ddim_coefficients(model.schedule.alphas_cumprod, cfg.dp_timesteps(model))
        r = diffpath_path(model, x, coeffs, clip_denoised=cfg.clip_denoised, keep_maps=keep_maps)
        out["dp_eps"], out["dp_deps"] = r.eps_moments, r.deps_moments
        if keep_maps:
            out["maps_dp_eps"], out["maps_dp_xt"] = r.eps, r.xt
    if "diffpathv2" in cfg.families:
        keys = idx if cfg.score_error.noise_key == "index" else None
        r2 = score_error_path(model, x, cfg.v2_ts(model), model.schedule.alphas_cumprod,
                              keys=keys, config=cfg.score_error, keep_maps=keep_maps)
        out["v2_err"], out["v2_derr"] = r2.err_moments, r2.derr_moments
        out["v2_werr"], out["v2_dwerr"] = r2.werr_moments, r2.dwerr_moments
        out["v2_ssim"] = r2.ssim_mean
        if keep_maps and r2.maps:
            for k, v in r2.maps.items():
                out[f"maps_v2_{k}"] = v
    return out
