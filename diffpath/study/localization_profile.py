"""The localisation paper profile: DIVAD on MVTec AD and VisA, ready to run, or one message why not.

``python -m diffpath.study.profiles paper-localization [--no-gpu] [--model SPEC] [--dino SPEC]
[--data-root DIR]`` (``make paper-localization``) calls :func:`install`:

1. checks MVTec AD and VisA under the download folder in their release layouts
   (:func:`diffpath.data.industrial.missing`: what is missing, and where to get it);
2. fetches Stable Diffusion (DIVAD's 2.1-base, or ``--model``: any diffusers Stable Diffusion
   repository or folder) and the DINO ViT-S/8 feature extractor (or ``--dino``) through
   huggingface_hub (:mod:`diffpath.models.hub`);
3. checks for a CUDA GPU;
4. only when all of that worked: installs ``params-paper-localization.yaml`` as ``params.yaml``
   (with the models' local folders and the data root), this profile's own ``dvc.yaml`` (generated
   from :data:`~diffpath.study.stages.PAPER_LOCALIZATION_STAGES`) and the ``dvc.lock`` saved by the
   last switch back (:data:`SAVED_LOCK`; an empty one the first time). Otherwise it prints one
   message listing every problem and changes nothing.

``python -m diffpath.study.profiles embedded`` then calls :func:`switch_back`: the profile's lock is
saved and ``params.yaml``, ``dvc.yaml`` and ``dvc.lock`` come back from git (a clean ``git status``).
The profile writes only under ``data/paper_localization`` and ``reports/paper_localization``.

Why a ``dvc.yaml`` of its own: the profile's stages have nothing in common with the study's, so
neither profile's ``dvc repro`` may see the other's stages. Swapping the generated file (as
``params.yaml`` and ``dvc.lock`` are swapped) gives each profile exactly its stages, keeps the
committed ``dvc.yaml`` the study's, and leaves the embedded profile's files untouched.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from diffpath.study.stages import PAPER_LOCALIZATION_STAGES

__all__ = ["PROFILE", "TEMPLATE", "SAVED_LOCK", "SWAPPED", "check", "installed_params", "switch_to", "switch_back",
           "install"]

PROFILE = "paper-localization"
TEMPLATE = "params-paper-localization.yaml"
#: where this profile's dvc.lock waits while another profile is active (git-ignored)
SAVED_LOCK = Path(".dvc/profiles/paper-localization.dvc.lock")
#: the files that describe the active profile
SWAPPED = ("params.yaml", "dvc.yaml", "dvc.lock")
_EMPTY_LOCK = "schema: '2.0'\nstages: {}\n"


def check(params: dict[str, Any], *, require_gpu: bool = True) -> tuple[dict[str, str], list[str]]:
    """The models' local folders (``{"spec": ..., "dino": ...}``) and every problem, one line each."""
    from diffpath.data.industrial import missing
    from diffpath.models import ModelLoadError
    from diffpath.models.hub import stable_diffusion_folder, vit_folder

    ind = params["industrial"]
    downloads = Path(params["layout"]["downloads"])
    problems = [p for b in ind["benchmarks"]
                for p in missing(b, downloads / ind["roots"][b], (ind.get("categories") or {}).get(b))]
    found: dict[str, str] = {}
    for key, what, fetch in (("spec", "model", stable_diffusion_folder), ("dino", "dino", vit_folder)):
        try:
            found[key] = str(fetch(params["model"][key]))
        except ModelLoadError as exc:
            problems.append(f"{what}: {exc}")
    if require_gpu:
        import torch

        if not torch.cuda.is_available():
            problems.append("device: the localisation paper profile needs a CUDA GPU (Stable Diffusion at 512², "
                            "322 UNet evaluations per test image over the default rows, 3,887 test images); run "
                            "`make paper-localization NO_GPU=1` to run it on the CPU anyway")
    return found, problems


def _set(text: str, dotted: str, value: str) -> str:
    """``text`` (YAML) with the value of ``section.key`` replaced, comments and layout kept."""
    section, key = dotted.split(".")
    start = re.search(rf"(?m)^{section}:\s*$", text)
    line = re.compile(rf"(?m)^(  {key}:[ ]*)([^#\n]*?)([ ]*(#.*)?)$").search(text, start.end()) if start else None
    if line is None:
        raise ValueError(f"{TEMPLATE}: no key {dotted}")
    return text[: line.start(2)] + json.dumps(value) + text[line.end(2):]


def installed_params(template: str, *, model: str | None = None, dino: str | None = None,
                     data_root: str | None = None) -> str:
    """The template's text with the models' specs (or local folders) and the data root set."""
    for dotted, value in (("model.spec", model), ("model.dino", dino), ("layout.downloads", data_root)):
        if value is not None:
            template = _set(template, dotted, value)
    return template


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _profile(root: Path) -> str:
    return str((yaml.safe_load((root / "params.yaml").read_text()) or {}).get("profile", "embedded"))


def switch_to(root: Path, params_text: str) -> None:
    """Install the profile's params, its generated dvc.yaml and its saved lock (refusing over
    uncommitted edits of the swapped files, or over another non-embedded profile)."""
    from diffpath.study.pipeline import PAPER_LOCALIZATION_HEADER, dvc_yaml

    current = _profile(root)
    if current not in ("embedded", PROFILE):
        raise RuntimeError(f"params.yaml holds the {current} profile; switch back first "
                           "(python -m diffpath.study.profiles embedded)")
    if current == "embedded":
        r = _git(root, "status", "--porcelain", "--", *SWAPPED)
        if r.returncode != 0:
            raise RuntimeError(f"switching profiles needs the study's git checkout ({r.stderr.strip()})")
        dirty = [ln[3:] for ln in r.stdout.splitlines() if ln.strip()]
        if dirty:
            raise RuntimeError(f"{', '.join(dirty)} hold uncommitted changes; commit or discard them "
                               f"(git checkout -- {' '.join(SWAPPED)}) before switching")
    (root / "params.yaml").write_text(params_text)
    (root / "dvc.yaml").write_text(dvc_yaml(root, PAPER_LOCALIZATION_STAGES, PAPER_LOCALIZATION_HEADER))
    if current == "embedded":
        saved = root / SAVED_LOCK
        (root / "dvc.lock").write_text(saved.read_text() if saved.is_file() else _EMPTY_LOCK)


def switch_back(root: Path) -> str:
    """Save the profile's lock and restore the committed params.yaml, dvc.yaml and dvc.lock."""
    if (root / "dvc.lock").is_file():
        (root / SAVED_LOCK).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "dvc.lock", root / SAVED_LOCK)
    r = _git(root, "checkout", "--", *SWAPPED)
    if r.returncode != 0:
        raise RuntimeError(f"git checkout -- {' '.join(SWAPPED)} failed: {r.stderr.strip()}")
    return f"embedded profile restored ({PROFILE} lock saved to {SAVED_LOCK})"


def install(root: Path, *, model: str | None = None, dino: str | None = None, data_root: str | None = None,
            require_gpu: bool = True, check_only: bool = False) -> int:
    """Check everything, then switch (module docstring); prints what happened; returns the exit code."""
    template = installed_params((root / TEMPLATE).read_text(), model=model, dino=dino, data_root=data_root)
    found, problems = check(yaml.safe_load(template), require_gpu=require_gpu)
    if problems:
        print("The localisation paper profile cannot run yet; nothing was changed. Missing:", file=sys.stderr)
        for p in problems:
            print(f"  - {' '.join(p.split())}", file=sys.stderr)
        return 2
    if check_only:
        print("localisation paper profile: everything is in place", file=sys.stderr)
        return 0
    try:
        switch_to(root, installed_params(template, model=found["spec"], dino=found["dino"]))
    except RuntimeError as exc:
        print(f"diffpath: {exc}", file=sys.stderr)
        return 2
    print(f"params.yaml and dvc.yaml: {PROFILE} profile installed (model {found['spec']}, DINO {found['dino']}); "
          "outputs go to data/paper_localization and reports/paper_localization; "
          "`python -m diffpath.study.profiles embedded` switches back", file=sys.stderr)
    return 0
