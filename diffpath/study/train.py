"""Training the embedded profile's base diffusion model (and small tools to check it).

The embedded profile needs one small DDPM that plays the role CelebA's model plays in the
DiffPathV2 paper: a diffusers ``UNet2DModel`` trained on Fashion-MNIST (28 → 32 zero-padded,
1 channel, in [-1, 1]) with the ε-prediction objective of Ho et al. (2020) and an EMA of its
weights. This module holds that training loop and two evaluation helpers:

* :func:`train`: AdamW, linear warm-up then cosine (or constant) learning rate, gradient clipping,
  uniform timesteps, MSE on ε, EMA with warm-up; periodic, atomically written, resumable
  checkpoints (an interrupted run continues from its last checkpoint and ends with the same
  weights as an uninterrupted one);
* :func:`save_pipeline`: the EMA network as a diffusers ``DDPMPipeline`` folder (safetensors),
  the format :func:`diffpath.models.load_model` reads;
* :func:`denoising_loss_per_timestep`: held-out ε-MSE per timestep with fixed noise;
* :func:`ddim_sample`: a short deterministic DDIM sampler (η = 0).

Shapes: images are ``(N, C, S, S)`` float32 in [-1, 1] (what :func:`diffpath.data.to_model_input`
returns); timesteps are int64 in ``0 .. T-1``; ε-models follow :class:`diffpath.models.EpsFn`.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffpath.core.schedule import NoiseSchedule, alphas_cumprod_of

__all__ = [
    "UNetConfig",
    "TrainConfig",
    "TrainResult",
    "build_unet",
    "train_schedule",
    "lr_at",
    "ema_decay_at",
    "train",
    "load_checkpoint",
    "save_pipeline",
    "denoising_loss_per_timestep",
    "ddim_sample",
    "untrained_like",
    "image_grid",
]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"


@dataclass
class UNetConfig:
    """The diffusers ``UNet2DModel`` architecture (keyword arguments of its constructor).

    The default is the embedded profile's base model: four resolutions 32/16/8/4 with
    16/24/32/64 channels, one ResNet block per level (two on the way up, diffusers' rule),
    self-attention only in the 4×4 mid block, GroupNorm with 8 groups: about 0.7 M parameters and
    56 M multiply-adds per 32×32 image, sized so that a 2-core CPU evaluates it several hundred
    times a second.
    """

    sample_size: int = 32
    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: tuple[int, ...] = (16, 24, 32, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpBlock2D",) * 4
    layers_per_block: int = 1
    norm_num_groups: int = 8
    add_attention: bool = True  # self-attention in the mid block (lowest resolution)
    attention_head_dim: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down/up block types need one entry per block_out_channels entry")

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig:
    """Everything that decides a training run (its checkpoint refuses to resume a different one).

    Attributes:
        unet: the network architecture.
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM noise schedule
            (diffusers ``DDPMScheduler`` names; ``"linear"`` is Ho et al.'s 1e-4 → 0.02).
        batch_size: images per step (sampled with replacement-free shuffled epochs).
        lr: peak AdamW learning rate, reached after ``warmup_steps`` of linear warm-up.
        lr_schedule: ``"cosine"`` (decay to ``min_lr_ratio · lr`` at ``steps``) or ``"constant"``.
        weight_decay, grad_clip: AdamW weight decay; max global gradient norm (0 disables).
        steps: optimiser steps in all.
        ema_decay: EMA decay; with ``ema_warmup`` the decay at step k is
            ``min(ema_decay, (1 + k) / (10 + k))`` so that early averages are not stuck at init.
        seed: seeds initialisation, batch order, timesteps and noise.
        log_every, checkpoint_every: intervals in steps (loss log line; resumable checkpoint).
        num_threads: torch CPU threads (``None`` leaves torch's setting alone).
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps: int = 5000
    ema_decay: float = 0.999
    ema_warmup: bool = True
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be resumed (not the intervals or
        thread count, which do not change the result)."""
        d = self.to_dict()
        for k in ("log_every", "checkpoint_every", "num_threads"):
            d.pop(k)
        return json.loads(json.dumps(d))  # tuples → lists, as stored

    def can_resume(self, stored: dict[str, Any]) -> bool:
        """Whether a checkpoint written under settings ``stored`` (its :meth:`identity`) continues
        this run. With a constant learning rate the planned length does not shape the trajectory,
        so ``steps`` may differ (a run can be extended, or cut to where it stopped)."""
        mine, theirs = self.identity(), dict(stored)
        if self.lr_schedule == "constant" and theirs.get("lr_schedule") == "constant":
            mine.pop("steps", None)
            theirs.pop("steps", None)
        return mine == theirs


@dataclass
class TrainResult:
    """What :func:`train` returns: the raw and EMA networks, the loss log and the step reached."""

    model: nn.Module
    ema_model: nn.Module
    history: list[dict[str, float]]
    step: int


# --------------------------------------------------------------------------------------------
# pieces


def build_unet(cfg: TrainConfig | UNetConfig, seed: int | None = None) -> nn.Module:
    """A freshly initialised diffusers ``UNet2DModel`` of the given architecture.

    With ``seed`` (default: ``cfg.seed`` for a :class:`TrainConfig`), initialisation is
    reproducible and leaves the global RNG state untouched.
    """
    from diffusers import UNet2DModel

    ucfg = cfg.unet if isinstance(cfg, TrainConfig) else cfg
    if seed is None and isinstance(cfg, TrainConfig):
        seed = cfg.seed
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return UNet2DModel(**ucfg.kwargs())


def train_schedule(cfg: TrainConfig) -> NoiseSchedule:
    """The float64 noise schedule named by ``cfg`` (the same rule the model loader applies to the
    saved ``scheduler_config.json``)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        betas = np.linspace(cfg.beta_start, cfg.beta_end, T, dtype=np.float64)
        return NoiseSchedule(betas, name="linear")
    if cfg.beta_schedule == "squaredcos_cap_v2":
        return NoiseSchedule.named("cosine", T)
    raise ValueError(f"unsupported beta_schedule {cfg.beta_schedule!r}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine/constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    u = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * u))


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA decay applied after optimiser step ``step`` (0-based)."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _as_images(images: np.ndarray | torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.dtype == torch.uint8:
        raise TypeError("train() takes model inputs in [-1, 1]; use diffpath.data.to_model_input")
    x = x.to(torch.float32).contiguous()
    c, s = cfg.unet.in_channels, cfg.unet.sample_size
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
        raise ValueError(f"images must be (N, {c}, {s}, {s}), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("no training images")
    if float(x.min()) < -1.0001 or float(x.max()) > 1.0001:
        raise ValueError("images must lie in [-1, 1]")
    return x


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`train` (a plain dict of tensors and lists)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    keys = list(history[0].keys())
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: TrainConfig,
    images: np.ndarray | torch.Tensor,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    *,
    checkpoint_dir: str | Path | None = None,
    stop_at: int | None = None,
    max_seconds: float | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train a DDPM ε-model on ``images`` with the settings of ``cfg``.

    Args:
        cfg: the run's settings.
        images: ``(N, C, S, S)`` float in [-1, 1] (:func:`diffpath.data.to_model_input`).
        out_dir: run folder; gets ``train_log.csv`` (step, lr, loss averaged over the last
            ``log_every`` steps, EMA decay, seconds) and ``train_config.json``.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists (its settings must
            match ``cfg``); ``False`` starts afresh and overwrites it.
        progress: print a line every ``log_every`` steps.
        checkpoint_dir: where the resumable checkpoint lives (default ``out_dir/checkpoints``);
            written every ``checkpoint_every`` steps and at the end, atomically (tmp + rename).
        stop_at: stop after this many steps in all (a checkpoint is written there) without
            changing the schedule: used to test that resuming reproduces an uninterrupted run.
        max_seconds: stop at the first checkpoint written after this many seconds of this call
            (a wall-clock budget on a shared machine); ``TrainResult.step`` says where it stopped
            and a later call resumes from there. With ``lr_schedule="constant"`` the weights
            reached at step k do not depend on ``cfg.steps``, so ``steps=k`` reproduces them.
        callback: ``callback(step, ema_model)`` after each checkpoint (e.g. a sample grid).

    Returns:
        :class:`TrainResult` with the network, its EMA copy (the one to ship), the log and the
        step reached.

    Every random draw (batch order, timesteps, noise) comes from one ``torch.Generator`` whose
    state is checkpointed, and each step's draws happen in a fixed order, so a resumed run ends
    with the same weights as an uninterrupted one (same thread count and torch build).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / CHECKPOINT_NAME
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))

    x_all = _as_images(images, cfg)
    n = x_all.shape[0]
    schedule = train_schedule(cfg)
    sqrt_ab = torch.from_numpy(np.sqrt(schedule.alphas_cumprod)).to(torch.float32)
    sqrt_1mab = torch.from_numpy(np.sqrt(1.0 - schedule.alphas_cumprod)).to(torch.float32)

    model = build_unet(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr_at(cfg, 0), betas=(0.9, 0.999), weight_decay=cfg.weight_decay
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    history: list[dict[str, float]] = []
    perm = torch.randperm(n, generator=gen)
    pos = 0

    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if not cfg.can_resume(state["config"]):
            raise ValueError(
                f"{ckpt_path}: checkpoint was written by a different TrainConfig; "
                "pass resume=False (or another checkpoint_dir) to start afresh"
            )
        if int(state["num_images"]) != n:
            raise ValueError(f"{ckpt_path}: checkpoint was trained on {state['num_images']} images, got {n}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        perm = state["perm"]
        pos = int(state["pos"])
        step = int(state["step"])
        if step > cfg.steps:
            raise ValueError(f"{ckpt_path}: checkpoint is at step {step}, beyond steps={cfg.steps}")
        history = [dict(r) for r in state["history"]]
        if progress:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)

    def write_config() -> None:
        info = {**cfg.to_dict(), "steps_completed": step, "num_images": n}
        _atomic_write_text(json.dumps(info, indent=2) + "\n", out / "train_config.json")

    write_config()

    def save_checkpoint() -> None:
        _atomic_torch_save(
            {
                "config": cfg.identity(),
                "num_images": n,
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "perm": perm,
                "pos": pos,
                "step": step,
                "history": history,
            },
            ckpt_path,
        )
        _write_log(out / LOG_NAME, history)
        write_config()

    end = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    model.train()
    t_start = time.perf_counter()
    run_loss, run_count, t0 = 0.0, 0, time.perf_counter()
    bs = cfg.batch_size
    while step < end:
        # batch: next slice of a shuffled epoch (reshuffle when exhausted)
        if pos + bs > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        idx = perm[pos : pos + bs] if bs <= n else torch.randint(0, n, (bs,), generator=gen)
        pos += min(bs, n)
        x0 = x_all[idx]
        t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * eps

        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        pred = model(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = ema_decay_at(cfg, step)
        _ema_update(ema, model, decay)
        step += 1

        run_loss += float(loss.detach())
        run_count += 1
        if step % cfg.log_every == 0 or step == end:
            dt = time.perf_counter() - t0
            row = {
                "step": step,
                "lr": lr,
                "loss": run_loss / run_count,
                "ema_decay": decay,
                "sec_per_step": dt / run_count,
            }
            history.append(row)
            if progress:
                print(
                    f"step {step:6d}/{cfg.steps}  loss {row['loss']:.4f}  lr {lr:.2e}  "
                    f"{row['sec_per_step']:.3f} s/step",
                    flush=True,
                )
            run_loss, run_count, t0 = 0.0, 0, time.perf_counter()
        if step % cfg.checkpoint_every == 0 or step == end:
            save_checkpoint()
            if callback is not None:
                callback(step, ema)
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                if progress and step < end:
                    print(f"time budget of {max_seconds:.0f} s spent: stopping at step {step}", flush=True)
                break

    model.eval()
    ema.eval()
    return TrainResult(model=model, ema_model=ema, history=history, step=step)


# --------------------------------------------------------------------------------------------
# shipping


def save_pipeline(
    ema_unet: nn.Module,
    out_dir: str | Path,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Path:
    """Write ``DDPMPipeline(unet=ema_unet, scheduler=DDPMScheduler(...))`` to ``out_dir``
    (``model_index.json``, ``unet/`` with safetensors weights, ``scheduler/``); returns the folder.

    Files are written to a temporary sibling folder first and then moved into place, so a reader
    never sees a half-written model.
    """
    from diffusers import DDPMPipeline, DDPMScheduler

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
    )
    pipe = DDPMPipeline(unet=copy.deepcopy(ema_unet).eval().to("cpu"), scheduler=scheduler)
    stage = out / ".saving"
    if stage.exists():
        import shutil

        shutil.rmtree(stage)
    pipe.save_pretrained(str(stage), safe_serialization=True)
    for item in sorted(stage.iterdir()):
        target = out / item.name
        if target.is_dir():
            import shutil

            old = out / f".old_{item.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(item, target)
            shutil.rmtree(old)
        else:
            os.replace(item, target)
    stage.rmdir()
    return out


# --------------------------------------------------------------------------------------------
# evaluation helpers


@torch.no_grad()
def denoising_loss_per_timestep(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: np.ndarray | torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
    *,
    alphas_cumprod: np.ndarray | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Held-out denoising loss ``mean‖ε̂(x_t, t) − ε‖²`` per timestep, with fixed noise.

    Args:
        eps_fn: ``eps_fn(x, t) -> ε̂``; ``x``: (B, C, H, W), ``t``: (B,) int64.
        x0: ``(N, C, H, W)`` clean images in [-1, 1].
        timesteps: the K timesteps to evaluate.
        seed: seeds the noise: timestep k uses the k-th ``(N, C, H, W)`` draw of a generator
            seeded with ``seed``, so two models evaluated with the same seed see the same noise.
        alphas_cumprod: ``(T,)`` ᾱ; default ``eps_fn.schedule.alphas_cumprod``.
        batch_size: images per network call.

    Returns:
        ``(K,)`` float64: the mean squared error per pixel at each timestep (≈ 1 for ε̂ ≡ 0).
    """
    ab = alphas_cumprod_of(eps_fn, alphas_cumprod)
    x = torch.as_tensor(np.asarray(x0) if not isinstance(x0, torch.Tensor) else x0).float().cpu()
    if x.ndim != 4:
        raise ValueError(f"x0 must be (N, C, H, W), got {tuple(x.shape)}")
    device = getattr(eps_fn, "device", torch.device("cpu"))
    gen = torch.Generator().manual_seed(int(seed))
    out = np.zeros(len(timesteps), dtype=np.float64)
    for k, t in enumerate(timesteps):
        t = int(t)
        noise = torch.randn(x.shape, generator=gen)
        a = float(np.sqrt(ab[t]))
        s = float(np.sqrt(1.0 - ab[t]))
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            xb, nb = x[i : i + batch_size], noise[i : i + batch_size]
            xt = (a * xb + s * nb).to(device)
            tt = torch.full((xb.shape[0],), t, dtype=torch.int64, device=device)
            pred = eps_fn(xt, tt).float().cpu()
            total += float(((pred - nb) ** 2).sum(dtype=torch.float64))
        out[k] = total / x.numel()
    return out


@torch.no_grad()
def ddim_sample(
    model: Any,
    n: int,
    steps: int = 50,
    seed: int = 0,
    *,
    clip_denoised: bool = True,
    batch_size: int = 256,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM samples (η = 0) from an ε-model.

    Args:
        model: an :class:`diffpath.models.EpsModel` (needs ``schedule``, ``image_size``,
            ``channels``; called as ``model(x, t)``).
        n: number of samples.
        steps: DDIM steps; the visited timesteps are ``model.schedule.respaced_timesteps(steps)``
            in descending order.
        seed: seeds the initial noise ``x_T ~ N(0, I)``.
        clip_denoised: clip the predicted x̂0 to [-1, 1] at every step.
        batch_size: samples per network call.
        callback: ``callback(i, t, x)`` after step ``i`` (visiting timestep ``t``), ``x`` the
            current batch state: a hook that does not change the loop.

    Returns:
        ``(n, C, S, S)`` float32 in [-1, 1] (CPU).
    """
    sched = model.schedule
    ab = sched.alphas_cumprod
    ts = list(reversed(sched.respaced_timesteps(steps)))
    c, s = int(model.channels), int(model.image_size)
    device = getattr(model, "device", torch.device("cpu"))
    gen = torch.Generator().manual_seed(int(seed))
    x_all = torch.randn((n, c, s, s), generator=gen)
    outs = []
    for i0 in range(0, n, batch_size):
        x = x_all[i0 : i0 + batch_size].to(device)
        for i, t in enumerate(ts):
            a_t = float(ab[t])
            a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=device)
            eps = model(x, tt).float()
            x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
            if callback is not None:
                callback(i, t, x)
        outs.append(x.clamp(-1.0, 1.0).float().cpu())
    return torch.cat(outs, dim=0)


def untrained_like(model: Any, seed: int = 0) -> Any:
    """A freshly initialised network of the same diffusers config as ``model`` (an
    :class:`diffpath.models.EpsModel` loaded from a diffusers folder), wrapped the same way, with
    the same schedule: the "untrained" baseline of the evaluation notebook."""
    from diffusers import UNet2DModel

    from diffpath.models import EpsModel, _DiffusersAdapter

    cfg = model.settings.get("unet") if isinstance(model.settings, dict) else None
    if not cfg:
        raise ValueError("untrained_like needs a model loaded from a diffusers folder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        unet = UNet2DModel.from_config(dict(cfg))
    fresh = EpsModel(
        net=_DiffusersAdapter(unet).eval(),
        schedule=model.schedule,
        image_size=model.image_size,
        channels=model.channels,
        kind=model.kind,
        spec=f"untrained({model.spec}, seed={seed})",
        settings=dict(model.settings),
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
