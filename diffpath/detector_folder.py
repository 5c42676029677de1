"""The folder of a fitted :class:`~diffpath.detector.Detector` on disk.

The detector folder (format version 3)
--------------------------------------
============================  ==============================================================
``detector.json``             everything needed to reproduce the scores: format and diffpath
                              versions, the model (spec as given, absolute path, fingerprint),
                              the preprocessing (size, channels, resize, alpha), the features
                              (method, family, steps, seed, clip, noise keying), the scorer
                              (kind, parameters, chosen hyper-parameters, sklearn version, its
                              arrays' description and the file's sha256), the training set
                              (N images: n_fit for the scorer, n_calibration for the threshold),
                              the calibration scores' 101 quantiles and the threshold (accept,
                              rank, value, its guarantee)
``scorer.npz``                the fitted scorer as plain arrays (:mod:`diffpath.scoring.persist`:
                              no pickle; loading cannot run code)
``calibration.npz``           ``scores`` (n_calibration,) float64 and ``paths`` of the held-out
                              calibration images; ``fit_paths`` (n_fit,) of the scorer's images
============================  ==============================================================

The threshold is split-conformal (:mod:`diffpath.scoring.threshold`): the scorer is fitted on one
part of the normal images and the threshold is an order statistic of the *other* part's scores.
Version 2 folders calibrated it on the scorer's own training images (it flagged about three times
as many normal images as it promised) and version 1 folders stored the scorer as a pickle; both
are refused with a message to refit. The **model fingerprint** is the model's own
:meth:`~diffpath.models.EpsModel.fingerprint` (a hash of its weights, noise schedule, sizes and
prediction type); scoring refuses a model whose fingerprint differs from the one the detector was
fitted with.

Reading checks everything before use (:mod:`diffpath.detector_schema` for the JSON): each
``.npz`` member's header (dtype, shape: the sizes ``detector.json`` declares) before its data, the
scorer file's checksum, finite calibration scores, and the threshold against them. Written
atomically (:func:`diffpath.io.atomic_folder`); read without unpickling anything.
:func:`detector_meta` builds ``detector.json`` after a fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffpath.detector_schema import DetectorError, DetectorMeta, parse_meta
from diffpath.io import InputError, atomic_folder, json_default, read_npz_checked

if TYPE_CHECKING:
    from diffpath.cache.config import CacheConfig
    from diffpath.data.files import LoadedImages, Preprocessing
    from diffpath.methods.registry import Method
    from diffpath.models import EpsModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DetectorError",
    "Folder",
    "check_replaceable",
    "detector_meta",
    "read_folder",
    "write_folder",
]

FORMAT = "diffpath-detector"
FORMAT_VERSION = 3
META_FILE = "detector.json"
SCORER_FILE = "scorer.npz"
CALIBRATION_FILE = "calibration.npz"
#: Files a detector folder may hold (the last two: versions 1 and 2), so it may be replaced.
_DETECTOR_FILES = {META_FILE, SCORER_FILE, CALIBRATION_FILE, "train_scores.npz", "scorer.joblib"}
_MAX_META_BYTES = 10 << 20
#: How the threshold is chosen (stored in ``detector.json``).
THRESHOLD_RULE = ("split-conformal: the k-th lowest of the n calibration scores, k = floor((1 - accept) * "
                  "(n + 1)) (k = 0: none); is_ood = score < value; P(a new normal image is accepted) "
                  ">= ceil(accept * (n + 1)) / (n + 1)")


class Folder:
    """A detector folder as read: ``meta`` (the JSON), ``parsed`` (:class:`DetectorMeta`),
    ``scorer``, ``calibration_scores`` (n,), ``calibration_paths`` (n,), ``fit_paths``."""

    def __init__(self, meta: dict[str, Any], parsed: DetectorMeta, scorer: Any,
                 calibration_scores: np.ndarray, calibration_paths: list[str], fit_paths: list[str]):
        self.meta, self.parsed, self.scorer = meta, parsed, scorer
        self.calibration_scores = calibration_scores
        self.calibration_paths, self.fit_paths = calibration_paths, fit_paths


def write_folder(path: str | os.PathLike, meta: dict[str, Any], scorer: Any, calibration_scores: np.ndarray,
                 calibration_paths: list[str], fit_paths: list[str]) -> tuple[Path, dict[str, Any]]:
    """Write a detector folder at ``path`` atomically; ``calibration_scores`` (n,),
    ``calibration_paths`` (n,), ``fit_paths`` (the scorer's images).

    Returns the absolute path and the metadata as written (with the scorer's arrays described and
    its file's checksum).
    """
    from diffpath.scoring.persist import save_scorer

    path = Path(os.path.abspath(path))  # "." or "dir/.." have no usable name
    if path.exists():
        check_replaceable(path)
    with atomic_folder(path) as tmp:
        desc = save_scorer(scorer, tmp / SCORER_FILE)
        np.savez(tmp / CALIBRATION_FILE, scores=np.asarray(calibration_scores, np.float64),
                 paths=np.asarray(calibration_paths, dtype=str), fit_paths=np.asarray(fit_paths, dtype=str))
        meta = json.loads(json.dumps(meta, default=json_default))
        meta["scorer"].update(file=SCORER_FILE, arrays=desc, sha256=_sha256_file(tmp / SCORER_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path, meta


def _read_meta(path: Path) -> dict[str, Any]:
    """``detector.json``: present, not huge, JSON, of this format and version."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise DetectorError(f"{path}: not a diffpath detector (no {META_FILE}); create one "
                            "with `diffpath fit`")
    try:
        if meta_file.stat().st_size > _MAX_META_BYTES:
            raise DetectorError(f"{meta_file}: over {_MAX_META_BYTES >> 20} MB; not a detector description")
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if isinstance(exc, DetectorError):
            raise
        raise DetectorError(f"{meta_file}: unreadable ({' '.join(str(exc).split())})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DetectorError(f"{path}: {META_FILE} is not a diffpath detector description")
    _check_version(meta.get("format_version"), path)
    return meta


def _check_version(version: Any, path: Path) -> None:
    from diffpath import __version__

    if not isinstance(version, int) or isinstance(version, bool):
        raise DetectorError(f"{path / META_FILE}: format_version must be an integer, got {version!r}")
    if version == FORMAT_VERSION:
        return
    why = {1: "stores its scorer as a pickle, which can run code when loaded",
           2: "calibrated its threshold on the images its scorer was fitted on, so it flags about "
              "three times as many normal images as it promises"}.get(version)
    if why is not None:
        raise DetectorError(f"{path}: detector format version {version} {why}; diffpath {__version__} "
                            f"reads version {FORMAT_VERSION}: refit it with `diffpath fit`")
    newer = version > FORMAT_VERSION
    raise DetectorError(
        f"{path}: detector format version {version} is not supported by diffpath {__version__} (it "
        f"reads version {FORMAT_VERSION}); " + ("upgrade diffpath" if newer else "refit it with `diffpath fit`"))


def read_folder(path: str | os.PathLike) -> Folder:
    """Read a detector folder, checking every value before use (see the module docstring).

    Raises:
        DetectorError: not a detector, another format version, a bad field (named), a changed
            scorer file, arrays whose headers disagree with ``detector.json``, bad scores.
    """
    from diffpath.scoring.persist import ScorerFormatError, load_scorer

    path = Path(path)
    meta = _read_meta(path)
    parsed = parse_meta(meta, path / META_FILE)
    scorer_file = path / SCORER_FILE
    try:
        if _sha256_file(scorer_file) != parsed.scorer_sha256:
            raise DetectorError(f"{scorer_file}: checksum differs from {META_FILE} (corrupt or "
                                "replaced); refit the detector")
        scorer = load_scorer(scorer_file, parsed.scorer_arrays, n_features=parsed.features.dims,
                             n_rows=parsed.training.n_fit)
    except (OSError, ScorerFormatError) as exc:
        raise DetectorError(f"{scorer_file}: {' '.join(str(exc).split())}") from exc
    scores, cal_paths, fit_paths = _read_calibration(path / CALIBRATION_FILE, parsed)
    return Folder(meta, parsed, scorer, scores, cal_paths, fit_paths)


def _read_calibration(file: Path, parsed: DetectorMeta) -> tuple[np.ndarray, list[str], list[str]]:
    """``calibration.npz``: headers checked against the sizes ``detector.json`` declares before any
    data is read; finite scores; the threshold is their rank-th lowest."""
    n_cal, n_fit = parsed.training.n_calibration, parsed.training.n_fit
    try:
        z = read_npz_checked(file, {"scores": ("f", (n_cal,)), "paths": ("U", (n_cal,)),
                                    "fit_paths": ("U", (n_fit,))}, optional=("paths", "fit_paths"))
    except InputError as exc:
        raise DetectorError(f"{exc} (detector.json declares {n_cal} calibration and {n_fit} fit images)") from exc
    scores = np.asarray(z["scores"], np.float64)
    if not np.all(np.isfinite(scores)):
        raise DetectorError(f"{file}: scores holds {int((~np.isfinite(scores)).sum())} NaN or inf values")
    k, value = parsed.threshold.rank, parsed.threshold.value
    if k >= 1 and float(np.sort(scores)[k - 1]) != value:
        raise DetectorError(f"{file.parent / META_FILE}: threshold.value {value!r} is not the rank-{k} "
                            f"calibration score in {file.name}; refit the detector")
    paths = [str(p) for p in z.get("paths", [])]
    return scores, paths, [str(p) for p in z.get("fit_paths", [])]


def check_replaceable(path: Path) -> None:
    """Raise :class:`DetectorError` unless ``path`` is a detector folder (or an empty folder)."""
    if not path.is_dir():
        raise DetectorError(f"{path} exists and is not a folder; refusing to overwrite it")
    names = {p.name for p in path.iterdir()}
    if names and not (META_FILE in names and names <= _DETECTOR_FILES):
        raise DetectorError(f"{path} exists and is not a diffpath detector folder; refusing to "
                            "overwrite it (choose another --out)")


def _sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def detector_meta(*, model: EpsModel, spec: str, fingerprint: str, prep: Preprocessing, method: Method,
                  cfg: CacheConfig, dims: int, scorer: Any, loaded: LoadedImages, n_fit: int,
                  calibration_scores: np.ndarray, calibration: float, accept: float) -> dict[str, Any]:
    """``detector.json`` of a fit: the model (``spec`` as given, its absolute path, ``fingerprint``),
    preprocessing, features (``cfg``, ``dims``), scorer, the ``loaded`` images (``n_fit`` for the
    scorer, the rest for the threshold: ``calibration_scores`` (n,), the ``calibration``
    fraction) and the threshold at ``accept``; the scorer's arrays and checksum are added by
    :func:`write_folder`."""
    versions = _versions()
    timesteps = cfg.v2_ts(model) if method.family == "diffpathv2" else cfg.dp_timesteps(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffpath_version": versions["diffpath"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "model": {
            "spec": spec,
            "resolved": str(Path(spec).resolve()) if spec and Path(spec).exists() else None,
            "kind": getattr(model, "kind", ""),
            "image_size": int(model.image_size),
            "channels": int(model.channels),
            "fingerprint": fingerprint,
        },
        "preprocessing": prep.to_dict(),
        "features": {
            "method": method.name, "family": method.family, "dims": dims, "steps": int(cfg.steps),
            "seed": int(cfg.score_error.seed), "clip_denoised": bool(cfg.clip_denoised),
            "noise_key": cfg.score_error.noise_key, "clip_x0_hat": bool(cfg.score_error.clip_x0_hat),
            "v2_timesteps": cfg.v2_timesteps, "timesteps": [int(t) for t in timesteps],
        },
        "scorer": _scorer_meta(method, scorer, versions["sklearn"]),
        "training": _training_meta(loaded, n_fit, calibration_scores),
        "threshold": _threshold_meta(calibration_scores, calibration, accept),
    }


def _training_meta(loaded: LoadedImages, n_fit: int, cal: np.ndarray) -> dict[str, Any]:
    return {
        "n_images": len(loaded),
        "n_fit": n_fit,
        "n_calibration": len(cal),
        "n_skipped": len(loaded.skipped),
        "skipped": [[str(p), r] for p, r in loaded.skipped][:100],
        "calibration_score_mean": float(cal.mean()),
        "calibration_score_std": float(cal.std()),
        "calibration_quantiles": [float(q) for q in np.quantile(cal, np.linspace(0, 1, 101))],
    }


def _threshold_meta(cal: np.ndarray, calibration: float, accept: float) -> dict[str, Any]:
    from diffpath.scoring.threshold import conformal_rank, guarantee, threshold_at

    n = len(cal)
    value = threshold_at(cal, accept)
    return {"accept": accept, "calibration": calibration, "rank": conformal_rank(n, accept),
            "value": value if np.isfinite(value) else None, "guarantee": guarantee(n, accept),
            "rule": THRESHOLD_RULE}


def _scorer_meta(method: Method, scorer: Any, sklearn_version: str) -> dict[str, Any]:
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in scorer.get_params().items()}
    return {
        "kind": method.scorer,
        "class": type(scorer).__name__,
        "params": params,
        "best_params": getattr(scorer, "best_params_", None),
        "sklearn_version": sklearn_version,
        "file": SCORER_FILE,
        "sha256": None,  # filled in by save(), with the arrays' description
    }


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    from diffpath import __version__

    return {"diffpath": __version__, "sklearn": sklearn.__version__, "numpy": np.__version__,
            "torch": torch.__version__, "python": platform.python_version()}
