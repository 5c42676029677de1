"""Checking the base model: held-out denoising loss, the untrained baseline, sample grids.

The ``base_model_eval`` stage uses these for either checkpoint format (a diffusers folder or an
improved-diffusion ``.pt``); samples come from :func:`diffpath.core.sampling.ddim_sample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffpath.core.schedule import NoiseSchedule, schedule_of
from diffpath.models import EpsModel

__all__ = ["denoising_loss_per_timestep", "untrained_like", "image_grid"]


@torch.no_grad()
def denoising_loss_per_timestep(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: np.ndarray | torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
    *,
    schedule: NoiseSchedule | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Held-out denoising loss ``mean‖ε̂(x_t, t) − ε‖²`` per timestep, with fixed noise.

    Args:
        eps_fn: ``eps_fn(x, t) -> ε̂``; ``x``: (B, C, H, W), ``t``: (B,) int64.
        x0: ``(N, C, H, W)`` clean images in [-1, 1].
        timesteps: the K timesteps to evaluate.
        seed: seeds the noise: timestep k uses the k-th ``(N, C, H, W)`` draw of a generator
            seeded with ``seed``, so two models evaluated with the same seed see the same noise.
        schedule: ᾱ (default ``eps_fn.schedule``); x_t = ``schedule.q_sample(x0, t, ε)``.
        batch_size: images per network call.

    Returns:
        ``(K,)`` float64: the mean squared error per pixel at each timestep (≈ 1 for ε̂ ≡ 0).
    """
    sched = schedule_of(eps_fn, schedule)
    x = torch.as_tensor(np.asarray(x0) if not isinstance(x0, torch.Tensor) else x0).float().cpu()
    if x.ndim != 4:
        raise ValueError(f"x0 must be (N, C, H, W), got {tuple(x.shape)}")
    device = getattr(eps_fn, "device", torch.device("cpu"))
    gen = torch.Generator().manual_seed(int(seed))
    out = np.zeros(len(timesteps), dtype=np.float64)
    for k, t in enumerate(timesteps):
        t = int(t)
        noise = torch.randn(x.shape, generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            xb, nb = x[i : i + batch_size], noise[i : i + batch_size]
            xt = sched.q_sample(xb, t, nb).to(device)
            tt = torch.full((xb.shape[0],), t, dtype=torch.int64, device=device)
            pred = eps_fn(xt, tt).float().cpu()
            total += float(((pred - nb) ** 2).sum(dtype=torch.float64))
        out[k] = total / x.numel()
    return out


def untrained_like(model: EpsModel, seed: int = 0) -> EpsModel:
    """A freshly initialised network of the same architecture as ``model``, wrapped the same way
    and with the same schedule: the "untrained" baseline of the evaluation notebook.

    Works for both checkpoint formats: a diffusers model is rebuilt from its UNet config, an
    improved-diffusion model from its settings. Initialisation is seeded and leaves the global RNG
    state untouched.
    """
    from diffpath.models import _DiffusersAdapter
    from diffpath.models.improved_unet import build_from_settings

    settings = model.settings if isinstance(model.settings, dict) else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if model.kind == "diffusers" and settings.get("unet"):
            from diffusers import UNet2DModel

            net: torch.nn.Module = _DiffusersAdapter(UNet2DModel.from_config(dict(settings["unet"])))
        elif model.kind == "improved-diffusion" and settings:
            net = build_from_settings(settings)
        else:
            raise ValueError(f"untrained_like needs a diffusers or improved-diffusion model, got {model.kind!r}")
    fresh = EpsModel(
        net=net.eval(),
        schedule=model.schedule,
        image_size=model.image_size,
        channels=model.channels,
        timestep_scale=model.timestep_scale,
        kind=model.kind,
        spec=f"untrained({model.spec}, seed={seed})",
        settings=dict(settings),
    )
    return fresh.to(model.device).configure(model.options)


def image_grid(images: np.ndarray | torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one ``(rows·(H+pad)+pad, nrow·(W+pad)+pad, C)``
    float array in [0, 1] (``C`` dropped when 1), for ``plt.imshow``/``plt.imsave``."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {x.shape}")
    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = (np.clip(x[i], -1, 1).transpose(1, 2, 0) + 1) / 2
    return grid[..., 0] if c == 1 else grid
