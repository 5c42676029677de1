"""Is a profile ready to run? Its model, its data sets and its device, checked before anything changes.

:func:`check_profile` fetches what it can (the model into the Hugging Face cache or
:func:`diffpath.models.zoo.url_cache`, the data sets through torchvision's downloaders, after
installing those as a transaction: :mod:`diffpath.study.install`) and returns every problem left,
each with where to put what; :mod:`diffpath.study.profiles` switches only when there is none.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Readiness", "check_profile", "check_model", "check_data", "gpu_problem", "nvidia_gpus"]


@dataclass
class Readiness:
    """The model's local path, the problems left, and what was changed in the environment."""

    model_path: str | None = None
    problems: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)


def check_model(spec: str) -> tuple[str | None, list[str]]:
    """Resolve ``spec`` to a local path (fetching a zoo / ``hub:`` model); (path, problems)."""
    from diffpath.models import ModelLoadError
    from diffpath.models.zoo import is_remote_spec, resolve_spec, zoo_settings_for

    if is_remote_spec(spec):
        try:
            return resolve_spec(spec), []
        except ModelLoadError as exc:
            return None, [f"model: {exc}"]
    p = Path(spec)
    if p.suffix in (".pt", ".pth", ".ckpt"):
        if not p.is_file():
            return None, [f"model: {p} is missing; put the checkpoint there, or leave MODEL unset to fetch "
                          "DiffPath's CelebA-32 model (https://huggingface.co/ajrheng/diffpath)"]
        beside = [p.with_suffix(e) for e in (".json", ".yaml", ".yml")]
        if not any(b.is_file() for b in beside) and zoo_settings_for(p) is None:
            return None, [f"model: {p} is not a known released checkpoint and has no settings beside it; "
                          f"write its improved-diffusion settings to {beside[0]} (or .yaml)"]
        return str(p), []
    if p.is_dir():
        return str(p), []
    if str(spec).count("/") == 1 and not str(spec).startswith((".", "/")):  # a diffusers hub id
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.bin"]), []
        except Exception as exc:
            return None, [f"model: cannot fetch the hub model {spec} ({type(exc).__name__}; offline?); "
                          "download it elsewhere and pass its local folder as MODEL"]
    return None, [f"model: {spec} is neither a file, a folder, a hub id nor a known model name"]


def _missing_splits(datasets: list[str], root: Path) -> list[tuple[str, str]]:
    from diffpath.data import DatasetUnavailableError
    from diffpath.data.registry import dataset_info, split_size

    missing = []
    for name in (n for n in datasets if not dataset_info(n).offline):
        for split in ("train", "test"):
            try:
                split_size(name, split, root=root, download=False)
            except DatasetUnavailableError:
                missing.append((name, split))
    return missing


def check_data(datasets: list[str], root: Path, *, install: bool = True) -> tuple[list[str], list[str]]:
    """(problems, environment changes) with the data sets under ``root``: what is missing is
    downloaded, once torchvision and gdown are installed (a transaction that undoes itself when the
    study's imports break)."""
    import importlib.util

    from diffpath.data import DatasetUnavailableError
    from diffpath.data.registry import split_size

    missing = _missing_splits(datasets, root)
    problems: list[str] = []
    changes: list[str] = []
    if missing and install:
        from diffpath.study.install import install_paper_requirements

        report = install_paper_requirements()
        problems += report.problems
        changes += report.changes()
        importlib.invalidate_caches()  # packages installed by the step above are found from here on
    can_download = not problems and importlib.util.find_spec("torchvision") is not None
    if missing and not problems and not can_download:
        problems.append("install: torchvision is not installed, so the data sets cannot be downloaded "
                        "(`python -m diffpath.study.profiles install`, or put the files in place as below)")
    for name, split in missing:
        try:
            split_size(name, split, root=root, download=can_download)
        except DatasetUnavailableError as exc:
            problems.append(f"data: {exc}")
        except Exception as exc:  # a broken download or file
            problems.append(f"data: {name} ({split}) cannot be read from {root}: {type(exc).__name__}: {exc}")
    return problems, changes


def nvidia_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (``GPU 0: NVIDIA H100 ...``); none without the tool or a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.splitlines() if ln.startswith("GPU ")]


def gpu_problem() -> str | None:
    """Why this environment cannot use a CUDA GPU (None when it can), saying what to do: a CPU build
    of torch on a machine with a GPU is named as such."""
    import torch

    if torch.cuda.is_available():
        return None
    gpus = nvidia_gpus()
    if gpus and torch.version.cuda is None:
        return (f"device: this machine has a GPU ({gpus[0]}), but torch {torch.__version__} in {sys.prefix} is a "
                "CPU build (torch.version.cuda is None). Run `make paper`: when nvidia-smi lists a GPU it "
                "installs the GPU lock (requirements/paper-gpu.lock.txt, CUDA torch) into .venv-gpu/ and runs "
                "the profile there (`make setup-gpu` makes that environment alone)")
    if gpus:
        return (f"device: torch {torch.__version__} is built for CUDA {torch.version.cuda} but cannot use the GPU "
                f"({gpus[0]}): check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
    return ("device: the paper profile needs a CUDA GPU (about 8 million UNet evaluations, README); "
            "run `make paper NO_GPU=1` to run it on the CPU anyway")


def check_profile(params: dict[str, Any], *, require_gpu: bool = True, install: bool = True) -> Readiness:
    """Get a profile's model and data ready; the model's local path, the problems left, the
    environment changes made."""
    root = Path((params.get("layout") or {}).get("downloads", "data/downloads"))
    problems, changes = check_data(list(params["data"]["datasets"]), root, install=install)
    model_path, model_problems = check_model(str(params["model"]["spec"]))
    problems += model_problems
    if require_gpu and (gpu := gpu_problem()):
        problems.append(gpu)
    return Readiness(model_path, problems, changes)
