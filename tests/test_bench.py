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
