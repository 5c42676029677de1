"""The localisation paper profile's stages: MVTec AD / VisA read, reconstructed and mapped.

Notebooks 81 and 82 call these, one benchmark at a time (``industrial.benchmarks``), on the
arrays that notebook 80 prepared (:func:`diffpath.data.industrial.prepare`):

* :func:`reconstruct` (stage ``industrial_reconstruct``): every row of ``industrial.rows``
  (:class:`~diffpath.methods.divad.RoundTripSpec`) on every image, the reconstructions quantised
  as DIVAD saves them (uint8 PNG at the model's size) and resized to the evaluation size;
  resumable: a finished category is kept in the stage's work area with a fingerprint of its
  inputs and settings, and reused by a rerun with the same fingerprint;
* :func:`evaluate` (stage ``industrial_evaluate``): the DINO, pixel and SSIM maps of every row,
  DIVAD's image score and the literature's metrics per category and their mean
  (:mod:`diffpath.scoring.anomaly_metrics`).

Noise (stochastic rows, a sampled VAE posterior) comes from one generator per batch, seeded by the
seed, the category and the batch's first image (:func:`batch_generator`), so a rerun gives the
same numbers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffpath.data.industrial import categories
from diffpath.io import save_npz_atomic
from diffpath.methods.divad import RoundTripSpec, latent_round_trip, to_uint8
from diffpath.methods.dino import PatchFeatures, dino_distance_map
from diffpath.methods.latent import LatentDiffusion
from diffpath.methods.localization import batch_generator
from diffpath.methods.maps import anomaly_maps, gaussian_smooth
from diffpath.scoring.anomaly_metrics import category_metrics, pooled_max_scores
from diffpath.study.layout import read_npz

__all__ = ["MAPS", "reconstruct", "reconstruct_category", "evaluate", "row_costs"]

#: the maps of every reconstruction: DIVAD's, and the study's two
MAPS: tuple[str, ...] = ("dino", "pixel", "ssim")


def _to_model(u8: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [-1, 1] on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(u8)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _resize_u8(u8: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W, 3) uint8 resized to size² with PIL's bilinear filter (torchvision's ``Resize``)."""
    from PIL import Image

    flat = u8.reshape(-1, *u8.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in flat])
    return out.reshape(*u8.shape[:-3], size, size, 3)


def row_costs(specs: Mapping[str, RoundTripSpec], scheduler_config: Mapping[str, Any],
              guidance_scale: float) -> pd.DataFrame:
    """Per row: the levels, UNet and VAE evaluations per image (DIVAD's code's own count too)."""
    out = []
    for name, spec in specs.items():
        p = spec.plan(scheduler_config)
        mult = 1 if guidance_scale == 1.0 else 2
        out.append({"row": name, "kind": p.kind, "latent_level": p.latent_level, "sample_from": p.sample_from,
                    "unet_evals": p.nfe(guidance_scale), "vae_evals": p.vae_evals(),
                    "reference_unet_evals": None if p.reference_steps is None else p.reference_steps * mult})
    return pd.DataFrame(out)


@torch.no_grad()
def reconstruct_category(ld: LatentDiffusion, images: np.ndarray, category: str, specs: Mapping[str, RoundTripSpec],
                         *, prompt: str, guidance_scale: float, vae: str, seed: int, batch_size: int,
                         eval_size: int) -> dict[str, np.ndarray]:
    """``rec_<row>``: (N, draws, E, E, 3) uint8 reconstructions of (N, S, S, 3) uint8 ``images``
    for every row (E = ``eval_size``); ``prompt`` with ``{class}`` = ``category``."""
    dev = ld.device
    cond = ld.prompt_embeddings(prompt, category)
    uncond = ld.embed([""]) if guidance_scale != 1.0 else None
    plans = {name: s.plan(ld.scheduler_config) for name, s in specs.items()}
    key = zlib.crc32(category.encode()) * 100_000
    out: dict[str, list[np.ndarray]] = {name: [] for name in plans}
    for lo in range(0, len(images), batch_size):
        x = _to_model(images[lo:lo + batch_size], dev)
        for name, plan in plans.items():
            gen = batch_generator(seed, key + lo, dev)
            res = latent_round_trip(ld, x, plan, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                                    generator=gen, vae_sample=vae == "sample")
            u8 = to_uint8(res.x_hat).movedim(0, 1).cpu().numpy()  # (B, draws, S, S, 3)
            out[name].append(_resize_u8(u8, eval_size))
    return {f"rec_{name}": np.concatenate(v) for name, v in out.items()}


def _fingerprint(arrays: Mapping[str, np.ndarray], settings: Mapping[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(arrays["images"]).tobytes())
    return h.hexdigest()


def reconstruct(ld: LatentDiffusion, prepared_dir: str | Path, out_dir: str | Path, work_dir: str | Path,
                specs: Mapping[str, RoundTripSpec], *, eval_size: int, log: Any = print, **settings: Any) -> None:
    """:func:`reconstruct_category` for every category of ``prepared_dir``, kept in ``work_dir``
    (reused when its fingerprint matches: same images, model weights and settings) and copied to
    ``out_dir``. ``settings``: prompt, guidance_scale, vae, seed, batch_size."""
    work, out = Path(work_dir), Path(out_dir)
    rows = {n: s.to_dict() for n, s in specs.items()}
    model_id = ld.fingerprint()
    for cat in categories(prepared_dir):
        arrays = read_npz(Path(prepared_dir) / f"{cat}.npz", ("images",))
        fp = _fingerprint(arrays, {"model": model_id, "rows": rows, "eval_size": eval_size, **settings})
        done = work / f"{cat}.npz"
        if done.is_file() and str(read_npz(done, ("fingerprint",))["fingerprint"]) == fp:
            log(f"{cat}: reused from {done}")
        else:
            recs = reconstruct_category(ld, arrays["images"], cat, specs, eval_size=eval_size, **settings)
            save_npz_atomic(done, {**recs, "fingerprint": np.array(fp)})
            log(f"{cat}: {len(arrays['images'])} images reconstructed")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(done, out / f"{cat}.npz")


def _category_maps(features: PatchFeatures, x: torch.Tensor, fx: torch.Tensor, rec: torch.Tensor,
                   fg: torch.Tensor, maps: Sequence[str], sigma: float) -> dict[str, torch.Tensor]:
    """Each map (B, H, W) of one batch, averaged over the draws of ``rec`` (B, D, 3, H, W)."""
    acc: dict[str, torch.Tensor] = {}
    for d in range(rec.shape[1]):
        r = rec[:, d]
        got = anomaly_maps(x, r, [m for m in maps if m != "dino"], smooth_sigma=0.0)
        got = {m: gaussian_smooth(v * fg[:, None], sigma) for m, v in got.items()}
        if "dino" in maps:
            got["dino"] = dino_distance_map(features, x, r, sigma=sigma, foreground=fg, x_features=fx)
        for m in maps:
            acc[m] = acc.get(m, 0) + got[m][:, 0] / rec.shape[1]
    return acc


@torch.no_grad()
def evaluate(features: PatchFeatures, prepared_dir: str | Path, rec_dir: str | Path, rows: Sequence[str], *,
             maps: Sequence[str] = MAPS, sigma: float = 5.0, batch_size: int = 16, keep: int = 0
             ) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """Metrics of every (row, map, category) and the maps of each category's first ``keep``
    anomalous images (for the figures: ``{category: {"<row>/<map>": (keep, H, W), ...}}``)."""
    dev = features.device
    table, shown = [], {}
    for cat in categories(prepared_dir):
        a = read_npz(Path(prepared_dir) / f"{cat}.npz", ("eval_images", "masks", "foreground", "labels"))
        recs = read_npz(Path(rec_dir) / f"{cat}.npz", tuple(f"rec_{r}" for r in rows))
        per: dict[str, list[np.ndarray]] = {}
        for lo in range(0, len(a["labels"]), batch_size):
            x = _to_model(a["eval_images"][lo:lo + batch_size], dev)
            fx = features(x) if "dino" in maps else None
            fg = torch.from_numpy(a["foreground"][lo:lo + batch_size]).to(dev).float()
            for r in rows:
                rec = recs[f"rec_{r}"][lo:lo + batch_size]
                rec_t = _to_model(rec.reshape(-1, *rec.shape[2:]), dev).view(*rec.shape[:2], 3, *rec.shape[2:4])
                for m, v in _category_maps(features, x, fx, rec_t, fg, maps, sigma).items():
                    per.setdefault(f"{r}/{m}", []).append(v.cpu().numpy())
        pick = np.flatnonzero(a["labels"] == 1)[:keep]
        shown[cat] = {k: np.concatenate(v)[pick] for k, v in per.items()}
        for k, v in per.items():
            amap = np.concatenate(v)
            r, m = k.split("/")
            table.append({"row": r, "map": m, "category": cat, "n": len(amap), "n_anomalous": int(a["labels"].sum()),
                          **category_metrics(amap, a["masks"], pooled_max_scores(amap), a["labels"])})
    return pd.DataFrame(table), shown
