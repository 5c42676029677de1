"""The error cache: one model pass per (model, data set, split), reduced to per-step moments.

The UNet passes are the whole cost of the study, so they run once and their per-image, per-step
moments are cached (see :mod:`diffpath.core.sampling`); every feature variant, ablation, scorer and
figure is then computed from the cache without touching the model again.

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
=================  ===============  ===================================================

Work is split into chunks of ``chunk_size`` images. Each finished chunk is written atomically to
``OUT.parts/``; an interrupted run resumes from the chunks already there, and the final file is
written atomically only when every chunk is done (then the parts are removed). Under torchrun each
rank computes the chunks ``rank, rank + world, ...`` and rank 0 merges them.
"""

from __future__ import annotations

import hashlib
import json
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpath.io import save_npz_atomic, write_json_atomic
from diffpath.models import EpsModel
from diffpath.methods.diffpath import diffpath_path
from diffpath.methods.diffpathv2 import ScoreErrorConfig, score_error_path

__all__ = ["CacheConfig", "compute_cache", "load_cache", "FAMILIES"]

FAMILIES = ("diffpath", "diffpathv2")
_FP_KEY = "run_fingerprint"  # stored in every chunk: the fingerprint of the run that wrote it


@dataclass
class CacheConfig:
    """What one cache pass computes.

    Attributes:
        families: which passes to run: ``"diffpath"`` (DDIM inversion) and/or ``"diffpathv2"``
            (forward-noised score errors). Each costs ``steps`` model evaluations per image.
        steps: DDIM steps of the DiffPath path (DiffPath uses 10).
        clip_denoised: clip x̂0 on the DiffPath path (DiffPath does).
        v2_timesteps: ``"diffpath"`` (the same respaced timesteps as the path) or an explicit list.
        score_error: DiffPathV2's noise seed, noise keying, clipping and SSIM settings.
        batch_size: images per model call.
        chunk_size: images per resumable chunk.
        n_maps: keep per-pixel maps of this many leading images, for figures.
    """

    families: tuple[str, ...] = FAMILIES
    steps: int = 10
    clip_denoised: bool = True
    v2_timesteps: str | list[int] = "diffpath"
    score_error: ScoreErrorConfig = field(default_factory=ScoreErrorConfig)
    batch_size: int = 256
    chunk_size: int = 2048
    n_maps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if self.steps < 2:
            raise ValueError("steps must be at least 2 (the derivative needs two steps)")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be positive")
        if isinstance(self.score_error, dict):
            self.score_error = ScoreErrorConfig(**self.score_error)

    @classmethod
    def from_params(cls, **params: Any) -> CacheConfig:
        """From the flat settings of ``params.yaml``'s ``errors`` section (or the command line):
        ``seed``, ``noise_key`` and ``clip_x0_hat`` go to :attr:`score_error`; names neither
        class knows (``num_threads``, ...) are ignored."""
        own = {f.name for f in fields(cls)} - {"score_error", "extra"}
        v2 = {f.name for f in fields(ScoreErrorConfig)}
        return cls(**{k: v for k, v in params.items() if k in own},
                   score_error=ScoreErrorConfig(**{k: v for k, v in params.items() if k in v2}))

    def dp_timesteps(self, model: EpsModel) -> list[int]:
        return model.schedule.respaced_timesteps(self.steps)

    def v2_ts(self, model: EpsModel) -> list[int]:
        if self.v2_timesteps == "diffpath":
            return self.dp_timesteps(model)
        ts = sorted(int(t) for t in self.v2_timesteps)
        if len(ts) < 2 or ts[0] < 0 or ts[-1] >= model.num_timesteps:
            raise ValueError(f"v2_timesteps must be ≥2 timesteps in [0, {model.num_timesteps - 1}]")
        return ts

    def fingerprint(self, model: EpsModel, n_images: int, data_key: str) -> str:
        """Identity of a run: a resumed run must match it exactly."""
        d = asdict(self)
        for k in ("batch_size", "chunk_size"):  # do not change the numbers
            d.pop(k)
        d.update(model=model.fingerprint(), model_kind=model.kind, n=n_images, data=data_key,
                 options=asdict(model.options))
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _prefetch(x0: np.ndarray, spans: Sequence[tuple[int, int]], device: torch.device,
              depth: int = 2) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
    """Move batches to the device in a background thread (pinned memory on CUDA)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    pin = device.type == "cuda"

    def work() -> None:
        try:
            for s, e in spans:
                t = torch.from_numpy(np.ascontiguousarray(x0[s:e], dtype=np.float32))
                if pin:
                    t = t.pin_memory()
                q.put(((s, e), t.to(device, non_blocking=pin)))
        except BaseException as exc:  # surfaced in the consumer
            q.put(exc)
        q.put(None)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    while True:
        item = q.get()
        if item is None:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    th.join()


def _batch_arrays(model: EpsModel, x: torch.Tensor, idx: torch.Tensor, cfg: CacheConfig,
                  keep_maps: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "diffpath" in cfg.families:
        out.update(diffpath_path(model, x, cfg.dp_timesteps(model), clip_denoised=cfg.clip_denoised,
                                 keep_maps=keep_maps).as_cache())
    if "diffpathv2" in cfg.families:
        keys = idx if cfg.score_error.noise_key == "index" else None
        out.update(score_error_path(model, x, cfg.v2_ts(model), keys=keys, config=cfg.score_error,
                                    keep_maps=keep_maps).as_cache())
    return out


def _compute_chunk(model: EpsModel, x0: np.ndarray, span: tuple[int, int], cfg: CacheConfig,
                   device: torch.device, bar) -> dict[str, np.ndarray]:
    s0, e0 = span
    spans = [(s, min(s + cfg.batch_size, e0)) for s in range(s0, e0, cfg.batch_size)]
    parts: dict[str, list[np.ndarray]] = {}
    for (s, e), x in _prefetch(x0, spans, device):
        n_keep = max(0, min(e, cfg.n_maps) - s)
        idx = torch.arange(s, e, device=device, dtype=torch.long)
        res = _batch_arrays(model, x, idx, cfg, keep_maps=False)
        if n_keep:
            maps = _batch_arrays(model, x[:n_keep], idx[:n_keep], cfg, keep_maps=True)
            res.update({k: v for k, v in maps.items() if k.startswith("maps_")})
        for k, v in res.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy())
        if bar is not None:
            bar.update(e - s)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["index"] = np.arange(s0, e0, dtype=np.int64)
    return out


def compute_cache(
    model: EpsModel,
    x0: np.ndarray,
    cfg: CacheConfig,
    out: str | Path | None = None,
    *,
    data_key: str = "",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    work_dir: str | Path | None = None,
    keep_finished: bool = False,
) -> dict[str, np.ndarray] | None:
    """Run the model passes over ``x0`` and return (and optionally write) the cache.

    Args:
        model: the ε-model (already on its device and configured).
        x0: (N, C, H, W) float32 images in [-1, 1] (a memory map is fine).
        cfg: what to compute.
        out: the final ``.npz``; chunks go to ``out + ".parts/"`` and make the run resumable.
            Without ``out`` everything stays in memory.
        data_key: identifies the input (e.g. a checksum); a resumed run must match it.
        progress: show a tqdm progress bar.
        rank, world_size, barrier: for sharding across processes (torchrun): each rank computes
            every ``world_size``-th chunk; after ``barrier()`` rank 0 merges. Ranks other than 0
            return ``None``.
        work_dir: where the chunk parts go (default ``out + ".parts"``). Put it outside a DVC
            output so that a pipeline restart does not delete finished chunks.
        keep_finished: keep the merged cache in the work area too (``finished.npz``), so that a
            rerun after a kill that lost ``out`` (DVC removes a stage's outputs before it reruns
            the stage) copies it instead of recomputing; the caller removes the work area when
            its whole stage is done.

    Returns:
        The cache arrays (see the module docstring), on rank 0.
    """
    x0 = np.asarray(x0) if not isinstance(x0, np.memmap) else x0
    if x0.ndim != 4 or x0.shape[1] != model.channels:
        raise ValueError(f"x0 must be (N, {model.channels}, H, W), got {x0.shape}")
    device = model.device
    n = int(x0.shape[0])
    chunk = cfg.chunk_size  # independent of the batch size, so a resumed run may change it
    spans = _chunks(n, chunk)
    mine = [i for i in range(len(spans)) if i % world_size == rank]
    fp = cfg.fingerprint(model, n, data_key)
    meta = {"fingerprint": fp, "n": n, "chunk": chunk, "config": asdict(cfg)}

    parts_dir: Path | None = None
    if out is not None:
        out = Path(out)
        parts_dir = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".parts")
        parts_dir.mkdir(parents=True, exist_ok=True)
        meta_file = parts_dir / "meta.json"
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("fingerprint") != fp or old.get("chunk") != chunk:
            if rank == 0:  # stale parts of another run, or parts whose meta.json is lost
                shutil.rmtree(parts_dir)
                parts_dir.mkdir(parents=True)
        if rank == 0:
            write_json_atomic(meta_file, meta)
        if barrier is not None:
            barrier()

    def part_file(i: int) -> Path:
        assert parts_dir is not None
        return parts_dir / f"chunk_{i:06d}.npz"

    def part_ok(i: int) -> bool:  # a chunk is used only when it provably belongs to this run
        try:
            with np.load(part_file(i), allow_pickle=False) as z:
                return str(z[_FP_KEY]) == fp and np.array_equal(z["index"], np.arange(*spans[i]))
        except Exception:
            return False

    finished = parts_dir / "finished.npz" if parts_dir is not None else None
    if finished is not None and rank == 0 and world_size == 1 and finished.is_file():
        try:
            with np.load(finished, allow_pickle=False) as z:
                cached = {k: z[k] for k in z.files}
        except Exception:
            cached = {}
        if str(cached.pop(_FP_KEY, "")) == fp:  # this very run finished before: reuse it
            assert out is not None
            save_npz_atomic(out, cached)
            return cached

    todo = [i for i in mine if parts_dir is None or not part_ok(i)]
    results: dict[int, dict[str, np.ndarray]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(spans[i][1] - spans[i][0] for i in mine)
        done = total - sum(spans[i][1] - spans[i][0] for i in todo)
        bar = tqdm(total=total, initial=done, unit="img", desc=f"errors{'' if world_size == 1 else f'[{rank}]'}",
                   position=rank, leave=True)
    try:
        for i in todo:
            arr = _compute_chunk(model, x0, spans[i], cfg, device, bar)
            if parts_dir is not None:
                save_npz_atomic(part_file(i), {**arr, _FP_KEY: np.asarray(fp)})
            else:
                results[i] = arr
    finally:
        if bar is not None:
            bar.close()

    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    loaded = []
    for i in range(len(spans)):
        if i in results:
            loaded.append(results[i])
        else:
            if not part_ok(i):
                raise RuntimeError(f"{part_file(i)}: missing, or not of this run; rerun")
            with np.load(part_file(i), allow_pickle=False) as z:
                loaded.append({k: z[k] for k in z.files if k != _FP_KEY})
    merged = {k: np.concatenate([p[k] for p in loaded if k in p]) for k in loaded[0]}
    merged["dp_timesteps"] = np.asarray(cfg.dp_timesteps(model), dtype=np.int64)
    if "diffpathv2" in cfg.families:
        merged["v2_timesteps"] = np.asarray(cfg.v2_ts(model), dtype=np.int64)
    merged["meta"] = np.asarray(json.dumps(meta, default=str))
    if out is not None:
        assert parts_dir is not None and finished is not None
        if keep_finished:
            save_npz_atomic(finished, {**merged, _FP_KEY: np.asarray(fp)})
            for i in range(len(spans)):
                part_file(i).unlink(missing_ok=True)
        save_npz_atomic(out, merged)
        if not keep_finished:
            shutil.rmtree(parts_dir, ignore_errors=True)
    return merged


def load_cache(path: str | Path) -> dict[str, np.ndarray]:
    """Read a cache written by :func:`compute_cache` (:class:`~diffpath.study.layout.StageInputError`
    naming the file when it is missing or truncated)."""
    from diffpath.study.layout import read_npz

    return read_npz(path)
