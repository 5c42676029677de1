"""Issue 27: a threshold that keeps its promise, files a user was handed checked before use, walks
and writes that never lose data.

Each test reproduces one defect through the public command line or Python API with a realistic
hostile input (FIFOs from ``os.mkfifo``, an unreadable folder, a full tmpfs, forged ``.npy``
headers, tampered JSON) and failed before the fix. Numbers in test names follow the issue.
"""

from __future__ import annotations

import configparser
import errno
import hashlib
import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_detector import _save_unet

from diffpath.cache import compute as cache_mod
from diffpath.cli import main
from diffpath.data import load_split
from diffpath.detector import Detector, DetectorError

ROOT = Path(__file__).resolve().parents[1]
FAST = {"cv": 3, "covariance_type": ("diag",)}
RUN = ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def w3(tmp_path_factory):
    """A tiny 16-px model, 40 Fashion-MNIST images (normal), 6 MNIST images (new) and a detector
    fitted on the former at accept 0.8 (its 20 calibration images give the threshold rank 4)."""
    root = tmp_path_factory.mktemp("rel3")
    model = _save_unet(root / "model", seed=0)
    folders = {}
    for name, ds, split, n in (("normal", "fashion_mnist", "train", 40), ("new", "mnist", "test", 6)):
        folders[name] = root / name
        folders[name].mkdir()
        for i, img in enumerate(load_split(ds, split, n=n, seed=0).images):
            Image.fromarray(img).save(folders[name] / f"{name}{i:02d}.png")
    det = root / "det"
    with pytest.warns(UserWarning, match="too small"):
        Detector(str(model), steps=3, accept=0.8, scorer_params=FAST).fit(folders["normal"]).save(det)
    return {"root": root, "model": model, "det": det, **folders}


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one error line (returned)."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    return _one_line(err)


def _no_model_pass(monkeypatch) -> None:
    monkeypatch.setattr(cache_mod, "_compute_chunk", lambda *a, **k: pytest.fail("the model pass started"))


@contextmanager
def _deadline(seconds: int):
    """Raise TimeoutError in the block after ``seconds`` (a read blocked on a FIFO included)."""
    def boom(*_):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -- 0. a threshold calibrated on images the scorer did not fit -------------------------------------


def test_the_conformal_rank_and_its_guarantee_are_exact():
    from diffpath.scoring.threshold import conformal_rank, guarantee, threshold_at

    assert conformal_rank(150, 0.95) == 7 and guarantee(150, 0.95) == 144 / 151  # ⌈0.95·151⌉ = 144
    assert conformal_rank(19, 0.95) == 1 and conformal_rank(18, 0.95) == 0
    assert conformal_rank(9, 0.9) == 1  # (1 − 0.9)·10 is 0.9999999999999998 in floats; 1 exactly
    assert threshold_at(np.array([3.0, 1.0, 2.0]), 0.5) == 2.0  # k = ⌊0.5·4⌋ = 2
    assert threshold_at(np.arange(18.0), 0.95) == -math.inf  # too few: nothing is flagged


def test_the_threshold_keeps_its_promise_on_exchangeable_scores():
    """Simulated exchangeable scores: a new normal score is accepted with probability exactly
    (n + 1 − k)/(n + 1) (continuous scores); 20,000 draws put the estimate within 4.5 binomial
    standard deviations (0.0021) of it. The previous rule, the ⌊(1 − accept)·N⌋-th (0-based)
    score, gives 36/41 here: 11 standard deviations off."""
    from diffpath.scoring.threshold import threshold_at

    n, accept, trials = 40, 0.9, 20_000
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(trials, n + 1))
    thr = np.array([threshold_at(s[:n], accept) for s in scores])
    rate = float(np.mean(scores[:, n] >= thr))
    p = 37 / 41  # k = ⌊0.1·41⌋ = 4: (41 − 4)/41 = ⌈0.9·41⌉/41
    assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / trials), rate


def _export(split: str, n: int, folder: Path) -> Path:
    folder.mkdir()
    for i, img in enumerate(load_split("fashion_mnist", split, n=n, seed=0).images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder


def _binomial_range(m: int, p: float) -> tuple[int, int]:
    from scipy.stats import binom

    lo, hi = binom.interval(0.99, m, p)
    return int(lo), int(hi)


@pytest.mark.parametrize("n_normal, n_new, steps, calibration, scorer", [
    pytest.param(800, 400, 2, 0.7, {"n_components": (4, 8), "cv": 3}, id="fast"),
    pytest.param(500, 300, 10, None, None, id="readme-demo", marks=pytest.mark.slow),
])
def test_the_threshold_keeps_its_promise_on_held_out_images(tmp_path, n_normal, n_new, steps, calibration, scorer):
    """Fit on Fashion-MNIST training images with the study's model, score its *test* images (new
    normal images): the share flagged lies in the binomial 99% range of the promise
    p = 1 − ⌈accept·(n+1)⌉/(n+1).

    The binomial range counts the test images' sampling only; one detector's own acceptance rate
    also varies with its n calibration images (Beta(n + 1 − k, k), spread ≈ √(p(1 − p)/n)), so
    the fast run holds out 70% of 800 images (n = 560: that spread is 0.9 points against the
    range's 1.1) and takes 2 steps and a small GMM grid (about 15 s on one CPU thread; the
    guarantee holds for any features). The slow run is the README's demo (500 images, 10 steps,
    the default scorer), which flagged 43 of 300 (14%) with the old in-sample threshold."""
    normal, new = _export("train", n_normal, tmp_path / "normal"), _export("test", n_new, tmp_path / "new")
    det = Detector(str(ROOT / "models/fashion_mnist_ddpm"), steps=steps, scorer_params=scorer,
                   **({} if calibration is None else {"calibration": calibration}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GMM grid shrinking to the training set's size
        det.set_run(device="cpu").fit(normal)
    flagged = int(det.score_images(new).is_ood.sum())
    lo, hi = _binomial_range(n_new, 1 - det.guarantee())
    assert lo <= flagged <= hi, (flagged, lo, hi)
    assert len(det.calibration_scores_) == int((calibration or 0.5) * n_normal)


def test_the_scorer_and_the_threshold_see_different_images(w3, capsys):
    det = Detector.load(w3["det"])
    paths = sorted(str(p) for p in w3["normal"].iterdir())
    cal, fit = det.calibration_paths_, det.fit_paths_
    assert len(cal) == 20 and len(fit) == 20 and sorted(cal + fit) == paths and not set(cal) & set(fit)
    meta = det.meta_
    assert (meta["training"]["n_fit"], meta["training"]["n_calibration"]) == (20, 20)
    k = math.floor(0.2 * 21)  # accept 0.8, n = 20
    assert det.threshold_ == np.sort(det.calibration_scores_)[k - 1] and meta["threshold"]["rank"] == 4
    s = np.array([det.threshold_ - 1, det.threshold_, np.max(det.calibration_scores_) + 1])
    np.testing.assert_array_equal(det.percentiles(s), [100 * np.mean(det.calibration_scores_ < v) for v in s])
    # the promise, stated precisely
    rc = main(["fit", "--model", str(w3["model"]), "--normal", str(w3["normal"]), "--out",
               str(w3["root"] / "det_cli"), "--steps", "3", "--accept", "0.8", *RUN])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "at least ⌈0.8·21⌉/21 = 17/21" in err and "calibrated on the other 20" in err


def test_detectors_of_the_previous_format_are_refused(w3, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(w3["det"], old)
    meta = json.loads((old / "detector.json").read_text())
    meta["format_version"] = 2
    (old / "detector.json").write_text(json.dumps(meta))
    line = _fails(["score", "--detector", old, w3["new"], "--out", tmp_path / "s.csv"], capsys)
    assert "version 2 calibrated its threshold on the images its scorer was fitted on" in line
    assert "refit" in line


# -- 1. walk errors ---------------------------------------------------------------------------------


def _unreadable(folder: Path, monkeypatch) -> None:
    """Make ``folder`` unlistable. chmod 000 does not stop root (tests may run as root), so then the
    listing itself fails at the os level: ``os.scandir`` (what ``os.walk`` calls) raises
    PermissionError(EACCES) for this folder, as the kernel does for another user."""
    if os.geteuid() != 0:
        folder.chmod(0)  # (the tests restore it)
        return
    real = os.scandir
    target = os.path.abspath(folder)

    def scandir(path="."):
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) == target:  # (rmtree passes fds)
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_folders_are_warned_about_and_counted(w3, tmp_path, monkeypatch, capsys):
    top = tmp_path / "imgs"
    for sub in ("a", "b"):
        (top / sub).mkdir(parents=True)
        for f in sorted(w3["new"].iterdir())[:2]:
            shutil.copy(f, top / sub / f"{sub}_{f.name}")
    _unreadable(top / "b", monkeypatch)
    try:
        out = tmp_path / "s.csv"
        assert main(["score", "--detector", str(w3["det"]), str(top), "--out", str(out), *RUN]) == 0
        err = capsys.readouterr().err
        assert "2 images scored (1 skipped)" in err
        assert f"skipping {top / 'b'}: cannot list the folder (Permission denied)" in err
        line = _fails(["score", "--detector", w3["det"], top, "--out", out, "--strict", *RUN], capsys)
        assert str(top / "b") in line and "strict" in line
        _unreadable(top, monkeypatch)
        line = _fails(["score", "--detector", w3["det"], top, "--out", out, *RUN], capsys)
        assert f"{top}: cannot list the folder (Permission denied)" in line
    finally:
        for f in (top, top / "b"):
            f.chmod(0o755)


def test_fit_counts_an_unreadable_folder_among_the_skipped(w3, tmp_path, monkeypatch):
    normal = tmp_path / "normal"
    shutil.copytree(w3["normal"], normal)
    (normal / "locked").mkdir()
    shutil.copy(w3["new"] / "new00.png", normal / "locked")
    _unreadable(normal / "locked", monkeypatch)
    try:
        with pytest.warns(UserWarning, match="locked: cannot list the folder"):
            det = Detector(str(w3["model"]), steps=3, accept=0.8, scorer_params=FAST).fit(normal)
    finally:
        (normal / "locked").chmod(0o755)
    assert det.meta_["training"]["n_skipped"] == 1 and det.meta_["training"]["n_images"] == 40
    assert det.meta_["training"]["skipped"][0][0] == str(normal / "locked")


# -- 2. a full disk ---------------------------------------------------------------------------------


def _tmpfs_works(tmp_path: Path) -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    d = tmp_path / "probe"
    d.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{d}'"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def test_score_on_a_full_file_system_is_one_line_and_leaves_nothing(w3, tmp_path):
    """``--out`` on a 64 kB tmpfs (mounted in a private user and mount namespace: no root needed, the
    host sees nothing) that cannot hold the 100 decoded images (100 kB): before, writing the sparse
    memory map died of SIGBUS (exit 135) and left the work buffer and a stale lock."""
    if not _tmpfs_works(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    src = sorted(w3["normal"].iterdir())
    for i in range(100):
        shutil.copy(src[i % len(src)], imgs / f"{i:03d}.png")
    full = tmp_path / "full"
    full.mkdir()
    cmd = (f"mount -t tmpfs -o size=64k tmpfs '{full}' || exit 99; "
           f"'{sys.executable}' -m diffpath score --detector '{w3['det']}' '{imgs}' --out '{full}/s.csv' "
           "--device cpu --no-progress; echo rc=$?; ls -A '" + str(full) + "'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    out = r.stdout.strip().splitlines()
    assert out and out[0] == "rc=2", (r.stdout, r.stderr[-3000:])
    assert out[1:] == []  # no CSV, no work folder, no lock
    line = _one_line(r.stderr)
    assert "No space left on device" in line and "s.csv.work" in line


def test_a_full_disk_during_the_pass_keeps_only_work_that_resumes(w3, tmp_path, monkeypatch, capsys):
    from diffpath.cache import store

    real = store.ChunkStore.write

    def full(self, i, arrays):
        if i == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.part(i)))
        return real(self, i, arrays)

    monkeypatch.setattr(store.ChunkStore, "write", full)
    out = tmp_path / "s.csv"
    rc = main(["score", "--detector", str(w3["det"]), str(w3["normal"]), "--out", str(out), "--batch-size", "16",
               "--chunk-size", "16", *RUN])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in _one_line(err) and "rerun the same command" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv.work"]  # no lock, no CSV
    left = sorted(str(p.relative_to(tmp_path / "s.csv.work")) for p in (tmp_path / "s.csv.work").rglob("*"))
    assert left == ["features.npz.parts", "features.npz.parts/chunk_000000.npz",
                    "features.npz.parts/meta.json"]  # the decoded images cannot be resumed: gone
    monkeypatch.setattr(store.ChunkStore, "write", real)
    assert main(["score", "--detector", str(w3["det"]), str(w3["normal"]), "--out", str(out), "--batch-size",
                 "16", "--chunk-size", "16", *RUN]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]


# -- 3. localize --out never removes what it did not write -----------------------------------------


def test_localize_never_removes_files_it_did_not_write(w3, tmp_path, capsys):
    out = tmp_path / "holiday"
    out.mkdir()
    for i in range(5):
        Image.new("L", (8, 8), 40 * i).save(out / f"beach{i}.png")
    (out / "precious.txt").write_text("keep me")
    (out / "scores.csv").write_text("index,path,score,map,overlay\n")
    (out / "localize.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["localize", "--model", w3["model"], w3["new"], "--steps", "2", *RUN]
    line = _fails([*argv, "--out", out], capsys)
    assert "did not write" in line and "beach0.png" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    own = tmp_path / "maps"  # its own output folder is replaced by a rerun
    for _ in range(2):
        assert main([str(a) for a in argv] + ["--out", str(own)]) == 0
    names = {p.name for p in own.iterdir()}
    assert len(names) == 2 + 2 * 6 and set(json.loads((own / "localize.json").read_text())["files"]) == names - {
        "scores.csv", "localize.json"}


# -- 4. --out must be a regular file or absent --------------------------------------------------------


def test_outputs_that_are_not_regular_files_are_never_replaced(w3, tmp_path, monkeypatch, capsys):
    _no_model_pass(monkeypatch)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    to_null = tmp_path / "null.csv"  # a link to a character device (root would replace /dev/null)
    to_null.symlink_to(os.devnull)
    base = ["score", "--detector", w3["det"], w3["new"], *RUN]
    assert "a FIFO (named pipe), not a regular file" in _fails([*base, "--out", fifo], capsys)
    assert "a character device, not a regular file" in _fails([*base, "--out", to_null], capsys)
    assert "a FIFO" in _fails([*base, "--out", tmp_path / "s.csv", "--plot", fifo], capsys)
    os.mkfifo(tmp_path / "pipe.npz")
    assert "a FIFO" in _fails(["features", "--model", w3["model"], "--images", tmp_path / "x.npz",
                               "--out", tmp_path / "pipe.npz", *RUN], capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(to_null) == os.devnull


# -- 5, 6, 13. the study: params checked first, inputs checked, no half outputs ----------------------


def _study_params(model: Path) -> dict:
    from diffpath.study.stages import load_params

    p = load_params(ROOT / "params.yaml")
    p["model"].update(spec=str(model), device="cpu")
    p["errors"].update(steps=3, batch_size=8, chunk_size=8, n_maps=0, num_threads=1)
    return p


@pytest.mark.parametrize("stage, item, override, message", [
    ("data", "fashion_mnist", "data.n_test=-5",
     "stage data: params data.n_test must be an integer ≥ 1 or null, got -5"),
    ("data", "bogus", None, "stage data: dataset 'bogus' is not in params data.datasets"),
    ("data", "fashion_mnist", "data.datasets=[fashion_mnist, bogus]", "params data.datasets must be a non-empty list"),
    ("errors", "mnist", "errors.steps=0", "stage errors: params errors.steps must be an integer ≥ 2, got 0"),
    ("errors", "mnist", "errors.steps=abc", "stage errors: params errors.steps must be an integer ≥ 2, got 'abc'"),
    ("errors", "mnist", "errors.batch_size=-1", "params errors.batch_size must be an integer ≥ 1, got -1"),
    ("errors", "mnist", "model.precision=fp8", "params model.precision must be one of auto, fp32"),
    ("scorers", None, "scorers.kde.bandwidth=.nan", "params scorers.kde.bandwidth must be a finite number > 0"),
])
def test_bad_study_params_are_one_line_before_any_notebook_runs(w3, tmp_path, monkeypatch, capsys, stage, item,
                                                                 override, message):
    import papermill
    import yaml

    from diffpath.study.__main__ import main as study

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_study_params(w3["model"])))
    monkeypatch.chdir(tmp_path)
    rc = study([stage, *([item] if item else []), *(["-p", override] if override else [])])
    err = capsys.readouterr().err
    assert rc == 2 and message in _one_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no notebook, no data


def test_a_data_stage_writes_both_splits_or_neither(tmp_path, monkeypatch):
    from diffpath import io as dio

    real = dio._savez_synced
    calls = []

    def second_fails(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, arrays)

    monkeypatch.setattr(dio, "_savez_synced", second_fails)
    files = {tmp_path / "s/train.npz": {"x0": np.zeros(3)}, tmp_path / "s/test.npz": {"x0": np.ones(2)}}
    with pytest.raises(OSError):
        dio.save_npzs_atomic(files)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == []
    cells = json.loads((ROOT / "notebooks/10_data.ipynb").read_text())["cells"]
    source = "".join("".join(c["source"]) for c in cells)
    assert "save_npzs_atomic(prepared)" in source and "save_npz_atomic(" not in source


def test_nan_in_a_prepared_input_stops_the_errors_stage_in_one_line(w3, tmp_path):
    from diffpath.study.layout import StageInputError
    from diffpath.study.runner import run_stage

    x0 = np.zeros((4, 1, 16, 16), np.float32)
    x0[2, 0, 5, 5] = np.nan
    f = tmp_path / "data/prepared/mnist/test.npz"
    f.parent.mkdir(parents=True)
    np.savez(f, x0=x0)
    with pytest.raises(StageInputError, match=r"stage errors: data/prepared/mnist/test.npz: x0 holds NaN or inf "
                                              r"in 1 of 4 images \(first: image 2\)"):
        run_stage("errors", "mnist", params=_study_params(w3["model"]), cwd=tmp_path)
    assert not (tmp_path / "data/errors").exists() and not list((tmp_path / "reports").rglob("*.ipynb"))


def test_the_cache_pass_refuses_nan_input(w3):
    from diffpath.cache import CacheConfig, compute_cache
    from diffpath.models import load_model

    x0 = np.zeros((3, 1, 16, 16), np.float32)
    x0[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"x0 holds NaN or inf \(image 1\)"):
        compute_cache(load_model(w3["model"]), x0, CacheConfig(steps=2), progress=False)


# -- 7, 8, 16b. detector.json: one schema, every field checked ----------------------------------------


def _tampered(w3, tmp_path: Path, change) -> Path:
    d = tmp_path / "tampered"
    shutil.copytree(w3["det"], d)
    meta = json.loads((d / "detector.json").read_text())
    change(meta)
    (d / "detector.json").write_text(json.dumps(meta))
    return d


def _set(path: str, value):
    def change(meta):
        *parents, last = path.split(".")
        node = meta
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return change


_DELETE = object()


@pytest.mark.parametrize("path, value, field, must", [
    ("preprocessing", _DELETE, "preprocessing", "is missing"),
    ("threshold", _DELETE, "threshold", "is missing"),
    ("features", _DELETE, "features", "is missing"),
    ("features", "diffpathv2", "features", "must be a JSON object"),
    ("threshold.value", float("nan"), "threshold.value", "must be a finite number"),
    ("threshold.value", float("inf"), "threshold.value", "must be a finite number"),
    ("threshold.accept", 5, "threshold.accept", "must be a finite number in (0, 1]"),
    ("preprocessing.size", 64, "preprocessing.size", "must be an integer in [16, 16]"),
    ("preprocessing.size", 30000, "preprocessing.size", "must be an integer in [16, 16]"),
    ("model.image_size", 30000, "model.image_size", "must be an integer in [1, 2048]"),
    ("features.steps", "10", "features.steps", "must be an integer in [2, 10000]"),
    ("features.method", "magic", "features.method", "must be one of diffpath,"),
    ("format_version", "3", "format_version", "must be an integer, got '3'"),
])
def test_every_field_of_detector_json_is_checked(w3, tmp_path, capsys, path, value, field, must):
    d = _tampered(w3, tmp_path, _set(path, value))
    with pytest.raises(DetectorError) as info:
        Detector.load(d)
    msg = str(info.value)
    assert f"{d / 'detector.json'}: {field}" in msg and must in msg, msg
    line = _fails(["score", "--detector", d, w3["new"], "--out", tmp_path / "s.csv"], capsys)
    assert field in line


def test_a_preprocessing_that_does_not_fit_the_model_is_refused_before_reading_images(w3, tmp_path, monkeypatch,
                                                                                      capsys):
    def both(meta):  # consistent with itself, not with the model (16 px)
        meta["preprocessing"]["size"] = meta["model"]["image_size"] = 64

    d = _tampered(w3, tmp_path, both)
    monkeypatch.setattr("diffpath.detector.load_images", lambda *a, **k: pytest.fail("images were read"))
    line = _fails(["score", "--detector", d, w3["new"], "--out", tmp_path / "s.csv", *RUN], capsys)
    assert "makes 1×64×64 inputs, but its model takes 1×16×16" in line


# -- 9. the arrays of a detector folder ---------------------------------------------------------------


def _scores_file(d: Path) -> Path:
    """The calibration scores (``train_scores.npz`` in format 2, so these tests also ran on it)."""
    return next(d / f for f in ("calibration.npz", "train_scores.npz") if (d / f).exists())


def _spy_reads(monkeypatch) -> list[str]:
    """Names of the .npy members whose data is read (numpy's read_array, as np.load uses it)."""
    real, names = np.lib.format.read_array, []

    def spy(fp, *a, **k):
        names.append(getattr(fp, "name", "?"))
        return real(fp, *a, **k)

    monkeypatch.setattr(np.lib.format, "read_array", spy)
    return names


def _forged_member(name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    """A .npy member whose header declares ``shape`` (huge) and holds 64 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(64)


def _replace_member(npz: Path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(npz) as z:
        members = {i.filename: z.read(i.filename) for i in z.infolist()}
    members[name + ".npy"] = data
    with zipfile.ZipFile(npz, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)


def test_a_forged_scores_header_is_refused_before_its_data_is_read(w3, tmp_path, monkeypatch):
    d = tmp_path / "d"
    shutil.copytree(w3["det"], d)
    _replace_member(_scores_file(d), "scores", _forged_member("scores", "<f8", (2**27,)))
    reads = _spy_reads(monkeypatch)
    with pytest.raises(DetectorError, match=r"array 'scores' has shape \(134217728,\), expected \(20,\)"):
        Detector.load(d)
    assert "scores.npy" not in reads


@pytest.mark.parametrize("kind", ["nan", "huge strings"])
def test_bad_calibration_arrays_are_refused(w3, tmp_path, kind):
    d = tmp_path / "d"
    shutil.copytree(w3["det"], d)
    f = _scores_file(d)
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    if kind == "nan":
        arrays["scores"] = np.full_like(arrays["scores"], np.nan)
        match = "NaN"
        np.savez(f, **arrays)
    else:  # 20 paths of 10^8 characters (400 MB) each, declared in the header only
        _replace_member(f, "paths", _forged_member("paths", "<U100000000", (20,)))
        match = "items are over"
    with pytest.raises(DetectorError, match=match):
        Detector.load(d)


def test_a_scorer_with_a_zero_precision_is_refused(w3, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(w3["det"], d)
    with np.load(d / "scorer.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["gmm.precisions_cholesky"] = np.zeros_like(arrays["gmm.precisions_cholesky"])
    np.savez(d / "scorer.npz", **arrays)
    meta = json.loads((d / "detector.json").read_text())
    meta["scorer"]["sha256"] = hashlib.sha256((d / "scorer.npz").read_bytes()).hexdigest()  # a consistent forgery
    (d / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(DetectorError, match="precisions_cholesky' must have a positive diagonal"):
        Detector.load(d)


# -- 10. features --images: shapes from the header ----------------------------------------------------


def test_features_checks_the_shape_of_x0_before_reading_it(w3, tmp_path, monkeypatch, capsys):
    f = tmp_path / "x.npz"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("x0.npy", _forged_member("x0", "<f4", (1, 1, 40000, 40000)))
    reads = _spy_reads(monkeypatch)
    line = _fails(["features", "--model", w3["model"], "--images", f, "--out", tmp_path / "o.npz", *RUN], capsys)
    assert "x0 has shape (1, 1, 40000, 40000); the model wants (B, 1, 16, 16)" in line
    assert "x0.npy" not in reads
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("images.npy", _forged_member("images", "|u1", (1, 40000, 40000)))
    assert "over the pixel limit" in _fails(["features", "--model", w3["model"], "--images", f, "--out",
                                             tmp_path / "o.npz", *RUN], capsys)
    assert "images.npy" not in reads


# -- 11. model folders ----------------------------------------------------------------------------------


@pytest.mark.parametrize("file, content, match", [
    ("scheduler/scheduler_config.json", "[1, 2]", "scheduler_config.json: must hold a JSON object, got a JSON list"),
    ("scheduler/scheduler_config.json", "{not json", "scheduler_config.json: not valid JSON"),
    ("scheduler/scheduler_config.json", '{"num_train_timesteps": 1e9}', "num_train_timesteps must be an integer"),
    ("scheduler/scheduler_config.json", '{"beta_end": NaN}', "beta_end must be a number in (0, 1)"),
    ("unet/config.json", {"sample_size": 100000},
     "config.json: sample_size must be an integer in [1, 2048], got 100000"),
    ("unet/config.json", {"sample_size": [16, 32]}, "config.json: sample_size [16, 32] is not square"),
])
def test_model_folder_settings_are_checked_naming_the_file(w3, tmp_path, capsys, file, content, match):
    from diffpath.models import ModelLoadError, load_model

    m = tmp_path / "m"
    shutil.copytree(w3["model"], m)
    target = m / file
    if isinstance(content, dict):
        content = json.dumps({**json.loads(target.read_text()), **content})
    target.write_text(content)
    with pytest.raises(ModelLoadError) as info:
        load_model(m)
    assert match in str(info.value) and str(target) in str(info.value), str(info.value)
    assert match in _fails(["localize", "--model", m, w3["new"], "--out", tmp_path / "maps"], capsys)


# -- 12. FIFOs named *.png --------------------------------------------------------------------------------


def test_a_fifo_among_the_images_is_skipped_never_opened(w3, tmp_path, capsys):
    folder = tmp_path / "imgs"
    shutil.copytree(w3["new"], folder)
    pipe = folder / "zz_pipe.png"
    os.mkfifo(pipe)
    normal = tmp_path / "normal"
    shutil.copytree(w3["normal"], normal)
    os.mkfifo(normal / "zz_pipe.png")
    warning = "zz_pipe.png: a FIFO (named pipe), not a regular file"
    with _deadline(120):
        rc = main(["score", "--detector", str(w3["det"]), str(folder), "--out", str(tmp_path / "s.csv"), *RUN])
        err = capsys.readouterr().err
        assert rc == 0 and warning in err and "6 images scored (1 skipped)" in err, err
        rc = main(["score", "--detector", str(w3["det"]), str(w3["new"]), str(pipe), "--out",
                   str(tmp_path / "s.csv"), *RUN])  # given by name
        err = capsys.readouterr().err
        assert rc == 0 and warning in err and "6 images scored (1 skipped)" in err, err
        rc = main(["fit", "--model", str(w3["model"]), "--normal", str(normal), "--out", str(tmp_path / "det"),
                   "--steps", "3", *RUN])
        err = capsys.readouterr().err
        assert rc == 0 and warning in err and "(1 skipped)" in err, err
        rc = main(["localize", "--model", str(w3["model"]), str(folder), "--out", str(tmp_path / "maps"),
                   "--steps", "2", *RUN])
        err = capsys.readouterr().err
        assert rc == 0 and warning in err and "6 images localised (1 skipped)" in err, err
    assert "a FIFO" in _fails(["score", "--detector", w3["det"], pipe, "--out", tmp_path / "t.csv", *RUN], capsys)


# -- 14, 15. localize: validated options, an overlay drawn at a capped size -----------------------------


@pytest.mark.parametrize("sigma, match", [("inf", "must be a finite number"), ("nan", "must be a finite number"),
                                          ("-1", "0 or more"), ("1e6", "larger than the model's 16-pixel images")])
def test_localize_refuses_a_bad_smoothing_before_its_model_pass(w3, tmp_path, monkeypatch, capsys, sigma, match):
    monkeypatch.setattr("diffpath.methods.localization.localize", lambda *a, **k: pytest.fail("the pass ran"))
    line = _fails(["localize", "--model", w3["model"], w3["new"], "--out", tmp_path / "maps", "--smooth-sigma",
                   sigma, *RUN], capsys)
    assert "--smooth-sigma" in line and match in line
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("side", [1500, pytest.param(7000, marks=pytest.mark.slow)])
def test_the_overlay_of_a_large_image_is_drawn_at_a_capped_size(w3, tmp_path, side):
    """An RGBA image under MAX_PIXELS: its overlay was drawn at twice its size (14000² for the
    issue's 7000-px image: a MemoryError); now at most 2048 a side. The map keeps its grid."""
    from diffpath.cli.localize import OVERLAY_MAX_PX

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (side, side, 4), dtype=np.uint8), "RGBA").save(tmp_path / "big.png")
    out = tmp_path / "maps"
    assert main(["localize", "--model", str(w3["model"]), str(tmp_path / "big.png"), "--out", str(out),
                 "--steps", "2", *RUN]) == 0
    with Image.open(out / "0000_big_overlay.png") as im:
        assert max(im.size) <= OVERLAY_MAX_PX == 2048
    assert np.load(out / "0000_big_map.npy", mmap_mode="r").shape == (side, side)


# -- 16a. a detector folder reached through a link ------------------------------------------------------


def test_saving_through_a_link_keeps_the_link_and_leaves_nothing(w3, tmp_path):
    real = tmp_path / "store" / "det"
    real.parent.mkdir()
    link = tmp_path / "current"
    det = Detector.load(w3["det"])
    det.save(real)
    link.symlink_to(real, target_is_directory=True)
    for _ in range(2):
        det.save(link)
    assert link.is_symlink() and Detector.load(link).threshold_ == det.threshold_
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "store"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["det"]


# -- privacy -------------------------------------------------------------------------------------------------


def test_dvc_analytics_are_off_in_the_committed_config():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".dvc/config")
    assert cfg.get("core", "analytics", fallback="true").strip().lower() == "false"
