"""environment.yml (conda-forge) lists the same dependencies as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "huggingface_hub": "huggingface-hub"}
NOT_PACKAGES = {"python", "pip"}


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(py["dependencies"])
    for extra in ("study", "dev"):
        wanted += py["optional-dependencies"][extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    got = {}
    for d in conda:
        name, spec = _split(d)
        if name in NOT_PACKAGES:
            continue
        got[CONDA_TO_PYPI.get(name, name).replace("_", "-")] = spec
    want = dict(_split(r) for r in wanted)
    assert got == want
    assert "conda-forge" in env["channels"]
