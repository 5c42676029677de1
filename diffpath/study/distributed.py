"""The errors stage past one GPU: :func:`~diffpath.cache.compute_cache` sharded under torchrun.

Run it as::

    torchrun --nproc_per_node N -m diffpath.study.distributed --model SPEC --x0 FILE.npy --out CACHE.npz \\
        [--families diffpath,diffpathv2] [--steps 10] [--batch-size 128] [--chunk-size 1024] \\
        [--backend auto|nccl|gloo] [--device auto|cpu|cuda] [--precision auto|fp32|tf32|bf16] \\
        [--channels-last] [--compile] [--cuda-graphs] [--work-dir DIR]

The model and run options, and their defaults, are those of every ``diffpath`` command
(:mod:`diffpath.cli.options`); on a large GPU give a larger ``--batch-size``.

Every rank loads the model on its own device (``cuda:LOCAL_RANK`` on GPUs), computes the chunks
``rank, rank + N, rank + 2N, ...`` of the images and writes each finished chunk to ``CACHE.npz.parts/``
(or ``--work-dir``);
after a barrier rank 0 merges the parts into ``CACHE.npz`` (written atomically) and removes the
parts. The cache equals a single-process run's: chunks are cut at the same image indices and
batches at the same offsets inside them, each image's numbers depend only on its batch and, for
DiffPathV2, on its content-keyed noise (bit for bit on the CPU, see ``tests/test_distributed.py``;
on GPUs up to the run-to-run nondeterminism of their kernels). A killed run resumes from the chunks
already on disk, with any number of processes. Without torchrun's environment (``WORLD_SIZE``
unset) it runs as one process.

Run options (precision, channels_last, compile, CUDA graphs) are resolved per device by
:mod:`diffpath.models.options`, as in the errors stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpath.cache import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_STEPS,
    FAMILIES,
    CacheConfig,
    compute_cache,
)
from diffpath.cli import options as cli_options
from diffpath.methods.diffpathv2 import ScoreErrorConfig
from diffpath.models import RunOptions, load_model
from diffpath.models.options import run_options_from_params

__all__ = [
    "DistEnv",
    "dist_env",
    "load_x0",
    "run_sharded",
    "main",
]

# --------------------------------------------------------------------------------------------
# torchrun environment


@dataclass
class DistEnv:
    """Where this process sits: ``rank``, ``world_size``, ``local_rank``, its ``device``, the
    ``backend`` and whether this module initialised the process group (and must destroy it)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = field(default=False, repr=False)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size <= 1 or not dist.is_initialized():
            return
        if self.backend == "nccl" and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def dist_env(backend: str = "auto", device: str = "auto", timeout_min: float = 120.0) -> DistEnv:
    """Initialise ``torch.distributed`` from torchrun's variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or describe a single process without them.

    ``device="auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. ``backend="auto"``:
    ``nccl`` for CUDA devices, ``gloo`` for the CPU. An already initialised group is reused (and
    left alone at the end).
    """
    import torch.distributed as dist

    if backend not in ("auto", "nccl", "gloo"):
        raise ValueError(f"backend must be auto, nccl or gloo, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = torch.device(device).type
    if dev_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
        n_gpu = torch.cuda.device_count()
        if device not in ("auto", "cuda") and torch.device(device).index is not None and world == 1:
            dev = torch.device(device)
        else:
            if local_rank >= n_gpu:
                raise RuntimeError(f"LOCAL_RANK {local_rank} but only {n_gpu} CUDA device(s) are visible")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if be == "nccl" and dev.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices; use gloo on the CPU")
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None, owns_group=False)
    if dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(),
                       owns_group=False)
    kwargs: dict[str, Any] = {"backend": be, "timeout": timedelta(minutes=timeout_min)}
    if be == "nccl":
        kwargs["device_id"] = dev
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # torch without device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, be, owns_group=True)


# --------------------------------------------------------------------------------------------
# the sharded run


def load_x0(path: str | Path, channels: int, size: int) -> np.ndarray:
    """Model inputs from ``.npy`` (float (N, C, H, W) in [-1, 1]; memory-mapped, so each rank reads
    only its chunks) or ``.npz``
    (``x0`` or uint8 ``images``, see :func:`diffpath.data.arrays.load_images_npz`)."""
    from diffpath.data.arrays import load_images_npz
    from diffpath.io import InputError

    path = Path(path)
    if path.suffix == ".npz":
        return load_images_npz(path, channels=channels, size=size)
    if path.suffix != ".npy":
        raise InputError(f"{path}: expected a .npy or .npz file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    x = np.load(path, mmap_mode="c")  # copy-on-write: torch wants writable arrays; the file is never changed
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{path}: x0 must be a float array, got {x.dtype}")
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2:] != (size, size):
        raise InputError(f"{path}: x0 has shape {x.shape}; the model wants (N, {channels}, {size}, {size})")
    return x


def run_sharded(
    model: str | Path,
    x0: np.ndarray | str | Path,
    out: str | Path,
    *,
    families: Sequence[str] = FAMILIES,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
    noise_key: str = "content",
    clip_denoised: bool = True,
    n_maps: int = 0,
    run_options: RunOptions | Mapping[str, Any] | None = None,
    backend: str = "auto",
    device: str = "auto",
    data_key: str = "",
    progress: bool = True,
    timeout_min: float = 120.0,
    work_dir: str | Path | None = None,
    cache_config: CacheConfig | None = None,
    keep_finished: bool = False,
) -> dict[str, np.ndarray] | None:
    """Compute the error cache of ``x0`` into ``out``, sharded over the torchrun processes.

    Args:
        model: a model spec for :func:`diffpath.models.load_model` (loaded on every rank).
        x0: (N, C, H, W) float32 images in [-1, 1], or a ``.npy`` / ``.npz`` file holding them.
        out: the cache ``.npz`` (rank 0 writes it; chunk parts go to ``out + ".parts/"``).
        families, steps, batch_size, chunk_size, seed, noise_key, clip_denoised, n_maps: the
            :class:`~diffpath.cache.CacheConfig`.
        run_options: :class:`RunOptions`, or a params mapping for :func:`run_options_from_params`.
        backend, device: see :func:`dist_env`.
        data_key: identifies the input (a resumed run must match it).
        work_dir: where the chunk parts go (default ``out + ".parts"``); must be a folder every
            rank can see (a shared file system across nodes).
        cache_config: the whole :class:`CacheConfig` (overrides the separate settings above).
        keep_finished: keep the merged cache in ``work_dir`` (see :func:`compute_cache`).

    Returns:
        The merged cache on rank 0, ``None`` on the other ranks. The process group is destroyed at
        the end if this call created it.
    """
    env = dist_env(backend=backend, device=device, timeout_min=timeout_min)
    try:
        if isinstance(run_options, RunOptions):
            opts = run_options
        else:
            opts = run_options_from_params(run_options, env.device)
        m = load_model(model, device=env.device, options=opts)
        if not isinstance(x0, np.ndarray):
            x0 = load_x0(x0, channels=m.channels, size=m.image_size)
        cfg = cache_config or CacheConfig(
            families=tuple(families), steps=steps, batch_size=batch_size, chunk_size=chunk_size,
            clip_denoised=clip_denoised, n_maps=n_maps, score_error=ScoreErrorConfig(seed=seed, noise_key=noise_key))
        kwargs: dict[str, Any] = {}
        if work_dir is not None:
            kwargs["work_dir"] = work_dir
        return compute_cache(m, x0, cfg, out=out, data_key=data_key, progress=progress,
                             rank=env.rank, world_size=env.world_size, keep_finished=keep_finished,
                             barrier=env.barrier if env.world_size > 1 else None, **kwargs)
    finally:
        env.close()


def _run_stage_shards(dataset: str, split: str, *, params_file: str | Path, backend: str, progress: bool,
                      timeout_min: float) -> dict[str, np.ndarray] | None:
    """The errors stage's pass over one (data set, split), sharded: the same model, run options,
    settings, input and data key as the stage's notebook, into the stage's own work area with the
    finished cache kept there, so that ``dvc repro errors@DATASET`` copies it instead of
    recomputing (and records it in ``dvc.lock``)."""
    from diffpath.data import checksum
    from diffpath.study.layout import Layout, read_prepared_x0
    from diffpath.study.params_check import check_stage_params
    from diffpath.study.stages import load_params

    params = load_params(params_file)
    check_stage_params("errors", params, dataset)
    layout = Layout.of(params)
    model = params["model"]
    errors = dict(params["errors"])
    x0 = read_prepared_x0(layout.prepared(dataset, split))
    run = {k: model[k] for k in ("precision", "channels_last", "compile", "cuda_graphs") if k in model}
    cache = run_sharded(model["spec"], x0, layout.errors(dataset, split), run_options=run, backend=backend,
                        device=str(model.get("device", "auto")), data_key=checksum(x0), progress=progress,
                        timeout_min=timeout_min, work_dir=layout.work("errors", dataset, split),
                        cache_config=CacheConfig.from_params(**errors), keep_finished=True)
    if cache is not None:
        cache["__out__"] = str(layout.errors(dataset, split))
    return cache


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffpath.study.distributed",
        description="Compute the error cache, sharded over torchrun processes "
                    "(torchrun --nproc_per_node N -m diffpath.study.distributed ...).",
    )
    p.add_argument("--stage", nargs=2, metavar=("DATASET", "SPLIT"),
                   help="compute the errors stage's cache of DATASET/SPLIT exactly as `dvc repro` would "
                        "(model, settings and paths from --params); the stage then reuses it")
    p.add_argument("--params", default="params.yaml", help="with --stage: the parameters file")
    cli_options.add_model(p, required=False)
    p.add_argument("--x0", help=".npy (float N×C×H×W in [-1, 1]) or .npz (x0 / images)")
    p.add_argument("--out", help="the cache .npz")
    p.add_argument("--families", default=",".join(FAMILIES), help="diffpath,diffpathv2 (default both)")
    cli_options.add_steps(p)
    p.add_argument("--seed", type=int, default=0, help="seed of DiffPathV2's noise")
    p.add_argument("--noise-key", default="content", choices=["content", "index"])
    p.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    p.add_argument("--n-maps", type=int, default=0, help="keep per-pixel maps of this many images")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    cli_options.add_run(p)
    p.add_argument("--data-key", default="", help="identifies the input for resuming")
    p.add_argument("--work-dir", default=None, help="where chunk parts go (default OUT.parts)")
    p.add_argument("--timeout-min", type=float, default=120.0, help="process-group timeout (minutes)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffpath.io import InputError
    from diffpath.models import ModelLoadError

    try:
        run = cli_options.pass_options(args)
        if args.stage:
            cache = _run_stage_shards(*args.stage, params_file=args.params, backend=args.backend,
                                      progress=run.progress, timeout_min=args.timeout_min)
            args.out = cache.pop("__out__") if cache is not None else None
        elif not (args.model and args.x0 and args.out):
            raise ValueError("give --stage DATASET SPLIT, or all of --model, --x0 and --out")
        else:
            cfg = cli_options.cache_config(
                args, families=[f.strip() for f in args.families.split(",") if f.strip()],
                clip_denoised=not args.no_clip, n_maps=args.n_maps,
                score_error=ScoreErrorConfig(seed=args.seed, noise_key=args.noise_key))
            cache = run_sharded(args.model, args.x0, args.out, cache_config=cfg,
                                run_options=run.network_params(), backend=args.backend,
                                device=run.device, data_key=args.data_key, progress=run.progress,
                                timeout_min=args.timeout_min, work_dir=args.work_dir)
    except (InputError, ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"diffpath.study.distributed: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if cache is not None:
        n = len(cache["index"])
        print(f"diffpath.study.distributed: wrote {args.out} ({n} images, "
              f"{int(os.environ.get('WORLD_SIZE', '1'))} process(es))", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
