"""The paper profile end to end, on small fakes in the real on-disk formats: every stage, with a
random improved-diffusion checkpoint, writing only under the profile's own folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from paper_fakes import write_fake_downloads, write_tiny_checkpoint

from diffpath.study.runner import run_stage
from diffpath.study.stages import STAGES, load_params

ROOT = Path(__file__).resolve().parents[1]
PAPER_SETS = ["cifar10", "svhn", "celeba", "cifar100", "textures_dtd"]
#: the embedded profile's committed results (copied into the scratch study: they must survive)
EMBEDDED_RESULTS = ["reports/results.csv", "reports/metrics.json", "reports/tables", "reports/base_model",
                    "reports/localization.csv", "reports/localization.json", "params.yaml"]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("paper")
    downloads = work / "downloads"
    write_fake_downloads(downloads, n_train=10, n_test=6)
    ckpt = write_tiny_checkpoint(work / "ckpt" / "tiny.pt")
    for rel in EMBEDDED_RESULTS:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, work / rel)
        elif src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, work / rel)
    before = _tree(work)

    p = load_params(ROOT / "params-paper.yaml")
    assert p["layout"] == {"data": "data/paper", "reports": "reports/paper", "downloads": "data/downloads"}
    p["layout"]["downloads"] = str(downloads)
    p["model"].update(spec=str(ckpt), settings=str(ckpt.with_suffix(".json")), device="cpu")
    p["data"].update(n_train=8, n_test=None)  # the whole (fake) test splits: counted on disk
    p["errors"].update(steps=2, batch_size=16, chunk_size=32, n_maps=2, num_threads=1)
    p["scorers"]["gmm"].update(n_components=[1], covariance_type=["diag"], cv=2, max_iter=10, n_jobs=1,
                               device="cpu")
    p["scorers"]["kde"].update(device="cpu")
    p["base_model_eval"].update(n_eval_images=4, n_eval_timesteps=2, n_samples=2, sample_steps=2, num_threads=1)
    p["localization"].update(datasets=["fashion_mnist"], n_per_class=1, t0=400, steps=2, batch_size=8,
                             num_threads=1)
    # two stage runners at a time (2 cores), in the order dvc repro would run the stages; each a
    # process of its own, as under dvc (papermill changes the working directory of its process)
    (work / "paper-test.yaml").write_text(yaml.safe_dump(p))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def one(job):
        r = subprocess.run([sys.executable, "-m", "diffpath.study", *job, "--params", "paper-test.yaml"],
                           cwd=work, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{job}: {r.stderr[-3000:]}"

    def run(jobs):
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, jobs))

    run([("data", d) for d in p["data"]["datasets"]] + [("base_model_eval",)])
    run([("errors", d) for d in p["data"]["datasets"]])
    run([("scorers",)])
    run([("evaluate",)])
    run([("report",), ("walkthrough",)])
    return work, p, before


def test_every_stage_ran_and_the_tables_have_the_papers_layout(paper_run):
    work, p, _ = paper_run
    out = work / "reports/paper"
    res = pd.read_csv(out / "results.csv")
    assert len(res) == len(p["methods"]) * 5 * 4  # every in-distribution set against the 4 others
    assert res["auroc"].between(0, 1).all()
    for method in ("diffpath", "diffpathv2"):
        table = (out / "tables" / f"{method}.md").read_text().splitlines()
        header = [c.strip() for c in table[0].strip("|").split("|")]
        assert header[0] == "in-distribution" and header[-1] == "Average"
        assert set(header[1:-1]) == set(PAPER_SETS)  # columns: the OOD sets
        rows = [ln.strip("|").split("|")[0].strip() for ln in table[2:]]
        assert rows == PAPER_SETS  # rows: the in-distribution sets
    assert (out / "notebooks/70_walkthrough.ipynb").is_file() and (out / "notebooks/60_report.ipynb").is_file()
    for name in ("feature_space.png", "diffpath_path.png", "error_curves.png"):
        assert (out / "figures/walkthrough" / name).is_file()
    metrics = json.loads((out / "base_model/metrics.json").read_text())
    assert metrics["eval_dataset"] == "celeba/test" and metrics["n_eval_images"] == 4
    for name in ("scorers", "evaluate", "report", "walkthrough", "base_model_eval"):
        assert (out / "notebooks" / Path(STAGES[name].notebook).name).is_file(), name


def test_localization_stage_runs_on_the_paper_model(paper_run):
    work, p, _ = paper_run
    run_stage("localization", params=p, cwd=work)
    out = work / "reports/paper"
    assert (out / "localization.csv").is_file() and (out / "localization.json").is_file()


def test_data_stage_counts_what_is_on_disk_and_keeps_colour(paper_run):
    work, p, _ = paper_run
    from diffpath.study.layout import read_npz

    for name in PAPER_SETS:
        test = read_npz(work / "data/paper/prepared" / name / "test.npz")
        assert test["x0"].shape == (6, 3, 32, 32), name  # n_test None → the 6 images on disk
        assert test["images"].shape[-1] == 3 and test["images"].dtype == np.uint8
        assert len(read_npz(work / "data/paper/prepared" / name / "train.npz")["x0"]) == 8
    nb = json.loads((work / "reports/paper/notebooks/10_data_svhn.ipynb").read_text())
    text = json.dumps(nb)
    assert "on_disk" in text and "73257" in text  # the count on disk beside the registry's nominal one


def test_walkthrough_shows_colour_images_in_colour(paper_run):
    from PIL import Image

    work, _, _ = paper_run
    img = np.asarray(Image.open(work / "reports/paper/figures/walkthrough/diffpath_path.png").convert("RGB"), float)
    chroma = np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2])
    assert (chroma > 30).mean() > 0.01  # not a grey picture of one channel


def test_the_paper_profile_writes_only_under_its_own_folders(paper_run):
    work, _, before = paper_run
    after = _tree(work)
    for path, digest in before.items():
        assert after.get(path) == digest, f"the paper profile changed {path}"
    new = [p for p in after if p not in before and not p.startswith(("downloads/", "ckpt/"))
           and p != "paper-test.yaml"]
    assert new
    stray = [p for p in new if not p.startswith(("data/paper/", "reports/paper/"))]
    assert not stray, f"written outside data/paper and reports/paper: {stray[:5]}"
