"""Switch the study between profiles, checking first that a profile can run here.

``python -m diffpath.study.profiles paper`` checks that the paper profile's model and data sets are in
place (and that a GPU is present), fails fast with a message saying what to put where, and only
then installs ``params-paper.yaml`` as ``params.yaml`` (keeping the embedded one as
``params-embedded.yaml``). ``python -m diffpath.study.profiles embedded`` switches back.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from diffpath.study.stages import load_params

__all__ = ["check_profile", "main"]


def check_profile(params: dict, *, require_gpu: bool = True) -> list[str]:
    """Problems that would stop the profile; empty when it can run."""
    problems: list[str] = []
    spec = str(params["model"]["spec"])
    p = Path(spec)
    if p.suffix in (".pt", ".pth", ".ckpt"):
        if not p.is_file():
            problems.append(
                f"model: {p} is missing. Download DiffPath's released CelebA-32 checkpoint (links in the "
                f"clear-nus/diffpath README) to {p}, and save its settings (configs/celeba_model_config.yaml) "
                f"as {p.with_suffix('.yaml')}; or set model.spec to a diffusers UNet folder."
            )
        elif not any(p.with_suffix(e).is_file() for e in (".json", ".yaml", ".yml")):
            problems.append(f"model: {p} has no settings file beside it ({p.with_suffix('.json').name} or .yaml)")
    elif not p.exists() and not (spec.count("/") == 1 and not spec.startswith((".", "/"))):
        problems.append(f"model: {spec} is neither a local folder nor a hub id")
    from diffpath.data import DatasetUnavailableError, load_split

    for name in params["data"]["datasets"]:
        for split in ("train", "test"):
            try:
                load_split(name, split, n=1, download=True)
            except DatasetUnavailableError as exc:
                problems.append(f"data: {exc}")
                break
            except Exception as exc:  # a broken download or file
                problems.append(f"data: {name} ({split}) cannot be read: {type(exc).__name__}: {exc}")
                break
    if require_gpu:
        import torch

        if not torch.cuda.is_available():
            problems.append("device: the paper profile needs a CUDA GPU (tens of millions of UNet evaluations); "
                            "pass --no-gpu to run it on the CPU anyway")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffpath.study.profiles", description=__doc__.split("\n")[0])
    ap.add_argument("profile", choices=["paper", "embedded"])
    ap.add_argument("--no-gpu", action="store_true", help="do not require a GPU")
    ap.add_argument("--check-only", action="store_true", help="check, do not switch")
    args = ap.parse_args(argv)
    root = Path.cwd()
    if args.profile == "embedded":
        saved = root / "params-embedded.yaml"
        if saved.is_file():
            shutil.move(saved, root / "params.yaml")
            print("params.yaml: embedded profile restored", file=sys.stderr)
        else:
            print("params.yaml already holds the embedded profile (or `git checkout params.yaml`)", file=sys.stderr)
        return 0
    params = load_params(root / "params-paper.yaml")
    problems = check_profile(params, require_gpu=not args.no_gpu)
    if problems:
        print("The paper profile cannot run yet:", file=sys.stderr)
        for p in problems:
            print(f"  - {' '.join(p.split())}", file=sys.stderr)
        return 2
    if args.check_only:
        print("paper profile: everything is in place", file=sys.stderr)
        return 0
    current = load_params(root / "params.yaml")
    if current.get("profile") != "paper":
        shutil.copy(root / "params.yaml", root / "params-embedded.yaml")
    shutil.copy(root / "params-paper.yaml", root / "params.yaml")
    print("params.yaml: paper profile installed (the embedded one is in params-embedded.yaml)", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
