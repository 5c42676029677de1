"""Detectors for your own images: fit on a folder of normal images, score new ones.

Python::

    from diffpath.detector import Detector

    det = Detector.fit("models/base", ["photos/normal"], method="diffpathv2", steps=10)
    det.save("my_detector")
    det = Detector.load("my_detector")
    res = det.score_images(["photos/new"])      # res.paths, res.scores, res.percentiles, res.is_ood

Command line::

    diffpath fit --model models/base --normal photos/normal --out my_detector
    diffpath score --detector my_detector photos/new --out scores.csv --plot scores.png

What a score means
------------------
``score`` is the log-density of the image's features under the density fitted on the normal
images (higher = more normal). ``percentile`` is the percentage of the *normal training images*
that score strictly lower. ``is_ood`` is ``score < threshold``, where the threshold is the k-th
lowest normal score, k = ⌊(1 − accept)·N⌋ (0-based) over the N normal images, so that at least
``accept``·N of the normal images score at or above it and are accepted (``accept`` = 0.95 by
default; ``--accept`` at fit time stores the default, at score time overrides it).

The detector folder (format version 1)
--------------------------------------
============================  ==============================================================
``detector.json``             everything needed to reproduce the scores: format and diffpath
                              versions, the model (spec as given, absolute path, fingerprint),
                              the preprocessing (size, channels, resize, alpha), the features
                              (method, family, steps, seed, clip, noise keying), the scorer
                              (kind, parameters, chosen hyper-parameters, sklearn version, file
                              sha256), the training scores' 101 quantiles and the threshold
``scorer.joblib``             the fitted scikit-learn estimator (joblib pickle: **load only
                              detectors you trust**, as with any pickle)
``train_scores.npz``          ``scores`` (N,) float64 and ``paths`` (N,) of the normal images
============================  ==============================================================

The **model fingerprint** is the SHA-256 of the model's weight files (``*.safetensors`` /
``*.bin`` of a diffusers UNet folder, the improved-diffusion ``.pt``; by file name, so a moved
folder still matches) and of its settings (UNet and scheduler configs without diffusers' ``_*``
bookkeeping keys, image size, channels, timestep scaling). Scoring refuses a model whose fingerprint
differs from the one the detector was fitted with.

Robustness
----------
Unreadable files are skipped with an :class:`~diffpath.data.files.ImageSkippedWarning` (or refused
with ``strict``); an input with no images, an incompatible detector, a changed model and non-finite
features (named by file) are errors. The detector folder is written into a temporary folder beside
the target and renamed into place; nothing is left behind by a failed run, except the *work folder*
of an interrupted model pass (``DETECTOR_DIR.work/`` for ``fit``, ``OUT.work/`` for ``score``):
rerunning the same command resumes from its finished chunks (keyed by the files, their decoded
pixels, the model fingerprint and the feature settings), and it is removed on success.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from diffpath.data.files import (
    RESIZE_MODES,
    ImageSkippedWarning,
    NoImagesError,
    Preprocessing,
    find_images,
    load_images,
)
from diffpath.io import InputError, atomic_path, write_text_atomic

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DetectorError",
    "FeatureError",
    "Detector",
    "ScoreResult",
    "model_fingerprint",
    "threshold_at",
    "plot_scores",
    "add_cli_commands",
]

FORMAT = "diffpath-detector"
FORMAT_VERSION = 1
META_FILE = "detector.json"
SCORER_FILE = "scorer.joblib"
SCORES_FILE = "train_scores.npz"
_DETECTOR_FILES = {META_FILE, SCORER_FILE, SCORES_FILE}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class DetectorError(ValueError):
    """A detector folder that cannot be used (missing, incompatible, corrupt, or its model changed)."""


class FeatureError(InputError):
    """Features that are not finite (NaN/inf): a broken model or input; names the files."""


# ----------------------------------------------------------------------------------------------
# model fingerprint


def _sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _clean_settings(obj: Any) -> Any:
    """Settings without diffusers' bookkeeping keys (``_name_or_path``, ``_diffusers_version``...)."""
    if isinstance(obj, dict):
        return {str(k): _clean_settings(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean_settings(v) for v in obj]
    return obj


def _weight_files(model: Any) -> list[Path]:
    spec = Path(str(getattr(model, "spec", "") or ""))
    kind = getattr(model, "kind", "")
    if kind == "improved-diffusion" and spec.is_file():
        return [spec]
    if kind == "diffusers" and spec.is_dir():
        unet_dir = spec / "unet" if (spec / "unet").is_dir() else spec
        return sorted(p for p in unet_dir.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return []


def model_fingerprint(model: Any) -> dict[str, Any]:
    """Identity of a loaded :class:`~diffpath.models.EpsModel`.

    Returns ``{"sha256": <hex>, "files": {name: sha256}, "settings_sha256": <hex>}``. Weight
    files are hashed by name (not path); a model with no weight file on disk (built in Python) is
    hashed by its parameters' bytes instead.
    """
    settings = {
        "kind": getattr(model, "kind", ""),
        "image_size": int(model.image_size),
        "channels": int(model.channels),
        "timestep_scale": float(getattr(model, "timestep_scale", 1.0)),
        "settings": _clean_settings(getattr(model, "settings", {}) or {}),
    }
    settings_sha = hashlib.sha256(
        json.dumps(settings, sort_keys=True, default=str).encode()
    ).hexdigest()
    files = {p.name: _sha256_file(p) for p in _weight_files(model)}
    if not files:
        h = hashlib.sha256()
        for name, t in sorted(model.net.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        files = {"<state_dict>": h.hexdigest()}
    total = hashlib.sha256(
        json.dumps({"files": files, "settings": settings_sha}, sort_keys=True).encode()
    ).hexdigest()
    return {"sha256": total, "files": files, "settings_sha256": settings_sha}


# ----------------------------------------------------------------------------------------------
# thresholds and percentiles


def _check_accept(accept: float) -> float:
    accept = float(accept)
    if not (0.0 < accept <= 1.0):
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    return accept


def threshold_at(train_scores: np.ndarray, accept: float) -> float:
    """The k-th lowest training score, k = ⌊(1 − accept)·N⌋: at least ``accept``·N of the
    training scores are ≥ it (accepted as normal)."""
    s = np.sort(np.asarray(train_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no training scores")
    k = int(math.floor((1.0 - _check_accept(accept)) * len(s) + 1e-9))
    return float(s[min(k, len(s) - 1)])


# ----------------------------------------------------------------------------------------------
# the work folder of a resumable pass


@contextmanager
def _work_area(path: Path | None):
    """Create ``path`` and remove it on success. On failure it is kept only when it may save work:
    during the model pass (finished chunks), after it on an interruption (the finished pass), and
    before it when it already existed (an earlier interrupted run's chunks)."""
    if path is None:
        yield {"phase": "before", "dir": None}
        return
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"phase": "before", "dir": path}
    try:
        yield state
    except BaseException as exc:
        phase = state["phase"]
        keep = (
            (phase == "before" and existed)
            or phase == "pass"
            or (phase == "after" and isinstance(exc, KeyboardInterrupt))
        )
        if not keep:
            shutil.rmtree(path, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)


def _data_key(paths: Sequence[Path], x0: np.ndarray, extra: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(os.path.abspath(p).encode() + b"\0")
    step = 4096
    for s in range(0, len(x0), step):
        h.update(np.ascontiguousarray(x0[s : s + step]).tobytes())
    return h.hexdigest()


def _name_files(paths: Sequence[Path], bad: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(bad)
    names = ", ".join(str(paths[i]) for i in idx[:limit])
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return names + more


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    from diffpath import __version__

    return {
        "diffpath": __version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class ScoreResult:
    """Scores of a batch of images.

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
        """``path,score,percentile,is_ood`` (floats in shortest round-trip form; true/false)."""
        buf = io.StringIO()
        import csv

        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "score", "percentile", "is_ood"])
        for p, s, q, o in zip(self.paths, self.scores, self.percentiles, self.is_ood):
            w.writerow([p, repr(float(s)), repr(float(q)), "true" if o else "false"])
        return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the detector


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
    def method(self):
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
        """Percentage of normal training images scoring strictly lower than each score."""
        s = np.sort(self.train_scores)
        return 100.0 * np.searchsorted(s, np.asarray(scores, np.float64), side="left") / len(s)

    def cache_config(self, *, batch_size: int = 128, chunk_size: int = 1024):
        from diffpath.study.cache import CacheConfig

        f = self.meta["features"]
        return CacheConfig(
            families=(f["family"],),
            steps=int(f["steps"]),
            clip_denoised=bool(f["clip_denoised"]),
            v2_timesteps=f.get("v2_timesteps", "diffpath"),
            seed=int(f["seed"]),
            noise_key=f.get("noise_key", "content"),
            clip_x0_hat=bool(f.get("clip_x0_hat", False)),
            batch_size=batch_size,
            chunk_size=chunk_size,
        )

    def __repr__(self) -> str:
        m = self.meta
        return (f"Detector(method={m['features']['method']!r}, model={m['model']['spec']!r}, "
                f"n_train={m['training']['n_images']}, threshold={self.threshold:.6g} "
                f"@ accept={self.accept})")

    # -- model -------------------------------------------------------------------------------

    def check_model(self, model: Any) -> None:
        """Raise :class:`DetectorError` unless ``model`` has the detector's fingerprint."""
        want = self.meta["model"]["fingerprint"]["sha256"]
        got = model_fingerprint(model)["sha256"]
        if got != want:
            raise DetectorError(
                f"the model at {getattr(model, 'spec', '?')} no longer matches this detector "
                f"(fingerprint {got[:12]}, fitted with {want[:12]}): its weights or settings "
                "changed. Refit with `diffpath fit`, or pass the original model with --model"
            )

    def load_model(self, spec: str | os.PathLike | None = None, *, device: str = "auto",
                   precision: str = "fp32"):
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
        model: Any,
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
        accept = _check_accept(accept)
        scorer = make_scorer(m.scorer, **(scorer_params or {}))
        paths = find_images(normal)
        if isinstance(model, (str, os.PathLike)):
            spec_given = os.fspath(model)
            model = load_model(spec_given, device=resolve_device(device),
                               options=RunOptions(precision=precision))
        else:
            spec_given = str(getattr(model, "spec", ""))
        prep = Preprocessing(size=int(model.image_size), channels=int(model.channels), resize=resize,
                             alpha=alpha)
        fp = model_fingerprint(model)
        from diffpath.study.cache import CacheConfig

        cfg = CacheConfig(families=(m.family,), steps=steps, clip_denoised=clip_denoised, seed=seed,
                          noise_key="content", batch_size=batch_size, chunk_size=chunk_size)
        wd = Path(work_dir) if work_dir is not None else None
        with _work_area(wd) as state:
            loaded = load_images(paths, prep, strict=strict, progress=progress,
                                 buffer=(wd / "x0.npy") if wd is not None else None)
            if len(loaded) < 2:
                raise NoImagesError(f"need at least 2 readable normal images to fit, got {len(loaded)}")
            feats = _features(model, loaded.x0, loaded.paths, cfg, m, fp["sha256"], prep, state, progress)
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
                "noise_key": cfg.noise_key,
                "clip_x0_hat": bool(cfg.clip_x0_hat),
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
                "sha256": None,  # filled in by save()
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
        """Log-density of feature rows (N, D) under the fitted scorer."""
        return np.asarray(self.scorer.score_samples(features), dtype=np.float64)

    def score_images(
        self,
        inputs: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        model: Any = None,
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
        acc = self.accept if accept is None else _check_accept(accept)
        paths = find_images(inputs)
        if model is None or isinstance(model, (str, os.PathLike)):
            model = self.load_model(model, device=device, precision=precision)
        else:
            self.check_model(model)
        prep = self.preprocessing
        cfg = self.cache_config(batch_size=batch_size, chunk_size=chunk_size)
        m = self.method
        wd = Path(work_dir) if work_dir is not None else None
        with _work_area(wd) as state:
            loaded = load_images(paths, prep, strict=strict, progress=progress,
                                 buffer=(wd / "x0.npy") if wd is not None else None)
            fp = self.meta["model"]["fingerprint"]["sha256"]
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

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the detector folder atomically (temporary folder beside it, then rename).

        An existing detector folder at ``path`` is replaced; any other existing, non-empty path
        is refused.
        """
        import joblib

        path = Path(os.path.abspath(path))  # "." or "dir/.." have no usable name
        if path.exists():
            _check_replaceable(path)
        parent = path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a detector is not
            joblib.dump(self.scorer, tmp / SCORER_FILE)
            np.savez(tmp / SCORES_FILE, scores=self.train_scores.astype(np.float64),
                     paths=np.asarray(self.train_paths, dtype=str))
            meta = json.loads(json.dumps(self.meta, default=_json_default))
            meta["scorer"]["sha256"] = _sha256_file(tmp / SCORER_FILE)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if path.exists():
                old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.meta = meta
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Detector:
        """Read a detector folder; checks its format version and the scorer file's checksum."""
        import joblib

        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise DetectorError(f"{path}: not a diffpath detector (no {META_FILE}); create one "
                                "with `diffpath fit`")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as exc:
            raise DetectorError(f"{meta_file}: unreadable ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DetectorError(f"{path}: {META_FILE} is not a diffpath detector description")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            from diffpath import __version__

            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise DetectorError(
                f"{path}: detector format version {version} is not supported by diffpath "
                f"{__version__} (it reads version {FORMAT_VERSION}); "
                + ("upgrade diffpath" if newer else "refit it with `diffpath fit`")
            )
        try:
            scorer_file = path / meta["scorer"]["file"]
            want = meta["scorer"].get("sha256")
            if want and _sha256_file(scorer_file) != want:
                raise DetectorError(f"{scorer_file}: checksum differs from {META_FILE} (corrupt or "
                                    "replaced); refit the detector")
            saved_sk = meta["scorer"].get("sklearn_version")
            import sklearn

            if saved_sk and saved_sk != sklearn.__version__:
                warnings.warn(f"{path}: scorer fitted with scikit-learn {saved_sk}, loading with "
                              f"{sklearn.__version__}; scores may differ slightly", UserWarning,
                              stacklevel=2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn's InconsistentVersionWarning: said above
                scorer = joblib.load(scorer_file)
            with np.load(path / SCORES_FILE, allow_pickle=False) as z:
                train_scores = np.asarray(z["scores"], np.float64)
                train_paths = [str(p) for p in z["paths"]] if "paths" in z.files else []
        except DetectorError:
            raise
        except Exception as exc:
            raise DetectorError(f"{path}: cannot read the detector ({type(exc).__name__}: {exc})") from exc
        if train_scores.ndim != 1 or len(train_scores) == 0:
            raise DetectorError(f"{path}: {SCORES_FILE} holds no training scores")
        return cls(meta=meta, scorer=scorer, train_scores=train_scores, train_paths=train_paths)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, tuple)):
        return str(o) if isinstance(o, Path) else list(o)
    return str(o)


def _check_replaceable(path: Path) -> None:
    if not path.is_dir():
        raise DetectorError(f"{path} exists and is not a folder; refusing to overwrite it")
    names = {p.name for p in path.iterdir()}
    if names and not (META_FILE in names and names <= _DETECTOR_FILES):
        raise DetectorError(f"{path} exists and is not a diffpath detector folder; refusing to "
                            "overwrite it (choose another --out)")


def _features(model, x0, paths, cfg, method, fingerprint: str, prep: Preprocessing,
              state: dict[str, Any], progress: bool) -> np.ndarray:
    """The model pass (resumable under ``state["dir"]``) and the method's features, checked finite."""
    from diffpath.study.cache import compute_cache

    key = _data_key(paths, x0, {"model": fingerprint, "prep": prep.to_dict()})
    out = state["dir"] / "features.npz" if state.get("dir") is not None else None
    state["phase"] = "pass"  # from here on, an interruption leaves resumable chunks
    cache = _reuse_finished(out, cfg.fingerprint(model, len(x0), key))
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


def _reuse_finished(out: Path | None, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The finished cache of an earlier run that stopped after its model pass, if it matches."""
    if out is None or not out.is_file():
        return None
    try:
        from diffpath.study.cache import load_cache

        cache = load_cache(out)
        if json.loads(str(cache["meta"])).get("fingerprint") == fingerprint:
            return cache
    except Exception:  # unreadable or foreign: recompute
        pass
    return None


# ----------------------------------------------------------------------------------------------
# plot


def plot_scores(train_scores: np.ndarray, scores: np.ndarray, threshold: float, *,
                accept: float = 0.95, title: str = "", fmt: str = "png") -> bytes:
    """Histogram of the normal training scores vs the scored images, with the threshold line.

    Scores far below the normal range (log-densities of OOD images can be huge negatives) are
    pooled at the left edge, and their count is written on the plot. Returns the image bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tr = np.asarray(train_scores, np.float64)
    sc = np.asarray(scores, np.float64)
    lo_t, hi_t = float(np.min(tr)), float(np.max(tr))
    span = max(hi_t - lo_t, 1e-6)
    finite = sc[np.isfinite(sc)]
    lo = min(lo_t, float(finite.min()) if finite.size else lo_t)
    lo = max(lo, lo_t - 3 * span)
    hi = max(hi_t, float(finite.max()) if finite.size else hi_t)
    hi = min(hi, hi_t + 3 * span)
    clipped = int(np.sum(~(sc >= lo)))
    bins = np.linspace(lo, hi, 41)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)  # the Agg backend, whatever pyplot uses
    ax = fig.add_subplot()
    ax.hist(np.clip(tr, lo, hi), bins=bins, alpha=0.55, density=True, label=f"normal (fit), n={len(tr)}",
            color="tab:blue")
    if len(sc):
        ax.hist(np.clip(np.nan_to_num(sc, neginf=lo, posinf=hi), lo, hi), bins=bins, alpha=0.55,
                density=True, label=f"scored, n={len(sc)}", color="tab:orange")
    ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold (accepts {accept:.0%} of normal)")
    if clipped:
        ax.annotate(f"{clipped} below {lo:.4g} (at the edge)", xy=(0.01, 0.95), xycoords="axes fraction",
                    va="top", fontsize=8)
    ax.set_xlabel("score (log-density; lower = more out-of-distribution)")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left" if not clipped else "center left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# command line


def _work_dir_for(out: Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".work")


@contextmanager
def _cli_warnings():
    """Show warnings (skipped files, the GMM grid shrinking...) as one ``diffpath: warning:`` line."""
    from tqdm.auto import tqdm

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        tqdm.write(f"diffpath: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter("always", ImageSkippedWarning)
        warnings.showwarning = show
        yield


def _report_kept_work(wd: Path) -> None:
    if wd.exists():
        print(f"diffpath: partial work kept in {wd}; rerun the same command to resume", file=sys.stderr)


def _cmd_fit(args: argparse.Namespace) -> None:
    from diffpath.methods.registry import get_method

    get_method(args.method)  # an unknown method fails before any work
    out = Path(args.out)
    if out.exists():
        _check_replaceable(out)
    if args.steps < 2:
        raise ValueError("--steps must be at least 2")
    if args.batch_size < 1 or args.chunk_size < 1:
        raise ValueError("--batch-size and --chunk-size must be positive")
    _check_accept(args.accept)
    wd = _work_dir_for(out)
    with _cli_warnings():
        paths = find_images(args.normal)
        try:
            det = Detector.fit(
                args.model, paths, method=args.method, steps=args.steps, seed=args.seed,
                clip_denoised=not args.no_clip, resize=args.resize, accept=args.accept,
                strict=args.strict, device=args.device, precision=args.precision,
                batch_size=args.batch_size, chunk_size=args.chunk_size, work_dir=wd,
                progress=not args.no_progress,
            )
        except BaseException:
            _report_kept_work(wd)
            raise
        det.save(out)
    t = det.meta["training"]
    print(f"wrote {out}: {t['n_images']} normal images ({t['n_skipped']} skipped), method "
          f"{det.meta['features']['method']}, threshold {det.threshold:.6g} accepts "
          f"{det.accept:.0%} of them", file=sys.stderr)


def _cmd_score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a .csv file")
    plot = Path(args.plot) if args.plot else None
    fmt = None
    if plot is not None:
        fmt = plot.suffix.lower().lstrip(".")
        if fmt not in ("png", "pdf", "svg"):
            raise ValueError(f"--plot must end in .png, .pdf or .svg, got {plot}")
    if args.accept is not None:
        _check_accept(args.accept)
    if args.batch_size < 1 or args.chunk_size < 1:
        raise ValueError("--batch-size and --chunk-size must be positive")
    det = Detector.load(args.detector)
    wd = _work_dir_for(out)
    with _cli_warnings():
        mine = {os.path.abspath(p) for p in (out, plot) if p is not None}
        paths = [p for p in find_images(args.images) if os.path.abspath(p) not in mine]
        if not paths:
            raise NoImagesError("no images to score (only this command's own outputs matched)")
        try:
            res = det.score_images(
                paths, model=args.model, accept=args.accept, strict=args.strict, device=args.device,
                precision=args.precision, batch_size=args.batch_size, chunk_size=args.chunk_size,
                work_dir=wd, progress=not args.no_progress,
            )
        except BaseException:
            _report_kept_work(wd)
            raise
    png = None
    if plot is not None:
        png = plot_scores(det.train_scores, res.scores, res.threshold, accept=res.accept,
                          title=f"{Path(args.detector).name}: {det.meta['features']['method']}",
                          fmt=fmt or "png")
    write_text_atomic(out, res.to_csv())
    if plot is not None and png is not None:
        with atomic_path(plot) as tmp:
            Path(tmp).write_bytes(png)
    n_ood = int(res.is_ood.sum())
    print(f"wrote {out}: {len(res.paths)} images scored ({len(res.skipped)} skipped), {n_ood} flagged "
          f"OOD at threshold {res.threshold:.6g} (accepts {res.accept:.0%} of normal images)"
          + (f"; plot {plot}" if plot else ""), file=sys.stderr)


def add_cli_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``fit``, ``score`` and ``export-images`` on the ``diffpath`` command line."""
    from diffpath.data.files import add_export_arguments, run_export
    from diffpath.methods.registry import METHODS

    f = sub.add_parser("fit", help="fit a detector on a folder of normal images",
                       description="Compute features of normal images and fit the density scorer; "
                       "writes a self-describing detector folder.")
    f.add_argument("--model", required=True, help="diffusers folder, improved-diffusion .pt, or hub id")
    f.add_argument("--normal", required=True, nargs="+", metavar="DIR_OR_GLOB",
                   help="normal images: folders (recursive), globs or files")
    f.add_argument("--method", default="diffpathv2", help=f"one of: {', '.join(METHODS)} (diffpathv2)")
    f.add_argument("--out", required=True, metavar="DETECTOR_DIR", help="the detector folder to write")
    f.add_argument("--steps", type=int, default=10, help="timesteps / DDIM steps (10)")
    f.add_argument("--seed", type=int, default=0, help="seed of DiffPathV2's noise (0)")
    f.add_argument("--no-clip", action="store_true", help="do not clip x̂0 on the DiffPath path")
    f.add_argument("--resize", default="auto", choices=RESIZE_MODES,
                   help="how images reach the model's size (auto)")
    f.add_argument("--accept", type=float, default=0.95,
                   help="fraction of normal images the stored threshold accepts (0.95)")
    f.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    f.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk (1024)")
    add_common(f)
    f.set_defaults(handler=_cmd_fit)

    s = sub.add_parser("score", help="score images with a fitted detector",
                       description="Write path,score,percentile,is_ood for each image.")
    s.add_argument("--detector", required=True, metavar="DETECTOR_DIR", help="a folder written by fit")
    s.add_argument("images", nargs="+", metavar="IMAGES_OR_DIRS", help="images, folders or globs")
    s.add_argument("--out", required=True, help="the CSV to write")
    s.add_argument("--plot", default=None, help="also draw the score histogram (.png, .pdf, .svg)")
    s.add_argument("--accept", type=float, default=None,
                   help="fraction of normal images to accept (default: the detector's, 0.95)")
    s.add_argument("--model", default=None,
                   help="use this model instead of the detector's (its fingerprint must match)")
    s.add_argument("--strict", action="store_true", help="fail on an unreadable file instead of skipping it")
    s.add_argument("--chunk-size", type=int, default=1024, help="images per resumable chunk (1024)")
    add_common(s)
    s.set_defaults(handler=_cmd_score)

    e = sub.add_parser("export-images", help="write a data set's images as files (offline demo data)")
    add_export_arguments(e)
    e.set_defaults(handler=run_export)
