"""``python -m diffpath.study STAGE [ITEM]``: run one stage of the study.

Examples::

    python -m diffpath.study errors fashion_mnist        # one foreach item of the errors stage
    python -m diffpath.study scorers -p scorers.kde.bandwidth=2.0
    python -m diffpath.study --list

``dvc.yaml`` is written by ``python -m diffpath.study.pipeline`` (:mod:`diffpath.study.pipeline`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from diffpath.study.layout import StageInputError
from diffpath.study.runner import apply_overrides, render_html, run_stage, stage_label
from diffpath.study.stages import PIPELINES, load_params


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study", description=__doc__.split("\n")[0])
    ap.add_argument("stage", nargs="?", help=f"one of: {', '.join(n for s in PIPELINES.values() for n in s)}")
    ap.add_argument("item", nargs="?", help="the foreach item (data set) of data/errors")
    ap.add_argument("--params", default="params.yaml", help="parameters file (default params.yaml)")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter for this run only (YAML value)")
    ap.add_argument("--html", metavar="FILE", help="also render the executed notebook to HTML")
    ap.add_argument("--list", action="store_true", help="list the stages and their parameters")
    args = ap.parse_args(argv)
    if args.list or not args.stage:
        for name, st in ((n, s) for stages in PIPELINES.values() for n, s in stages.items()):
            print(f"{name:16s} {st.notebook:36s} params: {', '.join(st.params)}"
                  + (f"  foreach: {st.item}" if st.item else ""))
        return 0
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        apply_overrides(params, args.overrides)
        out = run_stage(args.stage, args.item, params=params, progress=sys.stderr.isatty())
        if args.html:
            render_html(out, args.html)
    except (ValueError, KeyError, FileNotFoundError, StageInputError) as exc:
        print(f"diffpath.study: error: {exc}", file=sys.stderr)
        return 2
    print(done_line(stage_label(args.stage, args.item), time.perf_counter() - start, out), file=sys.stderr)
    return 0


def done_line(label: str, seconds: float, out: os.PathLike | str) -> str:
    """The one line a finished stage prints: its name, its wall time and its executed notebook."""
    return f"{label:26s} {seconds:7.1f} s   {os.path.relpath(out)}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
