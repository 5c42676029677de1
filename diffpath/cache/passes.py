"""The one place where the method passes run for the cache.

:func:`batch_arrays` runs the configured passes on a batch; each pass result names its own arrays
(``as_cache()``; the keys are defined next to the result classes in :mod:`diffpath.methods.diffpath`
and :mod:`diffpath.methods.diffpathv2`).
"""

from __future__ import annotations

import torch

from diffpath.cache.config import CacheConfig
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
        keep_maps: also return the per-pixel maps (keys ``maps_*``, (B, K, C, H, W)).
    """
    out: dict[str, torch.Tensor] = {}
    if "diffpath" in cfg.families:
        out.update(diffpath_path(model, x, cfg.dp_timesteps(model), clip_denoised=cfg.clip_denoised,
                                 keep_maps=keep_maps).as_cache())
    if "diffpathv2" in cfg.families:
        keys = idx if cfg.score_error.noise_key == "index" else None
        out.update(score_error_path(model, x, cfg.v2_ts(model), keys=keys, config=cfg.score_error,
                                    keep_maps=keep_maps).as_cache())
    return out
