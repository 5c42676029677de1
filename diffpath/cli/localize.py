"""``diffpath localize``: anomaly maps for a user's own images.

Writes into ``--out`` (a folder, written atomically: all or nothing):

* ``NNNN_<stem>_map.npy``: float32 (H, W) anomaly map on the image's own grid (higher = more
  anomalous; the model-resolution map centre-cropped back from a zero-pad, else resized bilinearly);
* ``NNNN_<stem>_overlay.png``: the image in gray with the map in colour over it (one colour scale
  shared by all images of the run, so heat is comparable between images), drawn at twice the
  image's size up to :data:`OVERLAY_MAX_PX` pixels a side (larger images are shrunk for it first);
* ``scores.csv``: ``index,path,score,map,overlay`` (score = max of the pooled map);
* ``localize.json``: the settings, the skipped files and the files written (``files``).

``NNNN`` is the image's position in the sorted input list, so equal stems never collide. Input is
read as ``fit``/``score`` read it (:func:`diffpath.data.files.load_images`): unreadable files,
folders and non-regular files are skipped with a warning (``--strict``: refused). An ``--out``
that exists must be empty, or hold only what an earlier ``diffpath localize`` wrote there (the
files its ``localize.json`` lists): anything else in it is refused, never removed.
``--smooth-sigma`` must be finite, from 0 to the model's image size.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from diffpath.cli import options
from diffpath.cli.common import CLIError, DefaultsHelp, check_sigma

__all__ = ["add_command", "DEFAULT_SPEC", "OVERLAY_MAX_PX"]

#: Defaults of the command: the study's map, the table's ``deterministic`` row (params.yaml
#: ``localization.rows``): inversion to 0.4·T in 5 DDIM steps and back, 10 UNet evaluations per image.
DEFAULT_SPEC = {"kind": "deterministic", "t0": [0.4], "steps": 5, "draws": 1, "reduce": "maps"}
_OWN = {"scores.csv", "localize.json"}
#: What ``diffpath localize`` writes (its ``--help`` epilog).
OUTPUTS = """\
writes into --out, for the N-th image (sorted input order):
  NNNN_<name>_map.npy      float32 (H, W) anomaly map on the image's own grid (higher = more anomalous)
  NNNN_<name>_overlay.png  the image in gray (colour images as their luma) with the map over it, one
                           colour scale for the whole run
  scores.csv               index,path,score,map,overlay; score = the maximum of the pooled map: how
                           anomalous the image's most anomalous region is (comparable within a run)
  localize.json            the settings, the cost, the skipped files and the files written
"""
#: The longest side of an overlay PNG, in pixels (a 7000-px image would otherwise be drawn at
#: 14000 px: gigabytes of canvas).
OVERLAY_MAX_PX = 2048


def add_command(sub: argparse._SubParsersAction) -> None:
    from diffpath.data.files import RESIZE_MODES

    p = sub.add_parser("localize", help="anomaly maps (heat-map overlays, .npy maps, scores) for images",
                       description="Reconstruct each image through a partial diffusion round trip and "
                       "map where it differs; t0 is a fraction of the model's T. The defaults are the "
                       "study's table's deterministic row.",
                       formatter_class=DefaultsHelp, epilog=OUTPUTS)
    options.add_model(p)
    p.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="images, folders or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--kind", default=DEFAULT_SPEC["kind"], choices=["stochastic", "deterministic"],
                   help="round trip: DDIM inversion and back, or fresh noise and η-denoising")
    p.add_argument("--t0", type=float, nargs="+", default=DEFAULT_SPEC["t0"],
                   help="depth(s) as fractions of T, e.g. 0.2 (several are averaged)")
    p.add_argument("--steps", type=int, default=DEFAULT_SPEC["steps"], help="DDIM steps per walk")
    p.add_argument("--draws", type=int, default=DEFAULT_SPEC["draws"], help="stochastic round trips")
    p.add_argument("--reduce", default=DEFAULT_SPEC["reduce"], choices=["maps", "reconstruction"],
                   help="with several draws or depths: average the maps, or the reconstructions")
    p.add_argument("--map", default="pixel", choices=["pixel", "ssim", "feature", "dino"],
                   help="pixel |x - x̂|, ssim 1 - SSIM(x, x̂), feature (UNet features), dino (DIVAD's DINO "
                   "feature map, Stable Diffusion models only)")
    p.add_argument("--smooth-sigma", type=float, default=None, metavar="PX",
                   help="Gaussian smoothing of the maps in model pixels; default 3·S/32 for an S-pixel "
                   "model (the study's table: 3 px at 32 px, tuned on its own split); 0 turns it off. "
                   "Stable Diffusion models: default DIVAD's 5 px at 256 px, scaled to --eval-size")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--resize", default="auto", choices=RESIZE_MODES, help="how images reach the model's size")
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    options.add_run(p, chunks=False)
    from diffpath.cli.localize_latent import add_options

    add_options(p)
    p.set_defaults(handler=_cmd_localize)


def _written_before(out: Path) -> set[str]:
    """The names an earlier ``diffpath localize`` run wrote into ``out`` (its ``localize.json``'s
    ``files``, or for older runs the maps and overlays its ``scores.csv`` names)."""
    try:
        info = json.loads((out / "localize.json").read_text(encoding="utf-8"))
        if isinstance(info, dict) and isinstance(info.get("files"), list):
            return {str(f) for f in info["files"]} | _OWN
        with open(out / "scores.csv", newline="", encoding="utf-8", errors="replace") as fh:
            rows = list(csv.DictReader(fh))
        return {str(r.get(k)) for r in rows for k in ("map", "overlay")} | _OWN
    except (OSError, ValueError):
        return set()


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a folder, or holds anything this command did not
    write there (it is replaced as a whole)."""
    from diffpath.io import OutputError

    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out} exists and is not a folder; refusing to overwrite it")
        names = {p.name for p in out.iterdir()}
        foreign = sorted(names - _written_before(out)) if names else []
        if foreign:
            raise OutputError(f"{out} holds files diffpath localize did not write ({', '.join(foreign[:3])}"
                              f"{' ...' if len(foreign) > 3 else ''}); refusing to overwrite it "
                              "(choose another --out, or an empty folder)")


def _shrunk(gray: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``gray`` (H, W) uint8 and ``amap`` (H, W) float32 at most ``OVERLAY_MAX_PX // 2`` a side
    (area-averaged; unchanged when already that small)."""
    from PIL import Image

    h, w = gray.shape
    side = OVERLAY_MAX_PX // 2
    if max(h, w) <= side:
        return gray, amap
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    g = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BOX))
    m = np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize(size, Image.Resampling.BOX))
    return g, m.astype(np.float32)


def _overlay_png(gray: np.ndarray, amap: np.ndarray, vmax: float) -> bytes:
    """The overlay of ``amap`` (H, W) on ``gray`` (H, W), drawn at 2·W × 2·H pixels (at least 200,
    at most :data:`OVERLAY_MAX_PX` with :func:`_shrunk` inputs)."""
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


def _check_options(args: argparse.Namespace) -> Any:
    """The :class:`~diffpath.methods.localization.MapSpec` of the options; one-line errors for bad
    values (before any model work)."""
    from diffpath.methods.localization import MapSpec

    check_sigma(args.smooth_sigma)
    try:
        return MapSpec(args.kind, t0=tuple(args.t0), steps=args.steps, draws=args.draws,
                       reduce=args.reduce, maps=(args.map,))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def input_paths(args: argparse.Namespace) -> tuple[Path, list[Path], list[tuple[Path, str]]]:
    """The checked ``--out`` folder, the input images (never files inside ``--out``) and the inputs
    skipped while finding them (unreadable folders, non-regular files; ``--strict`` refuses them)."""
    from diffpath.data.files import NoImagesError, find_images
    from diffpath.io import check_writable

    out = check_writable(args.out, folder=True)
    _check_out(out)
    skipped: list[tuple[Path, str]] = []
    paths = [p for p in find_images(args.images, strict=args.strict, skipped=skipped)
             if not os.path.abspath(p).startswith(str(out) + os.sep) and os.path.abspath(p) != str(out)]
    if not paths:
        raise NoImagesError("no images to localise")
    return out, paths, skipped


def _cmd_localize(args: argparse.Namespace) -> None:
    import torch

    from diffpath.cli import localize_latent
    from diffpath.data.files import Preprocessing, load_images
    from diffpath.methods.localization import localize, to_image_grid

    if localize_latent.wanted(args):
        return localize_latent.run(args, input_paths=input_paths, write_outputs=write_outputs)
    if args.map == "dino":
        raise CLIError("--map dino needs a Stable Diffusion model (--model FOLDER_OR_REPO --prompt ...)")
    run = options.pass_options(args)
    spec = _check_options(args)
    out, paths, skipped = input_paths(args)
    model = run.load_model(args.model)
    if args.smooth_sigma is not None and args.smooth_sigma > model.image_size:
        raise CLIError(f"--smooth-sigma {args.smooth_sigma:g} is larger than the model's "
                       f"{model.image_size}-pixel images; give at most {model.image_size}")
    prep = Preprocessing(size=int(model.image_size), channels=int(model.channels), resize=args.resize)
    loaded = load_images(paths, prep, strict=args.strict)
    loaded.skipped[:0] = skipped
    res = localize(model, np.asarray(loaded.x0), spec, seed=args.seed, batch_size=run.batch_size,
                   smooth_sigma=args.smooth_sigma)
    if not all(np.all(np.isfinite(v)) for v in res.maps.values()):
        raise CLIError("the maps hold NaN or inf (is the model or input broken?)")
    model_maps = res.maps[args.map]
    n = write_outputs(out, loaded.paths, lambda i, gray: to_image_grid(model_maps[i : i + 1], gray.shape)[0],
                      res.scores[args.map], {"model": str(args.model), "settings": res.settings,
                                             "unet_evaluations_per_image": res.nfe,
                                             "skipped": [[str(f), r] for f, r in loaded.skipped]})
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"wrote {args.out}: {n} images localised ({len(loaded.skipped)} skipped), "
          f"{res.nfe:g} UNet evaluations per image", file=sys.stderr)


def _gray(path: Path) -> np.ndarray:
    """The image at ``path`` as (H, W) uint8 gray (ITU-R 601 luma of colour images)."""
    from diffpath.data.files import read_image

    pix = read_image(path)
    return pix if pix.ndim == 2 else (pix[..., :3] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)


def write_outputs(out: Path, paths: list[Path], map_of: Callable[[int, np.ndarray], np.ndarray],
                  scores: np.ndarray, info: dict) -> int:
    """Write the folder (module docstring) atomically. ``map_of(i, gray)`` gives image ``i``'s map
    (H, W) on the grid of its gray (H, W) uint8 pixels; one image's full-size arrays are in memory
    at a time. ``info`` goes into ``localize.json`` with the counts, the colour scale and the files.
    Returns the number of images."""
    from diffpath.io import atomic_folder

    rows, small = [], []
    with atomic_folder(out) as tmp:
        for i, p in enumerate(paths):
            gray = _gray(p)
            amap = map_of(i, gray)
            name = f"{i:04d}_{_safe_stem(p)}"
            np.save(tmp / f"{name}_map.npy", amap.astype(np.float32))
            small.append(_shrunk(gray, amap))
            rows.append({"index": i, "path": str(p), "score": f"{float(scores[i]):.6g}",
                         "map": f"{name}_map.npy", "overlay": f"{name}_overlay.png"})
            del gray, amap
        vmax = float(np.quantile(np.concatenate([m.ravel() for _, m in small]), 0.999)) or 1.0
        for row, (gray, amap) in zip(rows, small):
            (tmp / row["overlay"]).write_bytes(_overlay_png(gray, amap, vmax))
        with open(tmp / "scores.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        files = sorted([r["map"] for r in rows] + [r["overlay"] for r in rows])
        meta = {**{k: v for k, v in info.items() if k != "skipped"}, "n_images": len(rows),
                "skipped": info.get("skipped", []), "overlay_vmax": vmax, "files": files}
        (tmp / "localize.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return len(rows)
