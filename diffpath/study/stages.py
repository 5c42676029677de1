"""The stages of the study: which notebook each runs and which ``params.yaml`` keys it reads.

Each DVC stage's command is ``python -m diffpath.study STAGE [ITEM]`` (:mod:`diffpath.study.__main__`),
which executes the stage's notebook through papermill (:mod:`diffpath.study.runner`) with exactly the
keys listed here as notebook parameters, so booleans, lists and nested mappings reach the notebook
intact. ``dvc.yaml`` is generated from these definitions (:mod:`diffpath.study.pipeline`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffpath.study.layout import Layout

__all__ = ["ROOT", "Stage", "STAGES", "SITE_PAGES", "PAPER_LOCALIZATION_STAGES", "PIPELINES", "stage_of",
           "stage_parameters", "load_params"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Stage:
    """A stage: its notebook, the params it reads, its foreach list, and what it reads and writes.

    ``params`` entries are dotted keys of ``params.yaml``, mapped to notebook parameters:

    * ``"section.*"``: every key of ``section`` becomes a notebook parameter of the same name;
    * ``"a.b as name"``: the value of ``a.b`` becomes the parameter ``name``;
    * ``"a.b"``: the value becomes the parameter ``b``.

    ``deps``, ``outs``, ``results`` (outputs committed to git), ``metrics`` and ``plots`` are
    paths from :class:`~diffpath.study.layout.Layout` (``${item}`` stands for the foreach item,
    ``${a.b}`` for a params value, as in ``dvc.yaml``). The package modules a stage runs are not
    listed here: :mod:`diffpath.study.pipeline` finds them from the notebook's imports.
    """

    notebook: str
    params: tuple[str, ...]
    item: str | None = None  # the name of the foreach parameter, if any
    foreach: str | None = None  # the params key that lists the items
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    plots: tuple[str | tuple[str, dict[str, Any]], ...] = ()
    site: bool = False  # after the notebook, build the study's pages (python -m diffpath.study.site)
    html: bool = False  # the executed notebook also as a standalone HTML page (outs[0]; a profile without pages)
    frozen: bool = False

    def dvc_params(self) -> list[str]:
        """The keys ``dvc.yaml`` declares for this stage."""
        return [p.split(" as ")[0].removesuffix(".*") for p in self.params]

    def executed_path(self, item: str | None = None, layout: Layout | None = None) -> str:
        """Where the executed notebook goes (``${layout.reports}/notebooks/...`` in ``dvc.yaml``;
        under ``layout``'s reports folder when a layout is given)."""
        return str((layout or _L).executed_notebook(self.notebook, item))


# Every path is under the profile's roots, so profiles never write over each other's results.
_L = Layout(data="${layout.data}", reports="${layout.reports}")
_I = "${item}"
_LAYOUT = ("layout.data as data_dir", "layout.reports as reports_dir")
_MODEL = ("model.spec as model_dir", "model.device as device", *_LAYOUT)
_MODEL_DEPS = ("${model.spec}", "${model.settings}")  # the weights and the file holding their settings
_RUN = ("model.precision", "model.channels_last", "model.compile", "model.cuda_graphs")
_BASE = _L.base_model_dir()
PUBLISHED_FILE = "diffpath/study/published.csv"  # the papers' figures the report puts beside ours

STAGES: dict[str, Stage] = {
    "base_model": Stage(
        "notebooks/00_base_model.ipynb", ("base_model.*",), frozen=True, results=("${base_model.out_dir}",)),
    "base_model_eval": Stage(
        "notebooks/01_base_model_eval.ipynb", (*_MODEL, "layout.downloads", "base_model_eval.*"), deps=_MODEL_DEPS,
        plots=(str(_BASE / "loss_per_timestep.png"), str(_BASE / "samples.png"),
               (str(_BASE / "loss_per_timestep.csv"), {"cache": False, "x": "timestep", "y": "loss_trained"})),
        metrics=(str(_BASE / "metrics.json"),)),
    "data": Stage(
        "notebooks/10_data.ipynb", (*_LAYOUT, "layout.downloads", "data.*"), item="dataset", foreach="data.datasets",
        outs=(str(_L.prepared_dir(_I)),)),
    "errors": Stage(
        "notebooks/20_errors.ipynb", (*_MODEL, *_RUN, "data.in_dist", "errors.*"), item="dataset",
        foreach="data.datasets", deps=(str(_L.prepared_dir(_I)), *_MODEL_DEPS), outs=(str(_L.errors_dir(_I)),)),
    "scorers": Stage(
        "notebooks/40_scorers.ipynb", (*_LAYOUT, "data.in_dist", "methods", "scorers.*"),
        deps=(str(_L.errors_dir("")).rstrip("/"),), outs=(str(_L.scorers_dir()),)),
    "evaluate": Stage(
        "notebooks/50_evaluate.ipynb", (*_LAYOUT, "data.in_dist", "data.datasets", "methods"),
        deps=(str(_L.errors_dir("")).rstrip("/"), str(_L.scorers_dir())), outs=(str(_L.scores_dir()),),
        results=(str(_L.results_csv()),), metrics=(str(_L.metrics_json()),)),
    "report": Stage(
        "notebooks/60_report.ipynb", (*_LAYOUT, "data.in_dist", "data.datasets", "methods", "report.*"),
        deps=(str(_L.results_csv()), str(_L.scores_dir()), PUBLISHED_FILE),
        results=(str(_L.tables_dir()),), plots=(str(_L.figures_dir("report")),)),
    "walkthrough": Stage(
        "notebooks/70_walkthrough.ipynb", (*_MODEL, "errors.steps", "errors.seed", "walkthrough.*"),
        deps=(str(_L.prepared_dir("")).rstrip("/"), str(_L.errors_dir("")).rstrip("/"), str(_L.scorers_dir()),
              str(_L.scores_dir()), str(_L.results_csv()), *_MODEL_DEPS),
        outs=(str(_L.figures_dir("walkthrough")),)),
    "localization": Stage(
        "notebooks/30_localization.ipynb", (*_MODEL, "localization.*"), deps=_MODEL_DEPS,
        outs=(str(_L.figures_dir("localization")),),
        results=(str(_L.localization_csv()), str(_L.localization_per_class_csv())),
        metrics=(str(_L.localization_json()),)),
    "localization_walkthrough": Stage(  # shows the table's maps: reads the table's settings
        "notebooks/35_localization_walkthrough.ipynb",
        (*_MODEL, *(f"localization.{k}" for k in ("rows", "n_per_class", "seed", "part", "batch_size", "feature_t",
                                                   "feature_layers", "smooth_sigma", "pool", "weights")),
         "localization_walkthrough.*"),
        deps=_MODEL_DEPS, outs=(str(_L.figures_dir("localization_walkthrough")),)),
    "timesteps": Stage(
        "notebooks/55_timesteps.ipynb", (*_LAYOUT, "data.in_dist", "data.datasets"),
        deps=(str(_L.errors_dir("")).rstrip("/"),), results=(str(_L.timesteps_csv()),),
        plots=(str(_L.figures_dir("timesteps")),)),
}

#: the study's pages (``python -m diffpath.study.site``): page name → the stage whose executed
#: notebook it shows, in the site's order; the front page is the ``site`` stage's own notebook
SITE_PAGES: dict[str, str] = {
    "index": "site",
    "walkthrough": "walkthrough",
    "localization_walkthrough": "localization_walkthrough",
    "report": "report",
    "localization": "localization",
    "timesteps": "timesteps",
    "base_model": "base_model_eval",
}

STAGES["site"] = Stage(  # the front page, then the site: after every page's stage
    "notebooks/90_site.ipynb", (*_LAYOUT, "data.in_dist", "data.datasets", "methods", "report.*"),
    deps=(str(_L.results_csv()), str(_L.localization_csv()), str(_L.timesteps_csv()),
          str(_BASE / "metrics.json"),
          *(STAGES[s].executed_path() for s in SITE_PAGES.values() if s != "site")),
    outs=(str(_L.site_dir()),), site=True)


# The localisation paper profile (DIVAD on MVTec AD and VisA): a pipeline of its own, which the
# profile switch installs as dvc.yaml (diffpath.study.localization_profile), so that the embedded
# profile's dvc repro never sees these stages and this profile's runs only them.
_IND = "industrial"
_IND_RUN = ("model.device as device", "industrial.batch_size", "industrial.num_threads", *_LAYOUT)
PAPER_LOCALIZATION_STAGES: dict[str, Stage] = {
    "industrial_data": Stage(
        "notebooks/80_industrial_data.ipynb",
        (*_LAYOUT, "layout.downloads", *(f"{_IND}.{k}" for k in ("roots", "categories", "model_size", "eval_size",
                                                                  "foreground_dir"))),
        item="benchmark", foreach="industrial.benchmarks", outs=(str(_L.prepared_dir(_I)),)),
    "industrial_reconstruct": Stage(
        "notebooks/81_industrial_reconstruct.ipynb",
        ("model.spec as model_dir", *_IND_RUN, *(f"{_IND}.{k}" for k in ("rows", "prompt", "guidance_scale", "vae",
                                                                          "seed", "eval_size"))),
        item="benchmark", foreach="industrial.benchmarks", deps=(str(_L.prepared_dir(_I)), "${model.spec}"),
        outs=(str(_L.reconstructions_dir(_I)),)),
    "industrial_evaluate": Stage(
        "notebooks/82_industrial_evaluate.ipynb",
        ("model.dino as dino_dir", *_IND_RUN, *(f"{_IND}.{k}" for k in ("rows", "maps", "sigma", "n_figure"))),
        item="benchmark", foreach="industrial.benchmarks",
        deps=(str(_L.prepared_dir(_I)), str(_L.reconstructions_dir(_I)), "${model.dino}"),
        outs=(str(_L.figures_dir(f"industrial_{_I}")),), results=(str(_L.industrial_csv(_I)),)),
    "industrial_report": Stage(
        "notebooks/83_industrial_report.ipynb",
        (*_LAYOUT, "industrial.benchmarks", "industrial.rows", "industrial.maps", "report.published"),
        deps=(str(_L.industrial_dir()), "${report.published}"), outs=(str(_L.html("industrial_report")),),
        results=(str(_L.industrial_summary_csv()), str(_L.tables_dir() / "industrial")),
        metrics=(str(_L.industrial_json()),), html=True),
}
#: every pipeline by profile: the study's (embedded and paper profiles) and the localisation paper profile's
PIPELINES: dict[str, dict[str, Stage]] = {"study": STAGES, "paper-localization": PAPER_LOCALIZATION_STAGES}


def stage_of(name: str) -> Stage:
    """The stage called ``name`` in any pipeline."""
    for stages in PIPELINES.values():
        if name in stages:
            return stages[name]
    raise ValueError(f"unknown stage {name!r}; stages: {', '.join(n for s in PIPELINES.values() for n in s)}")


def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    with open(path) as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


def _get(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"params.yaml has no key {dotted!r}")
        node = node[part]
    return node


def stage_parameters(stage: str, params: Mapping[str, Any], item: str | None = None) -> dict[str, Any]:
    """The notebook parameters of ``stage`` (see :class:`Stage`), plus the foreach item."""
    st = stage_of(stage)
    out: dict[str, Any] = {}
    for entry in st.params:
        key, _, name = entry.partition(" as ")
        if key.endswith(".*"):
            section = _get(params, key[:-2])
            if not isinstance(section, Mapping):
                raise ValueError(f"params.yaml: {key[:-2]!r} must be a mapping")
            for k, v in section.items():
                out[k] = copy.deepcopy(v)
        else:
            out[name or key.split(".")[-1]] = copy.deepcopy(_get(params, key))
    if st.item is not None:
        if item is None:
            raise ValueError(f"stage {stage!r} needs an item ({st.item})")
        out[st.item] = item
    elif item is not None:
        raise ValueError(f"stage {stage!r} takes no item")
    return out
