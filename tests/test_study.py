"""The pipeline: every notebook runs through papermill with tiny parameters on CPU; dvc.yaml and
the stage runner agree; booleans and lists reach the notebooks intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffpath.study.stages import STAGES, load_params, run_stage, stage_parameters

ROOT = Path(__file__).resolve().parents[1]


def _injected(nb_path: Path) -> dict:
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if "injected-parameters" in c.get("metadata", {}).get("tags", []))
    ns: dict = {}
    exec("".join(cell["source"]), ns)
    return {k: v for k, v in ns.items() if not k.startswith("__")}


def test_dvc_yaml_declares_what_each_stage_reads():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in STAGES.items():
        stage = dvc[name]["do"] if "foreach" in dvc[name] else dvc[name]
        assert sorted(stage["params"]) == sorted(st.dvc_params()), name
        assert stage["cmd"].startswith(f"python -m diffpath.study {name}")
        assert st.notebook in stage["deps"], name
        nb = json.loads((ROOT / st.notebook).read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{st.notebook}: needs one cell tagged 'parameters'"
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), st.notebook


def test_every_declared_param_exists_in_params_yaml():
    params = load_params(ROOT / "params.yaml")
    for name, st in STAGES.items():
        stage_parameters(name, params, "x" if st.item else None)  # raises KeyError if missing


def test_notebook_parameters_cover_what_the_stage_passes():
    """Every parameter a stage passes is declared in its notebook's parameters cell (papermill
    would otherwise inject a name the notebook never reads)."""
    params = load_params(ROOT / "params.yaml")
    for name, st in STAGES.items():
        nb = json.loads((ROOT / st.notebook).read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        ns: dict = {}
        exec("".join(cell["source"]), ns)
        passed = stage_parameters(name, params, "x" if st.item else None)
        missing = sorted(set(passed) - set(ns))
        assert not missing, f"{st.notebook} lacks parameters {missing}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    d = tmp_path_factory.mktemp("model") / "tiny_ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model):
    """Run the whole chain of stages in a scratch directory with tiny parameters."""
    work = tmp_path_factory.mktemp("study")
    p = load_params(ROOT / "params.yaml")
    p["model"].update(spec=str(tiny_model), device="cpu")
    p["data"].update(datasets=["fashion_mnist", "mnist", "noise"], in_dist=["fashion_mnist"], n_train=48, n_test=24)
    p["errors"].update(steps=3, batch_size=16, chunk_size=32, n_maps=2, num_threads=1, clip_x0_hat=True)
    p["scorers"]["gmm"].update(n_components=[1, 2], covariance_type=["diag"], cv=3, max_iter=20)
    p["walkthrough"].update(in_dist="fashion_mnist", ood="noise")
    for d in p["data"]["datasets"]:
        run_stage("data", d, params=p, cwd=work)
        run_stage("errors", d, params=p, cwd=work)
    for stage in ("scorers", "evaluate", "report", "walkthrough"):
        run_stage(stage, params=p, cwd=work)
    return work, p


def test_chain_produces_results(study):
    work, p = study
    res = pd.read_csv(work / "reports/results.csv")
    assert list(res.columns) == ["method", "in_dist", "ood", "auroc", "fpr95", "aupr"]
    assert len(res) == len(p["methods"]) * 2  # fashion_mnist vs mnist, noise
    assert res[["auroc", "fpr95", "aupr"]].apply(lambda c: c.between(0, 1)).all().all()
    metrics = json.loads((work / "reports/metrics.json").read_text())
    assert set(metrics) == set(p["methods"])
    for m in p["methods"]:
        assert (work / f"reports/tables/{m}.md").is_file() and (work / f"reports/tables/{m}.tex").is_file()
    assert (work / "reports/tables/ablation.md").read_text().count("|") > 10
    assert (work / "reports/figures/report/hist_fashion_mnist.png").stat().st_size > 1000
    assert (work / "reports/figures/report/roc_fashion_mnist.png").stat().st_size > 1000
    assert (work / "reports/figures/walkthrough/feature_space.png").is_file()
    # the cache holds per-step moments and a few maps, and no leftover work files
    with np.load(work / "data/errors/fashion_mnist/train.npz") as z:
        assert z["dp_eps"].shape == (48, 3, 5) and z["v2_dwerr"].shape == (48, 2, 5)
        assert z["maps_dp_eps"].shape[:2] == (2, 3)
    assert not list((work / "data/.work").rglob("chunk_*.npz"))


def test_booleans_and_lists_reach_the_notebook_intact(study):
    work, p = study
    got = _injected(work / "reports/notebooks/20_errors_mnist.ipynb")
    assert got["clip_x0_hat"] is True and got["compile"] is False and got["cuda_graphs"] is False
    assert got["in_dist"] == ["fashion_mnist"] and got["v2_timesteps"] == "diffpath"
    got = _injected(work / "reports/notebooks/40_scorers.ipynb")
    assert got["gmm"] == {"n_components": [1, 2], "covariance_type": ["diag"], "cv": 3, "max_iter": 20, "random_state": 0}
    assert got["kde_standardize"] == p["scorers"]["kde_standardize"]


def test_cli_overrides_parse_yaml_values(tmp_path):
    from diffpath.study.stages import _override

    params = {"errors": {"clip_denoised": True}, "data": {"in_dist": ["a"]}}
    _override(params, ["errors.clip_denoised=false", "data.in_dist=[a, b]", "errors.steps=5"])
    assert params == {"errors": {"clip_denoised": False, "steps": 5}, "data": {"in_dist": ["a", "b"]}}
