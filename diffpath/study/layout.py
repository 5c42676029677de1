"""Where every artifact of the study lives: the one place that knows the paths.

The notebooks ask a :class:`Layout` for what they read and write, and ``dvc.yaml`` is generated
from the same answers (:mod:`diffpath.study.stages`), so a path is written down once. Paths are
relative to the repository root (``root``), as DVC and the stage runner see them.

=============================  ==================================================================
artifact                       path
=============================  ==================================================================
prepared images                ``data/prepared/<set>/<split>.npz``
error cache                    ``data/errors/<set>/<split>.npz``
latent round trips             ``data/reconstructions/<benchmark>/<category>.npz``
resumable work of a stage      ``data/.work/<stage>/...`` (outside every DVC output, git-ignored)
fitted scorers                 ``data/scorers/<in>/<method>.*`` and ``data/scorers/summary.json``
test scores                    ``data/scores/<in>.npz``
results and metrics            ``reports/results.csv``, ``reports/metrics.json``
tables, figures                ``reports/tables/``, ``reports/figures/<stage>/``
executed notebooks             ``reports/notebooks/<notebook>[_<item>].ipynb``
the study's pages (a site)     ``reports/site/`` (``index.html``)
wall times (not results)       ``reports/timings/<stage>[_<item>].json`` (git-ignored)
=============================  ==================================================================

``data`` and ``reports`` are the profile's roots (``params.yaml``'s ``layout`` section): the
embedded profile uses ``data`` and ``reports``, the paper profile ``data/paper`` and
``reports/paper``; ``dvc.yaml`` declares ``${layout.data}`` and ``${layout.reports}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Layout", "StageInputError", "load_cache", "read_npz", "read_prepared_x0"]


@dataclass(frozen=True)
class Layout:
    """The study's artifact paths under ``root`` (the repository root by default).

    Methods return :class:`~pathlib.Path` objects; ``str(layout.errors("mnist", "test"))`` with
    the default root is exactly the path ``dvc.yaml`` declares.
    """

    root: Path = Path(".")
    data: str = "data"
    reports: str = "reports"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def enter(cls, root: str | Path = ".", data: str = "data", reports: str = "reports") -> Layout:
        """Change into the study's root and return its layout (for the notebooks).

        The root is ``root`` itself when it holds ``params.yaml``, else the nearest parent that
        does (a notebook opened in JupyterLab runs in ``notebooks/``), else ``root`` as given (a
        scratch folder, as the tests use). ``data`` and ``reports`` are the profile's output
        folders (``params.yaml``'s ``layout`` section: ``data/paper`` and ``reports/paper`` for
        the paper profile, so that it never writes over the embedded profile's results).
        """
        start = Path(root).resolve()
        found = next((p for p in (start, *start.parents) if (p / "params.yaml").is_file()), start)
        os.chdir(found)
        return cls(Path("."), data=str(data), reports=str(reports))

    @classmethod
    def of(cls, params: Mapping[str, Any], root: str | Path = ".") -> Layout:
        """The layout a params mapping selects (its ``layout`` section; defaults without one)."""
        section = params.get("layout") or {}
        return cls(Path(root), data=str(section.get("data", "data")), reports=str(section.get("reports", "reports")))

    def _d(self, *parts: str) -> Path:
        return self.root / self.data / Path(*parts)

    def _r(self, *parts: str) -> Path:
        return self.root / self.reports / Path(*parts)

    # data -------------------------------------------------------------------------------------
    def prepared_dir(self, dataset: str) -> Path:
        return self._d("prepared", dataset)

    def prepared(self, dataset: str, split: str) -> Path:
        """uint8 images, model inputs x0, labels and indices of one split (the data stage)."""
        return self.prepared_dir(dataset) / f"{split}.npz"

    def errors_dir(self, dataset: str) -> Path:
        return self._d("errors", dataset)

    def errors(self, dataset: str, split: str) -> Path:
        """The per-step moments of one split (the errors stage, :mod:`diffpath.cache`)."""
        return self.errors_dir(dataset) / f"{split}.npz"

    def work(self, stage: str, *parts: str) -> Path:
        """A stage's resumable work area: never inside a DVC output, so a restart keeps it."""
        return self._d(".work", stage, *parts)

    def scorers_dir(self) -> Path:
        return self._d("scorers")

    def scorer(self, in_dist: str, method: str) -> Path:
        """A fitted scorer (stem; :mod:`diffpath.scoring.persist` adds its own suffixes)."""
        return self.scorers_dir() / in_dist / method

    def scorer_summary(self) -> Path:
        return self.scorers_dir() / "summary.json"

    def scores_dir(self) -> Path:
        return self._d("scores")

    def scores(self, in_dist: str) -> Path:
        """The test scores of every (method, data set) under one in-distribution set."""
        return self.scores_dir() / f"{in_dist}.npz"

    # reports ----------------------------------------------------------------------------------
    def results_csv(self) -> Path:
        return self._r("results.csv")

    def metrics_json(self) -> Path:
        return self._r("metrics.json")

    def tables_dir(self) -> Path:
        return self._r("tables")

    def figures_dir(self, stage: str) -> Path:
        return self._r("figures", stage)

    def site_dir(self) -> Path:
        """The study's pages: a static site, ``index.html`` its front page."""
        return self._r("site")

    def html(self, stage: str) -> Path:
        """A stage's executed notebook as one standalone page (a profile without the site)."""
        return self._r(f"{stage}.html")

    def base_model_dir(self) -> Path:
        """The base model's evaluation: loss curve, samples, metrics."""
        return self._r("base_model")

    def localization_csv(self) -> Path:
        return self._r("localization.csv")

    def localization_per_class_csv(self) -> Path:
        return self._r("localization_per_class.csv")

    def localization_json(self) -> Path:
        return self._r("localization.json")

    # the localisation paper profile (MVTec AD, VisA) ---------------------------------------------
    def reconstructions_dir(self, benchmark: str) -> Path:
        """Stable Diffusion round trips of a benchmark's test images, one ``<category>.npz`` each."""
        return self._d("reconstructions", benchmark)

    def industrial_dir(self) -> Path:
        return self._r("industrial")

    def industrial_csv(self, benchmark: str) -> Path:
        """Metrics per (row, map, category) of one benchmark, with the category mean."""
        return self.industrial_dir() / f"{benchmark}.csv"

    def industrial_summary_csv(self) -> Path:
        """The means of every benchmark beside DIVAD's published figures."""
        return self._r("industrial.csv")

    def industrial_json(self) -> Path:
        return self._r("industrial.json")

    def timesteps_csv(self) -> Path:
        """AUROC per (feature family, window of timesteps, pair): :mod:`diffpath.study.timesteps`."""
        return self._r("timesteps.csv")

    def timings(self, stage: str, item: str | None = None) -> Path:
        """Wall times of a stage's run: git-ignored and no DVC output, so that the results stay
        byte-identical from run to run."""
        return self._r("timings", f"{stage}{'_' + item if item else ''}.json")

    def executed_notebook(self, notebook: str, item: str | None = None) -> Path:
        stem = Path(notebook).stem
        return self._r("notebooks", f"{stem}{'_' + item if item else ''}.ipynb")


class StageInputError(RuntimeError):
    """A stage's input artifact is missing or unreadable; the stage runner prints it as one line."""


def read_npz(path: str | Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """All arrays (or ``keys``) of an artifact ``.npz``, read eagerly and without pickles.

    A missing, truncated or corrupt file raises :class:`StageInputError` naming the file and the
    fix (rebuild it with ``dvc repro``), instead of a traceback from deep inside numpy.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in (keys if keys is not None else z.files)}
    except FileNotFoundError:
        raise StageInputError(f"{path}: missing; run `dvc repro` to build it") from None
    except KeyError as exc:
        raise StageInputError(f"{path}: has no array {exc}; run `dvc repro` to rebuild it") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError …
        raise StageInputError(f"{path}: unreadable or truncated ({type(exc).__name__}: {exc}); "
                              "run `dvc repro` to rebuild it") from None


def read_prepared_x0(path: str | Path) -> np.ndarray:
    """The model inputs ``x0`` (N, C, H, W) of a prepared split, checked: a float array of four
    dimensions, holding at least one image, finite (no NaN or inf), in [-1, 1]. Anything else is a
    :class:`StageInputError` naming the file and the fix, before any model work."""
    x0 = read_npz(path, ("x0",))["x0"]
    fix = "rebuild it with `dvc repro` (the data stage)"
    if x0.dtype.kind != "f" or x0.ndim != 4 or len(x0) == 0:
        raise StageInputError(f"{path}: x0 is {x0.dtype} of shape {x0.shape}, expected float (N, C, H, W) "
                              f"with N ≥ 1; {fix}")
    bad = ~np.isfinite(x0).reshape(len(x0), -1).all(axis=1)
    if bad.any():
        raise StageInputError(f"{path}: x0 holds NaN or inf in {int(bad.sum())} of {len(x0)} images "
                              f"(first: image {int(np.flatnonzero(bad)[0])}); {fix}")
    lo, hi = float(x0.min()), float(x0.max())
    if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
        raise StageInputError(f"{path}: x0 must lie in [-1, 1], found values in [{lo:.3g}, {hi:.3g}]; {fix}")
    return x0


def load_cache(path: str | Path) -> dict[str, np.ndarray]:
    """An error cache of the study (the arrays of :func:`diffpath.cache.compute_cache`), read as
    every artifact is (:func:`read_npz`: :class:`StageInputError` naming the file and the fix)."""
    return read_npz(path)
