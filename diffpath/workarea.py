"""The work folder of a resumable model pass, owned by one run at a time.

``diffpath fit`` and ``diffpath score`` keep their resumable work in ``OUT.work/`` (the decoded
images ``x0.f32`` and the cache chunks of :func:`diffpath.cache.compute_cache`). Two runs
must never share it, so :func:`work_area` first takes an exclusive lock on ``OUT.work.lock``
(``flock``; released by the operating system when the process dies, so a crash leaves no stale
lock). A second run with the same output refuses at once with :class:`WorkAreaBusy`, naming the
process that holds it. The lock file is removed when the run ends, however it ends (a full disk
included). What cannot be resumed (the decoded images: the caller lists them in the state's
``"scratch"``) is removed when a run fails; finished chunks stay for the rerun.

Chunks left by an interrupted run, and its finished pass, are reused only when they provably
belong to the new run: the chunk store (:mod:`diffpath.cache.store`) keeps the run's fingerprint
(model, settings, the files' names and decoded pixels) in ``meta.json`` *and* in every chunk and
finished cache, and ignores any file whose fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from diffpath.io import InputError, OutputError, os_error_line

__all__ = ["RunLock", "WorkAreaBusy", "data_key", "work_area", "work_dir_for"]


class WorkAreaBusy(InputError):
    """Another run holds the work folder (the same ``--out``)."""


try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: an exclusive-create lock file instead
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """An exclusive, non-blocking lock on ``path`` (a file beside the work folder).

    With ``flock`` the lock dies with its process; the file is removed on :meth:`release`. After
    taking the lock, the file is checked to still be the one at ``path`` (a run that released it
    may have removed it meanwhile), so two runs can never both hold it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(path))
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f" (pid {info['pid']} on {info['host']}, since {info['since']})"
        except Exception:
            return ""

    def _busy(self) -> WorkAreaBusy:
        work = self.path.with_suffix("") if self.path.suffix == ".lock" else self.path
        return WorkAreaBusy(
            f"another diffpath run is using {work}{self._holder()}; wait for it to finish, or "
            "choose another --out"
        )

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            if fcntl is None:  # pragma: no cover
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise self._busy() from None
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._busy() from None
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:  # removed by the run that just released it: lock the new one
                    os.close(fd)
                    continue
            self._fd = fd
            self._write_holder(fd)
            return self
        raise self._busy()  # pragma: no cover - a lock file replaced 100 times in a row

    @staticmethod
    def _write_holder(fd: int) -> None:
        """Who holds the lock, for the message a second run prints; best effort (a full disk
        leaves the lock file empty, and the lock works the same)."""
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it
        finally:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def work_dir_for(out: str | os.PathLike) -> Path:
    """The work folder of an output: ``OUT.work`` beside it."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".work")


@contextmanager
def work_area(path: str | os.PathLike | None) -> Iterator[dict[str, Any]]:
    """Lock and create the work folder ``path``; remove it (and the lock) on success.

    Yields a state dict whose ``"phase"`` the caller moves through ``"before"`` → ``"pass"`` →
    ``"after"``, and whose ``"scratch"`` list names files that no rerun can use. On failure the
    scratch files are removed, and the folder is kept only when it may save work: during the model
    pass (finished chunks), after it on an interruption (the finished pass), and before it when it
    already existed (an earlier interrupted run's chunks). ``path=None``: nothing on disk.

    Raises:
        WorkAreaBusy: another run holds the folder.
    """
    if path is None:
        yield {"phase": "before", "dir": None, "scratch": []}
        return
    path = Path(os.path.abspath(path))
    with RunLock(path.with_name(path.name + ".lock")):
        existed = path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(os_error_line(exc, path)) from exc
        state: dict[str, Any] = {"phase": "before", "dir": path, "scratch": []}
        try:
            yield state
        except BaseException as exc:
            for f in state["scratch"]:
                Path(f).unlink(missing_ok=True)
            phase = state["phase"]
            keep = ((phase == "before" and existed) or phase == "pass"
                    or (phase == "after" and isinstance(exc, KeyboardInterrupt)))
            if not keep or _empty(path):
                shutil.rmtree(path, ignore_errors=True)
            raise
        shutil.rmtree(path, ignore_errors=True)


def _empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def data_key(paths: Sequence[str | os.PathLike], x0: np.ndarray, extra: dict[str, Any]) -> str:
    """SHA-256 of the settings ``extra``, the files' absolute names (as bytes, so any name works)
    and the decoded model inputs ``x0`` (N, C, H, W)."""
    h = hashlib.sha256()
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in paths:
        h.update(os.fsencode(os.path.abspath(p)) + b"\0")
    step = 4096
    for s in range(0, len(x0), step):
        h.update(np.ascontiguousarray(x0[s : s + step]).tobytes())
    return h.hexdigest()
