"""The environment files agree: pyproject.toml (lower bounds, the package's API), the locks
(requirements/*.lock.txt, exact versions + hashes, made by `make lock`), environment.yml
(conda-forge) and, when the tests run in the project's .venv, the installed packages.

The rule for environment.yml: it lists exactly pyproject's dependencies (core, [study],
[dev]) under their conda-forge names, each pinned ``==`` to the CPU lock's version (the
public part: torch 2.13.0+cpu -> pytorch==2.13.0). The transitive packages are left to
conda's solver: conda-forge builds and splits packages differently from PyPI, so a
package-by-package copy of the pip lock would not solve.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "cpu.lock.txt"
GPU_LOCK = ROOT / "requirements" / "paper-gpu.lock.txt"
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "huggingface_hub": "huggingface-hub"}
NOT_PACKAGES = {"python", "pip"}
# what the GPU lock may change with respect to the CPU lock: the torch build and what it brings, and
# the paper sets' downloaders (pyproject's [paper] extra: torchvision, gdown and gdown's PySocks)
GPU_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|cuda|gdown|pysocks)$")


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _wanted(extras=("study", "dev")) -> list[Requirement]:
    py = _pyproject()
    reqs = list(py["dependencies"])
    for extra in extras:
        reqs += py["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _read_lock(path: Path) -> dict[str, str]:
    """{canonical name: exact version} of a pip-compile lock; checks every entry is hashed."""
    pins: dict[str, str] = {}
    hashed: set[str] = set()
    entry = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+?)\s*\\?$", line)
            assert m, f"{path.name}: not an exact pin: {line!r}"
            entry = canonicalize_name(m.group(1))
            assert entry not in pins, f"{path.name}: {entry} pinned twice"
            pins[entry] = m.group(2)
        elif "--hash=sha256:" in line:
            hashed.add(entry)
    # pip's --require-hashes needs a hash on every line
    assert set(pins) == hashed, f"{path.name}: entries without hashes: {sorted(set(pins) - hashed)}"
    return pins


def test_lock_covers_pyproject_within_its_bounds():
    lock = _read_lock(LOCK)
    assert len(lock) > 50
    for req in _wanted():
        name = canonicalize_name(req.name)
        assert name in lock, f"{name} is in pyproject.toml but not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} breaks {req}"
    assert "jupyterlab" in lock  # `make lab`
    # the CPU build of torch, from the wheel on the machine's disk (see requirements/cpu.in)
    assert lock["torch"] == "2.13.0+cpu"
    assert "Python 3.11" in LOCK.read_text().split("\n\n")[0]


def test_gpu_lock_differs_only_in_the_torch_build():
    cpu, gpu = _read_lock(LOCK), _read_lock(GPU_LOCK)
    for req in _wanted(("study", "dev", "paper")):
        name = canonicalize_name(req.name)
        assert name in gpu and req.specifier.contains(gpu[name], prereleases=True), (name, gpu.get(name))
    # the torchvision release built for the CUDA torch on this disk (x86_64)
    assert (gpu["torch"], gpu["torchvision"]) == ("2.14.1", "0.29.1") and "gdown" in gpu and "gdown" not in cpu
    moved = {n for n in cpu.keys() | gpu.keys() if cpu.get(n) != gpu.get(n) and not GPU_ONLY.match(n)}
    assert not moved, f"the GPU lock moved more than the torch build: {sorted(moved)}"


def test_lock_inputs_are_committed_with_the_lock():
    """`make lock` compiles these: pyproject.toml and requirements/*.in."""
    assert (ROOT / "requirements" / "cpu.in").read_text().count("torch==2.13.0") == 1
    gpu_in = (ROOT / "requirements" / "paper-gpu.in").read_text()
    assert "torch==2.14.1" in gpu_in and "torchvision==0.29.1" in gpu_in
    make = (ROOT / "Makefile").read_text()
    assert "--require-hashes --no-deps -r" in make and "\nlock:" in make and "\nlab:" in make


def test_environment_matches_pyproject_and_lock():
    wanted = {_split(str(r))[0]: r for r in _wanted()}
    lock = _read_lock(LOCK)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    got = {}
    for d in conda:
        name, spec = _split(d)
        if name in NOT_PACKAGES:
            continue
        got[CONDA_TO_PYPI.get(name, name).replace("_", "-")] = spec
    assert set(got) == set(wanted), "environment.yml and pyproject.toml list different packages"
    for name, spec in got.items():
        locked = Version(lock[canonicalize_name(name)]).public
        assert spec == f"=={locked}", f"environment.yml: {name}{spec}, the lock has {locked}"
    assert "python=3.11" in conda  # the Python the lock is compiled for
    assert "conda-forge" in env["channels"]


def _installed_lock() -> Path:
    """The lock this .venv was installed from (`make setup` writes its sha256 to .venv/.installed)."""
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip(f"not running in the project's venv ({venv}) but in {sys.prefix}")
    stamp = venv / ".installed"
    m = re.match(r"^([0-9a-f]{64})\s+\*?(\S+)\s*$", stamp.read_text() if stamp.exists() else "")
    if not m:
        pytest.skip(".venv was not installed from a lock (no sha256 in .venv/.installed): run `make setup`")
    lock = ROOT / m.group(2)
    if not lock.exists() or hashlib.sha256(lock.read_bytes()).hexdigest() != m.group(1):
        pytest.skip(f".venv was installed from an older {m.group(2)}: run `make setup` to install the lock")
    return lock


def test_venv_equals_the_lock():
    """`pip freeze` of .venv equals the lock for every locked package."""
    lock_path = _installed_lock()
    lock = _read_lock(lock_path)
    wrong = {}
    for name, version in lock.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            found = None
        if found is None or Version(found) != Version(version):
            wrong[name] = (version, found)
    assert not wrong, f"{lock_path.name} vs .venv (locked, installed): {wrong}"
