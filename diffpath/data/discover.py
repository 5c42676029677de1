"""Finding image files: folders (recursive), globs and files, each file once.

Folders, links and names
------------------------
Folders are walked following symbolic links, but a folder is never entered twice (by its device
and inode), so a link back up the tree cannot loop, and a file reached under several names
(links) counts once, at its first place. File names need not be UTF-8 (POSIX names are bytes):
they are kept as Python strings with the undecodable bytes escaped (``os.fsdecode``) and read as
any other file.

What cannot be read
-------------------
A sub-folder that cannot be listed (no permission, an I/O error) and a matching name that is not a
regular file (a FIFO, a device, a socket, a dangling link) are skipped with an
:class:`ImageSkippedWarning` naming them, and counted among the skipped inputs (``skipped``); with
``strict`` they are errors (:class:`ImageReadError`). Nothing that is not a regular file is ever
opened: a FIFO would block the reader forever, and opening a device may act on it.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from diffpath.io import InputError, file_kind

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "ImageSkippedWarning", "NoImagesError", "find_images",
           "regular_file_problem"]

#: File name extensions (lower case) that folder expansion picks up.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif"}
)
_GLOB_CHARS = set("*?[")


class NoImagesError(InputError):
    """An input (folder, glob, file list) that yields no usable image."""


class ImageReadError(InputError):
    """One image file (or folder) that cannot be read."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: cannot read image ({reason})")


class ImageSkippedWarning(UserWarning):
    """An unreadable image (or folder) was skipped (not under ``strict``)."""


#: Where :func:`find_images` reports what it skips: called with (path, reason).
OnSkip = Callable[[Path, str], None]


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as an image file without opening it (it is a FIFO, a device,
    a socket, a folder, missing...), or None for a regular file (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None if stat.S_ISREG(mode) else f"{file_kind(mode)}, not a regular file"


def _skipper(strict: bool, skipped: list[tuple[Path, str]] | None, what: str = "") -> OnSkip:
    """The handler of one unreadable input: an error under ``strict``, else a warning naming it
    and an entry in ``skipped``."""
    def skip(path: Path, reason: str) -> None:
        if strict:
            raise ImageReadError(path, reason + "; --strict refuses unreadable files")
        if skipped is not None:
            skipped.append((path, reason))
        warnings.warn(f"skipping {what}{path}: {reason}", ImageSkippedWarning, stacklevel=3)

    return skip


# ----------------------------------------------------------------------------------------------
# finding files


def _is_glob(s: str) -> bool:
    return any(c in s for c in _GLOB_CHARS)


def _has_image_ext(p: Path, extensions: Iterable[str]) -> bool:
    return p.suffix.lower() in extensions


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows links: the folder itself
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _walk_dirs(folder: Path, on_error: OnSkip | None = None) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` following links, entering each folder (by device and inode) once; hidden
    folders and files are skipped. A folder that cannot be listed goes to ``on_error`` (folder,
    reason); the top folder itself raises :class:`NoImagesError`."""
    seen = {_dir_id(os.fspath(folder))}

    def onerror(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename is not None else folder
        reason = f"cannot list the folder ({exc.strerror or type(exc).__name__})"
        if os.path.abspath(where) == os.path.abspath(folder):
            raise NoImagesError(f"{folder}: {reason}")
        if on_error is not None:
            on_error(where, reason)

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=onerror):
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):  # hidden folders (.git, work dirs)
                continue
            ident = _dir_id(os.path.join(root, d))
            if ident is not None and ident not in seen:
                seen.add(ident)
                keep.append(d)
        dirs[:] = keep
        yield root, keep, [f for f in files if not f.startswith(".")]


def _walk(folder: Path, extensions: frozenset[str], on_skip: OnSkip) -> list[Path]:
    """The regular files below ``folder`` with an image extension, sorted; folders that cannot be
    listed and names that are not regular files go to ``on_skip``."""
    found = sorted((Path(root) / name for root, _, files in _walk_dirs(folder, on_skip) for name in files
                    if os.path.splitext(name)[1].lower() in extensions), key=lambda p: p.as_posix())
    return _regular(found, on_skip)


def _regular(paths: Iterable[Path], on_skip: OnSkip) -> list[Path]:
    out = []
    for p in paths:
        problem = regular_file_problem(p)
        if problem is None:
            out.append(p)
        else:
            on_skip(p, problem)
    return out


def _match_parts(pat: Sequence[str], parts: Sequence[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match_parts(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match_parts(pat[1:], parts[1:])


def _glob(pattern: str, on_skip: OnSkip | None = None) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but a ``**`` walks folders with :func:`_walk_dirs`
    (each folder once), so links that loop cannot make it endless; folders it cannot list go to
    ``on_skip``."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return sorted(glob.glob(pattern))
    k = next(i for i, q in enumerate(parts) if _is_glob(q))
    root = Path(*parts[:k]) if k else Path(".")
    rest = parts[k:]
    out = []
    for r, dirs, files in _walk_dirs(root, on_skip):
        rel = Path(r).relative_to(root).parts if Path(r) != root else ()
        for name in dirs + files:
            if _match_parts(rest, rel + (name,)):
                out.append(os.path.join(r, name) if k or r != "." else name)
    return sorted(set(out))


def find_images(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    strict: bool = False,
    skipped: list[tuple[Path, str]] | None = None,
) -> list[Path]:
    """Expand files, folders and globs into a list of image files.

    * a folder: every file below it (recursively; hidden files and folders skipped) whose
      extension is in ``extensions`` (case-insensitive), sorted by path;
    * a glob (``*``, ``?``, ``[``; ``**`` recurses): the matching files with an image extension,
      sorted, and matching folders expanded as above;
    * a file: taken as is, whatever its extension (it is decoded by content).

    Inputs are expanded in the order given; a file reached twice (also through links) is kept
    once (first place). Folder walks follow links but never enter a folder twice. Sub-folders that
    cannot be listed and names that are not regular files (FIFOs, devices...) are skipped with an
    :class:`ImageSkippedWarning` and appended to ``skipped`` as (path, reason); under ``strict``
    they raise :class:`ImageReadError`.

    Raises:
        NoImagesError: an input that does not exist, a folder that cannot be listed, a folder or
            glob that matches no image, or no images at all.
        ImageReadError: under ``strict``, the first input skipped.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    exts = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not inputs:
        raise NoImagesError("no input images given")
    out: list[Path] = []
    seen: set[str] = set()
    skipped = skipped if skipped is not None else []
    on_skip = _skipper(strict, skipped)
    for item in inputs:
        for f in _expand(os.fspath(item), exts, on_skip):
            key = os.path.normcase(os.path.realpath(f))  # one file under several names: once
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:  # every input was skipped
        raise NoImagesError("no images found" + (f" (skipped: {skipped[0][0]}: {skipped[0][1]}"
                                                 f"{' ...' if len(skipped) > 1 else ''})" if skipped else ""))
    return out


def _expand(s: str, exts: frozenset[str], on_skip: OnSkip) -> list[Path]:
    """The image files of one input (a folder, a file or a glob); see :func:`find_images`."""
    p = Path(s)
    if p.is_dir():
        found = _walk(p, exts, on_skip)
        if not found:
            raise NoImagesError(f"{s}: folder holds no images (looked for {', '.join(sorted(exts))}, recursively)")
        return found
    if os.path.lexists(s):
        return _regular([p], on_skip)  # a file (a FIFO, device... is skipped)
    if not _is_glob(s):
        raise NoImagesError(f"{s}: no such file or folder")
    found = []
    for m in _glob(s, on_skip):
        mp = Path(m)
        if mp.is_dir():
            found.extend(_walk(mp, exts, on_skip))
        elif _has_image_ext(mp, exts):
            found.extend(_regular([mp], on_skip))
    if not found:
        raise NoImagesError(f"{s}: no images matched")
    return found
