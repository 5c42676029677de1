"""Base models side by side: ``python -m diffpath.study.compare MODEL[=TRAINED_ON] ...``.

Each model's run of the paper profile has its own output roots (the profile's own model:
``reports/paper``; any other: ``reports/paper-TAG``, :func:`diffpath.study.profiles.paper_variant_text`).
This reads every run's ``results.csv``, puts each method's mean AUROC beside the published average for
the model's training set (DiffPath: CelebA .931, ImageNet .850; :mod:`diffpath.study.published`) and
writes ``models.md`` / ``models.csv`` to ``<profile reports root>-compare/`` (``reports/paper-compare``).
``make paper-compare`` runs the profile with each model of ``MODELS`` first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from diffpath.io import atomic_path, write_text_atomic
from diffpath.study.published import comparison_markdown, load_published, model_comparison

__all__ = ["run_reports", "compare_models", "main"]


def run_reports(template: str, spec: str) -> tuple[Path, str | None]:
    """(reports root, training set) of the profile's run with model ``spec``."""
    from diffpath.study.profiles import paper_variant_text

    params = yaml.safe_load(paper_variant_text(template, spec))
    return Path(params["layout"]["reports"]), params["report"].get("base_model")


def compare_models(models: Sequence[str], template: str, root: Path = Path(".")) -> tuple[pd.DataFrame, Path]:
    """The comparison table of ``models`` (``SPEC`` or ``SPEC=TRAINED_ON``) and the folder it was written to.

    Raises:
        FileNotFoundError: a model's run has no ``results.csv`` (the message says how to make it).
    """
    results, bases = {}, {}
    for entry in models:
        spec, _, trained_on = entry.partition("=")
        reports, base = run_reports(template, spec)
        path = root / reports / "results.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results for {spec}; run `make paper MODEL={spec}` first")
        results[spec], bases[spec] = pd.read_csv(path), trained_on or base or "unknown"
    table = model_comparison(results, bases, load_published())
    out = root / f"{yaml.safe_load(template)['layout']['reports']}-compare"
    with atomic_path(out / "models.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    write_text_atomic(out / "models.md", comparison_markdown(table))
    return table, out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study.compare", description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model specs as given to `make paper MODEL=...` (zoo names: "
                                              "diffpath-celeba32 imagenet64), each optionally =TRAINED_ON")
    ap.add_argument("--params", default="params-paper.yaml", help="the profile's params (default params-paper.yaml)")
    args = ap.parse_args(argv)
    try:
        table, out = compare_models(args.models, Path(args.params).read_text())
    except FileNotFoundError as exc:
        print(f"diffpath: {exc}", file=sys.stderr)
        return 2
    print(comparison_markdown(table))
    print(f"written to {out}/models.md and models.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
