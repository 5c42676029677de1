"""Localisation metrics as the MVTec AD / VisA literature reports them (DIVAD's evaluation).

Anomalous pixels and images are the positive class; a higher map value is more anomalous. Per
category, then the unweighted mean over categories:

* **image AUROC** of the image score :func:`pooled_max_scores`: the maximum of the map after eight
  successive 8×8 average poolings, stride 1 (DIVAD's ``EvalImageMax``; a 256² map becomes 200²);
* **pixel AUROC** over every pixel of every image (:func:`diffpath.scoring.metrics.pixel_auroc`);
* **PRO** up to FPR 0.3, in two versions: *exact* (every distinct map value a threshold, the curve
  interpolated at 0.3 and its area divided by 0.3: :func:`diffpath.scoring.metrics.pro_score`), and
  the *200-threshold reference* of DIVAD's ``compute_pro`` (the version most MVTec/VisA papers copy):
  :func:`pro_reference`;
* **pixel AP**: scikit-learn's ``average_precision_score`` over every pixel (:func:`pixel_ap`).

AUROC is reported as measured, never flipped. DIVAD's evaluation replaces any AUROC below 0.5 by
1 − AUROC; :func:`flipped` gives that number, only for comparing with published figures.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffpath.scoring.metrics import _maps_masks, _region_labels, image_auroc, pixel_auroc, pro_score

__all__ = ["BENCHMARK_METRICS", "pooled_max_scores", "pixel_ap", "pro_reference", "flipped", "category_metrics"]

#: the columns of :func:`category_metrics`, in the order the tables show them
BENCHMARK_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pro", "pro_200", "pixel_ap")


def pooled_max_scores(maps: np.ndarray | torch.Tensor, k: int = 8, repeats: int = 8) -> np.ndarray:
    """Image scores (N,) float64 of (N, H, W) maps: the maximum after ``repeats`` successive k×k
    average poolings (stride 1, no padding), in float64 (DIVAD: k = 8, 8 times). A map smaller
    than the windows is pooled as far as it allows."""
    m = torch.as_tensor(np.asarray(maps)).double()
    m = m.unsqueeze(1) if m.ndim == 3 else m
    for _ in range(int(repeats)):
        kk = min(int(k), m.shape[-2], m.shape[-1])
        if kk <= 1:
            break
        m = F.avg_pool2d(m, kk, stride=1)
    return m.flatten(1).max(1).values.numpy()


def pixel_ap(maps, masks) -> float:
    """Average precision of anomalous pixels (scikit-learn's ``average_precision_score``)."""
    from sklearn.metrics import average_precision_score

    m, g = _maps_masks(maps, masks)
    if g.all() or not g.any():
        raise ValueError("pixel AP needs both anomalous and normal pixels")
    return float(average_precision_score(g.ravel(), m.ravel()))


def pro_reference(maps, masks, num_thresholds: int = 200, fpr_limit: float = 0.3) -> float:
    """PRO as DIVAD's (and RD4AD's) ``compute_pro`` computes it, vectorised.

    Thresholds ``np.arange(min, max, (max − min)/num_thresholds)`` of the float64 maps (200 or 201
    of them, as the floats fall); a pixel is anomalous above a threshold (``map > θ``); PRO(θ) is
    the mean overlap over every ground-truth region (8-connected, all images pooled), FPR(θ) over
    every normal pixel. Points with FPR < ``fpr_limit`` are kept, their FPR divided by the largest
    kept FPR (not by ``fpr_limit``), and the area is the trapezoidal rule over them
    (``sklearn.metrics.auc``).
    """
    from sklearn.metrics import auc

    m, g = _maps_masks(maps, masks)
    regions, n_regions = _region_labels(g, 2)
    if n_regions == 0 or g.all():
        raise ValueError("PRO needs an anomalous region and a normal pixel")
    lo, hi = float(m.min()), float(m.max())
    ths = np.arange(lo, hi, (hi - lo) / num_thresholds) if hi > lo else np.array([lo])
    # a pixel is positive at thresholds θ_0 … θ_{c−1}, c = #{θ < value} (thresholds ascending)
    count = np.searchsorted(ths, m.ravel(), side="left")
    reg = regions.ravel()
    n_th = len(ths)
    # per region: pixels positive at threshold j = pixels with count > j (a reversed cumulative sum)
    hist = np.bincount(reg * (n_th + 1) + count, minlength=(n_regions + 1) * (n_th + 1))
    hist = hist.reshape(n_regions + 1, n_th + 1).astype(np.float64)
    above = hist[:, ::-1].cumsum(1)[:, ::-1][:, 1:]  # (R + 1, n_th): count > j
    areas = np.bincount(reg, minlength=n_regions + 1).astype(np.float64)
    pro = (above[1:] / areas[1:, None]).mean(0)
    fpr = above[0] / areas[0]
    keep = fpr < fpr_limit
    if not keep.any() or fpr[keep].max() == 0:
        return float("nan")
    return float(auc(fpr[keep] / fpr[keep].max(), pro[keep])) + 0.0  # + 0.0: no −0.0


def flipped(auroc: float) -> float:
    """max(AUROC, 1 − AUROC): DIVAD's evaluation's number, for comparison with published figures only."""
    return float(max(auroc, 1.0 - auroc)) if np.isfinite(auroc) else float("nan")


def category_metrics(maps: np.ndarray, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray | None = None
                     ) -> dict[str, float]:
    """The metrics of :data:`BENCHMARK_METRICS` for one category, plus ``image_auroc_flipped`` and
    ``pixel_auroc_flipped``; a metric the category cannot define (no normal or no anomalous
    image) is NaN. ``labels`` default: any mask pixel set."""
    m, g = _maps_masks(maps, masks)
    y = g.reshape(len(g), -1).any(1) if labels is None else np.asarray(labels).astype(bool)
    fns = {"image_auroc": lambda: image_auroc(scores, y), "pixel_auroc": lambda: pixel_auroc(m, g),
           "pro": lambda: pro_score(m, g, 0.3), "pro_200": lambda: pro_reference(m, g),
           "pixel_ap": lambda: pixel_ap(m, g)}
    out: dict[str, float] = {}
    for key, fn in fns.items():
        try:
            out[key] = fn()
        except ValueError:
            out[key] = float("nan")
    out["image_auroc_flipped"] = flipped(out["image_auroc"])
    out["pixel_auroc_flipped"] = flipped(out["pixel_auroc"])
    return out
