"""Small I/O helpers: atomic writes (files, several files at once, folders), output checks and
``.npz`` arrays read header first.

Every writer of the package goes through :func:`atomic_path` (or the helpers built on it): a
temporary file beside the target, renamed over it on success, removed on failure, created with the
usual permissions (``0666 & ~umask``, not ``mkstemp``'s private ``0600``). A file output must be a
regular file or absent (never a device, FIFO or socket); a folder output that is a symbolic link
is replaced where it points, and the link is kept. :class:`RowFile` (scratch work, not an output)
writes a large array with ordinary file I/O into reserved space, so a full disk is an error, not
a SIGBUS.

Files a user was handed (``.npz`` archives of a detector, of images) are read with
:func:`read_npz_checked`: each member's ``.npy`` header (dtype and shape) is read and checked
before any of its data, so a small file that declares a huge array is refused without reading it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "InputError",
    "OutputError",
    "RowFile",
    "atomic_folder",
    "atomic_path",
    "atomic_paths",
    "check_writable",
    "file_kind",
    "json_default",
    "npz_headers",
    "os_error_line",
    "read_npz_checked",
    "save_npz_atomic",
    "save_npzs_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


class InputError(ValueError):
    """Input images that cannot be used (wrong shape, range, dtype, NaNs, missing file)."""


class OutputError(InputError):
    """An output path that cannot be written (a folder, under a file, not writable, full)."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: "a regular file", "a FIFO (named pipe)", "a folder", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def os_error_line(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a file-system error: the file, the reason and, for a full disk, what to do."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = ("; free some space or choose another --out"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
    return f"cannot write {where}: {reason}{hint}" if where is not None else f"{reason}{hint}"


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
    _check_replaceable_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    umask = _umask()
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):  # mkstemp makes 0600 files; give them the usual permissions
            os.chmod(tmp, 0o666 & ~umask)
        _check_replaceable_file(target)  # (it may have appeared meanwhile)
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


def _check_replaceable_file(target: Path) -> None:
    """:class:`OutputError` unless ``target`` is absent or a regular file (through links): a
    device, FIFO or socket is never replaced by a file."""
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        return  # absent (or a dangling link, which is replaced)
    except OSError as exc:
        raise OutputError(os_error_line(exc, target)) from exc
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{target} is a folder; give a file name")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{target} exists and is {file_kind(st.st_mode)}, not a regular file; "
                          "refusing to replace it (choose another --out)")


def check_writable(target: str | os.PathLike, *, folder: bool = False) -> Path:
    """Raise :class:`OutputError` unless ``target`` can be written, by trying it: the parent folder
    is created if needed and a temporary file is created in it and removed. ``target`` itself must
    be a regular file or absent (a folder or absent with ``folder``) and is not touched. Returns
    the absolute target.
    """
    target = Path(os.path.abspath(target))
    if not folder:
        _check_replaceable_file(target)
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
    ``target`` is untouched. The folder gets the usual permissions (``0777 & ~umask``). A
    ``target`` that is a symbolic link is kept: the folder it points to is replaced.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = Path(os.path.realpath(target))
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


class RowFile:
    """A float32 array of ``shape`` written row by row to a raw file with ordinary file I/O, its
    space reserved first where the file system can (``posix_fallocate``): a full disk is an
    :class:`OutputError` at once, never a SIGBUS inside a sparse memory map. Read back as a
    copy-on-write memory map (:meth:`finish`); :meth:`abort` removes the file."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...]):
        self.path = Path(path)
        self.row_shape = tuple(int(d) for d in shape[1:])
        self.row_bytes = int(np.prod(self.row_shape)) * 4
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "wb")
        except OSError as exc:
            raise OutputError(os_error_line(exc, self.path)) from exc
        self._guard(_reserve, self._fh.fileno(), int(shape[0]) * self.row_bytes)

    def _guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            self.abort()
            raise OutputError(os_error_line(exc, self.path)) from exc

    def write(self, x: np.ndarray) -> None:
        self._guard(self._fh.write, np.ascontiguousarray(x, dtype=np.float32).tobytes())

    def finish(self, n: int) -> np.ndarray:
        """(n, *row_shape) float32: the rows written, as a copy-on-write memory map."""
        def close() -> None:
            self._fh.flush()
            self._fh.truncate(n * self.row_bytes)
            self._fh.close()

        self._guard(close)
        return np.memmap(self.path, dtype=np.float32, mode="c", shape=(n, *self.row_shape))

    def abort(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate ``nbytes`` of the file now (a no-op where the file system cannot: ordinary
    writes still report a full disk)."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _savez_synced(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
        fh.flush()
        os.fsync(fh.fileno())


def save_npz_atomic(target: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` to ``target`` atomically (``target`` should end in ``.npz``)."""
    with atomic_path(target) as tmp:
        _savez_synced(tmp, arrays)


def save_npzs_atomic(files: Mapping[str | os.PathLike, Mapping[str, np.ndarray]]) -> None:
    """Several ``.npz`` files, all or none (:func:`atomic_paths`): a failure while writing any of
    them leaves every target as it was."""
    targets = list(files)
    with atomic_paths(*targets) as tmps:
        for tmp, target in zip(tmps, targets):
            _savez_synced(tmp, files[target])


#: ``name -> (dtype kinds, shape)`` of the arrays :func:`read_npz_checked` expects; a ``None``
#: in a shape matches any length.
NpzSpec = Mapping[str, tuple[str, tuple[int | None, ...]]]
#: Longest string item an ``.npz`` of ours may hold (paths: 4096 characters of 4 bytes).
MAX_STR_ITEMSIZE = 4 * 4096


def _npy_header(fh: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from an open ``.npy`` stream, reading only its header."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"npy format version {version} is not supported")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The (shape, dtype) of every array of an ``.npz``, from the members' headers only."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.endswith(".npy"):
                with zf.open(info) as fh:
                    out[info.filename[:-4]] = _npy_header(fh)
    return out


def _header_problem(shape: tuple[int, ...], dtype: np.dtype, kinds: str,
                    want: tuple[int | None, ...]) -> str | None:
    if any(d < 0 for d in shape):
        return f"has a negative dimension in its shape {shape}"
    if dtype.hasobject or dtype.kind not in kinds:
        return f"has dtype {dtype}, expected kind {'/'.join(kinds)}"
    if dtype.kind in "SU" and dtype.itemsize > MAX_STR_ITEMSIZE:
        return f"has dtype {dtype}, whose items are over {MAX_STR_ITEMSIZE} bytes"
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        shown = "(" + ", ".join("N" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
        return f"has shape {shape}, expected {shown}"
    return None


def read_npz_checked(path: str | os.PathLike, spec: NpzSpec, *, optional: tuple[str, ...] = (),
                     max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays ``spec`` names from an ``.npz``, each read only after its header (dtype kind and
    shape, :data:`NpzSpec`) was checked, without pickles; names in ``optional`` may be absent.

    Raises:
        InputError: ``"{path}: array {name} has shape ..."`` (or missing, unreadable, too large).
    """
    path = Path(path)
    try:
        heads = npz_headers(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError …
        raise InputError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    for name, (kinds, want) in spec.items():
        if name not in heads:
            if name in optional:
                continue
            raise InputError(f"{path}: has no array {name!r} (it holds {sorted(heads)})")
        shape, dtype = heads[name]
        problem = _header_problem(shape, dtype, kinds, want)
        size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if problem is None and max_bytes is not None and size > max_bytes:
            problem = f"declares {shape} × {dtype.itemsize} bytes, over the limit of {max_bytes} bytes"
        if problem is not None:
            raise InputError(f"{path}: array {name!r} {problem}")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in spec:
                if name in heads:
                    with zf.open(name + ".npy") as fh:
                        out[name] = np.lib.format.read_array(fh, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc})") from None
    return out


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
