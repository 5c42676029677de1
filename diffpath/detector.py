"""Detectors for your own images: fit on a folder of normal images, score new ones.

Python::

    from diffpath.detector import Detector

    det = Detector.fit("models/base", ["photos/normal"], method="diffpathv2", steps=10)
    det.save("my_detector")
    det = Detector.load("my_detector")
    res = det.score_images(["photos/new"])      # res.paths, res.scores, res.percentiles, res.is_ood

Command line (:mod:`diffpath.cli`)::

    diffpath fit --model models/base --normal photos/normal --out my_detector
    diffpath score --detector my_detector photos/new --out scores.csv --plot scores.png

What a score means
------------------
``score`` is the log-density of the image's features under the density fitted on the normal
images (higher = more normal). ``percentile`` is the percentage of the *normal training images*
that score strictly lower. ``is_ood`` is ``score < threshold`` (:mod:`diffpath.scoring.threshold`):
the threshold is the k-th lowest normal score, k = ⌊(1 − accept)·N⌋ (0-based), so that at least
``accept``·N of the normal images are accepted (``accept`` = 0.95 by default).

Fitting needs at least :data:`MIN_IMAGES` readable normal images: 3 for a GMM scorer (its
cross-validation needs at least 2 folds whose training part holds at least 2 images), 2 for a
KDE. Far more (hundreds) are needed for a meaningful threshold.

The detector folder (format version 2)
--------------------------------------
============================  ==============================================================
``detector.json``             everything needed to reproduce the scores: format and diffpath
                              versions, the model (spec as given, absolute path, fingerprint),
                              the preprocessing (size, channels, resize, alpha), the features
                              (method, family, steps, seed, clip, noise keying), the scorer
                              (kind, parameters, chosen hyper-parameters, sklearn version, its
                              arrays' description and the file's sha256), the training scores'
                              101 quantiles and the threshold
``scorer.npz``                the fitted scorer as plain arrays (:mod:`diffpath.scoring.persist`:
                              no pickle; loading cannot run code)
``train_scores.npz``          ``scores`` (N,) float64 and ``paths`` (N,) of the normal images
============================  ==============================================================

Version 1 folders stored the scorer as a pickle (``scorer.joblib``); they are refused with a
message to refit. The **model fingerprint** is the model's own :meth:`~diffpath.models.EpsModel.
fingerprint` (a hash of its weights, noise schedule, sizes and prediction type); scoring refuses a
model whose fingerprint differs from the one the detector was fitted with.

Robustness
----------
Unreadable files are skipped with an :class:`~diffpath.data.files.ImageSkippedWarning` (or refused
with ``strict``); an input with no images, an incompatible detector, a changed model and non-finite
features (named by file) are errors. The detector folder is written into a temporary folder beside
the target and renamed into place (:func:`diffpath.io.atomic_folder`). A resumable model pass keeps
its work in ``work_dir`` (:mod:`diffpath.workarea`: locked against a second run, reused only when
it provably belongs to this run, removed on success).
"""

from __future__ import annotations

import csv
import io
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffpath.data.files import NoImagesError, Preprocessing, find_images, load_images
from diffpath.detector_folder import (
    FORMAT,
    FORMAT_VERSION,
    SCORER_FILE,
    DetectorError,
    read_folder,
    write_folder,
)
from diffpath.io import InputError
from diffpath.scoring.threshold import check_accept, percentiles, threshold_at
from diffpath.workarea import data_key, reuse_finished, work_area

if TYPE_CHECKING:
    from diffpath.methods.registry import Method
    from diffpath.models import EpsModel
    from diffpath.study.cache import CacheConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_IMAGES",
    "Detector",
    "DetectorError",
    "FeatureError",
    "ScoreResult",
    "csv_path",
    "threshold_at",
]

#: The fewest readable normal images :meth:`Detector.fit` accepts, by scorer kind.
MIN_IMAGES: dict[str, int] = {"gmm": 3, "kde": 2}


class FeatureError(InputError):
    """Features that are not finite (NaN/inf): a broken model or input; names the files."""


def _check_enough(n: int, scorer_kind: str, what: str) -> None:
    need = MIN_IMAGES.get(scorer_kind, 2)
    if n < need:
        why = (" (its cross-validation needs at least 2 folds whose training part holds at least "
               "2 images)" if scorer_kind == "gmm" else "")
        raise NoImagesError(f"need at least {need} readable normal images to fit a {scorer_kind} "
                            f"scorer{why}, got {n} {what}; hundreds give a far steadier threshold")


def csv_path(path: str) -> str:
    """``path`` as written to a CSV: bytes of a file name that are not UTF-8 become ``\\xNN``."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class ScoreResult:
    """Scores of a batch of N images.

    Attributes:
        paths: the images that were scored, in input order.
        scores: (N,) log-density (higher = more normal).
        percentiles: (N,) percentage of normal training images scoring strictly lower.
        is_ood: (N,) bool, ``scores < threshold``.
        threshold: the threshold used; accept: the fraction of normals it accepts (at least).
        skipped: (file, reason) of the files that could not be read.
    """

    paths: list[str]
    scores: np.ndarray
    percentiles: np.ndarray
    is_ood: np.ndarray
    threshold: float
    accept: float
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_csv(self) -> str:
        """``path,score,percentile,is_ood`` (floats in shortest round-trip form; true/false). File
        names that are not UTF-8 are written with ``\\xNN`` escapes (:func:`csv_path`)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "score", "percentile", "is_ood"])
        for p, s, q, o in zip(self.paths, self.scores, self.percentiles, self.is_ood):
            w.writerow([csv_path(p), repr(float(s)), repr(float(q)), "true" if o else "false"])
        return buf.getvalue()


@dataclass
class Detector:
    """A fitted detector: metadata (``detector.json``), scorer and training scores.

    Build one with :meth:`fit`, or :meth:`load` a saved one.
    """

    meta: dict[str, Any]
    scorer: Any
    train_scores: np.ndarray
    train_paths: list[str] = field(default_factory=list)

    # -- views of the metadata ---------------------------------------------------------------

    @property
    def method(self) -> Method:
        from diffpath.methods.registry import get_method

        return get_method(self.meta["features"]["method"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])

    @property
    def accept(self) -> float:
        return float(self.meta["threshold"]["accept"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"]["value"])

    def threshold_for(self, accept: float | None = None) -> float:
        """The threshold accepting at least ``accept`` of the normal images (default: stored)."""
        if accept is None:
            return self.threshold
        return threshold_at(self.train_scores, accept)

    def percentiles(self, scores: np.ndarray) -> np.ndarray:
        """(M,) percentage of normal training images scoring strictly lower than each of
        ``scores`` (M,)."""
        return percentiles(self.train_scores, scores)

    def cache_config(self, *, batch_size: int = 128, chunk_size: int = 1024) -> CacheConfig:
        from diffpath.methods.diffpathv2 import ScoreErrorConfig
        from diffpath.study.cache import CacheConfig

        f = self.meta["features"]
        return CacheConfig(
            families=(f["family"],),
            steps=int(f["steps"]),
            clip_denoised=bool(f["clip_denoised"]),
            v2_timesteps=f.get("v2_timesteps", "diffpath"),
            score_error=ScoreErrorConfig(seed=int(f["seed"]), noise_key=f.get("noise_key", "content"),
                                         clip_x0_hat=bool(f.get("clip_x0_hat", False))),
            batch_size=batch_size,
            chunk_size=chunk_size,
        )

    def __repr__(self) -> str:
        m = self.meta
        return (f"Detector(method={m['features']['method']!r}, model={m['model']['spec']!r}, "
                f"n_train={m['training']['n_images']}, threshold={self.threshold:.6g} "
                f"@ accept={self.accept})")

    # -- model -------------------------------------------------------------------------------

    def check_model(self, model: EpsModel) -> None:
        """Raise :class:`DetectorError` unless ``model`` has the detector's fingerprint."""
        want = self.meta["model"]["fingerprint"]
        got = model.fingerprint()
        if got != want:
            raise DetectorError(
                f"the model at {getattr(model, 'spec', '?')} no longer matches this detector "
                f"(fingerprint {got}, fitted with {want}): its weights or settings "
                "changed. Refit with `diffpath fit`, or pass the original model with --model"
            )

    def load_model(self, spec: str | os.PathLike | None = None, *, device: str = "auto",
                   precision: str = "fp32") -> EpsModel:
        """Load the detector's model (or ``spec`` instead) and check its fingerprint."""
        from diffpath.models import RunOptions, load_model, resolve_device

        if spec is None:
            given, resolved = self.meta["model"]["spec"], self.meta["model"].get("resolved")
            if not given:
                raise DetectorError("this detector was fitted on a model built in Python (no spec "
                                    "was stored): pass the model (model=... / --model)")
            spec = given
            if not Path(given).exists() and resolved and Path(resolved).exists():
                spec = resolved
        model = load_model(spec, device=resolve_device(device), options=RunOptions(precision=precision))
        self.check_model(model)
        return model

    # -- fitting -----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        model: EpsModel | str | os.PathLike,
        normal: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        method: str = "diffpathv2",
        steps: int = 10,
        seed: int = 0,
        clip_denoised: bool = True,
        resize: str = "auto",
        alpha: str = "composite",
        accept: float = 0.95,
        strict: bool = False,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 128,
        chunk_size: int = 1024,
        scorer_params: dict[str, Any] | None = None,
        work_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> Detector:
        """Fit a detector on normal images.

        Args:
            model: a model spec (diffusers folder, improved-diffusion ``.pt``, hub id) or a loaded
                :class:`~diffpath.models.EpsModel` (its ``spec`` is stored).
            normal: image files, folders or globs (:func:`~diffpath.data.files.find_images`).
            method: a method of :mod:`diffpath.methods.registry` (default ``diffpathv2``).
            steps, seed, clip_denoised: feature settings (:class:`~diffpath.study.cache.CacheConfig`).
            resize, alpha: preprocessing (:class:`~diffpath.data.files.Preprocessing`).
            accept: fraction of normal images the stored threshold accepts (at least).
            strict: fail on an unreadable file instead of skipping it.
            device, precision, batch_size, chunk_size: how the model pass runs.
            scorer_params: keyword arguments of the scorer (default: the method's scorer with
                its defaults; the GMM grid shrinks with a warning on small sets).
            work_dir: folder of the resumable pass (removed on success); None: in memory.
            progress: tqdm progress bars.
        """
        from diffpath.methods.registry import get_method
        from diffpath.models import RunOptions, load_model, resolve_device
        from diffpath.scoring.scorers import make_scorer

        m = get_method(method)
        if steps < 2:
            raise ValueError("steps must be at least 2")
        if batch_size < 1 or chunk_size < 1:
            raise ValueError("batch size and chunk size must be positive")
        accept = check_accept(accept)
        scorer = make_scorer(m.scorer, **(scorer_params or {}))
        paths = find_images(normal)
        _check_enough(len(paths), m.scorer, "normal images found")
        if isinstance(model, (str, os.PathLike)):
            spec_given = os.fspath(model)
            model = load_model(spec_given, device=resolve_device(device),
                               options=RunOptions(precision=precision))
        else:
            spec_given = str(getattr(model, "spec", ""))
        prep = Preprocessing(size=int(model.image_size), channels=int(model.channels), resize=resize,
                             alpha=alpha)
        fp = model.fingerprint()
        from diffpath.methods.diffpathv2 import ScoreErrorConfig
        from diffpath.study.cache import CacheConfig

        cfg = CacheConfig(families=(m.family,), steps=steps, clip_denoised=clip_denoised,
                          score_error=ScoreErrorConfig(seed=seed, noise_key="content"),
                          batch_size=batch_size, chunk_size=chunk_size)
        wd = Path(work_dir) if work_dir is not None else None
        with work_area(wd) as state:
            loaded = load_images(paths, prep, strict=strict, progress=progress,
                                 buffer=(wd / "x0.npy") if wd is not None else None)
            _check_enough(len(loaded), m.scorer, "readable normal images")
            feats = _features(model, loaded.x0, loaded.paths, cfg, m, fp, prep, state, progress)
            fitted = scorer.fit(feats)
            train_scores = np.asarray(fitted.score_samples(feats), dtype=np.float64)
            if not np.all(np.isfinite(train_scores)):
                raise FeatureError(
                    "the scorer gives non-finite scores to normal images "
                    f"{_name_files(loaded.paths, ~np.isfinite(train_scores))}"
                )
        threshold = threshold_at(train_scores, accept)
        resolved = str(Path(spec_given).resolve()) if spec_given and Path(spec_given).exists() else None
        versions = _versions()
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fitted.get_params().items()}
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "diffpath_version": versions["diffpath"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions,
            "model": {
                "spec": spec_given,
                "resolved": resolved,
                "kind": getattr(model, "kind", ""),
                "image_size": int(model.image_size),
                "channels": int(model.channels),
                "fingerprint": fp,
            },
            "preprocessing": prep.to_dict(),
            "features": {
                "method": m.name,
                "family": m.family,
                "dims": int(feats.shape[1]),
                "steps": int(steps),
                "seed": int(seed),
                "clip_denoised": bool(clip_denoised),
                "noise_key": cfg.score_error.noise_key,
                "clip_x0_hat": bool(cfg.score_error.clip_x0_hat),
                "v2_timesteps": cfg.v2_timesteps,
                "timesteps": [int(t) for t in (cfg.v2_ts(model) if m.family == "diffpathv2"
                                               else cfg.dp_timesteps(model))],
            },
            "scorer": {
                "kind": m.scorer,
                "class": type(fitted).__name__,
                "params": params,
                "best_params": getattr(fitted, "best_params_", None),
                "sklearn_version": versions["sklearn"],
                "file": SCORER_FILE,
                "sha256": None,  # filled in by save(), with the arrays' description
            },
            "training": {
                "n_images": len(loaded),
                "n_skipped": len(loaded.skipped),
                "skipped": [[str(p), r] for p, r in loaded.skipped][:100],
                "score_mean": float(train_scores.mean()),
                "score_std": float(train_scores.std()),
                "quantiles": [float(q) for q in np.quantile(train_scores, np.linspace(0, 1, 101))],
            },
            "threshold": {
                "accept": accept,
                "value": threshold,
                "rule": "k-th lowest normal score, k = floor((1 - accept) * N); is_ood = score < value",
            },
        }
        return cls(meta=meta, scorer=fitted, train_scores=train_scores,
                   train_paths=[str(p) for p in loaded.paths])

    # -- scoring -----------------------------------------------------------------------------

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) log-density of feature rows (N, D) under the fitted scorer."""
        return np.asarray(self.scorer.score_samples(features), dtype=np.float64)

    def score_images(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        model: EpsModel | str | os.PathLike | None = None,
        accept: float | None = None,
        strict: bool = False,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 128,
        chunk_size: int = 1024,
        work_dir: str | os.PathLike | None = None,
        progress: bool = False,
    ) -> ScoreResult:
        """Score image files, folders or globs.

        Args:
            inputs: what to score (:func:`~diffpath.data.files.find_images`).
            model: a loaded model or a spec to use instead of the stored one (its fingerprint must
                match); default: the detector's model.
            accept: override the stored accept fraction for ``is_ood``.
            strict: fail on an unreadable file instead of skipping it.
            work_dir: folder of the resumable pass (removed on success); None: in memory.
        """
        thr = self.threshold_for(accept)
        acc = self.accept if accept is None else check_accept(accept)
        paths = find_images(inputs)
        if model is None or isinstance(model, (str, os.PathLike)):
            model = self.load_model(model, device=device, precision=precision)
        else:
            self.check_model(model)
        prep = self.preprocessing
        cfg = self.cache_config(batch_size=batch_size, chunk_size=chunk_size)
        m = self.method
        wd = Path(work_dir) if work_dir is not None else None
        with work_area(wd) as state:
            loaded = load_images(paths, prep, strict=strict, progress=progress,
                                 buffer=(wd / "x0.npy") if wd is not None else None)
            fp = self.meta["model"]["fingerprint"]
            feats = _features(model, loaded.x0, loaded.paths, cfg, m, fp, prep, state, progress)
            scores = self.score_features(feats)
        return ScoreResult(
            paths=[str(p) for p in loaded.paths],
            scores=scores,
            percentiles=self.percentiles(scores),
            is_ood=scores < thr,
            threshold=thr,
            accept=acc,
            skipped=[(str(p), r) for p, r in loaded.skipped],
        )

    # -- persistence (diffpath.detector_folder) ---------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector folder atomically (temporary folder beside it, then rename).

        An existing detector folder at ``path`` is replaced; any other existing, non-empty path
        is refused.
        """
        path, self.meta = write_folder(path, self.meta, self.scorer, self.train_scores,
                                       self.train_paths)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        """Read a detector folder; checks its format version, the scorer file's checksum and
        every stored array (nothing is unpickled)."""
        meta, scorer, train_scores, train_paths = read_folder(path)
        return cls(meta=meta, scorer=scorer, train_scores=train_scores, train_paths=train_paths)


# ----------------------------------------------------------------------------------------------
# helpers


def _name_files(paths: Sequence[Path], bad: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(bad)
    names = ", ".join(str(paths[i]) for i in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return names + more


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    from diffpath import __version__

    return {"diffpath": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def _features(model: EpsModel, x0: np.ndarray, paths: Sequence[Path], cfg: CacheConfig,
              method: Method, fingerprint: str, prep: Preprocessing, state: dict[str, Any],
              progress: bool) -> np.ndarray:
    """The model pass over x0 (N, C, H, W) (resumable under ``state["dir"]``) and the method's
    features (N, D), checked finite."""
    from diffpath.study.cache import compute_cache

    key = data_key(paths, x0, {"model": fingerprint, "prep": prep.to_dict()})
    out = state["dir"] / "features.npz" if state.get("dir") is not None else None
    state["phase"] = "pass"  # from here on, an interruption leaves resumable chunks
    cache = reuse_finished(out, cfg.fingerprint(model, len(x0), key))
    if cache is None:
        cache = compute_cache(model, x0, cfg, out=out, data_key=key, progress=progress)
    assert cache is not None
    state["phase"] = "after"
    feats = method.features(cache)
    bad = ~np.all(np.isfinite(feats), axis=1)
    if bad.any():
        raise FeatureError(
            f"the features of {int(bad.sum())} of {len(feats)} images are not finite (NaN/inf): "
            f"{_name_files(paths, bad)}; is the model (or the input) broken?"
        )
    return feats
