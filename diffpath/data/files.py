"""Image files in, model inputs out: the one place that turns a user's files into ``x0``.

:func:`find_images` (:mod:`diffpath.data.discover`) expands folders and globs into a sorted
list of files; :func:`read_image`
decodes one file into uint8 pixels; :func:`preprocess` turns those pixels into the model's input.
A :class:`Preprocessing` names the whole recipe (size, channels, resize mode, alpha handling) and
is saved with a detector, so that ``diffpath fit`` and ``diffpath score`` run the *same* function
on every image. :func:`load_images` does all three for a list of files, skipping (with a warning)
or refusing (``strict``) files that cannot be read.

Formats and colour modes, alpha, the resize modes and the size limit (:data:`MAX_PIXELS`): docs/images.md.
Demo images: ``diffpath export-images`` (:mod:`diffpath.data.export`).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffpath.data.discover import (IMAGE_EXTENSIONS, ImageReadError, ImageSkippedWarning, NoImagesError,
                                    find_images, regular_file_problem)
from diffpath.io import RowFile

__all__ = [
    "ALPHA_MODES",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "RESIZE_MODES",
    "ImageReadError",
    "ImageSkippedWarning",
    "LoadedImages",
    "NoImagesError",
    "Preprocessing",
    "find_images",
    "load_images",
    "preprocess",
    "read_image",
]

RESIZE_MODES: tuple[str, ...] = ("auto", "pad", "bilinear", "center-crop")
ALPHA_MODES: tuple[str, ...] = ("composite", "drop")
#: Images with more pixels (width × height) are refused before decoding (see the module docstring).
MAX_PIXELS: int = 50_000_000


# ----------------------------------------------------------------------------------------------
# decoding


def _png_declared_bits(path: Path) -> int | None:
    """Significant bits of a grayscale PNG: the sBIT chunk if present, else IHDR's bit depth."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            depth = None
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return depth
                length, ctype = struct.unpack(">I4s", head)
                if ctype == b"IHDR":
                    data = fh.read(length)
                    depth = data[8] if len(data) >= 9 else None
                    fh.seek(4, 1)
                elif ctype == b"sBIT":
                    data = fh.read(length)
                    return int(data[0]) if data and 0 < data[0] <= 16 else depth
                elif ctype in (b"IDAT", b"IEND"):
                    return depth
                else:
                    fh.seek(length + 4, 1)
    except OSError:
        return None


def _declared_bits(im: Any, path: Path) -> int | None:
    fmt = (im.format or "").upper()
    if fmt == "PNG":
        return _png_declared_bits(path)
    if fmt == "TIFF":
        bps = getattr(im, "tag_v2", {}).get(258)
        if bps:
            b = bps[0] if isinstance(bps, (tuple, list)) else bps
            return int(b)
    return None


def _scale_int_gray(a: np.ndarray, bits: int) -> np.ndarray:
    a = a.astype(np.int64)
    top = (1 << bits) - 1
    a = np.clip(a, 0, top)
    # round(v · 255 / top) in exact integer arithmetic
    return ((a * 255 * 2 + top) // (2 * top)).astype(np.uint8)


def _apply_alpha(color: np.ndarray, a: np.ndarray, alpha: str) -> np.ndarray:
    if alpha == "drop":
        return color
    c = color.astype(np.uint32)
    w = a.astype(np.uint32)
    if c.ndim == 3:
        w = w[..., None]
    return ((c * w + 127) // 255).astype(np.uint8)


def _pixels(im: Any, bits: int | None, alpha: str) -> np.ndarray:
    """A loaded PIL image → uint8 (H, W) or (H, W, 3) (see the module docstring)."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I":
            if bits is None or bits > 16:
                bits = 16 if (a.size == 0 or int(a.max()) <= 0xFFFF) else 32
        elif bits is None or bits > 16:
            bits = 16
        return _scale_int_gray(a, max(1, min(int(bits), 32)))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("float image holds NaN or inf pixels")
        return np.round(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    if mode in ("LA", "La"):
        a = np.asarray(im.convert("LA"), dtype=np.uint8)
        return _apply_alpha(a[..., 0], a[..., 1], alpha)
    if mode in ("RGBA", "RGBa"):
        a = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _apply_alpha(a[..., :3], a[..., 3], alpha)
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def read_image(path: str | os.PathLike, *, alpha: str = "composite") -> np.ndarray:
    """Decode one image file into uint8 pixels, ``(H, W)`` (gray) or ``(H, W, 3)`` (colour).

    Args:
        path: the file (any format Pillow reads; the extension is not consulted).
        alpha: ``"composite"`` (over black) or ``"drop"``; see the module docstring.

    Raises:
        ImageReadError: the file is missing, not a regular file (a FIFO or device is never
            opened), truncated, corrupt, not an image, over :data:`MAX_PIXELS` (checked before
            decoding), or of an unsupported mode.
    """
    from PIL import Image, ImageOps

    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha must be one of {', '.join(ALPHA_MODES)}, got {alpha!r}")
    path = Path(path)
    problem = regular_file_problem(path)
    if problem is not None:
        raise ImageReadError(path, problem)
    try:
        with warnings.catch_warnings():  # our own limit below, with a clearer message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im_ctx = Image.open(path)
        with im_ctx as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(path, f"{w}×{h} = {w * h} pixels is over the pixel limit of "
                                     f"{MAX_PIXELS} (diffpath.data.files.MAX_PIXELS); shrink it first")
            im.load()
            bits = _declared_bits(im, path) if im.mode.startswith("I") else None
            try:  # (returns a copy, without .format: read the declared depth first)
                im = ImageOps.exif_transpose(im)
            except Exception:  # a broken EXIF block: keep the pixels as stored
                pass
            arr = _pixels(im, bits, alpha)
    except (ImageReadError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise ImageReadError(path, msg) from exc
    if arr.ndim not in (2, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(path, f"unexpected pixel array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------
# preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How decoded pixels become the model's input; saved with a detector.

    Attributes:
        size: the model's square input size.
        channels: the model's channels (1 or 3).
        resize: one of :data:`RESIZE_MODES` (see the module docstring).
        alpha: one of :data:`ALPHA_MODES`.
    """

    size: int
    channels: int
    resize: str = "auto"
    alpha: str = "composite"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {self.resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        if self.alpha not in ALPHA_MODES:
            raise ValueError(f"unknown alpha {self.alpha!r}; choose one of {', '.join(ALPHA_MODES)}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if int(self.size) < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(size=int(d["size"]), channels=int(d["channels"]), resize=str(d.get("resize", "auto")),
                   alpha=str(d.get("alpha", "composite")))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return preprocess(image, self)


def preprocess(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 pixels ``(H, W)`` / ``(H, W, 3)`` → float32 ``(channels, size, size)`` in [-1, 1].

    The single preprocessing function of fit and score (see the module docstring).

    Raises:
        ValueError: pixels of the wrong dtype/shape, or an image too large for ``resize="pad"``.
    """
    from diffpath.data import to_model_input

    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {x.dtype}")
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
        raise ValueError(f"pixels must be (H, W) or (H, W, 3), got shape {x.shape}")
    size = int(prep.size)
    h, w = x.shape[:2]
    mode = prep.resize
    if mode == "center-crop":
        s = min(h, w)
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        x = x[top : top + s, left : left + s]
        mode = "bilinear"
    elif mode == "pad":
        dh, dw = size - h, size - w
        if dh < 0 or dw < 0:
            raise ValueError(
                f"a {w}×{h} image is larger than the model's {size}×{size} and cannot be padded "
                "(use resize 'bilinear', 'center-crop' or 'auto')"
            )
        pads = [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)] + [(0, 0)] * (x.ndim - 2)
        x = np.pad(x, pads, mode="constant", constant_values=0)
        mode = "auto"  # already size × size: no further resizing
    return to_model_input(np.ascontiguousarray(x)[None], size, prep.channels, resize=mode)[0]


# ----------------------------------------------------------------------------------------------
# batches of files


@dataclass
class LoadedImages:
    """Model inputs of the readable files, in input order.

    Attributes:
        x0: (N, C, size, size) float32 in [-1, 1] (a copy-on-write memory map of the ``buffer``
            file when one was given).
        paths: the N files that were read.
        skipped: (file, reason) of each file that could not be read.
    """

    x0: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _read_one(f: Path, prep: Preprocessing, strict: bool) -> np.ndarray:
    """One file's model input (C, size, size); :class:`ImageReadError` if it cannot be read."""
    try:
        pixels = read_image(f, alpha=prep.alpha)
        try:
            return preprocess(pixels, prep)
        except ValueError as exc:
            raise ImageReadError(f, str(exc)) from exc
    except ImageReadError as exc:
        if strict:
            raise ImageReadError(f, exc.reason + "; --strict refuses unreadable files") from exc
        raise


def load_images(
    paths: Sequence[str | os.PathLike],
    prep: Preprocessing,
    *,
    strict: bool = False,
    buffer: str | os.PathLike | None = None,
    progress: bool = False,
    on_skip: Callable[[Path, str], None] | None = None,
) -> LoadedImages:
    """Read and preprocess files; a file that cannot be read is skipped, or fails under ``strict``.

    Args:
        paths: image files (see :func:`find_images`).
        prep: the preprocessing recipe.
        strict: raise :class:`ImageReadError` at the first unreadable file instead of skipping it.
        buffer: write the model inputs to this file instead of memory (large folders; written
            with ordinary file I/O, removed again if loading fails).
        progress: show a tqdm progress bar.
        on_skip: called with (file, reason) for each skipped file; default: an
            :class:`ImageSkippedWarning`.

    Raises:
        NoImagesError: no file at all could be read.
        ImageReadError: under ``strict``, the first unreadable file.
        OutputError: the buffer cannot be written (a full disk: one line, the file removed).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise NoImagesError("no input images given")
    shape = (len(files), prep.channels, prep.size, prep.size)
    rows = RowFile(buffer, shape) if buffer is not None else None
    x0 = np.empty(shape, np.float32) if rows is None else None
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    bar = _bar(len(files)) if progress else None
    try:
        for f in files:
            x = _read_or_skip(f, prep, strict, skipped, on_skip)
            if x is not None:
                if rows is not None:
                    rows.write(x)
                else:
                    x0[len(kept)] = x
                kept.append(f)
            if bar is not None:
                bar.update(1)
        if not kept:
            raise NoImagesError(f"none of the {len(files)} input file(s) could be read as an image "
                                f"(first: {skipped[0][0]}: {skipped[0][1]})")
        out = rows.finish(len(kept)) if rows is not None else x0[: len(kept)]
    except BaseException:
        if rows is not None:
            rows.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return LoadedImages(x0=out, paths=kept, skipped=skipped)


def _read_or_skip(f: Path, prep: Preprocessing, strict: bool, skipped: list[tuple[Path, str]],
                  on_skip: Callable[[Path, str], None] | None) -> np.ndarray | None:
    """One file's model input, or None when it is skipped (recorded in ``skipped``, reported to
    ``on_skip`` or as an :class:`ImageSkippedWarning`); under ``strict`` the error is raised."""
    try:
        return _read_one(f, prep, strict)
    except ImageReadError as exc:
        if strict:
            raise
        skipped.append((f, exc.reason))
        if on_skip is not None:
            on_skip(f, exc.reason)
        else:
            warnings.warn(f"skipping {f}: {exc.reason}", ImageSkippedWarning, stacklevel=4)
        return None


def _bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="reading", leave=False)
