"""The model pass of a detector: images in, feature rows out, checked finite.

:func:`features` runs :func:`diffpath.cache.compute_cache` over the decoded images (resumable in
the detector's work folder, keyed by the images' names and pixels, the model and the
preprocessing) and takes the method's features; :func:`cache_config` is the pass a detector's
``features`` settings describe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffpath.cache.config import CacheConfig, PassOptions
from diffpath.io import InputError
from diffpath.workarea import data_key

if TYPE_CHECKING:
    from diffpath.data.files import LoadedImages, Preprocessing
    from diffpath.methods.registry import Method
    from diffpath.models import EpsModel

__all__ = ["FeatureError", "cache_config", "features", "name_files"]


class FeatureError(InputError):
    """Features that are not finite (NaN/inf): a broken model or input; names the files."""


def cache_config(features: Mapping[str, Any], run: PassOptions) -> CacheConfig:
    """The model pass of a detector's features (``detector.json``'s ``features`` section, or the
    settings before a fit), in the run's batch and chunk sizes."""
    from diffpath.methods.diffpathv2 import ScoreErrorConfig

    f = features
    return CacheConfig(
        families=(f["family"],),
        steps=f["steps"],
        clip_denoised=bool(f["clip_denoised"]),
        v2_timesteps=f.get("v2_timesteps", "diffpath"),
        score_error=ScoreErrorConfig(seed=f["seed"], noise_key=f.get("noise_key", "content"),
                                     clip_x0_hat=bool(f.get("clip_x0_hat", False))),
        batch_size=run.batch_size,
        chunk_size=run.chunk_size,
    )


def name_files(paths: Sequence[Path], bad: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(bad)
    names = ", ".join(str(paths[i]) for i in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return names + more


def features(model: EpsModel, loaded: LoadedImages, cfg: CacheConfig, method: Method, fingerprint: str,
              prep: Preprocessing, state: dict[str, Any], progress: bool) -> np.ndarray:
    """The model pass over ``loaded.x0`` (N, C, H, W) (resumable under ``state["dir"]``, where a
    finished pass is kept until the work area goes) and the method's features (N, D), checked
    finite."""
    from diffpath.cache import compute_cache

    key = data_key(loaded.paths, loaded.x0, {"model": fingerprint, "prep": prep.to_dict()})
    out = state["dir"] / "features.npz" if state.get("dir") is not None else None
    state["phase"] = "pass"  # from here on, an interruption leaves resumable chunks
    cache = compute_cache(model, loaded.x0, cfg, out=out, data_key=key, progress=progress,
                          keep_finished=True)
    assert cache is not None
    state["phase"] = "after"
    feats = method.features(cache)
    bad = ~np.all(np.isfinite(feats), axis=1)
    if bad.any():
        raise FeatureError(
            f"the features of {int(bad.sum())} of {len(feats)} images are not finite (NaN/inf): "
            f"{name_files(loaded.paths, bad)}; is the model (or the input) broken?"
        )
    return feats
