"""Executing a stage: its notebook through papermill, then a byte-stable record.

:func:`run_stage` checks the stage's parameters (:func:`~diffpath.study.params_check.
check_stage_params`: one line naming the stage and the parameter, before any kernel starts), passes
them (:func:`~diffpath.study.stages.stage_parameters`) to its notebook and writes the executed
notebook under the profile's ``reports/notebooks/``, only when the stage succeeds (a failed stage
leaves no executed notebook behind); :func:`normalize_executed` makes that record a function of
its inputs (no run times, relative paths, fixed ids). The kernel is the study's own
(:mod:`diffpath.study.kernel`); the study's pages are built from the records by
:mod:`diffpath.study.site`; :func:`render_html` renders one record alone (a profile without pages).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from diffpath.io import write_text_atomic
from diffpath.study.kernel import study_kernel
from diffpath.study.layout import Layout, StageInputError
from diffpath.study.params_check import check_stage_params
from diffpath.study.stages import ROOT, load_params, stage_of, stage_parameters

__all__ = ["run_stage", "normalize_executed", "render_html", "apply_overrides", "stage_label", "progress_bar"]


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)


def apply_overrides(params: dict[str, Any], assignments: Sequence[str]) -> None:
    """Set ``key=value`` assignments (dotted keys, YAML values) in ``params``, in place."""
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
    """Execute the stage's notebook with its parameters; returns the executed notebook's path.

    Raises:
        ParamError: a bad parameter (before anything runs); StageInputError: a bad input artifact.
    """
    st = stage_of(stage)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    p = dict(params) if params is not None else load_params(cwd / params_file)
    nb_params = stage_parameters(stage, p, item)
    check_stage_params(stage, p, item)
    layout = Layout.of(p)
    out = Path(output) if output is not None else cwd / st.executed_path(item, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    notebook = cwd / st.notebook if (cwd / st.notebook).is_file() else ROOT / st.notebook
    tmp = out.with_name(f".{out.stem}.running{out.suffix}")
    try:
        _execute(stage, notebook, tmp, nb_params, cwd, progress_bar(stage, item) if progress else False)
        normalize_executed(tmp, st.notebook, st.executed_path(item, layout), root=cwd)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _execute(stage: str, notebook: Path, out: Path, parameters: dict[str, Any], cwd: Path,
             bar: Any) -> None:
    """papermill, with a bad input artifact (:class:`StageInputError` in the notebook) as one line."""
    import papermill as pm

    try:
        with _kernel_env(TQDM_DISABLE="1"), study_kernel() as kernel:  # no progress bars (timings) in the record
            pm.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(cwd), progress_bar=bar,
                                **kernel)
    except pm.PapermillExecutionError as exc:
        if exc.ename == StageInputError.__name__:  # a bad input artifact: one line, not a traceback
            raise StageInputError(f"stage {stage}: {exc.evalue}") from None
        raise


def stage_label(stage: str, item: str | None = None) -> str:
    """The stage's name as DVC prints it: ``errors@mnist`` for a foreach item."""
    return f"{stage}@{item}" if item is not None else stage


def progress_bar(stage: str, item: str | None = None) -> dict[str, Any]:
    """papermill's per-cell bar for a terminal, named after the stage and erased when the stage
    ends (its one line, printed by ``python -m diffpath.study``, takes the bar's place)."""
    import tqdm  # noqa: F401  imported before TQDM_DISABLE is set for the kernel: this bar stays on

    return {"desc": stage_label(stage, item), "leave": False}


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


_WIDGET = "application/vnd.jupyter.widget-view+json"


def normalize_executed(path: str | os.PathLike, notebook: str, output: str,
                       root: str | os.PathLike | None = None) -> None:
    """Make an executed notebook a function of its inputs: drop the times papermill and the kernel
    record (per notebook and per cell) and the widgets (tqdm's bars, under random ids), write the
    notebook's paths relative to the study root
    (``root``, as it appears in printed text and warnings too: ``.``), and give papermill's injected
    cell a fixed id, so that a rerun with the same code, params and data gives the same bytes in
    any clone."""
    nb = json.loads(Path(path).read_text())
    nb.get("metadata", {}).pop("widgets", None)  # live widgets' state, under random ids
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
        if "outputs" in cell:  # progress-bar widgets (random model ids) are live only, never recorded
            cell["outputs"] = _merge_streams([o for o in cell["outputs"] if _WIDGET not in o.get("data", {})])
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

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    write_text_atomic(target, body)
