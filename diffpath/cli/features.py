"""``diffpath features``: a method's features for a batch of images in one ``.npz``.

SPEC is any model :func:`diffpath.models.load_model` reads; FILE.npz holds ``x0`` (float,
B×C×H×W, in [-1, 1]) or ``images`` (uint8, B×H×W or B×H×W×C). The pass runs in memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from diffpath.cli import options
from diffpath.cli.common import CLIError

__all__ = ["add_command"]

#: Images per in-memory chunk (a multiple of every usual batch size; only the progress bar sees it).
_IN_MEMORY_CHUNK = 4096


def add_command(sub: argparse._SubParsersAction) -> None:
    from diffpath.methods.registry import METHODS

    f = sub.add_parser("features", help="compute a method's features for a batch of images")
    options.add_model(f)
    f.add_argument("--images", required=True, help=".npz with x0 (float, B×C×H×W) or images (uint8)")
    f.add_argument("--method", default="diffpath", help=f"one of: {', '.join(METHODS)}")
    options.add_steps(f)
    f.add_argument("--out", required=True, help="output .npz")
    f.add_argument("--seed", type=int, default=0, help="seed of DiffPathV2's noise")
    f.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    options.add_run(f, chunks=False)
    f.set_defaults(handler=_cmd_features)


def _cmd_features(args: argparse.Namespace) -> None:
    from diffpath.cache import compute_cache
    from diffpath.data.arrays import load_images_npz
    from diffpath.io import check_writable, save_npz_atomic
    from diffpath.methods.diffpathv2 import ScoreErrorConfig
    from diffpath.methods.registry import get_method

    method = get_method(args.method)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise CLIError(f"--out must end in .npz, got {out}")
    run = options.pass_options(args)
    cfg = options.cache_config(args, families=(method.family,), clip_denoised=not args.no_clip,
                               score_error=ScoreErrorConfig(seed=args.seed),
                               chunk_size=max(args.batch_size, _IN_MEMORY_CHUNK))
    check_writable(out)
    model = run.load_model(args.model)
    x0 = load_images_npz(args.images, channels=model.channels, size=model.image_size)
    if len(x0) == 0:
        raise CLIError(f"{args.images}: holds no images")
    cache = compute_cache(model, x0, cfg, out=None, progress=run.progress)
    assert cache is not None
    arrays = _feature_arrays(method, cache)
    save_npz_atomic(out, arrays)
    print(f"wrote {out} ({len(x0)} images, method {method.name}, {arrays['features'].shape[1]}-D)",
          file=sys.stderr)


def _feature_arrays(method: Any, cache: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ``features`` writes: the method's features (N, D) under ``features`` (and
    ``features_6d``/``features_1d``), its timesteps and, for DiffPath, every statistic."""
    from diffpath.methods.diffpath import DIFFPATH_STAT_NAMES, diffpath_statistics
    from diffpath.methods.registry import METHODS

    arrays: dict[str, np.ndarray] = {}
    if method.family == "diffpath":
        stats = diffpath_statistics(cache["dp_eps"], cache["dp_deps"])
        arrays.update({k: stats[k] for k in DIFFPATH_STAT_NAMES})
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
    return arrays
