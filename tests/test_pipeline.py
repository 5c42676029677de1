"""dvc.yaml is generated from the stages and the code they import; notebooks open with the
study's parameters; params.yaml describes the committed base model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from diffpath.study.pipeline import (
    dvc_yaml,
    module_closure,
    notebook_defaults,
    notebook_imports,
    stage_code_deps,
    stage_defaults,
    sync_notebook_defaults,
)
from diffpath.study.stages import STAGES, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_the_generated_one():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), (
        "dvc.yaml is stale: run `python -m diffpath.study.pipeline --write-dvc-yaml` and commit it")


def test_every_stage_depends_on_every_module_its_notebook_runs():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in STAGES.items():
        stage = dvc[name]["do"] if "foreach" in dvc[name] else dvc[name]
        missing = sorted(set(stage_code_deps(st)) - set(stage["deps"]))
        assert not missing, f"stage {name} runs {missing} but does not depend on them"
    # the case that was missed before: scorers and evaluate compute DiffPathV2 features
    scorers = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["scorers"]["deps"]
    assert "diffpath/methods/diffpathv2.py" in scorers and "diffpath/methods/registry.py" in scorers


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


def test_closure_follows_function_level_relative_and_package_imports(tmp_path):
    root = _package(tmp_path, {
        "diffpath/__init__.py": "",
        "diffpath/a/__init__.py": "from diffpath.a.b import f\n",
        "diffpath/a/b.py": "def f():\n    from .c import g\n    return g()\n",
        "diffpath/a/c.py": "from diffpath import d\n",
        "diffpath/d.py": "import numpy\n",
        "diffpath/unused.py": "",
        "nb.ipynb": json.dumps({"cells": [{"cell_type": "code", "source": ["%matplotlib inline\n",
                                                                            "from diffpath.a import f\n"]}]}),
    })
    assert notebook_imports(root / "nb.ipynb") == {"diffpath.a", "diffpath.a.f"}
    got = [str(p) for p in module_closure(notebook_imports(root / "nb.ipynb"), root)]
    assert got == ["diffpath/__init__.py", "diffpath/a/__init__.py", "diffpath/a/b.py", "diffpath/a/c.py",
                   "diffpath/d.py"]


def test_notebooks_open_with_what_the_pipeline_passes_them():
    """Run All in JupyterLab reproduces the stage: every parameter the stage passes from
    params.yaml is the notebook's default (the foreach item: the first of its list)."""
    params = load_params(ROOT / "params.yaml")
    for name, st in STAGES.items():
        defaults = notebook_defaults(ROOT / st.notebook)
        want = stage_defaults(name, params)
        wrong = {k: (defaults.get(k, "<missing>"), v) for k, v in want.items() if defaults.get(k, "<missing>") != v}
        assert not wrong, f"{st.notebook}: (notebook default, params.yaml) differ for {wrong}; " \
                          "run `python -m diffpath.study.pipeline --sync-notebooks`"


def test_sync_keeps_comments_and_other_lines(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [],
                     "source": ["# Parameters\n", "a = 1      # the a\n", "b = \"x\"\n", "c = None  # kept"]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    f = tmp_path / "n.ipynb"
    f.write_text(json.dumps(nb))
    assert sync_notebook_defaults(f, {"a": [1, 2], "b": "y", "z": 3})
    src = "".join(json.loads(f.read_text())["cells"][0]["source"])
    assert src == '# Parameters\na = [1, 2]  # the a\nb = "y"\nc = None  # kept'
    assert notebook_defaults(f) == {"a": [1, 2], "b": "y", "c": None}
    assert not sync_notebook_defaults(f, {"a": [1, 2]})
    assert sync_notebook_defaults(f, {"a": 7})  # a short value keeps the comment's column
    assert "".join(json.loads(f.read_text())["cells"][0]["source"]).splitlines()[1] == "a = 7       # the a"


def test_params_describe_the_committed_base_model():
    params = load_params(ROOT / "params.yaml")["base_model"]
    config = json.loads((ROOT / params["out_dir"] / "train_config.json").read_text())
    for key in ("steps", "batch_size", "lr", "lr_schedule", "warmup_steps", "ema_decay", "seed", "checkpoint_every",
                "log_every"):
        assert params[key] == config[key], f"params.yaml base_model.{key}={params[key]!r}, model: {config[key]!r}"
    assert config["steps_completed"] == params["steps"]
    for key in ("block_out_channels", "layers_per_block", "norm_num_groups", "add_attention"):
        assert params[key] == config["unet"][key], key
