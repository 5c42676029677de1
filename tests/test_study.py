"""The pipeline: every notebook runs through papermill with tiny parameters on CPU; dvc.yaml and
the stage runner agree; booleans and lists reach the notebooks intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from diffpath.study.runner import run_stage
from diffpath.study.stages import STAGES, load_params, stage_parameters

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
        cmd = stage["cmd"][0] if isinstance(stage["cmd"], list) else stage["cmd"]
        assert cmd.startswith(f"python -m diffpath.study {name}")
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
    p["base_model_eval"].update(n_eval_images=8, n_eval_timesteps=3, n_samples=4, sample_steps=2, num_threads=1)
    p["localization"].update(datasets=["fashion_mnist"], n_per_class=2, batch_size=8, n_boot=20, n_figure=1,
                             num_threads=1)
    for row in p["localization"]["rows"].values():  # 2 DDIM steps per walk: a quick run
        if "steps" in row:
            row["steps"] = 2
    p["localization_walkthrough"]["num_threads"] = 1
    for d in p["data"]["datasets"]:
        run_stage("data", d, params=p, cwd=work)
        run_stage("errors", d, params=p, cwd=work)
    for stage in ("scorers", "evaluate", "report", "walkthrough", "timesteps", "base_model_eval", "localization",
                  "localization_walkthrough", "site"):
        run_stage(stage, params=p, cwd=work)
    from diffpath.study.site import main as build_site

    assert build_site(["--notebooks", str(work / "reports/notebooks"), "--out", str(work / "reports/site")]) == 0
    return work, p


def test_chain_produces_results(study):
    work, p = study
    res = pd.read_csv(work / "reports/results.csv")
    assert list(res.columns) == ["method", "in_dist", "ood", "auroc", "fpr95", "aupr"]
    assert len(res) == len(p["methods"]) * 2  # fashion_mnist vs mnist, noise
    # every AUROC is the one of the saved scores (in-distribution positive), to the CSV's 6 digits
    from sklearn.metrics import roc_auc_score

    from diffpath.study.evaluate import load_scores

    scores = load_scores(work / "data/scores/fashion_mnist.npz")
    for r in res.itertuples():
        s_in, s_out = scores[r.method][r.in_dist], scores[r.method][r.ood]
        y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
        assert abs(r.auroc - roc_auc_score(y, np.r_[s_in, s_out])) <= 5e-7, (r.method, r.ood)
    metrics = json.loads((work / "reports/metrics.json").read_text())
    assert set(metrics) == set(p["methods"])
    for m in p["methods"]:
        assert (work / f"reports/tables/{m}.md").is_file() and (work / f"reports/tables/{m}.tex").is_file()
    # the ablation table holds each method's mean AUROC × 100, one decimal
    rows = [ln.split("|")[1:-1] for ln in (work / "reports/tables/ablation.md").read_text().splitlines()[2:]]
    got = {cells[0].strip(): float(cells[-1].strip().strip("*")) for cells in rows}  # the Average column
    from diffpath.study.report import method_label

    for m in p["report"]["ablation"]:
        want = 100 * res.query("method == @m")["auroc"].mean()
        assert abs(got[method_label(m)] - want) <= 0.05 + 1e-9, m
    assert (work / "reports/figures/report/hist_fashion_mnist.png").stat().st_size > 1000
    assert (work / "reports/figures/report/roc_fashion_mnist.png").stat().st_size > 1000
    assert (work / "reports/figures/walkthrough/feature_space.png").is_file()
    # timesteps: every contiguous window of 3 steps (6) or 2 derivative steps (3), 3 families
    # each, against 2 OOD sets
    ts = pd.read_csv(work / "reports/timesteps.csv")
    assert len(ts) == (3 * 6 + 3 * 3) * 2 and set(ts["ood"]) == {"mnist", "noise"}
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
    from diffpath.study.runner import apply_overrides

    params = {"errors": {"clip_denoised": True}, "data": {"in_dist": ["a"]}}
    apply_overrides(params, ["errors.clip_denoised=false", "data.in_dist=[a, b]", "errors.steps=5"])
    assert params == {"errors": {"clip_denoised": False, "steps": 5}, "data": {"in_dist": ["a", "b"]}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The base-model stage at a tiny size: a few steps of a two-level UNet on 64 images."""
    work = tmp_path_factory.mktemp("base")
    p = load_params(ROOT / "params.yaml")
    p["base_model"].update(out_dir=str(work / "model"), n_train=64, steps=3, batch_size=16, warmup_steps=1,
                           checkpoint_every=2, log_every=1, num_threads=1, block_out_channels=[8, 16],
                           norm_num_groups=4, add_attention=False)
    run_stage("base_model", params=p, cwd=work)
    return work, p


def test_base_model_stage_trains_and_saves_a_loadable_model(trained):
    from diffpath.models import load_model

    work, p = trained
    config = json.loads((work / "model/train_config.json").read_text())
    assert config["steps_completed"] == 3 and config["num_images"] == 64
    model = load_model(work / "model")
    assert model.kind == "diffusers" and model.channels == 1 and model.image_size == 32


def test_base_model_eval_and_localization_stages_run(study):
    work, p = study
    metrics = json.loads((work / "reports/base_model/metrics.json").read_text())
    curve = pd.read_csv(work / "reports/base_model/loss_per_timestep.csv")
    assert len(curve) == 3 and metrics["n_eval_images"] == 8
    assert metrics["mean_heldout_loss_trained"] == pytest.approx(curve["loss_trained"].mean(), rel=1e-12)
    loc = pd.read_csv(work / "reports/localization.csv")
    assert sorted(loc["method"]) == sorted(p["localization"]["rows"])
    assert (loc["n_images"] == 20).all() and (loc["n_anomalous"] == 10).all()  # two per class, half anomalous
    assert (loc["pixel_auroc_lo"] <= loc["pixel_auroc"]).all() and (loc["pixel_auroc"] <= loc["pixel_auroc_hi"]).all()
    summary = json.loads((work / "reports/localization.json").read_text())
    assert "seconds" not in json.dumps(summary)  # nothing that changes from run to run
    # the walkthrough of one image of the same tiny table saves the x̂0-along-the-round-trip figure
    assert (work / "reports/figures/localization_walkthrough/round_trips.png").stat().st_size > 1000


def test_the_localization_walkthrough_reads_the_tables_settings():
    """Notebook 35 shows the table's maps of one image: it receives every setting that shapes the
    table's maps (and its benchmark) from the ``localization`` section, and names table rows."""
    p = load_params(ROOT / "params.yaml")
    table = stage_parameters("localization", p)
    walk = stage_parameters("localization_walkthrough", p)
    for k in ("rows", "n_per_class", "seed", "part", "batch_size", "feature_t", "feature_layers",
              "smooth_sigma", "pool", "weights"):
        assert walk[k] == table[k], k
    assert walk["dataset"] in table["datasets"]
    assert {walk["deterministic_row"], walk["stochastic_row"]} <= set(table["rows"])


def test_a_truncated_prepared_file_is_one_line_naming_it(tmp_path, tiny_model):
    """A killed data stage or a damaged checkout: the errors stage says which file and how to
    rebuild it, in one line and exit status 2, not a papermill traceback."""
    import subprocess
    import sys

    p = load_params(ROOT / "params.yaml")
    p["model"].update(spec=str(tiny_model), device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    good = tmp_path / "good.npz"
    np.savez(good, x0=np.zeros((4, 1, 32, 32), np.float32))
    bad = tmp_path / "data/prepared/mnist/test.npz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:100])
    r = subprocess.run([sys.executable, "-m", "diffpath.study", "errors", "mnist"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("diffpath.study: error: stage errors: data/prepared/mnist/test.npz: unreadable")
    assert "dvc repro" in last and "Traceback" not in r.stderr


def test_a_rerun_gives_the_same_bytes(tmp_path):
    """Executed notebooks are results too: no wall-clock times, random ids or absolute paths."""
    p = load_params(ROOT / "params.yaml")
    p["data"].update(n_train=16, n_test=8)
    runs = []
    for _ in range(2):
        out = run_stage("data", "digits", params=p, cwd=tmp_path)
        runs.append(out.read_bytes())
    assert runs[0] == runs[1]
    meta = json.loads(runs[0])["metadata"]["papermill"]
    assert "start_time" not in meta and meta["input_path"] == "notebooks/10_data.ipynb"


def test_executed_notebooks_keep_no_progress_bar_widgets(tmp_path):
    """tqdm.auto draws ipywidgets bars under random model ids: two runs of one stage differed in
    every executed notebook with a progress bar (and so in dvc.lock) until they were dropped."""
    from diffpath.study.runner import normalize_executed

    texts = []
    for i, model_id in enumerate(("323b9504082341fc91034eda30af73fc", "4db1541b8854478dbc882e65e2ca258d")):
        bar = {"output_type": "display_data", "metadata": {},
               "data": {"application/vnd.jupyter.widget-view+json": {"model_id": model_id, "version_major": 2,
                                                                      "version_minor": 0},
                        "text/plain": ["errors:   0%|          | 0/300 [00:00<?, ?img/s]"]}}
        printed = {"output_type": "stream", "name": "stdout", "text": ["done\n"]}
        nb = {"cells": [{"cell_type": "code", "id": "x", "metadata": {}, "source": [], "execution_count": 1,
                         "outputs": [bar, printed]}],
              "metadata": {"papermill": {}, "widgets": {"application/vnd.jupyter.widget-state+json": {
                  "state": {model_id: {"model_name": "HTMLModel"}}}}}, "nbformat": 4, "nbformat_minor": 5}
        f = tmp_path / f"{i}.ipynb"
        f.write_text(json.dumps(nb))
        normalize_executed(f, "notebooks/nb.ipynb", "reports/notebooks/nb.ipynb")
        texts.append(f.read_text())
    assert texts[0] == texts[1]
    got = json.loads(texts[0])
    assert "widgets" not in got["metadata"] and got["cells"][0]["outputs"][0]["text"] == ["done\n"]


def test_executed_notebooks_do_not_depend_on_how_printed_text_was_chunked(tmp_path):
    """The kernel may deliver the same prints as one stream output or several, as it flushes."""
    from diffpath.study.runner import normalize_executed

    def cell(*chunks):
        outs = [{"output_type": "stream", "name": name, "text": text} for name, text in chunks]
        outs.append({"output_type": "execute_result", "execution_count": 1, "metadata": {},
                     "data": {"text/plain": ["x"]}})
        return {"cells": [{"cell_type": "code", "id": "x", "metadata": {}, "source": [],
                           "execution_count": 1, "outputs": outs}],
                "metadata": {"papermill": {}}, "nbformat": 4, "nbformat_minor": 5}

    texts = []
    for i, nb in enumerate([
        cell(("stdout", ["a 1\n", "b 2\n", "c 3\n"]), ("stderr", "w\n")),
        cell(("stdout", ["a 1\n", "b 2\n"]), ("stdout", ["c 3\n"]), ("stderr", ["w\n"])),
        cell(("stdout", "a 1\nb"), ("stdout", " 2\nc 3\n"), ("stderr", "w\n")),
    ]):
        f = tmp_path / f"{i}.ipynb"
        f.write_text(json.dumps(nb))
        normalize_executed(f, "notebooks/nb.ipynb", "reports/notebooks/nb.ipynb")
        texts.append(f.read_text())
    assert texts[0] == texts[1] == texts[2]
    outs = json.loads(texts[0])["cells"][0]["outputs"]
    assert [o["output_type"] for o in outs] == ["stream", "stream", "execute_result"]
    assert outs[0]["text"] == ["a 1\n", "b 2\n", "c 3\n"] and outs[1]["text"] == ["w\n"]


def test_executed_notebooks_do_not_depend_on_where_the_clone_is(tmp_path):
    """Printed paths and warnings name the study root as '.', so two clones give the same bytes."""
    from diffpath.study.runner import normalize_executed

    texts = []
    for clone in ("a", "b"):
        root = tmp_path / clone
        root.mkdir()
        nb = {"cells": [{"cell_type": "code", "id": "x", "metadata": {}, "source": [], "execution_count": 1,
                         "outputs": [{"output_type": "stream", "name": "stderr",
                                      "text": [f"{root}/.venv/lib/tqdm/auto.py:21: TqdmWarning\n"]},
                                     {"output_type": "execute_result", "execution_count": 1, "metadata": {},
                                      "data": {"text/plain": [f"study root: {root}"]}}]}],
              "metadata": {"papermill": {"start_time": "t", "input_path": str(root / "nb.ipynb")}},
              "nbformat": 4, "nbformat_minor": 5}
        f = root / "out.ipynb"
        f.write_text(json.dumps(nb))
        normalize_executed(f, "notebooks/nb.ipynb", "reports/notebooks/nb.ipynb", root=root)
        texts.append(f.read_text())
    assert texts[0] == texts[1] and "./.venv/lib" in texts[0] and str(tmp_path) not in texts[0]


# --------------------------------------------------------------------------------------------
# the study's pages, built by the site stage from the tiny chain's executed notebooks

#: page → (stage whose figures it shows, tables it must hold at least)
PAGES = {"index": (None, 4), "walkthrough": ("walkthrough", 1), "localization_walkthrough": ("localization_walkthrough", 1),
         "report": ("report", 4), "localization": ("localization", 3), "timesteps": ("timesteps", 2),
         "base_model": (None, 1)}


def test_site_pages_hold_what_a_reader_needs(study):
    """Every page: a real title (its first heading), no error or stderr output, each figure the
    notebook saves shown and captioned, its tables, nothing fetched from the network, and one
    parameters cell."""
    from site_checks import read_page

    from diffpath.study.stages import SITE_PAGES, STAGES

    work, p = study
    site = work / "reports/site"
    assert set(PAGES) == set(SITE_PAGES)
    for page, (stage, tables) in PAGES.items():
        nb = json.loads((work / "reports/notebooks" / Path(STAGES[SITE_PAGES[page]].notebook).name).read_text())
        outs = [o for c in nb["cells"] for o in c.get("outputs", [])]
        assert not [o for o in outs if o["output_type"] == "error" or o.get("name") == "stderr"], page
        assert nb["metadata"]["kernelspec"]["name"] == "diffpath", page
        got = read_page((site / f"{page}.html").read_text())
        assert got.heading and got.title == f"{got.heading} — diffpath study", (page, got.title)
        assert got.stderr_outputs == got.error_outputs == 0 and got.external == [], page
        saved = len(list((work / "reports/figures" / stage).glob("*.png"))) if stage else 0
        assert got.images >= saved and got.captioned_images == got.images, (page, got.images, saved)
        assert got.tables >= tables and got.parameter_cells == 1, page
    for page in ("walkthrough", "localization_walkthrough"):
        assert read_page((site / f"{page}.html").read_text()).images >= 6, page


def test_site_in_a_real_browser(study, tmp_path):
    """Chromium (headless) opens the front page and both walkthroughs: every image loads, and a
    screenshot of each page is saved."""
    import browser

    reason = browser.missing()
    if reason:
        pytest.skip(reason)
    work, _ = study
    with browser.chromium() as driver:
        for page in ("index", "walkthrough", "localization_walkthrough"):
            seen = browser.open_page(driver, work / "reports/site", page)
            assert seen["title"].endswith("diffpath study"), seen["title"]
            assert all(width > 0 for width, _ in seen["images"]), (page, seen["images"])
            assert page == "index" or len(seen["images"]) >= 6, page
            assert browser.screenshot(driver, tmp_path / f"{page}.png").stat().st_size > 10_000


def test_a_stage_prints_one_line_and_no_kernel_warnings(tmp_path):
    """What `make repro` shows of a stage: one line with its name, its wall time and its record;
    the kernel (IPC sockets, no TCP) logs nothing, and the record names the kernel "diffpath"."""
    import re
    import subprocess
    import sys

    p = load_params(ROOT / "params.yaml")
    p["data"].update(n_train=16, n_test=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    r = subprocess.run([sys.executable, "-m", "diffpath.study", "data", "digits"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == "" and re.fullmatch(r"data@digits +\d+\.\d s   reports/notebooks/10_data_digits\.ipynb\n",
                                           r.stderr), r.stderr
    nb = json.loads((tmp_path / "reports/notebooks/10_data_digits.ipynb").read_text())
    assert nb["metadata"]["kernelspec"] == {"display_name": "Python (diffpath)", "language": "python",
                                            "name": "diffpath"}
