"""Issue 15: the user-facing reliability defects of ``diffpath fit`` / ``diffpath score``.

Each test reproduces one defect through the public command line or Python API; they failed before
the fixes (two runs sharing a work folder, stale chunks, pickled scorers, non-ε diffusers models,
file-system errors escaping as tracebacks, non-UTF-8 names, too few images to fit).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_detector import _save_unet

from diffpath.cli import main
from diffpath.data import load_split
from diffpath.detector import Detector, DetectorError
from diffpath.cache import PassOptions
from diffpath.cache import compute as cache_mod

FAST = {"cv": 3, "covariance_type": ("diag",)}


@pytest.fixture(scope="module")
def rw(tmp_path_factory):
    """A tiny model, 12 Fashion-MNIST and 12 MNIST images, and a detector fitted on the former."""
    root = tmp_path_factory.mktemp("reliability")
    model = _save_unet(root / "model", seed=0)
    folders = {}
    for name, ds in (("fashion", "fashion_mnist"), ("mnist", "mnist")):
        folders[name] = root / name
        folders[name].mkdir()
        for i, img in enumerate(load_split(ds, "test", n=12, seed=0).images):
            Image.fromarray(img).save(folders[name] / f"{name}{i:02d}.png")
    det = root / "det"
    with pytest.warns(UserWarning, match="too small"):
        Detector(str(model), steps=3, scorer_params=FAST).fit(folders["fashion"]).save(det)
    return {"root": root, "model": model, "det": det, **folders}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _no_model_work(monkeypatch):
    """Make any model pass fail loudly: the checks must come before it."""
    def boom(*a, **k):
        raise AssertionError("the model pass started before the outputs were checked")

    monkeypatch.setattr(cache_mod, "_compute_chunk", boom)


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("diffpath: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. two runs on one output -------------------------------------------------------------------


def test_a_second_run_on_the_same_out_is_refused(rw, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scores.csv"
    real = cache_mod._compute_chunk
    inner: dict[str, object] = {}

    def during(*a, **k):  # while the first run is in its model pass, start a second one
        if "rc" not in inner:
            inner["rc"] = main(["score", "--detector", str(rw["det"]), str(rw["mnist"]), "--out", str(out),
                                "--chunk-size", "4", "--device", "cpu", "--no-progress"])
            inner["err"] = capsys.readouterr().err
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "_compute_chunk", during)
    rc = main(["score", "--detector", str(rw["det"]), str(rw["fashion"]), "--out", str(out),
               "--chunk-size", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert inner["rc"] == 2
    assert "another diffpath run" in _one_line_error(str(inner["err"]))
    monkeypatch.setattr(cache_mod, "_compute_chunk", real)
    rows = _rows(out)
    assert [Path(r["path"]).parent for r in rows] == [rw["fashion"]] * 12
    clean = Detector.load(rw["det"], run=PassOptions(device="cpu", chunk_size=4)).score_images(rw["fashion"])
    np.testing.assert_array_equal([float(r["score"]) for r in rows], clean.scores)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no lock or work left


def test_chunks_of_another_run_are_never_trusted(rw, tmp_path, monkeypatch):
    d = Detector.load(rw["det"])
    work = tmp_path / "work"
    real = cache_mod._compute_chunk
    calls: list[tuple[int, int]] = []

    def flaky(*a, **k):
        calls.append(a[2])
        if len(calls) == 2:
            raise RuntimeError("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "_compute_chunk", flaky)
    with pytest.raises(RuntimeError, match="simulated"):  # an MNIST run leaves chunk 0 behind ...
        d.set_run(device="cpu", chunk_size=4, work_dir=work).score_images(rw["mnist"])
    parts = work / "features.npz.parts"
    assert (parts / "chunk_000000.npz").is_file()
    (parts / "meta.json").unlink()  # ... and its meta.json is lost (another run removed it)
    monkeypatch.setattr(cache_mod, "_compute_chunk", real)
    res = d.score_images(rw["fashion"])
    clean = d.set_run(work_dir=None).score_images(rw["fashion"])
    np.testing.assert_array_equal(res.scores, clean.scores)


# -- 3. no pickles --------------------------------------------------------------------------------


class _Payload:
    """A pickle that runs code on load: it creates a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_detector_folder_holds_no_pickle_and_old_pickled_folders_are_refused(rw, tmp_path, capsys):
    names = sorted(p.name for p in rw["det"].iterdir())
    assert not [n for n in names if n.endswith((".joblib", ".pkl", ".pickle"))], names
    for f in rw["det"].glob("*.npz"):
        with np.load(f, allow_pickle=False) as z:  # loads without pickle
            for k in z.files:
                assert z[k].dtype != object

    # a folder in the old format, whose "scorer" is a pickle that runs code (checksum null)
    old = tmp_path / "old"
    shutil.copytree(rw["det"], old)
    meta = json.loads((old / "detector.json").read_text())
    meta["format_version"] = 1
    meta["scorer"] = {"kind": "gmm", "file": "scorer.joblib", "sha256": None}
    (old / "detector.json").write_text(json.dumps(meta))
    marker = tmp_path / "pwned"
    with open(old / "scorer.joblib", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with pytest.raises(DetectorError, match="refit"):
        Detector.load(old)
    assert main(["score", "--detector", str(old), str(rw["mnist"]), "--out", str(tmp_path / "s.csv")]) == 2
    assert "refit" in _one_line_error(capsys.readouterr().err)
    assert not marker.exists()


def test_saved_scorer_scores_like_the_fitted_one(rw, tmp_path):
    from diffpath.models import load_model

    model = load_model(rw["model"])
    d = Detector(model, method="diffpathv2_1d", steps=3).fit(rw["fashion"])  # a KDE scorer
    d.save(tmp_path / "kde")
    d2 = Detector.load(tmp_path / "kde")
    feats = np.random.default_rng(0).normal(size=(7, 1)) * 10
    np.testing.assert_allclose(d2.score_features(feats), d.score_features(feats), rtol=1e-12)
    a = Detector.load(rw["det"]).set_params(model=model).score_images(rw["mnist"])
    with pytest.warns(UserWarning, match="too small"):
        fitted = Detector(model, steps=3, scorer_params=FAST).fit(rw["fashion"])
    b = fitted.score_images(rw["mnist"])
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10)


# -- 4. diffusers models that do not predict ε ------------------------------------------------------


def _unet_with(folder: Path, prediction_type: str) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_prediction_type_is_converted_to_eps(tmp_path, prediction_type):
    from diffpath.models import load_model

    model = load_model(_unet_with(tmp_path / "m", prediction_type))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 500, 990])
    with torch.no_grad():
        raw = model.net.unet(x, t).sample.double()
    ac = torch.from_numpy(model.schedule.alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
    xd = x.double()
    want = {
        "epsilon": raw,
        "v_prediction": ac.sqrt() * raw + (1 - ac).sqrt() * xd,
        "sample": (xd - ac.sqrt() * raw) / (1 - ac).sqrt(),
    }[prediction_type]
    got = model(x, t)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.float().numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_prediction_type_is_refused_and_changes_the_fingerprint(tmp_path):
    from diffpath.models import ModelLoadError, load_model

    folder = _unet_with(tmp_path / "m", "epsilon")
    eps_fp = load_model(folder).fingerprint()
    cfg_file = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    assert load_model(folder).fingerprint() != eps_fp  # same weights, other meaning
    cfg["prediction_type"] = "flow"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="prediction_type 'flow'"):
        load_model(folder)


# -- 5. file-system errors: one line, exit 2, before the model pass ---------------------------------


def test_unwritable_outputs_fail_in_one_line_before_the_model_pass(rw, tmp_path, monkeypatch, capsys):
    _no_model_work(monkeypatch)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file")
    base = ["score", "--detector", str(rw["det"]), str(rw["mnist"]), "--device", "cpu", "--no-progress"]
    for extra in (["--out", str(blocker / "s.csv")],
                  ["--out", str(tmp_path / "s.csv"), "--plot", str(blocker / "p.png")],
                  ["--out", str(tmp_path)]):
        assert main(base + extra) == 2, extra
        line = _one_line_error(capsys.readouterr().err)
        assert "not_a_folder" in line or str(tmp_path) in line
    assert main(["fit", "--model", str(rw["model"]), "--normal", str(rw["fashion"]), "--out",
                 str(blocker / "det"), "--steps", "3", "--no-progress"]) == 2
    assert "not_a_folder" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_a_plot_that_fails_late_leaves_no_csv(rw, tmp_path, monkeypatch, capsys):
    real = cache_mod._compute_chunk
    plots = tmp_path / "plots"
    plots.mkdir()

    def sabotage(*a, **k):  # the plot's folder becomes a file during the model pass
        if plots.is_dir():
            plots.rmdir()
            plots.write_text("in the way")
        return real(*a, **k)

    monkeypatch.setattr(cache_mod, "_compute_chunk", sabotage)
    out = tmp_path / "s.csv"
    rc = main(["score", "--detector", str(rw["det"]), str(rw["mnist"]), "--out", str(out), "--plot",
               str(plots / "p.png"), "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "plots" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_features_with_an_npy_input_fails_in_one_line(rw, tmp_path, capsys):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros((2, 1, 16, 16), np.float32))
    rc = main(["features", "--model", str(rw["model"]), "--images", str(npy), "--out",
               str(tmp_path / "f.npz"), "--steps", "3", "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "x.npy" in _one_line_error(capsys.readouterr().err)


# -- 6. file names that are not UTF-8 -------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX file names are bytes")
def test_a_non_utf8_file_name_is_scored(rw, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(rw["mnist"], folder)
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    shutil.copyfile(os.fsencode(rw["mnist"] / "mnist00.png"), raw)
    out = tmp_path / "s.csv"
    rc = main(["score", "--detector", str(rw["det"]), str(folder), "--out", str(out), "--device", "cpu",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    rows = _rows(out)  # the CSV stays valid UTF-8
    assert len(rows) == 13
    odd = [r for r in rows if "caf" in r["path"]]
    assert len(odd) == 1 and odd[0]["path"].endswith("caf\\xe9.png")
    same = [r for r in rows if r["path"].endswith("mnist00.png")][0]
    assert odd[0]["score"] == same["score"]
    assert "caf" in err and "UTF-8" in err  # a warning names it


# -- 7. the minimum number of images to fit ---------------------------------------------------------


def test_fit_needs_enough_images_for_the_gmm_grid_and_the_calibration(rw, tmp_path, capsys):
    """3 images to fit a GMM grid on (2 folds of 2 training images) and as many again, at the
    default calibration share of one half, held out for the threshold: 5 at least (⌊5/2⌋ = 2)."""
    four = tmp_path / "four"
    four.mkdir()
    for f in sorted(rw["fashion"].iterdir())[:4]:
        shutil.copy(f, four)
    rc = main(["fit", "--model", str(rw["model"]), "--normal", str(four), "--out", str(tmp_path / "det"),
               "--steps", "3", "--device", "cpu", "--no-progress"])
    assert rc == 2
    assert "at least 5" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "det").exists()
    shutil.copy(sorted(rw["fashion"].iterdir())[4], four)
    with pytest.warns(UserWarning, match="too small"):
        d = Detector(str(rw["model"]), steps=3, scorer_params={"covariance_type": ("diag",)}).fit(four)
    assert len(d.fit_paths_) == 3 and len(d.calibration_scores_) == 2
