"""The ``diffpath`` command line.

``diffpath features --model SPEC --images FILE.npz --method diffpath --steps N --out OUT.npz``
computes a method's features for a batch of images. SPEC is a diffusers model folder, or an
improved-diffusion ``.pt`` with its settings JSON beside it under the same stem. FILE.npz holds
``x0`` (float, B×C×H×W, in [-1, 1]) or ``images`` (uint8, B×H×W or B×H×W×C).

Errors in the input end the run with a one-line message on stderr and exit status 2; nothing is
written unless the run succeeds (outputs are written atomically).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """An error to report in one line."""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=128, help="images per model call")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    from diffpath import __version__
    from diffpath.methods.registry import METHODS

    parser = argparse.ArgumentParser(
        prog="diffpath",
        description="Zero-shot OOD detection with pretrained diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffpath {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("features", help="compute a method's features for a batch of images")
    f.add_argument("--model", required=True, help="diffusers folder, improved-diffusion .pt, or hub id")
    f.add_argument("--images", required=True, help=".npz with x0 (float, B×C×H×W) or images (uint8)")
    f.add_argument("--method", default="diffpath", help=f"one of: {', '.join(METHODS)}")
    f.add_argument("--steps", type=int, default=10, help="DDIM steps / score-error timesteps (10)")
    f.add_argument("--out", required=True, help="output .npz")
    f.add_argument("--seed", type=int, default=0, help="seed of DiffPathV2's noise")
    f.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    _add_common(f)

    try:
        from diffpath.detector import add_cli_commands  # fit / score, when available
    except ImportError:
        pass
    else:
        add_cli_commands(sub, _add_common)
    return parser


def _features(args: argparse.Namespace) -> None:
    from pathlib import Path

    from diffpath.study.cache import CacheConfig, compute_cache
    from diffpath.methods.diffpath import DIFFPATH_STAT_NAMES, diffpath_statistics
    from diffpath.io import load_images_npz, save_npz_atomic
    from diffpath.methods.registry import get_method
    from diffpath.models import RunOptions, load_model, resolve_device

    method = get_method(args.method)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise CLIError(f"--out must end in .npz, got {out}")
    if args.steps < 2:
        raise CLIError("--steps must be at least 2")
    if args.batch_size < 1:
        raise CLIError("--batch-size must be positive")
    device = resolve_device(args.device)
    model = load_model(args.model, device=device, options=RunOptions(precision=args.precision))
    x0 = load_images_npz(args.images, channels=model.channels, size=model.image_size)
    if len(x0) == 0:
        raise CLIError(f"{args.images}: holds no images")
    cfg = CacheConfig(
        families=(method.family,),
        steps=args.steps,
        clip_denoised=not args.no_clip,
        seed=args.seed,
        batch_size=args.batch_size,
        chunk_size=max(args.batch_size, 4096),
    )
    cache = compute_cache(model, x0, cfg, out=None, progress=not args.no_progress)
    assert cache is not None
    arrays: dict[str, np.ndarray] = {}
    if method.family == "diffpath":
        stats = diffpath_statistics(cache["dp_eps"], cache["dp_deps"])
        arrays.update({k: stats[k] for k in DIFFPATH_STAT_NAMES})
        from diffpath.methods.registry import METHODS

        arrays["features_6d"] = METHODS["diffpath"].features(cache)
        arrays["curvature_1d"] = METHODS["diffpath_1d"].features(cache)[:, 0]
        arrays["timesteps"] = cache["dp_timesteps"]
    else:
        arrays["timesteps"] = cache["v2_timesteps"]
    feats = method.features(cache)
    if not np.all(np.isfinite(feats)):
        raise CLIError("the features hold NaN or inf (is the model or input broken?)")
    arrays["features"] = feats
    if method.dims == 6:
        arrays["features_6d"] = feats
    elif method.dims == 1:
        arrays["features_1d"] = feats[:, 0]
    save_npz_atomic(out, arrays)
    print(f"wrote {out} ({len(x0)} images, method {method.name}, {feats.shape[1]}-D)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from diffpath.io import InputError
    from diffpath.models import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "features":
            _features(args)
        else:
            handler = getattr(args, "handler", None)
            if handler is None:  # pragma: no cover - argparse enforces the choices
                parser.error(f"unknown command {args.command}")
            handler(args)
    except (CLIError, InputError, ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())  # one line
        print(f"diffpath: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffpath: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
