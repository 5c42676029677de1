"""Profiles: the paper profile fails fast offline saying what to put where; the checkpoint download
asks the hub for the right file and loads it with the known settings; switching profiles swaps
params.yaml and dvc.lock without touching the embedded results; torchvision matches torch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from diffpath.models import ModelLoadError, load_model
from diffpath.models.zoo import ZOO, ZOO_FILE, resolve_spec, settings_dep
from diffpath.study.install import pip_commands, torchvision_for
from diffpath.study.profiles import (ProfileError, SAVED_LOCK, main, model_tag, paper_variant_text, saved_lock,
                                     switch_to_embedded, switch_to_profile)
from diffpath.study.stages import STAGES, load_params, stage_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_paper_params_cover_every_stage():
    paper = load_params(ROOT / "params-paper.yaml")
    embedded = load_params(ROOT / "params.yaml")
    for name, st in STAGES.items():
        a = stage_parameters(name, paper, "x" if st.item else None)
        b = stage_parameters(name, embedded, "x" if st.item else None)
        assert set(a) == set(b), name


def test_model_settings_param_names_the_settings_file():
    for f in ("params.yaml", "params-paper.yaml"):
        m = load_params(ROOT / f)["model"]
        assert m["settings"] == settings_dep(m["spec"]), f
    assert settings_dep("diffpath-celeba32") == ZOO_FILE and (ROOT / ZOO_FILE).is_file()


def _outputs(params: dict) -> set[str]:
    """Every output path of dvc.yaml interpolated with a profile's layout (frozen stages aside)."""
    lay = params["layout"]
    text = (ROOT / "dvc.yaml").read_text().replace("${layout.data}", lay["data"]).replace("${layout.reports}",
                                                                                         lay["reports"])
    paths = set()
    for st in yaml.safe_load(text)["stages"].values():
        st = st.get("do", st)
        if not st.get("frozen"):
            paths |= {next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots")
                      for o in st.get(key, [])}
    return paths


def test_every_paper_output_is_under_the_paper_folders():
    """dvc.yaml interpolated with each profile's layout: the paper profile's outputs, and those of
    its variant for another base model, never coincide with the embedded profile's or each other's."""
    embedded, paper = _outputs(load_params(ROOT / "params.yaml")), _outputs(load_params(ROOT / "params-paper.yaml"))
    imagenet = _outputs(yaml.safe_load(paper_variant_text((ROOT / "params-paper.yaml").read_text(), "imagenet64")))
    assert all(p.startswith(("data/paper/", "reports/paper/")) for p in paper)
    assert all(p.startswith(("data/paper-imagenet64/", "reports/paper-imagenet64/")) for p in imagenet)
    assert "reports/results.csv" in embedded and not embedded & paper and not paper & imagenet


def test_another_base_model_gets_its_own_profile_roots_input_size_and_published_base(tmp_path):
    from paper_fakes import TINY_SETTINGS, write_tiny_checkpoint

    template = (ROOT / "params-paper.yaml").read_text()
    own = yaml.safe_load(template)
    for spec in ("diffpath-celeba32", "/anywhere/celeba_ema_0.9999_499999.pt"):  # the profile's own model
        p = yaml.safe_load(paper_variant_text(template, spec))
        assert p["profile"] == "paper" and p["layout"] == own["layout"] and p["model"]["spec"] == spec
    v = yaml.safe_load(paper_variant_text(template, "imagenet64"))
    assert v["profile"] == "paper-imagenet64" and model_tag("imagenet64") == "imagenet64"
    assert v["layout"] == {"data": "data/paper-imagenet64", "reports": "reports/paper-imagenet64",
                           "downloads": "data/downloads"}  # the downloads are shared
    assert (v["data"]["size"], v["data"]["load_size"], v["report"]["base_model"]) == (64, 32, "imagenet")
    changed = [(a, b) for a, b in zip(template.splitlines(), paper_variant_text(template, "imagenet64").splitlines())
               if a != b]  # profile, the two roots, model, size, load_size, base model; comments kept
    assert len(changed) == 7 and all(a.partition("#")[2] == b.partition("#")[2] for a, b in changed)
    ckpt = write_tiny_checkpoint(tmp_path / "tiny 64.pt", settings={**TINY_SETTINGS, "image_size": 64})
    t = yaml.safe_load(paper_variant_text(template, str(ckpt)))
    assert t["profile"] == "paper-tiny-64" and t["layout"]["reports"] == "reports/paper-tiny-64"
    assert (t["data"]["size"], t["data"]["load_size"], t["report"]["base_model"]) == (64, 32, None)


# --------------------------------------------------------------------------------------------
# the checkpoint download, with the network replaced by a local fake


def test_zoo_checkpoint_is_fetched_from_the_right_repo_and_loads_with_its_settings(tmp_path, monkeypatch):
    import huggingface_hub
    import torch

    from diffpath.models.improved_unet import build_from_settings, resolve_settings

    entry = ZOO["diffpath-celeba32"]
    assert (entry.repo_id, entry.filename) == ("ajrheng/diffpath", "celeba_ema_0.9999_499999.pt")
    torch.manual_seed(0)
    net = build_from_settings(resolve_settings(entry.settings))  # the released model's architecture
    served = tmp_path / "hub" / entry.filename
    served.parent.mkdir()
    torch.save(net.state_dict(), served)
    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(served)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = load_model("diffpath-celeba32")
    assert asked == [("ajrheng/diffpath", "celeba_ema_0.9999_499999.pt")]
    assert model.kind == "improved-diffusion" and model.image_size == 32 and model.channels == 3
    assert model.num_timesteps == 4000 and model.schedule.name == "cosine"
    assert model.settings["num_res_blocks"] == 3 and model.settings["learn_sigma"]
    eps = model(torch.zeros(1, 3, 32, 32), torch.tensor([10]))
    assert eps.shape == (1, 3, 32, 32)
    assert resolve_spec("hub:ajrheng/diffpath/celeba_ema_0.9999_499999.pt") == str(served)
    assert settings_dep(served) == ZOO_FILE  # no settings file beside it: the zoo holds them


def test_offline_the_download_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def offline(repo_id, filename, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelLoadError) as exc:
        load_model("diffpath-celeba32")
    msg = str(exc.value)
    assert "https://huggingface.co/ajrheng/diffpath/resolve/main/celeba_ema_0.9999_499999.pt" in msg
    assert "offline" in msg and "MODEL=" in msg


def test_paper_profile_fails_fast_offline_listing_everything(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("DIFFPATH_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params-paper.yaml").write_text((ROOT / "params-paper.yaml").read_text())
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert main(["paper", "--no-install", "--data-root", str(tmp_path / "dl")]) == 2
    err = capsys.readouterr().err
    assert "cannot run yet" in err and "huggingface.co/ajrheng/diffpath" in err
    assert "params.yaml and dvc.lock were not changed; nothing was installed" in err
    for name in ("cifar10", "svhn", "celeba", "cifar100", "textures_dtd"):
        assert f"data: {name} (" in err, name
    assert "NO_GPU=1" in err or "cuda" not in err.lower()
    assert load_params(tmp_path / "params.yaml")["profile"] == "embedded"  # nothing was switched


# --------------------------------------------------------------------------------------------
# switching: params.yaml and dvc.lock swap; git status stays clean


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def test_switching_swaps_params_and_lock_and_leaves_git_clean(tmp_path):
    root = tmp_path
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "t@t")
    _git(root, "config", "user.name", "t")
    (root / "params.yaml").write_text("profile: embedded\nlayout: {data: data, reports: reports}\n")
    (root / "dvc.lock").write_text("embedded lock\n")
    (root / "reports").mkdir()
    (root / "reports/results.csv").write_text("embedded results\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "embedded")
    paper = "profile: paper\nlayout: {data: data/paper, reports: reports/paper}\n"

    (root / "params.yaml").write_text("profile: embedded\nx: 1\n")  # an uncommitted edit: refused
    with pytest.raises(ProfileError, match="uncommitted"):
        switch_to_profile(root, paper)
    _git(root, "checkout", "--", "params.yaml")

    switch_to_profile(root, paper)
    assert load_params(root / "params.yaml")["profile"] == "paper"
    (root / "dvc.lock").write_text("paper lock\n")  # what `dvc repro` of the paper profile writes
    print(switch_to_embedded(root))
    assert _git(root, "status", "--porcelain", "--untracked-files=no") == ""
    assert (root / "dvc.lock").read_text() == "embedded lock\n"
    assert (root / SAVED_LOCK).read_text() == "paper lock\n"
    switch_to_profile(root, paper)  # the paper lock comes back: nothing to recompute
    assert (root / "dvc.lock").read_text() == "paper lock\n"
    switch_to_embedded(root)
    assert _git(root, "status", "--porcelain", "--untracked-files=no") == ""
    assert (root / "reports/results.csv").read_text() == "embedded results\n"

    # a variant for another base model keeps its own lock; switching between the two saves each
    other = "profile: paper-imagenet64\nlayout: {data: data/paper-imagenet64, reports: reports/paper-imagenet64}\n"
    switch_to_profile(root, paper)
    switch_to_profile(root, other)
    assert (root / "dvc.lock").read_text() == "embedded lock\n"  # no saved lock yet: the committed one
    (root / "dvc.lock").write_text("imagenet lock\n")
    switch_to_profile(root, paper)
    assert (root / "dvc.lock").read_text() == "paper lock\n"
    switch_to_profile(root, other)
    assert (root / "dvc.lock").read_text() == "imagenet lock\n"
    print(switch_to_embedded(root))
    assert (root / saved_lock("paper-imagenet64")).read_text() == "imagenet lock\n"
    assert _git(root, "status", "--porcelain", "--untracked-files=no") == ""


# --------------------------------------------------------------------------------------------
# torchvision matched to the installed torch (never installed here)


@pytest.mark.parametrize("torch_v, tv", [("2.13.0+cpu", "0.28"), ("2.14.1", "0.29"), ("2.9.0", "0.24"),
                                         ("2.4.1", "0.19"), ("1.13.1", "0.14")])
def test_torchvision_release_for_torch(torch_v, tv):
    assert torchvision_for(torch_v) == f"torchvision=={tv}.*"


def test_pip_commands_never_replace_torch(tmp_path):
    cons = tmp_path / "c.txt"
    cmds = pip_commands("py", "2.13.0+cpu", cons)
    tv, rest = cmds
    assert tv[:4] == ["py", "-m", "pip", "install"] and "--no-deps" in tv and "torchvision==0.28.*" in tv
    assert tv[-2:] == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    assert "gdown" in rest and rest[-2:] == ["-c", str(cons)] and "torch" not in " ".join(rest[:-2])
    assert "--extra-index-url" not in pip_commands("py", "2.13.0+cpu", cons, pytorch_index=False)[0]
