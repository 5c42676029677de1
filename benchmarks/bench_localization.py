"""Choose the localisation settings on a tuning split, never on the table's images.

The table (stage ``localization``, ``notebooks/30_localization.ipynb``) is measured on
``synthetic_anomalies(base, n_per_class=60, seed=0, part=0)`` (positions 0–59 of every class's
permutation) with noise seed 0. This driver scores candidate maps on Fashion-MNIST positions
60–79 of the same permutations (``n_per_class=20, part=3``: disjoint images, other patches) with
noise seed 1, at every smoothing σ of ``--sigmas``, and writes each candidate's class-mean metrics
and cost to ``reports/benchmarks/localization_search.csv`` (and ``.md``).

Every candidate gives *unsmoothed* maps at the model's resolution (``smooth_sigma=0``); the σ sweep
smooths them afterwards. Smoothing is linear and so are the means over draws and t0, so this equals
running :func:`~diffpath.methods.localization.localize` with that σ (up to float rounding).

Besides the table's :class:`~diffpath.methods.localization.MapSpec` rows, the search measures ideas
that did not enter the library, each written here in a few lines:

``cond_*``
    conditioned denoising (DDAD-style): from x_{t0} = √ᾱ·x0 + √(1−ᾱ)·z, DDIM (η = 0) denoising with
    ε̂ = ε_θ(x_t) − w·√(1−ᾱ_t)·(y_t − x_t), y_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε_θ(x_t); this moves every x̂0
    towards the input by the fraction w·(1−ᾱ_t).
``mix_*``
    a deterministic and a stochastic map, each divided by its set-level mean, summed.
``feat_*``
    the UNet feature distance (decoder blocks at t = 50) between x0 and the mean reconstruction,
    alone or mixed with the pixel map.
``zscore_*`` / ``min_*`` / ``median_*``
    other reductions over the draws: |x0 − mean|/(std + c); the minimum or median of the per-draw
    maps.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_localization.py [--only NAME ...] [--sigmas 0.5 2.5]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffpath.core.sampling import ddim_walk, round_trip_steps  # noqa: E402
from diffpath.core.schedule import schedule_of  # noqa: E402
from diffpath.data import to_model_input  # noqa: E402
from diffpath.data.anomalies import synthetic_anomalies  # noqa: E402
from diffpath.methods import maps as M  # noqa: E402
from diffpath.methods.localization import (  # noqa: E402
    MapSpec,
    batch_generator,
    localize,
    stochastic_reconstruct,
    timestep_of,
)
from diffpath.models import load_model  # noqa: E402
from diffpath.models.hooks import UNetFeatures  # noqa: E402
from diffpath.scoring.bootstrap import paired_bootstrap  # noqa: E402

S = "stochastic"
SPECS: dict[str, MapSpec] = {
    "gradient": MapSpec("model_free", maps=("gradient",)),
    "median": MapSpec("model_free", maps=("median",)),
    "det_t0.3_s5": MapSpec("deterministic", t0=(0.3,), steps=5),
    "det_t0.4_s5": MapSpec("deterministic", t0=(0.4,), steps=5),
    "det_t0.5_s5": MapSpec("deterministic", t0=(0.5,), steps=5),
    "det_t0.6_s5": MapSpec("deterministic", t0=(0.6,), steps=5),
    "det_t0.4_s5_mismatch0.8": MapSpec("deterministic", t0=(0.4,), steps=5, denoise_t0=0.8),
    # the AnoDDPM-style baseline at 10 UNet evaluations: t0, steps and draws tuned like the rest
    "sto_t0.1_s5_d2": MapSpec(S, t0=(0.1,), steps=5, draws=2),
    "sto_t0.2_s5_d2": MapSpec(S, t0=(0.2,), steps=5, draws=2),
    "sto_t0.3_s5_d2": MapSpec(S, t0=(0.3,), steps=5, draws=2),
    "sto_t0.3_s2_d5": MapSpec(S, t0=(0.3,), steps=2, draws=5),
    "sto_t0.2_s2_d5": MapSpec(S, t0=(0.2,), steps=2, draws=5),
    "sto_t0.4_s2_d5": MapSpec(S, t0=(0.4,), steps=2, draws=5),
    "sto_t0.3_s1_d10": MapSpec(S, t0=(0.3,), steps=1, draws=10),
    # other candidates at <= 10 evaluations
    "rec_t0.2_s5_d2": MapSpec(S, t0=(0.2,), steps=5, draws=2, reduce="reconstruction"),
    "rec_t0.3_s1_d10": MapSpec(S, t0=(0.3,), steps=1, draws=10, reduce="reconstruction"),
    "multi_t0.1+0.3_s5_d1": MapSpec(S, t0=(0.1, 0.3), steps=5, draws=1),
    "multi_t0.1..0.5_s1_d2": MapSpec(S, t0=(0.1, 0.2, 0.3, 0.4, 0.5), steps=1, draws=2),
    "inv_eta1_t0.2_s5_d1": MapSpec(S, t0=(0.2,), steps=5, draws=1, start="invert"),
}


class Conditioned:
    """An ε-model whose prediction is pulled towards the input image y (DDAD-style conditioning)."""

    def __init__(self, model, y: torch.Tensor, w: float):
        self.model, self.y, self.w = model, y, float(w)
        self.schedule = schedule_of(model)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.model(x, t)
        y_t = self.schedule.q_sample(self.y, t, eps)
        (s,) = self.schedule.coefficients(("sqrt_1m_ab",), t, x)
        return eps - self.w * s * (y_t - x)


class Bench:
    """The tuning split, the model, and per-draw reconstructions computed once per setting."""

    def __init__(self, model, x0: torch.Tensor, seed: int, batch: int = 100):
        self.model, self.x0, self.seed, self.batch = model, x0, seed, batch
        self.schedule = schedule_of(model)
        self.T = self.schedule.num_timesteps
        self._cache: dict[tuple, torch.Tensor] = {}
        self._feats = UNetFeatures(model, None)

    def batches(self, fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> torch.Tensor:
        out = []
        for lo in range(0, len(self.x0), self.batch):
            gen = batch_generator(self.seed, lo, "cpu")  # as localize seeds its batches
            with torch.no_grad():
                out.append(fn(self.x0[lo : lo + self.batch], gen))
        return torch.cat(out, dim=1)

    def draws(self, t0: float, steps: int, draws: int) -> torch.Tensor:
        """(draws, N, C, H, W) AnoDDPM-style reconstructions (η = 1)."""
        key = ("sto", t0, steps, draws)
        if key not in self._cache:
            t = timestep_of(t0, self.T, steps)
            self._cache[key] = self.batches(lambda xb, g: stochastic_reconstruct(
                self.model, xb, t, steps, draws=draws, generator=g))
        return self._cache[key]

    def conditioned(self, t0: float, steps: int, draws: int, w: float) -> torch.Tensor:
        t = timestep_of(t0, self.T, steps)
        den = round_trip_steps(t, steps)[1]

        def one(xb, g):
            cm = Conditioned(self.model, xb, w)
            return torch.stack([ddim_walk(cm, self.schedule.q_sample(xb, t, torch.randn(xb.shape, generator=g)),
                                          den, schedule=self.schedule) for _ in range(draws)])
        return self.batches(one)

    def pixel(self, recs: torch.Tensor) -> torch.Tensor:
        """(draws, N, 1, H, W) unsmoothed |x0 − x̂| per draw."""
        return torch.stack([M.pixel_distance_map(self.x0, r) for r in recs])

    def feature(self, rec: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, len(self.x0), self.batch):
            with torch.no_grad():
                out.append(M.feature_distance_map(self._feats, self.x0[lo : lo + self.batch],
                                                  rec[lo : lo + self.batch], t=50))
        return torch.cat(out)


def mix(*maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its set-level mean, summed (:func:`~diffpath.methods.maps.combine_maps`)."""
    return M.combine_maps({str(i): m for i, m in enumerate(maps)})


#: name → (UNet evaluations per image, maps at σ); σ is applied inside, since the reductions and the
#: set-level scales of the mixtures do not commute with smoothing.
def extra_candidates(b: Bench) -> dict[str, tuple[int, Callable[[float], torch.Tensor]]]:
    sm = M.gaussian_smooth

    @functools.cache
    def det(steps: int):
        return localize(b.model, b.x0, MapSpec("deterministic", t0=(0.4,), steps=steps), smooth_sigma=0).maps["pixel"]

    @functools.cache
    def cond(t0: float, w: float) -> torch.Tensor:
        return b.pixel(b.conditioned(t0, 5, 2, w)).mean(0)

    @functools.cache
    def feat() -> torch.Tensor:
        return b.feature(b.draws(0.3, 2, 4).mean(0))

    def per_draw(t0, steps, draws, s):
        return torch.stack([sm(m, s) for m in b.pixel(b.draws(t0, steps, draws))])

    def zscore(t0, steps, draws, c, s):
        r = b.draws(t0, steps, draws)
        return sm(((b.x0 - r.mean(0)).abs() / (r.std(0) + c)).mean(1, keepdim=True), s)

    def as_map(a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a))[:, None]

    out: dict[str, tuple[int, Callable[[float], torch.Tensor]]] = {}
    for t0, w in ((0.3, 1.0), (0.5, 1.0), (0.5, 3.0), (0.7, 3.0)):
        out[f"cond_t{t0}_w{w:g}_s5_d2"] = (10, lambda s, t0=t0, w=w: sm(cond(t0, w), s))
    out["mix_det_s3+sto_t0.3_s2_d2"] = (10, lambda s: mix(sm(as_map(det(3)), s), per_draw(0.3, 2, 2, s).mean(0)))
    out["mix_det_s2+sto_t0.3_s2_d3"] = (10, lambda s: mix(sm(as_map(det(2)), s), per_draw(0.3, 2, 3, s).mean(0)))
    out["feat_mean(sto_t0.3_s2_d4)"] = (10, lambda s: sm(feat(), s))
    out["mix_feat+pixel_sto_t0.3_s2_d4"] = (10, lambda s: mix(sm(feat(), s), per_draw(0.3, 2, 4, s).mean(0)))
    for c in (0.1, 0.3):
        out[f"zscore_c{c}_sto_t0.3_s2_d5"] = (10, lambda s, c=c: zscore(0.3, 2, 5, c, s))
    out["min_sto_t0.3_s2_d5"] = (10, lambda s: per_draw(0.3, 2, 5, s).min(0).values)
    out["median_sto_t0.3_s2_d5"] = (10, lambda s: per_draw(0.3, 2, 5, s).median(0).values)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/localization_search.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(str(ROOT / "models/fashion_mnist_ddpm"), device="cpu")
    bench = synthetic_anomalies("fashion_mnist", n_per_class=20, seed=0, part=3)
    x0 = torch.as_tensor(to_model_input(bench.images, size=model.image_size, channels=model.channels)).float()
    b = Bench(model, x0, seed=1)
    extra = extra_candidates(b)
    names = args.only or [*SPECS, *extra]
    unknown = [n for n in names if n not in SPECS and n not in extra]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {[*SPECS, *extra]}")
    size = bench.images.shape[1:3]
    results, cost, secs = {}, {}, {}
    for name in names:
        t = time.perf_counter()
        if name in SPECS:
            r = localize(model, x0, SPECS[name], seed=1, smooth_sigma=0.0)
            raw = torch.as_tensor(r.maps[SPECS[name].maps[0]])[:, None]
            at_sigma = (lambda s, raw=raw: M.gaussian_smooth(raw, s))
            cost[name] = r.nfe
        else:
            cost[name], at_sigma = extra[name]
        for s in args.sigmas:
            m = M.to_image_grid(at_sigma(s), size)
            results[name, s] = (m, M.image_scores(m))
        secs[name] = time.perf_counter() - t
        print(f"{name}: {cost[name]:g} evals/image, {secs[name]:.0f} s", flush=True)
    keyed = {f"{n}@{s}": v for (n, s), v in results.items()}
    table, _ = paired_bootstrap(keyed, bench.masks, bench.labels, bench.classes, n_boot=args.n_boot, seed=1)
    rows = [{"candidate": n, "sigma": s, "unet_evals": cost[n], "seconds": round(secs[n], 1),
             **{k: round(v, 4) for k, v in table[f"{n}@{s}"].items()},
             "spec": SPECS[n].to_dict() if n in SPECS else "see benchmarks/bench_localization.py"}
            for (n, s) in results]
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.only:
        old = pd.read_csv(out)
        if "sigma" in old:
            df = pd.concat([old[~old.candidate.isin(names)], df], ignore_index=True)
    df.to_csv(out, index=False)
    out.with_suffix(".md").write_text(
        "Tuning split (not the table's images): fashion_mnist, seed 0, n_per_class 20, part 3 "
        "(200 images, 100 anomalous), noise seed 1; class-mean metrics with 95% bootstrap intervals "
        f"({args.n_boot} resamples); σ: Gaussian smoothing of the map in pixels at 32 px.\n"
        "Driver: `OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_localization.py` "
        "(candidates in its docstring).\n\n"
        + df.drop(columns="spec").to_markdown(index=False) + "\n")
    print(df.drop(columns=["spec", "seconds"]).to_string(index=False))


if __name__ == "__main__":
    main()
