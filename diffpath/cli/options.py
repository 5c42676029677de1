"""The model and run options every command line shares, with one default each.

``diffpath features|fit|score|localize``, ``python -m diffpath.study.distributed`` and the
benchmarks add their options here and build :class:`~diffpath.cache.PassOptions` /
:class:`~diffpath.cache.CacheConfig` from them; those objects validate the values (steps, sizes,
precision), so every command refuses the same bad value with the same ``ValueError``.

Defaults (from :mod:`diffpath.cache.config`): batch 128 and chunk 1024 (what ``diffpath fit``/
``score`` always used: a batch that fits a 2-core CPU and any GPU, a chunk that loses little work
when interrupted; a large GPU wants ``--batch-size 256`` or more), 10 steps (DiffPath's), exact
fp32 with no ``channels_last``/``compile`` (the numbers the study's tables were made with;
``--precision auto`` picks the device's fast precision).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from diffpath.cache.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_STEPS,
    CacheConfig,
    PassOptions,
)
from diffpath.models import PRECISIONS

__all__ = [
    "MODEL_HELP",
    "add_device",
    "add_model",
    "add_network",
    "add_run",
    "add_sizes",
    "add_steps",
    "cache_config",
    "pass_options",
]

MODEL_HELP = ("diffusers folder, improved-diffusion .pt (settings .json/.yaml beside it), hub id, or "
              "zoo name (diffpath-celeba32)")


def add_model(p: argparse.ArgumentParser, *, required: bool = True, help: str = MODEL_HELP) -> None:
    p.add_argument("--model", required=required, default=None, help=help)


def add_steps(p: argparse.ArgumentParser, *, help: str = "DDIM steps / score-error timesteps") -> None:
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"{help} ({DEFAULT_STEPS})")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N")


def add_network(p: argparse.ArgumentParser) -> None:
    """``--precision``, ``--channels-last``, ``--compile``, ``--cuda-graphs``."""
    p.add_argument("--precision", default="fp32", choices=["auto", *PRECISIONS],
                   help="fp32 (default, exact), tf32, bf16, or auto (bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--channels-last", action="store_true", help="run convolutions in NHWC memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (CUDA only)")


def add_sizes(p: argparse.ArgumentParser, *, chunks: bool = True) -> None:
    """``--batch-size`` and (with ``chunks``) ``--chunk-size``."""
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per model call ({DEFAULT_BATCH_SIZE})")
    if chunks:
        p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                       help=f"images per resumable chunk ({DEFAULT_CHUNK_SIZE})")


def add_run(p: argparse.ArgumentParser, *, chunks: bool = True) -> None:
    """Every option of how a model pass runs: device, network options, sizes, ``--no-progress``."""
    add_device(p)
    add_network(p)
    add_sizes(p, chunks=chunks)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def pass_options(args: argparse.Namespace, *, work_dir: str | os.PathLike | None = None) -> PassOptions:
    """The :class:`PassOptions` of parsed arguments (options a command lacks keep their default);
    ``ValueError`` on a bad value."""
    given = {k: getattr(args, k) for k in ("device", "precision", "channels_last", "compile",
                                           "cuda_graphs", "batch_size", "chunk_size")
             if getattr(args, k, None) is not None}
    return PassOptions(**given, work_dir=work_dir, progress=not getattr(args, "no_progress", False))


def cache_config(args: argparse.Namespace, **settings: Any) -> CacheConfig:
    """A :class:`CacheConfig` of ``settings`` (families, clip_denoised, ...) with the arguments'
    ``--steps``, ``--batch-size`` and ``--chunk-size`` (``settings`` win); ``ValueError`` on a bad
    value."""
    given = {k: getattr(args, k) for k in ("steps", "batch_size", "chunk_size") if hasattr(args, k)}
    return CacheConfig(**{**given, **settings})
