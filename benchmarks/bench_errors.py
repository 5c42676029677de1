#!/usr/bin/env python
"""Throughput of the errors stage (DiffPath + DiffPathV2 model passes), side by side.

Builds a reference-sized ε-model from its settings alone (random weights: speed does not depend on
the weights, and no checkpoint is needed), then times, in one process, on the same images:

``reference``
    a re-creation of the cost structure of DiffPath's public pipeline (clear-nus/diffpath
    ``save_*_statistics.py`` on openai/improved-diffusion): fp32 eager network; per step the
    respaced-diffusion wrapper's timestep map and every coefficient are copied to the device from
    float64 numpy (``_extract_into_tensor``), the learned-σ ``p_mean_variance`` terms are computed;
    ε is moved to the CPU every step and the statistics are computed in numpy (float32, as the
    reference does). DiffPathV2 has no public code: its reference re-creation draws the study's
    deterministic noise on the device, moves ε̂ to the CPU every step and computes the error, x̂0,
    the SSIM map (scipy ``gaussian_filter``, the same SSIM definition as :mod:`diffpath.core.ssim`) and
    the norms in numpy.
``eager``
    the study's own path, :func:`diffpath.cache.compute_cache`, fp32 eager.
``fast``
    the same :func:`~diffpath.cache.compute_cache` call on a model configured with the fast
    :class:`~diffpath.models.RunOptions` (built by :func:`diffpath.models.options.run_options_from_params`,
    the function the errors stage uses): by default bf16 autocast + channels_last on CUDA
    (``--compile`` / ``--cuda-graphs`` add torch.compile / CUDA graphs); on CPU the default is what
    measured fastest on the study's 2-core CPU (see ``benchmarks/README.md``).
``unet_only``
    the network forward alone (``EpsModel.__call__``) under the fast options, for the same number
    of evaluations: the ceiling.
``unet_eager``
    (optional) the network forward alone in fp32 eager: the ceiling of ``eager``.
``fast_patched``
    (optional) ``fast`` with changes to the package proposed for the GPU monkeypatched in for the
    duration of the run (``--patches``, see :data:`PATCHES`), to measure them before they are made.

Prints one JSON line per path on stdout (everything else goes to stderr). ``nfe_per_s`` counts
network evaluations of single images (``n_images × steps × len(families)`` per run) per second;
``img_per_s`` counts images that went through every requested family. Timed repeats are
interleaved across paths (round-robin, rotating the order) so that a shared machine's load drifts
hit every path alike; the median is reported.

Examples::

    python benchmarks/bench_errors.py --model fmnist --device cpu --batch-size 256 --table
    python benchmarks/bench_errors.py --model celeba32 --device cuda --batch-size 256 \\
        --paths reference,eager,fast,unet_only --compile --cuda-graphs --table
"""

from __future__ import annotations

import os

# no compiler logs, whatever the caller's environment says (before torch is imported; an empty
# TORCH_LOGS is not accepted by every torch version, so the variable is removed)
os.environ.pop("TORCH_LOGS", None)
os.environ.pop("TORCHINDUCTOR_VERBOSE", None)
os.environ.setdefault("TORCHINDUCTOR_DISABLE_PROGRESS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffpath.methods.diffpathv2 import ScoreErrorConfig  # noqa: E402
from diffpath.cache import CacheConfig, compute_cache  # noqa: E402
from diffpath.cli import options  # noqa: E402
from diffpath.models.options import run_options_from_params  # noqa: E402
from diffpath.methods.registry import METHODS  # noqa: E402
from diffpath.models import PRECISIONS, EpsModel, RunOptions, load_model  # noqa: E402
from diffpath.models.improved_unet import (  # noqa: E402
    build_from_settings,
    resolve_settings,
    schedule_from_settings,
)
from diffpath.core.schedule import NoiseSchedule  # noqa: E402

ALL_PATHS = ("reference", "eager", "fast", "unet_only", "unet_eager", "fast_patched")
DEFAULT_PATHS = ("reference", "eager", "fast", "unet_only")
FEATURE_METHOD = {"diffpath": "diffpath", "diffpathv2": "diffpathv2"}  # family → 6-D method

# --------------------------------------------------------------------------------------------
# models (settings only, random weights)

#: improved-diffusion settings of the reference-sized models.
IMPROVED_CONFIGS: dict[str, dict[str, Any]] = {
    # DiffPath's CelebA-32 model (configs/celeba_model_config.yaml, whose dropout is 0.3; the study
    # brief says 0.1: dropout is inactive in eval mode, so it does not change any number here),
    # improved-diffusion defaults for the rest: 4 heads, attention at 16 and 8, scale-shift norm.
    "celeba32": {
        "image_size": 32, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True,
        "diffusion_steps": 4000, "noise_schedule": "cosine", "class_cond": False,
        "dropout": 0.1, "num_heads": 4, "attention_resolutions": "16,8",
        "use_scale_shift_norm": True, "rescale_timesteps": True,
    },
    # DiffPath's ImageNet-64 model (clear-nus/diffpath configs/imagenet_model_config.yaml).
    "imagenet64": {
        "image_size": 64, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True,
        "diffusion_steps": 4000, "noise_schedule": "cosine", "class_cond": False,
        "dropout": 0.0, "use_zero_module": True,
    },
    # a few-thousand-parameter model for tests
    "tiny": {
        "image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "8", "num_heads": 2, "learn_sigma": True,
        "diffusion_steps": 4000, "noise_schedule": "cosine",
    },
}

#: where the study's embedded Fashion-MNIST base model lives (a diffusers folder)
FMNIST_MODEL = ROOT / "models" / "fashion_mnist_ddpm"
#: stand-in architecture when that folder holds no trained model yet and no train_config.json:
#: the embedded profile's base model (diffpath.study.train.UNetConfig's defaults: 1×32×32, 16/24/32/64
#: channels, one ResNet block per level, attention in the 4×4 mid block, 8 GroupNorm groups),
#: linear 1000-step schedule.
FMNIST_STANDIN: dict[str, Any] = {
    "sample_size": 32, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": [16, 24, 32, 64],
    "down_block_types": ["DownBlock2D"] * 4, "up_block_types": ["UpBlock2D"] * 4,
    "norm_num_groups": 8, "add_attention": True, "attention_head_dim": 8, "dropout": 0.0,
}


def _is_diffusers_folder(folder: Path) -> bool:
    return (folder / "unet" / "config.json").is_file() or (folder / "config.json").is_file()


class _DiffusersEps(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


def build_model(name: str, fmnist_config: dict[str, Any] | None = None) -> tuple[EpsModel, str]:
    """The ε-model ``name`` on the CPU (fp32, eval mode), and a note on where it came from."""
    torch.manual_seed(0)
    if name in IMPROVED_CONFIGS:
        s = resolve_settings(IMPROVED_CONFIGS[name])
        net = build_from_settings(s).eval()
        sched = schedule_from_settings(s)
        T = sched.num_timesteps
        model = EpsModel(
            net=net, schedule=sched, image_size=int(s["image_size"]), channels=int(s["in_channels"]),
            timestep_scale=(1000.0 / T) if s["rescale_timesteps"] else 1.0,
            kind="improved-diffusion", spec=f"random:{name}", settings=s,
        )
        return model, f"improved-diffusion UNet from settings, random weights ({name})"
    if name == "fmnist":
        if fmnist_config is None and _is_diffusers_folder(FMNIST_MODEL):
            return load_model(FMNIST_MODEL, device="cpu"), f"the study's base model ({FMNIST_MODEL})"
        from diffusers import UNet2DModel

        sched_cfg: dict[str, Any] = {}
        source = "--fmnist-config"
        if fmnist_config is None:
            train_cfg = FMNIST_MODEL / "train_config.json"
            if train_cfg.is_file():  # the base model being trained: same architecture, random weights
                tc = json.loads(train_cfg.read_text())
                fmnist_config, sched_cfg, source = tc["unet"], tc, str(train_cfg.relative_to(ROOT))
            else:
                fmnist_config, source = FMNIST_STANDIN, "built-in stand-in"
        cfg = dict(fmnist_config)
        unet = UNet2DModel(**cfg).eval()
        T = int(sched_cfg.get("num_train_timesteps", 1000))
        if sched_cfg.get("beta_schedule", "linear") == "linear":
            betas = np.linspace(float(sched_cfg.get("beta_start", 1e-4)),
                                float(sched_cfg.get("beta_end", 0.02)), T, dtype=np.float64)
            schedule = NoiseSchedule(betas, name="linear")
        else:
            schedule = NoiseSchedule.named(str(sched_cfg["beta_schedule"]), T)
        model = EpsModel(
            net=_DiffusersEps(unet).eval(), schedule=schedule,
            image_size=int(cfg["sample_size"]), channels=int(cfg["in_channels"]),
            kind="diffusers", spec="random:fmnist", settings={"unet": cfg},
        )
        return model, (f"random diffusers UNet with the base model's architecture ({source}; "
                       "no trained model in models/fashion_mnist_ddpm yet)")
    raise SystemExit(f"unknown --model {name!r}; choose celeba32, imagenet64, fmnist or tiny")


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, C, size, size) float32 in [-1, 1]: smooth random fields plus a little pixel noise,
    image-like enough that SSIM and clipping behave as on photographs (seeded, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, channels, max(2, size // 4), max(2, size // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.15 * torch.randn(n, channels, size, size, generator=g)
    return torch.tanh(1.2 * x).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# the reference re-creation (improved-diffusion + DiffPath's statistics script)


class _ReferenceDiffusion:
    """The float64 numpy arrays a respaced improved-diffusion ``GaussianDiffusion`` holds."""

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int]):
        ab_full = schedule.alphas_cumprod
        last, betas = 1.0, []
        for t in timesteps:  # respace.py: new betas from the kept alpha-bars
            betas.append(1.0 - ab_full[t] / last)
            last = ab_full[t]
        self.timestep_map = list(timesteps)
        self.original_num_steps = schedule.num_timesteps
        b = np.asarray(betas, dtype=np.float64)
        self.betas = b
        ac = np.cumprod(1.0 - b)
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod_next = np.append(ac[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        pv = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - ac)
        self.posterior_variance = pv
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(pv)
        self.log_betas = np.log(b)
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - b) / (1.0 - ac)


def _extract(arr: np.ndarray, t: torch.Tensor, shape) -> torch.Tensor:
    # improved-diffusion's _extract_into_tensor: the whole float64 array goes to the device per call
    res = torch.from_numpy(arr).to(device=t.device)[t].float()
    while res.ndim < len(shape):
        res = res[..., None]
    return res.expand(shape)


def _wrapped_model(model: EpsModel, d: _ReferenceDiffusion, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    # respace.py's _WrappedModel: index → original timestep (tensor built per call), rescaled
    map_tensor = torch.tensor(d.timestep_map, device=ts.device, dtype=ts.dtype)
    new_ts = map_tensor[ts]
    if model.timestep_scale != 1.0:
        new_ts = new_ts.float() * (1000.0 / d.original_num_steps)
    return model.net(x, new_ts)


def _p_mean_variance(model: EpsModel, d: _ReferenceDiffusion, x: torch.Tensor, t: torch.Tensor,
                     clip: bool) -> dict[str, torch.Tensor]:
    C = x.shape[1]
    out = _wrapped_model(model, d, x, t)
    if out.shape[1] == 2 * C:  # learned range σ
        eps, var_values = torch.split(out, C, dim=1)
        min_log = _extract(d.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract(d.log_betas, t, x.shape)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        var = torch.exp(log_var)
    else:  # fixed small σ
        eps = out
        var = _extract(d.posterior_variance, t, x.shape)
        log_var = _extract(d.posterior_log_variance_clipped, t, x.shape)
    pred_xstart = (_extract(d.sqrt_recip_alphas_cumprod, t, x.shape) * x
                   - _extract(d.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps)
    if clip:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean = (_extract(d.posterior_mean_coef1, t, x.shape) * pred_xstart
            + _extract(d.posterior_mean_coef2, t, x.shape) * x)
    _ = (_extract(d.posterior_variance, t, x.shape), _extract(d.posterior_log_variance_clipped, t, x.shape))
    return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart,
            "model_eps": eps}


def _reference_diffpath(model: EpsModel, d: _ReferenceDiffusion, x0: torch.Tensor,
                        clip: bool) -> np.ndarray:
    """ddim_reverse_sample_loop + save_test_statistics.py's numpy statistics → (B, 6) features."""
    B = x0.shape[0]
    img = x0
    eps_cpu = []
    for i in range(len(d.betas)):
        t = torch.tensor([i] * B, device=x0.device)
        with torch.no_grad():
            out = _p_mean_variance(model, d, img, t, clip)
            eps = (_extract(d.sqrt_recip_alphas_cumprod, t, img.shape) * img - out["pred_xstart"]) \
                / _extract(d.sqrt_recipm1_alphas_cumprod, t, img.shape)
            abn = _extract(d.alphas_cumprod_next, t, img.shape)
            img = out["pred_xstart"] * torch.sqrt(abn) + torch.sqrt(1 - abn) * eps
        eps_cpu.append(eps.cpu().numpy())  # ε to the CPU, every step
    n_steps = len(d.betas)
    eps = np.array(eps_cpu).transpose(1, 0, 2, 3, 4)  # B, T, C, H, W (float32, as the reference)
    ax = (1, 2, 3, 4)
    stats = {
        "eps_sum": np.sum(eps, axis=ax), "eps_sum_abs": np.sum(np.abs(eps), axis=ax),
        "eps_sum_sq": np.sum(eps**2, axis=ax), "eps_sum_sq_sqrt": np.sqrt(np.sum(eps**2, axis=ax)),
        "eps_sum_cb": np.sum(eps**3, axis=ax), "eps_sum_cb_cbrt": np.cbrt(np.sum(eps**3, axis=ax)),
    }
    eps_diff = np.diff(eps, axis=1) * n_steps
    stats.update({
        "deps_dt": np.sum(eps_diff, axis=ax), "deps_dt_abs": np.sum(np.abs(eps_diff), axis=ax),
        "deps_dt_sq": np.sum(eps_diff**2, axis=ax),
        "deps_dt_sq_sqrt": np.sqrt(np.sum(eps_diff**2, axis=ax)),
        "deps_dt_cb": np.sum(eps_diff**3, axis=ax), "deps_dt_cb_cbrt": np.cbrt(np.sum(eps_diff**3, axis=ax)),
    })
    keys = ("eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt", "deps_dt_sq", "deps_dt_cb")
    return np.column_stack([np.asarray(stats[k], dtype=np.float64) for k in keys])


def _np_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The SSIM map of :mod:`diffpath.core.ssim` in scipy (float64, symmetric borders, σ 1.5, 11 taps)."""
    from scipy.ndimage import gaussian_filter

    x = x.astype(np.float64)
    y = y.astype(np.float64)

    def f(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=(0, 0, 1.5, 1.5), mode="reflect", truncate=3.5)

    mx, my = f(x), f(y)
    vx, vy, vxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    c1, c2 = (0.01 * 2.0) ** 2, (0.03 * 2.0) ** 2
    return ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _reference_diffpathv2(model: EpsModel, d: _ReferenceDiffusion, x0: torch.Tensor,
                          seed: int) -> np.ndarray:
    """A straightforward DiffPathV2 in the reference's style → (B, 6) SSIM-weighted features."""
    from diffpath.core.noise import gaussian_noise, image_keys

    B, C, H, W = x0.shape
    keys = image_keys(x0)  # the study's deterministic noise, so the features are comparable
    x0_np = x0.cpu().numpy()
    werr_steps = []
    for i, t_orig in enumerate(d.timestep_map):
        t = torch.tensor([i] * B, device=x0.device)
        with torch.no_grad():
            noise = gaussian_noise(keys, t_orig, (C, H, W), seed)
            xt = (_extract(d.sqrt_alphas_cumprod, t, x0.shape) * x0
                  + _extract(d.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)
            eps_hat = _wrapped_model(model, d, xt, t)[:, :C]
        # to the CPU every step; everything else in numpy
        eps_hat, noise_np, xt_np = eps_hat.cpu().numpy(), noise.cpu().numpy(), xt.cpu().numpy()
        ab = d.alphas_cumprod[i]
        err = eps_hat - noise_np
        x0_hat = (xt_np - np.sqrt(1.0 - ab) * eps_hat) / np.sqrt(ab)
        s = _np_ssim_map(x0_np, x0_hat)
        werr_steps.append(((1.0 - s) * err).astype(np.float32))
    w = np.array(werr_steps).transpose(1, 0, 2, 3, 4)  # B, T, C, H, W
    n_steps = len(d.timestep_map)
    dw = np.diff(w, axis=1) * n_steps

    def norms(q: np.ndarray) -> list[np.ndarray]:
        q = q.reshape(q.shape[0], q.shape[1], -1).astype(np.float64)
        a = np.abs(q)
        return [a.sum(-1).sum(1), np.sqrt((q**2).sum(-1)).sum(1), np.cbrt((a**3).sum(-1)).sum(1)]

    return np.column_stack(norms(w) + norms(dw))


def reference_run(model: EpsModel, x0: np.ndarray, cfg: CacheConfig) -> dict[str, np.ndarray]:
    dev = model.device
    d_dp = _ReferenceDiffusion(model.schedule, cfg.dp_timesteps(model))
    d_v2 = _ReferenceDiffusion(model.schedule, cfg.v2_ts(model))
    feats: dict[str, list[np.ndarray]] = {f: [] for f in cfg.families}
    for s in range(0, len(x0), cfg.batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x0[s:s + cfg.batch_size])).to(dev)
        if "diffpath" in cfg.families:
            feats["diffpath"].append(_reference_diffpath(model, d_dp, xb, cfg.clip_denoised))
        if "diffpathv2" in cfg.families:
            feats["diffpathv2"].append(_reference_diffpathv2(model, d_v2, xb, cfg.score_error.seed))
    return {f: np.concatenate(v) for f, v in feats.items()}


# --------------------------------------------------------------------------------------------
# the study's path and the network alone


def study_run(model: EpsModel, x0: np.ndarray, cfg: CacheConfig) -> dict[str, np.ndarray]:
    cache = compute_cache(model, x0, cfg, out=None, progress=False)
    assert cache is not None
    return {f: METHODS[FEATURE_METHOD[f]].features(cache) for f in cfg.families}


def unet_run(model: EpsModel, batches: list[torch.Tensor], cfg: CacheConfig) -> None:
    ts = {"diffpath": cfg.dp_timesteps(model), "diffpathv2": cfg.v2_ts(model)}
    for x in batches:
        for fam in cfg.families:
            for t in ts[fam]:
                model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
    _sync(batches[0].device if batches else torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# proposed package changes, monkeypatched in for the ``fast_patched`` path


def _patch_compile_ssim() -> list[tuple[Any, str, Any]]:
    """``torch.compile`` DiffPathV2's SSIM map (fuses its elementwise work around the two
    depthwise convolutions; static shapes)."""
    from diffpath.methods import diffpathv2 as score_error

    old = score_error.ssim_map
    score_error.ssim_map = torch.compile(old, dynamic=False)
    return [(score_error, "ssim_map", old)]


def _patch_compile_noise() -> list[tuple[Any, str, Any]]:
    """``torch.compile`` the per-pixel part of DiffPathV2's noise (:func:`diffpath.core.noise.lane_noise`).

    Compiling ``gaussian_noise`` itself does not work: its Python-int arguments (seed, t) are
    specialised, so it would recompile for every timestep. Its per-pixel part is a function of
    tensors alone: one static-shape graph for all timesteps, the same integer ops in the same
    order, so the noise is bit-identical (checked when the patch is applied).
    """
    from diffpath.core import noise

    orig = noise.lane_noise
    compiled = torch.compile(orig, dynamic=False)
    probe = torch.arange(3, dtype=torch.int64) * 7919 + 5
    if not torch.equal(compiled(*noise.noise_lanes(probe, 17, 3), 48), orig(*noise.noise_lanes(probe, 17, 3), 48)):
        raise SystemExit("compile_noise: the compiled noise differs from the eager one")
    noise.lane_noise = compiled
    return [(noise, "lane_noise", orig)]


#: name → function applying the patch and returning how to undo it
PATCHES: dict[str, Callable[[], list[tuple[Any, str, Any]]]] = {
    "compile_ssim": _patch_compile_ssim,
    "compile_noise": _patch_compile_noise,
}


class Patched:
    """Context manager applying the named :data:`PATCHES` (the same compiled objects every time)."""

    def __init__(self, names: list[str]):
        self.names = names
        self._undo: list[tuple[Any, str, Any]] = []
        self._applied: dict[tuple[Any, str], Any] | None = None

    def __enter__(self) -> Patched:
        if self._applied is None:  # first time: build the patched objects, remember them
            for n in self.names:
                self._undo += PATCHES[n]()
            self._applied = {(m, a): getattr(m, a) for m, a, _ in self._undo}
        else:
            for (m, a), new in self._applied.items():
                setattr(m, a, new)
        return self

    def __exit__(self, *exc) -> None:
        for m, a, old in reversed(self._undo):
            setattr(m, a, old)


# --------------------------------------------------------------------------------------------
# measuring


def _with(ctx: Any, fn: Callable[[], Any]) -> Any:
    with ctx:
        return fn()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak (absolute: weights, inputs
    and workspace included). CPU: the peak *increase* of the process's resident set size over the
    block, sampled every millisecond from ``/proc/self/statm`` by a background thread after a
    ``gc.collect()`` and glibc ``malloc_trim(0)`` (so memory freed by earlier paths does not hide
    this one's allocations); an approximation (sampling can miss sub-millisecond spikes, and the
    allocator may keep pages). Without ``/proc`` it falls back to the ``ru_maxrss`` delta (0 once
    an earlier block set a higher mark).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_rss_peak_delta"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        gc.collect()
        _malloc_trim()
        self._base = _rss_bytes()
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._peak = self._base or 0
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            v = _rss_bytes()
            if v is not None and v > self._peak:
                self._peak = v
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        if self._base is None:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0) / 1024
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        self.mb = (self._peak - self._base) / 2**20


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max over images and features of |a − b| / max(|b|, 5% of that feature's max |b|)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    scale = np.maximum(np.abs(b), 0.05 * np.abs(b).max(axis=0, keepdims=True))
    scale = np.where(scale > 0, scale, 1.0)
    return float((np.abs(a - b) / scale).max()) if a.size else 0.0


def _json_float(v: float) -> float | str:
    """Non-finite values as strings ("inf", "nan"), so every line is strict JSON."""
    return v if math.isfinite(v) else str(v)


def _quiet_compiler() -> None:
    """No dynamo/inductor chatter and no autotuning tables on stdout/stderr."""
    for name in ("torch._dynamo", "torch._inductor", "torch.fx", "torch._functorch",
                 "torch.utils._sympy", "torch._subclasses"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\._(dynamo|inductor)")
    try:
        import torch._inductor.config as ic

        for key, value in {"verbose_progress": False, "disable_progress": True,
                           "autotune_num_choices_displayed": 0,
                           "max_autotune_report_choices_stats": False}.items():
            if hasattr(ic, key):
                setattr(ic, key, value)
    except Exception:  # pragma: no cover - torch without inductor
        pass


def profile_batch(run: Callable[[], Any], device: torch.device, out: Path, top: int = 25) -> None:
    """Profile one (already warm) call of ``run`` and write the top ``top`` operators and kernels
    by self time on the device (self CPU time on the CPU) as JSON: where a steady-state batch
    spends its time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run()
    _sync(device)
    with profile(activities=acts) as prof:
        run()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    rows = [{"name": e.key, "calls": e.count, "self_us": round(getattr(e, key, 0.0), 1),
             "share": round(getattr(e, key, 0.0) / total, 4)} for e in events[:top]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device.type, "metric": key, "total_us": round(total, 1),
                               "top": rows}, indent=1) + "\n")
    print(f"[bench] profile of one batch: {out}", file=sys.stderr)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="celeba32", choices=["celeba32", "imagenet64", "fmnist", "tiny"])
    p.add_argument("--fmnist-config", default=None,
                   help="JSON file of UNet2DModel kwargs for a random fmnist stand-in (overrides the "
                        "committed model)")
    options.add_device(p)
    options.add_sizes(p, chunks=False)
    p.add_argument("--n-images", type=int, default=None, help="images per run (default: one batch)")
    options.add_steps(p)
    p.add_argument("--families", default="diffpath,diffpathv2")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                   help=f"comma-separated, from {', '.join(ALL_PATHS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per path (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per path first")
    # the fast path's options: unset means "auto" (the device's fast choice), unlike the commands
    p.add_argument("--precision", default=None, choices=["auto", *PRECISIONS],
                   help="fast path precision (auto, the default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--fast-from-params", default=None, metavar="PARAMS_YAML",
                   help="take the fast path's options from this params file's model.{precision, "
                        "channels_last, compile, cuda_graphs} (what the errors stage runs with); "
                        "flags given explicitly override them")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the network on the fast path")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="compile with mode='reduce-overhead' (CUDA graphs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--patches", default="compile_ssim",
                   help=f"for the fast_patched path, comma-separated from {', '.join(PATCHES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON lines to this .jsonl file")
    p.add_argument("--table", action="store_true",
                   help="also write reports/benchmarks/<device>_<model>.md")
    p.add_argument("--table-dir", default=str(ROOT / "reports" / "benchmarks"))
    p.add_argument("--tag", default="", help="suffix of the table's file name (<device>_<model><tag>.md)")
    p.add_argument("--profile", default=None, metavar="FILE.json",
                   help="after the timed runs, profile one steady-state batch of the fast path with "
                        "torch.profiler and write its top kernels (self device time) to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_compiler()
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    bad = [s for s in paths if s not in ALL_PATHS]
    if bad or not paths:
        raise SystemExit(f"unknown --paths {bad}; choose from {', '.join(ALL_PATHS)}")
    families = tuple(s.strip() for s in args.families.split(",") if s.strip())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA GPU is available")
        torch.cuda.set_device(device)

    fmnist_cfg = json.loads(Path(args.fmnist_config).read_text()) if args.fmnist_config else None
    base, model_note = build_model(args.model, fmnist_cfg)
    params_m = sum(p.numel() for p in base.net.parameters()) / 1e6
    base.to(device)
    eager = base.configure(RunOptions())  # fp32 eager; also what the reference path runs

    # unset flags mean "auto" (the device's fast default) or, with --fast-from-params, the
    # values of params.yaml's model section: RunOptions come from the function the errors stage uses
    run_keys = ("precision", "channels_last", "compile", "cuda_graphs")
    fast_params: dict[str, Any] = {k: "auto" for k in run_keys}
    if args.fast_from_params:
        import yaml

        section = (yaml.safe_load(Path(args.fast_from_params).read_text()) or {}).get("model", {})
        fast_params.update({k: section[k] for k in run_keys if k in section})
    flags = {"precision": args.precision, "channels_last": args.channels_last,
             "compile": args.compile, "cuda_graphs": args.cuda_graphs}
    fast_params.update({k: v for k, v in flags.items() if v is not None})
    fast_opts = run_options_from_params(fast_params, device)
    patch_names = [s.strip() for s in args.patches.split(",") if s.strip()]
    unknown = [s for s in patch_names if s not in PATCHES]
    if unknown:
        raise SystemExit(f"unknown --patches {unknown}; choose from {', '.join(PATCHES)}")
    patched = Patched(patch_names)
    needs_fast = any(p in ("fast", "unet_only", "fast_patched") for p in paths)
    fast = None
    if needs_fast:
        fast = EpsModel(net=copy.deepcopy(eager.net), schedule=eager.schedule,
                        image_size=eager.image_size, channels=eager.channels,
                        timestep_scale=eager.timestep_scale, kind=eager.kind, spec=eager.spec,
                        settings=eager.settings).configure(fast_opts)

    n_images = args.n_images or args.batch_size
    x0 = synthetic_images(n_images, eager.channels, eager.image_size, seed=args.seed)
    cfg = CacheConfig(families=families, steps=args.steps, batch_size=args.batch_size,
                      chunk_size=max(args.batch_size, n_images), score_error=ScoreErrorConfig(seed=args.seed))
    nfe_per_image = args.steps * len(families)
    batches = [torch.from_numpy(x0[s:s + args.batch_size]).to(device)
               for s in range(0, n_images, args.batch_size)]

    runners: dict[str, Callable[[], dict[str, np.ndarray] | None]] = {
        "reference": lambda: reference_run(eager, x0, cfg),
        "eager": lambda: study_run(eager, x0, cfg),
        "fast": lambda: study_run(fast, x0, cfg),  # type: ignore[arg-type]
        "unet_only": lambda: unet_run(fast, batches, cfg),  # type: ignore[arg-type]
        "unet_eager": lambda: unet_run(eager, batches, cfg),
        "fast_patched": lambda: _with(patched, lambda: study_run(fast, x0, cfg)),  # type: ignore[arg-type]
    }
    exact, quick = asdict(RunOptions()), asdict(fast_opts)
    options = {"reference": exact, "eager": exact, "unet_eager": exact,
               "fast": quick, "unet_only": quick, "fast_patched": quick}

    print(f"[bench] model {args.model} ({params_m:.2f}M params; {model_note}) on {device}, "
          f"{n_images} images, batch {args.batch_size}, {args.steps} steps, families {families}, "
          f"fast options {asdict(fast_opts)}, threads {torch.get_num_threads()}", file=sys.stderr)

    # fp32 eager features: the yardstick of every path (untimed, first)
    baseline = study_run(eager, x0, cfg)
    # a fixed cost of every compute_cache call (hashes the weights for the cache's fingerprint)
    fingerprint_s: float | None = None
    if hasattr(eager, "fingerprint"):
        t0 = time.perf_counter()
        eager.fingerprint()
        fingerprint_s = time.perf_counter() - t0

    warmup_s: dict[str, float] = {}
    outputs: dict[str, dict[str, np.ndarray] | None] = {}
    for p in paths:
        t0 = time.perf_counter()
        for _ in range(max(0, args.warmup)):
            outputs[p] = runners[p]()
        _sync(device)
        warmup_s[p] = time.perf_counter() - t0
        print(f"[bench] warm-up {p}: {warmup_s[p]:.2f} s", file=sys.stderr)

    times: dict[str, list[float]] = {p: [] for p in paths}
    mems: dict[str, list[float]] = {p: [] for p in paths}
    mem_kind = ""
    mem_base_mb = (torch.cuda.memory_allocated(device) / 2**20) if device.type == "cuda" else 0.0
    for r in range(max(1, args.repeats)):
        k = r % len(paths)
        for p in paths[k:] + paths[:k]:
            with PeakMemory(device) as pm:
                _sync(device)
                t0 = time.perf_counter()
                outputs[p] = runners[p]()
                _sync(device)
                dt = time.perf_counter() - t0
            times[p].append(dt)
            mems[p].append(pm.mb)
            mem_kind = pm.kind
            print(f"[bench] repeat {r + 1} {p}: {dt:.3f} s", file=sys.stderr)

    lines = []
    for p in paths:
        med = statistics.median(times[p])
        feats = outputs.get(p)
        by_family: dict[str, float] | None = None
        worst: float | None = None
        if feats is not None:
            by_family = {f: _json_float(max_rel_diff(feats[f], baseline[f])) for f in families}
            worst = _json_float(max(max_rel_diff(feats[f], baseline[f]) for f in families))
        rec = {
            "path": p,
            "model": args.model,
            "device": device.type,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()),
            "batch_size": args.batch_size,
            "n_images": n_images,
            "steps": args.steps,
            "families": list(families),
            "params_m": round(params_m, 3),
            "nfe_per_image": nfe_per_image,
            "nfe_per_s": round(n_images * nfe_per_image / med, 2),
            "img_per_s": round(n_images / med, 3),
            "time_s": round(med, 4),
            "times_s": [round(t, 4) for t in times[p]],
            "warmup_s": round(warmup_s[p], 3),
            "peak_mem_mb": round(max(mems[p]), 1),
            "peak_mem_kind": mem_kind,
            "peak_mem_base_mb": round(mem_base_mb, 1),
            "max_rel_feature_diff": worst,
            "max_rel_feature_diff_by_family": by_family,
            "options": options[p],
            "patches": patch_names if p == "fast_patched" else [],
            "fingerprint_s": (round(fingerprint_s, 4) if fingerprint_s is not None
                              and p in ("eager", "fast", "fast_patched") else None),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        lines.append(rec)
        print(json.dumps(rec), flush=True)

    if args.profile and fast is not None:
        one = CacheConfig(families=families, steps=args.steps, batch_size=args.batch_size,
                          chunk_size=args.batch_size, score_error=ScoreErrorConfig(seed=args.seed))
        profile_batch(lambda: study_run(fast, x0[: args.batch_size], one), device, Path(args.profile))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in lines))
    if args.table:
        write_table(lines, args, model_note, Path(args.table_dir))
    return 0


def write_table(lines: list[dict[str, Any]], args: argparse.Namespace, model_note: str,
                folder: Path) -> Path:
    rec0 = lines[0]
    ref = next((r for r in lines if r["path"] == "reference"), None)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{rec0['device']}_{rec0['model']}{args.tag}.md"
    argv = " ".join(sys.argv[1:])
    rows = [
        f"# errors-stage throughput: `{rec0['model']}` on {rec0['device']} ({rec0['device_name']})",
        "",
        f"`python benchmarks/bench_errors.py {argv}`",
        "",
        f"- model: {model_note}; {rec0['params_m']}M parameters",
        f"- {rec0['n_images']} images, batch {rec0['batch_size']}, {rec0['steps']} steps, families "
        f"{', '.join(rec0['families'])} ({rec0['nfe_per_image']} network evaluations per image)",
        f"- torch {rec0['torch']}, {rec0['threads']} CPU threads; median of "
        f"{len(rec0['times_s'])} interleaved repeats after {args.warmup} warm-up run(s)",
        f"- peak memory: {rec0['peak_mem_kind']} (see `benchmarks/README.md`)",
        "",
        "| path | NFE/s | img/s | × reference | median s | peak MB | max rel. feature diff | options |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in lines:
        speed = f"{r['nfe_per_s'] / ref['nfe_per_s']:.2f}" if ref else "–"
        d = r["max_rel_feature_diff"]
        diff = "–" if d is None else (f"{d:.2e}" if isinstance(d, float) else str(d))
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
        if r.get("patches"):
            opts += "; patches: " + ", ".join(r["patches"])
        rows.append(f"| {r['path']} | {r['nfe_per_s']:.1f} | {r['img_per_s']:.2f} | {speed} | "
                    f"{r['time_s']:.3f} | {r['peak_mem_mb']:.0f} | {diff} | {opts} |")
    rows += ["", "JSON lines:", "", "```json"] + [json.dumps(r) for r in lines] + ["```", ""]
    target.write_text("\n".join(rows))
    print(f"[bench] wrote {target}", file=sys.stderr)
    return target


if __name__ == "__main__":
    sys.exit(main())
