"""Finding image files: folders (recursive), globs and files, each file once.

Folders, links and names
------------------------
Folders are walked following symbolic links, but a folder is never entered twice (by its device
and inode), so a link back up the tree cannot loop, and a file reached under several names
(links) counts once, at its first place. File names need not be UTF-8 (POSIX names are bytes):
they are kept as Python strings with the undecodable bytes escaped (``os.fsdecode``) and read as
any other file.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from diffpath.io import InputError

__all__ = ["IMAGE_EXTENSIONS", "NoImagesError", "find_images"]

#: File name extensions (lower case) that folder expansion picks up.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif"}
)
_GLOB_CHARS = set("*?[")


class NoImagesError(InputError):
    """An input (folder, glob, file list) that yields no usable image."""


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


def _walk_dirs(folder: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` following links, entering each folder (by device and inode) once; hidden
    folders and files are skipped."""
    seen = {_dir_id(os.fspath(folder))}
    for root, dirs, files in os.walk(folder, followlinks=True):
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


def _walk(folder: Path, extensions: frozenset[str]) -> list[Path]:
    found = [Path(root) / name for root, _, files in _walk_dirs(folder) for name in files
             if os.path.splitext(name)[1].lower() in extensions]
    return sorted(found, key=lambda p: p.as_posix())


def _match_parts(pat: Sequence[str], parts: Sequence[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match_parts(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match_parts(pat[1:], parts[1:])


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, but a ``**`` walks folders with :func:`_walk_dirs`
    (each folder once), so links that loop cannot make it endless."""
    parts = Path(pattern).parts
    if "**" not in parts:
        return sorted(glob.glob(pattern))
    k = next(i for i, q in enumerate(parts) if _is_glob(q))
    root = Path(*parts[:k]) if k else Path(".")
    rest = parts[k:]
    out = []
    for r, dirs, files in _walk_dirs(root):
        rel = Path(r).relative_to(root).parts if Path(r) != root else ()
        for name in dirs + files:
            if _match_parts(rest, rel + (name,)):
                out.append(os.path.join(r, name) if k or r != "." else name)
    return sorted(set(out))


def find_images(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[Path]:
    """Expand files, folders and globs into a list of image files.

    * a folder: every file below it (recursively; hidden files and folders skipped) whose
      extension is in ``extensions`` (case-insensitive), sorted by path;
    * a glob (``*``, ``?``, ``[``; ``**`` recurses): the matching files with an image extension,
      sorted, and matching folders expanded as above;
    * a file: taken as is, whatever its extension (it is decoded by content).

    Inputs are expanded in the order given; a file reached twice (also through links) is kept
    once (first place). Folder walks follow links but never enter a folder twice.

    Raises:
        NoImagesError: an input that does not exist, a folder or glob that matches no image, or
            no images at all.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    exts = frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not inputs:
        raise NoImagesError("no input images given")
    out: list[Path] = []
    seen: set[str] = set()
    for item in inputs:
        s = os.fspath(item)
        p = Path(s)
        if p.is_dir():
            found = _walk(p, exts)
            if not found:
                raise NoImagesError(
                    f"{s}: folder holds no images (looked for {', '.join(sorted(exts))}, recursively)"
                )
        elif p.is_file():
            found = [p]
        elif _is_glob(s):
            found = []
            for m in _glob(s):
                mp = Path(m)
                if mp.is_dir():
                    found.extend(_walk(mp, exts))
                elif mp.is_file() and _has_image_ext(mp, exts):
                    found.append(mp)
            if not found:
                raise NoImagesError(f"{s}: no images matched")
        else:
            raise NoImagesError(f"{s}: no such file or folder")
        for f in found:
            key = os.path.normcase(os.path.realpath(f))  # one file under several names: once
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:  # pragma: no cover - every branch above raises first
        raise NoImagesError("no images found")
    return out
