"""Paper-style tables (Markdown, LaTeX) and figures (matplotlib).

Tables follow the papers' layout: one table per method, rows = in-distribution sets, columns = OOD
sets plus their average; and an ablation table (rows = methods, columns = in-distribution sets'
average AUROC plus the overall average). Numbers are AUROC × 100 with one decimal, as in the papers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "method_table",
    "ablation_table",
    "to_markdown",
    "localization_markdown",
    "to_latex",
    "write_table",
    "METHOD_LABELS",
    "method_label",
    "histogram_axis",
    "plot_histograms",
    "histogram_legend",
    "plot_roc",
    "save_figure",
]


#: How the tables and figures name each method.
METHOD_LABELS: dict[str, str] = {
    "diffpath": "DiffPath-6D",
    "diffpath_1d": "DiffPath-1D",
    "score_error": "score error (no SSIM)",
    "diffpathv2": "DiffPathV2",
    "diffpathv2_power": "DiffPathV2, power sums",
    "diffpathv2_noderiv": "DiffPathV2, no derivative",
    "diffpathv2_1d": "DiffPathV2-1D",
}


def method_label(method: str) -> str:
    """The display name of a method (its registry name when it has none)."""
    return METHOD_LABELS.get(method, method)


def method_table(results: pd.DataFrame, method: str, metric: str = "auroc",
                 in_dist: Sequence[str] | None = None, ood: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows: in-distribution sets; columns: OOD sets and ``Average``; values: ``metric`` × 100."""
    r = results[results["method"] == method]
    if r.empty:
        raise ValueError(f"no results for method {method!r}")
    t = r.pivot(index="in_dist", columns="ood", values=metric) * 100.0
    rows = [d for d in (in_dist or t.index) if d in t.index]
    cols = [d for d in (ood or t.columns) if d in t.columns]
    t = t.loc[rows, cols]
    t["Average"] = t.mean(axis=1, skipna=True)
    t.index.name, t.columns.name = "in-distribution", None
    return t


def ablation_table(results: pd.DataFrame, methods: Sequence[str], metric: str = "auroc",
                   labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Rows: methods; columns: each in-distribution set's mean ``metric`` over its OOD sets, and
    the overall ``Average`` (× 100)."""
    r = results[results["method"].isin(methods)]
    t = r.groupby(["method", "in_dist"])[metric].mean().unstack("in_dist") * 100.0
    t = t.loc[[m for m in methods if m in t.index]]
    t["Average"] = r.groupby("method")[metric].mean().loc[t.index] * 100.0
    if labels:
        t.index = [labels.get(m, m) for m in t.index]
    t.index.name, t.columns.name = "method", None
    return t


def _fmt(v: float) -> str:
    return "–" if not np.isfinite(v) else f"{v:.1f}"


def _rows(table: pd.DataFrame, bold_max: bool, bold):
    """(index, formatted cells) per row; with ``bold_max`` each column's best is ``bold(s)``."""
    cols = list(table.columns)
    best = {c: np.nanmax(table[c].to_numpy(dtype=float)) for c in cols} if bold_max else {}
    for idx, row in table.iterrows():
        cells = []
        for c in cols:
            s = _fmt(float(row[c]))
            if bold_max and np.isfinite(row[c]) and row[c] == best[c]:
                s = bold(s)
            cells.append(s)
        yield idx, cells


def to_markdown(table: pd.DataFrame, bold_max: bool = False) -> str:
    """A GitHub Markdown table (no extra dependency); with ``bold_max`` the best of each column
    is bold."""
    cols = list(table.columns)
    head = [str(table.index.name or "")] + [str(c) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * len(cols)) + " |"]
    for idx, cells in _rows(table, bold_max, lambda s: f"**{s}**"):
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines) + "\n"


def localization_markdown(summary: pd.DataFrame, metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pro")) -> str:
    """The localisation table (``reports/localization.csv``) as Markdown: one line per base set ×
    map, its cost in UNet evaluations per image, and each metric with its 95% interval."""
    names = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO"}
    head = ["base set", "map", "UNet evaluations / image", *(names.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | ---: |" + " --- |" * len(metrics)]
    for r in summary.to_dict("records"):
        cells = [str(r["dataset"]), str(r["method"]), f"{r['unet_evals']:g}"]
        cells += [f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    return str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(table: pd.DataFrame, caption: str = "", label: str = "", bold_max: bool = False) -> str:
    """A booktabs LaTeX table."""
    cols = list(table.columns)
    out = [r"\begin{table}[t]", r"\centering"]
    if caption:
        out.append(rf"\caption{{{_tex(caption)}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out += [r"\begin{tabular}{l" + "r" * len(cols) + "}", r"\toprule",
            " & ".join([_tex(table.index.name or "")] + [_tex(c) for c in cols]) + r" \\", r"\midrule"]
    for idx, cells in _rows(table, bold_max, lambda s: rf"\textbf{{{s}}}"):
        out.append(" & ".join([_tex(idx)] + cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_table(table: pd.DataFrame, folder: str | Path, stem: str, caption: str, *,
                bold_max: bool = False) -> str:
    """Write ``stem.md`` and ``stem.tex`` (label ``tab:stem``) into ``folder`` atomically; returns
    the Markdown."""
    from diffpath.io import write_text_atomic

    md = to_markdown(table, bold_max=bold_max)
    write_text_atomic(Path(folder) / f"{stem}.md", md)
    write_text_atomic(Path(folder) / f"{stem}.tex",
                      to_latex(table, caption=caption, label=f"tab:{stem}", bold_max=bold_max))
    return md


def histogram_axis(s_in: np.ndarray, s_out: np.ndarray, bins: int = 40) -> tuple[np.ndarray, float | None]:
    """Bin edges (bins + 1,) that show both sets of scores, and the symlog threshold (or None).

    The range is the pooled 0.5–99.5th percentiles (a few extreme scores would otherwise set it).
    When it is over 5 times the in-distribution set's own 1–99th percentile spread (an OOD set
    scoring hundreds or thousands of nats lower), a linear axis would squash the in-distribution
    set into a few bins: the axis is then symmetric-log, linear within ±L (L = the in-distribution
    set's largest |1st or 99th percentile|) and logarithmic beyond, and the bins are even in it.
    """
    s_in, s_out = np.asarray(s_in, np.float64), np.asarray(s_out, np.float64)
    lo, hi = np.percentile(np.concatenate([s_in, s_out]), [0.5, 99.5])
    p1, p99 = np.percentile(s_in, [1, 99])
    if hi - lo <= 5 * max(p99 - p1, 1e-12):
        return np.linspace(lo, hi, bins + 1), None
    from matplotlib.scale import SymmetricalLogTransform

    linthresh = float(max(abs(p1), abs(p99), p99 - p1))
    tr = SymmetricalLogTransform(10, linthresh, 1.0)
    edges = tr.inverted().transform(np.linspace(*tr.transform(np.array([lo, hi])), bins + 1))
    return edges, linthresh


def plot_histograms(scores: Mapping[str, np.ndarray], in_dist: str, ood: str, ax: Any = None,
                    title: str | None = None, bins: int = 40) -> Any:
    """The papers' score histogram: in-distribution (blue) vs OOD (orange) log-densities, each as
    the fraction of its images per bin, on an axis that shows both (:func:`histogram_axis`);
    scores beyond the range are counted in the edge bins. No legend: the figure carries one."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    s_in, s_out = np.asarray(scores[in_dist]), np.asarray(scores[ood])
    edges, linthresh = histogram_axis(s_in, s_out, bins)
    for s, colour in ((s_in, "tab:blue"), (s_out, "tab:orange")):
        ax.hist(np.clip(s, edges[0], edges[-1]), bins=edges, weights=np.full(len(s), 1.0 / len(s)),
                histtype="stepfilled", alpha=0.35, color=colour, edgecolor=colour)
    if linthresh is not None:
        ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("log-density" + (" (symlog axis)" if linthresh is not None else ""), fontsize=8)
    ax.set_ylabel("fraction of the set", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title or f"{in_dist} vs {ood}", fontsize=9)
    return ax


def histogram_legend(fig: Any, in_label: str, out_label: str) -> Any:
    """One legend for a figure of :func:`plot_histograms` panels, above them (never over data)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, alpha=0.35, label=label) for c, label in
               (("tab:blue", in_label), ("tab:orange", out_label))]
    return fig.legend(handles=handles, loc="outside upper center", ncols=2, fontsize=8, frameon=False)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], ax: Any = None, title: str = "") -> Any:
    """ROC curves: ``{label: (fpr, tpr, auroc)}``."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{label} ({100 * auc:.1f})", lw=1.5)
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("FPR (OOD accepted)")
    ax.set_ylabel("TPR (in-distribution accepted)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    return ax


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> None:
    """Save a figure atomically."""
    from diffpath.io import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip("."))
