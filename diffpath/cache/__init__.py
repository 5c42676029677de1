"""The features cache: one model pass per set of images, reduced to per-step moments.

The UNet passes are the whole cost, so they run once and their per-image, per-step moments are
cached (see :mod:`diffpath.core.sampling`); every feature variant, ablation, scorer and figure is
then computed from the cache without touching the model again.

Cache arrays (N images, K kept steps, 5 moments each, float64):

=================  ===============  ===================================================
key                shape            what
=================  ===============  ===================================================
``dp_eps``          (N, K, 5)       DiffPath: ε along the DDIM inversion path
``dp_deps``         (N, K−1, 5)     DiffPath: Δε = diff(ε)·K
``v2_err``          (N, K, 5)       DiffPathV2: score error e_t = ε̂ − ε
``v2_derr``         (N, K−1, 5)     its temporal derivative
``v2_werr``         (N, K, 5)       (1 − SSIM_t)·e_t
``v2_dwerr``        (N, K−1, 5)     its temporal derivative
``v2_ssim``         (N, K)          mean SSIM(x0, x̂0_t) per image and step
``index``           (N,)            global image index
``dp_timesteps``    (K,)            original timesteps of the DDIM path
``v2_timesteps``    (K,)            original timesteps of the score errors
``maps_*``          (M, K, C, H, W) per-pixel maps of the first M images (``n_maps``)
``meta``            ()              JSON: the run's fingerprint, N, chunk size, settings
=================  ===============  ===================================================

Work is split into chunks of ``chunk_size`` images. Each finished chunk is written atomically to
``OUT.parts/``; an interrupted run resumes from the chunks already there, and the final file is
written atomically only when every chunk is done (then the parts are removed). Under torchrun each
rank computes the chunks ``rank, rank + world, ...`` and rank 0 merges them.

Modules: :mod:`~diffpath.cache.config` (what to compute, how to run), :mod:`~diffpath.cache.passes`
(the method passes → arrays), :mod:`~diffpath.cache.store` (the chunk store, reading a cache),
:mod:`~diffpath.cache.compute` (the loop over chunks and the merge).
"""

from diffpath.cache import config
from diffpath.cache.compute import compute_cache
from diffpath.cache.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_STEPS,
    FAMILIES,
    CacheConfig,
    PassOptions,
)
from diffpath.cache.store import read_cache

__all__ = [*config.__all__, "compute_cache", "read_cache"]
