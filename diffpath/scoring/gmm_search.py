"""The GMM grid search of :class:`~diffpath.scoring.scorers.GMMScorer`, on the batched-EM fast path.

It reproduces ``GridSearchCV(Pipeline([StandardScaler, GaussianMixture]), grid, cv=folds)`` with
the default ``score`` (mean held-out log-likelihood) and ``refit=True``:

* each fold standardises with a scaler fitted on its training part, applied to all rows;
* k-means labels (scikit-learn's ``KMeans``, the mixture's seed) are computed once per
  (fold, n_components) and shared by the four covariance types;
* on a GPU, the folds of one grid point are one batched EM problem
  (:meth:`~diffpath.scoring.gmm.BatchedEM.fit`); on the CPU each (grid point, fold) is its own
  problem over its training rows only (:meth:`~diffpath.scoring.gmm.BatchedEM.fit_rows`, cache-sized
  chunks: batching the folds costs 1.5× per fold there), and ``n_jobs`` threads share these
  problems and the k-means initialisations; each problem computes the same bits whatever
  ``n_jobs`` is;
* the best grid point is the first with the highest mean fold score (GridSearchCV's rank order:
  the grid is enumerated covariance type first, then n_components, as ``ParameterGrid`` sorts keys);
* the chosen point is refitted on all rows and returned as a scikit-learn ``Pipeline`` whose
  ``GaussianMixture`` carries the fitted parameters, so scoring and pickling are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from diffpath.scoring.gmm import (
    BatchedEM,
    EMResult,
    kmeans_labels,
    kmeans_one,
    run_tasks,
)

__all__ = ["fast_grid_search", "fit_gmm_pipeline", "resolve_device"]


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` → CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _chunk(device: str | torch.device, chunk_elems: int | None) -> int:
    """Default memory bound per chunk tensor: 16 M elements (128 MiB) on CPU, 128 M on a GPU."""
    if chunk_elems is not None:
        return int(chunk_elems)
    return 1 << 27 if torch.device(device).type == "cuda" else 1 << 24


def _to_sklearn(res: EMResult, i: int, cov_type: str, n_components: int, max_iter: int,
                reg_covar: float, tol: float, random_state: int | None) -> GaussianMixture:
    """A fitted ``GaussianMixture`` holding problem ``i`` of ``res``."""
    gm = GaussianMixture(n_components=n_components, covariance_type=cov_type, max_iter=max_iter,
                         reg_covar=reg_covar, tol=tol, random_state=random_state)
    pc = res.precisions_cholesky[i]
    gm.weights_ = res.weights[i]
    gm.means_ = res.means[i]
    gm.covariances_ = res.covariances[i]
    gm.precisions_cholesky_ = pc
    if cov_type == "full":
        gm.precisions_ = pc @ pc.transpose(0, 2, 1)
    elif cov_type == "tied":
        gm.precisions_ = pc @ pc.T
    else:
        gm.precisions_ = pc**2
    gm.converged_ = bool(res.converged[i])
    gm.n_iter_ = int(res.n_iter[i])
    gm.lower_bound_ = float(res.lower_bound[i])
    gm.n_features_in_ = res.means.shape[-1]
    return gm


def fit_gmm_pipeline(X: np.ndarray, n_components: int, covariance_type: str, *, max_iter: int = 100,
                     reg_covar: float = 1e-6, tol: float = 1e-3, random_state: int | None = 0,
                     device: str | torch.device = "cpu", chunk_elems: int | None = None) -> Pipeline:
    """StandardScaler + GaussianMixture fitted on all of ``X`` (N, D) by the fast path."""
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    (lab,) = kmeans_labels([Z], n_components, random_state)
    em = BatchedEM(covariance_type, reg_covar=reg_covar, tol=tol, max_iter=max_iter, device=device,
                   chunk_elems=_chunk(device, chunk_elems))
    if em.device.type == "cpu":
        (res,) = run_tasks([lambda: em.fit_rows(Z, lab, n_components)])  # one BLAS thread
    else:
        res = em.fit(Z[None], np.ones((1, len(Z))), lab[None], n_components)
    if res.failed[0]:
        raise ValueError("the refitted mixture has a covariance that is not positive definite; "
                         "increase reg_covar")
    gm = _to_sklearn(res, 0, covariance_type, n_components, max_iter, reg_covar, tol, random_state)
    return Pipeline([("scaler", scaler), ("GMM", gm)])


def fast_grid_search(X: np.ndarray, n_components: Sequence[int], covariance_types: Sequence[str],
                     splits: Sequence[tuple[np.ndarray, np.ndarray]], *, max_iter: int = 100,
                     reg_covar: float = 1e-6, tol: float = 1e-3, random_state: int | None = 0,
                     device: str | torch.device = "cpu", n_jobs: int = 1,
                     chunk_elems: int | None = None) -> dict[str, Any]:
    """Cross-validated grid search of StandardScaler + GaussianMixture.

    Args:
        X: (N, D) training features.
        splits: (train_idx, test_idx) per fold, e.g. ``list(KFold(...).split(X))``.
        n_jobs: threads (k-means initialisations; on the CPU also the EM problems). The result
            does not depend on it.
    Returns:
        ``{"params": [...], "mean_test_score": (P,), "split_scores": (P, F), "best_index": int,
        "best_params": {...}, "best_score": float, "n_iter": (P, F)}``, P grid points in
        GridSearchCV's order.
    """
    X = np.asarray(X, dtype=np.float64)
    if torch.device(device).type == "cpu":
        return _cpu_grid_search(X, list(n_components), list(covariance_types), splits,
                                max_iter=max_iter, reg_covar=reg_covar, tol=tol,
                                random_state=random_state, n_jobs=n_jobs)
    N, _ = X.shape
    F = len(splits)
    Z = np.empty((F, N, X.shape[1]))
    W = np.zeros((F, N))
    for f, (tr, _te) in enumerate(splits):
        Z[f] = StandardScaler().fit(X[tr]).transform(X)
        W[f, tr] = 1.0
    comps = list(n_components)
    labels: dict[int, np.ndarray] = {}
    for k in comps:
        labs = kmeans_labels([Z[f][splits[f][0]] for f in range(F)], k, random_state, n_jobs=n_jobs)
        L = np.zeros((F, N), dtype=np.int64)
        for f, lab in enumerate(labs):
            L[f, splits[f][0]] = lab
        labels[k] = L

    params, scores, iters = [], [], []
    # ParameterGrid sorts the keys (covariance_type < n_components) and varies the last fastest
    order = [(c, k) for c in covariance_types for k in comps]
    em_cache: dict[str, BatchedEM] = {}
    for cov, k in order:
        em = em_cache.setdefault(cov, BatchedEM(cov, reg_covar=reg_covar, tol=tol, max_iter=max_iter,
                                                device=device, chunk_elems=_chunk(device, chunk_elems)))
        res = em.fit(Z, W, labels[k], k)
        params.append({"covariance_type": cov, "n_components": k})
        scores.append(res.heldout)
        iters.append(res.n_iter)
    return _result(params, np.asarray(scores), np.asarray(iters))


def _cpu_grid_search(X, comps, covariance_types, splits, *, max_iter, reg_covar, tol, random_state,
                     n_jobs) -> dict[str, Any]:
    """The CPU path: every (grid point, fold) its own EM problem, ``n_jobs`` threads."""
    F = len(splits)
    folds = []
    for tr, te in splits:
        sc = StandardScaler().fit(X[tr])
        folds.append((np.ascontiguousarray(sc.transform(X[tr])), np.ascontiguousarray(sc.transform(X[te]))))
    keys = [(k, f) for k in comps for f in range(F)]
    labs = dict(zip(keys, run_tasks([lambda k=k, f=f: kmeans_one(folds[f][0], k, random_state)
                                     for k, f in keys], n_jobs)))
    order = [(c, k) for c in covariance_types for k in comps]
    ems = {c: BatchedEM(c, reg_covar=reg_covar, tol=tol, max_iter=max_iter, device="cpu") for c in covariance_types}
    jobs = [(c, k, f) for c, k in order for f in range(F)]
    # the slowest problems first (full, then more components), so the threads finish together
    cost = {"full": 4, "tied": 2, "diag": 2, "spherical": 1}
    run = sorted(range(len(jobs)), key=lambda j: -cost.get(jobs[j][0], 1) * jobs[j][1])
    out = run_tasks([lambda c=jobs[j][0], k=jobs[j][1], f=jobs[j][2]:
                     ems[c].fit_rows(folds[f][0], labs[k, f], k, X_test=folds[f][1]) for j in run], n_jobs)
    res = [None] * len(jobs)
    for j, r in zip(run, out):
        res[j] = r
    scores = np.array([r.heldout[0] for r in res]).reshape(len(order), F)
    iters = np.array([r.n_iter[0] for r in res]).reshape(len(order), F)
    params = [{"covariance_type": c, "n_components": k} for c, k in order]
    return _result(params, scores, iters)


def _result(params, split_scores, iters) -> dict[str, Any]:
    mean = split_scores.mean(axis=1)
    best = int(np.argmax(mean)) if np.isfinite(mean).any() else 0
    return {"params": params, "mean_test_score": mean, "split_scores": split_scores,
            "best_index": best, "best_params": params[best], "best_score": float(mean[best]),
            "n_iter": iters}
