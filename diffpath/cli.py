"""The ``diffpath`` command line: every command's arguments, and thin handlers.

* ``diffpath features --model SPEC --images FILE.npz --method diffpath --steps N --out OUT.npz``
  computes a method's features for a batch of images. SPEC is a diffusers model folder, or an
  improved-diffusion ``.pt`` with its settings JSON beside it under the same stem. FILE.npz holds
  ``x0`` (float, B×C×H×W, in [-1, 1]) or ``images`` (uint8, B×H×W or B×H×W×C).
* ``diffpath fit`` / ``diffpath score``: :mod:`diffpath.detector` on folders of image files.
* ``diffpath export-images``: :func:`diffpath.data.export.export_images` (offline demo data).
* ``diffpath localize --model SPEC IMAGES... --out DIR``: anomaly maps, overlays and image scores
  (:mod:`diffpath.localize_cli`).

Errors in the input, and file-system errors, end the run with a one-line message on stderr and
exit status 2; the outputs are checked to be writable before any model work starts, and nothing
is written unless the run succeeds (outputs are written atomically, a CSV and its plot together).
Two runs with the same ``--out`` cannot overlap: the second refuses (:mod:`diffpath.workarea`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["build_parser", "main"]


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
    f.set_defaults(handler=_features)

    _add_detector_commands(sub)
    _add_export_command(sub)
    from diffpath.localize_cli import add_localize_command

    add_localize_command(sub, _add_common)
    return parser


def _features(args: argparse.Namespace) -> None:
    from diffpath.io import check_writable, load_images_npz, save_npz_atomic
    from diffpath.methods.diffpath import DIFFPATH_STAT_NAMES, diffpath_statistics
    from diffpath.methods.registry import get_method
    from diffpath.models import RunOptions, load_model, resolve_device
    from diffpath.methods.diffpathv2 import ScoreErrorConfig
    from diffpath.study.cache import CacheConfig, compute_cache

    method = get_method(args.method)
    out = Path(args.out)
    if out.suffix != ".npz":
        raise CLIError(f"--out must end in .npz, got {out}")
    check_writable(out)
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
        score_error=ScoreErrorConfig(seed=args.seed),
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
        with _cli_warnings():
            args.handler(args)
    except (CLIError, InputError, ModelLoadError, OSError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())  # one line
        print(f"diffpath: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffpath: interrupted", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------------------------
# fit / score / export-images


def _add_detector_commands(sub: argparse._SubParsersAction) -> None:
    from diffpath.data.files import RESIZE_MODES
    from diffpath.methods.registry import METHODS

    f = sub.add_parser("fit", help="fit a detector on a folder of normal images",
                       description="Compute features of normal images and fit the density scorer; "
                       "writes a self-describing detector folder.")
    f.add_argument("--model", required=True, help="diffusers folder, improved-diffusion .pt, or hub id")
    f.add_argument("--normal", required=True, nargs="+", metavar="DIR_OR_GLOB",
                   help="normal images: folders (recursive), globs or files")
    f.add_argument("--method", default="diffpathv2", help=f"one of: {', '.join(METHODS)} (diffpathv2)")
    f.add_argument("--out", required=True, metavar="DETECTOR_DIR", help="the detector folder to write")
    f.add_argument("--steps", type=int, default=10, help="timesteps / DDIM steps (10)")
    f.add_argument("--seed", type=int, default=0, help="seed of DiffPathV2's noise (0)")
    f.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    f.add_argument("--resize", default="auto", choices=RESIZE_MODES,
                   help="how images reach the model's size (auto)")
    f.add_argument("--accept", type=float, default=0.95,
                   help="fraction of normal images the stored threshold accepts (0.95)")
    _add_run(f)
    f.set_defaults(handler=_cmd_fit)

    s = sub.add_parser("score", help="score images with a fitted detector",
                       description="Write path,score,percentile,is_ood for each image.")
    s.add_argument("--detector", required=True, metavar="DETECTOR_DIR", help="a folder written by fit")
    s.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="images, folders or globs")
    s.add_argument("--out", required=True, help="the CSV to write")
    s.add_argument("--plot", default=None, help="also draw the score histogram (.png, .pdf, .svg)")
    s.add_argument("--accept", type=float, default=None,
                   help="fraction of normal images to accept (default: the detector's, 0.95)")
    s.add_argument("--model", default=None,
                   help="use this model instead of the detector's (its fingerprint must match)")
    _add_run(s)
    s.set_defaults(handler=_cmd_score)


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk (1024)")
    _add_common(p)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export-images", help="write a data set's images as files (offline demo data)")
    e.add_argument("dataset", help="a registered data set (e.g. fashion_mnist, mnist, letters, noise)")
    e.add_argument("--split", default="train", choices=["train", "test"])
    e.add_argument("--n", type=int, default=None, help="how many images (default: the whole split)")
    e.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    e.add_argument("--format", default="png", help="png (default), jpg, bmp, tiff or webp")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(handler=_cmd_export)


@contextmanager
def _cli_warnings() -> Iterator[None]:
    """Show warnings (skipped files, the GMM grid shrinking...) as one ``diffpath: warning:`` line."""
    from diffpath.data.files import ImageSkippedWarning

    def show(message, category, filename, lineno, file=None, line=None):
        from tqdm.auto import tqdm

        tqdm.write(f"diffpath: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter("always", ImageSkippedWarning)
        warnings.showwarning = show
        yield


def _check_run_args(args: argparse.Namespace) -> None:
    from diffpath.scoring.threshold import check_accept

    if args.batch_size < 1 or args.chunk_size < 1:
        raise CLIError("--batch-size and --chunk-size must be positive")
    if args.accept is not None:
        check_accept(args.accept)


def _kept_work(wd: Path) -> None:
    if wd.exists():
        print(f"diffpath: partial work kept in {wd}; rerun the same command to resume", file=sys.stderr)


def _cmd_fit(args: argparse.Namespace) -> None:
    from diffpath.detector import Detector
    from diffpath.detector_folder import check_replaceable
    from diffpath.io import check_writable
    from diffpath.methods.registry import get_method
    from diffpath.workarea import WorkAreaBusy, work_dir_for

    get_method(args.method)  # an unknown method fails before any work
    if args.steps < 2:
        raise CLIError("--steps must be at least 2")
    _check_run_args(args)
    out = Path(os.path.abspath(args.out))
    if out.exists():
        check_replaceable(out)
    check_writable(out, folder=True)
    wd = work_dir_for(out)
    try:
        det = Detector.fit(
            args.model, args.normal, method=args.method, steps=args.steps, seed=args.seed,
            clip_denoised=not args.no_clip, resize=args.resize, accept=args.accept,
            strict=args.strict, device=args.device, precision=args.precision,
            batch_size=args.batch_size, chunk_size=args.chunk_size, work_dir=wd,
            progress=not args.no_progress,
        )
    except WorkAreaBusy:  # the work folder is another run's
        raise
    except BaseException:
        _kept_work(wd)
        raise
    det.save(out)
    t = det.meta["training"]
    print(f"wrote {args.out}: {t['n_images']} normal images ({t['n_skipped']} skipped), method "
          f"{det.meta['features']['method']}, threshold {det.threshold:.6g} accepts "
          f"{det.accept:.0%} of them", file=sys.stderr)


def _cmd_score(args: argparse.Namespace) -> None:
    from diffpath.data.files import NoImagesError, find_images
    from diffpath.detector import Detector, csv_path
    from diffpath.io import atomic_paths, check_writable
    from diffpath.scoring.plot import plot_scores
    from diffpath.workarea import WorkAreaBusy, work_dir_for

    _check_run_args(args)
    out = check_writable(args.out)
    plot = check_writable(args.plot) if args.plot else None
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise CLIError(f"--plot must end in .png, .pdf or .svg, got {args.plot}")
    if plot == out:
        raise CLIError("--plot and --out must differ")
    det = Detector.load(args.detector)
    wd = work_dir_for(out)
    mine = {str(p) for p in (out, plot) if p is not None}
    paths = [p for p in find_images(args.images) if os.path.abspath(p) not in mine]
    if not paths:
        raise NoImagesError("no images to score (only this command's own outputs matched)")
    try:
        res = det.score_images(
            paths, model=args.model, accept=args.accept, strict=args.strict, device=args.device,
            precision=args.precision, batch_size=args.batch_size, chunk_size=args.chunk_size,
            work_dir=wd, progress=not args.no_progress,
        )
    except WorkAreaBusy:  # the work folder is another run's
        raise
    except BaseException:
        _kept_work(wd)
        raise
    for p in res.paths:
        if csv_path(p) != p:
            warnings.warn(f"file name {csv_path(p)} is not UTF-8; the CSV writes its undecodable "
                          "bytes as \\xNN", UserWarning, stacklevel=1)
    targets = [out] + ([plot] if plot is not None else [])
    with atomic_paths(*targets) as tmps:  # both or neither
        tmps[0].write_text(res.to_csv(), encoding="utf-8")
        if plot is not None:
            tmps[1].write_bytes(plot_scores(
                det.train_scores, res.scores, res.threshold, accept=res.accept,
                title=f"{Path(args.detector).name}: {det.meta['features']['method']}",
                fmt=plot.suffix.lower().lstrip(".")))
    print(f"wrote {args.out}: {len(res.paths)} images scored ({len(res.skipped)} skipped), "
          f"{int(res.is_ood.sum())} flagged OOD at threshold {res.threshold:.6g} (accepts "
          f"{res.accept:.0%} of normal images)" + (f"; plot {args.plot}" if plot else ""),
          file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> None:
    from diffpath.data.export import export_images

    files = export_images(args.dataset, args.out, split=args.split, n=args.n, seed=args.seed,
                          fmt=args.format)
    print(f"wrote {len(files)} images of {args.dataset}/{args.split} to {args.out}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
