"""Run a stage of the study: a parameterised notebook executed by papermill.

Each DVC stage's command is ``python -m diffpath.study STAGE [ITEM]``. This module knows, for
every stage, which notebook it runs and which keys of ``params.yaml`` it reads; it passes exactly
those keys to the notebook through papermill's Python API, so booleans, lists and nested mappings
reach the notebook intact (``dvc.yaml`` declares the same keys, and a test checks that the two
agree). The executed notebook is written to ``reports/notebooks/``.

Examples::

    python -m diffpath.study errors fashion_mnist        # one foreach item of the errors stage
    python -m diffpath.study scorers -p scorers.kde.bandwidth=2.0
    python -m diffpath.study --list
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffpath.study.layout import Layout, StageInputError

__all__ = ["Stage", "STAGES", "stage_parameters", "run_stage", "render_html", "load_params", "main"]

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
    html: bool = False
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
        deps=(str(_L.results_csv()), str(_L.scores_dir())), outs=(str(_L.html("report")),),
        results=(str(_L.tables_dir()),), plots=(str(_L.figures_dir("report")),), html=True),
    "walkthrough": Stage(
        "notebooks/70_walkthrough.ipynb", (*_MODEL, "errors.steps", "errors.seed", "walkthrough.*"),
        deps=(str(_L.prepared_dir("")).rstrip("/"), str(_L.errors_dir("")).rstrip("/"), str(_L.scorers_dir()),
              *_MODEL_DEPS),
        outs=(str(_L.html("walkthrough")), str(_L.figures_dir("walkthrough"))), html=True),
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
        deps=_MODEL_DEPS, outs=(str(_L.html("localization_walkthrough")),
                                str(_L.figures_dir("localization_walkthrough"))), html=True),
    "timesteps": Stage(
        "notebooks/55_timesteps.ipynb", ("data.in_dist", "data.datasets"),
        deps=(str(_L.errors_dir("")).rstrip("/"),), results=(str(_L.timesteps_csv()),),
        plots=(str(_L.figures_dir("timesteps")),)),
}


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


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)


def stage_parameters(stage: str, params: Mapping[str, Any], item: str | None = None) -> dict[str, Any]:
    """The notebook parameters of ``stage`` (see :class:`Stage`), plus the foreach item."""
    st = STAGES[stage]
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


def _override(params: dict[str, Any], assignments: Sequence[str]) -> None:
    for a in assignments:
        if "=" not in a:
            raise ValueError(f"-p expects key=value, got {a!r}")
        key, raw = a.split("=", 1)
        _set(params, key, yaml.safe_load(raw))


def run_stage(
    stage: str,
    item: str | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    params_file: str | os.PathLike = "params.yaml",
    output: str | os.PathLike | None = None,
    cwd: str | os.PathLike | None = None,
    progress: bool = False,
) -> Path:
    """Execute the stage's notebook with its parameters; returns the executed notebook's path."""
    import papermill as pm

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    p = dict(params) if params is not None else load_params(cwd / params_file)
    nb_params = stage_parameters(stage, p, item)
    st = STAGES[stage]
    layout = Layout.of(p)
    out = Path(output) if output is not None else cwd / st.executed_path(item, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    notebook = cwd / st.notebook if (cwd / st.notebook).is_file() else ROOT / st.notebook
    try:
        with _kernel_env(TQDM_DISABLE="1"):  # no progress bars (with timings) in the record
            pm.execute_notebook(
                str(notebook),
                str(out),
                parameters=nb_params,
                cwd=str(cwd),
                progress_bar=progress,
                kernel_name="python3",
            )
    except pm.PapermillExecutionError as exc:
        if exc.ename == StageInputError.__name__:  # a bad input artifact: one line, not a traceback
            raise StageInputError(f"stage {stage}: {exc.evalue} (executed notebook: {out})") from None
        raise
    normalize_executed(out, st.notebook, st.executed_path(item, layout), root=cwd)
    return out


@contextmanager
def _kernel_env(**env: str) -> Iterator[None]:
    """Set environment variables for the kernels started inside the block (they inherit ours)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: papermill's and Jupyter's per-run metadata: wall-clock times, absolute paths
_RUN_METADATA = ("duration", "start_time", "end_time")


def normalize_executed(path: str | os.PathLike, notebook: str, output: str,
                       root: str | os.PathLike | None = None) -> None:
    """Make an executed notebook a function of its inputs: drop the times papermill and the kernel
    record (per notebook and per cell), write the notebook's paths relative to the study root
    (``root``, as it appears in printed text and warnings too: ``.``), and give papermill's injected
    cell a fixed id, so that a rerun with the same code, params and data gives the same bytes in
    any clone."""
    import json

    from diffpath.io import write_text_atomic

    nb = json.loads(Path(path).read_text())
    pm_meta = nb.get("metadata", {}).get("papermill", {})
    for key in _RUN_METADATA:
        pm_meta.pop(key, None)
    pm_meta.update(input_path=notebook, output_path=output)
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        meta.pop("execution", None)
        if "injected-parameters" in meta.get("tags", []):
            cell["id"] = "injected-parameters"  # papermill draws a random id for the cell it adds
        for key in _RUN_METADATA:
            meta.get("papermill", {}).pop(key, None)
        if "outputs" in cell:
            cell["outputs"] = _merge_streams(cell["outputs"])
        if root is not None:
            for out in cell.get("outputs", []):
                _relative_text(out, str(Path(root).resolve()))
    write_text_atomic(path, json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def _merge_streams(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive outputs of one stream (stdout or stderr) into one, text split into lines.

    How the kernel chunks printed text into stream messages depends on timing (when its buffer is
    flushed), so the same prints can come back as one output or several."""
    merged: list[dict[str, Any]] = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.get("output_type") == "stream" and prev is not None
                and prev.get("output_type") == "stream" and prev.get("name") == out.get("name")):
            prev["text"] = _as_text(prev["text"]) + _as_text(out["text"])
        else:
            merged.append(dict(out))
    for out in merged:
        if out.get("output_type") == "stream":
            out["text"] = _as_text(out["text"]).splitlines(keepends=True)
    return merged


def _as_text(text: str | list[str]) -> str:
    return text if isinstance(text, str) else "".join(text)


def _relative_text(output: dict[str, Any], root: str) -> None:
    """Replace the absolute study root by ``.`` in an output's text (streams, text/plain, errors)."""
    def fix(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace(root, ".")
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    if "text" in output:
        output["text"] = fix(output["text"])
    data = output.get("data", {})
    for mime in ("text/plain", "text/html", "text/markdown"):
        if mime in data:
            data[mime] = fix(data[mime])
    if "traceback" in output:
        output["traceback"] = fix(output["traceback"])


def render_html(notebook: str | os.PathLike, target: str | os.PathLike) -> None:
    """Render an executed notebook to a standalone HTML page (atomically)."""
    import nbformat
    from nbconvert import HTMLExporter

    from diffpath.io import write_text_atomic

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    write_text_atomic(target, body)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study", description=__doc__.split("\n")[0])
    ap.add_argument("stage", nargs="?", help=f"one of: {', '.join(STAGES)}")
    ap.add_argument("item", nargs="?", help="the foreach item (data set) of data/errors")
    ap.add_argument("--params", default="params.yaml", help="parameters file (default params.yaml)")
    ap.add_argument("-p", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter for this run only (YAML value)")
    ap.add_argument("--html", metavar="FILE", help="also render the executed notebook to HTML")
    ap.add_argument("--list", action="store_true", help="list the stages and their parameters")
    ap.add_argument("--write-dvc-yaml", action="store_true",
                    help="regenerate dvc.yaml from the stages, the layout and the notebooks' imports")
    ap.add_argument("--sync-notebooks", action="store_true",
                    help="set each stage notebook's parameters cell to what params.yaml passes it")
    args = ap.parse_args(argv)
    if args.write_dvc_yaml:
        from diffpath.io import write_text_atomic
        from diffpath.study.pipeline import dvc_yaml

        write_text_atomic(ROOT / "dvc.yaml", dvc_yaml())
        print(f"wrote {ROOT / 'dvc.yaml'}", file=sys.stderr)
        return 0
    if args.sync_notebooks:
        from diffpath.study.pipeline import stage_defaults, sync_notebook_defaults

        params = load_params(args.params)
        for name, st in STAGES.items():
            if sync_notebook_defaults(ROOT / st.notebook, stage_defaults(name, params)):
                print(f"updated the parameters cell of {st.notebook}", file=sys.stderr)
        return 0
    if args.list or not args.stage:
        for name, st in STAGES.items():
            print(f"{name:16s} {st.notebook:36s} params: {', '.join(st.params)}"
                  + (f"  foreach: {st.item}" if st.item else ""))
        return 0
    try:
        params = load_params(args.params)
        _override(params, args.overrides)
        out = run_stage(args.stage, args.item, params=params, progress=sys.stderr.isatty())
        if args.html:
            render_html(out, args.html)
    except (ValueError, KeyError, FileNotFoundError, StageInputError) as exc:
        print(f"diffpath.study: error: {exc}", file=sys.stderr)
        return 2
    print(f"executed {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
