"""``diffpath export-images``: a registered data set's images as files (offline demo data)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_command"]


def add_command(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export-images", help="write a data set's images as files (offline demo data)")
    e.add_argument("dataset", help="a registered data set (e.g. fashion_mnist, mnist, letters, noise)")
    e.add_argument("--split", default="train", choices=["train", "test"])
    e.add_argument("--n", type=int, default=None, help="how many images (default: the whole split)")
    e.add_argument("--seed", type=int, default=0, help="seed of the subset (default 0)")
    e.add_argument("--format", default="png", help="png (default), jpg, bmp, tiff or webp")
    e.add_argument("--out", required=True, help="output folder")
    e.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> None:
    from diffpath.data.export import export_images

    files = export_images(args.dataset, args.out, split=args.split, n=args.n, seed=args.seed,
                          fmt=args.format)
    print(f"wrote {len(files)} images of {args.dataset}/{args.split} to {args.out}", file=sys.stderr)
