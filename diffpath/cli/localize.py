"""``diffpath localize``: anomaly maps for a user's own images.

Writes into ``--out`` (a folder, written atomically: all or nothing):

* ``NNNN_<stem>_map.npy``: float32 (H, W) anomaly map on the image's own grid (higher = more
  anomalous; the model-resolution map centre-cropped back from a zero-pad, else resized bilinearly);
* ``NNNN_<stem>_overlay.png``: the image in gray with the map in colour over it (one colour scale
  shared by all images of the run, so heat is comparable between images);
* ``scores.csv``: ``index,path,score,map,overlay`` (score = max of the pooled map);
* ``localize.json``: the settings and the skipped files.

``NNNN`` is the image's position in the sorted input list, so equal stems never collide. Input is
read as ``fit``/``score`` read it (:func:`diffpath.data.files.load_images`): unreadable files are
skipped with a warning (``--strict``: refused); an ``--out`` that exists must be a folder this
command wrote (``scores.csv`` and ``localize.json`` inside) or empty.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from diffpath.cli import options
from diffpath.cli.common import CLIError

__all__ = ["add_command", "DEFAULT_SPEC"]

#: Defaults of the command: the study's map, the table's ``deterministic`` row (params.yaml
#: ``localization.rows``): inversion to 0.4·T in 5 DDIM steps and back, 10 UNet evaluations per image.
DEFAULT_SPEC = {"kind": "deterministic", "t0": [0.4], "steps": 5, "draws": 1, "reduce": "maps"}
_OWN = {"scores.csv", "localize.json"}


def add_command(sub: argparse._SubParsersAction) -> None:
    from diffpath.data.files import RESIZE_MODES

    p = sub.add_parser("localize", help="anomaly maps (heat-map overlays, .npy maps, scores) for images",
                       description="Reconstruct each image through a partial diffusion round trip and "
                       "map where it differs; t0 is a fraction of the model's T.")
    options.add_model(p)
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="images, folders or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--kind", default=DEFAULT_SPEC["kind"], choices=["stochastic", "deterministic"])
    p.add_argument("--t0", type=float, nargs="+", default=DEFAULT_SPEC["t0"],
                   help="depth(s) as fractions of T, e.g. 0.2 (several are averaged)")
    p.add_argument("--steps", type=int, default=DEFAULT_SPEC["steps"], help="DDIM steps per walk")
    p.add_argument("--draws", type=int, default=DEFAULT_SPEC["draws"], help="stochastic round trips")
    p.add_argument("--reduce", default=DEFAULT_SPEC["reduce"], choices=["maps", "reconstruction"])
    p.add_argument("--map", default="pixel", choices=["pixel", "ssim", "feature", "dino"],
                   help="map kind (dino: DIVAD's DINO feature map, Stable Diffusion models only)")
    p.add_argument("--smooth-sigma", type=float, default=None, metavar="PX",
                   help="Gaussian smoothing of the maps in model pixels; default 4·S/256 for an S-pixel "
                   "model (DIVAD's 4 px at 256 px); 0 turns it off. The study's table uses 3 px at 32 px, "
                   "tuned to its large synthetic patches")
    p.add_argument("--seed", type=int, default=0, help="noise seed (0)")
    p.add_argument("--resize", default="auto", choices=RESIZE_MODES)
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    options.add_run(p, chunks=False)
    from diffpath.cli.localize_latent import add_options

    add_options(p)
    p.set_defaults(handler=_cmd_localize)


def _check_out(out: Path) -> None:
    from diffpath.io import OutputError

    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out} exists and is not a folder; refusing to overwrite it")
        names = {p.name for p in out.iterdir()}
        if names and not _OWN <= names:
            raise OutputError(f"{out} exists and was not written by diffpath localize; refusing to "
                              "overwrite it (choose another --out)")


def _overlay_png(gray: np.ndarray, amap: np.ndarray, vmax: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = gray.shape
    fig = plt.figure(figsize=(max(2.0, w / 50), max(2.0, h / 50)), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
    ax.imshow(amap, cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
    ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _safe_stem(p: Path) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.stem)
    return stem[:60] or "image"


def input_paths(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The checked ``--out`` folder and the input images (never files inside ``--out``)."""
    from diffpath.data.files import NoImagesError, find_images
    from diffpath.io import check_writable

    out = check_writable(args.out, folder=True)
    _check_out(out)
    mine = {str(out)}
    paths = [p for p in find_images(args.images) if not os.path.abspath(p).startswith(str(out) + os.sep)
             and os.path.abspath(p) not in mine]
    if not paths:
        raise NoImagesError("no images to localise")
    return out, paths


def _cmd_localize(args: argparse.Namespace) -> None:
    import torch

    from diffpath.cli import localize_latent
    from diffpath.data.files import Preprocessing, load_images
    from diffpath.methods.localization import MapSpec, localize, to_image_grid

    if localize_latent.wanted(args):
        return localize_latent.run(args, input_paths=input_paths, write_outputs=write_outputs, gray=_gray)
    if args.map == "dino":
        raise CLIError("--map dino needs a Stable Diffusion model (--model FOLDER_OR_REPO --prompt ...)")
    run = options.pass_options(args)
    if args.smooth_sigma is not None and not args.smooth_sigma >= 0:
        raise CLIError(f"--smooth-sigma must be 0 or more pixels, got {args.smooth_sigma}")
    try:
        spec = MapSpec(args.kind, t0=tuple(args.t0), steps=args.steps, draws=args.draws,
                       reduce=args.reduce, maps=(args.map,))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    out, paths = input_paths(args)
    model = run.load_model(args.model)
    prep = Preprocessing(size=int(model.image_size), channels=int(model.channels), resize=args.resize)
    loaded = load_images(paths, prep, strict=args.strict)
    res = localize(model, np.asarray(loaded.x0), spec, seed=args.seed, batch_size=run.batch_size,
                   smooth_sigma=args.smooth_sigma)
    if not all(np.all(np.isfinite(v)) for v in res.maps.values()):
        raise CLIError("the maps hold NaN or inf (is the model or input broken?)")
    model_maps = res.maps[args.map]
    per_image = []
    for i, p in enumerate(loaded.paths):
        gray = _gray(p)
        per_image.append((gray, to_image_grid(model_maps[i : i + 1], gray.shape)[0]))
    write_outputs(out, loaded.paths, per_image, res.scores[args.map], {
        "model": str(args.model), "settings": res.settings, "unet_evaluations_per_image": res.nfe,
        "skipped": [[str(f), r] for f, r in loaded.skipped]})
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"wrote {args.out}: {len(per_image)} images localised ({len(loaded.skipped)} skipped), "
          f"{res.nfe:g} UNet evaluations per image", file=sys.stderr)


def _gray(path: Path) -> np.ndarray:
    """The image at ``path`` as (H, W) uint8 gray (ITU-R 601 luma of colour images)."""
    from diffpath.data.files import read_image

    pix = read_image(path)
    return pix if pix.ndim == 2 else (pix[..., :3] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)


def write_outputs(out: Path, paths: list[Path], per_image: list[tuple[np.ndarray, np.ndarray]],
                  scores: np.ndarray, info: dict) -> None:
    """Write the folder (module docstring) atomically: per image its (gray (H, W) uint8, map (H, W)
    float) pair, its score; ``info`` goes into ``localize.json`` with the counts and the colour scale."""
    from diffpath.io import atomic_folder

    vmax = float(np.quantile(np.concatenate([m.ravel() for _, m in per_image]), 0.999)) or 1.0
    rows = []
    with atomic_folder(out) as tmp:
        for i, (p, (gray, amap)) in enumerate(zip(paths, per_image)):
            name = f"{i:04d}_{_safe_stem(p)}"
            np.save(tmp / f"{name}_map.npy", amap.astype(np.float32))
            (tmp / f"{name}_overlay.png").write_bytes(_overlay_png(gray, amap, vmax))
            rows.append({"index": i, "path": str(p), "score": f"{float(scores[i]):.6g}",
                         "map": f"{name}_map.npy", "overlay": f"{name}_overlay.png"})
        with open(tmp / "scores.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        meta = {**{k: v for k, v in info.items() if k != "skipped"}, "n_images": len(rows),
                "skipped": info.get("skipped", []), "overlay_vmax": vmax}
        (tmp / "localize.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
