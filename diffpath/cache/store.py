"""The chunk store of a resumable cache pass: its parts folder, and reading a finished cache.

The parts folder (``OUT.parts/`` by default, or a caller's work folder) holds

* ``meta.json``: the run's fingerprint and chunk size; a folder whose ``meta.json`` differs (or is
  lost) belongs to another run and is emptied before use;
* ``chunk_NNNNNN.npz``: one finished chunk each, written atomically, stamped with the run's
  fingerprint (``run_fingerprint``) and used only when that stamp and its image indices match;
* ``finished.npz``: optionally, the merged cache, stamped the same way, so that a rerun that lost
  ``OUT`` (DVC removes a stage's outputs before it reruns it) or stopped after the pass copies it
  instead of recomputing. The caller removes the folder when its whole job is done.

Every check of "does this file belong to this run" is :meth:`ChunkStore._stamped`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffpath.io import InputError, save_npz_atomic, write_json_atomic

__all__ = ["ChunkStore", "chunk_spans", "read_cache"]

_FP_KEY = "run_fingerprint"  # stored in every chunk and in finished.npz: the run that wrote it
FINISHED = "finished.npz"
META = "meta.json"


def chunk_spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of ``n`` images in chunks of ``size`` (the last may be shorter)."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def read_cache(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a cache ``.npz`` (:func:`~diffpath.cache.compute_cache`), read eagerly and
    without pickles; :class:`~diffpath.io.InputError` naming the file when it is missing or
    unreadable."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such cache file") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError …
        raise InputError(f"{path}: unreadable or truncated cache ({type(exc).__name__}: {exc})") from None


class ChunkStore:
    """The parts folder of one run (fingerprint ``meta["fingerprint"]``, chunks ``spans``).

    Build it with :meth:`open`, which also drops another run's leftovers.
    """

    def __init__(self, folder: Path, fingerprint: str, spans: Sequence[tuple[int, int]]):
        self.folder = folder
        self.fingerprint = fingerprint
        self.spans = list(spans)

    @classmethod
    def open(cls, folder: Path, meta: Mapping[str, Any], spans: Sequence[tuple[int, int]], *,
             rank: int = 0, barrier: Callable[[], None] | None = None) -> ChunkStore:
        """Create ``folder``; rank 0 empties it when its ``meta.json`` is not this run's (another
        fingerprint or chunk size, or lost) and writes ``meta``; every rank then waits at
        ``barrier``."""
        folder.mkdir(parents=True, exist_ok=True)
        meta_file = folder / META
        try:
            old = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            old = {}
        if rank == 0:
            if old.get("fingerprint") != meta["fingerprint"] or old.get("chunk") != meta["chunk"]:
                shutil.rmtree(folder)  # stale parts of another run, or parts whose meta.json is lost
                folder.mkdir(parents=True)
            write_json_atomic(meta_file, dict(meta))
        if barrier is not None:
            barrier()
        return cls(folder, str(meta["fingerprint"]), spans)

    # -- chunks ---------------------------------------------------------------------------------

    def part(self, i: int) -> Path:
        return self.folder / f"chunk_{i:06d}.npz"

    def _stamped(self, arrays: Mapping[str, np.ndarray]) -> bool:
        """Whether ``arrays`` (a chunk or a finished cache) were written by this run."""
        return _FP_KEY in arrays and str(arrays[_FP_KEY]) == self.fingerprint

    def has(self, i: int) -> bool:
        """Whether chunk ``i`` is on disk, readable and provably this run's."""
        try:
            with np.load(self.part(i), allow_pickle=False) as z:
                return self._stamped(z) and np.array_equal(z["index"], np.arange(*self.spans[i]))
        except Exception:
            return False

    def write(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
        save_npz_atomic(self.part(i), {**arrays, _FP_KEY: np.asarray(self.fingerprint)})

    def read(self, i: int) -> dict[str, np.ndarray]:
        if not self.has(i):
            raise RuntimeError(f"{self.part(i)}: missing, or not of this run; rerun")
        with np.load(self.part(i), allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != _FP_KEY}

    # -- the finished cache -----------------------------------------------------------------------

    def finished(self) -> dict[str, np.ndarray] | None:
        """The merged cache this very run kept (:meth:`finish` with ``keep``), else None."""
        try:
            cached = read_cache(self.folder / FINISHED)
        except InputError:
            return None
        if not self._stamped(cached):
            return None
        cached.pop(_FP_KEY)
        return cached

    def finish(self, out: Path, merged: Mapping[str, np.ndarray], *, keep: bool) -> None:
        """Write ``out``; with ``keep``, first keep ``merged`` as ``finished.npz`` (and drop the
        chunks it replaces), else remove the parts folder afterwards."""
        if keep:
            save_npz_atomic(self.folder / FINISHED, {**merged, _FP_KEY: np.asarray(self.fingerprint)})
            for i in range(len(self.spans)):
                self.part(i).unlink(missing_ok=True)
        save_npz_atomic(out, merged)
        if not keep:
            shutil.rmtree(self.folder, ignore_errors=True)
