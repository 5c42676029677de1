"""The sharded errors stage: two gloo processes under torchrun (one node with two processes, or
two torchrun "nodes" on this host with ``--nnodes 2 --node_rank R``) give the single-process cache."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpath.cache import CacheConfig, compute_cache
from diffpath.models.options import run_options_from_params
from diffpath.study.distributed import run_sharded
from diffpath.models import RunOptions, load_model

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH, CHUNK, N = 3, 2, 2, 8  # 4 chunks: ranks 0 and 1 get two each


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int) -> np.ndarray:
    g = np.random.default_rng(0)
    return np.tanh(g.normal(size=(n, 3, 32, 32))).astype(np.float32)


def _single_process_cache(model_pt: Path, x0: np.ndarray) -> dict[str, np.ndarray]:
    model = load_model(model_pt, device="cpu")
    cfg = CacheConfig(steps=STEPS, batch_size=BATCH, chunk_size=CHUNK)
    cache = compute_cache(model, x0, cfg, out=None, progress=False)
    assert cache is not None
    return cache


def test_torchrun_two_gloo_ranks_equal_single_process(tmp_path, fixture_dir):
    model_pt = fixture_dir / "diffpath_tiny.pt"
    x0 = _images(N)
    x0_file = tmp_path / "x0.npy"
    np.save(x0_file, x0)
    out = tmp_path / "cache.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "diffpath.study.distributed", "--model", str(model_pt), "--x0", str(x0_file),
        "--out", str(out), "--steps", str(STEPS), "--batch-size", str(BATCH),
        "--chunk-size", str(CHUNK), "--backend", "gloo", "--device", "cpu", "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "cache.npz.parts").exists(), "the parts directory must be removed"
    _assert_merged_equals_single(out, model_pt, x0, tmp_path)


def test_torchrun_two_nodes_share_a_work_dir(tmp_path, fixture_dir):
    """``--nnodes 2 --node_rank 0|1``: two torchrun launchers (here on one host) meet at the
    master's address; every rank writes its chunks to the shared ``--work-dir`` and rank 0 (node 0)
    merges them into ``--out``."""
    model_pt = fixture_dir / "diffpath_tiny.pt"
    x0 = _images(N)
    np.save(tmp_path / "x0.npy", x0)
    out, shared = tmp_path / "cache.npz", tmp_path / "shared" / "parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
         "-m", "diffpath.study.distributed", "--model", str(model_pt), "--x0", "x0.npy", "--out", str(out),
         "--work-dir", str(shared), "--steps", str(STEPS), "--batch-size", str(BATCH),
         "--chunk-size", str(CHUNK), "--backend", "gloo", "--device", "cpu", "--no-progress"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "wrote" in logs[0] and "2 process(es)" in logs[0], logs[0]
    assert not shared.exists(), "the shared parts must be removed after the merge"
    _assert_merged_equals_single(out, model_pt, x0, tmp_path)


def _assert_merged_equals_single(out: Path, model_pt: Path, x0: np.ndarray, tmp_path: Path) -> None:
    assert out.is_file()
    assert not list(tmp_path.rglob("chunk_*.npz")), "no chunk part may be left behind"
    with np.load(out) as z:
        merged = {k: z[k] for k in z.files}
    single = _single_process_cache(model_pt, x0)
    assert set(merged) == set(single)
    for key in single:
        if key == "meta":
            assert str(merged[key]) == str(single[key])
            continue
        # the same ops on the same CPU, one thread, the same batches: bit-identical
        np.testing.assert_array_equal(merged[key], single[key], err_msg=key)
    np.testing.assert_array_equal(merged["index"], np.arange(N))
    assert merged["dp_eps"].shape == (N, STEPS, 5) and merged["v2_werr"].shape == (N, STEPS, 5)


def test_run_sharded_without_torchrun_is_one_process(tmp_path, fixture_dir, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    x0 = _images(4)
    out = tmp_path / "c.npz"
    cache = run_sharded(fixture_dir / "diffpath_tiny.pt", x0, out, families=["diffpath"], steps=2,
                        batch_size=2, chunk_size=2, device="cpu", progress=False)
    assert cache is not None and out.is_file()
    assert cache["dp_eps"].shape == (4, 2, 5)
    assert not (tmp_path / "c.npz.parts").exists()
    assert not torch.distributed.is_initialized()


def test_run_options_from_params():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert run_options_from_params(None, cpu) == RunOptions()
    assert run_options_from_params({}, cuda) == RunOptions()
    auto = {k: "auto" for k in ("precision", "channels_last", "compile", "cuda_graphs")}
    fast_gpu = run_options_from_params(auto, cuda)
    assert fast_gpu.precision == "bf16" and fast_gpu.channels_last
    fast_cpu = run_options_from_params(auto, cpu)
    assert fast_cpu.precision == "fp32" and not fast_cpu.cuda_graphs
    g = run_options_from_params({"precision": "bf16", "cuda_graphs": "true"}, cuda)
    assert g.cuda_graphs and g.compile and g.precision == "bf16"
    with pytest.warns(UserWarning, match="cuda_graphs"):
        assert not run_options_from_params({"cuda_graphs": True}, cpu).cuda_graphs
    with pytest.raises(ValueError, match="unknown run option"):
        run_options_from_params({"precison": "bf16"}, cpu)
    with pytest.raises(ValueError):
        run_options_from_params({"precision": "fp8"}, cpu)
    with pytest.raises(ValueError, match="boolean"):
        run_options_from_params({"compile": "maybe"}, cpu)


def test_stage_mode_leaves_a_finished_cache_the_errors_stage_reuses(tmp_path, fixture_dir, monkeypatch):
    """`--stage DATASET SPLIT` computes with the stage's own model, settings, input and data key,
    into the stage's work area: the stage's compute_cache then copies it without a model pass."""
    import yaml

    from diffpath.data import checksum
    from diffpath.study.distributed import main
    from diffpath.study.layout import Layout
    from diffpath.study.stages import load_params

    params = load_params(ROOT / "params.yaml")
    params["model"].update(spec=str(fixture_dir / "diffpath_tiny.pt"), device="cpu")
    params["errors"].update(steps=STEPS, batch_size=BATCH, chunk_size=CHUNK, n_maps=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    layout = Layout.of(params, tmp_path)
    x0 = _images(N)
    layout.prepared("mnist", "test").parent.mkdir(parents=True)
    np.savez(layout.prepared("mnist", "test"), x0=x0)
    monkeypatch.chdir(tmp_path)
    assert main(["--stage", "mnist", "test", "--device", "cpu", "--backend", "gloo", "--no-progress"]) == 0
    out = Layout.of(params).errors("mnist", "test")
    first = dict(np.load(out))
    out.unlink()  # as DVC does before it reruns a stage

    # the errors stage's own call (notebooks/20_errors.ipynb), with a model that must not be run
    model = load_model(params["model"]["spec"], device="cpu",
                       options=run_options_from_params({k: params["model"][k] for k in
                                                        ("precision", "channels_last", "compile", "cuda_graphs")}, "cpu"))
    monkeypatch.setattr(model.net, "forward", lambda *a, **k: pytest.fail("the model ran again"))
    cfg = CacheConfig.from_params(**params["errors"])
    again = compute_cache(model, x0, cfg, out=Layout.of(params).errors("mnist", "test"),
                          work_dir=Layout.of(params).work("errors", "mnist", "test"), data_key=checksum(x0),
                          keep_finished=True, progress=False)
    assert set(again) == set(first)
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])


def test_evaluations_per_image_count_only_the_configured_families():
    """The errors stage's cost per image: one UNet evaluation per kept step of each family run
    (a formula that assumed both families overcounted a single-family pass twofold)."""
    from types import SimpleNamespace

    from diffpath.core.schedule import NoiseSchedule

    model = SimpleNamespace(schedule=NoiseSchedule.named("linear", 1000), num_timesteps=1000)
    assert CacheConfig(steps=10).evaluations_per_image(model) == 20
    assert CacheConfig(families=("diffpathv2",), steps=10).evaluations_per_image(model) == 10
    assert CacheConfig(families=("diffpath",), steps=7).evaluations_per_image(model) == 7
    assert CacheConfig(steps=10, v2_timesteps=[100, 300, 500]).evaluations_per_image(model) == 13
