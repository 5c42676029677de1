"""JupyterLab does not dirty the study: a notebook run and saved through the server that `make lab`
configures (.jupyter/jupyter_server_config.py) is written back byte for byte as committed, so git
and DVC (which hashes the file's bytes) see no change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".jupyter" / "jupyter_server_config.py"


def _contents_manager(root_dir: Path):
    """jupyter_server's FileContentsManager with the configuration `make lab` passes."""
    from jupyter_server.services.contents.filemanager import FileContentsManager
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader(CONFIG.name, path=str(CONFIG.parent)).load_config()
    return FileContentsManager(root_dir=str(root_dir), config=config)


def test_make_lab_passes_the_configuration():
    make = (ROOT / "Makefile").read_text()
    lab = make[make.index("\nlab:"):]
    assert "--config=.jupyter/jupyter_server_config.py" in lab.split("\n\n")[0]
    assert _contents_manager(ROOT).pre_save_hook is not None  # the file loads and sets the hook
    text = CONFIG.read_text()
    assert 'default_kernel_name = "diffpath"' in text and "diffpath.study.lab.strip_on_save" in text


def test_running_and_saving_a_notebook_writes_the_committed_file(tmp_path):
    """Run All in a kernel started in notebooks/ (as JupyterLab starts it), add what JupyterLab
    adds (timings, scroll state), save through the configured contents manager: the file is the
    committed one, byte for byte, with no outputs and the committed kernelspec."""
    import nbformat
    from nbclient import NotebookClient

    from diffpath.study.kernel import KERNEL_NAME, StudyKernelManager

    committed = ROOT / "notebooks" / "10_data.ipynb"
    (tmp_path / "notebooks").mkdir()
    shutil.copy(committed, tmp_path / "notebooks" / committed.name)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"profile": "scratch"}))  # the study's root
    nb = nbformat.read(tmp_path / "notebooks" / committed.name, as_version=4)
    NotebookClient(nb, kernel_name=KERNEL_NAME, kernel_manager_class=StudyKernelManager, timeout=300,
                   resources={"metadata": {"path": str(tmp_path / "notebooks")}}).execute()
    assert sum(len(c.get("outputs", [])) for c in nb.cells) > 0 and nb.metadata["language_info"].get("version")
    assert (tmp_path / "data/prepared/fashion_mnist/test.npz").is_file()  # it ran, from notebooks/
    for cell in nb.cells:
        cell.metadata["execution"] = {"iopub.status.idle": "2030-01-01T00:00:00Z"}
        cell.metadata["scrolled"] = True
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    model = {"type": "notebook", "format": "json", "content": json.loads(nbformat.writes(nb))}
    _contents_manager(tmp_path / "notebooks").save(model, committed.name)
    saved = (tmp_path / "notebooks" / committed.name).read_bytes()
    assert saved == committed.read_bytes()
    back = json.loads(saved)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in back["cells"] if c["cell_type"] == "code")
    assert back["metadata"]["kernelspec"] == {"display_name": "Python (diffpath)", "language": "python", "name": "diffpath"}


def test_every_notebook_names_the_study_kernel():
    from diffpath.study.kernel import KERNELSPEC

    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert json.loads(nb.read_text())["metadata"]["kernelspec"] == KERNELSPEC, nb.name


@pytest.mark.parametrize("on_disk", [True, False])
def test_the_save_hook_keeps_sources_and_only_touches_notebooks(tmp_path, on_disk):
    """An edited source is saved (the hook strips results, not work); a new notebook gets the
    study's kernelspec; other files are saved as they are."""
    import nbformat

    cm = _contents_manager(tmp_path)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1  # edited", execution_count=3,
                                                                   outputs=[nbformat.v4.new_output("stream", text="1")])])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    if on_disk:
        (tmp_path / "n.ipynb").write_text(json.dumps({"cells": [], "metadata": {"kernelspec": {"name": "diffpath"}},
                                                      "nbformat": 4, "nbformat_minor": 5}))
    cm.save({"type": "notebook", "format": "json", "content": json.loads(nbformat.writes(nb))}, "n.ipynb")
    back = json.loads((tmp_path / "n.ipynb").read_text())
    assert "".join(back["cells"][0]["source"]) == "x = 1  # edited" and back["cells"][0]["outputs"] == []
    assert back["metadata"]["kernelspec"]["name"] == "diffpath"
    cm.save({"type": "file", "format": "text", "content": '{"outputs": [1]}'}, "other.json")
    assert (tmp_path / "other.json").read_text() == '{"outputs": [1]}'
