"""Reproducibility: a fresh run's results against the committed ones, within stated tolerances.

``python -m diffpath.study.verify DIR [--rev HEAD]`` compares every result file the embedded profile
commits (the ``cache: false`` outputs of ``dvc.yaml``) in DIR's working tree with the same file at
git revision REV of DIR, value by value, and prints per file the largest difference, where it is, the
tolerance there and the verdict. ``make verify`` runs it on a scratch clone after a fresh ``dvc repro``;
after ``make repro`` on another machine, ``python -m diffpath.study.verify .`` says whether a dirty
checkout is noise.

Tolerances come from each value's granularity: the smallest step one floating-point near-tie can
make it take (README, "Reproducibility"). A near-tie is two scores (or map values) close enough for
another machine's float32 kernels and summation order to swap them; :data:`NEAR_TIES` of them per
value are allowed:

* AUROC of ``n_in`` × ``n_out`` test images: one swapped pair moves it by ``1/(n_in·n_out)``
  (1/90000 ≈ 1.1e-5 at 300 × 300); the same for every window of ``timesteps.csv``;
* AUPR: one swapped pair at rank k moves it by at most ``1/(n_in·(k+1))``: ``1/(2·n_in)`` at the top,
  ``≈ 1/(n_in·n_out)`` where the two sets overlap; allowed: one at the top and the rest in the overlap;
* FPR@95: one OOD image crossing the threshold moves it by ``1/n_out``; allowed: two images (the
  threshold's own in-distribution neighbour swapping, and one OOD image at it);
* localisation (class means over C classes, a anomalous and n normal images each): image AUROC
  ``1/(C·a·n)`` per pair; pixel AUROC and PRO are fractions of pixel pairs / region pixels in order,
  which noise flips in about the same proportion, so they get the image-level tolerance; bootstrap
  bounds move with their statistic; a paired difference of two maps gets twice the tolerance;
* base-model losses (float64 sums of float32 errors ε̂ − ε with |ε̂| ≈ 1): ``|Δloss| ≤ 2·√loss·|Δε̂|``,
  with ``|Δε̂|`` of NEAR_TIES float32 ulps (2⁻²³); ᾱ (float64 schedule) NEAR_TIES float64 ulps;
* tables (AUROC × 100 printed with one decimal): one printed step, 0.1.

Counts, names and settings must be equal.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

__all__ = ["NEAR_TIES", "Finding", "Sizes", "compare_frames", "compare_trees", "compare_tables", "verify_files",
           "RESULT_FILES", "main"]

NEAR_TIES = 20  # twice the most seen between two machines (10 pairs in timesteps.csv)
F32_ULP, F64_ULP = 2.0 ** -23, 2.0 ** -52


@dataclass(frozen=True)
class Finding:
    """The largest difference of one file, relative to its tolerance (``ratio`` > 1: outside)."""

    file: str
    diff: float = 0.0
    tolerance: float = 0.0
    where: str = ""
    ratio: float = 0.0
    problem: str = ""

    @property
    def verdict(self) -> str:
        if self.problem:
            return "DIFFERENT"
        if self.diff == 0:
            return "identical"
        return "within tolerance" if self.ratio <= 1 else "OUTSIDE tolerance"


@dataclass(frozen=True)
class Sizes:
    """Test-set sizes (``{set: n}``) and the localisation benchmark's (``{dataset: (C, a, n)}``)."""

    test: Mapping[str, int]
    localization: Mapping[str, tuple[int, int, int]]

    def auroc(self, a: str, b: str) -> float:
        return NEAR_TIES / (self.test[a] * self.test[b])

    def aupr(self, a: str, b: str) -> float:
        n_in, n_out = self.test[a], self.test[b]
        return 1 / (2 * n_in) + (NEAR_TIES - 1) / (n_in * n_out)

    def fpr95(self, a: str, b: str) -> float:
        return 2 / self.test[b]

    def loc(self, dataset: str) -> float:
        c, a, n = self.localization[dataset]
        return NEAR_TIES / (c * a * n)


def _loss_tol(v: float) -> float:
    return 2 * math.sqrt(abs(v)) * NEAR_TIES * F32_ULP


def _worst(name: str, items: Iterator[tuple[str, float, float]]) -> Finding:
    """The largest ``diff/tolerance`` of ``(where, diff, tolerance)`` items (the largest diff if all are 0)."""
    best = Finding(name)
    for where, diff, tol in items:
        if math.isinf(diff):  # text, names or layout: not a number that can be within a tolerance
            return Finding(name, problem=f"{where} differs")
        ratio = diff / tol if tol > 0 else (0.0 if diff == 0 else math.inf)
        if (ratio, diff) > (best.ratio, best.diff):
            best = Finding(name, diff, tol, where, ratio)
    return best


def compare_frames(name: str, old: pd.DataFrame, new: pd.DataFrame, key: list[str],
                   tolerance: Callable[[str, pd.Series], float]) -> Finding:
    """Compare two tables row by row on ``key``: every other column numerically (``tolerance(column,
    row)``) or, when not numeric, exactly."""
    if list(old.columns) != list(new.columns):
        return Finding(name, problem=f"columns differ: {list(old.columns)} vs {list(new.columns)}")
    a, b = old.set_index(key), new.set_index(key)
    if set(a.index) != set(b.index) or len(a) != len(b):
        return Finding(name, problem=f"rows differ ({len(a)} committed, {len(b)} fresh)")
    b = b.loc[a.index]

    def items() -> Iterator[tuple[str, float, float]]:
        for col in a.columns:
            if not pd.api.types.is_numeric_dtype(a[col]):
                if not a[col].equals(b[col]):
                    yield f"column {col}", math.inf, 0.0
                continue
            diff = (a[col].astype(float) - b[col].astype(float)).abs().to_numpy()
            for i in np.flatnonzero(diff):
                yield f"{col} at {a.index[i]}", float(diff[i]), tolerance(col, a.iloc[i])
    return _worst(name, items())


def _leaves(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, (*path, str(k)))
    else:
        yield path, tree


def compare_trees(name: str, old: Any, new: Any, tolerance: Callable[[tuple], float]) -> Finding:
    """Compare two JSON trees leaf by leaf: numbers within ``tolerance(path)``, anything else exactly."""
    a, b = dict(_leaves(old)), dict(_leaves(new))
    if set(a) != set(b):
        return Finding(name, problem=f"keys differ: {sorted(map('/'.join, set(a) ^ set(b)))[:3]}")

    def items() -> Iterator[tuple[str, float, float]]:
        for path, va in a.items():
            vb = b[path]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
            if numbers and va != vb:
                yield "/".join(path), abs(float(va) - float(vb)), tolerance(path)
            elif not numbers and va != vb:
                yield "/".join(path), math.inf, 0.0
    return _worst(name, items())


_NUMBER = re.compile(r"-?\d+\.\d+")


def compare_tables(name: str, old: str, new: str, step: float = 0.1) -> Finding:
    """Compare two printed tables number by number (each within one printed ``step``), text exactly."""
    la, lb = old.splitlines(), new.splitlines()
    if len(la) != len(lb):
        return Finding(name, problem="a different number of lines")

    def items() -> Iterator[tuple[str, float, float]]:
        for i, (x, y) in enumerate(zip(la, lb)):
            if _NUMBER.sub("#", x) != _NUMBER.sub("#", y):
                yield f"the text of line {i + 1}", math.inf, 0.0
                continue
            for u, v in zip(_NUMBER.findall(x), _NUMBER.findall(y)):
                if u != v:
                    yield f"line {i + 1}", abs(float(u) - float(v)), step + 1e-9
    return _worst(name, items())


# --------------------------------------------------------------------------------------------
# the committed result files and the tolerance of each value


def _pair_tol(sizes: Sizes, metric: str, a: str, b: str) -> float:
    return {"auroc": sizes.auroc, "aupr": sizes.aupr, "fpr95": sizes.fpr95}[metric](a, b)


def _results(sizes: Sizes) -> Callable[[str, pd.Series], float]:
    return lambda col, row: _pair_tol(sizes, col, row.name[1], row.name[2])


def _metrics(sizes: Sizes, tree: Mapping[str, Any]) -> Callable[[tuple], float]:
    """metrics.json: {method: {in: {ood | "mean": {metric}}, "mean_auroc"}}; a mean gets the largest
    tolerance of the values it averages."""
    def tol(path: tuple) -> float:
        metric, pairs = path[-1], []
        if path[-1] == "mean_auroc":
            metric, pairs = "auroc", [(i, o) for i in tree[path[0]] if i != "mean_auroc" for o in tree[path[0]][i]
                                      if o != "mean"]
        elif path[2] == "mean":
            pairs = [(path[1], o) for o in tree[path[0]][path[1]] if o != "mean"]
        else:
            pairs = [(path[1], path[2])]
        return max(_pair_tol(sizes, metric, i, o) for i, o in pairs)
    return tol


def _loc_csv(sizes: Sizes) -> Callable[[str, pd.Series], float]:
    def tol(col: str, row: pd.Series) -> float:
        if col.startswith(("image_auroc", "pixel_auroc", "pro")):
            return sizes.loc(row.name[1])
        return 0.0  # counts
    return tol


def _loc_json(sizes: Sizes) -> Callable[[tuple], float]:
    def tol(path: tuple) -> float:
        if path[0] == "mean_over_classes":
            return sizes.loc(path[1].split("/")[0])
        if path[0] == "paired_differences":
            return 2 * sizes.loc(path[2])
        return 0.0
    return tol


def _base_csv(col: str, row: pd.Series) -> float:
    if col.startswith("loss"):
        return _loss_tol(row[col])
    return NEAR_TIES * F64_ULP * abs(row[col]) if col == "alpha_bar" else 0.0


def _base_json(tree: Mapping[str, Any]) -> Callable[[tuple], float]:
    def tol(path: tuple) -> float:
        key = path[-1]
        if key.startswith("mean_heldout_loss"):
            return _loss_tol(tree[key])
        if key == "loss_ratio_trained_over_untrained":
            t, u = tree["mean_heldout_loss_trained"], tree["mean_heldout_loss_untrained"]
            return tree[key] * (_loss_tol(t) / t + _loss_tol(u) / u)
        return 0.0
    return tol


#: every result file the embedded profile commits, and how its values are keyed
RESULT_FILES = ("reports/results.csv", "reports/metrics.json", "reports/timesteps.csv", "reports/localization.csv",
                "reports/localization_per_class.csv", "reports/localization.json", "reports/base_model/metrics.json",
                "reports/base_model/loss_per_timestep.csv", "reports/tables/*.md", "reports/tables/*.tex")


def _compare_file(rel: str, old: str, new: str, sizes: Sizes) -> Finding:
    from io import StringIO

    csv = {"reports/results.csv": (["method", "in_dist", "ood"], _results(sizes)),
           "reports/timesteps.csv": (["family", "in_dist", "ood", "lo", "hi"],
                                     lambda col, row: sizes.auroc(row.name[1], row.name[2])),
           "reports/localization.csv": (["method", "dataset"], _loc_csv(sizes)),
           "reports/localization_per_class.csv": (["method", "dataset", "class"], _loc_csv(sizes)),
           "reports/base_model/loss_per_timestep.csv": (["timestep"], _base_csv)}
    if rel in csv:
        key, tol = csv[rel]
        return compare_frames(rel, pd.read_csv(StringIO(old)), pd.read_csv(StringIO(new)), key, tol)
    if rel.endswith((".md", ".tex")):
        return compare_tables(rel, old, new)
    tree = json.loads(old)
    tol = {"reports/metrics.json": lambda: _metrics(sizes, tree), "reports/localization.json": lambda: _loc_json(sizes),
           "reports/base_model/metrics.json": lambda: _base_json(tree)}[rel]()
    return compare_trees(rel, tree, json.loads(new), tol)


def _sizes(root: Path, committed: Callable[[str], str | None]) -> Sizes:
    """Test-set sizes from the prepared data when present (after a repro), else params.yaml's n_test;
    the localisation benchmark's from its committed files."""
    params = yaml.safe_load(committed("params.yaml") or "{}") or {}
    test = {}
    for d in params.get("data", {}).get("datasets", []):
        f = root / "data" / "prepared" / d / "test.npz"
        test[d] = len(np.load(f)["x0"]) if f.is_file() else int(params["data"]["n_test"])
    loc = {}
    per_class, summary = committed("reports/localization_per_class.csv"), committed("reports/localization.json")
    if per_class and summary:
        from io import StringIO

        pc = pd.read_csv(StringIO(per_class))
        images = json.loads(summary)["images"]
        for ds, g in pc.groupby("dataset"):
            n_c = int(g["n"].iloc[0])
            a_c = round(n_c * images[ds]["anomalous"] / images[ds]["n"])
            loc[ds] = (g["class"].nunique(), a_c, n_c - a_c)
    return Sizes(test, loc)


def _git_show(repo: Path, rev: str) -> Callable[[str], str | None]:
    def show(rel: str) -> str | None:
        r = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=repo, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None
    return show


def verify_files(root: Path, committed: Callable[[str], str | None], files: list[str]) -> list[Finding]:
    """Compare each of ``files`` (relative to ``root``) with ``committed(file)``."""
    sizes = _sizes(root, committed)
    out = []
    for rel in files:
        old, path = committed(rel), root / rel
        if old is None or not path.is_file():
            out.append(Finding(rel, problem="missing " + ("in the commit" if old is None else "after the run")))
            continue
        new = path.read_text()
        out.append(Finding(rel) if new == old else _compare_file(rel, old, new, sizes))
    return out


def _expand(root: Path, show: Callable[[str], str | None], rev: str) -> list[str]:
    files = []
    for pattern in RESULT_FILES:
        if "*" not in pattern:
            files.append(pattern)
            continue
        r = subprocess.run(["git", "ls-tree", "--name-only", rev, pattern.rsplit("/", 1)[0] + "/"], cwd=root,
                           capture_output=True, text=True)
        files += sorted(f for f in r.stdout.split() if Path(f).match(pattern))
    return files


def report(findings: list[Finding]) -> str:
    """One line per file: the largest difference, its tolerance, where, the verdict."""
    lines = [f"{'file':42s} {'largest difference':>18s} {'tolerance':>10s}  verdict (where)"]
    for f in findings:
        where = f.problem or f.where
        lines.append(f"{f.file:42s} {f.diff:18.3g} {f.tolerance:10.3g}  {f.verdict}" + (f" ({where})" if where else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study.verify", description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", default=".", help="the study's checkout (default: here)")
    ap.add_argument("--rev", default="HEAD", help="the committed results to compare with (default HEAD)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    show = _git_show(root, args.rev)
    findings = verify_files(root, show, _expand(root, show, args.rev))
    print(report(findings))
    bad = [f for f in findings if f.problem or f.ratio > 1]
    print(f"\n{len(findings)} files: {sum(f.verdict == 'identical' for f in findings)} identical, "
          f"{sum(f.verdict == 'within tolerance' for f in findings)} within tolerance, {len(bad)} not.")
    return 1 if bad else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
