"""``diffpath localize`` with a Stable Diffusion model: DIVAD's round trip and maps on your images.

Taken when ``--model`` is a diffusers Stable Diffusion folder (``model_index.json`` naming a Stable
Diffusion pipeline) or when ``--prompt`` / ``--class`` is given (a hub id is then fetched)::

    diffpath localize --model stabilityai/stable-diffusion-2-1-base --prompt "An image of a {class}" \\
        --class screw my_images/ --out maps/ --map dino

Each image is resized to the model's size (512² for Stable Diffusion 2.1-base; ``--resize``), sent
through the round trip (``--round-trip``: ``divad_code``, DIVAD's as its code runs it, by default;
``matched``; ``stochastic``; ``vae``: :mod:`diffpath.methods.divad`) with classifier-free guidance
(``--guidance``, 3.5) and an empty negative prompt, quantised as DIVAD saves it, and compared at
``--eval-size`` (256²) with the image: ``--map dino`` (DIVAD's DINO ViT-S/8 map, ``--dino``),
``pixel`` or ``ssim``, blurred with σ = ``--smooth-sigma`` (default DIVAD's 5 px at 256²). The map is
then resized to the image's own grid; the outputs are those of the pixel-space path
(:mod:`diffpath.cli.localize`), with UNet and VAE evaluations per image in ``localize.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffpath.cli.common import CLIError, check_sigma

__all__ = ["add_options", "wanted", "run"]

LATENT_MAPS = ("dino", "pixel", "ssim")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of the Stable Diffusion path."""
    from diffpath.methods.divad import ROUND_TRIPS
    from diffpath.methods.latent import DIVAD_PROMPT
    from diffpath.models.hub import DINO_DEFAULT

    g = p.add_argument_group("Stable Diffusion models (DIVAD's latent round trip)")
    g.add_argument("--prompt", default=None, metavar="TEXT",
                   help=f'prompt template, {{class}} replaced by --class (default "{DIVAD_PROMPT}")')
    g.add_argument("--class", dest="class_name", default=None, metavar="NAME", help="the object class, e.g. screw")
    g.add_argument("--round-trip", default="divad_code", choices=ROUND_TRIPS,
                   help="divad_code (default: as DIVAD's code runs it, mismatched schedules), matched, stochastic, vae")
    g.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale (3.5)")
    g.add_argument("--dino", default=DINO_DEFAULT, help=f"ViT for --map dino, folder or hub id ({DINO_DEFAULT})")
    g.add_argument("--eval-size", type=int, default=256, help="side of the maps before they go to each image's grid")


def wanted(args: argparse.Namespace) -> bool:
    """Whether the command runs the Stable Diffusion path."""
    if args.prompt is not None or args.class_name is not None:
        return True
    index = Path(str(args.model)) / "model_index.json"
    return index.is_file() and "StableDiffusion" in str(json.loads(index.read_text()).get("_class_name", ""))


def _eval_images(paths: list[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each image resized (PIL bilinear) for the maps, gray ones as RGB."""
    from PIL import Image

    from diffpath.data.files import read_image

    out = []
    for p in paths:
        pix = read_image(p)
        pix = np.repeat(pix[..., None], 3, -1) if pix.ndim == 2 else pix[..., :3]
        out.append(np.asarray(Image.fromarray(pix).resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(out)


def _checked(args: argparse.Namespace) -> None:
    if args.map not in LATENT_MAPS:
        raise CLIError(f"--map {args.map} is not available for Stable Diffusion models; choose {', '.join(LATENT_MAPS)}")
    check_sigma(args.smooth_sigma)
    if args.eval_size < 8:
        raise CLIError(f"--eval-size must be at least 8, got {args.eval_size}")


def run(args: argparse.Namespace, *, input_paths: Callable, write_outputs: Callable) -> None:
    """The Stable Diffusion path of ``diffpath localize`` (module docstring); the folder checks
    and the writer are the pixel-space path's (``input_paths``, ``write_outputs``)."""
    import torch

    from diffpath.data.files import Preprocessing, load_images
    from diffpath.methods.latent import DIVAD_PROMPT, LatentDiffusion, prompt_for
    from diffpath.methods.maps import to_image_grid
    from diffpath.models import ModelLoadError, resolve_device

    _checked(args)
    template = DIVAD_PROMPT if args.prompt is None else args.prompt
    try:
        prompt_for(template, args.class_name or "")
    except ValueError:
        raise CLIError(f'the prompt "{template}" needs --class NAME (e.g. --class screw)') from None
    out, paths, skipped = input_paths(args)
    dev = resolve_device(args.device)
    try:
        ld = LatentDiffusion.from_pretrained(args.model, device=dev)
        features = _features(args, dev)
    except ModelLoadError as exc:
        raise CLIError(str(exc)) from exc
    loaded = load_images(paths, Preprocessing(size=ld.image_size, channels=3, resize=args.resize), strict=args.strict)
    loaded.skipped[:0] = skipped
    maps, scores, cost = _localize(ld, features, loaded.x0, _eval_images(loaded.paths, args.eval_size), args,
                                   template)
    n = write_outputs(out, loaded.paths, lambda i, g: to_image_grid(maps[i:i + 1], g.shape)[0], scores, {
        "model": str(args.model), "settings": _settings(args, template, ld), **cost,
        "skipped": [[str(f), r] for f, r in loaded.skipped]})
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    print(f"wrote {args.out}: {n} images localised ({len(loaded.skipped)} skipped), "
          f"{cost['unet_evaluations_per_image']:g} UNet and {cost['vae_evaluations_per_image']:g} VAE evaluations "
          "per image", file=sys.stderr)


def _features(args: argparse.Namespace, dev):
    from diffpath.methods.dino import PatchFeatures

    return PatchFeatures.from_pretrained(args.dino, device=dev) if args.map == "dino" else None


def _settings(args: argparse.Namespace, template: str, ld) -> dict:
    from diffpath.methods.divad import RoundTripSpec

    plan = RoundTripSpec(args.round_trip).plan(ld.scheduler_config)
    return {"prompt": template, "class": args.class_name, "round_trip": args.round_trip,
            "latent_level": plan.latent_level, "sample_from": plan.sample_from, "guidance": args.guidance,
            "map": args.map, "dino": args.dino if args.map == "dino" else None, "eval_size": args.eval_size,
            "smooth_sigma": _sigma(args), "seed": args.seed, "vae": "mean", "image_size": ld.image_size}


def _sigma(args: argparse.Namespace) -> float:
    from diffpath.methods.dino import DINO_SIGMA

    return DINO_SIGMA * args.eval_size / 256 if args.smooth_sigma is None else float(args.smooth_sigma)


def _localize(ld, features, x0: np.ndarray, eval_u8: np.ndarray, args: argparse.Namespace, template: str):
    """(N, E, E) maps, (N,) scores and the cost per image, batch by batch."""
    import torch

    from diffpath.methods.divad import RoundTripSpec, latent_round_trip, to_uint8
    from diffpath.methods.dino import dino_distance_map
    from diffpath.methods.localization import batch_generator
    from diffpath.methods.maps import anomaly_maps, gaussian_smooth
    from diffpath.scoring.anomaly_metrics import pooled_max_scores

    from diffpath.cli.options import DEFAULT_BATCH_SIZE

    plan = RoundTripSpec(args.round_trip).plan(ld.scheduler_config)
    batch = 8 if args.batch_size == DEFAULT_BATCH_SIZE else args.batch_size  # Stable Diffusion at 512²: 8 by default
    cond = ld.prompt_embeddings(template, args.class_name or "")
    uncond = ld.embed([""]) if args.guidance != 1.0 else None
    E, sigma, dev, maps = args.eval_size, _sigma(args), ld.device, []
    for lo in range(0, len(x0), batch):
        x = torch.from_numpy(np.ascontiguousarray(x0[lo:lo + batch])).to(dev)
        res = latent_round_trip(ld, x, plan, cond=cond, uncond=uncond, guidance_scale=args.guidance,
                                generator=batch_generator(args.seed, lo, dev))
        rec = torch.nn.functional.interpolate(to_uint8(res.x_hat.flatten(0, 1)).movedim(-1, 1).float(), size=(E, E),
                                              mode="bilinear", antialias=True).round() / 127.5 - 1
        xe = torch.from_numpy(eval_u8[lo:lo + batch]).to(dev).movedim(-1, 1).float() / 127.5 - 1
        xe = xe.repeat(res.x_hat.shape[0], 1, 1, 1)
        if args.map == "dino":
            m = dino_distance_map(features, xe, rec, sigma=sigma)
        else:
            m = gaussian_smooth(anomaly_maps(xe, rec, [args.map], smooth_sigma=0.0)[args.map], sigma)
        maps.append(m.view(res.x_hat.shape[0], -1, E, E).mean(0).cpu().numpy())
    amaps = np.concatenate(maps)
    cost = {"unet_evaluations_per_image": plan.nfe(args.guidance), "vae_evaluations_per_image": plan.vae_evals()}
    return amaps, pooled_max_scores(amaps), cost
