"""The ``diffpath`` command line: every command's arguments, and thin handlers.

* ``diffpath features --model SPEC --images FILE.npz --method diffpath --steps N --out OUT.npz``
  computes a method's features for a batch of images (:mod:`diffpath.cli.features`).
* ``diffpath fit`` / ``diffpath score``: :mod:`diffpath.detector` on folders of image files
  (:mod:`diffpath.cli.detect`).
* ``diffpath export-images``: :func:`diffpath.data.export.export_images` (offline demo data).
* ``diffpath localize --model SPEC IMAGES... --out DIR``: anomaly maps, overlays and image scores
  (:mod:`diffpath.cli.localize`).

The model and run options (``--model``, ``--device``, ``--precision``, ``--batch-size``, ...) are
the same for every command, with the same defaults (:mod:`diffpath.cli.options`).

Errors in the input, and file-system errors (a full disk included), end the run with a one-line
message on stderr and exit status 2; the outputs are checked to be writable (a regular file or
absent, never a device or FIFO) before any model work starts, and nothing is written unless the
run succeeds (outputs are written atomically, a CSV and its plot together).
Two runs with the same ``--out`` cannot overlap: the second refuses (:mod:`diffpath.workarea`).
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence

from diffpath.cli.common import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from diffpath import __version__
    from diffpath.cli import detect, export, features, localize

    parser = argparse.ArgumentParser(
        prog="diffpath",
        description="Zero-shot OOD detection with pretrained diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffpath {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    features.add_command(sub)
    detect.add_commands(sub)
    export.add_command(sub)
    localize.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from diffpath.cli.common import cli_warnings
    from diffpath.io import InputError, os_error_line
    from diffpath.models import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with cli_warnings():
            args.handler(args)
    except (CLIError, InputError, ModelLoadError, OSError, ValueError, RuntimeError) as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        msg = " ".join((os_error_line(exc) if full else str(exc)).split())  # one line
        print(f"diffpath: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffpath: interrupted", file=sys.stderr)
        return 130
    return 0
