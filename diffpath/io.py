"""Small I/O helpers: atomic writes and image-array input checks."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "atomic_path",
    "save_npz_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "load_images_npz",
    "InputError",
]


class InputError(ValueError):
    """Input images that cannot be used (wrong shape, range, dtype, NaNs, missing file)."""


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    On any exception the temporary file is removed and ``target`` is left untouched, so a killed or
    failed run never leaves a half-written file that a pipeline would take as complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):  # mkstemp makes 0600 files; give them the usual permissions
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_npz_atomic(target: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to ``target`` atomically (``target`` should end in ``.npz``)."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
            fh.flush()
            os.fsync(fh.fileno())


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_images_npz(path: str | os.PathLike, channels: int, size: int) -> np.ndarray:
    """Read model inputs from an ``.npz``: ``x0`` (float, B×C×H×W in [-1, 1]) or ``images``
    (uint8, B×H×W or B×H×W×C, converted with :func:`diffpath.data.to_model_input`).

    Returns:
        (B, C, size, size) float32 in [-1, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({exc})") from exc
    with data:
        if "x0" in data.files:
            x = np.asarray(data["x0"])
            if not np.issubdtype(x.dtype, np.floating):
                raise InputError(f"{path}: x0 must be a float array, got {x.dtype}")
            if x.ndim != 4 or x.shape[1] != channels or x.shape[2:] != (size, size):
                raise InputError(
                    f"{path}: x0 has shape {x.shape}; the model wants (B, {channels}, {size}, {size})"
                )
            if not np.all(np.isfinite(x)):
                raise InputError(f"{path}: x0 holds NaN or inf values")
            lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
            if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
                raise InputError(f"{path}: x0 must lie in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]")
            return x.astype(np.float32, copy=False)
        if "images" in data.files:
            imgs = np.asarray(data["images"])
            if imgs.dtype != np.uint8:
                raise InputError(f"{path}: images must be uint8, got {imgs.dtype}")
            if imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[-1] not in (1, 3, 4)):
                raise InputError(
                    f"{path}: images has shape {imgs.shape}; expected B×H×W or B×H×W×C (C in 1, 3, 4)"
                )
            from diffpath.data import to_model_input

            return to_model_input(imgs, size=size, channels=channels)
        raise InputError(f"{path}: expected an array named 'x0' or 'images', found {data.files}")
