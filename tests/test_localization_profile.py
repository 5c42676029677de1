"""The localisation paper profile (DIVAD on MVTec AD and VisA).

* The pipeline's shape: the profile's own dvc.yaml runs exactly its stages, the committed (embedded)
  one none of them; its notebooks open with its parameters.
* The network replaced by a fake: the right repositories and files are asked for; offline the
  profile fails fast, in one message that lists everything missing, and changes nothing.
* End to end, as a new user runs it, in a scratch git repository holding the project: fakes of MVTec
  AD and VisA in their release layouts, a tiny random Stable Diffusion folder and ViT;
  ``python -m diffpath.study.profiles paper-localization`` then ``dvc repro`` (every stage), the
  tables' layout, and ``python -m diffpath.study.profiles embedded`` leaving a clean ``git status``
  with every tracked file of the embedded profile unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from localization_fakes import write_fake_mvtec, write_fake_visa, write_tiny_stable_diffusion, write_tiny_vit

from diffpath.models.hub import DINO_DEFAULT, SD_DEFAULT, SD_FILES, VIT_FILES
from diffpath.study import localization_profile as lp
from diffpath.study.pipeline import PAPER_LOCALIZATION_HEADER, dvc_yaml, notebook_defaults, stage_defaults
from diffpath.study.stages import PAPER_LOCALIZATION_STAGES, STAGES, load_params, stage_parameters

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEMPLATE = ROOT / "params-paper-localization.yaml"
EXPECTED_RUNS = {"industrial_data@mvtec", "industrial_data@visa", "industrial_reconstruct@mvtec",
                 "industrial_reconstruct@visa", "industrial_evaluate@mvtec", "industrial_evaluate@visa",
                 "industrial_report"}


# --------------------------------------------------------------------------------------------
# the pipeline's shape


def test_each_profile_sees_only_its_own_stages():
    embedded = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(embedded) == set(STAGES) and not set(embedded) & set(PAPER_LOCALIZATION_STAGES)
    mine = yaml.safe_load(dvc_yaml(ROOT, PAPER_LOCALIZATION_STAGES, PAPER_LOCALIZATION_HEADER))["stages"]
    assert set(mine) == set(PAPER_LOCALIZATION_STAGES)
    params = load_params(TEMPLATE)
    lay = params["layout"]
    for name, st in PAPER_LOCALIZATION_STAGES.items():
        stage_parameters(name, params, "x" if st.item else None)  # every key exists
        entry = mine[name].get("do", mine[name])
        for out in entry["outs"] + entry.get("metrics", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            path = path.replace("${layout.data}", lay["data"]).replace("${layout.reports}", lay["reports"])
            assert path.startswith(("data/paper_localization/", "reports/paper_localization/")), path


def test_each_stage_depends_on_exactly_the_code_it_runs(tmp_path):
    """As tests/test_architecture.py checks the study's dvc.yaml, with the standard library's import
    finder: the profile's stages depend on exactly what `python -m diffpath.study` and their
    notebooks run."""
    from test_architecture import PACKAGE, _notebook_script, _runs

    entry = _runs(PACKAGE / "study" / "__main__.py")
    stages = yaml.safe_load(dvc_yaml(ROOT, PAPER_LOCALIZATION_STAGES, PAPER_LOCALIZATION_HEADER))["stages"]
    for name, st in stages.items():
        st = st.get("do", st)
        deps = {d for d in st["deps"] if d.startswith("diffpath/")}
        notebook = next(d for d in st["deps"] if d.startswith("notebooks/"))
        runs = entry | _runs(_notebook_script(ROOT / notebook, tmp_path))
        assert deps == runs, f"stage {name}: depends on {sorted(deps - runs)} it does not run, " \
                             f"runs {sorted(runs - deps)} it does not depend on"


def test_the_profiles_notebooks_open_with_its_parameters():
    params = load_params(TEMPLATE)
    for name, st in PAPER_LOCALIZATION_STAGES.items():
        nb = json.loads((ROOT / st.notebook).read_text())
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), st.notebook
        defaults = notebook_defaults(ROOT / st.notebook)
        wrong = {k: (defaults.get(k, "<missing>"), v) for k, v in stage_defaults(name, params).items()
                 if defaults.get(k, "<missing>") != v}
        assert not wrong, f"{st.notebook}: run `python -m diffpath.study.pipeline --sync-notebooks` ({wrong})"


def test_reconstruct_reuses_a_finished_category_only_for_the_same_images_model_and_settings(tmp_path):
    from diffpath.data.industrial import prepare
    from diffpath.methods.divad import RoundTripSpec
    from diffpath.methods.latent import DIVAD_PROMPT, LatentDiffusion
    from diffpath.study.industrial import reconstruct

    write_fake_mvtec(tmp_path / "mvtec", categories=("bottle",), n_good=1, n_bad=1)
    prepare("mvtec", tmp_path / "mvtec", tmp_path / "prep", categories=["bottle"], model_size=16, eval_size=16)
    ld = LatentDiffusion.from_pretrained(write_tiny_stable_diffusion(tmp_path / "sd", image_size=16))
    specs = {"vae": RoundTripSpec("vae"), "stochastic": RoundTripSpec("stochastic", steps=2, draws=2)}
    kw = {"prompt": DIVAD_PROMPT, "guidance_scale": 3.5, "vae": "mean", "batch_size": 4, "eval_size": 16}
    logs: list[str] = []
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):  # an interrupted run's rerun reuses; a new seed does not
        reconstruct(ld, tmp_path / "prep", tmp_path / out, tmp_path / "work", specs, log=logs.append, seed=seed,
                    **kw)
    assert [ln.split(": ")[1].split(" ")[0] for ln in logs] == ["2", "reused", "2"]
    a, b, c = (dict(np.load(tmp_path / o / "bottle.npz")) for o in "abc")
    assert a["rec_stochastic"].shape == (2, 2, 16, 16, 3) and a["rec_stochastic"].dtype == np.uint8
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["rec_stochastic"], c["rec_stochastic"])


# --------------------------------------------------------------------------------------------
# the network replaced by a fake


class FakeHub:
    """``snapshot_download`` that records what it is asked for: online it copies the tiny parts,
    offline it raises as huggingface_hub does with nothing cached."""

    def __init__(self, parts: dict[str, Path] | None):
        self.parts, self.calls = parts, []

    def __call__(self, repo_id, allow_patterns=None, local_files_only=False, **kw):
        import huggingface_hub

        self.calls.append((repo_id, tuple(allow_patterns or ()), local_files_only))
        if self.parts is None or local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")
        return str(self.parts[repo_id])


def _offline_study(tmp_path: Path) -> Path:
    (tmp_path / TEMPLATE.name).write_text(TEMPLATE.read_text())
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


def test_the_hub_is_asked_for_divads_models_and_only_the_files_loaded(tmp_path, monkeypatch):
    import huggingface_hub

    from diffpath.models import zoo

    parts = {SD_DEFAULT: write_tiny_stable_diffusion(tmp_path / "sd"), DINO_DEFAULT: write_tiny_vit(tmp_path / "vit")}
    hub = FakeHub(parts)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(zoo, "_hub_reachable", lambda *a, **k: True)
    write_fake_mvtec(tmp_path / "dl/mvtec_anomaly_detection")
    write_fake_visa(tmp_path / "dl/VisA_20220922")
    params = yaml.safe_load(lp.installed_params(TEMPLATE.read_text(), data_root=str(tmp_path / "dl")))
    params["industrial"]["categories"] = {"mvtec": ["bottle", "screw"], "visa": ["candle", "pcb1"]}
    found, problems = lp.check(params, require_gpu=False)
    assert problems == []
    assert hub.calls == [(SD_DEFAULT, SD_FILES, False), (DINO_DEFAULT, VIT_FILES, False)]
    assert found == {"spec": str(parts[SD_DEFAULT]), "dino": str(parts[DINO_DEFAULT])}
    # full-precision safetensors only: no fp16 variants, no .bin duplicates, no safety checker
    assert "unet/diffusion_pytorch_model.safetensors" in SD_FILES and not any("fp16" in f for f in SD_FILES)
    assert not any(f.startswith("safety_checker") or f.endswith(".bin") for f in SD_FILES)


def test_offline_the_profile_fails_fast_in_one_message_and_changes_nothing(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from diffpath.models import zoo
    from diffpath.study.profiles import main

    hub = FakeHub(None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(zoo, "_hub_reachable", lambda *a, **k: False)
    root = _offline_study(tmp_path)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    monkeypatch.chdir(root)
    assert main(["paper-localization", "--data-root", str(tmp_path / "dl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("The localisation paper profile cannot run yet; nothing was changed. Missing:")
    lines = [ln for ln in err.splitlines()[1:] if ln.strip()]
    assert all(ln.startswith("  - ") for ln in lines)  # one message: one line per problem
    assert [(c[0], c[2]) for c in hub.calls] == [(SD_DEFAULT, True), (DINO_DEFAULT, True)]  # the cache only
    for needle in ("data: mvtec is not in", "mvtec.com/company/research/datasets/mvtec-ad", "data: visa is not in",
                   "amazon-science/spot-diff", f"model: cannot fetch the Stable Diffusion model {SD_DEFAULT}",
                   "MODEL=FOLDER", f"dino: cannot fetch the ViT feature extractor {DINO_DEFAULT}", "DINO=FOLDER",
                   "offline?"):
        assert needle in err, needle
    import torch

    assert ("NO_GPU=1" in err) != torch.cuda.is_available()
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before  # no dvc.yaml, params.yaml as it was


# --------------------------------------------------------------------------------------------
# end to end: the commands a new user runs, in a scratch git repository holding the project


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd: Path, *cmd: str) -> str:
    p = subprocess.run(list(cmd), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}"
    return p.stdout + p.stderr


def _tracked(repo: Path) -> dict[str, str]:
    files = sh(repo, "git", "ls-files", "-z").split("\0")
    return {f: hashlib.sha256((repo / f).read_bytes()).hexdigest() for f in files if f}


def _scratch_study(repo: Path) -> None:
    """The project's files (tracked and untracked, not ignored; no data, models, tests), with the
    profile's template set to the fakes' categories and sizes, committed."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\0")
    for f in listed:
        if f and not f.startswith(("data/", "models/", "benchmarks/", "tests/")) and (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    p = yaml.safe_load(TEMPLATE.read_text())
    p["model"]["device"] = "cpu"
    p["industrial"].update(categories={"mvtec": ["bottle", "screw"], "visa": ["candle", "pcb1"]}, model_size=16,
                           eval_size=32, num_threads=1, n_figure=1)
    (repo / TEMPLATE.name).write_text(yaml.safe_dump(p, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "the study")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    if shutil.which("dvc", path=str(BIN)) is None:
        pytest.skip("needs dvc in the test's environment")
    tmp = tmp_path_factory.mktemp("paper_localization")
    repo, dl = tmp / "study", tmp / "downloads"
    _scratch_study(repo)
    write_fake_mvtec(dl / "mvtec_anomaly_detection")
    write_fake_visa(dl / "VisA_20220922")
    sd, vit = write_tiny_stable_diffusion(tmp / "sd", image_size=16), write_tiny_vit(tmp / "vit")
    before = _tracked(repo)
    log = {"switch": sh(repo, sys.executable, "-m", "diffpath.study.profiles", "paper-localization", "--no-gpu",
                        "--model", str(sd), "--dino", str(vit), "--data-root", str(dl))}
    log["status"] = sh(repo, "git", "status", "--porcelain")
    log["stages"] = sh(repo, "dvc", "stage", "list", "--name-only")
    log["repro"] = sh(repo, "dvc", "repro")
    log["again"] = sh(repo, "dvc", "repro")
    out = {"tables": {f.name: f.read_text() for f in (repo / "reports/paper_localization/tables/industrial").glob("*.md")},
           "summary": pd.read_csv(repo / "reports/paper_localization/industrial.csv"),
           "params": load_params(repo / "params.yaml")}
    log["back"] = sh(repo, sys.executable, "-m", "diffpath.study.profiles", "embedded")
    log["status_after"] = sh(repo, "git", "status", "--porcelain")
    log["embedded_stages"] = sh(repo, "dvc", "stage", "list", "--name-only")
    return {"repo": repo, "log": log, "out": out, "before": before, "after": _tracked(repo)}


def test_the_profile_installs_its_params_and_pipeline_and_dvc_repro_runs_exactly_its_stages(e2e):
    log = e2e["log"]
    assert "paper-localization profile installed" in log["switch"]
    assert sorted(ln[3:] for ln in log["status"].splitlines()) == ["dvc.lock", "dvc.yaml", "params.yaml"]
    assert set(log["stages"].split()) == EXPECTED_RUNS
    ran = {ln.split("'")[1] for ln in log["repro"].splitlines() if ln.startswith("Running stage '")}
    assert ran == EXPECTED_RUNS
    assert "Running stage" not in log["again"]  # everything up to date
    assert e2e["out"]["params"]["profile"] == "paper-localization"


def test_the_tables_have_categories_and_mean_as_rows_and_the_four_metrics_as_columns(e2e):
    tables = e2e["out"]["tables"]
    for bench, cats in (("mvtec", ["bottle", "screw"]), ("visa", ["candle", "pcb1"])):
        for row in ("divad_code", "matched", "stochastic", "vae"):
            for amap in ("dino", "pixel", "ssim"):
                lines = tables[f"{bench}_{row}_{amap}.md"].splitlines()
                header = [c.strip() for c in lines[0].strip("|").split("|")]
                assert header == ["category", "image AUROC", "pixel AUROC", "PRO", "pixel AP"]
                assert [ln.strip("|").split("|")[0].strip() for ln in lines[2:]] == [*cats, "mean"]
        configs = [ln.strip("|").split("|")[0].strip() for ln in tables[f"{bench}.md"].splitlines()[2:]]
        assert configs[0] == "divad_code / dino" and len(configs) == 12
    published = tables["published.md"]
    for needle in ("mvtec pixel AUROC | 88.0", "visa PRO | 78.2", "Source: giddyyupp/DIVAD README.md"):
        assert needle in published, needle
    summary = e2e["out"]["summary"]
    costs = summary[summary["map"] == "dino"].set_index(["benchmark", "row"])["unet_evals"]
    assert costs[("mvtec", "divad_code")] == 136 and costs[("visa", "matched")] == 50
    assert costs[("mvtec", "stochastic")] == 136 and costs[("mvtec", "vae")] == 0
    assert summary[["image_auroc", "pixel_auroc", "pro", "pixel_ap"]].stack().between(0, 1).all()


def test_switching_back_leaves_git_clean_and_every_embedded_file_unchanged(e2e):
    assert "embedded profile restored" in e2e["log"]["back"]
    assert e2e["log"]["status_after"] == ""  # outputs are git-ignored, the swapped files restored
    assert e2e["after"] == e2e["before"]
    assert not set(e2e["log"]["embedded_stages"].split()) & EXPECTED_RUNS
    assert (e2e["repo"] / lp.SAVED_LOCK).is_file()
