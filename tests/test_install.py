"""Installing the paper profile's packages can never leave an environment broken, the Makefile
notices an environment that no longer equals its lock, and ``make paper`` picks the GPU lock when
``nvidia-smi`` lists a GPU.

The install test runs the profile's real install step in a scratch virtual environment made with
the real ``python -m venv`` (so the real pip uninstalls and the rollback really happens); torch,
diffusers and the rest of the CPU lock are seen through a ``.pth`` file, and "pip install" is a fake
that installs a torchvision whose import raises, as the generic PyPI wheel does next to a ``+cpu``
torch (``operator torchvision::nms does not exist``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from diffpath.study.lockcheck import (EXTRAS_FILE, canonical, lock_differences, read_lock, record_extras,
                                      recorded_extras)

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "cpu.lock.txt"
BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'
# A torchvision of another release that imports cleanly: diffusers and transformers import parts of
# it (interpolation modes, pil_to_tensor, torchvision.io, ...) when they import their models, so every
# torchvision.* submodule is made on import and every name in it resolves to a stand-in class.
HARMLESS_INIT = '''__version__ = "0.1.0"
import importlib, importlib.abc, importlib.machinery, sys, types


class _AnyAttr(type):
    def __getattr__(cls, name):
        return cls


class Anything(metaclass=_AnyAttr):
    def __init__(self, *args, **kwargs):
        pass


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.insert(0, _Submodules())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return importlib.import_module(f"{__name__}.{name}")
'''
HARMLESS = {"torchvision/__init__.py": HARMLESS_INIT}


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel that the real pip installs offline."""
    info = f"{name}-{version}.dist-info"
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    meta = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
            f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    entries = {**files, **meta}
    record = "".join(f"{p},,\n" for p in entries) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for p, text in {**entries, f"{info}/RECORD": record}.items():
            z.writestr(p, text)
    return whl


def _locked_view(folder: Path) -> Path:
    """Links to this environment's site-packages, minus the distributions the CPU lock does not list
    (so the scratch environment sees what `make setup` installs, and nothing else)."""
    lock = read_lock(LOCK)
    skip = set()
    for d in md.distributions():
        name = canonical(d.metadata["Name"] or "")
        if name not in lock:
            skip |= {Path(f).parts[0] for f in d.files or []}
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if entry.name not in skip and not entry.name.endswith(".pth"):
            (folder / entry.name).symlink_to(entry)
    return folder


FAKE_PIP = '''import subprocess, sys
from pathlib import Path
python, wheels, *args = sys.argv[1:]
asked = [a.split("==")[0] for a in args[1:] if a.startswith(("torchvision", "gdown"))]
if args[:1] == ["install"] and asked:  # the index's wheels, here: local ones, installed by the real pip
    found = [str(next(Path(wheels).glob(n + "-*.whl"))) for n in asked]
    sys.exit(subprocess.call([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *found]))
sys.exit(subprocess.call([python, "-m", "pip", *args]))
'''


@pytest.fixture
def scratch_env(tmp_path):
    """A real venv that sees the CPU lock's packages and this checkout, holding a torchvision of
    the wrong release (harmless: the study's imports work with it)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_lock_view.pth").write_text(f"{_locked_view(tmp_path / 'view')}\n{ROOT}\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    old = _wheel(tmp_path, "torchvision", "0.1.0", HARMLESS)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(old)], check=True)
    _wheel(wheels, "torchvision", "0.28.0", {"torchvision/__init__.py": BROKEN})
    _wheel(wheels, "gdown", "5.2.0", {"gdown/__init__.py": "\n"})
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    return py, site, f"{sys.executable} {tmp_path / 'fake_pip.py'} {py} {wheels}"


def _versions(py: str) -> dict[str, str]:
    code = "import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in ('torchvision', 'gdown') " \
           "if any(d.metadata['Name'] == n for d in m.distributions())}))"
    return json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_a_broken_install_is_undone_and_the_message_says_so(scratch_env):
    py, site, fake_pip = scratch_env
    assert _versions(py) == {"torchvision": "0.1.0"}
    env = {**os.environ, "DIFFPATH_PIP": fake_pip, "PYTHONPATH": ""}
    r = subprocess.run([py, "-m", "diffpath.study.profiles", "install"], env=env, capture_output=True, text=True)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr
    assert "installed into" in err and "gdown 5.2.0, torchvision 0.28.0 (replacing 0.1.0)" in err
    assert "RuntimeError: operator torchvision::nms does not exist" in err
    assert "undone: uninstalled gdown 5.2.0, torchvision 0.28.0; put back torchvision 0.1.0" in err
    assert "the environment is as before" in err and "nothing was changed" not in err
    # really as before: the same versions, diffusers' UNet imports, nothing recorded as a kept extra
    assert _versions(py) == {"torchvision": "0.1.0"}
    subprocess.run([py, "-c", "import diffusers.models.unets.unet_2d"], check=True, capture_output=True)
    assert not (Path(site).parents[2] / EXTRAS_FILE).exists()


# --------------------------------------------------------------------------------------------
# the lock check of every make target that runs the study


def test_lock_differences_names_what_differs():
    lock = {"torch": "2.13.0+cpu", "numpy": "2.3.1", "pillow": "12.1.1"}
    have = {"torch": "2.13.0+cpu", "numpy": "2.3.1", "pillow": "11.0.0", "pip": "26.3", "diffpath": "0.1.0",
            "torchvision": "0.28.0", "gdown": "5.2.0"}
    wrong, extra = lock_differences(lock, have)
    assert wrong == ["pillow 11.0.0 (lock 12.1.1)"] and extra == ["gdown 5.2.0", "torchvision 0.28.0"]
    del have["numpy"]
    assert lock_differences(lock, have)[0] == ["numpy missing (lock 2.3.1)", "pillow 11.0.0 (lock 12.1.1)"]
    # extras the install step kept (after checking the imports) are part of the environment
    assert lock_differences(lock, have, {"torchvision": "0.28.0", "gdown": "5.2.0"})[1] == []
    assert lock_differences(lock, have, {"torchvision": "0.27.0"})[1] == ["gdown 5.2.0", "torchvision 0.28.0"]


def test_recorded_extras_round_trip(tmp_path):
    assert recorded_extras(tmp_path) == {}
    record_extras(tmp_path, {"TorchVision": "0.28.0"})
    record_extras(tmp_path, {"gdown": "5.2.0"})
    assert recorded_extras(tmp_path) == {"torchvision": "0.28.0", "gdown": "5.2.0"}


def test_lockcheck_exit_codes(tmp_path):
    """0 equal; 1 (make reinstalls) a locked package differs; the check is a plain script."""
    here = {canonical(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    equal = tmp_path / "equal.lock.txt"
    equal.write_text("".join(f"{n}=={v} \\\n    --hash=sha256:00\n" for n, v in sorted(here.items())
                             if n not in ("pip", "diffpath")))
    run = [sys.executable, str(ROOT / "diffpath/study/lockcheck.py")]
    assert subprocess.run([*run, str(equal)], capture_output=True).returncode == 0
    moved = tmp_path / "moved.lock.txt"
    moved.write_text(equal.read_text().replace(f"numpy=={here['numpy']}", "numpy==1.0.0"))
    r = subprocess.run([*run, str(moved)], capture_output=True, text=True)
    assert r.returncode == 1 and f"numpy {here['numpy']} (lock 1.0.0)" in r.stdout and "reinstalling" in r.stdout


# --------------------------------------------------------------------------------------------
# make paper picks the lock: the GPU lock when nvidia-smi lists a GPU (make -n: nothing is run)


def _fake_nvidia_smi(folder: Path, gpu: bool) -> Path:
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + ("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if gpu else
                                    "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n"))
    exe.chmod(0o755)
    return folder


def _make_n(tmp_path: Path, target: str, gpu: bool, *extra: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    bin_dir = _fake_nvidia_smi(tmp_path / ("gpu" if gpu else "nogpu"), gpu)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    venvs = [f"VENV={tmp_path}/venv", f"GPU_VENV={tmp_path}/venv-gpu"]  # no environment there: nothing to check
    r = subprocess.run(["make", "-n", target, *venvs, *extra], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_paper_selects_the_gpu_lock_when_nvidia_smi_lists_a_gpu(tmp_path):
    out = _make_n(tmp_path, "paper", gpu=True)
    assert "-r requirements/paper-gpu.lock.txt" in out and "requirements/cpu.lock.txt" not in out
    assert f"{tmp_path}/venv-gpu/bin/python -m diffpath.study.profiles paper " in out and "--no-gpu" not in out
    assert f"{tmp_path}/venv-gpu/bin/dvc repro" in out


def test_make_paper_selects_the_cpu_lock_without_a_gpu_unless_asked(tmp_path):
    out = _make_n(tmp_path, "paper", gpu=False)
    assert "-r requirements/cpu.lock.txt" in out and "paper-gpu.lock.txt" not in out
    assert f"{tmp_path}/venv/bin/python -m diffpath.study.profiles paper --no-gpu" in out
    asked = _make_n(tmp_path, "paper", False, "GPU=1")
    assert "-r requirements/paper-gpu.lock.txt" in asked and "--no-gpu" not in asked
    refused = _make_n(tmp_path, "paper", True, "NO_GPU=1")
    assert "-r requirements/cpu.lock.txt" in refused and "--no-gpu" in refused
    # the embedded profile's targets keep the CPU environment on a GPU machine
    assert "-r requirements/cpu.lock.txt" in _make_n(tmp_path, "test", gpu=True)


def test_a_cpu_torch_on_a_gpu_machine_is_named_with_the_fix(tmp_path, monkeypatch):
    import torch

    from diffpath.study.readiness import gpu_problem

    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path / 'bin', True)}:{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    msg = gpu_problem()
    assert "GPU 0: NVIDIA H100" in msg and "CPU build" in msg and f"torch {torch.__version__}" in msg
    assert "make paper" in msg and "requirements/paper-gpu.lock.txt" in msg and ".venv-gpu" in msg
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "built for CUDA 13.0 but cannot use the GPU" in gpu_problem()
    monkeypatch.setenv("PATH", f"{_fake_nvidia_smi(tmp_path / 'none', False)}:{os.environ['PATH']}")
    assert "NO_GPU=1" in gpu_problem()
