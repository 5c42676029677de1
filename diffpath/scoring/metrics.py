"""Detection metrics.

Image level (DiffPath's convention): scores are log-densities, *higher = more in-distribution*, and
the in-distribution set is the positive class. AUROC is never flipped.

* :func:`auroc`: area under the ROC curve.
* :func:`fpr_at_tpr`: the fraction of OOD images accepted when the threshold keeps ``tpr`` (95%)
  of in-distribution images.
* :func:`aupr`: average precision with in-distribution positive ("AUPR-In").
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["auroc", "fpr_at_tpr", "aupr", "detection_metrics", "roc"]


def _labels(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    if len(s_in) == 0 or len(s_out) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    s = np.concatenate([s_in, s_out])
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or inf")
    y = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
    return y, s


def auroc(scores_in, scores_out) -> float:
    y, s = _labels(scores_in, scores_out)
    return float(roc_auc_score(y, s))


def aupr(scores_in, scores_out) -> float:
    y, s = _labels(scores_in, scores_out)
    return float(average_precision_score(y, s))


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """FPR at the smallest threshold whose TPR reaches ``tpr``."""
    s_in = np.asarray(scores_in, dtype=np.float64).ravel()
    s_out = np.asarray(scores_out, dtype=np.float64).ravel()
    _labels(s_in, s_out)
    # the threshold keeps the top `tpr` fraction of in-distribution scores (ties accepted)
    thr = np.quantile(s_in, 1.0 - tpr, method="inverted_cdf")
    return float(np.mean(s_out >= thr))


def roc(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) arrays of the ROC curve."""
    y, s = _labels(scores_in, scores_out)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def detection_metrics(scores_in, scores_out) -> dict[str, float]:
    """``{"auroc", "fpr95", "aupr"}``."""
    return {
        "auroc": auroc(scores_in, scores_out),
        "fpr95": fpr_at_tpr(scores_in, scores_out, 0.95),
        "aupr": aupr(scores_in, scores_out),
    }


# ----------------------------------------------------------------------------------------------
# Localisation metrics (DIVAD-style anomaly maps)
#
# Convention here is the *opposite* of the image-level one above: for localisation the ANOMALOUS
# pixels / images are the positive class and a HIGHER map value means MORE anomalous. AUROC is
# never flipped (a map that ranks anomalies low scores below 0.5).

__all__ += [
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "pro_score",
    "localization_metrics",
]


def _maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(maps, dtype=np.float64)
    g = np.asarray(masks)
    if m.ndim == 2:
        m, g = m[None], g[None]
    if m.ndim != 3 or m.shape != g.shape:
        raise ValueError(
            f"maps and masks must both be (N, H, W) with the same shape, got {m.shape} and {g.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise ValueError("maps hold NaN or inf")
    return m, g.astype(bool)


def image_auroc(scores, labels) -> float:
    """Image-level AUROC of anomaly scores, *anomalous positive* (``labels``: 1 anomalous, 0 normal;
    higher score = more anomalous). Never flipped."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    if y.all() or not y.any():
        raise ValueError("image AUROC needs at least one normal and one anomalous image")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or inf")
    return float(roc_auc_score(y, s))


def pixel_auroc(maps, masks) -> float:
    """Pixel-level AUROC: every pixel of every image is one sample, positive where ``masks`` is set.

    Args:
        maps: (N, H, W) anomaly maps, higher = more anomalous.
        masks: (N, H, W) ground truth (bool or 0/1; nonzero = anomalous).
    """
    m, g = _maps_masks(maps, masks)
    if g.all() or not g.any():
        raise ValueError("pixel AUROC needs both anomalous and normal pixels")
    return float(roc_auc_score(g.ravel(), m.ravel()))


def _region_labels(masks: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of every mask, numbered consecutively over the whole stack
    (0 = background); ``connectivity`` 1 (4-neighbours) or 2 (8-neighbours)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(2, connectivity)
    out = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for i, mk in enumerate(masks):
        lab, n = ndimage.label(mk, structure=structure)
        out[i] = np.where(lab > 0, lab + total, 0)
        total += n
    return out, total


def pro_curve(
    maps, masks, *, num_thresholds: int | None = None, connectivity: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve: ``(fpr, pro)`` for a sweep of thresholds, ascending in FPR.

    At a threshold θ a pixel is predicted anomalous when ``map ≥ θ``. Then

    * FPR(θ) = (# normal pixels predicted anomalous) / (# normal pixels), all images pooled;
    * PRO(θ) = mean over every connected ground-truth region r (of every image; components by
      :func:`scipy.ndimage.label`, 8-connectivity by default as scikit-image's ``label``) of
      |{p ∈ r : map(p) ≥ θ}| / |r|.

    Both are cumulative sums over pixels sorted by decreasing score (a region pixel adds
    ``1/(R·|r|)`` to PRO, a normal pixel ``1/N_normal`` to FPR), so the sweep is computed exactly.

    Thresholds (``num_thresholds``):

    * ``None`` (default): *every* distinct map value is a threshold (the exact curve; tied pixels
      enter together, so a tie block is one straight segment, as in ROC curves);
    * an integer n ≥ 2: n evenly spaced thresholds from the smallest to the largest map value
      (both included), the convention of the MVTec-AD reference code (which uses 200).

    The curve always starts at (0, 0) (a threshold above every value) and ends at (1, 1).

    Returns:
        (fpr, pro): float64 arrays of equal length.
    """
    m, g = _maps_masks(maps, masks)
    regions, n_regions = _region_labels(g, connectivity)
    n_normal = int((~g).sum())
    if n_regions == 0:
        raise ValueError("PRO needs at least one anomalous region in masks")
    if n_normal == 0:
        raise ValueError("PRO needs at least one normal pixel")
    score = m.ravel()
    reg = regions.ravel()
    if num_thresholds is not None:
        if num_thresholds < 2:
            raise ValueError("num_thresholds must be >= 2 (or None for the exact sweep)")
        lo, hi = float(score.min()), float(score.max())
        if hi > lo:
            # pixel p passes threshold θ_j = lo + j·(hi − lo)/(n − 1)  ⇔  j ≤ (s − lo)(n − 1)/(hi − lo)
            pos = (score - lo) * ((num_thresholds - 1) / (hi - lo))
            score = np.clip(np.floor(pos + 1e-9), 0, num_thresholds - 1)
        else:
            score = np.zeros_like(score)
    areas = np.bincount(reg, minlength=n_regions + 1).astype(np.float64)
    w_pro = np.where(reg > 0, 1.0 / (n_regions * areas[reg]), 0.0)
    w_fpr = np.where(reg == 0, 1.0 / n_normal, 0.0)
    order = np.argsort(-score, kind="mergesort")
    s_sorted = score[order]
    fpr = np.cumsum(w_fpr[order])
    pro = np.cumsum(w_pro[order])
    # keep the last pixel of each tie block: one point per distinct threshold
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1]
    fpr = np.r_[0.0, fpr[last]]
    pro = np.r_[0.0, pro[last]]
    # clean the float drift of the cumulative sums at the end
    fpr[-1], pro[-1] = 1.0, 1.0
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def pro_score(
    maps,
    masks,
    fpr_limit: float = 0.3,
    *,
    num_thresholds: int | None = None,
    connectivity: int = 2,
) -> float:
    """Area under the PRO curve for FPR in [0, ``fpr_limit``], divided by ``fpr_limit`` (so a
    perfect map scores 1; a constant map scores ``fpr_limit / 2``).

    The curve of :func:`pro_curve` is integrated with the trapezoidal rule (linear between the
    threshold points) and linearly interpolated at FPR = ``fpr_limit`` (so the result does not
    depend on where the last threshold below the limit happens to fall). Normal images count only
    through their pixels' false positives.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, num_thresholds=num_thresholds, connectivity=connectivity)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        j = int(np.searchsorted(fpr, fpr_limit, side="right"))  # first point beyond the limit
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / fpr_limit


def localization_metrics(
    maps,
    masks,
    scores,
    labels=None,
    classes=None,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> list[dict]:
    """Image AUROC, pixel AUROC and PRO, per class and averaged.

    Args:
        maps: (N, H, W) anomaly maps (higher = more anomalous).
        masks: (N, H, W) ground truth.
        scores: (N,) image anomaly scores.
        labels: (N,) 1 anomalous / 0 normal (default: any pixel set in the mask).
        classes: (N,) class of each image (default: one class ``"all"``).

    Returns:
        One dict per class, ``{"class", "n", "image_auroc", "pixel_auroc", "pro"}``, in sorted
        class order, then ``{"class": "mean", ...}`` (unweighted mean of the per-class values, as
        MVTec/VisA tables report) and ``{"class": "pooled", ...}`` (all images together). A metric
        that a class cannot define (no normal or no anomalous image) is NaN and is left out of the
        mean.
    """
    m, g = _maps_masks(maps, masks)
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = g.reshape(len(g), -1).any(1) if labels is None else np.asarray(labels).astype(bool).ravel()
    c = np.asarray(["all"] * len(m) if classes is None else classes).ravel()
    if not (len(s) == len(y) == len(c) == len(m)):
        raise ValueError("maps, scores, labels and classes must hold the same number of images")

    def one(idx: np.ndarray) -> dict:
        out = {"n": int(len(idx))}
        for key, fn in (
            ("image_auroc", lambda: image_auroc(s[idx], y[idx])),
            ("pixel_auroc", lambda: pixel_auroc(m[idx], g[idx])),
            ("pro", lambda: pro_score(m[idx], g[idx], fpr_limit, num_thresholds=num_thresholds)),
        ):
            try:
                out[key] = fn()
            except ValueError:
                out[key] = float("nan")
        return out

    rows = []
    for cls in sorted(set(c.tolist())):
        rows.append({"class": cls, **one(np.flatnonzero(c == cls))})
    keys = ("image_auroc", "pixel_auroc", "pro")
    mean = {"class": "mean", "n": int(len(m))}
    for k in keys:
        vals = [r[k] for r in rows if np.isfinite(r[k])]
        mean[k] = float(np.mean(vals)) if vals else float("nan")
    rows.append(mean)
    rows.append({"class": "pooled", **one(np.arange(len(m)))})
    return rows
