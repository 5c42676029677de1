"""Switch the study between profiles; get the paper profile ready (install, fetch, download, check).

A profile is its own params file (``params-paper.yaml``), its own output roots (its ``layout``
section: ``data/paper``, ``reports/paper``), its own ``dvc.lock`` (kept in ``.dvc/profiles/NAME.dvc.lock``
while another profile is active) and its fail-fast checks (:mod:`diffpath.study.readiness`).

``python -m diffpath.study.profiles paper [--no-gpu] [--model SPEC] [--data-root DIR]``:

1. reads the data sets from ``layout.downloads`` (``--data-root``); for a missing one it installs
   torchvision (matched to the installed torch) and gdown as a transaction that undoes itself when
   the study's imports break (:mod:`diffpath.study.install`), and lets torchvision download it;
2. fetches the model (default: DiffPath's CelebA-32 checkpoint; settings from
   :mod:`diffpath.models.zoo`). Another model than the profile's own (``--model imagenet64``) makes a
   variant with its own name and output roots (``paper-imagenet64``: ``data/paper-imagenet64``,
   ``reports/paper-imagenet64``), so that no model's results overwrite another's;
3. checks for a GPU (a CPU build of torch on a machine with one is named as such);
4. only when all of that worked: writes ``params.yaml`` from the profile's params (with the
   model's local path, its settings file and the data root) and restores the profile's saved
   ``dvc.lock``. Otherwise it prints one message listing everything missing and where to put it,
   and what (if anything) was installed or undone; ``params.yaml`` and ``dvc.lock`` stay as they were.

``python -m diffpath.study.profiles embedded`` saves the active profile's ``dvc.lock`` and restores
the committed ``params.yaml`` and ``dvc.lock`` with ``git checkout``: a clean ``git status``, the
embedded results as they were, nothing recomputed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from diffpath.study.readiness import check_profile
from diffpath.study.stages import load_params

__all__ = ["paper_params_text", "paper_variant_text", "model_tag", "saved_lock", "switch_to_profile",
           "switch_to_embedded", "main", "ProfileError", "SAVED_LOCK"]

_PROFILES_DIR = Path(".dvc/profiles")
_SWAPPED = ("params.yaml", "dvc.lock")


def saved_lock(profile: str) -> Path:
    """Where a profile's ``dvc.lock`` waits while another profile is active (git-ignored)."""
    return _PROFILES_DIR / f"{profile}.dvc.lock"


SAVED_LOCK = saved_lock("paper")


class ProfileError(RuntimeError):
    """The switch cannot be made safely (uncommitted edits, no git)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _set_value(text: str, section: str, key: str, value: object) -> str:
    """Replace ``section.key``'s value in a YAML text, keeping comments and layout."""
    m = re.search(rf"(?m)^{section}:\s*$", text)
    if not m:
        raise ValueError(f"no top-level section {section!r}")
    k = re.compile(rf"(?m)^(  {key}:[ ]*)([^#\n]*?)([ ]*(#.*)?)$").search(text, m.end())
    if not k:
        raise ValueError(f"no key {section}.{key}")
    return text[: k.start(2)] + json.dumps(value) + text[k.end(2):]


def _set_top(text: str, key: str, value: object) -> str:
    """Replace a top-level scalar's value in a YAML text."""
    k = re.compile(rf"(?m)^({key}:[ ]*)([^#\n]*?)([ ]*(#.*)?)$").search(text)
    if not k:
        raise ValueError(f"no top-level key {key!r}")
    return text[: k.start(2)] + json.dumps(value) + text[k.end(2):]


def paper_params_text(template: str, *, model_path: str | None, settings: str | None,
                      data_root: str | None) -> str:
    """A profile's params text with the resolved model, its settings file and the data root."""
    text = template
    if model_path is not None:
        text = _set_value(text, "model", "spec", model_path)
    if settings is not None:
        text = _set_value(text, "model", "settings", settings)
    if data_root is not None:
        text = _set_value(text, "layout", "downloads", data_root)
    return text


def model_tag(spec: str) -> str:
    """A model's short name for its output roots: its zoo name, else its file or folder name."""
    from diffpath.models.zoo import zoo_name_for

    name = zoo_name_for(spec)
    if name:
        return name
    p = Path(str(spec).rstrip("/"))
    stem = p.stem if p.suffix in (".pt", ".pth", ".ckpt") else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model"


def _model_facts(spec: str) -> tuple[int | None, str | None]:
    """(image size, training set) of a model, as far as its zoo entry or settings file tell."""
    from diffpath.models.zoo import ZOO, zoo_name_for

    name = zoo_name_for(spec)
    if name:
        return int(ZOO[name].settings["image_size"]), ZOO[name].trained_on
    p = Path(spec)
    for f in (p.with_suffix(".json"), p.with_suffix(".yaml"), p.with_suffix(".yml"), p / "unet" / "config.json",
              p / "config.json"):
        if f.is_file():
            s = yaml.safe_load(f.read_text()) or {}
            size = s.get("image_size", s.get("sample_size"))
            return (int(size) if isinstance(size, int) else None), None
    return None, None


def paper_variant_text(template: str, spec: str) -> str:
    """The profile's params text for a run with model ``spec``.

    The profile's own model (its zoo name or released file) keeps the profile as it is. Any other
    model makes a variant: profile ``NAME-TAG`` with output roots ``ROOT-TAG`` (:func:`model_tag`),
    the data sets at the model's image size (first brought to the profile's size, then upsampled
    bilinearly, as DiffPath feeds its ImageNet-64 model), and the model's training set as the
    report's base model (the published figures it is compared with).
    """
    params = yaml.safe_load(template)
    text = _set_value(template, "model", "spec", spec)
    tag = model_tag(spec)
    if tag == model_tag(str(params["model"]["spec"])):
        return text
    text = _set_top(text, "profile", f"{params['profile']}-{tag}")
    for root in ("data", "reports"):
        text = _set_value(text, "layout", root, f"{params['layout'][root]}-{tag}")
    size, trained_on = _model_facts(spec)
    if size is not None and size != params["data"]["size"]:
        text = _set_value(_set_value(text, "data", "load_size", params["data"]["size"]), "data", "size", size)
    return _set_value(text, "report", "base_model", trained_on)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _dirty(root: Path) -> list[str]:
    r = _git(root, "status", "--porcelain", "--", *_SWAPPED)
    if r.returncode != 0:
        raise ProfileError(f"switching profiles needs the study's git checkout ({_one_line(r.stderr)})")
    return [ln[3:] for ln in r.stdout.splitlines() if ln.strip()]


def _profile(root: Path) -> str:
    return str(load_params(root / "params.yaml").get("profile", "embedded"))


def _installed_here(name: str) -> bool:
    """A profile this tool installs (the paper profile, its model variants, and profiles built the same way)."""
    return name == "paper" or (name.startswith("paper-") and name != "paper-localization")


def _save_lock(root: Path, profile: str) -> None:
    if (root / "dvc.lock").is_file():
        (root / saved_lock(profile)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "dvc.lock", root / saved_lock(profile))


def switch_to_profile(root: Path, params_text: str) -> None:
    """Install a profile's params and its saved lock (refusing over uncommitted edits of the
    embedded profile's files); the profile left behind keeps its lock in :func:`saved_lock`."""
    target = str(yaml.safe_load(params_text).get("profile"))
    current = _profile(root)
    if current == "paper-localization":
        raise ProfileError("params.yaml holds the paper-localization profile; switch back first "
                           "(python -m diffpath.study.profiles embedded)")
    if current == target:
        (root / "params.yaml").write_text(params_text)
        return
    if current == "embedded":
        dirty = _dirty(root)
        if dirty:
            raise ProfileError(f"{' and '.join(dirty)} hold uncommitted changes of the embedded profile; commit "
                               "or discard them (git checkout -- params.yaml dvc.lock) before switching")
    elif _installed_here(current):
        _save_lock(root, current)
        r = _git(root, "checkout", "--", "dvc.lock")  # a profile without a saved lock starts from the committed one
        if r.returncode != 0:
            raise ProfileError(f"git checkout -- dvc.lock failed: {_one_line(r.stderr)}")
    else:
        raise ProfileError(f"params.yaml holds profile {current!r}, not one this tool installs; not touching it")
    (root / "params.yaml").write_text(params_text)
    if (root / saved_lock(target)).is_file():
        shutil.copyfile(root / saved_lock(target), root / "dvc.lock")
    # else: the committed lock stays; `dvc repro` rewrites it for this profile's stages (paths differ)


def switch_to_embedded(root: Path) -> str:
    """Save the active profile's lock and restore the committed params.yaml and dvc.lock; returns a message."""
    current = _profile(root)
    if current == "embedded":
        dirty = _dirty(root)
        return ("params.yaml already holds the embedded profile"
                + (f" ({', '.join(dirty)} modified: uncommitted edits, left as they are)" if dirty else ""))
    if current == "paper-localization":
        from diffpath.study.localization_profile import switch_back

        return switch_back(root)
    if not _installed_here(current):
        raise ProfileError(f"params.yaml holds profile {current!r}, not one this tool installs; not touching it")
    _dirty(root)  # git is there
    _save_lock(root, current)
    r = _git(root, "checkout", "--", *_SWAPPED)
    if r.returncode != 0:
        raise ProfileError(f"git checkout -- params.yaml dvc.lock failed: {_one_line(r.stderr)}")
    return f"embedded profile restored ({current} lock saved to {saved_lock(current)})"


def _print_not_ready(name: str, problems: list[str], changes: list[str]) -> None:
    done = " ".join(changes) if changes else "nothing was installed"
    print(f"The {name} profile cannot run yet; params.yaml and dvc.lock were not changed; {done}. Missing:",
          file=sys.stderr)
    for p in problems:
        print(f"  - {_one_line(p)}", file=sys.stderr)


def _install_only() -> int:
    from diffpath.study.install import install_paper_requirements

    report = install_paper_requirements()
    for line in report.changes() + report.problems:
        print(f"diffpath: {_one_line(line)}", file=sys.stderr)
    return 2 if report.problems else 0


def _paper(root: Path, args: argparse.Namespace) -> int:
    template = (root / "params-paper.yaml").read_text()
    if args.model:
        template = paper_variant_text(template, args.model)
    template = paper_params_text(template, model_path=None, settings=None, data_root=args.data_root)
    params = yaml.safe_load(template)
    ready = check_profile(params, require_gpu=not args.no_gpu, install=not args.no_install)
    for line in ready.changes:
        print(f"diffpath: {_one_line(line)}", file=sys.stderr)
    if ready.problems:
        _print_not_ready(str(params["profile"]), ready.problems, ready.changes)
        return 2
    if args.check_only:
        print(f"{params['profile']} profile: everything is in place", file=sys.stderr)
        return 0
    from diffpath.models.zoo import settings_dep

    text = paper_params_text(template, model_path=ready.model_path, settings=settings_dep(ready.model_path or ""),
                             data_root=None)
    switch_to_profile(root, text)
    lay = params["layout"]
    print(f"params.yaml: {params['profile']} profile installed (model {ready.model_path}); outputs go to "
          f"{lay['data']} and {lay['reports']}; `python -m diffpath.study.profiles embedded` switches back",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study.profiles", description=__doc__.split("\n")[0])
    ap.add_argument("profile", choices=["paper", "paper-localization", "embedded", "install"],
                    help="paper | paper-localization | embedded: switch; install: only install the paper "
                    "downloaders' packages")
    ap.add_argument("--no-gpu", action="store_true", help="do not require a GPU")
    ap.add_argument("--model", help="a local .pt, a diffusers folder, a hub id or a zoo name (default: params-paper); "
                                    "another model than the profile's own gets its own output roots")
    ap.add_argument("--dino", help="paper-localization: the ViT feature extractor, a folder or hub id "
                    "(default: facebook/dino-vits8)")
    ap.add_argument("--data-root", help="the paper sets' download folder (default: data/downloads)")
    ap.add_argument("--no-install", action="store_true", help="never run pip")
    ap.add_argument("--check-only", action="store_true", help="check, do not switch")
    args = ap.parse_args(argv)
    root = Path.cwd()
    try:
        if args.profile == "install":
            return _install_only()
        if args.profile == "embedded":
            print(switch_to_embedded(root), file=sys.stderr)
            return 0
        if args.profile == "paper-localization":
            from diffpath.study.localization_profile import install

            return install(root, model=args.model, dino=args.dino, data_root=args.data_root,
                           require_gpu=not args.no_gpu, check_only=args.check_only)
        return _paper(root, args)
    except RuntimeError as exc:  # ProfileError, or the localisation profile's switch back
        print(f"diffpath: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
