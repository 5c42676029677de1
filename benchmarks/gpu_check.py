#!/usr/bin/env python
"""One prepared GPU run: the errors pass and the scorer grid at the paper profile's sizes.

Every figure goes to ``OUT`` as JSON lines, within a wall-clock budget (each step is skipped, with
a line saying so, when too little of it is left):

1. ``cuda_celeba32.jsonl`` / ``.md``: ``bench_errors.py`` on DiffPath's CelebA-32 UNet (random
   weights), batch 256, the ``reference``, ``eager``, ``fast`` (bf16 + channels_last +
   torch.compile) and ``unet_only`` paths; compile time is each path's ``warmup_s``, apart from
   the steady-state ``nfe_per_s``; ``max_rel_feature_diff`` is each path's largest relative
   feature difference against fp32 eager on the same images. Then batch 512 (``fast``,
   ``unet_only``) if time remains.
2. ``profile_celeba32.json``: torch.profiler's top kernels of one steady-state ``fast`` batch.
3. ``cuda_scorers.jsonl``: ``bench_scorers.py`` with ``torch_cuda`` on 163,000 × 6 features,
   DiffPath's grid ({50, 100} components × 4 covariance types, 10-fold); the summary
   extrapolates it to the paper profile's 25 grids.
4. ``cuda_imagenet64.jsonl``: the ImageNet-64 UNet's ``fast`` and ``unet_only`` throughput, if
   time remains.
5. ``summary.json``: the device, each step's seconds, the targets (fast ≥ 11,000 UNet
   evaluations/s and ≥ 0.85 of unet_only) and whether they were met.

    python3 benchmarks/gpu_check.py --out "$OUT" --budget 480      # on the GPU machine
    python benchmarks/gpu_check.py --out /tmp/gpu --tiny             # the same steps, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_NFE_PER_S = 11_000
TARGET_SHARE_OF_UNET = 0.85
PAPER_GRIDS = 25  # 5 in-distribution sets × 5 GMM methods (params-paper.yaml)


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(HERE.parent))
    env.pop("TORCH_LOGS", None)  # no compiler chatter
    env.update(TORCHINDUCTOR_MAX_AUTOTUNE_REPORT_CHOICES_STATS="0")
    return env


class Run:
    """Steps under one wall-clock budget; a log of what ran and what was skipped."""

    def __init__(self, out: Path, budget: float):
        self.out, self.t0, self.budget = out, time.monotonic(), budget
        self.steps: list[dict] = []
        self.log = open(out / "log.txt", "a")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def step(self, name: str, cmd: list[str], need: float, stdout: Path | None = None) -> bool:
        if self.left() < need:
            self.steps.append({"step": name, "skipped": f"{self.left():.0f} s left, {need:.0f} s needed"})
            return False
        t0 = time.monotonic()
        self.log.write(f"$ {' '.join(cmd)}\n")
        self.log.flush()
        sink = open(stdout, "w") if stdout is not None else self.log
        try:
            rc = subprocess.run(cmd, stdout=sink, stderr=self.log, env=_env(),
                                timeout=max(10.0, self.left())).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if stdout is not None:
                sink.close()
        self.steps.append({"step": name, "rc": rc, "seconds": round(time.monotonic() - t0, 1)})
        return rc == 0


def _lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _device() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def targets(rows: list[dict]) -> dict:
    """Whether the fast path met its targets, per batch size, from bench_errors' lines."""
    out = {}
    for b in sorted({r["batch_size"] for r in rows}):
        by = {r["path"]: r for r in rows if r["batch_size"] == b}
        if "fast" not in by:
            continue
        fast = by["fast"]["nfe_per_s"]
        unet = by.get("unet_only", {}).get("nfe_per_s")
        out[f"batch_{b}"] = {
            "fast_nfe_per_s": fast, "unet_only_nfe_per_s": unet,
            "share_of_unet_only": round(fast / unet, 3) if unet else None,
            "fast_max_rel_feature_diff": by["fast"].get("max_rel_feature_diff"),
            "met": bool(fast >= TARGET_NFE_PER_S and unet and fast / unet >= TARGET_SHARE_OF_UNET),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for every step together")
    ap.add_argument("--tiny", action="store_true", help="the same steps with tiny sizes on the CPU")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget)
    py = sys.executable
    errors, scorers = str(HERE / "bench_errors.py"), str(HERE / "bench_scorers.py")
    if args.tiny:
        dev, model, big = ["--device", "cpu", "--threads", "1"], "tiny", "tiny"
        b, n, b2, n2, rep = "8", "16", "16", "16", "1"
        score = ["--n-train", "2000", "--n-test", "500", "--cv", "3", "--paths", "torch_cpu"]
    else:
        dev, model, big = ["--device", "cuda"], "celeba32", "imagenet64"
        b, n, b2, n2, rep = "256", "2048", "512", "4096", "2"
        score = ["--n-train", "163000", "--n-test", "5000", "--cv", "10", "--paths", "torch_cuda"]
    fast = ["--precision", "bf16", "--channels-last", "--compile"]
    jl = out / f"cuda_{model}.jsonl"
    run.step("errors_b256", [py, errors, "--model", model, *dev, "--batch-size", b, "--n-images", n,
                             "--repeats", rep, "--paths", "reference,eager,fast,unet_only", *fast,
                             "--out", str(jl), "--table", "--table-dir", str(out),
                             "--profile", str(out / f"profile_{model}.json")], need=240)
    rows = _lines(jl)
    tmp = out / "b512.jsonl"
    if run.step("errors_b512", [py, errors, "--model", model, *dev, "--batch-size", b2, "--n-images", n2,
                                "--repeats", rep, "--paths", "fast,unet_only", *fast, "--out", str(tmp)],
                need=150):
        rows += _lines(tmp)
        jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.unlink(missing_ok=True)
    sj = out / "cuda_scorers.jsonl"
    run.step("scorers", [py, scorers, *score], need=90, stdout=sj)
    scorer_rows = [r for r in _lines(sj) if isinstance(r, dict)]
    if not args.tiny:
        run.step("errors_imagenet64", [py, errors, "--model", big, *dev, "--batch-size", b,
                                       "--n-images", "1024", "--repeats", rep, "--paths", "fast,unet_only",
                                       *fast, "--out", str(out / f"cuda_{big}.jsonl")], need=120)
    fit_s = [r["seconds"] for r in scorer_rows if "seconds" in r]
    summary = {
        "device": _device(), "tiny": args.tiny, "budget_s": args.budget, "steps": run.steps,
        "targets": {"nfe_per_s": TARGET_NFE_PER_S, "share_of_unet_only": TARGET_SHARE_OF_UNET,
                    "by_batch": targets(rows)},
        "scorer_grid_s": fit_s[0] if fit_s else None,
        "paper_scorer_grids_s": round(fit_s[0] * PAPER_GRIDS, 1) if fit_s else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("steps", "targets", "paper_scorer_grids_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
