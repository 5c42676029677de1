"""Small I/O helpers: atomic writes (files, several files at once, folders), output checks and
image-array input checks.

Every writer of the package goes through :func:`atomic_path` (or the helpers built on it): a
temporary file beside the target, renamed over it on success, removed on failure, created with the
usual permissions (``0666 & ~umask``, not ``mkstemp``'s private ``0600``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "InputError",
    "OutputError",
    "atomic_folder",
    "atomic_path",
    "atomic_paths",
    "check_writable",
    "json_default",
    "load_images_npz",
    "save_npz_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


class InputError(ValueError):
    """Input images that cannot be used (wrong shape, range, dtype, NaNs, missing file)."""


class OutputError(InputError):
    """An output path that cannot be written (a folder, under a file, not writable)."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
    umask = _umask()
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


@contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[list[Path]]:
    """Temporary paths for several targets that replace them only when the block succeeds.

    All temporaries are written first; on success they are renamed into place in reverse order
    (the first target last), so a failure while writing any of them leaves none of the targets
    changed.
    """
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(t)) for t in targets]


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        Path(tmp).write_bytes(data)


def check_writable(target: str | os.PathLike, *, folder: bool = False) -> Path:
    """Raise :class:`OutputError` unless ``target`` can be written, by trying it: the parent folder
    is created if needed and a temporary file is created in it and removed. ``target`` itself must
    not be a folder (unless ``folder``) and is not touched. Returns the absolute target.
    """
    target = Path(os.path.abspath(target))
    what = "folder" if folder else "file"
    if not folder and target.is_dir():
        raise OutputError(f"{target} is a folder; give a {what} name")
    if folder and target.exists() and not target.is_dir():
        raise OutputError(f"{target} exists and is not a folder")
    parent = target.parent
    for up in [parent, *parent.parents]:
        if up.exists():
            if not up.is_dir():
                raise OutputError(f"cannot write {target}: {up} is not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".check", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OutputError(f"cannot write {target}: {reason} ({exc.filename or parent})") from exc
    return target


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target``.

    An existing ``target`` is moved aside, the new folder renamed into place, and the old one
    removed (restored if the rename fails). On failure the temporary folder is removed and
    ``target`` is untouched. The folder gets the usual permissions (``0777 & ~umask``).
    """
    target = Path(os.path.abspath(target))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        yield tmp
        if target.exists():
            old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_npz_atomic(target: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to ``target`` atomically (``target`` should end in ``.npz``)."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """``json.dumps``' fallback for numpy scalars and arrays and paths (anything else is an error)."""
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
    if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file holds one bare array
        raise InputError(f"{path}: not an .npz archive (a bare .npy array?); save the images with "
                         "np.savez(path, x0=...) or np.savez(path, images=...)")
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
