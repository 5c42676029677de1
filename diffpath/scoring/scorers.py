"""Density scorers as scikit-learn estimators.

Both follow DiffPath: fit a density on in-distribution *training* features and score test images
by their log-density (``score_samples``; higher = more in-distribution).

* :class:`GMMScorer`: ``StandardScaler`` + ``GaussianMixture`` whose number of components and
  covariance type are chosen by ``GridSearchCV`` (mean held-out log-likelihood). DiffPath's grid is
  n_components ∈ {50, 100} × covariance ∈ {full, tied, diag, spherical}, max_iter 200, 10-fold.
  When the training set is too small for the grid (a fold's training part must hold at least
  ``min_samples_per_component`` (10) samples per mixture component) the grid shrinks automatically
  and a warning says how.
* :class:`KDEScorer`: a Gaussian kernel density with a fixed bandwidth (DiffPath uses 5 on the raw
  1-D curvature).

Both have two back ends: ``"sklearn"`` (the reference) and ``"torch"`` (the fast path: batched
float64 EM over the folds, :mod:`diffpath.scoring.gmm_search`; a chunked exact KDE,
:mod:`diffpath.scoring.kde`), on the GPU when there is one. ``"auto"`` picks ``"torch"``: measured
faster on a 1-thread CPU too (``benchmarks/bench_scorers.py``, reports/benchmarks/cpu_scorers.md),
and checked against scikit-learn in ``tests/test_scorers_fast.py``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import KernelDensity
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

__all__ = ["GMMScorer", "KDEScorer", "make_scorer", "DEFAULT_GRID", "resolve_backend"]

BACKENDS = ("auto", "sklearn", "torch")


def resolve_backend(backend: str) -> str:
    """``"auto"`` → ``"torch"`` (faster on CPU and GPU, see the module docstring); else as given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return "torch" if backend == "auto" else backend

DEFAULT_GRID: dict[str, list] = {
    "n_components": [50, 100],
    "covariance_type": ["full", "tied", "diag", "spherical"],
}


def _threads(n_jobs: int | None) -> int:
    """joblib-style ``n_jobs`` (None → 1, −1 → all cores) as a thread count."""
    if n_jobs is None:
        return 1
    return max(1, (os.cpu_count() or 1) + 1 + n_jobs if n_jobs < 0 else n_jobs)


def _check_X(X, n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ValueError(f"{bad} feature rows hold NaN or inf")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"expected {n_features} features, got {X.shape[1]}")
    return X


class GMMScorer(BaseEstimator):
    """StandardScaler + GaussianMixture, hyper-parameters by cross-validated grid search.

    Args:
        n_components: candidate numbers of mixture components.
        covariance_type: candidate covariance types.
        cv: number of folds.
        max_iter: EM iterations per fit.
        random_state: seed for the mixtures' initialisation and the folds' shuffling.
        n_jobs: parallel jobs for the grid search (sklearn); torch: threads for the k-means
            initialisations and, on the CPU, the (grid point, fold) EM problems (same result for any n_jobs).
        reg_covar, tol: as ``GaussianMixture``.
        backend: ``"sklearn"`` (GridSearchCV), ``"torch"`` (batched EM, same folds, seed and
            initialisation) or ``"auto"`` (torch).
        device: torch device of the fast path; ``None``/``"auto"``: CUDA when available.
    """

    def __init__(
        self,
        n_components: Sequence[int] = (50, 100),
        covariance_type: Sequence[str] = ("full", "tied", "diag", "spherical"),
        cv: int = 10,
        max_iter: int = 200,
        random_state: int | None = 0,
        n_jobs: int | None = None,
        reg_covar: float = 1e-6,
        min_samples_per_component: int = 10,
        tol: float = 1e-3,
        backend: str = "auto",
        device: str | None = None,
    ):
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.cv = cv
        self.max_iter = max_iter
        self.random_state = random_state
        self.n_jobs = n_jobs
        self.reg_covar = reg_covar
        self.min_samples_per_component = min_samples_per_component
        self.tol = tol
        self.backend = backend
        self.device = device

    def effective_grid(self, n_samples: int) -> tuple[dict[str, list], int]:
        """The grid and fold count that a training set of ``n_samples`` can support."""
        cv = int(min(self.cv, n_samples))
        if cv < 2:
            raise ValueError(f"need at least 2 training samples to fit a GMM, got {n_samples}")
        fold_train = n_samples - int(np.ceil(n_samples / cv))
        comps = sorted({int(k) for k in self.n_components})
        # a mixture needs several samples per component, or it collapses onto single points
        cap = max(1, fold_train // max(1, self.min_samples_per_component))
        fits = [k for k in comps if k <= cap]
        if not fits:
            fits = [min(comps[0], cap)]
        return {"GMM__n_components": fits, "GMM__covariance_type": list(self.covariance_type)}, cv

    def fit(self, X, y=None) -> GMMScorer:
        X = _check_X(X)
        grid, cv = self.effective_grid(len(X))
        asked = sorted({int(k) for k in self.n_components})
        if grid["GMM__n_components"] != asked or cv != self.cv:
            warnings.warn(
                f"training set of {len(X)} samples is too small for the GMM grid "
                f"(n_components={asked}, cv={self.cv}); using n_components="
                f"{grid['GMM__n_components']}, cv={cv}",
                UserWarning,
                stacklevel=2,
            )
        folds = KFold(n_splits=cv, shuffle=True, random_state=self.random_state)
        self.backend_ = resolve_backend(self.backend)
        if self.backend_ == "torch":
            self._fit_torch(X, grid, list(folds.split(X)))
        else:
            self._fit_sklearn(X, grid, folds)
        if not np.isfinite(self.best_score_):
            raise RuntimeError("every GMM in the grid failed to fit these features")
        self.n_features_in_ = X.shape[1]
        return self

    def _fit_sklearn(self, X: np.ndarray, grid: dict[str, list], folds: KFold) -> None:
        pipe = Pipeline(
            [
                ("scaler", StandardScaler()),
                (
                    "GMM",
                    GaussianMixture(
                        max_iter=self.max_iter,
                        random_state=self.random_state,
                        reg_covar=self.reg_covar,
                        tol=self.tol,
                    ),
                ),
            ]
        )
        search = GridSearchCV(pipe, grid, cv=folds, n_jobs=self.n_jobs, error_score=-np.inf)
        # small EM problems are many times slower with a multi-threaded BLAS on a busy machine
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.filterwarnings("ignore", message=".*did not converge.*")
            search.fit(X)
        self.best_params_ = {k.split("__", 1)[1]: v for k, v in search.best_params_.items()}
        self.cv_results_ = search.cv_results_
        self.best_score_ = float(search.best_score_)
        self.pipeline_ = search.best_estimator_

    def _fit_torch(self, X: np.ndarray, grid: dict[str, list], splits: list) -> None:
        from diffpath.scoring.gmm_search import fast_grid_search, fit_gmm_pipeline, resolve_device

        device = resolve_device(self.device)
        kw = dict(max_iter=self.max_iter, reg_covar=self.reg_covar, tol=self.tol,
                  random_state=self.random_state, device=device)
        res = fast_grid_search(X, grid["GMM__n_components"], grid["GMM__covariance_type"], splits,
                               n_jobs=_threads(self.n_jobs), **kw)
        mean = res["mean_test_score"]
        order = np.argsort(-mean, kind="stable")
        rank = np.empty(len(mean), dtype=np.int32)
        rank[order] = np.arange(1, len(mean) + 1)
        self.cv_results_ = {
            "params": [{f"GMM__{k}": v for k, v in p.items()} for p in res["params"]],
            "mean_test_score": mean,
            "rank_test_score": rank,
            "n_iter": res["n_iter"],
            **{f"split{i}_test_score": res["split_scores"][:, i] for i in range(len(splits))},
        }
        self.best_params_ = dict(res["best_params"])
        self.best_score_ = float(res["best_score"])
        if np.isfinite(self.best_score_):
            self.pipeline_ = fit_gmm_pipeline(X, self.best_params_["n_components"],
                                              self.best_params_["covariance_type"], **kw)

    def summary(self) -> dict:
        """What was chosen: the best grid point and its mean held-out log-likelihood."""
        check_is_fitted(self, "pipeline_")
        return {**self.best_params_, "cv_loglik": round(self.best_score_, 4)}

    def score_samples(self, X) -> np.ndarray:
        """Log-density of each row (N,), in the scaler's standardised space."""
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.score_samples(_check_X(X, self.n_features_in_))


class KDEScorer(BaseEstimator):
    """Gaussian kernel density (DiffPath's 1-D scorer: raw features, bandwidth 5).

    Args:
        bandwidth: kernel width in feature units, or ``"scott"`` / ``"silverman"``.
        standardize: standardise the features first (for features whose scale is unlike
            DiffPath's curvature, where a fixed bandwidth of 5 would mean nothing).
        backend: ``"sklearn"`` (``KernelDensity``), ``"torch"`` (chunked exact log-sum-exp,
            :func:`diffpath.scoring.kde.gaussian_kde_log_density`) or ``"auto"`` (torch; a
            ``"scott"``/``"silverman"`` bandwidth is resolved by scikit-learn either way).
        device: torch device; ``None``/``"auto"``: CUDA when available.
    """

    def __init__(self, bandwidth: float | str = 5.0, standardize: bool = False, backend: str = "auto",
                 device: str | None = None):
        self.bandwidth = bandwidth
        self.standardize = standardize
        self.backend = backend
        self.device = device

    def fit(self, X, y=None) -> KDEScorer:
        X = _check_X(X)
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        Z = self.scaler_.transform(X) if self.scaler_ is not None else X
        self.kde_ = KernelDensity(kernel="gaussian", bandwidth=self.bandwidth).fit(Z)
        self.backend_ = resolve_backend(self.backend)
        self.train_ = Z if self.backend_ == "torch" else None
        self.n_features_in_ = X.shape[1]
        return self

    def summary(self) -> dict:
        return {"bandwidth": self.bandwidth, "standardize": self.standardize}

    def score_samples(self, X) -> np.ndarray:
        check_is_fitted(self, "kde_")
        X = _check_X(X, self.n_features_in_)
        Z = self.scaler_.transform(X) if self.scaler_ is not None else X
        if getattr(self, "backend_", "sklearn") == "torch":
            from diffpath.scoring.gmm_search import resolve_device
            from diffpath.scoring.kde import gaussian_kde_log_density

            return gaussian_kde_log_density(self.train_, Z, self.kde_.bandwidth_,
                                            device=resolve_device(self.device))
        return self.kde_.score_samples(Z)


def make_scorer(kind: str, **params) -> BaseEstimator:
    """``"gmm"`` → :class:`GMMScorer`, ``"kde"`` → :class:`KDEScorer`."""
    if kind == "gmm":
        return GMMScorer(**params)
    if kind == "kde":
        return KDEScorer(**params)
    raise ValueError(f"unknown scorer {kind!r}; expected 'gmm' or 'kde'")
