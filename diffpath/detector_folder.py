"""The detector folder on disk: ``detector.json``, ``scorer.npz``, ``train_scores.npz``.

See :mod:`diffpath.detector` for what each file holds. Written atomically
(:func:`diffpath.io.atomic_folder`); read without unpickling anything
(:mod:`diffpath.scoring.persist`). Format version 1 (a pickled ``scorer.joblib``) is refused with
a message to refit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffpath.io import atomic_folder, json_default

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DetectorError",
    "check_replaceable",
    "read_folder",
    "write_folder",
]

FORMAT = "diffpath-detector"
FORMAT_VERSION = 2
META_FILE = "detector.json"
SCORER_FILE = "scorer.npz"
SCORES_FILE = "train_scores.npz"
_DETECTOR_FILES = {META_FILE, SCORER_FILE, SCORES_FILE, "scorer.joblib"}  # (the last: version 1)


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
