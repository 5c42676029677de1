"""Switch the study between profiles; get the paper profile ready (install, fetch, download, check).

``python -m diffpath.study.profiles paper [--no-gpu] [--model SPEC] [--data-root DIR]``:

1. reads the data sets from ``layout.downloads`` (``--data-root``); for a missing one it installs
   torchvision (matched to the installed torch) and gdown, and lets torchvision download it;
2. fetches the model (default: DiffPath's CelebA-32 checkpoint from the Hugging Face hub into the
   usual cache; settings from :mod:`diffpath.models.zoo`);
3. checks for a GPU;
4. only when all of that worked: writes ``params.yaml`` from ``params-paper.yaml`` (with the
   model's local path, its settings file and the data root) and restores the paper profile's
   ``dvc.lock`` saved by the last switch back. Otherwise it prints one message listing everything
   missing and where to put it, and changes nothing.

``python -m diffpath.study.profiles embedded`` saves the paper ``dvc.lock`` to
``.dvc/profiles/paper.dvc.lock`` (git-ignored) and restores the committed ``params.yaml`` and
``dvc.lock`` with ``git checkout``: a clean ``git status``, the embedded results as they were, nothing
recomputed. The paper profile writes only under ``data/paper`` and ``reports/paper`` (its
``layout`` section), so no embedded result is ever overwritten.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from diffpath.study.stages import load_params

__all__ = ["check_profile", "paper_params_text", "switch_to_paper", "switch_to_embedded", "main",
           "ProfileError", "SAVED_LOCK"]

#: where the paper profile's dvc.lock waits while the embedded profile is active (git-ignored)
SAVED_LOCK = Path(".dvc/profiles/paper.dvc.lock")
_SWAPPED = ("params.yaml", "dvc.lock")


class ProfileError(RuntimeError):
    """The switch cannot be made safely (uncommitted edits, no git)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


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


def check_data(datasets: list[str], root: Path, *, install: bool = True) -> list[str]:
    """Problems with the data sets under ``root`` (downloading what is missing, once torchvision
    and gdown are installed)."""
    from diffpath.data import DatasetUnavailableError
    from diffpath.data.registry import dataset_info, split_size

    paper = [n for n in datasets if not dataset_info(n).offline]
    missing = []
    for name in paper:
        for split in ("train", "test"):
            try:
                split_size(name, split, root=root, download=False)
            except DatasetUnavailableError:
                missing.append((name, split))
    problems: list[str] = []
    if missing and install:
        from diffpath.study.install import install_paper_requirements

        problems += install_paper_requirements()
    import importlib.util

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
    return problems


def check_profile(params: dict[str, Any], *, require_gpu: bool = True, install: bool = True,
                  ) -> tuple[str | None, list[str]]:
    """Get a profile's model and data ready; returns (the model's local path, problems)."""
    root = Path((params.get("layout") or {}).get("downloads", "data/downloads"))
    problems = check_data(list(params["data"]["datasets"]), root, install=install)
    model_path, model_problems = check_model(str(params["model"]["spec"]))
    problems += model_problems
    if require_gpu:
        import torch

        if not torch.cuda.is_available():
            problems.append("device: the paper profile needs a CUDA GPU (about 8 million UNet evaluations, README); "
                            "run `make paper NO_GPU=1` to run it on the CPU anyway")
    return model_path, problems


def _set_value(text: str, section: str, key: str, value: str) -> str:
    """Replace ``section.key``'s value in a YAML text, keeping comments and layout."""
    m = re.search(rf"(?m)^{section}:\s*$", text)
    if not m:
        raise ValueError(f"no top-level section {section!r}")
    pat = re.compile(rf"(?m)^(  {key}:[ ]*)([^#\n]*?)([ ]*(#.*)?)$")
    k = pat.search(text, m.end())
    if not k:
        raise ValueError(f"no key {section}.{key}")
    import json

    return text[: k.start(2)] + json.dumps(value) + text[k.end(2):]


def paper_params_text(template: str, *, model_path: str | None, settings: str | None,
                      data_root: str | None) -> str:
    """``params-paper.yaml``'s text with the resolved model, its settings file and the data root."""
    text = template
    if model_path is not None:
        text = _set_value(text, "model", "spec", model_path)
    if settings is not None:
        text = _set_value(text, "model", "settings", settings)
    if data_root is not None:
        text = _set_value(text, "layout", "downloads", data_root)
    return text


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _dirty(root: Path) -> list[str]:
    r = _git(root, "status", "--porcelain", "--", *_SWAPPED)
    if r.returncode != 0:
        raise ProfileError(f"switching profiles needs the study's git checkout ({_one_line(r.stderr)})")
    return [ln[3:] for ln in r.stdout.splitlines() if ln.strip()]


def _profile(root: Path) -> str:
    return str(load_params(root / "params.yaml").get("profile", "embedded"))


def switch_to_paper(root: Path, params_text: str) -> None:
    """Install the paper profile's params and its saved lock (refusing over uncommitted edits)."""
    current = _profile(root)
    if current == "paper-localization":
        raise ProfileError("params.yaml holds the paper-localization profile; switch back first "
                           "(python -m diffpath.study.profiles embedded)")
    if current != "paper":
        dirty = _dirty(root)
        if dirty:
            raise ProfileError(f"{' and '.join(dirty)} hold uncommitted changes of the {current} profile; commit "
                               "or discard them (git checkout -- params.yaml dvc.lock) before switching")
    (root / "params.yaml").write_text(params_text)
    saved = root / SAVED_LOCK
    if current != "paper":
        if saved.is_file():
            shutil.copyfile(saved, root / "dvc.lock")
        # else: the embedded lock stays; `dvc repro` rewrites it for the paper stages (paths differ)


def switch_to_embedded(root: Path) -> str:
    """Save the paper lock and restore the committed params.yaml and dvc.lock; returns a message."""
    current = _profile(root)
    if current == "embedded":
        dirty = _dirty(root)
        return ("params.yaml already holds the embedded profile"
                + (f" ({', '.join(dirty)} modified: uncommitted edits, left as they are)" if dirty else ""))
    if current == "paper-localization":
        from diffpath.study.localization_profile import switch_back

        return switch_back(root)
    if current != "paper":
        raise ProfileError(f"params.yaml holds profile {current!r}, not one this tool installs; not touching it")
    _dirty(root)  # git is there
    if (root / "dvc.lock").is_file():
        (root / SAVED_LOCK).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "dvc.lock", root / SAVED_LOCK)
    r = _git(root, "checkout", "--", *_SWAPPED)
    if r.returncode != 0:
        raise ProfileError(f"git checkout -- params.yaml dvc.lock failed: {_one_line(r.stderr)}")
    return f"embedded profile restored (paper lock saved to {SAVED_LOCK})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study.profiles", description=__doc__.split("\n")[0])
    ap.add_argument("profile", choices=["paper", "paper-localization", "embedded", "install"],
                    help="paper | paper-localization | embedded: switch; install: only install the paper "
                    "downloaders' packages")
    ap.add_argument("--no-gpu", action="store_true", help="do not require a GPU")
    ap.add_argument("--model", help="a local .pt, a diffusers folder, a hub id or a zoo name (default: params-paper)")
    ap.add_argument("--dino", help="paper-localization: the ViT feature extractor, a folder or hub id "
                    "(default: facebook/dino-vits8)")
    ap.add_argument("--data-root", help="the paper sets' download folder (default: data/downloads)")
    ap.add_argument("--no-install", action="store_true", help="never run pip")
    ap.add_argument("--check-only", action="store_true", help="check, do not switch")
    args = ap.parse_args(argv)
    root = Path.cwd()
    try:
        if args.profile == "install":
            from diffpath.study.install import install_paper_requirements

            problems = install_paper_requirements()
            for p in problems:
                print(f"diffpath: {p}", file=sys.stderr)
            return 2 if problems else 0
        if args.profile == "embedded":
            print(switch_to_embedded(root), file=sys.stderr)
            return 0
        if args.profile == "paper-localization":
            from diffpath.study.localization_profile import install

            return install(root, model=args.model, dino=args.dino, data_root=args.data_root,
                           require_gpu=not args.no_gpu, check_only=args.check_only)
        template = (root / "params-paper.yaml").read_text()
        template = paper_params_text(template, model_path=args.model, settings=None, data_root=args.data_root)
        import yaml

        params = yaml.safe_load(template)
        model_path, problems = check_profile(params, require_gpu=not args.no_gpu, install=not args.no_install)
        if problems:
            print("The paper profile cannot run yet; nothing was changed. Missing:", file=sys.stderr)
            for p in problems:
                print(f"  - {_one_line(p)}", file=sys.stderr)
            return 2
        if args.check_only:
            print("paper profile: everything is in place", file=sys.stderr)
            return 0
        from diffpath.models.zoo import settings_dep

        text = paper_params_text(template, model_path=model_path, settings=settings_dep(model_path or ""),
                                 data_root=None)
        switch_to_paper(root, text)
    except RuntimeError as exc:  # ProfileError, or the localisation profile's switch back
        print(f"diffpath: {exc}", file=sys.stderr)
        return 2
    print(f"params.yaml: paper profile installed (model {model_path}); outputs go to data/paper and "
          "reports/paper; `python -m diffpath.study.profiles embedded` switches back", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
