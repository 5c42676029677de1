"""Saving and loading fitted scorers without pickle.

A fitted :class:`~diffpath.scoring.scorers.GMMScorer` or
:class:`~diffpath.scoring.scorers.KDEScorer` is stored as plain numbers: the learned arrays in an
``.npz`` read with ``allow_pickle=False`` and a JSON description (kind, estimator settings), so
loading a scorer can never run code. On load the scikit-learn objects are rebuilt from those
numbers and every array's dtype and shape is checked:

=======================  =====================================================================
``scaler.mean``          (D,) StandardScaler ``mean_`` (when the scorer standardises)
``scaler.scale``         (D,) ``scale_``; ``scaler.var`` (D,) ``var_``
``gmm.weights``          (K,) GaussianMixture ``weights_``
``gmm.means``            (K, D) ``means_``
``gmm.covariances``      ``covariances_``: (K, D, D) full, (D, D) tied, (K, D) diag, (K,) spherical
``gmm.precisions_cholesky``  ``precisions_cholesky_``, same shape
``kde.data``             (N, D) the KernelDensity's fitted (standardised) data; its bandwidth is
                         in the JSON
=======================  =====================================================================

Only the public learned attributes of ``StandardScaler``, ``GaussianMixture`` and
``KernelDensity`` are used; the scorer is found by looking for those estimators among the fitted
scorer's attributes (inside a ``Pipeline`` too), so the scorer classes may change their internals.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import KernelDensity
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["FORMAT", "RestoredScorer", "ScorerFormatError", "load_scorer", "save_scorer"]

FORMAT = "diffpath-scorer"
VERSION = 1
_COV_TYPES = ("full", "tied", "diag", "spherical")
_GMM_PARAMS = {"n_components": int, "covariance_type": str, "tol": float, "reg_covar": float,
               "max_iter": int, "n_init": int, "init_params": str}
_KDE_PARAMS = {"kernel": str, "metric": str, "algorithm": str, "leaf_size": int, "atol": float,
               "rtol": float, "breadth_first": bool}


class ScorerFormatError(ValueError):
    """A saved scorer that is missing, malformed, or not of a known kind."""


# ----------------------------------------------------------------------------------------------
# finding the fitted estimators


def _estimators(obj: Any) -> list[Any]:
    """The StandardScaler / GaussianMixture / KernelDensity objects among ``obj``'s fitted
    attributes (``name_``), looking inside pipelines, in attribute (= pipeline) order."""
    found: list[Any] = []

    def visit(v: Any) -> None:
        if isinstance(v, (StandardScaler, GaussianMixture, KernelDensity)):
            if not any(v is f for f in found):
                found.append(v)
        elif isinstance(v, Pipeline):
            for _, step in v.steps:
                visit(step)

    if isinstance(obj, RestoredScorer):
        visit(obj.scaler)
        visit(obj.estimator)
    for name, value in vars(obj).items():
        if name.endswith("_") and not name.startswith("_"):
            visit(value)
    return found


def _clean_params(est: Any, allowed: Mapping[str, type]) -> dict[str, Any]:
    p = est.get_params()
    return {k: allowed[k](p[k]) for k in allowed if k in p and p[k] is not None}


def _json_safe(params: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, (tuple, list)):
            v = list(v)
        if isinstance(v, (bool, int, float, str, type(None))) or (
                isinstance(v, list) and all(isinstance(x, (bool, int, float, str)) for x in v)):
            out[str(k)] = v
    return out


# ----------------------------------------------------------------------------------------------
# the restored scorer


class RestoredScorer:
    """A scorer rebuilt from saved numbers: ``score_samples`` as the fitted one.

    Attributes:
        kind: ``"gmm"`` or ``"kde"``.
        scaler: the rebuilt StandardScaler, or None.
        estimator: the rebuilt GaussianMixture or KernelDensity.
        n_features_in_: D.
        params: the original scorer's parameters; best_params_: its chosen hyper-parameters.
    """

    def __init__(self, kind: str, scaler: StandardScaler | None, estimator: Any, n_features: int,
                 params: dict[str, Any] | None = None, best_params: dict[str, Any] | None = None):
        self.kind = kind
        self.scaler = scaler
        self.estimator = estimator
        self.n_features_in_ = int(n_features)
        self.params = dict(params or {})
        self.best_params_ = best_params

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return dict(self.params)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Log-density (N,) of feature rows X (N, D)."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"features must be (N, {self.n_features_in_}), got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError(f"{int((~np.isfinite(X)).any(axis=1).sum())} feature rows hold NaN or inf")
        Z = self.scaler.transform(X) if self.scaler is not None else X
        return np.asarray(self.estimator.score_samples(Z), dtype=np.float64)

    def __repr__(self) -> str:
        return f"RestoredScorer(kind={self.kind!r}, estimator={type(self.estimator).__name__})"


# ----------------------------------------------------------------------------------------------
# save


def save_scorer(scorer: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Write the fitted ``scorer``'s arrays to the ``.npz`` ``path``; return its JSON description
    (store it next to the file, e.g. in the detector's ``detector.json``).

    Raises:
        ScorerFormatError: the scorer holds no StandardScaler + GaussianMixture or KernelDensity.
    """
    ests = _estimators(scorer)
    scalers = [e for e in ests if isinstance(e, StandardScaler)]
    gmms = [e for e in ests if isinstance(e, GaussianMixture)]
    kdes = [e for e in ests if isinstance(e, KernelDensity)]
    if len(scalers) > 1 or len(gmms) + len(kdes) != 1:
        raise ScorerFormatError(
            f"cannot save a {type(scorer).__name__}: expected an optional StandardScaler and one "
            f"GaussianMixture or KernelDensity among its fitted attributes, found "
            f"{[type(e).__name__ for e in ests]}"
        )
    arrays: dict[str, np.ndarray] = {}
    desc: dict[str, Any] = {"format": FORMAT, "format_version": VERSION,
                            "class": type(scorer).__name__, "scaler": bool(scalers)}
    if scalers:
        sc = scalers[0]
        desc["scaler_params"] = {"with_mean": bool(sc.with_mean), "with_std": bool(sc.with_std),
                                 "n_samples_seen": int(np.max(sc.n_samples_seen_))}
        for name in ("mean", "scale", "var"):
            v = getattr(sc, name + "_", None)
            if v is not None:
                arrays[f"scaler.{name}"] = np.asarray(v, np.float64)
    if gmms:
        g = gmms[0]
        desc["kind"] = "gmm"
        desc["estimator"] = _clean_params(g, _GMM_PARAMS)
        desc["n_features"] = int(np.asarray(g.means_).shape[1])
        for name in ("weights", "means", "covariances", "precisions_cholesky"):
            arrays[f"gmm.{name}"] = np.asarray(getattr(g, name + "_"), np.float64)
    else:
        k = kdes[0]
        desc["kind"] = "kde"
        desc["estimator"] = _clean_params(k, _KDE_PARAMS)
        bw = getattr(k, "bandwidth_", k.bandwidth)
        desc["estimator"]["bandwidth"] = float(bw)
        data = np.asarray(k.tree_.data, np.float64)
        arrays["kde.data"] = data
        desc["n_features"] = int(data.shape[1])
    if hasattr(scorer, "get_params"):
        desc["params"] = _json_safe(scorer.get_params())
    best = getattr(scorer, "best_params_", None)
    desc["best_params"] = _json_safe(best) if isinstance(best, Mapping) else None
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return desc


# ----------------------------------------------------------------------------------------------
# load


def _array(z: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in z:
        raise ScorerFormatError(f"the scorer file has no array {name!r}")
    a = np.asarray(z[name])
    if a.dtype.kind != "f" or a.shape != shape:
        raise ScorerFormatError(f"scorer array {name!r} is {a.dtype} {a.shape}, expected float {shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ScorerFormatError(f"scorer array {name!r} holds NaN or inf")
    return a


def _typed(d: Any, allowed: Mapping[str, type], what: str) -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ScorerFormatError(f"{what} must be a JSON object")
    out = {}
    for k, v in d.items():
        if k not in allowed:
            continue
        t = allowed[k]
        ok = isinstance(v, bool) if t is bool else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (t is float or float(v).is_integer()) if t in (int, float) else isinstance(v, t))
        if not ok:
            raise ScorerFormatError(f"{what}: {k} must be {t.__name__}{' (finite)' if t is float else ''}, got {v!r}")
        out[k] = t(v)
    return out


def _precisions(chol: np.ndarray, cov_type: str) -> np.ndarray:
    if cov_type == "full":
        return np.einsum("kij,klj->kil", chol, chol)
    if cov_type == "tied":
        return chol @ chol.T
    return chol**2


def _check_cholesky(chol: np.ndarray, cov_type: str) -> None:
    """Cholesky factors of precisions have a positive diagonal (a zero gives -inf log-densities)."""
    diag = {"full": lambda c: np.diagonal(c, axis1=1, axis2=2), "tied": np.diagonal}.get(cov_type, lambda c: c)(chol)
    if not np.all(diag > 0):
        raise ScorerFormatError("scorer array 'gmm.precisions_cholesky' must have a positive diagonal "
                                f"(found {int(np.sum(~(diag > 0)))} entries ≤ 0)")


def _expected_arrays(desc: Mapping[str, Any], kind: str, D: int, n_rows: int | None) -> dict[str, tuple]:
    """The arrays a description promises: name → (dtype kind, shape), read header first."""
    spec: dict[str, tuple] = {}
    if desc.get("scaler"):
        spec.update({f"scaler.{k}": ("f", (D,)) for k in ("mean", "scale", "var")})
    if kind == "kde":
        spec["kde.data"] = ("f", (n_rows, D))
        return spec
    ep = _typed(desc.get("estimator", {}), _GMM_PARAMS, "estimator")
    K, ct = ep.get("n_components"), ep.get("covariance_type")
    if not K or not 1 <= K <= 100_000 or ct not in _COV_TYPES:
        raise ScorerFormatError(f"bad GMM settings (n_components={K!r}, covariance_type={ct!r})")
    cov_shape = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}[ct]
    spec.update({"gmm.weights": ("f", (K,)), "gmm.means": ("f", (K, D)), "gmm.covariances": ("f", cov_shape),
                 "gmm.precisions_cholesky": ("f", cov_shape)})
    return spec


def _read_arrays(path: str | os.PathLike, spec: Mapping[str, tuple], scaler: bool) -> dict[str, np.ndarray]:
    from diffpath.io import InputError, read_npz_checked

    optional = tuple(k for k in spec if k.startswith("scaler.")) if scaler else ()
    try:
        return read_npz_checked(path, spec, optional=optional)
    except InputError as exc:
        raise ScorerFormatError(" ".join(str(exc).split())) from exc


def _scaler(desc: Mapping[str, Any], z: Mapping[str, np.ndarray], D: int) -> StandardScaler:
    sp = _typed(desc.get("scaler_params", {}), {"with_mean": bool, "with_std": bool,
                                               "n_samples_seen": int}, "scaler_params")
    scaler = StandardScaler(with_mean=sp.get("with_mean", True), with_std=sp.get("with_std", True))
    scaler.mean_ = _array(z, "scaler.mean", (D,)) if "scaler.mean" in z else None
    scaler.scale_ = _array(z, "scaler.scale", (D,)) if "scaler.scale" in z else None
    scaler.var_ = _array(z, "scaler.var", (D,)) if "scaler.var" in z else None
    if scaler.scale_ is not None and np.any(scaler.scale_ <= 0):
        raise ScorerFormatError("scorer array 'scaler.scale' must be positive")
    scaler.n_samples_seen_ = sp.get("n_samples_seen", 0)
    scaler.n_features_in_ = D
    return scaler


def _gmm(desc: Mapping[str, Any], z: Mapping[str, np.ndarray], D: int) -> GaussianMixture:
    ep = _typed(desc.get("estimator", {}), _GMM_PARAMS, "estimator")
    K, ct = ep["n_components"], ep["covariance_type"]
    cov_shape = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}[ct]
    g = GaussianMixture(**ep)
    g.weights_ = _array(z, "gmm.weights", (K,))
    if np.any(g.weights_ < 0) or abs(float(g.weights_.sum()) - 1.0) > 1e-6:
        raise ScorerFormatError("GMM weights must be non-negative and sum to 1")
    g.means_ = _array(z, "gmm.means", (K, D))
    g.covariances_ = _array(z, "gmm.covariances", cov_shape)
    g.precisions_cholesky_ = _array(z, "gmm.precisions_cholesky", cov_shape)
    _check_cholesky(g.precisions_cholesky_, ct)
    g.precisions_ = _precisions(g.precisions_cholesky_, ct)
    g.converged_, g.n_iter_, g.lower_bound_ = True, 0, -np.inf
    g.n_features_in_ = D
    return g


def load_scorer(path: str | os.PathLike, desc: Mapping[str, Any], *, n_features: int | None = None,
                n_rows: int | None = None) -> RestoredScorer:
    """Rebuild a scorer from the ``.npz`` ``path`` and its JSON description ``desc``; every
    array's header (dtype, shape) is checked against the description before its data is read.

    Args:
        n_features: the feature count the caller expects (D), if known.
        n_rows: the number of fitted rows a KDE must hold (its training images), if known.

    Raises:
        ScorerFormatError: a missing or malformed file or description.
    """
    if not isinstance(desc, Mapping) or desc.get("format") != FORMAT:
        raise ScorerFormatError("not a diffpath scorer description")
    if desc.get("format_version") != VERSION:
        raise ScorerFormatError(f"scorer format version {desc.get('format_version')!r} is not "
                                f"supported (this diffpath reads {VERSION})")
    kind = desc.get("kind")
    D = desc.get("n_features")
    if kind not in ("gmm", "kde") or not isinstance(D, int) or isinstance(D, bool) or not 1 <= D <= 10_000:
        raise ScorerFormatError(f"bad scorer kind or feature count ({kind!r}, {D!r})")
    if n_features is not None and D != n_features:
        raise ScorerFormatError(f"the scorer takes {D} features, the detector's method gives {n_features}")
    z = _read_arrays(path, _expected_arrays(desc, kind, D, n_rows), bool(desc.get("scaler")))
    scaler = _scaler(desc, z, D) if desc.get("scaler") else None
    params = desc.get("params") if isinstance(desc.get("params"), Mapping) else {}
    best = desc.get("best_params") if isinstance(desc.get("best_params"), Mapping) else None
    if kind == "gmm":
        est: Any = _gmm(desc, z, D)
    else:
        ep = _typed(desc.get("estimator", {}), {**_KDE_PARAMS, "bandwidth": float}, "estimator")
        if not ep.get("bandwidth", 0) > 0:
            raise ScorerFormatError("the KDE bandwidth must be a positive finite number")
        data = z["kde.data"]
        if len(data) < 1:
            raise ScorerFormatError(f"scorer array 'kde.data' must be (N, {D}) with N ≥ 1")
        est = KernelDensity(**ep).fit(_array(z, "kde.data", data.shape))
    return RestoredScorer(kind, scaler, est, D, params=dict(params), best_params=dict(best) if best else None)
