"""The MVTec/VisA metrics (diffpath.scoring.anomaly_metrics) against direct reference computations
on random maps and masks: DIVAD's image score, pixel AUROC and AP (scikit-learn), PRO (the exact
curve and DIVAD's 200-threshold version, each recomputed here by a plain loop over thresholds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from skimage import measure
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from diffpath.scoring.anomaly_metrics import (
    category_metrics,
    flipped,
    pixel_ap,
    pooled_max_scores,
    pro_reference,
)
from diffpath.scoring.metrics import pixel_auroc, pro_score


def _random_set(seed: int, n: int = 6, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Smooth-ish random maps (float64) and blob masks (several regions, some images normal)."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size))
    maps = (maps + np.roll(maps, 1, 1) + np.roll(maps, 1, 2)) / 3
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 8, 2)
            h, w = rng.integers(2, 8, 2)
            masks[i, y:y + h, x:x + w] = True
            maps[i, y:y + h, x:x + w] += 0.3 * rng.random()
    return maps, masks


def _divad_pro_loop(masks: np.ndarray, amaps: np.ndarray, num_th: int = 200) -> float:
    """DIVAD's compute_pro, restated as a loop (skimage regions, one pass per threshold)."""
    min_th, max_th = amaps.min(), amaps.max()
    rows = []
    for th in np.arange(min_th, max_th, (max_th - min_th) / num_th):
        binary = amaps > th
        pros = [binary[i][r.coords[:, 0], r.coords[:, 1]].sum() / r.area
                for i, mask in enumerate(masks) for r in measure.regionprops(measure.label(mask))]
        fpr = np.logical_and(~masks, binary).sum() / (~masks).sum()
        rows.append((float(np.mean(pros)), fpr))
    pro = np.array([p for p, f in rows if f < 0.3])
    fpr = np.array([f for p, f in rows if f < 0.3])
    return float(auc(fpr / fpr.max(), pro))


def _exact_pro_loop(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Every distinct value a threshold (map ≥ θ), the curve from (0, 0), interpolated at the limit."""
    regions = [(i, r) for i, mk in enumerate(masks) for r in measure.regionprops(measure.label(mk))]
    pts = [(0.0, 0.0)]
    for th in np.unique(maps)[::-1]:
        binary = maps >= th
        pro = np.mean([binary[i][r.coords[:, 0], r.coords[:, 1]].mean() for i, r in regions])
        pts.append(((binary & ~masks).sum() / (~masks).sum(), pro))
    f, p = np.array(pts).T
    j = np.searchsorted(f, limit, side="right")
    x = np.r_[f[:j], limit]
    y = np.r_[p[:j], p[j - 1] + (p[j] - p[j - 1]) * (limit - f[j - 1]) / (f[j] - f[j - 1])]
    return float(np.trapezoid(y, x) / limit)


def _pooled_max_direct(maps: np.ndarray) -> np.ndarray:
    out = []
    for m in maps:
        for _ in range(8):
            m = sliding_window_view(m, (8, 8)).mean(axis=(-2, -1))
        out.append(m.max())
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_score_pixel_auroc_and_ap_equal_the_reference(seed):
    maps, masks = _random_set(seed, size=72)
    np.testing.assert_allclose(pooled_max_scores(maps), _pooled_max_direct(maps), rtol=1e-12)
    assert pooled_max_scores(maps).shape == (6,)
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pro_equals_direct_loops(seed):
    maps, masks = _random_set(seed)
    # the same float64 arithmetic, summed in another order: agreement to rounding
    assert pro_reference(maps, masks) == pytest.approx(_divad_pro_loop(masks, maps), abs=1e-12)
    assert pro_score(maps, masks, 0.3) == pytest.approx(_exact_pro_loop(maps, masks), abs=1e-12)
    # a perfect map: the exact PRO is 1; the reference keeps only FPR = 0 points and divides by 0 (NaN)
    perfect = masks.astype(float) + 1e-3 * maps
    assert pro_score(perfect, masks, 0.3) == pytest.approx(1.0) and np.isnan(pro_reference(perfect, masks))


def test_category_metrics_never_flip_and_the_mean_skips_undefined_values():
    maps, masks = _random_set(0)
    good = category_metrics(maps, masks, pooled_max_scores(maps))
    bad = category_metrics(-maps, masks, -pooled_max_scores(maps))
    assert good["pixel_auroc"] > 0.5 and bad["pixel_auroc"] == pytest.approx(1 - good["pixel_auroc"])
    assert bad["pixel_auroc_flipped"] == pytest.approx(good["pixel_auroc"]) and flipped(0.3) == pytest.approx(0.7)
    normal_only = category_metrics(maps[:3], masks[:3], pooled_max_scores(maps[:3]))
    assert np.isnan(normal_only["image_auroc"]) and np.isnan(normal_only["pro"])
    from diffpath.study.industrial_report import with_means

    per = pd.DataFrame([{"row": "r", "map": "dino", "category": c, "n": 6, "n_anomalous": 3, **m}
                        for c, m in (("a", good), ("b", bad), ("c", normal_only))])
    table = with_means(per)
    assert table["category"].tolist() == ["a", "b", "c", "mean"]
    assert table["pro"].iloc[-1] == pytest.approx((good["pro"] + bad["pro"]) / 2)  # c's NaN left out
    assert table["n"].iloc[-1] == 18
