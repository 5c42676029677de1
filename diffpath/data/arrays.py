"""Image arrays in ``.npz`` files (``diffpath features --images``, torchrun's ``--x0``): checked
from their headers before any pixel is read.

``x0``: float, (B, C, H, W) in [-1, 1] at the model's size and channels; ``images``: uint8,
(B, H, W) or (B, H, W, C) with C in 1, 3, 4, each frame at most
:data:`diffpath.data.files.MAX_PIXELS` pixels, converted with :func:`diffpath.data.to_model_input`.
A file whose header declares another shape, dtype or size is refused without decompressing it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from diffpath.data import files as _files
from diffpath.data.preprocess import to_model_input
from diffpath.io import InputError, npz_headers, read_npz_checked

__all__ = ["load_images_npz"]


def load_images_npz(path: str | os.PathLike, channels: int, size: int) -> np.ndarray:
    """Read model inputs from an ``.npz``: ``x0`` (float, B×C×H×W in [-1, 1]) or ``images``
    (uint8, B×H×W or B×H×W×C, converted with :func:`diffpath.data.to_model_input`). Shapes and
    dtypes are checked from the arrays' headers before any pixel is read; an ``images`` frame may
    hold at most :data:`diffpath.data.files.MAX_PIXELS` pixels.

    Returns:
        (B, C, size, size) float32 in [-1, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # a .npy file holds one bare array
        raise InputError(f"{path}: not an .npz archive (a bare .npy array?); save the images with "
                         "np.savez(path, x0=...) or np.savez(path, images=...)")
    try:
        heads = npz_headers(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if "x0" in heads:
        shape, dtype = heads["x0"]
        if dtype.kind != "f":
            raise InputError(f"{path}: x0 must be a float array, got {dtype}")
        if len(shape) != 4 or shape[1] != channels or shape[2:] != (size, size):
            raise InputError(f"{path}: x0 has shape {shape}; the model wants (B, {channels}, {size}, {size})")
        x = read_npz_checked(path, {"x0": ("f", (None, channels, size, size))})["x0"]
        if not np.all(np.isfinite(x)):
            raise InputError(f"{path}: x0 holds NaN or inf values")
        lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
        if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
            raise InputError(f"{path}: x0 must lie in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]")
        return x.astype(np.float32, copy=False)
    if "images" in heads:
        return _load_uint8_images(path, *heads["images"], size=size, channels=channels)
    raise InputError(f"{path}: expected an array named 'x0' or 'images', found {sorted(heads)}")


def _load_uint8_images(path: Path, shape: tuple[int, ...], dtype: np.dtype, *, size: int,
                       channels: int) -> np.ndarray:
    """The ``images`` array (header ``shape``, ``dtype`` already read) as model inputs."""
    if dtype != np.uint8:
        raise InputError(f"{path}: images must be uint8, got {dtype}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        raise InputError(f"{path}: images has shape {shape}; expected B×H×W or B×H×W×C (C in 1, 3, 4)")
    if shape[1] * shape[2] > _files.MAX_PIXELS:
        raise InputError(f"{path}: images of {shape[2]}×{shape[1]} pixels are over the pixel limit of "
                         f"{_files.MAX_PIXELS} (diffpath.data.files.MAX_PIXELS)")
    imgs = read_npz_checked(path, {"images": ("u", (None,) * len(shape))})["images"]
    return to_model_input(imgs, size=size, channels=channels)
