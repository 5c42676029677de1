"""benchmarks/bench_errors.py runs on the CPU and prints one JSON line per measured path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_errors.py"
REQUIRED = {"path", "nfe_per_s", "img_per_s", "peak_mem_mb", "max_rel_feature_diff", "device",
            "batch_size", "model", "params_m", "families"}
PATHS = ["reference", "eager", "fast", "unet_only"]


def test_bench_tiny_cpu(tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, str(BENCH), "--model", "tiny", "--device", "cpu", "--batch-size", "2",
           "--n-images", "2", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--paths", ",".join(PATHS), "--out", str(out), "--table", "--table-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(PATHS), proc.stdout  # nothing but the JSON lines on stdout
    recs = [json.loads(ln) for ln in lines]
    assert [r["path"] for r in recs] == PATHS
    for r in recs:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"] == "cpu" and r["model"] == "tiny" and r["batch_size"] == 2
        assert r["families"] == ["diffpath", "diffpathv2"]
        assert r["nfe_per_s"] > 0 and r["img_per_s"] > 0 and r["params_m"] > 0
        assert abs(r["nfe_per_s"] - r["img_per_s"] * r["nfe_per_image"]) <= 1e-2 * r["nfe_per_s"]
    by_path = {r["path"]: r for r in recs}
    assert by_path["eager"]["max_rel_feature_diff"] == 0  # fp32 eager is deterministic on the CPU
    assert by_path["unet_only"]["max_rel_feature_diff"] is None  # no features
    assert by_path["reference"]["max_rel_feature_diff"] < 1e-3  # float32 numpy vs float64 moments
    assert by_path["fast"]["max_rel_feature_diff"] < 1e-2
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == recs
    table = (tmp_path / "cpu_tiny.md").read_text()
    assert "| reference |" in table and "| unet_only |" in table


def test_gpu_check_reads_targets_per_batch_size():
    """The prepared GPU check's verdict: fast ≥ 11,000 UNet evaluations/s and ≥ 0.85 of the bare
    network in the same run, per batch size."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import targets

    rows = [{"path": "fast", "batch_size": 256, "nfe_per_s": 11500.0, "max_rel_feature_diff": 1e-3},
            {"path": "unet_only", "batch_size": 256, "nfe_per_s": 13000.0},
            {"path": "fast", "batch_size": 512, "nfe_per_s": 11500.0, "max_rel_feature_diff": 1e-3},
            {"path": "unet_only", "batch_size": 512, "nfe_per_s": 14000.0},
            {"path": "reference", "batch_size": 256, "nfe_per_s": 2500.0}]
    got = targets(rows)
    assert got["batch_256"]["met"] and got["batch_256"]["share_of_unet_only"] == round(11500 / 13000, 3)
    assert not got["batch_512"]["met"]  # 0.82 of the bare network
    assert not targets([{"path": "fast", "batch_size": 8, "nfe_per_s": 10999.0}])["batch_8"]["met"]


def test_bench_profile_writes_top_operators(tmp_path):
    cmd = [sys.executable, str(BENCH), "--model", "tiny", "--device", "cpu", "--batch-size", "2",
           "--n-images", "2", "--steps", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
           "--paths", "fast", "--profile", str(tmp_path / "prof.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prof = json.loads((tmp_path / "prof.json").read_text())
    assert prof["device"] == "cpu" and prof["top"] and prof["total_us"] > 0
    assert any("conv" in r["name"] for r in prof["top"])
    shares = [r["share"] for r in prof["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-3


def test_heldout_eps_mse_reads_folders_and_training_checkpoints_alike(tmp_path, capsys):
    """The held-out ε-MSE of a checkpoint holding the committed model's weights as its EMA equals the
    folder's, number for number."""
    import json

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import heldout_eps_mse

    from diffpath.models import load_model

    root = Path(__file__).resolve().parents[1]
    folder = str(root / "models" / "fashion_mnist_ddpm")
    torch.save({"ema": load_model(folder, device="cpu").net.unet.state_dict()}, tmp_path / "ckpt.pt")
    assert heldout_eps_mse.main([folder, str(tmp_path / "ckpt.pt"), "--like", folder, "--n", "16"]) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert a["n_images"] == 16 and a["timesteps"] == [50, 250, 500] and len(a["loss"]) == 3
    assert a["loss"] == b["loss"] and 0 < a["mean"] < 1
