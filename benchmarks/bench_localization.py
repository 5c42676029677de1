"""Choose the localisation settings on a tuning split, never on the table's images.

The table (stage ``localization``, ``notebooks/30_localization.ipynb``) is measured on
``synthetic_anomalies(base, n_per_class=60, seed=0, part=0)`` (positions 0–59 of every class's
permutation) with noise seed 0. This driver scores candidate maps on Fashion-MNIST positions
60–79 of the same permutations (``n_per_class=20, part=3``: disjoint images, other patches) with
noise seed 1, and writes every candidate's class-mean metrics and cost to
``reports/benchmarks/localization_search.csv`` (and ``.md``).

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_localization.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffpath.data import to_model_input  # noqa: E402
from diffpath.data.anomalies import synthetic_anomalies  # noqa: E402
from diffpath.methods.localization import MapSpec, localize  # noqa: E402
from diffpath.models import load_model  # noqa: E402
from diffpath.scoring.bootstrap import paired_bootstrap  # noqa: E402

S = "stochastic"
CANDIDATES: dict[str, MapSpec] = {
    "gradient": MapSpec("model_free", maps=("gradient",)),
    "median": MapSpec("model_free", maps=("median",)),
    "det_t0.4_s5": MapSpec("deterministic", t0=(0.4,), steps=5),
    "det_t0.4_s5_mismatch0.8": MapSpec("deterministic", t0=(0.4,), steps=5, denoise_t0=0.8),
    # the AnoDDPM-style baseline at 10 UNet evaluations, t0 tuned like everything else
    "base_t0.1_s5_d2": MapSpec(S, t0=(0.1,), steps=5, draws=2),
    "base_t0.2_s5_d2": MapSpec(S, t0=(0.2,), steps=5, draws=2),
    "base_t0.3_s5_d2": MapSpec(S, t0=(0.3,), steps=5, draws=2),
    # candidates at <= 10 evaluations
    "rec_t0.2_s5_d2": MapSpec(S, t0=(0.2,), steps=5, draws=2, reduce="reconstruction"),
    "multi_t0.1+0.3_s5_d1": MapSpec(S, t0=(0.1, 0.3), steps=5, draws=1),
    "rec_t0.2_s2_d5": MapSpec(S, t0=(0.2,), steps=2, draws=5, reduce="reconstruction"),
    "rec_t0.2_s1_d10": MapSpec(S, t0=(0.2,), steps=1, draws=10, reduce="reconstruction"),
    "rec_t0.3_s1_d10": MapSpec(S, t0=(0.3,), steps=1, draws=10, reduce="reconstruction"),
    "multi_rec_t0.1+0.2+0.3_s1_d3": MapSpec(S, t0=(0.1, 0.2, 0.3), steps=1, draws=3, reduce="reconstruction"),
    "inv_eta1_t0.2_s5_d1": MapSpec(S, t0=(0.2,), steps=5, draws=1, start="invert"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/localization_search.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model(str(ROOT / "models/fashion_mnist_ddpm"), device="cpu")
    b = synthetic_anomalies("fashion_mnist", n_per_class=20, seed=0, part=3)
    x0 = to_model_input(b.images, size=model.image_size, channels=model.channels)
    names = args.only or list(CANDIDATES)
    results, cost, secs = {}, {}, {}
    for name in names:
        t = time.perf_counter()
        r = localize(model, x0, CANDIDATES[name], seed=1, out_size=b.images.shape[1:3])
        m = next(iter(r.maps))
        results[name] = (r.maps[m], r.scores[m])
        cost[name], secs[name] = r.nfe, time.perf_counter() - t
        print(f"{name}: {r.nfe:g} evals/image, {secs[name]:.0f} s", flush=True)
    table, _ = paired_bootstrap(results, b.masks, b.labels, b.classes, n_boot=200, seed=1)
    rows = [{"candidate": n, "unet_evals": cost[n], "seconds": round(secs[n], 1),
             **{k: round(v, 4) for k, v in table[n].items()}, "spec": CANDIDATES[n].to_dict()} for n in names]
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.only:
        old = pd.read_csv(out)
        df = pd.concat([old[~old.candidate.isin(names)], df], ignore_index=True)
    df.to_csv(out, index=False)
    out.with_suffix(".md").write_text(
        "Tuning split: fashion_mnist, seed 0, n_per_class 20, part 3 (200 images, 100 anomalous), "
        "noise seed 1; class-mean metrics, 95% bootstrap (200).\n\n"
        + df.drop(columns="spec").to_markdown(index=False) + "\n")
    print(df.drop(columns="spec").to_string(index=False))


if __name__ == "__main__":
    main()
