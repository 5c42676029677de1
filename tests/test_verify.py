"""`make verify`'s comparison: small synthetic result files committed in a scratch git repository,
then changed in its working tree by amounts inside and outside each metric's tolerance."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diffpath.study.verify import NEAR_TIES, RESULT_FILES, main

ROOT = Path(__file__).resolve().parents[1]
N = 300  # test images per set: one AUROC pair is 1/90000


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def study(tmp_path):
    """A committed embedded-profile result set (two sets, one method), as `dvc repro` writes it."""
    (tmp_path / "reports/tables").mkdir(parents=True)
    (tmp_path / "reports/base_model").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"datasets": ["a", "b"], "n_test": N}}))
    rows = [("dp", "a", "b", 0.500000, 0.900000, 0.500000), ("dp", "b", "a", 0.700000, 0.800000, 0.600000)]
    res = pd.DataFrame(rows, columns=["method", "in_dist", "ood", "auroc", "fpr95", "aupr"])
    res.to_csv(tmp_path / "reports/results.csv", index=False, float_format="%.6f")
    (tmp_path / "reports/metrics.json").write_text(json.dumps(
        {"dp": {"a": {"b": {"auroc": 0.5}, "mean": {"auroc": 0.5}}, "mean_auroc": 0.6}}))
    pd.DataFrame([("ε", "a", "b", 0, 1, 0, 0, 1, 0.68)],
                 columns=["family", "in_dist", "ood", "lo", "hi", "t_first", "t_last", "steps", "auroc"]).to_csv(
        tmp_path / "reports/timesteps.csv", index=False, float_format="%.6f")
    loc = {"images": {"f": {"n": 600, "anomalous": 300}}, "mean_over_classes": {"f/det": {"pixel_auroc": 0.9}},
           "paired_differences": {"det - sto": {"f": {"pro": {"difference": 0.01}}}}}
    (tmp_path / "reports/localization.json").write_text(json.dumps(loc))
    pd.DataFrame([("det", "det", "f", 10.0, 600, 300, 0.86, 0.9)],
                 columns=["method", "map", "dataset", "unet_evals", "n_images", "n_anomalous", "image_auroc",
                          "pixel_auroc"]).to_csv(tmp_path / "reports/localization.csv", index=False)
    pd.DataFrame([("det", "f", c, f"c{c}", 60, 0.8, 0.9, 0.7) for c in range(10)],
                 columns=["method", "dataset", "class", "class_name", "n", "image_auroc", "pixel_auroc", "pro"]).to_csv(
        tmp_path / "reports/localization_per_class.csv", index=False)
    (tmp_path / "reports/base_model/metrics.json").write_text(json.dumps(
        {"mean_heldout_loss_trained": 0.04376326107488894, "mean_heldout_loss_untrained": 1.190708693356438,
         "loss_ratio_trained_over_untrained": 0.03675396116536829, "n_eval_images": 128}))
    pd.DataFrame({"timestep": [0, 53], "loss_trained": [0.45, 0.13], "loss_untrained": [1.33, 1.30],
                  "alpha_bar": [0.9999, 0.96665]}).to_csv(tmp_path / "reports/base_model/loss_per_timestep.csv",
                                                          index=False)
    (tmp_path / "reports/tables/dp.md").write_text("| in | b | Average |\n| --- | ---: | ---: |\n| a | 50.0 | 50.0 |\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results")
    return tmp_path


def _edit_csv(path: Path, row: int, col: str, delta: float) -> None:
    t = pd.read_csv(path)
    t.loc[row, col] += delta
    t.to_csv(path, index=False, float_format="%.6f")


def _run(root: Path, capsys) -> tuple[int, dict[str, str]]:
    rc = main([str(root)])
    lines = capsys.readouterr().out.splitlines()
    return rc, {ln.split()[0]: ln for ln in lines[1:] if ln.startswith("reports/")}


def test_identical_results_pass(study, capsys):
    rc, lines = _run(study, capsys)
    assert rc == 0 and all("identical" in ln for ln in lines.values()) and len(lines) == 9


def test_auroc_within_a_few_pairs_passes_and_beyond_the_tolerance_fails(study, capsys):
    _edit_csv(study / "reports/results.csv", 0, "auroc", 3 / N**2)  # three swapped pairs, as between two machines
    rc, lines = _run(study, capsys)
    assert rc == 0 and "within tolerance" in lines["reports/results.csv"]
    assert f"{NEAR_TIES / N**2:.3g}" in lines["reports/results.csv"]  # the tolerance printed: 20 pairs
    _edit_csv(study / "reports/results.csv", 1, "auroc", 0.001)  # 90 pairs: a real change
    rc, lines = _run(study, capsys)
    assert rc == 1 and "OUTSIDE" in lines["reports/results.csv"] and "('dp', 'b', 'a')" in lines["reports/results.csv"]


def test_fpr95_moves_by_whole_images(study, capsys):
    _edit_csv(study / "reports/results.csv", 0, "fpr95", 1 / N)
    assert _run(study, capsys)[0] == 0
    _edit_csv(study / "reports/results.csv", 0, "fpr95", 2 / N)  # three images in all
    assert _run(study, capsys)[0] == 1


def test_metrics_timesteps_and_tables(study, capsys):
    tree = json.loads((study / "reports/metrics.json").read_text())
    tree["dp"]["mean_auroc"] += 5 / N**2
    (study / "reports/metrics.json").write_text(json.dumps(tree))
    _edit_csv(study / "reports/timesteps.csv", 0, "auroc", 10 / N**2)  # the largest seen between two machines
    md = study / "reports/tables/dp.md"
    md.write_text(md.read_text().replace("| 50.0 | 50.0 |", "| 50.1 | 50.0 |"))  # a rounding edge: one printed step
    rc, lines = _run(study, capsys)
    assert rc == 0 and all("within" in lines[f] for f in ("reports/metrics.json", "reports/timesteps.csv",
                                                          "reports/tables/dp.md"))
    md.write_text(md.read_text().replace("| 50.1 |", "| 50.3 |"))
    rc, lines = _run(study, capsys)
    assert rc == 1 and "OUTSIDE" in lines["reports/tables/dp.md"]
    md.write_text(md.read_text().replace("| a |", "| c |"))
    assert "DIFFERENT" in _run(study, capsys)[1]["reports/tables/dp.md"]


def test_base_model_loss_within_float32_noise(study, capsys):
    path = study / "reports/base_model/metrics.json"
    m = json.loads(path.read_text())
    m["mean_heldout_loss_trained"] += 2e-9  # as measured between two CPUs
    path.write_text(json.dumps(m))
    rc, lines = _run(study, capsys)
    assert rc == 0 and "within" in lines["reports/base_model/metrics.json"]
    m["mean_heldout_loss_trained"] += 1e-5
    path.write_text(json.dumps(m))
    assert _run(study, capsys)[0] == 1
    m["mean_heldout_loss_trained"] -= 1e-5
    m["n_eval_images"] = 127  # counts must be equal
    path.write_text(json.dumps(m))
    assert "OUTSIDE" in _run(study, capsys)[1]["reports/base_model/metrics.json"]


def test_localisation_class_means(study, capsys):
    # 10 classes of 30 anomalous and 30 normal images: one pair of one class is 1/9000 of a class mean
    _edit_csv(study / "reports/localization_per_class.csv", 3, "pixel_auroc", 10 / 9000)
    assert _run(study, capsys)[0] == 0
    _edit_csv(study / "reports/localization_per_class.csv", 3, "pixel_auroc", 0.01)
    assert _run(study, capsys)[0] == 1


def test_missing_rows_and_files_are_reported(study, capsys):
    t = pd.read_csv(study / "reports/results.csv")
    t.iloc[:1].to_csv(study / "reports/results.csv", index=False)
    (study / "reports/timesteps.csv").unlink()
    rc, lines = _run(study, capsys)
    assert rc == 1 and "rows differ" in lines["reports/results.csv"] and "missing" in lines["reports/timesteps.csv"]


def test_every_committed_result_of_dvc_yaml_is_verified():
    """Each `cache: false` output of a stage that `dvc repro` runs is in the list (a new one cannot be missed)."""
    from pathlib import PurePath

    text = (ROOT / "dvc.yaml").read_text().replace("${layout.data}", "data").replace("${layout.reports}", "reports")
    committed = set()
    for st in yaml.safe_load(text)["stages"].values():
        st = st.get("do", st)
        if st.get("frozen"):
            continue
        for key in ("outs", "metrics", "plots"):
            committed |= {next(iter(o)) for o in st.get(key, []) if isinstance(o, dict)
                          and next(iter(o.values())).get("cache") is False}
    covered = [c for c in committed if any(PurePath(c).match(p) or PurePath(c + "/x.md").match(p)
                                           for p in RESULT_FILES)]
    assert sorted(committed) == sorted(covered) and len(committed) >= 9
