"""Detectors for your own images: fit on a folder of normal images, score new ones.

Python (scikit-learn's estimator shape: settings in the constructor, :meth:`~Detector.fit` returns
the detector, what it learned ends in ``_``)::

    from diffpath.cache import PassOptions
    from diffpath.detector import Detector

    det = Detector("models/base", method="diffpathv2", steps=10, run=PassOptions(device="cpu"))
    det.fit(["photos/normal"]).save("my_detector")
    det = Detector.load("my_detector")
    det.score_samples(["photos/new"])       # (N,) log-density, higher = more normal
    det.predict(["photos/new"])             # (N,) +1 normal, -1 OOD (scikit-learn's outlier convention)
    res = det.score_images(["photos/new"])  # res.paths, res.scores, res.percentiles, res.is_ood

Command line (:mod:`diffpath.cli`)::

    diffpath fit --model models/base --normal photos/normal --out my_detector
    diffpath score --detector my_detector photos/new --out scores.csv --plot scores.png

Settings say *what* is fitted; run options (:class:`~diffpath.cache.PassOptions`: device,
precision, batch and chunk sizes, work folder, progress) say *how* the model pass runs and never
change what is learned: pass them as ``run=`` or change them with :meth:`Detector.set_run`.
Learned: ``scorer_``, ``train_scores_`` (N,), ``train_paths_``, ``threshold_`` and ``meta_`` (the
content of ``detector.json``).

The image arguments are files, folders or globs (:func:`~diffpath.data.files.find_images`); the
returned arrays follow the images that could be read, in that order (an unreadable file is
skipped with a warning, or refused with ``strict``): :meth:`Detector.score_images` names them.

What a score means
------------------
``score`` is the log-density of the image's features under the density fitted on the normal
images (higher = more normal). ``percentile`` is the percentage of the *normal training images*
that score strictly lower. ``is_ood`` is ``score < threshold`` (:mod:`diffpath.scoring.threshold`):
the threshold is the k-th lowest normal score, k = ⌊(1 − accept)·N⌋ (0-based), so that at least
``accept``·N of the normal images are accepted (``accept`` = 0.95 by default). :meth:`Detector.
predict` gives −1 exactly where ``is_ood`` holds, +1 elsewhere; :meth:`Detector.decision_function`
is ``score − threshold_`` (negative = OOD).

Fitting needs at least :data:`MIN_IMAGES` readable normal images: 3 for a GMM scorer (its
cross-validation needs at least 2 folds whose training part holds at least 2 images), 2 for a
KDE. Far more (hundreds) are needed for a meaningful threshold.

The detector folder (format version 2: ``detector.json``, ``scorer.npz``, ``train_scores.npz``,
no pickle) is described in :mod:`diffpath.detector_folder`.

Robustness
----------
Unreadable files are skipped with an :class:`~diffpath.data.files.ImageSkippedWarning` (or refused
with ``strict``); an input with no images, an incompatible detector, a changed model and non-finite
features (named by file) are errors. The detector folder is written into a temporary folder beside
the target and renamed into place (:func:`diffpath.io.atomic_folder`). A resumable model pass keeps
its work in the run options' ``work_dir`` (:mod:`diffpath.workarea`: locked against a second run,
reused only when it provably belongs to this run, removed on success).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffpath.cache.config import DEFAULT_STEPS, CacheConfig, PassOptions
from diffpath.data.files import LoadedImages, NoImagesError, Preprocessing, find_images, load_images
from diffpath.detector_folder import (FORMAT, FORMAT_VERSION, DetectorError, detector_meta, read_folder,
                                      write_folder)
from diffpath.io import InputError
from diffpath.scoring.threshold import check_accept, percentiles, threshold_at
from diffpath.workarea import data_key, work_area

if TYPE_CHECKING:
    from diffpath.methods.registry import Method
    from diffpath.models import EpsModel

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

Images = str | os.PathLike | Sequence[str | os.PathLike]
_SETTINGS = ("model", "method", "steps", "seed", "clip_denoised", "resize", "alpha", "accept",
             "scorer_params", "strict")


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


def _is_ood(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool: the one rule of what is OOD."""
    return scores < threshold


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


class Detector:
    """An OOD detector on a pretrained diffusion model: fit on normal images, score new ones.

    Args:
        model: a model spec (diffusers folder, improved-diffusion ``.pt``, hub id) or a loaded
            :class:`~diffpath.models.EpsModel` (its ``spec`` is stored).
        method: a method of :mod:`diffpath.methods.registry` (default ``diffpathv2``).
        steps, seed, clip_denoised: feature settings (:class:`~diffpath.cache.CacheConfig`).
        resize, alpha: preprocessing (:class:`~diffpath.data.files.Preprocessing`).
        accept: fraction of normal images the fitted threshold accepts (at least).
        scorer_params: keyword arguments of the scorer (default: the method's scorer with its
            defaults; the GMM grid shrinks with a warning on small sets).
        strict: fail on an unreadable file instead of skipping it.
        run: how the model pass runs (:class:`~diffpath.cache.PassOptions`; default: its defaults).
    """

    def __init__(
        self,
        model: EpsModel | str | os.PathLike | None = None,
        *,
        method: str = "diffpathv2",
        steps: int = DEFAULT_STEPS,
        seed: int = 0,
        clip_denoised: bool = True,
        resize: str = "auto",
        alpha: str = "composite",
        accept: float = 0.95,
        scorer_params: dict[str, Any] | None = None,
        strict: bool = False,
        run: PassOptions | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.steps = steps
        self.seed = seed
        self.clip_denoised = clip_denoised
        self.resize = resize
        self.alpha = alpha
        self.accept = accept
        self.scorer_params = scorer_params
        self.strict = strict
        self.run = run if run is not None else PassOptions()
        self._loaded: tuple[tuple[Any, ...], EpsModel] | None = None

    # -- settings and run options ------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """The settings (the constructor's arguments except ``run``)."""
        return {k: getattr(self, k) for k in _SETTINGS}

    def set_params(self, **params: Any) -> Detector:
        """Change settings (a fitted detector keeps what it learned until it is refitted; a new
        ``model`` is checked against the fitted fingerprint when it scores)."""
        unknown = sorted(set(params) - set(_SETTINGS))
        if unknown:
            raise ValueError(f"unknown Detector settings {unknown}; settings: {', '.join(_SETTINGS)}")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def set_run(self, run: PassOptions | None = None, **changes: Any) -> Detector:
        """Set the run options: ``run`` (default: the current ones) with ``changes`` applied, e.g.
        ``det.set_run(device="cpu", work_dir="w")``."""
        self.run = replace(run if run is not None else self.run, **changes)
        return self

    def check_settings(self) -> CacheConfig:
        """Check the settings and run options without any work (``ValueError`` on a bad one, e.g.
        ``steps`` < 2 or an unknown method); returns the :class:`CacheConfig` :meth:`fit` runs."""
        from diffpath.methods.registry import get_method

        family = get_method(self.method).family
        check_accept(self.accept)
        return _cache_config({"family": family, "steps": self.steps, "seed": self.seed,
                              "clip_denoised": self.clip_denoised}, self.run)

    # -- learned views -----------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "train_scores_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this Detector is not fitted yet: call fit(images), or Detector.load(path)")

    @property
    def preprocessing(self) -> Preprocessing:
        """The fitted preprocessing (model size and channels, resize, alpha)."""
        self._check_fitted()
        return Preprocessing.from_dict(self.meta_["preprocessing"])

    def threshold_for(self, accept: float | None = None) -> float:
        """The threshold accepting at least ``accept`` of the normal training images (default: the
        fitted ``threshold_``). The one place a threshold is computed from scores."""
        self._check_fitted()
        return self.threshold_ if accept is None else threshold_at(self.train_scores_, accept)

    def percentiles(self, scores: np.ndarray) -> np.ndarray:
        """(M,) percentage of normal training images scoring strictly lower than each of
        ``scores`` (M,)."""
        self._check_fitted()
        return percentiles(self.train_scores_, scores)

    def __repr__(self) -> str:
        spec = getattr(self.model, "spec", self.model) if self.model is not None else None
        spec = str(spec) if spec is not None else None
        text = f"Detector(model={spec!r}, method={self.method!r}, steps={self.steps}"
        if hasattr(self, "train_scores_"):
            text += (f"; fitted on {len(self.train_scores_)} images, threshold_={self.threshold_:.6g} "
                     f"@ accept={self.meta_['threshold']['accept']}")
        return text + ")"

    # -- model -------------------------------------------------------------------------------

    def check_model(self, model: EpsModel) -> None:
        """Raise :class:`DetectorError` unless ``model`` has the fitted model's fingerprint."""
        self._check_fitted()
        want = self.meta_["model"]["fingerprint"]
        got = model.fingerprint()
        if got != want:
            raise DetectorError(
                f"the model at {getattr(model, 'spec', '?')} no longer matches this detector "
                f"(fingerprint {got}, fitted with {want}): its weights or settings "
                "changed. Refit with `diffpath fit`, or pass the original model with --model"
            )

    def _spec(self) -> str:
        """The spec to load: ``model``, or the fitted model's absolute path when ``model`` is the
        stored spec and no longer exists as given (another working folder)."""
        meta = getattr(self, "meta_", None)
        if self.model is None:
            if meta is not None:
                raise DetectorError("this detector was fitted on a model built in Python (no spec "
                                    "was stored): pass the model (set_params(model=...) / --model)")
            raise ValueError("no model: give a model spec or a loaded EpsModel")
        spec = os.fspath(self.model)
        resolved = meta["model"].get("resolved") if meta is not None else None
        if meta is not None and spec == meta["model"]["spec"] and not Path(spec).exists() \
                and resolved and Path(resolved).exists():
            return resolved
        return spec

    def _eps_model(self, *, fitted: bool) -> EpsModel:
        """``model`` itself when loaded, else loaded from its spec with the run options (once per
        spec, device and network options); checked against the fitted fingerprint if ``fitted``."""
        model = self.model
        if model is None or isinstance(model, (str, os.PathLike)):
            spec = self._spec()
            key = (spec, self.run.device, tuple(self.run.network_params().items()))
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # release the previous model first
                self._loaded = (key, self.run.load_model(spec))
            model = self._loaded[1]
        if fitted:
            self.check_model(model)
        return model

    # -- fitting -----------------------------------------------------------------------------

    def fit(self, images: Images) -> Detector:
        """Fit on normal images (files, folders or globs): the model pass, the scorer on their
        features, the threshold. Returns the detector."""
        from diffpath.methods.registry import get_method
        from diffpath.scoring.scorers import make_scorer

        cfg = self.check_settings()
        method = get_method(self.method)
        scorer = make_scorer(method.scorer, **(self.scorer_params or {}))
        paths = find_images(images)
        _check_enough(len(paths), method.scorer, "normal images found")
        model = self._eps_model(fitted=False)
        prep = Preprocessing(size=int(model.image_size), channels=int(model.channels),
                             resize=self.resize, alpha=self.alpha)
        fp = model.fingerprint()
        with self._model_pass(model, paths, prep, cfg, method, fp, need=method.scorer) as (loaded, feats):
            fitted = scorer.fit(feats)
            train_scores = np.asarray(fitted.score_samples(feats), dtype=np.float64)
            if not np.all(np.isfinite(train_scores)):
                raise FeatureError("the scorer gives non-finite scores to normal images "
                                   f"{_name_files(loaded.paths, ~np.isfinite(train_scores))}")
        self.scorer_, self.train_scores_ = fitted, train_scores
        self.train_paths_ = [str(p) for p in loaded.paths]
        accept = check_accept(self.accept)
        self.threshold_ = self.threshold_for(accept)
        given = self.model if isinstance(self.model, (str, os.PathLike)) else getattr(model, "spec", "")
        self.meta_ = detector_meta(model=model, spec=os.fspath(given), fingerprint=fp, prep=prep,
                                   method=method, cfg=cfg, dims=int(feats.shape[1]), scorer=fitted,
                                   train_scores=train_scores, loaded=loaded, accept=accept,
                                   threshold=self.threshold_)
        return self

    @contextmanager
    def _model_pass(self, model: EpsModel, paths: Sequence[Path], prep: Preprocessing, cfg: CacheConfig,
                    method: Method, fingerprint: str, need: str | None = None
                    ) -> Iterator[tuple[LoadedImages, np.ndarray]]:
        """Read ``paths`` and run the model pass (resumable in the run's ``work_dir``); yields the
        images read and their features (N, D) inside the work area, so that an interruption in the
        caller's block keeps the finished pass. ``need``: a scorer kind whose minimum number of
        readable images is checked."""
        wd = Path(self.run.work_dir) if self.run.work_dir is not None else None
        with work_area(wd) as state:
            loaded = load_images(paths, prep, strict=self.strict, progress=self.run.progress,
                                 buffer=(wd / "x0.npy") if wd is not None else None)
            if need is not None:
                _check_enough(len(loaded), need, "readable normal images")
            yield loaded, _features(model, loaded, cfg, method, fingerprint, prep, state, self.run.progress)

    # -- scoring -----------------------------------------------------------------------------

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) log-density of feature rows (N, D) under the fitted scorer."""
        self._check_fitted()
        return np.asarray(self.scorer_.score_samples(features), dtype=np.float64)

    def _score(self, images: Images) -> tuple[LoadedImages, np.ndarray]:
        from diffpath.methods.registry import get_method

        self._check_fitted()
        paths = find_images(images)
        model = self._eps_model(fitted=True)
        f = self.meta_["features"]
        with self._model_pass(model, paths, self.preprocessing, _cache_config(f, self.run),
                              get_method(f["method"]), self.meta_["model"]["fingerprint"]) as (loaded, feats):
            scores = self.score_features(feats)
        return loaded, scores

    def score_samples(self, images: Images) -> np.ndarray:
        """(N,) log-density of each readable image (higher = more normal)."""
        return self._score(images)[1]

    def decision_function(self, images: Images) -> np.ndarray:
        """(N,) ``score − threshold_``: negative for OOD images."""
        return self.score_samples(images) - self.threshold_for()

    def predict(self, images: Images) -> np.ndarray:
        """(N,) int: −1 for OOD images (``score < threshold_``), +1 for normal ones, as
        scikit-learn's outlier detectors."""
        return np.where(_is_ood(self.score_samples(images), self.threshold_for()), -1, 1)

    def score_images(self, images: Images, *, accept: float | None = None) -> ScoreResult:
        """Scores, percentiles and OOD flags of images (files, folders or globs), with their
        paths and the files skipped. ``accept``: another accept fraction for ``is_ood`` than the
        fitted one."""
        thr = self.threshold_for(accept)
        acc = float(self.meta_["threshold"]["accept"]) if accept is None else check_accept(accept)
        loaded, scores = self._score(images)
        return ScoreResult(
            paths=[str(p) for p in loaded.paths],
            scores=scores,
            percentiles=self.percentiles(scores),
            is_ood=_is_ood(scores, thr),
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
        self._check_fitted()
        path, self.meta_ = write_folder(path, self.meta_, self.scorer_, self.train_scores_,
                                        self.train_paths_)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, run: PassOptions | None = None) -> Detector:
        """Read a detector folder (its format version, the scorer file's checksum and every stored
        array are checked; nothing is unpickled), with the settings it was fitted with."""
        meta, scorer, train_scores, train_paths = read_folder(path)
        f, prep = meta["features"], meta["preprocessing"]
        det = cls(meta["model"]["spec"] or None, method=f["method"], steps=int(f["steps"]),
                  seed=int(f["seed"]), clip_denoised=bool(f["clip_denoised"]),
                  resize=prep.get("resize", "auto"), alpha=prep.get("alpha", "composite"),
                  accept=float(meta["threshold"]["accept"]), run=run)
        det.scorer_, det.train_scores_, det.train_paths_, det.meta_ = scorer, train_scores, train_paths, meta
        det.threshold_ = float(meta["threshold"]["value"])
        return det


# ----------------------------------------------------------------------------------------------
# helpers


def _cache_config(features: Mapping[str, Any], run: PassOptions) -> CacheConfig:
    """The model pass of a detector's features (``detector.json``'s ``features`` section, or the
    settings before a fit), in the run's batch and chunk sizes."""
    from diffpath.methods.diffpathv2 import ScoreErrorConfig

    f = features
    return CacheConfig(
        families=(f["family"],),
        steps=f["steps"],
        clip_denoised=bool(f["clip_denoised"]),
        v2_timesteps=f.get("v2_timesteps", "diffpath"),
        score_error=ScoreErrorConfig(seed=f["seed"], noise_key=f.get("noise_key", "content"),
                                     clip_x0_hat=bool(f.get("clip_x0_hat", False))),
        batch_size=run.batch_size,
        chunk_size=run.chunk_size,
    )


def _name_files(paths: Sequence[Path], bad: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(bad)
    names = ", ".join(str(paths[i]) for i in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return names + more


def _features(model: EpsModel, loaded: LoadedImages, cfg: CacheConfig, method: Method, fingerprint: str,
              prep: Preprocessing, state: dict[str, Any], progress: bool) -> np.ndarray:
    """The model pass over ``loaded.x0`` (N, C, H, W) (resumable under ``state["dir"]``, where a
    finished pass is kept until the work area goes) and the method's features (N, D), checked
    finite."""
    from diffpath.cache import compute_cache

    key = data_key(loaded.paths, loaded.x0, {"model": fingerprint, "prep": prep.to_dict()})
    out = state["dir"] / "features.npz" if state.get("dir") is not None else None
    state["phase"] = "pass"  # from here on, an interruption leaves resumable chunks
    cache = compute_cache(model, loaded.x0, cfg, out=out, data_key=key, progress=progress,
                          keep_finished=True)
    assert cache is not None
    state["phase"] = "after"
    feats = method.features(cache)
    bad = ~np.all(np.isfinite(feats), axis=1)
    if bad.any():
        raise FeatureError(
            f"the features of {int(bad.sum())} of {len(feats)} images are not finite (NaN/inf): "
            f"{_name_files(loaded.paths, bad)}; is the model (or the input) broken?"
        )
    return feats
