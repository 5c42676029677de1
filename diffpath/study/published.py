"""Published AUROC figures beside the study's own: one table per run, one per base-model comparison.

The figures live in one data file, ``published.csv`` beside this module (columns
:data:`COLUMNS`): the method (the study's registry name), the base model's training set
(``celeba``, ``imagenet``), the pair (``in_dist``, ``ood``: data set names of the registry, or
``all`` for a paper's average over its own table), the AUROC in [0, 1], the source (paper and
table), whether the figure was checked against that table, and a note.

:func:`beside` puts every published figure of a run's base model next to the run's own AUROC
(``ours``) and their difference Δ = ours − published; a pair whose |Δ| exceeds the tolerance is
marked. ``all`` rows are compared with the run's mean over every pair of that method.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["PUBLISHED", "COLUMNS", "ALL", "TOLERANCE", "load_published", "beside", "beside_markdown", "write_beside",
           "model_comparison", "comparison_markdown"]

PUBLISHED = Path(__file__).with_name("published.csv")
COLUMNS = ("method", "base_model", "in_dist", "ood", "auroc", "source", "verified", "note")
ALL = "all"
#: |ours − published| above this is marked: one AUROC point (the papers print three decimals,
#: and two published runs of one method differ by far more: DiffPathV2's own 0.949 against
#: EigenScore's re-run, 0.810), so a Δ within a point counts as reproduced.
TOLERANCE = 0.01


def load_published(path: str | Path = PUBLISHED) -> pd.DataFrame:
    """The published figures (:data:`COLUMNS`), AUROC as float."""
    table = pd.read_csv(path, dtype={c: str for c in COLUMNS if c != "auroc"}, keep_default_na=False)
    return table.astype({"auroc": float})


def _ours(results: pd.DataFrame, method: str, in_dist: str, ood: str) -> float:
    r = results[results["method"] == method]
    if in_dist == ALL:
        return float(r["auroc"].mean()) if len(r) else np.nan
    hit = r[(r["in_dist"] == in_dist) & (r["ood"] == ood)]["auroc"]
    return float(hit.iloc[0]) if len(hit) else np.nan


def beside(results: pd.DataFrame, published: pd.DataFrame, base_model: str,
           tolerance: float = TOLERANCE) -> pd.DataFrame:
    """Every published figure for ``base_model`` and a method the run has, beside the run's own.

    Args:
        results: the run's ``results.csv`` (``method, in_dist, ood, auroc, ...``).
        published: :func:`load_published`'s table.
        base_model: the run's base-model training set (``celeba``, ``imagenet``).

    Returns:
        Columns ``method, in_dist, ood, ours, published, delta, outside, source, verified``; ``ours`` is
        NaN (and ``outside`` False) for a pair the run did not score.
    """
    pub = published[(published["base_model"] == base_model) & published["method"].isin(set(results["method"]))]
    rows = []
    for _, p in pub.iterrows():
        ours = _ours(results, p["method"], p["in_dist"], p["ood"])
        delta = ours - p["auroc"]
        rows.append({"method": p["method"], "in_dist": p["in_dist"], "ood": p["ood"], "ours": ours,
                     "published": p["auroc"], "delta": delta,
                     "outside": bool(np.isfinite(delta) and abs(delta) > tolerance),
                     "source": p["source"], "verified": p["verified"]})
    return pd.DataFrame(rows, columns=["method", "in_dist", "ood", "ours", "published", "delta", "outside",
                                       "source", "verified"])


def _num(v: float, signed: bool = False) -> str:
    return "–" if not np.isfinite(v) else (f"{v:+.3f}" if signed else f"{v:.3f}")


def _sources(sources: list[str]) -> tuple[dict[str, int], list[str]]:
    numbers: dict[str, int] = {}
    for s in sources:
        numbers.setdefault(s, len(numbers) + 1)
    return numbers, [f"[{n}] {s}" for s, n in numbers.items()]


def beside_markdown(table: pd.DataFrame, tolerance: float = TOLERANCE) -> str:
    """:func:`beside`'s table in Markdown: one row per pair, sources numbered below it."""
    from diffpath.study.report import method_label

    numbers, notes = _sources(list(table["source"]))
    lines = ["| method | in-distribution | OOD | ours | published | Δ | source |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for _, r in table.iterrows():
        mark = " ✗" if r["outside"] else ""
        check = "" if r["verified"] == "yes" else " (unverified)"
        lines.append(f"| {method_label(r['method'])} | {r['in_dist']} | {r['ood']} | {_num(r['ours'])} | "
                     f"{_num(r['published'])} | {_num(r['delta'], True)}{mark} | [{numbers[r['source']]}]{check} |")
    legend = (f"\nΔ = ours − published; ✗: |Δ| > {tolerance:g}. `all`: the paper's average over its own "
              "table beside ours over every pair of this run.\n\n")
    return "\n".join(lines) + "\n" + legend + "\n".join(notes) + "\n"


def write_beside(table: pd.DataFrame, folder: str | Path, stem: str = "published") -> str:
    """Write :func:`beside`'s table as ``stem.csv`` and ``stem.md`` into ``folder`` (atomically);
    returns the Markdown."""
    from diffpath.io import atomic_path, write_text_atomic

    with atomic_path(Path(folder) / f"{stem}.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    md = beside_markdown(table)
    write_text_atomic(Path(folder) / f"{stem}.md", md)
    return md


def model_comparison(results_by_model: Mapping[str, pd.DataFrame], base_models: Mapping[str, str],
                     published: pd.DataFrame, methods: tuple[str, ...] = ("diffpath", "diffpathv2")) -> pd.DataFrame:
    """Mean AUROC per method of runs with different base models, beside the published averages.

    Args:
        results_by_model: ``{model name: results.csv}`` of each run.
        base_models: ``{model name: base-model training set}`` (``celeba``, ``imagenet``).

    Returns:
        One row per (method, model): ``method, model, base_model, pairs, ours, published, delta, source``.
    """
    rows = []
    for method in methods:
        for model, results in results_by_model.items():
            r = results[results["method"] == method]
            if r.empty:
                continue
            pub = published[(published["method"] == method) & (published["base_model"] == base_models[model])
                            & (published["in_dist"] == ALL)]
            refs = [(float(a), s) for a, s in zip(pub["auroc"], pub["source"])] or [(np.nan, "")]
            ours = float(r["auroc"].mean())
            for ref, source in refs:
                rows.append({"method": method, "model": model, "base_model": base_models[model], "pairs": len(r),
                             "ours": ours, "published": ref, "delta": ours - ref, "source": source})
    return pd.DataFrame(rows, columns=["method", "model", "base_model", "pairs", "ours", "published", "delta",
                                       "source"])


def comparison_markdown(table: pd.DataFrame) -> str:
    """:func:`model_comparison`'s table in Markdown, sources numbered below it."""
    from diffpath.study.report import method_label

    numbers, notes = _sources([s for s in table["source"] if s])
    lines = ["| method | base model | trained on | pairs | ours (mean AUROC) | published average | Δ | source |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for _, r in table.iterrows():
        src = f"[{numbers[r['source']]}]" if r["source"] else "–"
        lines.append(f"| {method_label(r['method'])} | {r['model']} | {r['base_model']} | {r['pairs']} | "
                     f"{_num(r['ours'])} | {_num(r['published'])} | {_num(r['delta'], True)} | {src} |")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
