#!/usr/bin/env python
"""Held-out ε-MSE of a base model: the denoising loss on the Fashion-MNIST *test* split (all 10,000
images by default), at t ∈ {50, 250, 500}, noise seed 0 (:func:`diffpath.study.base_model.
denoising_loss_per_timestep`); one JSON line per model with the loss per timestep and their mean.

A model is a diffusers folder, or a training checkpoint (``.pt`` from
:func:`diffpath.study.train.train`), whose EMA weights are put into ``--like``'s architecture.

    OMP_NUM_THREADS=1 python benchmarks/heldout_eps_mse.py models/fashion_mnist_ddpm \\
        models/fashion_mnist_ddpm_cpu_continued
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffpath.data import prepare  # noqa: E402
from diffpath.models import load_model  # noqa: E402
from diffpath.study.base_model import denoising_loss_per_timestep  # noqa: E402
from diffpath.study.train import load_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="diffusers folders or training checkpoints (.pt)")
    ap.add_argument("--like", default="models/fashion_mnist_ddpm", help="the architecture of a checkpoint's weights")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[50, 250, 500])
    ap.add_argument("--n", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x0 = prepare("fashion_mnist", "test", n=args.n, size=32, channels=1, seed=0)["x0"]
    for spec in args.models:
        if spec.endswith(".pt"):
            model = load_model(args.like, device="cpu")
            model.net.unet.load_state_dict(load_checkpoint(spec)["ema"])
        else:
            model = load_model(spec, device="cpu")
        loss = denoising_loss_per_timestep(model, x0, args.timesteps, seed=0)
        print(json.dumps({"model": spec, "n_images": len(x0), "timesteps": args.timesteps,
                          "loss": [float(v) for v in loss], "mean": float(loss.mean())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
