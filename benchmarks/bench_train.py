#!/usr/bin/env python
"""Steps per second of the base model's training step, per execution option, side by side.

One process builds the embedded base model's UNet (``TrainConfig().unet`` or the architecture in a
``train_config.json``) and times :func:`diffpath.study.train.train_step` on batches of random
images in [-1, 1] (speed does not depend on the pixel values) for each option set, in turn, for
``--rounds`` rounds, so that a noisy machine affects every option alike. Each option set gets its
own freshly seeded network and optimiser; the first ``--warmup`` steps of each round are untimed
(``torch.compile`` compiles there, and its compile time is reported separately).

Options are written ``threads:precision[:cl][:compile]``, e.g. ``2:fp32``, ``2:bf16:cl``,
``1:fp32:cl:compile``. One JSON line per (option set, round) goes to stdout; the summary gives
each option set's median seconds per step and its speed-up over the first.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --options 2:fp32,2:fp32:cl,2:bf16,2:bf16:cl,\\
        1:fp32:cl,2:fp32:cl:compile --steps 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffpath.study.train import TrainConfig, build_unet, train_schedule, train_step  # noqa: E402


def parse_option(text: str) -> dict:
    parts = text.split(":")
    opt = {"threads": int(parts[0]), "precision": parts[1] if len(parts) > 1 else "fp32",
           "channels_last": "cl" in parts[2:], "compile": "compile" in parts[2:], "name": text}
    if opt["precision"] not in ("fp32", "bf16"):
        raise SystemExit(f"unknown precision in {text!r}")
    return opt


def time_option(cfg: TrainConfig, opt: dict, steps: int, warmup: int, batch: int) -> dict:
    torch.set_num_threads(opt["threads"])
    model = build_unet(cfg, seed=0)
    if opt["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if opt["compile"] else None
    schedule = train_schedule(cfg)
    gen = torch.Generator().manual_seed(0)
    c, s = cfg.unet.in_channels, cfg.unet.sample_size

    def one() -> None:
        x0 = torch.rand((batch, c, s, s), generator=gen) * 2 - 1
        t = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        train_step(model, optim, schedule.q_sample(x0, t, eps), t, eps, lr=1e-4, grad_clip=1.0,
                   precision=opt["precision"], channels_last=opt["channels_last"], forward=forward)

    t0 = time.perf_counter()
    for _ in range(warmup):
        one()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    return {"option": opt["name"], "batch": batch, "warmup_s": round(warm, 3),
            "sec_per_step": statistics.median(times), "steps_per_s": 1.0 / statistics.median(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--options", default="2:fp32,2:fp32:cl,2:bf16,2:bf16:cl,1:fp32:cl")
    ap.add_argument("--config", default=None, help="a train_config.json (default: TrainConfig())")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per option and round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cfg = TrainConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else TrainConfig()
    opts = [parse_option(o) for o in args.options.split(",")]
    rows: dict[str, list[float]] = {o["name"]: [] for o in opts}
    for r in range(args.rounds):
        for o in opts:
            res = time_option(cfg, o, args.steps, args.warmup, args.batch_size)
            res["round"] = r
            print(json.dumps(res), flush=True)
            rows[o["name"]].append(res["sec_per_step"])
    base = statistics.median(rows[opts[0]["name"]])
    print(f"{'option':24s} {'s/step':>8s} {'steps/s':>8s} {'speed-up':>8s}", file=sys.stderr)
    for name, v in rows.items():
        m = statistics.median(v)
        print(f"{name:24s} {m:8.3f} {1 / m:8.2f} {base / m:8.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
