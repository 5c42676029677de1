"""Bootstrap intervals for the localisation metrics (image AUROC, pixel AUROC, PRO).

The table's figures are *per-class means* (:func:`diffpath.scoring.metrics.localization_metrics`),
so the bootstrap resamples images **within each class** (stratified, with replacement) and
recomputes every class's metric and their mean. A resample is a matrix of counts ``c[b, i]`` (how
often image i is drawn in replicate b); every metric is then a *weighted* version of the exact one,
with image i's pixels weighted by ``c[b, i]``:

* AUROC (image or pixel) = trapezoidal area under the weighted ROC curve (ties count ½), equal to
  :func:`sklearn.metrics.roc_auc_score` on the resampled data;
* PRO = :func:`diffpath.scoring.metrics.pro_score` of the resampled images: a region of image i
  counts ``c[b, i]`` times in the region mean, a normal pixel ``c[b, i]`` times in the FPR.

Per class, the pixel AUROC of any resample is c·A·c / ((c·p)(c·n)) with one image×image matrix A of
pairwise pixel comparisons (exact); PRO's curves are per-image cumulative counts on a grid of
quantile thresholds (2,000 by default; the point value itself is the exact sweep), combined by one
matrix product per class. A thousand replicates then cost seconds.

**Paired** comparisons (:func:`paired_bootstrap`): the same count matrix serves every method, so
the interval of a difference reflects only how the methods differ on the same images.
Intervals are percentile intervals (2.5 %, 97.5 % by default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from diffpath.scoring.metrics import _maps_masks, _region_labels

__all__ = ["class_counts", "weighted_auroc", "weighted_pro", "bootstrap_metrics", "paired_bootstrap",
           "interval", "METRICS"]

METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pro")


def class_counts(classes: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, N) int counts: each replicate draws, within every class, as many images as the
    class holds, uniformly with replacement."""
    c = np.asarray(classes).ravel()
    rng = np.random.default_rng(seed)
    out = np.zeros((n_boot, len(c)), dtype=np.int32)
    for cls in sorted(set(c.tolist())):
        idx = np.flatnonzero(c == cls)
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        np.add.at(out, (np.arange(n_boot)[:, None], idx[draws]), 1)
    return out


def _block_ends(sorted_scores: np.ndarray) -> np.ndarray:
    return np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(sorted_scores) - 1]


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` (P,) with ``positive`` (P,) labels under each row of ``weights`` (B, P);
    NaN where a row has no positive or no negative weight. Returns (B,)."""
    s = np.asarray(scores, np.float64)
    order = np.argsort(-s, kind="mergesort")
    ends = _block_ends(s[order])
    pos = np.asarray(positive, bool)[order]
    w = np.asarray(weights, np.float64)[:, order]
    tp = np.cumsum(np.where(pos, w, 0.0), axis=1)[:, ends]
    fp = np.cumsum(np.where(pos, 0.0, w), axis=1)[:, ends]
    P, Nn = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([np.zeros_like(P), tp / P], axis=1)
        fpr = np.concatenate([np.zeros_like(Nn), fp / Nn], axis=1)
        auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)
    auc[(P[:, 0] <= 0) | (Nn[:, 0] <= 0)] = np.nan
    return auc


def weighted_pro(maps: np.ndarray, masks: np.ndarray, counts: np.ndarray, fpr_limit: float = 0.3,
                 connectivity: int = 2) -> np.ndarray:
    """PRO (area to ``fpr_limit`` / ``fpr_limit``) of (n, H, W) maps under each row of image
    counts (B, n). Equals :func:`~diffpath.scoring.metrics.pro_score` for a row of ones."""
    m, g = _maps_masks(maps, masks)
    n = len(m)
    regions, n_regions = _region_labels(g, connectivity)
    if n_regions == 0 or (~g).sum() == 0:
        return np.full(len(counts), np.nan)
    img = np.repeat(np.arange(n), m[0].size)
    reg = regions.ravel()
    areas = np.bincount(reg, minlength=n_regions + 1).astype(np.float64)
    # regions per image (for the weighted region count) and normal pixels per image
    reg_img = np.zeros(n_regions + 1, dtype=np.int64)
    reg_img[reg[reg > 0]] = img[reg > 0]
    regions_per_image = np.bincount(reg_img[1:], minlength=n).astype(np.float64)
    normal_per_image = (~g).reshape(n, -1).sum(1).astype(np.float64)
    s = m.ravel()
    order = np.argsort(-s, kind="mergesort")
    ends = _block_ends(s[order])
    img_o, reg_o = img[order], reg[order]
    inv_area = np.where(reg_o > 0, 1.0 / areas[reg_o], 0.0)
    is_region = reg_o > 0
    cw = np.asarray(counts, np.float64)
    R = cw @ regions_per_image  # (B,)
    Nn = cw @ normal_per_image
    wp = cw[:, img_o] * inv_area[None, :]
    wf = np.where(is_region[None, :], 0.0, cw[:, img_o])
    with np.errstate(invalid="ignore", divide="ignore"):
        pro = np.cumsum(wp, axis=1)[:, ends] / R[:, None]
        fpr = np.cumsum(wf, axis=1)[:, ends] / Nn[:, None]
    z = np.zeros((len(cw), 1))
    fpr = np.minimum(np.concatenate([z, fpr], axis=1), 1.0)
    pro = np.minimum(np.concatenate([z, pro], axis=1), 1.0)
    return _pro_area(fpr, pro, R, Nn, fpr_limit)


def _pro_area(fpr: np.ndarray, pro: np.ndarray, R: np.ndarray, Nn: np.ndarray, fpr_limit: float) -> np.ndarray:
    """(B,) normalised area under each replicate's PRO curve up to ``fpr_limit`` from (B, K) curve
    points; NaN where a replicate has no anomalous region (``R``) or no normal pixel (``Nn``)."""
    x0, x1, y0, y1 = fpr[:, :-1], fpr[:, 1:], pro[:, :-1], pro[:, 1:]
    x1c = np.minimum(x1, fpr_limit)
    with np.errstate(invalid="ignore", divide="ignore"):
        y1c = np.where(x1 > x0, y0 + (y1 - y0) * (x1c - x0) / (x1 - x0), y1)
    area = np.where(x0 < fpr_limit, (x1c - x0) * (y0 + y1c) / 2.0, 0.0).sum(1)
    out = area / fpr_limit
    out[(R <= 0) | (Nn <= 0)] = np.nan
    return out


def _pair_matrix(m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A[i, j] = Σ over anomalous pixels p of image i and normal pixels q of image j of
    1[s_p > s_q] + ½·1[s_p = s_q]; with the per-image positive and negative pixel counts."""
    n = len(m)
    flat, gt = m.reshape(n, -1), g.reshape(n, -1)
    pos_img = np.repeat(np.arange(n), gt.sum(1))
    pos_val = flat[gt]
    A = np.zeros((n, n))
    for j in range(n):
        neg = np.sort(flat[j][~gt[j]])
        if len(neg) == 0 or len(pos_val) == 0:
            continue
        lt = np.searchsorted(neg, pos_val, "left")
        le = np.searchsorted(neg, pos_val, "right")
        A[:, j] = np.bincount(pos_img, lt + 0.5 * (le - lt), minlength=n)
    return A, gt.sum(1).astype(np.float64), (~gt).sum(1).astype(np.float64)


def _pro_grid(m: np.ndarray, g: np.ndarray, counts: np.ndarray, fpr_limit: float, grid: int,
              connectivity: int = 2) -> np.ndarray:
    """PRO under each row of counts (B, n), on ``grid`` quantile thresholds of the maps."""
    n = len(m)
    regions, n_regions = _region_labels(g, connectivity)
    if n_regions == 0 or (~g).sum() == 0:
        return np.full(len(counts), np.nan)
    reg = regions.reshape(n, -1)
    areas = np.bincount(reg.ravel(), minlength=n_regions + 1).astype(np.float64)
    flat = m.reshape(n, -1)
    thr = np.unique(np.quantile(flat, np.linspace(0.0, 1.0, grid)))
    k = np.searchsorted(thr, flat, "right")  # a pixel passes thresholds thr[:k]
    K = len(thr)
    rp = np.zeros((n, K + 1))
    fp = np.zeros((n, K + 1))
    rows = np.repeat(np.arange(n), flat.shape[1])
    w_reg = np.where(reg > 0, 1.0 / areas[reg], 0.0).ravel()
    np.add.at(rp, (rows, k.ravel()), w_reg)
    np.add.at(fp, (rows, k.ravel()), (reg == 0).ravel().astype(np.float64))
    # passing thr[t] ⇔ k > t: reverse cumulative sums, thresholds descending → curve ascending
    rp_c = np.cumsum(rp[:, ::-1], axis=1)[:, :K]  # column u: pixels with k ≥ K − u, i.e. ≥ thr[K-1-u]
    fp_c = np.cumsum(fp[:, ::-1], axis=1)[:, :K]
    cw = np.asarray(counts, np.float64)
    R = cw @ np.array([len(np.unique(r[r > 0])) for r in reg], np.float64)
    Nn = cw @ (reg == 0).sum(1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        pro = (cw @ rp_c) / R[:, None]
        fpr = (cw @ fp_c) / Nn[:, None]
    z, o = np.zeros((len(cw), 1)), np.ones((len(cw), 1))
    fpr = np.minimum(np.concatenate([z, fpr, o], axis=1), 1.0)
    pro = np.minimum(np.concatenate([z, pro, o], axis=1), 1.0)
    return _pro_area(fpr, pro, R, Nn, fpr_limit)


def _per_class(maps, masks, scores, labels, classes, counts, fpr_limit, grid) -> dict[str, np.ndarray]:
    """(B, n_classes) replicate values of each metric; row 0 of ``counts`` must be all ones (it is
    computed exactly: :func:`~diffpath.scoring.metrics.pixel_auroc`, :func:`weighted_pro`)."""
    m = np.asarray(maps, np.float64)
    g = np.asarray(masks, bool)
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    c = np.asarray(classes).ravel()
    cls_list = sorted(set(c.tolist()))
    B = len(counts)
    out = {k: np.full((B, len(cls_list)), np.nan) for k in METRICS}
    for j, cls in enumerate(cls_list):
        idx = np.flatnonzero(c == cls)
        cnt = counts[:, idx].astype(np.float64)
        out["image_auroc"][:, j] = weighted_auroc(s[idx], y[idx], cnt)
        gi = g[idx]
        if not gi.any() or gi.all():
            continue
        A, npos, nneg = _pair_matrix(m[idx], gi)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["pixel_auroc"][:, j] = np.einsum("bi,ij,bj->b", cnt, A, cnt) / ((cnt @ npos) * (cnt @ nneg))
        out["pro"][0, j] = weighted_pro(m[idx], gi, cnt[:1], fpr_limit)[0]
        out["pro"][1:, j] = _pro_grid(m[idx], gi, cnt[1:], fpr_limit, grid)
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of replicate values (NaN-free)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    return float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))


def paired_bootstrap(
    results: Mapping[str, tuple[np.ndarray, np.ndarray]],
    masks: np.ndarray,
    labels: np.ndarray,
    classes: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    fpr_limit: float = 0.3,
    grid: int = 2000,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, np.ndarray]]]:
    """Class-mean metrics with bootstrap intervals for several methods on the *same* resamples.

    Args:
        results: method → ``(maps (N, H, W), scores (N,))``.
        masks, labels, classes: the benchmark's ground truth (N, H, W), (N,), (N,).
        n_boot: replicates; seed: seeds the resampling (shared by all methods).
        grid: the replicates' PRO is integrated on this many quantile thresholds of each class's
            map values (the point value is the exact sweep); pixel AUROC is exact in every
            replicate (a per-class image×image matrix of pairwise pixel comparisons).

    Returns:
        ``(table, replicates)``: ``table[method]`` holds, per metric, the point value (identical to
        :func:`~diffpath.scoring.metrics.localization_metrics`'s ``mean`` row) and
        ``<metric>_lo`` / ``<metric>_hi``; ``replicates[method][metric]`` the (n_boot,) class-mean
        values, for paired differences (:func:`interval` of ``a − b``).
    """
    counts = np.vstack([np.ones((1, len(labels)), np.int32), class_counts(classes, n_boot, seed)])
    table: dict[str, dict[str, float]] = {}
    reps: dict[str, dict[str, np.ndarray]] = {}
    for name, (maps, scores) in results.items():
        per = _per_class(maps, masks, scores, labels, classes, counts, fpr_limit, grid)
        row: dict[str, float] = {}
        reps[name] = {}
        for k in METRICS:
            with np.errstate(all="ignore"):
                mean = np.nanmean(per[k], axis=1) if np.isfinite(per[k]).any() else np.full(len(counts), np.nan)
            row[k] = float(mean[0])
            row[f"{k}_lo"], row[f"{k}_hi"] = interval(mean[1:], level)
            reps[name][k] = mean[1:]
        table[name] = row
    return table, reps


def bootstrap_metrics(maps, masks, scores, labels, classes, *, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, fpr_limit: float = 0.3) -> dict[str, float]:
    """One method's class-mean metrics and their intervals (see :func:`paired_bootstrap`)."""
    table, _ = paired_bootstrap({"m": (maps, scores)}, masks, labels, classes, n_boot=n_boot, seed=seed,
                                level=level, fpr_limit=fpr_limit)
    return table["m"]


def difference_interval(reps: Mapping[str, Mapping[str, np.ndarray]], a: str, b: str,
                        metrics: Sequence[str] = METRICS, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the paired replicate differences ``a − b``, per metric."""
    return {k: interval(np.asarray(reps[a][k]) - np.asarray(reps[b][k]), level) for k in metrics}


__all__ += ["difference_interval"]
