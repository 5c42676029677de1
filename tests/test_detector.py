"""diffpath.detector: fit / score on image folders, from the CLI and from Python, and bad input.

A tiny random diffusers UNet (16×16, 1 channel) keeps every model pass cheap; the features are
meaningless but deterministic, which is all these tests need.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_images import write_every_format

from diffpath.cli import main
from diffpath.data import load_split
from diffpath.detector import Detector, DetectorError, FeatureError, threshold_at
from diffpath.cache import PassOptions
from diffpath.cache import compute as cache_mod

STEPS = "3"
FAST = {"cv": 3, "covariance_type": ("diag",)}  # a small GMM grid for the Python-API fits


def _save_unet(folder: Path, seed: int, nan: bool = False) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    if nan:
        with torch.no_grad():
            unet.conv_out.weight.fill_(float("nan"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, 30 normal images, a folder of mixed images to score, and a detector fitted by the CLI."""
    root = tmp_path_factory.mktemp("detector")
    model = _save_unet(root / "model", seed=0)
    normal = root / "normal"
    normal.mkdir()
    for i, img in enumerate(load_split("fashion_mnist", "train", n=30, seed=0).images):
        Image.fromarray(img).save(normal / f"{i:03d}.png")
    test = root / "test"
    test.mkdir()
    for i, img in enumerate(load_split("fashion_mnist", "test", n=4, seed=0).images):
        Image.fromarray(img).save(test / f"fm{i}.png")
    noise = load_split("noise", "test", n=3, seed=0).images
    for i, img in enumerate(noise):
        Image.fromarray(img).save(test / f"noise{i}.bmp")
    # every format and mode, odd sizes (27×31), in a subfolder (folders expand recursively)
    write_every_format(test / "formats", load_split("mnist", "test", n=1).images[0][:27, :31])
    det = root / "det"
    rc = main(["fit", "--model", str(model), "--normal", str(normal), "--steps", STEPS, "--out", str(det),
               "--batch-size", "16", "--chunk-size", "16", "--accept", "0.8", "--no-progress"])
    assert rc == 0  # (accept 0.8: 15 calibration images are too few for a threshold at 0.95)
    return {"root": root, "model": model, "normal": normal, "test": test, "det": det}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _leftovers(folder: Path) -> list[str]:
    """Temporary or work files in a folder (what a failed run must not leave)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".work"))


def test_fit_writes_a_self_describing_detector(world):
    det = world["det"]
    assert sorted(p.name for p in det.iterdir()) == ["calibration.npz", "detector.json", "scorer.npz"]
    meta = json.loads((det / "detector.json").read_text())
    assert meta["format"] == "diffpath-detector" and meta["format_version"] == 3
    from diffpath.models import load_model

    assert meta["model"]["spec"] == str(world["model"])
    assert meta["model"]["fingerprint"] == load_model(world["model"]).fingerprint()  # the model's own
    assert meta["preprocessing"] == {"size": 16, "channels": 1, "resize": "auto", "alpha": "composite"}
    assert meta["features"]["method"] == "diffpathv2" and meta["features"]["steps"] == 3
    assert meta["scorer"]["kind"] == "gmm" and meta["scorer"]["sklearn_version"]
    assert meta["scorer"]["best_params"]["n_components"] < 50  # the grid shrank for 15 images
    assert meta["training"]["n_images"] == 30 and len(meta["training"]["calibration_quantiles"]) == 101
    assert (meta["training"]["n_fit"], meta["training"]["n_calibration"]) == (15, 15)
    d = Detector.load(det)
    assert d.threshold_ == threshold_at(d.calibration_scores_, 0.8) == np.sort(d.calibration_scores_)[2]
    assert meta["threshold"] == {**meta["threshold"], "accept": 0.8, "rank": 3, "guarantee": 13 / 16}
    assert _leftovers(world["root"]) == []


def test_score_cli_csv_plot_and_python_round_trip(world, capsys):
    out = world["root"] / "scores" / "scores.csv"
    plot = out.with_suffix(".png")
    bad = world["test"] / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    try:
        rc = main(["score", "--detector", str(world["det"]), str(world["test"]), "--out", str(out),
                   "--plot", str(plot), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert "zz_corrupt.png" in err and "warning" in err  # reported by name, skipped
        rows = _read_csv(out)
        assert list(rows[0]) == ["path", "score", "percentile", "is_ood"]
        assert len(rows) == 4 + 3 + 15 and not any("zz_corrupt" in r["path"] for r in rows)
        d = Detector.load(world["det"])
        scores = np.array([float(r["score"]) for r in rows])
        pct = np.array([float(r["percentile"]) for r in rows])
        ood = np.array([r["is_ood"] == "true" for r in rows])
        np.testing.assert_array_equal(ood, scores < d.threshold_)
        cal = d.calibration_scores_
        np.testing.assert_allclose(pct, [100 * np.mean(cal < s) for s in scores])
        k = int(np.floor(0.2 * (len(cal) + 1)))  # the threshold is the k-th lowest (1-based)
        assert np.all(pct[ood] <= 100 * (k - 1) / len(cal))
        assert np.all(pct[~ood] >= 100 * (k - 1) / len(cal))
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _leftovers(out.parent) == []

        # the Python API gives the same scores (and skips the same file)
        with pytest.warns(UserWarning, match="zz_corrupt"):
            res = d.set_run(device="cpu").score_images([world["test"]])
        assert res.paths == [r["path"] for r in rows]
        np.testing.assert_array_equal(res.scores, scores)  # exact: the CSV round-trips floats
        np.testing.assert_array_equal(res.is_ood, ood)

        # save → load keeps the scorer; --accept moves the threshold
        d.save(world["root"] / "copy")
        d2 = Detector.load(world["root"] / "copy")
        np.testing.assert_array_equal(d2.calibration_scores_, d.calibration_scores_)
        out2 = world["root"] / "scores" / "half.csv"
        rc = main(["score", "--detector", str(world["root"] / "copy"), str(world["test"] / "formats"),
                   "--out", str(out2), "--accept", "0.5", "--no-progress"])
        assert rc == 0
        rows2 = _read_csv(out2)
        s2 = np.array([float(r["score"]) for r in rows2])
        thr = threshold_at(d.calibration_scores_, 0.5)
        assert [r["is_ood"] == "true" for r in rows2] == list(s2 < thr)
        assert thr == np.sort(d.calibration_scores_)[int(np.floor(0.5 * 16)) - 1]
    finally:
        bad.unlink()


def test_strict_fails_on_a_corrupt_file_and_leaves_nothing(world, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(world["test"] / "formats", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    out = tmp_path / "s.csv"
    rc = main(["score", "--detector", str(world["det"]), str(folder), "--out", str(out), "--strict",
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "strict" in err
    assert not out.exists() and _leftovers(tmp_path) == []
    det = tmp_path / "det"
    rc = main(["fit", "--model", str(world["model"]), "--normal", str(folder), "--out", str(det),
               "--steps", STEPS, "--strict", "--no-progress"])
    assert rc == 2 and "broken.jpg" in capsys.readouterr().err
    assert not det.exists() and _leftovers(tmp_path) == []


def test_bad_inputs_give_one_line_errors_and_leave_nothing(world, tmp_path, capsys):
    def run(*argv: str) -> str:
        rc = main(list(argv))
        err = capsys.readouterr().err
        assert rc == 2, err
        assert err.strip().splitlines()[-1].startswith("diffpath: error:")
        return err

    det_out = tmp_path / "det"
    (tmp_path / "empty").mkdir()
    assert "holds no images" in run("fit", "--model", str(world["model"]), "--normal",
                                    str(tmp_path / "empty"), "--out", str(det_out), "--no-progress")
    assert "no images matched" in run("score", "--detector", str(world["det"]), str(tmp_path / "*.png"),
                                      "--out", str(tmp_path / "s.csv"), "--no-progress")
    assert "unknown method" in run("fit", "--model", str(world["model"]), "--normal", str(world["normal"]),
                                   "--method", "nope", "--out", str(det_out))

    # a detector from another format version
    old = tmp_path / "old_det"
    shutil.copytree(world["det"], old)
    meta = json.loads((old / "detector.json").read_text())
    meta["format_version"] = 99
    (old / "detector.json").write_text(json.dumps(meta))
    assert "format version 99" in run("score", "--detector", str(old), str(world["test"]),
                                      "--out", str(tmp_path / "s.csv"))
    with pytest.raises(DetectorError, match="not a diffpath detector"):
        Detector.load(tmp_path / "empty")

    # a detector whose model changed since it was fitted
    changed = tmp_path / "changed_det"
    shutil.copytree(world["det"], changed)
    meta = json.loads((changed / "detector.json").read_text())
    other = _save_unet(tmp_path / "model_v2", seed=1)
    meta["model"]["spec"] = meta["model"]["resolved"] = str(other)
    (changed / "detector.json").write_text(json.dumps(meta))
    assert "no longer matches" in run("score", "--detector", str(changed), str(world["test"]),
                                      "--out", str(tmp_path / "s.csv"), "--no-progress")
    # ... and passing the changed model explicitly is refused too
    assert "no longer matches" in run("score", "--detector", str(world["det"]), "--model", str(other),
                                      str(world["test"]), "--out", str(tmp_path / "s.csv"))

    # a model whose forward gives NaN: the error names the files
    nan_model = _save_unet(tmp_path / "nan_model", seed=0, nan=True)
    err = run("fit", "--model", str(nan_model), "--normal", str(world["normal"]), "--out", str(det_out),
              "--steps", STEPS, "--batch-size", "16", "--no-progress")
    assert "not finite" in err and "000.png" in err

    # an existing folder that is not a detector is never overwritten
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("keep me")
    assert "not a diffpath detector" in run("fit", "--model", str(world["model"]), "--normal",
                                            str(world["normal"]), "--out", str(tmp_path / "precious"))
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "keep me"

    assert not det_out.exists() and not (tmp_path / "s.csv").exists()
    assert _leftovers(tmp_path) == []


def test_interrupted_pass_resumes_from_finished_chunks(world, tmp_path, monkeypatch):
    d = Detector.load(world["det"])
    work = tmp_path / "scores.csv.work"
    real = cache_mod._compute_chunk
    calls: list[tuple[int, int]] = []
    fail = {"at": 2}

    def flaky(*args, **kwargs):
        calls.append(args[2])  # the chunk's (start, end)
        if len(calls) == fail["at"]:
            raise RuntimeError("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_compute_chunk", flaky)
    d.set_run(device="cpu", batch_size=4, chunk_size=4, work_dir=work)
    with pytest.raises(RuntimeError, match="simulated"):
        d.score_images(world["normal"])
    assert [p.name for p in sorted((work / "features.npz.parts").glob("chunk_*"))] == ["chunk_000000.npz"]

    calls.clear()
    fail["at"] = 0
    res = d.score_images(world["normal"])
    assert (0, 4) not in calls and len(calls) == 30 // 4  # 8 chunks, the first one reused
    assert not work.exists()  # removed on success
    monkeypatch.setattr(cache_mod, "_compute_chunk", real)
    # the calibration images score as when the detector was fitted (up to float32 differences
    # between batch sizes 4 and 16)
    idx = [res.paths.index(p) for p in d.calibration_paths_]
    np.testing.assert_allclose(res.scores[idx], d.calibration_scores_, rtol=1e-3, atol=1e-3)


def test_python_fit_and_nan_check(world, tmp_path):
    from diffpath.models import load_model

    model = load_model(world["model"])
    files = sorted(world["normal"].glob("*.png"))[:12]
    with pytest.warns(UserWarning, match="too small for the GMM grid"):  # the grid shrinks
        d = Detector(model, steps=3, scorer_params=FAST, accept=0.5,
                     run=PassOptions(work_dir=tmp_path / "w")).fit(files)
    assert d.meta_["model"]["spec"] == str(world["model"]) and not (tmp_path / "w").exists()
    assert d.meta_["threshold"]["accept"] == 0.5 and d.threshold_ == np.sort(d.calibration_scores_)[2]
    res = d.score_images(d.calibration_paths_[:3])
    np.testing.assert_allclose(res.scores, d.calibration_scores_[:3], rtol=1e-3, atol=1e-3)
    with torch.no_grad():  # a model whose forward gives NaN
        model.net.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FeatureError, match="000.png"):
        Detector(model, steps=3, scorer_params=FAST, run=PassOptions(work_dir=tmp_path / "w")).fit(files)
    assert not (tmp_path / "w").exists()


def test_interrupted_fit_resumes_from_the_cli(world, tmp_path, monkeypatch, capsys):
    real = cache_mod._compute_chunk
    calls: list[tuple[int, int]] = []

    def interrupted(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_compute_chunk", interrupted)
    det = tmp_path / "det"
    argv = ["fit", "--model", str(world["model"]), "--normal", str(world["normal"]), "--out", str(det),
            "--steps", STEPS, "--batch-size", "8", "--chunk-size", "8", "--no-progress"]
    assert main(argv) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not det.exists()
    assert len(list((tmp_path / "det.work" / "features.npz.parts").glob("chunk_*.npz"))) == 2

    calls.clear()
    monkeypatch.setattr(cache_mod, "_compute_chunk", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    assert main(argv) == 0
    assert calls == [(16, 24), (24, 30)]  # only the chunks that were not finished
    assert _leftovers(tmp_path) == [] and (det / "detector.json").is_file()
    assert Detector.load(det).meta_["training"]["n_images"] == 30


# -- the estimator's shape ----------------------------------------------------------------------------


def test_detector_has_scikit_learns_shape(world):
    import inspect

    from sklearn.exceptions import NotFittedError

    det = Detector(str(world["model"]), steps=3, accept=0.8,
                   run=PassOptions(device="cpu", batch_size=16, chunk_size=16))
    assert list(inspect.signature(Detector.fit).parameters) == ["self", "images"]  # no run options
    with pytest.raises(NotFittedError):
        det.predict(world["test"])
    with pytest.warns(UserWarning, match="too small"):
        assert det.fit(world["normal"]) is det
    learned = {k for k in vars(det) if k.endswith("_") and not k.startswith("_")}
    assert learned == {"scorer_", "calibration_scores_", "calibration_paths_", "fit_paths_", "threshold_", "meta_"}
    cli = Detector.load(world["det"])  # `diffpath fit` with the same settings and sizes
    np.testing.assert_array_equal(det.calibration_scores_, cli.calibration_scores_)
    assert det.threshold_ == cli.threshold_ and det.get_params() == {**cli.get_params(), "model": str(world["model"])}

    images = world["test"] / "formats"
    res = det.score_images(images)
    np.testing.assert_array_equal(det.score_samples(images), res.scores)
    np.testing.assert_array_equal(det.decision_function(images), res.scores - det.threshold_)
    pred = det.predict(images)
    assert set(pred) <= {-1, 1} and res.is_ood.any() != res.is_ood.all()  # both kinds occur
    np.testing.assert_array_equal(pred, np.where(res.is_ood, -1, 1))


def test_bad_settings_fail_before_any_work(world, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("the model pass started")

    monkeypatch.setattr(cache_mod, "_compute_chunk", boom)
    for settings, match in (({"steps": 1}, "steps must be at least 2"), ({"method": "nope"}, "unknown method"),
                            ({"accept": 1.5}, "accept must lie")):
        with pytest.raises(ValueError, match=match):
            Detector(str(world["model"]), **settings).fit(world["normal"])
    with pytest.raises(ValueError, match="chunk_size"):
        Detector(str(world["model"])).set_run(chunk_size=0)
    with pytest.raises(ValueError, match="unknown Detector settings"):
        Detector().set_params(device="cpu")  # a run option, not a setting
    out = tmp_path / "new" / "det"
    assert main(["fit", "--model", str(world["model"]), "--normal", str(world["normal"]), "--out", str(out),
                 "--steps", "1"]) == 2
    assert "steps must be at least 2" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_fit_interrupted_after_its_model_pass_reuses_the_pass(world, tmp_path, monkeypatch):
    from diffpath.scoring import scorers

    work = tmp_path / "work"
    run = PassOptions(device="cpu", batch_size=16, chunk_size=16, work_dir=work)
    real = scorers.make_scorer

    class Interrupted:
        def fit(self, features):
            raise KeyboardInterrupt

    monkeypatch.setattr(scorers, "make_scorer", lambda *a, **k: Interrupted())
    with pytest.raises(KeyboardInterrupt):  # while fitting the scorer: the pass is done
        Detector(str(world["model"]), steps=3, run=run).fit(world["normal"])
    assert (work / "features.npz.parts" / "finished.npz").is_file()
    assert not list(work.rglob("chunk_*.npz"))  # the finished cache replaced the chunks

    monkeypatch.setattr(scorers, "make_scorer", real)
    monkeypatch.setattr(cache_mod, "_compute_chunk", lambda *a, **k: pytest.fail("the pass ran again"))
    with pytest.warns(UserWarning, match="too small"):
        det = Detector(str(world["model"]), steps=3, run=run).fit(world["normal"])
    assert not work.exists()  # removed on success
    np.testing.assert_array_equal(det.calibration_scores_, Detector.load(world["det"]).calibration_scores_)
