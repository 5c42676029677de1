#!/usr/bin/env python
"""Speed and agreement of the density scorers' grid search, side by side.

On synthetic DiffPath-like features (N × D, skewed and correlated, from 30 clusters; an OOD set is
the same generator shifted), one process fits, for each path:

``sklearn``
    the reference: ``GMMScorer(backend="sklearn")``, i.e. scikit-learn's serial ``GridSearchCV``
    over StandardScaler + GaussianMixture (one thread).
``torch_cpu`` / ``torch_cpu:J`` / ``torch_cuda``
    ``GMMScorer(backend="torch")`` with the same folds, seed and k-means initialisation: on the
    CPU one EM problem per (grid point, fold) in J threads (default ``--n-jobs``); on the GPU the
    folds of a grid point batched.

``--paths`` may name a path several times: the runs are made in that order (interleave them on a
shared machine, e.g. ``torch_cpu,torch_cpu:2,sklearn,torch_cpu,torch_cpu:2``) and the summary
line gives each path's median seconds and its speed-up over sklearn's median. Each run prints one
JSON line: seconds of the whole ``fit`` (grid search + refit), ``/proc/loadavg`` before and after,
the chosen grid point, whether it is scikit-learn's, the largest |Δ log-density| against the first
sklearn run over the in-distribution and OOD test rows, the largest |Δ held-out fold score| and the
AUROC difference. ``--kde`` adds the same lines for the 1-D KDE scorer (bandwidth 5 on raw features).

``--embedded DIR`` instead compares the paths on a study's own features: DIR holds a params file and
the errors caches the study's ``data`` and ``errors`` stages wrote (``DIR/<layout.data>/errors/<set>/
{train,test}.npz``); for each in-distribution set and each GMM method of ``methods`` it fits
``scorers.gmm`` both ways and prints the chosen points, the largest |Δ log-density| on the training
rows and on every set's test rows, and the AUROC of in-distribution test against each other set.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice python benchmarks/bench_scorers.py --n-train 20000 \
        --paths torch_cpu:1,torch_cpu:2,sklearn,torch_cpu:1,torch_cpu:2
    python benchmarks/bench_scorers.py --n-train 163000 --paths torch_cuda,sklearn   # GPU machine
    OMP_NUM_THREADS=1 python benchmarks/bench_scorers.py --embedded /tmp/emb --paths sklearn,torch_cpu:2
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

from diffpath.scoring.metrics import auroc
from diffpath.scoring.scorers import GMMScorer, KDEScorer


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


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _path(spec: str, n_jobs: int) -> tuple[str, str | None, int]:
    """``sklearn`` | ``torch_cpu[:J]`` | ``torch_cuda`` → (backend, device, n_jobs)."""
    name, _, jobs = spec.partition(":")
    if name == "sklearn":
        return "sklearn", None, 1
    if name not in ("torch_cpu", "torch_cuda"):
        raise SystemExit(f"unknown path {spec!r}")
    return "torch", name.split("_")[1], int(jobs) if jobs else n_jobs


def _fit_timed(sc: GMMScorer, X: np.ndarray, device: str | None) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sc.fit(X)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def embedded(args) -> None:
    """Fast path against scikit-learn on the features of a study folder (see the module doc)."""
    import warnings

    import yaml

    from diffpath.methods.registry import get_method
    from diffpath.cache import read_cache

    root = Path(args.embedded)
    params = yaml.safe_load((root / args.params).read_text())
    data_dir = root / params.get("layout", {}).get("data", "data") / "errors"
    gmm = dict(params["scorers"]["gmm"])
    methods = [m for m in params["methods"] if get_method(m).scorer == "gmm"]
    sets = [d for d in params["data"]["datasets"] if (data_dir / d / "test.npz").exists()]
    tests = {d: read_cache(data_dir / d / "test.npz") for d in sets}
    specs = args.paths.split(",") if args.paths else ["sklearn", "torch_cpu"]
    for ind in params["data"]["in_dist"]:
        if not (data_dir / ind / "train.npz").exists():
            print(json.dumps({"in_dist": ind, "skipped": f"no {data_dir / ind / 'train.npz'}"}), flush=True)
            continue
        train = read_cache(data_dir / ind / "train.npz")
        for method in methods:
            m = get_method(method)
            X = m.features(train)
            feats = {d: m.features(c) for d, c in tests.items()}
            ref = None
            for spec in specs:
                backend, device, jobs = _path(spec, args.n_jobs)
                sc = GMMScorer(**gmm, backend=backend, device=device, n_jobs=jobs)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # the grid shrinking on small sets
                    secs = _fit_timed(sc, X, device)
                s_train = sc.score_samples(X)
                s_test = {d: sc.score_samples(F) for d, F in feats.items()}
                au = {d: auroc(s_test[ind], s_test[d]) for d in s_test if d != ind}
                row = {"in_dist": ind, "method": method, "path": spec, "n_train": len(X), "dim": X.shape[1],
                       "seconds": round(secs, 3), **sc.best_params_, "cv_loglik": sc.best_score_,
                       "auroc": au}
                if ref is None and spec == "sklearn":
                    ref = (sc, s_train, s_test, au)
                elif ref is not None:
                    rsc, r_train, r_test, r_au = ref
                    row["same_point_as_sklearn"] = sc.best_params_ == rsc.best_params_
                    row["max_abs_dlogdensity_train"] = float(np.abs(s_train - r_train).max())
                    row["max_abs_dlogdensity_test"] = float(max(np.abs(s_test[d] - r_test[d]).max() for d in s_test))
                    row["max_abs_dmean_cv_score"] = float(np.abs(np.asarray(sc.cv_results_["mean_test_score"])
                                                                 - np.asarray(rsc.cv_results_["mean_test_score"])).max())
                    row["max_abs_dauroc"] = float(max((abs(au[d] - r_au[d]) for d in au), default=float("nan")))
                print(json.dumps(row), flush=True)


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
                    help="comma list of sklearn, torch_cpu[:n_jobs], torch_cuda, in run order, repeats "
                         "allowed (default: sklearn, torch_cpu and torch_cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--n-jobs", type=int, default=1, help="threads of a torch path without ':J'")
    ap.add_argument("--kde", action="store_true", help="also time the 1-D KDE scorer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedded", default=None, metavar="DIR",
                    help="compare the paths on the study features under DIR instead")
    ap.add_argument("--params", default="params.yaml", help="params file inside DIR (--embedded)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.embedded:
        embedded(args)
        return
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
           "omp": os.environ.get("OMP_NUM_THREADS"), "nproc": os.cpu_count(),
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}

    runs = []
    for spec in paths:
        backend, device, jobs = _path(spec, args.n_jobs)
        sc = GMMScorer(**grid, backend=backend, device=device, n_jobs=jobs)
        load0 = _load()
        secs = _fit_timed(sc, X, device)
        load1 = _load()
        s_in, s_out = sc.score_samples(T_in), sc.score_samples(T_out)
        row = {"scorer": "gmm", "path": spec, "n_jobs": jobs, "seconds": round(secs, 3),
               "loadavg_before": load0, "loadavg_after": load1, **sc.best_params_,
               "cv_loglik": sc.best_score_, "auroc": auroc(s_in, s_out), **env}
        runs.append((spec, sc, s_in, s_out, row))
        print(json.dumps(row), flush=True)
    ref = next((r for r in runs if r[0] == "sklearn"), None)
    if ref is not None:
        _, rsc, r_in, r_out, rrow = ref
        med = {p: float(np.median([r[4]["seconds"] for r in runs if r[0] == p])) for p in dict.fromkeys(paths)}
        for spec, sc, s_in, s_out, row in runs:
            if spec == "sklearn":
                continue
            folds = [k for k in rsc.cv_results_ if k.startswith("split") and k.endswith("_test_score")]
            print(json.dumps({
                "scorer": "gmm", "path": spec, "agreement_with": "sklearn",
                "same_point_as_sklearn": sc.best_params_ == rsc.best_params_,
                "max_abs_dlogdensity": float(max(np.abs(s_in - r_in).max(), np.abs(s_out - r_out).max())),
                "max_abs_dfold_score": float(max(np.nanmax(np.abs(
                    np.asarray(sc.cv_results_[k]) - np.asarray(rsc.cv_results_[k]))) for k in folds)),
                "d_auroc": abs(row["auroc"] - rrow["auroc"])}), flush=True)
        print(json.dumps({"scorer": "gmm", "summary": "median seconds", "runs": {p: sum(r[0] == p for r in runs)
                          for p in med}, "median_seconds": med,
                          "speedup_vs_sklearn": {p: round(med["sklearn"] / v, 2) for p, v in med.items()},
                          **env}), flush=True)

    if args.kde:
        x1, q_in, q_out = X[:, :1] * 10, T_in[:, :1] * 10, T_out[:, :1] * 10
        kref = None
        kpaths = sorted(dict.fromkeys(p.partition(":")[0] for p in paths), key=lambda p: p != "sklearn")
        for path in kpaths:
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
