"""The score histogram of ``diffpath score --plot``."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["plot_scores"]


def plot_scores(train_scores: np.ndarray, scores: np.ndarray, threshold: float, *,
                accept: float = 0.95, title: str = "", fmt: str = "png") -> bytes:
    """Histogram of the normal (calibration) scores (N,) vs the scored images (M,), with the
    threshold (none drawn when it is ``-inf``: too few calibration images to flag anything).

    Scores far below the normal range (log-densities of OOD images can be huge negatives) are
    pooled at the left edge, and their count is written on the plot. ``fmt``: png, pdf or svg.
    Returns the image file's bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tr = np.asarray(train_scores, np.float64)
    sc = np.asarray(scores, np.float64)
    lo_t, hi_t = float(np.min(tr)), float(np.max(tr))
    span = max(hi_t - lo_t, 1e-6)
    finite = sc[np.isfinite(sc)]
    lo = min(lo_t, float(finite.min()) if finite.size else lo_t)
    lo = max(lo, lo_t - 3 * span)
    hi = max(hi_t, float(finite.max()) if finite.size else hi_t)
    hi = min(hi, hi_t + 3 * span)
    clipped = int(np.sum(~(sc >= lo)))
    bins = np.linspace(lo, hi, 41)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, whatever pyplot uses
    ax = fig.add_subplot()
    ax.hist(np.clip(tr, lo, hi), bins=bins, alpha=0.55, density=True,
            label=f"normal (calibration), n={len(tr)}", color="tab:blue")
    if len(sc):
        ax.hist(np.clip(np.nan_to_num(sc, neginf=lo, posinf=hi), lo, hi), bins=bins, alpha=0.55,
                density=True, label=f"scored, n={len(sc)}", color="tab:orange")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", lw=1.2,
                   label=f"threshold (accepts ≥ {accept:.0%} of normal)")
    if clipped:
        ax.annotate(f"{clipped} below {lo:.4g} (at the edge)", xy=(0.01, 0.95),
                    xycoords="axes fraction", va="top", fontsize=8)
    ax.set_xlabel("score (log-density; lower = more out-of-distribution)")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left" if not clipped else "center left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()
