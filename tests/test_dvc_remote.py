"""Shared caches and queued sweeps, end to end, with DVC's own commands in scratch git repositories.

* ``test_remote_round_trip_of_one_stage`` (fast): ``dvc repro`` of one data stage, ``dvc push`` to a
  local-path remote, a fresh ``git clone`` + ``dvc pull`` gets the same bytes, and ``dvc repro``
  there runs nothing. Remote credentials go to ``.dvc/config.local``, which git ignores.
* ``test_chain_round_trip`` and ``test_queued_sweep_of_two_scorer_settings`` (slow, run only with
  ``make test-slow``, about 6 minutes on 2 cores): the chain data → errors → scorers → evaluate on
  two tiny sets; push, clone, pull, ``dvc repro`` runs nothing, a scorer change reruns only the
  scorers and the evaluation; then two scorer settings queued with ``dvc exp run --queue`` run in
  parallel (``dvc queue start -j 2``), each in its own copy of the workspace (its own
  ``data/.work``), reuse the cached model pass and give different scorers and scores.

The scratch repositories hold the project's working tree (tracked and untracked, not ignored
files), a tiny random diffusers model committed under ``models/tiny_ddpm`` and a tiny params.yaml.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("dvc", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None
                                or shutil.which("git") is None, reason="needs git and dvc")


def _env() -> dict[str, str]:
    # the stages call `python`: the one running the tests; one thread each; no DVC analytics
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd: Path, *cmd: str, check: bool = True, timeout: float = 600) -> str:
    """Run a command in ``cwd``; return stdout + stderr (DVC prints its progress to either)."""
    p = subprocess.run(list(cmd), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}) in {cwd}:\n{out[-4000:]}")
    return out


def _project_files() -> list[str]:
    """The project's working tree as git sees it: tracked and untracked, not ignored files."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    skip = ("data/", "reports/", "models/", "benchmarks/", "tests/", "dvc.lock")
    return [f for f in out.split("\0") if f and not f.startswith(skip) and (ROOT / f).is_file()]


def _tiny_model(path: Path) -> None:
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)


def make_study_repo(repo: Path, datasets: list[str], in_dist: list[str], model: bool = True) -> Path:
    """A git repository holding the study with a tiny model (``model``: only the stages after
    the data stage read it) and tiny parameters, committed."""
    repo.mkdir(parents=True)
    for f in _project_files():
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    if model:
        _tiny_model(repo / "models/tiny_ddpm")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"].update(spec="models/tiny_ddpm", device="cpu", channels_last=False)
    if "settings" in p["model"]:
        p["model"]["settings"] = "models/tiny_ddpm/unet/config.json"
    p["base_model"]["out_dir"] = "models/tiny_ddpm"  # the frozen stage's (uncached) output: in git
    p["data"].update(datasets=datasets, in_dist=in_dist, n_train=16, n_test=8)
    p["errors"].update(steps=2, batch_size=8, chunk_size=8, n_maps=1, num_threads=1)
    p["scorers"]["gmm"].update(n_components=[1], covariance_type=["diag"], cv=2, max_iter=10)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    sh(repo, "git", "init", "-q", "-b", "main")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny study")
    return repo


def _tracked_and_untracked(repo: Path) -> str:
    return sh(repo, "git", "status", "--porcelain")


def _run_stages(log: str) -> list[str]:
    return [line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")]


def test_remote_round_trip_of_one_stage(tmp_path):
    a = make_study_repo(tmp_path / "a", ["digits"], ["digits"], model=False)
    remote = tmp_path / "remote"
    remote.mkdir()
    log = sh(a, "dvc", "repro", "data@digits")
    assert _run_stages(log) == ["data@digits"]
    sh(a, "dvc", "remote", "add", "-d", "shared", str(remote))
    # a secret goes to the git-ignored config.local, never into the committed .dvc/config
    sh(a, "dvc", "remote", "add", "team", "s3://bucket/diffpath")
    sh(a, "dvc", "remote", "modify", "--local", "team", "secret_access_key", "s3cr3t-KEY")
    assert "s3cr3t-KEY" in (a / ".dvc/config.local").read_text()
    assert "s3cr3t-KEY" not in (a / ".dvc/config").read_text()
    sh(a, "git", "check-ignore", "-q", ".dvc/config.local")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "data stage and remote")
    assert "config.local" not in sh(a, "git", "ls-files", ".dvc")
    assert "s3cr3t-KEY" not in sh(a, "git", "grep", "-I", "-c", "s3cr3t-KEY", "HEAD", check=False)
    assert _tracked_and_untracked(a) == "", "dvc repro and a commit leave a clean tree"
    pushed = sh(a, "dvc", "push", "-r", "shared")
    assert "pushed" in pushed, pushed
    assert any(p.is_file() for p in (remote / "files").rglob("*")), "nothing reached the remote"
    assert "Everything is up to date" in sh(a, "dvc", "push", "-r", "shared")

    b = tmp_path / "b"
    sh(tmp_path, "git", "clone", "-q", str(a), str(b))
    assert not (b / "data/prepared/digits").exists() and not (b / ".dvc/config.local").exists()
    sh(b, "dvc", "pull", "data@digits")
    for rel in ("data/prepared/digits/train.npz", "data/prepared/digits/test.npz",
                "reports/notebooks/10_data_digits.ipynb"):
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    assert "up to date" in sh(b, "dvc", "status", "data@digits")
    log = sh(b, "dvc", "repro", "data@digits")
    assert _run_stages(log) == [] and "didn't change" in log, log
    # the committed model folder (the frozen stage's uncached output) is untouched by pull/repro
    assert _tracked_and_untracked(b) == ""
    assert not (b / "data/.work").exists()


# ---------------------------------------------------------------------------------------------
# slow: the chain and a queued sweep

CHAIN = "evaluate"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    a = make_study_repo(tmp / "a", ["digits", "noise"], ["digits"])
    log = sh(a, "dvc", "repro", CHAIN, timeout=1200)
    assert set(_run_stages(log)) == {"data@digits", "data@noise", "errors@digits", "errors@noise",
                                     "scorers", "evaluate"}
    remote = tmp / "remote"
    remote.mkdir()
    sh(a, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "tiny chain")
    return tmp, a


@pytest.mark.slow
def test_chain_round_trip(chain):
    tmp, a = chain
    sh(a, "dvc", "push", "--with-deps", CHAIN)
    b = tmp / "b"
    sh(tmp, "git", "clone", "-q", str(a), str(b))
    sh(b, "dvc", "pull", "--with-deps", CHAIN)
    for rel in ("data/errors/digits/test.npz", "data/errors/noise/test.npz", "reports/results.csv"):
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel
    log = sh(b, "dvc", "repro", CHAIN)
    assert _run_stages(log) == [], log
    # only what changed: a scorer setting reruns the scorers and the evaluation, not the model pass
    p = yaml.safe_load((b / "params.yaml").read_text())
    p["scorers"]["kde"]["bandwidth"] = 1.0
    (b / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    log = sh(b, "dvc", "repro", CHAIN)
    assert _run_stages(log) == ["scorers", "evaluate"], log


@pytest.mark.slow
def test_queued_sweep_of_two_scorer_settings(chain):
    tmp, a = chain
    work_before = sorted(str(f.relative_to(a)) for f in (a / "data").rglob("*") if ".work" in f.parts)
    for bw in ("1.0", "2.0"):
        sh(a, "dvc", "exp", "run", "--queue", "-S", f"scorers.kde.bandwidth={bw}", "-n", f"bw{bw[0]}", CHAIN)
    sh(a, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while True:
        status = sh(a, "dvc", "queue", "status")
        if not any(s in status for s in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(5)
    assert status.count("Success") == 2, status
    logs = {n: sh(a, "dvc", "queue", "logs", n) for n in ("bw1", "bw2")}
    for n, log in logs.items():
        assert "Running stage 'scorers'" in log and "Running stage 'errors@" not in log, (n, log[-3000:])
    shown = subprocess.run(["dvc", "exp", "show", "--json"], cwd=a, env=_env(), capture_output=True,
                           text=True, check=True).stdout
    rows = json.loads(shown)
    exps = {r["name"]: r for base in rows for e in base.get("experiments") or [] for r in e.get("revs", [])
            if r.get("name") in ("bw1", "bw2")}
    assert set(exps) == {"bw1", "bw2"}
    params = {n: r["data"]["params"]["params.yaml"]["data"]["scorers"]["kde"]["bandwidth"] for n, r in exps.items()}
    assert params == {"bw1": 1.0, "bw2": 2.0}
    for r in exps.values():
        assert r["data"]["metrics"]["reports/metrics.json"]["data"]["diffpath_1d"]["digits"]["noise"]["auroc"] >= 0

    def outs(rev: str) -> dict[str, str]:
        lock = yaml.safe_load(sh(a, "git", "show", f"{rev}:dvc.lock"))
        return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}

    base, bw1, bw2 = outs("HEAD"), outs(exps["bw1"]["rev"]), outs(exps["bw2"]["rev"])
    # the model pass is shared (not rerun); the fitted scorers and the test scores differ
    for rel in ("data/errors/digits", "data/errors/noise", "data/prepared/digits"):
        assert base[rel] == bw1[rel] == bw2[rel], rel
    for rel in ("data/scorers", "data/scores"):
        assert len({base[rel], bw1[rel], bw2[rel]}) == 3, rel
    # each experiment ran in its own copy of the workspace: nothing of theirs is left in ours
    assert _tracked_and_untracked(a) == ""
    work_after = sorted(str(f.relative_to(a)) for f in (a / "data").rglob("*") if ".work" in f.parts)
    assert work_after == work_before, "an experiment wrote into the workspace's work area"
    assert not list((a / ".dvc/tmp/exps").glob("tmp*")), "an experiment's copy was left behind"
