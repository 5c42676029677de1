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
Learned: ``scorer_`` (fitted on ``fit_paths_``), ``calibration_scores_`` (n,) and
``calibration_paths_`` (the held-out normal images), ``threshold_`` and ``meta_`` (the content of
``detector.json``).

The image arguments are files, folders or globs (:func:`~diffpath.data.files.find_images`); the
returned arrays follow the images that could be read, in that order (an unreadable file is
skipped with a warning, or refused with ``strict``): :meth:`Detector.score_images` names them.

What a score and the threshold mean (split-conformal, :mod:`diffpath.scoring.threshold`), why half
of the normal images calibrate it, the folder's checks and what happens to unreadable input:
docs/detector.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffpath.cache.config import DEFAULT_STEPS, CacheConfig, PassOptions
from diffpath.data.files import LoadedImages, NoImagesError, Preprocessing, find_images, load_images
from diffpath.detector_folder import (FORMAT, FORMAT_VERSION, DetectorError, detector_meta, read_folder,
                                      write_folder)
from diffpath.detector_pass import FeatureError, cache_config, features, name_files
from diffpath.detector_result import ScoreResult, csv_path
from diffpath.scoring.threshold import (calibration_size, calibration_split, check_accept, check_calibration,
                                       conformal_rank, guarantee, min_calibration, percentiles, threshold_at)
from diffpath.workarea import work_area

if TYPE_CHECKING:
    from diffpath.methods.registry import Method
    from diffpath.models import EpsModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MIN_FIT",
    "Detector",
    "DetectorError",
    "FeatureError",
    "ScoreResult",
    "csv_path",
    "min_images",
    "threshold_at",
]

#: The fewest normal images the scorer is fitted on, by scorer kind (one more, at least, calibrates
#: the threshold: :func:`min_images`).
MIN_FIT: dict[str, int] = {"gmm": 3, "kde": 2}
#: The default share of the normal images held out to calibrate the threshold (see the docstring).
CALIBRATION = 0.5

Images = str | os.PathLike | Sequence[str | os.PathLike]
_SETTINGS = ("model", "method", "steps", "seed", "clip_denoised", "resize", "alpha", "accept",
             "calibration", "scorer_params", "strict")


def min_images(scorer_kind: str, calibration: float = CALIBRATION) -> int:
    """The fewest normal images a fit needs: :data:`MIN_FIT` for the scorer after the
    ``calibration`` share (at least one image) is held out for the threshold."""
    n = MIN_FIT.get(scorer_kind, 2) + 1
    while n - calibration_size(n, calibration) < MIN_FIT.get(scorer_kind, 2):
        n += 1
    return n


def _check_enough(n: int, scorer_kind: str, calibration: float, what: str) -> None:
    need = min_images(scorer_kind, calibration)
    if n < need:
        why = (" (its cross-validation needs at least 2 folds whose training part holds at least "
               "2 images)" if scorer_kind == "gmm" else "")
        raise NoImagesError(f"need at least {need} readable normal images: {MIN_FIT.get(scorer_kind, 2)} "
                            f"to fit a {scorer_kind} scorer{why} and the rest to calibrate its threshold "
                            f"(calibration {calibration:g}), got {n} {what}; hundreds give a far "
                            "steadier threshold")


def _is_ood(scores: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) bool: the one rule of what is OOD."""
    return scores < threshold


class Detector:
    """An OOD detector on a pretrained diffusion model: fit on normal images, score new ones.

    Args:
        model: a model spec (diffusers folder, improved-diffusion ``.pt``, hub id) or a loaded
            :class:`~diffpath.models.EpsModel` (its ``spec`` is stored).
        method: a method of :mod:`diffpath.methods.registry` (default ``diffpathv2``).
        steps, seed, clip_denoised: feature settings (:class:`~diffpath.cache.CacheConfig`).
        resize, alpha: preprocessing (:class:`~diffpath.data.files.Preprocessing`).
        accept: the fitted threshold accepts a new normal image with probability at least
            ⌈accept·(n + 1)⌉/(n + 1) ≥ ``accept`` (n calibration images; see the module docstring).
        calibration: the share of the normal images held out to calibrate the threshold (0.5).
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
        calibration: float = CALIBRATION,
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
        self.calibration = calibration
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
        check_calibration(self.calibration)
        return cache_config({"family": family, "steps": self.steps, "seed": self.seed,
                              "clip_denoised": self.clip_denoised}, self.run)

    # -- learned views -----------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "calibration_scores_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this Detector is not fitted yet: call fit(images), or Detector.load(path)")

    @property
    def preprocessing(self) -> Preprocessing:
        """The fitted preprocessing (model size and channels, resize, alpha)."""
        self._check_fitted()
        return Preprocessing.from_dict(self.meta_["preprocessing"])

    def threshold_for(self, accept: float | None = None) -> float:
        """The split-conformal threshold at ``accept`` from the calibration scores (default: the
        fitted ``threshold_``; ``-inf`` when there are too few of them to flag anything). The one
        place a threshold is computed from scores."""
        self._check_fitted()
        return self.threshold_ if accept is None else threshold_at(self.calibration_scores_, accept)

    def guarantee(self, accept: float | None = None) -> float:
        """The lower bound ⌈accept·(n + 1)⌉/(n + 1) on P(a new normal image is accepted)."""
        self._check_fitted()
        acc = float(self.meta_["threshold"]["accept"]) if accept is None else accept
        return guarantee(len(self.calibration_scores_), acc)

    def percentiles(self, scores: np.ndarray) -> np.ndarray:
        """(M,) percentage of the calibration (held-out normal) images scoring strictly lower than
        each of ``scores`` (M,)."""
        self._check_fitted()
        return percentiles(self.calibration_scores_, scores)

    def __repr__(self) -> str:
        spec = getattr(self.model, "spec", self.model) if self.model is not None else None
        spec = str(spec) if spec is not None else None
        text = f"Detector(model={spec!r}, method={self.method!r}, steps={self.steps}"
        if hasattr(self, "calibration_scores_"):
            text += (f"; fitted on {len(self.fit_paths_)} images, calibrated on "
                     f"{len(self.calibration_scores_)}, threshold_={self.threshold_:.6g} "
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
        prep = self.preprocessing
        if (int(model.image_size), int(model.channels)) != (prep.size, prep.channels):
            raise DetectorError(
                f"this detector's preprocessing makes {prep.channels}×{prep.size}×{prep.size} inputs, "
                f"but its model takes {model.channels}×{model.image_size}×{model.image_size}: "
                "detector.json was changed; refit with `diffpath fit`")

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
        """Fit on normal images (files, folders or globs): the model pass, the scorer on the fit
        part of their features, the split-conformal threshold on the held-out calibration part.
        Returns the detector."""
        from diffpath.methods.registry import get_method
        from diffpath.scoring.scorers import make_scorer

        cfg = self.check_settings()
        method = get_method(self.method)
        scorer = make_scorer(method.scorer, **(self.scorer_params or {}))
        skipped: list[tuple[Path, str]] = []
        paths = find_images(images, strict=self.strict, skipped=skipped)
        _check_enough(len(paths), method.scorer, self.calibration, "normal images found")
        model = self._eps_model(fitted=False)
        prep = Preprocessing(size=int(model.image_size), channels=int(model.channels),
                             resize=self.resize, alpha=self.alpha)
        fp = model.fingerprint()
        with self._model_pass(model, paths, prep, cfg, method, fp, skipped, need=method.scorer) as (loaded, feats):
            fit_idx, cal_idx = calibration_split(len(loaded), self.calibration, self.seed)
            fitted = scorer.fit(feats[fit_idx])
            cal_scores = np.asarray(fitted.score_samples(feats[cal_idx]), dtype=np.float64)
            if not np.all(np.isfinite(cal_scores)):
                bad = ~np.isfinite(cal_scores)
                raise FeatureError("the scorer gives non-finite scores to normal images "
                                   f"{name_files([loaded.paths[i] for i in cal_idx], bad)}")
        self.scorer_, self.calibration_scores_ = fitted, cal_scores
        self.calibration_paths_ = [str(loaded.paths[i]) for i in cal_idx]
        self.fit_paths_ = [str(loaded.paths[i]) for i in fit_idx]
        accept = check_accept(self.accept)
        self.threshold_ = self.threshold_for(accept)
        _warn_if_no_threshold(len(cal_scores), accept)
        given = self.model if isinstance(self.model, (str, os.PathLike)) else getattr(model, "spec", "")
        self.meta_ = detector_meta(model=model, spec=os.fspath(given), fingerprint=fp, prep=prep,
                                   method=method, cfg=cfg, dims=int(feats.shape[1]), scorer=fitted,
                                   loaded=loaded, n_fit=len(fit_idx), calibration_scores=cal_scores,
                                   calibration=check_calibration(self.calibration), accept=accept)
        return self

    @contextmanager
    def _model_pass(self, model: EpsModel, paths: Sequence[Path], prep: Preprocessing, cfg: CacheConfig,
                    method: Method, fingerprint: str, skipped: list[tuple[Path, str]], need: str | None = None
                    ) -> Iterator[tuple[LoadedImages, np.ndarray]]:
        """Read ``paths`` and run the model pass (resumable in the run's ``work_dir``); yields the
        images read (``skipped``: what was skipped finding them, counted first) and their features
        (N, D) inside the work area, so that an interruption in the caller's block keeps the
        finished pass. ``need``: a scorer kind whose minimum number of readable images is checked."""
        wd = Path(self.run.work_dir) if self.run.work_dir is not None else None
        with work_area(wd) as state:
            buffer = (wd / "x0.f32") if wd is not None else None
            if buffer is not None:
                state["scratch"].append(buffer)  # decoded again by every run: never resumed
            loaded = load_images(paths, prep, strict=self.strict, progress=self.run.progress, buffer=buffer)
            loaded.skipped[:0] = skipped
            if need is not None:
                _check_enough(len(loaded), need, self.calibration, "readable normal images")
            yield loaded, features(model, loaded, cfg, method, fingerprint, prep, state, self.run.progress)

    # -- scoring -----------------------------------------------------------------------------

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """(N,) log-density of feature rows (N, D) under the fitted scorer."""
        self._check_fitted()
        return np.asarray(self.scorer_.score_samples(features), dtype=np.float64)

    def _score(self, images: Images) -> tuple[LoadedImages, np.ndarray]:
        from diffpath.methods.registry import get_method

        self._check_fitted()
        skipped: list[tuple[Path, str]] = []
        paths = find_images(images, strict=self.strict, skipped=skipped)
        model = self._eps_model(fitted=True)
        f = self.meta_["features"]
        with self._model_pass(model, paths, self.preprocessing, cache_config(f, self.run),
                              get_method(f["method"]), self.meta_["model"]["fingerprint"],
                              skipped) as (loaded, feats):
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
        path, self.meta_ = write_folder(path, self.meta_, self.scorer_, self.calibration_scores_,
                                        self.calibration_paths_, self.fit_paths_)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, run: PassOptions | None = None) -> Detector:
        """Read a detector folder, with the settings it was fitted with: every field of
        ``detector.json`` and every array is checked before use (:mod:`diffpath.detector_schema`,
        :func:`~diffpath.detector_folder.read_folder`); nothing is unpickled."""
        folder = read_folder(path)
        m = folder.parsed
        f, prep = m.features, m.preprocessing
        det = cls(m.model.spec or None, method=f.method, steps=f.steps, seed=f.seed,
                  clip_denoised=f.clip_denoised, resize=prep.resize, alpha=prep.alpha,
                  accept=m.threshold.accept, calibration=m.training.fraction, run=run)
        det.scorer_, det.calibration_scores_, det.meta_ = folder.scorer, folder.calibration_scores, folder.meta
        det.calibration_paths_, det.fit_paths_ = folder.calibration_paths, folder.fit_paths
        det.threshold_ = m.threshold.value
        return det


# ----------------------------------------------------------------------------------------------
# helpers


def _warn_if_no_threshold(n: int, accept: float) -> None:
    """Warn when n calibration images are too few for a threshold at ``accept`` (rank 0)."""
    if conformal_rank(n, accept) == 0:
        need = min_calibration(accept)
        warnings.warn(f"only {n} calibration images: at accept {accept:g} the threshold flags nothing"
                      + (f" (that needs at least {need} calibration images); give more normal images, or "
                         "a lower accept" if need is not None else " (accept 1)"), UserWarning, stacklevel=3)
