"""The model pass over a set of images, chunk by chunk, and the merge of its chunks into the cache.

:func:`compute_cache` ties the jobs together: check the input, open the chunk store
(:class:`~diffpath.cache.store.ChunkStore`: resuming, a finished cache to reuse), pick this
process's chunks (torchrun sharding: ``rank, rank + world, ...``), compute the missing ones
(:func:`_run_chunks`, with a progress bar), then on rank 0 merge every chunk (:func:`merge_chunks`)
and write the result.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpath.cache.config import CacheConfig
from diffpath.cache.passes import batch_arrays
from diffpath.cache.store import ChunkStore, chunk_spans
from diffpath.io import save_npz_atomic
from diffpath.models import EpsModel

__all__ = ["compute_cache", "merge_chunks"]


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
        x0: (N, C, H, W) float32 images in [-1, 1] (a memory map is fine); NaN or inf is refused.
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
            its whole job is done.

    Returns:
        The cache arrays (see :mod:`diffpath.cache`), on rank 0.
    """
    x0 = _checked_input(model, x0)
    if world_size > 1 and out is None:
        raise ValueError("a cache sharded across processes needs out (its chunks go to disk)")
    n = int(x0.shape[0])
    spans = chunk_spans(n, cfg.chunk_size)  # independent of the batch size: a resumed run may change it
    meta = {"fingerprint": cfg.fingerprint(model, n, data_key), "n": n, "chunk": cfg.chunk_size,
            "config": asdict(cfg)}
    store = None
    if out is not None:
        out = Path(out)
        folder = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".parts")
        store = ChunkStore.open(folder, meta, spans, rank=rank, barrier=barrier)
        done = store.finished() if world_size == 1 else None
        if done is not None:  # this very run finished before: reuse it
            save_npz_atomic(out, done)
            return done
    mine = [i for i in range(len(spans)) if i % world_size == rank]
    in_memory = _run_chunks(model, x0, cfg, spans, mine, store, progress=progress, rank=rank,
                            world_size=world_size)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    chunks = [in_memory[i] if store is None else store.read(i) for i in range(len(spans))]
    merged = merge_chunks(chunks, cfg, model, meta)
    if store is not None:
        assert out is not None
        store.finish(out, merged, keep=keep_finished)
    return merged


def merge_chunks(chunks: Sequence[Mapping[str, np.ndarray]], cfg: CacheConfig, model: EpsModel,
                 meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The cache: every chunk's arrays concatenated in order (``maps_*`` only where a chunk has
    them), the original timesteps of each family and ``meta`` as a JSON string."""
    merged = {k: np.concatenate([p[k] for p in chunks if k in p]) for k in chunks[0]}
    merged["dp_timesteps"] = np.asarray(cfg.dp_timesteps(model), dtype=np.int64)
    if "diffpathv2" in cfg.families:
        merged["v2_timesteps"] = np.asarray(cfg.v2_ts(model), dtype=np.int64)
    merged["meta"] = np.asarray(json.dumps(meta, default=str))
    return merged


def _checked_input(model: EpsModel, x0: np.ndarray) -> np.ndarray:
    x0 = np.asarray(x0) if not isinstance(x0, np.memmap) else x0
    if x0.ndim != 4 or x0.shape[1] != model.channels:
        raise ValueError(f"x0 must be (N, {model.channels}, H, W), got {x0.shape}")
    if len(x0) == 0:
        raise ValueError("x0 holds no images")
    for s in range(0, len(x0), 1024):  # in slices: x0 may be a memory map larger than memory
        bad = ~np.isfinite(np.asarray(x0[s : s + 1024])).reshape(min(1024, len(x0) - s), -1).all(axis=1)
        if bad.any():
            raise ValueError(f"x0 holds NaN or inf (image {s + int(np.flatnonzero(bad)[0])}); "
                             "the cache would hold NaN rows")
    return x0


def _run_chunks(model: EpsModel, x0: np.ndarray, cfg: CacheConfig, spans: Sequence[tuple[int, int]],
                mine: Sequence[int], store: ChunkStore | None, *, progress: bool, rank: int,
                world_size: int) -> dict[int, dict[str, np.ndarray]]:
    """Compute the chunks ``mine`` that ``store`` does not hold yet: each is written to the store
    as it finishes, or (without a store) returned by chunk number."""
    todo = [i for i in mine if store is None or not store.has(i)]
    bar = _progress_bar(spans, mine, todo, rank, world_size) if progress else None
    results: dict[int, dict[str, np.ndarray]] = {}
    try:
        for i in todo:
            arrays = _compute_chunk(model, x0, spans[i], cfg, model.device, bar)
            if store is not None:
                store.write(i, arrays)
            else:
                results[i] = arrays
    finally:
        if bar is not None:
            bar.close()
    return results


def _progress_bar(spans: Sequence[tuple[int, int]], mine: Sequence[int], todo: Sequence[int],
                  rank: int, world_size: int) -> Any:
    from tqdm.auto import tqdm

    def images(ids: Sequence[int]) -> int:
        return sum(spans[i][1] - spans[i][0] for i in ids)

    total = images(mine)
    return tqdm(total=total, initial=total - images(todo), unit="img",
                desc="errors" if world_size == 1 else f"errors[{rank}]", position=rank, leave=True)


def _compute_chunk(model: EpsModel, x0: np.ndarray, span: tuple[int, int], cfg: CacheConfig,
                   device: torch.device, bar: Any) -> dict[str, np.ndarray]:
    """The arrays of images ``span`` = (start, end), in batches of ``cfg.batch_size`` from
    ``start``, with the maps of those among the first ``cfg.n_maps`` images."""
    s0, e0 = span
    spans = [(s, min(s + cfg.batch_size, e0)) for s in range(s0, e0, cfg.batch_size)]
    parts: dict[str, list[np.ndarray]] = {}
    for (s, e), x in _prefetch(x0, spans, device):
        n_keep = max(0, min(e, cfg.n_maps) - s)
        idx = torch.arange(s, e, device=device, dtype=torch.long)
        res = batch_arrays(model, x, idx, cfg, keep_maps=False)
        if n_keep:
            maps = batch_arrays(model, x[:n_keep], idx[:n_keep], cfg, keep_maps=True)
            res.update({k: v for k, v in maps.items() if k.startswith("maps_")})
        for k, v in res.items():
            parts.setdefault(k, []).append(v.detach().cpu().numpy())
        if bar is not None:
            bar.update(e - s)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["index"] = np.arange(s0, e0, dtype=np.int64)
    return out


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
