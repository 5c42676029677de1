"""Training the embedded profile's base diffusion model (and small tools to check it).

The embedded profile needs one small DDPM that plays the role CelebA's model plays in the
DiffPathV2 paper: a diffusers ``UNet2DModel`` trained on Fashion-MNIST (28 → 32 zero-padded,
1 channel, in [-1, 1]) with the ε-prediction objective of Ho et al. (2020) and an EMA of its
weights. This module holds that training loop (its evaluation helpers are in
:mod:`diffpath.study.base_model`):

* :func:`train`: AdamW, linear warm-up then cosine (or constant) learning rate, gradient clipping,
  uniform timesteps, MSE on ε, EMA with warm-up; periodic, atomically written, resumable
  checkpoints (an interrupted run continues from its last checkpoint and ends with the same
  weights as an uninterrupted one);
* :func:`save_pipeline`: the EMA network as a diffusers ``DDPMPipeline`` folder (safetensors),
  the format :func:`diffpath.models.load_model` reads;

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
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffpath.core.schedule import NoiseSchedule
from diffpath.io import atomic_path, write_text_atomic

__all__ = [
    "UNetConfig",
    "TrainConfig",
    "TrainResult",
    "build_unet",
    "train_schedule",
    "lr_at",
    "ema_decay_at",
    "train",
    "train_step",
    "train_chain",
    "finished_run",
    "load_checkpoint",
    "save_pipeline",
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
        init: the settings of the run whose EMA weights initialise both the network and its EMA
            (a run that continues an earlier model with a fresh optimiser; :func:`train_chain`
            trains or finds it); ``None``: initialise from ``seed``.
        precision: ``"fp32"``, or ``"bf16"`` autocast of the forward pass.
        channels_last: NHWC convolutions; compile: ``torch.compile`` the training step.
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
    init: TrainConfig | None = None
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            self.unet = UNetConfig(**self.unet)
        if isinstance(self.init, dict):
            self.init = TrainConfig.from_dict(self.init)
        if self.init is not None and self.init.unet != self.unet:
            raise ValueError("init: the continued run must have the same architecture (unet)")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler_config(self) -> dict[str, Any]:
        """The noise schedule as diffusers' ``scheduler_config.json`` keys."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "beta_start": self.beta_start, "beta_end": self.beta_end}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_params(cls, p: Mapping[str, Any], channels: int = 1) -> TrainConfig:
        """From ``params.yaml``'s ``base_model`` section: ``image_size`` and the architecture keys
        (``block_out_channels``, ``layers_per_block``, ``norm_num_groups``, ``add_attention``: one
        down/up block per entry of ``block_out_channels``), every :class:`TrainConfig` field it
        names, and ``init``: a mapping of the continued run's own fields (same architecture)."""
        levels = len(p["block_out_channels"])
        unet = UNetConfig(sample_size=int(p["image_size"]), in_channels=channels, out_channels=channels,
                          block_out_channels=tuple(p["block_out_channels"]),
                          down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
                          layers_per_block=int(p["layers_per_block"]), norm_num_groups=int(p["norm_num_groups"]),
                          add_attention=bool(p["add_attention"]))
        own = {f.name for f in fields(cls)} - {"unet", "init"}
        init = p.get("init")
        if init is not None:
            arch = {k: p[k] for k in ("image_size", "block_out_channels", "layers_per_block",
                                      "norm_num_groups", "add_attention")}
            init = cls.from_params({**arch, **init}, channels)
        return cls(unet=unet, init=init, **{k: v for k, v in p.items() if k in own})

    def identity(self) -> dict[str, Any]:
        """The settings that must match for a checkpoint to be resumed (not the intervals or
        thread count; the new options only when they differ from their defaults, so checkpoints
        written before them still resume)."""
        d = self.to_dict()
        for k in ("log_every", "checkpoint_every", "num_threads"):
            d.pop(k)
        for k, default in (("init", None), ("precision", "fp32"), ("channels_last", False),
                           ("compile", False)):
            if d[k] == default:
                d.pop(k)
        if self.init is not None:
            d["init"] = self.init.identity()
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
    """The float64 noise schedule named by ``cfg``: the one the model loader reads back from the
    saved ``scheduler_config.json``."""
    return NoiseSchedule.from_diffusers_config(cfg.scheduler_config())


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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0].keys()))
        w.writeheader()
        w.writerows(history)


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class _RunState:
    """Everything a checkpoint holds: the networks, the optimiser, the random source and where
    the run is in its shuffled epoch."""

    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    perm: torch.Tensor
    pos: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def checkpoint(self, cfg: TrainConfig, n: int) -> dict[str, Any]:
        return {"config": cfg.identity(), "num_images": n, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "perm": self.perm, "pos": self.pos,
                "step": self.step, "history": self.history}


def _fresh_state(cfg: TrainConfig, n: int, init_weights: str | Path | None = None) -> _RunState:
    """Networks initialised from ``cfg.seed`` (or from the pipeline folder ``init_weights``), an
    AdamW optimiser and the run's one random generator, which draws the first epoch's order."""
    model = build_unet(cfg)
    if init_weights is not None:
        model.load_state_dict(_init_weights(init_weights))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(cfg, 0), betas=(0.9, 0.999),
                            weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    return _RunState(model=model, ema=ema, opt=opt, gen=gen, perm=torch.randperm(n, generator=gen))


def _init_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The UNet weights of a saved pipeline folder (``unet/diffusion_pytorch_model.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise ValueError(f"init_weights: {path} not found (a pipeline folder written by save_pipeline)")
    return load_file(str(path))


def _resume(state: _RunState, ckpt_path: Path, cfg: TrainConfig, n: int) -> None:
    """Load a checkpoint into ``state``, refusing one written by another configuration."""
    saved = load_checkpoint(ckpt_path)
    if not cfg.can_resume(saved["config"]):
        raise ValueError(f"{ckpt_path}: checkpoint was written by a different TrainConfig; "
                         "pass resume=False (or another checkpoint_dir) to start afresh")
    if int(saved["num_images"]) != n:
        raise ValueError(f"{ckpt_path}: checkpoint was trained on {saved['num_images']} images, got {n}")
    if int(saved["step"]) > cfg.steps:
        raise ValueError(f"{ckpt_path}: checkpoint is at step {saved['step']}, beyond steps={cfg.steps}")
    state.model.load_state_dict(saved["model"])
    state.ema.load_state_dict(saved["ema"])
    state.opt.load_state_dict(saved["optimizer"])
    state.gen.set_state(saved["generator"])
    state.perm, state.pos, state.step = saved["perm"], int(saved["pos"]), int(saved["step"])
    state.history = [dict(r) for r in saved["history"]]


def _next_batch(state: _RunState, x_all: torch.Tensor, cfg: TrainConfig,
                schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next ``(x_t, t, ε)``: a slice of the shuffled epoch (reshuffled when exhausted),
    uniform timesteps and Gaussian noise, drawn in this fixed order from the run's generator."""
    n, bs = x_all.shape[0], cfg.batch_size
    if state.pos + bs > n:
        state.perm = torch.randperm(n, generator=state.gen)
        state.pos = 0
    idx = state.perm[state.pos : state.pos + bs] if bs <= n else torch.randint(0, n, (bs,), generator=state.gen)
    state.pos += min(bs, n)
    x0 = x_all[idx]
    t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=state.gen)
    eps = torch.randn(x0.shape, generator=state.gen)
    return schedule.q_sample(x0, t, eps), t, eps


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x_t: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor, *, lr: float, grad_clip: float = 0.0, precision: str = "fp32",
               channels_last: bool = False, forward: Callable[..., Any] | None = None) -> torch.Tensor:
    """One optimiser step on the ε-MSE of a batch; returns the (detached) loss.

    ``precision="bf16"`` runs the forward pass under bfloat16 autocast (weights, gradients and
    the optimiser stay float32); ``channels_last`` hands x_t to the network in NHWC;
    ``forward`` replaces ``model``'s own call (a ``torch.compile`` of it)."""
    for g in opt.param_groups:
        g["lr"] = lr
    if channels_last:
        x_t = x_t.contiguous(memory_format=torch.channels_last)
    with _autocast(precision, x_t.device):
        pred = (forward if forward is not None else model)(x_t, t).sample
    loss = torch.nn.functional.mse_loss(pred.float(), eps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach()


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _start_state(cfg: TrainConfig, n: int, ckpt_path: Path | None, init_weights: str | Path | None,
                 progress: bool) -> _RunState:
    """A fresh run, or the checkpoint at ``ckpt_path`` when there is one (``None``: start afresh)."""
    resuming = ckpt_path is not None and ckpt_path.is_file()
    if cfg.init is not None and not resuming and init_weights is None:
        raise ValueError("this run continues another (cfg.init): pass init_weights, the folder of "
                         "that run's model (train_chain finds or trains it)")
    state = _fresh_state(cfg, n, None if resuming else init_weights)
    if resuming:
        assert ckpt_path is not None
        _resume(state, ckpt_path, cfg, n)
        if progress:
            print(f"resumed from {ckpt_path} at step {state.step}", flush=True)
    return state


def _write_config(out: Path, cfg: TrainConfig, step: int, n: int) -> None:
    info = {**cfg.to_dict(), "steps_completed": step, "num_images": n}
    write_text_atomic(out / "train_config.json", json.dumps(info, indent=2) + "\n")


def _save_checkpoint(state: _RunState, cfg: TrainConfig, n: int, out: Path, ckpt_path: Path) -> None:
    """The resumable checkpoint (atomically), then the log and the config beside the run."""
    with atomic_path(ckpt_path) as tmp:
        torch.save(state.checkpoint(cfg, n), tmp)
    _write_log(out / LOG_NAME, state.history)
    _write_config(out, cfg, state.step, n)


def _log(state: _RunState, cfg: TrainConfig, lr: float, losses: list[float], decay: float,
         seconds: float, device: str, progress: bool) -> None:
    row = {"step": state.step, "lr": lr, "loss": sum(losses) / len(losses), "ema_decay": decay,
           "sec_per_step": seconds / len(losses), "device": device}
    state.history.append(row)
    if progress:
        print(f"step {state.step:6d}/{cfg.steps}  loss {row['loss']:.4f}  lr {lr:.2e}  "
              f"{row['sec_per_step']:.3f} s/step", flush=True)


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
    init_weights: str | Path | None = None,
) -> TrainResult:
    """Train a DDPM ε-model on ``images`` with the settings of ``cfg``.

    Args:
        cfg: the run's settings.
        images: ``(N, C, S, S)`` float in [-1, 1] (:func:`diffpath.data.to_model_input`).
        out_dir: run folder; gets ``train_log.csv`` (step, lr, loss averaged over the last
            ``log_every`` steps, EMA decay, seconds per step, device) and ``train_config.json``.
        resume: continue from ``checkpoint_dir/checkpoint.pt`` if it exists (its settings must
            match ``cfg``); ``False`` starts afresh and overwrites it.
        progress: print a line every ``log_every`` steps.
        checkpoint_dir: where the resumable checkpoint lives (default ``out_dir/checkpoints``);
            written every ``checkpoint_every`` steps and at the end, atomically (tmp + rename).
        stop_at: stop after this many steps in all (a checkpoint is written there) without
            changing the schedule: used to test that resuming reproduces an uninterrupted run.
        max_seconds: stop at the first checkpoint written after this many seconds of this call;
            ``TrainResult.step`` says where it stopped and a later call resumes from there.
        callback: ``callback(step, ema_model)`` after each checkpoint (e.g. a sample grid).
        init_weights: with ``cfg.init``, the pipeline folder of the continued run's model (read
            when the run starts, not when it resumes).

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
    state = _start_state(cfg, n, ckpt_path if resume else None, init_weights, progress)
    _write_config(out, cfg, state.step, n)
    forward = torch.compile(state.model) if cfg.compile else None
    end = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    state.model.train()
    t_start = t0 = time.perf_counter()
    losses: list[float] = []
    while state.step < end:
        x_t, t, eps = _next_batch(state, x_all, cfg, schedule)
        lr = lr_at(cfg, state.step)
        loss = train_step(state.model, state.opt, x_t, t, eps, lr=lr, grad_clip=cfg.grad_clip,
                          precision=cfg.precision, channels_last=cfg.channels_last, forward=forward)
        decay = ema_decay_at(cfg, state.step)
        _ema_update(state.ema, state.model, decay)
        state.step += 1
        losses.append(float(loss))
        if state.step % cfg.log_every == 0 or state.step == end:
            _log(state, cfg, lr, losses, decay, time.perf_counter() - t0, str(x_t.device), progress)
            losses, t0 = [], time.perf_counter()
        if state.step % cfg.checkpoint_every == 0 or state.step == end:
            _save_checkpoint(state, cfg, n, out, ckpt_path)
            if callback is not None:
                callback(state.step, state.ema)
            if max_seconds is not None and time.perf_counter() - t_start > max_seconds:
                if progress and state.step < end:
                    print(f"time budget of {max_seconds:.0f} s spent: stopping at step {state.step}", flush=True)
                break

    state.model.eval()
    state.ema.eval()
    return TrainResult(model=state.model, ema_model=state.ema, history=state.history, step=state.step)


def finished_run(folder: str | Path, cfg: TrainConfig) -> bool:
    """Whether ``folder`` holds the finished model of the run ``cfg`` (a pipeline folder whose
    ``train_config.json`` has ``cfg``'s settings and all its steps)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "train_config.json").read_text())
    except (OSError, ValueError):
        return False
    done = TrainConfig.from_dict(info)
    return ((folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
            and done.identity() == cfg.identity() and int(info.get("steps_completed", -1)) == cfg.steps)


def train_chain(cfg: TrainConfig, images: np.ndarray | torch.Tensor, out_dir: str | Path, *,
                checkpoint_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
                max_seconds: float | None = None) -> TrainResult:
    """:func:`train` ``cfg``, first training the run it continues (``cfg.init``, recursively).

    The continued run's model lives in ``checkpoint_dir/init/`` (a pipeline folder with its
    ``train_config.json`` and log, and its own ``checkpoints/``); a finished one with the same
    settings is reused, so only the last run trains when the chain was trained before."""
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(out_dir) / "checkpoints"
    init_dir = None
    if cfg.init is not None:
        init_dir = ckpt_dir / "init"
        if not finished_run(init_dir, cfg.init):
            first = train_chain(cfg.init, images, init_dir, checkpoint_dir=init_dir / "checkpoints",
                                resume=resume, progress=progress, max_seconds=max_seconds)
            if first.step < cfg.init.steps:  # the time budget ran out in the continued run
                return first
            save_pipeline(first.ema_model, init_dir, **cfg.init.scheduler_config())
    return train(cfg, images, out_dir, resume, progress, checkpoint_dir=ckpt_dir,
                 max_seconds=max_seconds, init_weights=init_dir)


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
