"""The folder of a fitted :class:`~diffpath.detector.Detector` on disk.

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

Written atomically (:func:`diffpath.io.atomic_folder`); read without unpickling anything
(:mod:`diffpath.scoring.persist`). :func:`detector_meta` builds ``detector.json`` after a fit.
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

from diffpath.io import atomic_folder, json_default

if TYPE_CHECKING:
    from diffpath.cache.config import CacheConfig
    from diffpath.data.files import LoadedImages, Preprocessing
    from diffpath.methods.registry import Method
    from diffpath.models import EpsModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DetectorError",
    "check_replaceable",
    "detector_meta",
    "read_folder",
    "write_folder",
]

FORMAT = "diffpath-detector"
FORMAT_VERSION = 2
META_FILE = "detector.json"
SCORER_FILE = "scorer.npz"
SCORES_FILE = "train_scores.npz"
_DETECTOR_FILES = {META_FILE, SCORER_FILE, SCORES_FILE, "scorer.joblib"}  # (the last: version 1)
#: How the threshold is chosen (stored in ``detector.json``).
THRESHOLD_RULE = "k-th lowest normal score, k = floor((1 - accept) * N); is_ood = score < value"


class DetectorError(ValueError):
    """A detector folder that cannot be used (missing, incompatible, corrupt, or its model changed)."""


def write_folder(path: str | os.PathLike, meta: dict[str, Any], scorer: Any, train_scores: np.ndarray,
                 train_paths: list[str]) -> tuple[Path, dict[str, Any]]:
    """Write a detector folder at ``path`` atomically; ``train_scores`` (N,), ``train_paths`` (N,).

    Returns the absolute path and the metadata as written (with the scorer's arrays described and
    its file's checksum).
    """
    from diffpath.scoring.persist import save_scorer

    path = Path(os.path.abspath(path))  # "." or "dir/.." have no usable name
    if path.exists():
        check_replaceable(path)
    with atomic_folder(path) as tmp:
        desc = save_scorer(scorer, tmp / SCORER_FILE)
        np.savez(tmp / SCORES_FILE, scores=np.asarray(train_scores, np.float64),
                 paths=np.asarray(train_paths, dtype=str))
        meta = json.loads(json.dumps(meta, default=json_default))
        meta["scorer"].update(file=SCORER_FILE, arrays=desc, sha256=_sha256_file(tmp / SCORER_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path, meta


def read_folder(path: str | os.PathLike) -> tuple[dict[str, Any], Any, np.ndarray, list[str]]:
    """Read a detector folder: (meta, scorer, train_scores (N,), train_paths (N,)).

    Raises:
        DetectorError: not a detector, another format version, a changed scorer file, bad arrays.
    """
    from diffpath.scoring.persist import load_scorer

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

        if version == 1:
            raise DetectorError(
                f"{path}: detector format version 1 stores its scorer as a pickle, which can run "
                f"code when loaded, and diffpath {__version__} no longer reads it; refit it with "
                "`diffpath fit`")
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise DetectorError(
            f"{path}: detector format version {version} is not supported by diffpath "
            f"{__version__} (it reads version {FORMAT_VERSION}); "
            + ("upgrade diffpath" if newer else "refit it with `diffpath fit`")
        )
    try:
        sc = meta["scorer"]
        if sc.get("file") != SCORER_FILE or not isinstance(sc.get("sha256"), str):
            raise DetectorError(f"{path}: {META_FILE} names no {SCORER_FILE} with a checksum; "
                                "refit the detector")
        scorer_file = path / SCORER_FILE
        if _sha256_file(scorer_file) != sc["sha256"]:
            raise DetectorError(f"{scorer_file}: checksum differs from {META_FILE} (corrupt or "
                                "replaced); refit the detector")
        scorer = load_scorer(scorer_file, sc.get("arrays") or {})
        if not isinstance(meta["model"]["fingerprint"], str):
            raise DetectorError(f"{path}: {META_FILE} holds no model fingerprint")
        with np.load(path / SCORES_FILE, allow_pickle=False) as z:
            train_scores = np.asarray(z["scores"], np.float64)
            train_paths = [str(p) for p in z["paths"]] if "paths" in z.files else []
    except DetectorError:
        raise
    except Exception as exc:
        raise DetectorError(f"{path}: cannot read the detector ({type(exc).__name__}: {exc})") from exc
    if train_scores.ndim != 1 or len(train_scores) == 0:
        raise DetectorError(f"{path}: {SCORES_FILE} holds no training scores")
    return meta, scorer, train_scores, train_paths


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
                  cfg: CacheConfig, dims: int, scorer: Any, train_scores: np.ndarray, loaded: LoadedImages,
                  accept: float, threshold: float) -> dict[str, Any]:
    """``detector.json`` of a fit: the model (``spec`` as given, its absolute path, ``fingerprint``),
    preprocessing, features (``cfg``, ``dims``), scorer, training scores (N,) of the ``loaded``
    images and the threshold; the scorer's arrays and checksum are added by :func:`write_folder`."""
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
        "training": {
            "n_images": len(loaded),
            "n_skipped": len(loaded.skipped),
            "skipped": [[str(p), r] for p, r in loaded.skipped][:100],
            "score_mean": float(train_scores.mean()),
            "score_std": float(train_scores.std()),
            "quantiles": [float(q) for q in np.quantile(train_scores, np.linspace(0, 1, 101))],
        },
        "threshold": {"accept": accept, "value": threshold, "rule": THRESHOLD_RULE},
    }


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
