"""JupyterLab on the study's notebooks without changing the study: saving writes the committed file.

The notebooks under ``notebooks/`` are inputs of the pipeline (DVC hashes them) and are committed
without outputs. A learner who opens one in JupyterLab and runs it gets outputs, execution counts,
the kernel's ``language_info`` and per-cell timings in the editor; :func:`strip_on_save`, the
``pre_save_hook`` of the server's ``FileContentsManager`` (``make lab`` passes
``.jupyter/jupyter_server_config.py``), removes them from what is written, autosaves included:

* every code cell's outputs and execution count;
* per-cell metadata that records a session (:data:`SESSION_CELL_METADATA`: timings, scroll and
  collapse state, papermill's run record);
* the notebook's own metadata and ``nbformat_minor`` are those of the file already on disk (the
  committed kernelspec "Python (diffpath)"); a new notebook gets that kernelspec.

So opening and running a notebook leaves ``git status`` and ``dvc status`` clean: the file on disk
is never different from what was committed unless its cells' sources were edited. (A git filter
such as nbstripout would clean only what git sees, while DVC hashes the file on disk; pairing with
a text format would change how the pipeline reads its notebooks. A save hook keeps one file, the
one the pipeline runs.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffpath.study.kernel import KERNELSPEC

__all__ = ["SESSION_CELL_METADATA", "strip_notebook", "strip_on_save"]

#: cell metadata a session writes (JupyterLab's timings and view state, papermill's run record)
SESSION_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled", "jupyter", "papermill", "trusted")


def strip_notebook(nb: dict[str, Any], committed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``nb`` (an nbformat 4 dict, changed in place and returned) as it is committed: no outputs or
    execution counts, no session metadata in cells, and the notebook metadata and
    ``nbformat_minor`` of ``committed`` (the file on disk), or the study's kernelspec."""
    for cell in nb.get("cells", []):
        meta = cell.get("metadata", {})
        for key in SESSION_CELL_METADATA:
            meta.pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    if committed is not None:
        nb["metadata"] = json.loads(json.dumps(committed.get("metadata", {})))
        if "nbformat_minor" in committed:
            nb["nbformat_minor"] = committed["nbformat_minor"]
    else:
        nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
    return nb


def _on_disk(path: Path) -> dict[str, Any] | None:
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return nb if isinstance(nb, dict) else None


def strip_on_save(model: dict[str, Any], path: str, contents_manager: Any, **kwargs: Any) -> None:
    """jupyter_server's ``FileContentsManager.pre_save_hook``: a notebook's content is written as
    :func:`strip_notebook` makes it (other files untouched)."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    strip_notebook(model["content"], _on_disk(Path(contents_manager.root_dir) / path.strip("/")))
