"""The paper profile end to end, on small fakes in the real on-disk formats: every stage that
``dvc.yaml`` defines (read from it, foreach items from the profile's params), with a random
improved-diffusion checkpoint, reading and writing only under the profile's own folders (every file
each stage process and its kernels touch is recorded by an audit hook, ``tests/paper_audit``)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from paper_fakes import write_fake_downloads, write_tiny_checkpoint

# Every stage of dvc.yaml twice (the profile and a 64-px variant), each a process of its own: about
# five minutes on 2 cores, as long as the rest of the suite, so it runs with `make test-slow`.
pytestmark = pytest.mark.slow

from dvc_plan import plan, run_jobs
from diffpath.study.stages import STAGES, load_params

ROOT = Path(__file__).resolve().parents[1]
AUDIT = Path(__file__).resolve().parent / "paper_audit"  # sitecustomize: records the files each process touches
PAPER_SETS = ["cifar10", "svhn", "celeba", "cifar100", "textures_dtd"]
#: the embedded profile's committed results (copied into the scratch study: they must survive)
EMBEDDED_RESULTS = ["reports/results.csv", "reports/metrics.json", "reports/tables", "reports/base_model",
                    "reports/localization.csv", "reports/localization.json", "params.yaml"]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _paper_test_params(downloads: Path, ckpt: Path) -> dict:
    """params-paper.yaml made small: a random tiny model, a few images, tiny grids."""
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
    p["localization"].update(datasets=["fashion_mnist"], n_per_class=2, batch_size=8, num_threads=1, n_boot=20,
                             n_figure=1, rows={"median": {"kind": "model_free", "maps": ["median"]},
                                               "deterministic": {"kind": "deterministic", "t0": [0.4], "steps": 2},
                                               "stochastic": {"kind": "stochastic", "t0": [0.3], "steps": 1,
                                                              "draws": 1}})
    p["localization_walkthrough"].update(steps=2, draws=1, num_threads=1)
    return p


def _audited_env(work: Path, log: Path) -> dict[str, str]:
    """Every stage process and its kernels record the files they touch under ``work`` and ROOT."""
    log.mkdir()
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(AUDIT), str(ROOT)]),
            "DIFFPATH_AUDIT_LOG": str(log), "DIFFPATH_AUDIT_UNDER": f"{work}:{ROOT}"}


def _variant_params(p: dict, ckpt: Path) -> dict:
    """The profile's variant for a second, 64-px model (standing in for the ImageNet-64 one): its own
    roots and input size from :func:`paper_variant_text`, two sets, the detection chain's methods."""
    from diffpath.study.profiles import paper_variant_text

    v = yaml.safe_load(paper_variant_text(yaml.safe_dump(p), str(ckpt)))
    v["model"]["settings"] = str(ckpt.with_suffix(".json"))
    v["data"].update(datasets=["cifar10", "celeba"], in_dist=["cifar10"])
    v["methods"] = ["diffpath", "diffpathv2"]
    v["report"].update(base_model="imagenet", ablation=["diffpath", "diffpathv2"])
    return v


#: the variant runs the detection chain only (its other stages are the first model's, at another size)
VARIANT_STAGES = ("data", "errors", "scorers", "evaluate", "report")


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """Every stage of dvc.yaml for the profile's tiny model and, alongside it (two runners at a time,
    each stage as soon as its inputs exist), the detection chain of the variant for a 64-px model;
    each with its own audit log."""
    from paper_fakes import TINY_SETTINGS

    work = tmp_path_factory.mktemp("paper")
    downloads = work / "downloads"
    write_fake_downloads(downloads, n_train=10, n_test=6)
    ckpt = write_tiny_checkpoint(work / "ckpt" / "tiny.pt")
    ckpt64 = write_tiny_checkpoint(work / "ckpt" / "tiny64.pt", settings={**TINY_SETTINGS, "image_size": 64})
    for rel in EMBEDDED_RESULTS:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, work / rel)
        elif src.is_file():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, work / rel)
    before = _tree(work)
    p = _paper_test_params(downloads, ckpt)
    v = _variant_params(p, ckpt64)
    (work / "paper-test.yaml").write_text(yaml.safe_dump(p))
    (work / "variant-test.yaml").write_text(yaml.safe_dump(v))
    dvc = (ROOT / "dvc.yaml").read_text()
    jobs, frozen = plan(dvc, p)
    variant = [j for j in plan(dvc, v, prefix="variant:")[0] if j.name[8:].split("@")[0] in VARIANT_STAGES]
    envs = {"": _audited_env(work, work.parent / f"{work.name}-audit"),
            "variant:": _audited_env(work, work.parent / f"{work.name}-variant-audit")}

    def one(job):  # dvc.yaml's own commands, the stage's with the test's params file; processes of their own, as under dvc
        kind = "variant:" if job.name.startswith("variant:") else ""
        for line in job.cmds:
            cmd = shlex.split(line)
            assert cmd[:2] == ["python", "-m"] and cmd[2] in ("diffpath.study", "diffpath.study.site"), line
            params = ["--params", "variant-test.yaml" if kind else "paper-test.yaml"] if cmd[2] == "diffpath.study" else []
            r = subprocess.run([sys.executable, *cmd[1:], *params], cwd=work, env=envs[kind], capture_output=True,
                               text=True)
            assert r.returncode == 0, f"{job.name}: {r.stderr[-3000:]}"

    run_jobs(jobs + variant, one)
    return work, p, before, jobs, frozen, v


def test_every_stage_ran_and_the_tables_have_the_papers_layout(paper_run):
    work, p, *_ = paper_run
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
    for name in ("feature_space.png", "diffpath_path.png", "v2_curves.png", "verdict.png"):
        assert (out / "figures/walkthrough" / name).is_file()
    metrics = json.loads((out / "base_model/metrics.json").read_text())
    assert metrics["eval_dataset"] == "celeba/test" and metrics["n_eval_images"] == 4
    for name in ("scorers", "evaluate", "report", "walkthrough", "base_model_eval"):
        assert (out / "notebooks" / Path(STAGES[name].notebook).name).is_file(), name


def test_every_stage_of_dvc_yaml_ran(paper_run):
    """The stages came from dvc.yaml (foreach items from the profile's params); each left its outputs."""
    work, p, _, jobs, frozen, _ = paper_run
    names = {j.name.split("@")[0] for j in jobs}
    assert names | set(frozen) == set(STAGES) and frozen == ["base_model"]
    assert {j.name for j in jobs if j.name.startswith("errors@")} == {f"errors@{d}" for d in p["data"]["datasets"]}
    for job in jobs:
        for out in job.outs:
            assert (work / out).exists(), f"{job.name} did not write {out}"
    for name in ("timesteps.csv", "localization.csv", "localization.json", "site/index.html",
                 "site/localization_walkthrough.html"):
        assert (work / "reports/paper" / name).is_file(), name


def test_data_stage_counts_what_is_on_disk_and_keeps_colour(paper_run):
    work, p, *_ = paper_run
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

    work, *_ = paper_run
    img = np.asarray(Image.open(work / "reports/paper/figures/walkthrough/images.png").convert("RGB"), float)
    chroma = np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2])
    assert (chroma > 30).mean() > 0.01  # not a grey picture of one channel


def test_the_paper_profile_writes_only_under_its_own_folders(paper_run):
    work, _, before, *_ = paper_run
    after = _tree(work)
    for path, digest in before.items():
        assert after.get(path) == digest, f"the paper profile changed {path}"
    new = [p for p in after if p not in before and not p.startswith(("downloads/", "ckpt/"))
           and p not in ("paper-test.yaml", "variant-test.yaml")]
    assert new
    roots = ("data/paper/", "reports/paper/", "data/paper-tiny64/", "reports/paper-tiny64/", "reports/paper-compare/")
    stray = [p for p in new if not p.startswith(roots)]
    assert not stray, f"written outside the two models' roots: {stray[:5]}"


#: what a paper-profile stage may touch inside the scratch study: its layout roots, the downloads
#: root and the model it was given (the embedded profile's data/, reports/ and models/ are off limits)
ALLOWED = ("data/paper/", "reports/paper/", "downloads/", "ckpt/", "paper-test.yaml")


def _touched(work: Path, log: str = "audit") -> list[tuple[str, str, str]]:
    log = work.parent / f"{work.name}-{log}"
    rows = []
    for f in sorted(log.glob("*.log")):
        rows += [tuple(ln.split("\t")) for ln in f.read_text().splitlines() if ln.count("\t") == 2]
    return rows


def test_no_stage_touches_anything_outside_the_profiles_roots(paper_run):
    work, *_ = paper_run
    touched = _touched(work)
    assert any(p.startswith(str(work / "data/paper/errors")) for _, _, p in touched)  # the audit saw the stages
    stray = set()
    for event, mode, path in touched:
        if path.startswith(str(work) + "/"):
            rel = os.path.relpath(path, work)
            parent_of_a_root = event in ("os.mkdir", "os.listdir", "os.scandir") and any(
                r.startswith(rel + "/") for r in ALLOWED)
            if not (rel.startswith(ALLOWED) or parent_of_a_root or rel in (".", "params.yaml")):
                stray.add(f"{event} {mode} {rel}")
        elif path.startswith(str(ROOT) + "/"):
            rel = os.path.relpath(path, ROOT)
            if rel.startswith(("data/", "reports/", "models/", "params.yaml", "dvc.lock")):
                stray.add(f"{event} {mode} <repo>/{rel}")
    assert not stray, f"paper-profile stages touched files outside data/paper, reports/paper: {sorted(stray)[:10]}"


def test_the_report_puts_the_published_figures_beside_ours(paper_run):
    from diffpath.study.published import load_published

    work, p, *_ = paper_run
    out = work / "reports/paper"
    res = pd.read_csv(out / "results.csv").set_index(["method", "in_dist", "ood"])["auroc"]
    table = pd.read_csv(out / "tables/published.csv", keep_default_na=False)
    pub = load_published()
    want = pub[(pub["base_model"] == p["report"]["base_model"]) & pub["method"].isin(p["methods"])]
    assert p["report"]["base_model"] == "celeba" and len(want) >= 20
    assert table[["method", "in_dist", "ood", "published"]].values.tolist() == \
        want[["method", "in_dist", "ood", "auroc"]].values.tolist()
    row = table[(table["method"] == "diffpath") & (table["in_dist"] == "cifar10") & (table["ood"] == "svhn")].iloc[0]
    ours = res["diffpath", "cifar10", "svhn"]  # the fake run's own AUROC
    assert row["ours"] == pytest.approx(ours, abs=1e-6) and row["delta"] == pytest.approx(ours - 0.910, abs=1e-6)
    assert bool(row["outside"]) == (abs(ours - 0.910) > 0.01)
    avg = table[(table["method"] == "diffpath") & (table["in_dist"] == "all")].iloc[0]
    assert avg["ours"] == pytest.approx(res["diffpath"].mean(), abs=1e-6) and avg["published"] == 0.931
    md = (out / "tables/published.md").read_text()
    assert "DiffPath (Heng et al., NeurIPS 2024" in md and "EigenScore (Shoushtari et al., ICLR 2026" in md
    assert f"| DiffPath-6D | cifar10 | svhn | {ours:.3f} | 0.910 | {ours - 0.910:+.3f}" in md


def test_the_audit_hook_sees_reads_writes_and_removals_of_a_child_process(tmp_path):
    """The check above can only pass honestly if the hook records what a stage process does."""
    (tmp_path / "data/errors/x").mkdir(parents=True)
    (tmp_path / "data/errors/x/train.npz").write_bytes(b"0")
    env = _audited_env(tmp_path, tmp_path.parent / f"{tmp_path.name}-audit")
    code = ("import shutil, subprocess, sys; open('data/errors/x/train.npz','rb').read(); "
            "open('out.txt','w').write('1'); shutil.rmtree('data/errors'); "
            "subprocess.run([sys.executable, '-c', \"open('kernel.txt','w')\"], check=True)")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    seen = {(e, m, os.path.relpath(p, tmp_path)) for e, m, p in _touched(tmp_path)}
    assert ("open", "r", "data/errors/x/train.npz") in seen and ("open", "w", "out.txt") in seen
    assert ("shutil.rmtree", "", "data/errors") in seen and ("open", "w", "kernel.txt") in seen
    assert not any(p in ("train.npz", "x") for _, _, p in seen)  # rmtree's names relative to its open folders


# --------------------------------------------------------------------------------------------
# a second base model: its own output roots, 64-px inputs made as DiffPath makes them, the comparison


def test_a_second_base_model_writes_only_under_its_own_roots(paper_run):
    work, *_, v = paper_run
    assert v["layout"]["data"] == "data/paper-tiny64" and v["layout"]["reports"] == "reports/paper-tiny64"
    touched = {os.path.relpath(p, work) for _, _, p in _touched(work, "variant-audit") if p.startswith(str(work))}
    assert any(t.startswith("data/paper-tiny64/errors/") for t in touched)
    allowed = ("data/paper-tiny64/", "reports/paper-tiny64/", "downloads/", "ckpt/", "variant-test.yaml")
    stray = sorted(t for t in touched if not (t + "/").startswith(allowed) and t not in (".", "data", "reports"))
    assert not stray, f"the second model's run touched {stray[:5]}"  # the first model's run included
    res = pd.read_csv(work / "reports/paper-tiny64/results.csv")
    assert set(res["in_dist"]) == {"cifar10"} and set(res["ood"]) == {"celeba"}
    beside = pd.read_csv(work / "reports/paper-tiny64/tables/published.csv", keep_default_na=False)
    assert beside[["method", "in_dist", "published"]].values.tolist() == [["diffpath", "all", 0.85]]
    res = pd.read_csv(work / "reports/paper-tiny64/results.csv")
    assert set(res["in_dist"]) == {"cifar10"} and set(res["ood"]) == {"celeba"}
    beside = pd.read_csv(work / "reports/paper-tiny64/tables/published.csv", keep_default_na=False)
    assert beside[["method", "in_dist", "published"]].values.tolist() == [["diffpath", "all", 0.85]]


def test_the_64px_model_reads_32px_sets_upsampled_as_diffpath_does(paper_run):
    from PIL import Image

    from diffpath.study.layout import read_npz

    work, *_, v = paper_run
    assert (v["data"]["size"], v["data"]["load_size"]) == (64, 32)
    for name in ("cifar10", "celeba"):
        z = read_npz(work / "data/paper-tiny64/prepared" / name / "test.npz")
        assert z["images"].shape[1:] == (32, 32, 3) and z["x0"].shape[1:] == (3, 64, 64), name
        up = np.stack([np.asarray(Image.fromarray(im).resize((64, 64), Image.Resampling.BILINEAR)) for im in z["images"]])
        assert np.array_equal(z["x0"], (up.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(127.5) - 1)), name
    first = read_npz(work / "data/paper/prepared/celeba/test.npz")  # the same crop, at 32 px, for both models
    assert np.array_equal(first["images"], read_npz(work / "data/paper-tiny64/prepared/celeba/test.npz")["images"])


def test_the_base_model_comparison_puts_both_runs_beside_the_published_averages(paper_run):
    work, *_ = paper_run
    r = subprocess.run([sys.executable, "-m", "diffpath.study.compare", "ckpt/tiny.pt=celeba", "ckpt/tiny64.pt=imagenet",
                        "--params", "paper-test.yaml"], cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(work / "reports/paper-compare/models.csv")
    dp = table[table["method"] == "diffpath"].set_index("model")
    assert dp.loc["ckpt/tiny.pt", "published"] == 0.931 and dp.loc["ckpt/tiny64.pt", "published"] == 0.85
    for model, reports in (("ckpt/tiny.pt", "reports/paper"), ("ckpt/tiny64.pt", "reports/paper-tiny64")):
        res = pd.read_csv(work / reports / "results.csv")
        ours = res[res["method"] == "diffpath"]["auroc"].mean()
        assert dp.loc[model, "ours"] == pytest.approx(ours, abs=1e-6)
        assert dp.loc[model, "delta"] == pytest.approx(ours - dp.loc[model, "published"], abs=1e-6)
    assert "| DiffPath-6D | ckpt/tiny64.pt | imagenet |" in r.stdout and "0.850" in r.stdout
