"""``diffpath fit`` and ``diffpath score``: :class:`~diffpath.detector.Detector` on folders of images.

Each keeps its resumable work in ``OUT.work/`` beside its output (:mod:`diffpath.workarea`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from diffpath.cli import options
from diffpath.cli.common import CLIError, report_kept_work

if TYPE_CHECKING:
    from diffpath.detector import Detector, ScoreResult

__all__ = ["add_commands", "SCORE_COLUMNS"]

#: What ``diffpath score`` writes (its ``--help`` epilog).
SCORE_COLUMNS = """\
the CSV's columns:
  path        the image file
  score       the log-density of the image's features under the density fitted on the normal
              images (higher = more typical of them)
  percentile  the percentage of the detector's calibration scores (normal images held out from
              the fit) strictly below this score: near 0 = less typical than almost every normal
              image
  is_ood      1 when score < the threshold, the split-conformal threshold of the calibration
              scores at --accept: a new normal image is flagged with probability at most
              1 - accept; 0 otherwise
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    from diffpath.data.files import RESIZE_MODES
    from diffpath.detector import CALIBRATION
    from diffpath.methods.registry import METHODS

    f = sub.add_parser("fit", help="fit a detector on a folder of normal images",
                       description="Compute features of normal images and fit the density scorer; "
                       "writes a self-describing detector folder.")
    options.add_model(f)
    f.add_argument("--normal", required=True, nargs="+", metavar="DIR_OR_GLOB",
                   help="normal images: folders (recursive), globs or files")
    f.add_argument("--method", default="diffpathv2", help=f"one of: {', '.join(METHODS)} (diffpathv2)")
    f.add_argument("--out", required=True, metavar="DETECTOR_DIR", help="the detector folder to write")
    options.add_steps(f, help="timesteps / DDIM steps")
    f.add_argument("--seed", type=int, default=0,
                   help="seed of DiffPathV2's noise and of the calibration split (0)")
    f.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    f.add_argument("--resize", default="auto", choices=RESIZE_MODES,
                   help="how images reach the model's size (auto)")
    f.add_argument("--accept", type=float, default=0.95,
                   help="the threshold accepts a new normal image with probability at least "
                   "ceil(accept·(n+1))/(n+1) ≥ accept, n = calibration images (0.95)")
    f.add_argument("--calibration", type=float, default=CALIBRATION, metavar="FRACTION",
                   help=f"share of the normal images held out to calibrate the threshold ({CALIBRATION})")
    _add_strict_and_run(f)
    f.set_defaults(handler=_cmd_fit)

    s = sub.add_parser("score", help="score images with a fitted detector",
                       description="Write path,score,percentile,is_ood for each image.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SCORE_COLUMNS)
    s.add_argument("--detector", required=True, metavar="DETECTOR_DIR", help="a folder written by fit")
    s.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="images, folders or globs")
    s.add_argument("--out", required=True, help="the CSV to write")
    s.add_argument("--plot", default=None, help="also draw the score histogram (.png, .pdf, .svg)")
    s.add_argument("--accept", type=float, default=None,
                   help="accept new normal images with probability at least this (default: the "
                   "detector's, 0.95)")
    options.add_model(s, required=False,
                      help="use this model instead of the detector's (its fingerprint must match)")
    _add_strict_and_run(s)
    s.set_defaults(handler=_cmd_score)


def _add_strict_and_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    options.add_run(p)


def _cmd_fit(args: argparse.Namespace) -> None:
    from diffpath.detector import Detector
    from diffpath.detector_folder import check_replaceable
    from diffpath.io import check_writable
    from diffpath.workarea import WorkAreaBusy, work_dir_for

    out = Path(os.path.abspath(args.out))
    wd = work_dir_for(out)
    det = Detector(args.model, method=args.method, steps=args.steps, seed=args.seed,
                   clip_denoised=not args.no_clip, resize=args.resize, accept=args.accept,
                   calibration=args.calibration, strict=args.strict,
                   run=options.pass_options(args, work_dir=wd))
    det.check_settings()  # bad settings fail before anything is written
    if out.exists():
        check_replaceable(out)
    check_writable(out, folder=True)
    try:
        det.fit(args.normal)
    except WorkAreaBusy:  # the work folder is another run's
        raise
    except BaseException:
        report_kept_work(wd)
        raise
    det.save(out)
    print(f"wrote {args.out}: {_fit_summary(det)}", file=sys.stderr)


def _fit_summary(det: Detector) -> str:
    """What ``fit`` learned, and what its threshold promises (split-conformal)."""
    t, th = det.meta_["training"], det.meta_["threshold"]
    n, acc = t["n_calibration"], th["accept"]
    bound = n + 1 - th["rank"]
    head = (f"{t['n_images']} normal images ({t['n_skipped']} skipped), method "
            f"{det.meta_['features']['method']}: scorer fitted on {t['n_fit']}, threshold calibrated on "
            f"the other {n}")
    if th["rank"] == 0:
        return head + f"; too few to flag anything at accept {acc:g}: the threshold accepts every image"
    return (head + f"; threshold {det.threshold_:.6g} (rank {th['rank']} of the {n} calibration scores, "
            f"from the lowest) accepts a new normal image with probability at least ⌈{acc:g}·{n + 1}⌉/{n + 1} = "
            f"{bound}/{n + 1} = {th['guarantee']:.1%} (split-conformal)")


def _cmd_score(args: argparse.Namespace) -> None:
    from diffpath.data.files import NoImagesError, find_images
    from diffpath.detector import Detector, csv_path
    from diffpath.io import check_writable
    from diffpath.scoring.threshold import check_accept
    from diffpath.workarea import WorkAreaBusy, work_dir_for

    run = options.pass_options(args)
    if args.accept is not None:
        check_accept(args.accept)
    out = check_writable(args.out)
    plot = check_writable(args.plot) if args.plot else None
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise CLIError(f"--plot must end in .png, .pdf or .svg, got {args.plot}")
    if plot == out:
        raise CLIError("--plot and --out must differ")
    wd = work_dir_for(out)
    det = Detector.load(args.detector, run=run).set_run(work_dir=wd).set_params(strict=args.strict)
    if args.model is not None:
        det.set_params(model=args.model)
    mine = {str(p) for p in (out, plot) if p is not None}
    skipped: list[tuple[Path, str]] = []
    paths = [p for p in find_images(args.images, strict=args.strict, skipped=skipped)
             if os.path.abspath(p) not in mine]
    if not paths:
        raise NoImagesError("no images to score (only this command's own outputs matched)")
    try:
        res = det.score_images(paths, accept=args.accept)
    except WorkAreaBusy:  # the work folder is another run's
        raise
    except BaseException:
        report_kept_work(wd)
        raise
    res.skipped[:0] = [(str(p), r) for p, r in skipped]
    for p in res.paths:
        if csv_path(p) != p:
            warnings.warn(f"file name {csv_path(p)} is not UTF-8; the CSV writes its undecodable "
                          "bytes as \\xNN", UserWarning, stacklevel=1)
    _write_scores(args, det, res, out, plot)


def _write_scores(args: argparse.Namespace, det: Detector, res: ScoreResult, out: Path,
                  plot: Path | None) -> None:
    """The CSV (and the plot) of ``res``, both or neither."""
    from diffpath.io import atomic_paths
    from diffpath.scoring.plot import plot_scores

    targets = [out] + ([plot] if plot is not None else [])
    with atomic_paths(*targets) as tmps:
        tmps[0].write_text(res.to_csv(), encoding="utf-8")
        if plot is not None:
            tmps[1].write_bytes(plot_scores(
                det.calibration_scores_, res.scores, res.threshold, accept=res.accept,
                title=f"{Path(args.detector).name}: {det.meta_['features']['method']}",
                fmt=plot.suffix.lower().lstrip(".")))
    print(f"wrote {args.out}: {len(res.paths)} images scored ({len(res.skipped)} skipped), "
          f"{int(res.is_ood.sum())} flagged OOD at threshold {res.threshold:.6g} (accepts a new normal "
          f"image with probability at least {det.guarantee(res.accept):.1%})"
          + (f"; plot {args.plot}" if plot else ""), file=sys.stderr)
