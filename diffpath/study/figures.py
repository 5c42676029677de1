"""Figures of the walkthroughs: rows of maps on one colour scale each, and the verdict.

A walkthrough shows a quantity (x_t, ε, a score error, an SSIM map, an anomaly map) for several
timesteps or images side by side. :func:`map_rows` draws each quantity as one row on one colour
scale, with a colour bar that says what the colours mean, so panels can be compared along a row
and a row can be read on its own. :func:`verdict_axes` draws held-out scores, the threshold and
the images under study on one axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Row", "map_rows", "as_hw", "verdict_axes"]


@dataclass
class Row:
    """One row of :func:`map_rows`: ``maps`` (each (H, W), (C, H, W) or a tensor) drawn with
    ``cmap`` on [``vmin``, ``vmax``] (a 3-channel map in a ``"gray"`` row is drawn in colour, each
    channel on that scale); ``label`` names the row, ``unit`` labels its colour bar; ``outline``, an
    (H, W) mask, is drawn as a white contour on every panel of the row."""

    label: str
    maps: Sequence[Any]
    cmap: str = "gray"
    vmin: float = -1.0
    vmax: float = 1.0
    unit: str = ""
    outline: Any = None


def as_hw(img: Any) -> np.ndarray:
    """A map as (H, W) float32: tensors to numpy, channels averaged."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    a = np.asarray(a, dtype=np.float32)
    return a.mean(0) if a.ndim == 3 else a


def _rgb(img: Any, row: Row) -> np.ndarray | None:
    """A 3-channel image of a gray row as (H, W, 3) in [0, 1] on the row's scale; None otherwise."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if row.cmap != "gray" or a.ndim != 3 or a.shape[0] != 3:
        return None
    return np.clip((np.moveaxis(a.astype(np.float32), 0, -1) - row.vmin) / (row.vmax - row.vmin), 0.0, 1.0)


def map_rows(rows: Sequence[Row], titles: Sequence[str], *, title: str = "", size: float = 1.35) -> Any:
    """A grid of maps: one :class:`Row` per line, one column per entry of ``titles``, and a colour
    bar per row at its right. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(titles)
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n + 1.4, size * len(rows) + 0.6),
                             squeeze=False, constrained_layout=True)
    for r, row in enumerate(rows):
        im = None
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(row.maps) and row.maps[c] is not None:
                rgb = _rgb(row.maps[c], row)
                if rgb is not None:
                    ax.imshow(rgb)
                    im = ScalarMappable(Normalize(row.vmin, row.vmax), cmap=row.cmap)
                else:
                    im = ax.imshow(as_hw(row.maps[c]), cmap=row.cmap, vmin=row.vmin, vmax=row.vmax)
                if row.outline is not None and np.any(row.outline):
                    ax.contour(np.asarray(row.outline, dtype=float), levels=[0.5], colors="white", linewidths=0.8)
            else:
                ax.set_frame_on(False)  # an empty panel; the axes stay for the row's label
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(row.label, fontsize=8)
        if im is not None:
            bar = fig.colorbar(im, ax=list(axes[r]), shrink=0.9, pad=0.01, aspect=12)
            bar.ax.tick_params(labelsize=7)
            bar.set_label(row.unit, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def verdict_axes(ax: Any, held_in: np.ndarray, held_out: np.ndarray, threshold: float,
                 images: Mapping[str, float], *, in_label: str, out_label: str, bins: int = 40,
                 xlabel: str = "log-density (higher = more typical)") -> Any:
    """Held-out normal (in-distribution) and abnormal (OOD) scores as histograms, the threshold (a
    dashed line: on its far side an image is flagged) and each image of ``images`` (``{label:
    score}``, a solid line).

    The range is the pooled 1st–99th percentiles, widened to show the threshold and the images;
    scores outside it are drawn in the edge bins. An infinite threshold (too few normal scores to
    calibrate one: nothing is flagged) is named in the legend, not drawn."""
    pooled = np.concatenate([held_in, held_out])
    lo, hi = np.percentile(pooled, [1, 99])
    drawn = [threshold] if np.isfinite(threshold) else []
    marks = np.array([*drawn, *images.values()], dtype=np.float64)
    lo, hi = min(lo, marks.min()), max(hi, marks.max())
    pad = 0.03 * (hi - lo or 1.0)
    edges = np.linspace(lo - pad, hi + pad, bins + 1)
    for s, label, colour in ((held_in, in_label, "tab:blue"), (held_out, out_label, "tab:orange")):
        ax.hist(np.clip(s, edges[0], edges[-1]), bins=edges, density=True, alpha=0.45, color=colour, label=label)
    if drawn:
        ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.3g}")
    else:
        ax.plot([], [], color="k", ls="--", lw=1.2, label="no threshold (too few normal images)")
    for (label, score), colour in zip(images.items(), ("tab:green", "tab:red", "tab:purple")):
        ax.axvline(score, color=colour, lw=2, label=f"{label}: {score:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density of images")
    return ax
