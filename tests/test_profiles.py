"""The paper profile fails fast, saying what to put where, when its model or data are missing."""

from __future__ import annotations

from pathlib import Path


from diffpath.study.profiles import check_profile, main
from diffpath.study.stages import STAGES, load_params, stage_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_paper_params_cover_every_stage():
    paper = load_params(ROOT / "params-paper.yaml")
    embedded = load_params(ROOT / "params.yaml")
    for name, st in STAGES.items():
        a = stage_parameters(name, paper, "x" if st.item else None)
        b = stage_parameters(name, embedded, "x" if st.item else None)
        assert set(a) == set(b), name


def test_paper_profile_fails_fast_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFPATH_OFFLINE", "1")
    monkeypatch.setenv("DIFFPATH_DATA_ROOT", str(tmp_path / "downloads"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params-paper.yaml").write_text((ROOT / "params-paper.yaml").read_text())
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    problems = check_profile(load_params(tmp_path / "params-paper.yaml"), require_gpu=False)
    assert any("celeba32.pt is missing" in p for p in problems)
    for name in ("cifar10", "svhn", "celeba", "cifar100", "textures_dtd"):
        assert any(p.startswith("data:") and name.split("_")[0] in p.lower() for p in problems), name
    assert main(["paper"]) == 2
    err = capsys.readouterr().err
    assert "cannot run yet" in err and "downloads" in err
    # nothing was switched
    assert load_params(tmp_path / "params.yaml")["profile"] == "embedded"
    assert not (tmp_path / "params-embedded.yaml").exists()
