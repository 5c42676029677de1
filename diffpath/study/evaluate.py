"""Fit the density scorers on cached features and score every (in, out) pair.

These are the steps between the error cache and the report: for each in-distribution set and
method, fit the method's scorer on the *training* features of that set; then score the test
features of every set and compute AUROC / FPR@95 / AUPR with in-distribution positive.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffpath.io import atomic_path, save_npz_atomic, write_json_atomic
from diffpath.scoring import persist
from diffpath.study.layout import Layout, load_cache, read_npz
from diffpath.methods.registry import get_method
from diffpath.scoring.metrics import detection_metrics
from diffpath.scoring.scorers import make_scorer

__all__ = [
    "RESULT_COLUMNS",
    "save_scorer",
    "load_scorer",
    "save_scores",
    "load_scores",
    "load_test_caches",
    "fit_method_scorer",
    "score_caches",
    "evaluate_pairs",
    "metrics_tree",
]

RESULT_COLUMNS = ["method", "in_dist", "ood", "auroc", "fpr95", "aupr"]
_SEP = "__"  # method and data set names never contain it


def save_scorer(path: str | Path, scorer: Any) -> Path:
    """Write a fitted scorer as plain arrays (``<path>.npz``) and its description (``<path>.json``),
    each atomically (:mod:`diffpath.scoring.persist`: no pickle, so a scorer pulled from a shared
    cache cannot run code). Returns the ``.npz``."""
    base = Path(path)
    arrays = base.with_suffix(".npz")
    with atomic_path(arrays) as tmp:
        desc = persist.save_scorer(scorer, tmp)
    write_json_atomic(base.with_suffix(".json"), desc)
    return arrays


def load_scorer(path: str | Path) -> persist.RestoredScorer:
    """Rebuild a scorer written by :func:`save_scorer`; its ``score_samples`` gives the same
    log-densities as the fitted scorer's scikit-learn estimators."""
    base = Path(path)
    desc = json.loads(base.with_suffix(".json").read_text())
    return persist.load_scorer(base.with_suffix(".npz"), desc)


def save_scores(path: str | Path, scores: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write ``scores[method][dataset]`` → (N,) test scores to one ``.npz``, atomically."""
    save_npz_atomic(path, {f"{m}{_SEP}{d}": s for m, by in scores.items() for d, s in by.items()})


def load_scores(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read :func:`save_scores`' file back as ``{method: {dataset: (N,)}}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in read_npz(path).items():
        method, dataset = key.split(_SEP)
        out.setdefault(method, {})[dataset] = value
    return out


def fit_method_scorer(
    method: str,
    train_cache: Mapping[str, np.ndarray],
    gmm: Mapping[str, Any] | None = None,
    kde: Mapping[str, Any] | None = None,
    kde_standardize: Iterable[str] = (),
) -> Any:
    """Fit ``method``'s scorer on its features of ``train_cache``.

    Args:
        gmm: keyword arguments of :class:`diffpath.scoring.scorers.GMMScorer` for multi-D methods.
        kde: keyword arguments of :class:`diffpath.scoring.scorers.KDEScorer` for 1-D methods.
        kde_standardize: 1-D methods whose feature is standardised before the KDE.
    """
    m = get_method(method)
    X = m.features(train_cache)
    if m.scorer == "gmm":
        est = make_scorer("gmm", **dict(gmm or {}))
    else:
        est = make_scorer("kde", **dict(kde or {}), standardize=method in set(kde_standardize))
    return est.fit(X)


def score_caches(scorer: Any, method: str, caches: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Log-density scores of every image in each cache: ``{name: (N,)}``."""
    m = get_method(method)
    return {name: scorer.score_samples(m.features(c)) for name, c in caches.items()}


def evaluate_pairs(scores: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                   in_dist: Sequence[str], datasets: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """One row per (method, in_dist, ood) with ``ood`` every other data set.

    Args:
        scores: ``scores[in_dist][method][dataset]`` → test scores (N,).
    """
    rows = []
    for ind in in_dist:
        for method in methods:
            s = scores[ind][method]
            for ood in datasets:
                if ood == ind:
                    continue
                rows.append({"method": method, "in_dist": ind, "ood": ood,
                             **detection_metrics(s[ind], s[ood])})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def metrics_tree(results: pd.DataFrame) -> dict[str, Any]:
    """Nested ``{method: {in_dist: {ood: {auroc, fpr95, aupr}, "mean": {...}}}}`` for DVC metrics."""
    tree: dict[str, Any] = {}
    for (method, ind), g in results.groupby(["method", "in_dist"], sort=False):
        node = tree.setdefault(method, {}).setdefault(ind, {})
        for _, r in g.iterrows():
            node[r["ood"]] = {k: round(float(r[k]), 6) for k in ("auroc", "fpr95", "aupr")}
        node["mean"] = {k: round(float(g[k].mean()), 6) for k in ("auroc", "fpr95", "aupr")}
    for method, g in results.groupby("method", sort=False):
        tree[method]["mean_auroc"] = round(float(g["auroc"].mean()), 6)
    return tree


def load_test_caches(layout: Layout, datasets: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """The test-split error caches of ``datasets``: ``{name: cache}``."""
    return {d: load_cache(layout.errors(d, "test")) for d in datasets}
