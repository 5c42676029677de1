#!/usr/bin/env python
"""Speed and agreement of the density scorers' grid search, side by side.

On synthetic DiffPath-like features (N × D, skewed and correlated, from 30 clusters; an OOD set is
the same generator shifted), one process fits, for each path:

``sklearn``
    the reference: ``GMMScorer(backend="sklearn")``, i.e. scikit-learn's serial ``GridSearchCV``
    over StandardScaler + GaussianMixture (one thread).
``torch_cpu`` / ``torch_cuda``
    ``GMMScorer(backend="torch")``: batched float64 EM over the folds on that device, the same
    folds, seed and k-means initialisation.

Each prints one JSON line: seconds of the whole ``fit`` (grid search + refit), the chosen grid
point, whether it is scikit-learn's, the largest |Δ log-density| against the sklearn path over the
in-distribution and OOD test rows, the largest |Δ held-out fold score| and the AUROC difference.
``--kde`` adds the same lines for the 1-D KDE scorer (bandwidth 5 on raw features).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_scorers.py --n-train 20000 --threads 1
    python benchmarks/bench_scorers.py --n-train 163000 --paths torch_cuda,sklearn   # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffpath.scoring.metrics import auroc  # noqa: E402
from diffpath.scoring.scorers import GMMScorer, KDEScorer  # noqa: E402


def synthetic_features(n: int, dim: int = 6, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    """(n, dim) features: 30 anisotropic Gaussian clusters, first column exponentiated (skew)."""
    gen = np.random.default_rng(1234)  # the distribution is fixed; ``seed`` draws the sample
    centres = gen.normal(0, 3, size=(30, dim))
    mix = gen.normal(size=(30, dim, dim)) * gen.uniform(0.1, 1.0, size=(30, 1, 1))
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 30, n)
    X = centres[z] + np.einsum("nd,nde->ne", rng.normal(size=(n, dim)), mix[z]) + shift
    X[:, 0] = np.exp(X[:, 0] / 4)
    return X


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=6)
    ap.add_argument("--n-components", default="50,100")
    ap.add_argument("--covariance-type", default="full,tied,diag,spherical")
    ap.add_argument("--cv", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=200)
    ap.add_argument("--paths", default=None,
                    help="comma list of sklearn, torch_cpu, torch_cuda (default: all available)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-jobs", type=int, default=1, help="k-means threads of the torch paths")
    ap.add_argument("--kde", action="store_true", help="also time the 1-D KDE scorer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = (args.paths.split(",") if args.paths else
             ["sklearn", "torch_cpu"] + (["torch_cuda"] if torch.cuda.is_available() else []))
    X = synthetic_features(args.n_train, args.dim, args.seed)
    T_in = synthetic_features(args.n_test, args.dim, args.seed + 1)
    T_out = synthetic_features(args.n_test, args.dim, args.seed + 2, shift=0.7)
    grid = dict(n_components=[int(k) for k in args.n_components.split(",")],
                covariance_type=args.covariance_type.split(","), cv=args.cv, max_iter=args.max_iter,
                random_state=args.seed)
    env = {"n_train": args.n_train, "n_test": args.n_test, "dim": args.dim, "cv": args.cv,
           "grid": f"{grid['n_components']}x{grid['covariance_type']}", "threads": args.threads,
           "omp": os.environ.get("OMP_NUM_THREADS"),
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    ref = None
    rows = []
    for path in paths:
        backend, device = ("sklearn", None) if path == "sklearn" else ("torch", path.split("_")[1])
        sc = GMMScorer(**grid, backend=backend, device=device, n_jobs=args.n_jobs)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sc.fit(X)
        if device == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        s_in, s_out = sc.score_samples(T_in), sc.score_samples(T_out)
        row = {"scorer": "gmm", "path": path, "seconds": round(secs, 3), **sc.best_params_,
               "cv_loglik": sc.best_score_, "auroc": auroc(s_in, s_out), **env}
        if ref is None and path == "sklearn":
            ref = (sc, s_in, s_out, row)
        if ref is not None:
            rsc, r_in, r_out, rrow = ref
            row["same_point_as_sklearn"] = sc.best_params_ == rsc.best_params_
            row["max_abs_dlogdensity"] = float(max(np.abs(s_in - r_in).max(), np.abs(s_out - r_out).max()))
            folds = [k for k in rsc.cv_results_ if k.startswith("split") and k.endswith("_test_score")]
            row["max_abs_dfold_score"] = float(max(np.nanmax(np.abs(
                np.asarray(sc.cv_results_[k]) - np.asarray(rsc.cv_results_[k]))) for k in folds))
            row["d_auroc"] = abs(row["auroc"] - rrow["auroc"])
            row["speedup_vs_sklearn"] = round(rrow["seconds"] / secs, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.kde:
        x1, q_in, q_out = X[:, :1] * 10, T_in[:, :1] * 10, T_out[:, :1] * 10
        kref = None
        for path in paths:
            backend, device = ("sklearn", None) if path == "sklearn" else ("torch", path.split("_")[1])
            kd = KDEScorer(bandwidth=5.0, backend=backend, device=device).fit(x1)
            t0 = time.perf_counter()
            s_in, s_out = kd.score_samples(q_in), kd.score_samples(q_out)
            secs = time.perf_counter() - t0
            row = {"scorer": "kde", "path": path, "seconds": round(secs, 3), "n_train": args.n_train,
                   "n_score": 2 * args.n_test, "auroc": auroc(s_in, s_out), "threads": args.threads}
            if kref is None and path == "sklearn":
                kref = (s_in, s_out, row)
            if kref is not None:
                row["max_abs_dlogdensity"] = float(max(np.abs(s_in - kref[0]).max(), np.abs(s_out - kref[1]).max()))
                row["d_auroc"] = abs(row["auroc"] - kref[2]["auroc"])
                row["speedup_vs_sklearn"] = round(kref[2]["seconds"] / secs, 2)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
