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
