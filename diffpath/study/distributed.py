"""The errors stage past one GPU: :func:`~diffpath.study.cache.compute_cache` sharded under torchrun.

Run it as::

    torchrun --nproc_per_node N -m diffpath.study.distributed --model SPEC --x0 FILE.npy --out CACHE.npz \\
        [--families diffpath,diffpathv2] [--steps 10] [--batch-size 256] [--chunk-size 2048] \\
        [--backend auto|nccl|gloo] [--device auto|cpu|cuda] [--precision auto|fp32|tf32|bf16] \\
        [--channels-last] [--compile] [--cuda-graphs] [--work-dir DIR]

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

:func:`run_options_from_params` turns params entries (``model.precision``, ``model.channels_last``,
``model.compile``, ``model.cuda_graphs``) into :class:`~diffpath.models.RunOptions`: explicit values
give exactly ``RunOptions(**values)``, ``auto`` gives the device's measured fast setting.
``benchmarks/bench_errors.py`` builds its ``fast`` path with this function (``--fast-from-params
params.yaml`` reads the very entries the errors stage runs with), so what is measured is what runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpath.study.cache import FAMILIES, CacheConfig, compute_cache
from diffpath.models import RunOptions, load_model

__all__ = [
    "fast_run_options",
    "run_options_from_params",
    "DistEnv",
    "dist_env",
    "load_x0",
    "run_sharded",
    "main",
]

# --------------------------------------------------------------------------------------------
# execution options


def fast_run_options(device: str | torch.device) -> RunOptions:
    """The fast options per device type (what ``auto`` means in params).

    * CUDA: bf16 autocast + channels_last (torch.compile / CUDA graphs are opt-in: they pay off on
      long runs, and compile for minutes first). Not yet measured on a GPU: the study's params keep
      fp32 until ``benchmarks/bench_errors.py`` and the evaluate stage show the features agree.
    * CPU: fp32 + channels_last. On the study's 2-core AVX2 CPU (no native bf16), bf16 autocast was
      several times *slower*; channels_last was the only option that helped; torch.compile
      (inductor C++) did not pay back its compile time; see ``benchmarks/README.md``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return RunOptions(precision="bf16", channels_last=True, compile=False, cuda_graphs=False)
    return RunOptions(precision="fp32", channels_last=True, compile=False, cuda_graphs=False)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _flag(name: str, value: Any, auto: bool) -> bool:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return auto
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"run option {name} must be a boolean or 'auto', got {value!r}")


def run_options_from_params(params: Mapping[str, Any] | None, device: str | torch.device) -> RunOptions:
    """:class:`RunOptions` from a params mapping (e.g. ``params["errors"]["run"]``).

    Keys: ``precision`` (``fp32`` | ``tf32`` | ``bf16`` | ``auto``), ``channels_last``,
    ``compile``, ``cuda_graphs`` (booleans or ``auto``). A missing key keeps the exact default
    (fp32, nothing else); ``auto`` takes :func:`fast_run_options`' value for ``device``. CUDA graphs
    are dropped (with a warning) off CUDA; ``tf32`` is plain fp32 off CUDA.

    ``{"precision": "auto", "channels_last": "auto", "compile": "auto", "cuda_graphs": "auto"}`` is
    the fast path that ``benchmarks/bench_errors.py`` measures.
    """
    params = dict(params or {})
    unknown = set(params) - {"precision", "channels_last", "compile", "cuda_graphs"}
    if unknown:
        raise ValueError(f"unknown run option(s) {sorted(unknown)}; expected precision, "
                         "channels_last, compile, cuda_graphs")
    dev = torch.device(device)
    fast = fast_run_options(dev)
    precision = params.get("precision", "fp32")
    if precision is None or str(precision).lower() == "auto":
        precision = fast.precision
    precision = str(precision).lower()
    default = RunOptions()
    channels_last = _flag("channels_last", params["channels_last"], fast.channels_last) \
        if "channels_last" in params else default.channels_last
    compile_ = _flag("compile", params["compile"], fast.compile) if "compile" in params else default.compile
    graphs = _flag("cuda_graphs", params["cuda_graphs"], fast.cuda_graphs) \
        if "cuda_graphs" in params else default.cuda_graphs
    if graphs and dev.type != "cuda":
        warnings.warn("cuda_graphs needs a CUDA device; ignored on " + dev.type, stacklevel=2)
        graphs = False
    return RunOptions(precision=precision, channels_last=channels_last, compile=compile_ or graphs,
                      cuda_graphs=graphs)


# --------------------------------------------------------------------------------------------
# torchrun environment


class DistEnv:
    """Where this process sits: ``rank``, ``world_size``, ``local_rank``, its ``device``, the
    ``backend`` and whether this module initialised the process group (and must destroy it)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device,
                 backend: str | None, owns_group: bool):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.backend = backend
        self.owns_group = owns_group

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

    def __repr__(self) -> str:
        return (f"DistEnv(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, "
                f"device={self.device}, backend={self.backend})")


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
    (``x0`` or uint8 ``images``, see :func:`diffpath.io.load_images_npz`)."""
    from diffpath.io import InputError, load_images_npz

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
    steps: int = 10,
    batch_size: int = 256,
    chunk_size: int = 2048,
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
) -> dict[str, np.ndarray] | None:
    """Compute the error cache of ``x0`` into ``out``, sharded over the torchrun processes.

    Args:
        model: a model spec for :func:`diffpath.models.load_model` (loaded on every rank).
        x0: (N, C, H, W) float32 images in [-1, 1], or a ``.npy`` / ``.npz`` file holding them.
        out: the cache ``.npz`` (rank 0 writes it; chunk parts go to ``out + ".parts/"``).
        families, steps, batch_size, chunk_size, seed, noise_key, clip_denoised, n_maps: the
            :class:`~diffpath.study.cache.CacheConfig`.
        run_options: :class:`RunOptions`, or a params mapping for :func:`run_options_from_params`.
        backend, device: see :func:`dist_env`.
        data_key: identifies the input (a resumed run must match it).
        work_dir: where the chunk parts go (default ``out + ".parts"``); must be a folder every
            rank can see (a shared file system across nodes).

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
        cfg = CacheConfig(families=tuple(families), steps=steps, batch_size=batch_size,
                          chunk_size=chunk_size, seed=seed, noise_key=noise_key,
                          clip_denoised=clip_denoised, n_maps=n_maps)
        kwargs: dict[str, Any] = {}
        if work_dir is not None:
            kwargs["work_dir"] = work_dir
        return compute_cache(m, x0, cfg, out=out, data_key=data_key, progress=progress,
                             rank=env.rank, world_size=env.world_size,
                             barrier=env.barrier if env.world_size > 1 else None, **kwargs)
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffpath.study.distributed",
        description="Compute the error cache, sharded over torchrun processes "
                    "(torchrun --nproc_per_node N -m diffpath.study.distributed ...).",
    )
    p.add_argument("--model", required=True, help="diffusers folder, improved-diffusion .pt, or hub id")
    p.add_argument("--x0", required=True, help=".npy (float N×C×H×W in [-1, 1]) or .npz (x0 / images)")
    p.add_argument("--out", required=True, help="the cache .npz")
    p.add_argument("--families", default=",".join(FAMILIES), help="diffpath,diffpathv2 (default both)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="seed of DiffPathV2's noise")
    p.add_argument("--noise-key", default="content", choices=["content", "index"])
    p.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    p.add_argument("--n-maps", type=int, default=0, help="keep per-pixel maps of this many images")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "tf32", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--data-key", default="", help="identifies the input for resuming")
    p.add_argument("--work-dir", default=None, help="where chunk parts go (default OUT.parts)")
    p.add_argument("--timeout-min", type=float, default=120.0, help="process-group timeout (minutes)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffpath.io import InputError
    from diffpath.models import ModelLoadError

    opts = {"precision": args.precision, "channels_last": args.channels_last,
            "compile": args.compile, "cuda_graphs": args.cuda_graphs}
    try:
        cache = run_sharded(
            args.model, args.x0, args.out,
            families=[f.strip() for f in args.families.split(",") if f.strip()],
            steps=args.steps, batch_size=args.batch_size, chunk_size=args.chunk_size,
            seed=args.seed, noise_key=args.noise_key, clip_denoised=not args.no_clip,
            n_maps=args.n_maps, run_options=opts, backend=args.backend, device=args.device,
            data_key=args.data_key, progress=not args.no_progress, timeout_min=args.timeout_min,
            work_dir=args.work_dir,
        )
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
