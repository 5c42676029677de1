"""Stable Diffusion and ViT feature extractors from the Hugging Face hub, or from local folders.

DIVAD-style localisation (:mod:`diffpath.methods.latent`, :mod:`diffpath.methods.dino`) needs two
models that are not ε-models of the study: a Stable Diffusion checkpoint in diffusers' layout
(``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) and a ViT whose patch
features make the anomaly map (DINO ViT-S/8). A *spec* is either a local folder in that layout or a
hub repository id (``OWNER/NAME``); a repository is fetched with
:func:`huggingface_hub.snapshot_download` into the usual Hugging Face cache, asking only for the
files the study loads (:data:`SD_FILES`, :data:`VIT_FILES`: configurations, the tokenizer and the
full-precision safetensors weights; no fp16 variants, no safety checker). Offline, with nothing
cached, it raises one :class:`~diffpath.models.ModelLoadError` naming the repository, the files and
the make variable that takes a local folder instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffpath.models.errors import ModelLoadError

__all__ = ["SD_DEFAULT", "DINO_DEFAULT", "SD_FILES", "VIT_FILES", "SD_COMPONENTS", "is_hub_id",
           "fetch_snapshot", "stable_diffusion_folder", "vit_folder", "stable_diffusion_problems"]

#: DIVAD's model (``ddim_inversion.py --sd_version 21``)
SD_DEFAULT = "stabilityai/stable-diffusion-2-1-base"
#: DIVAD's feature extractor (``test.py --dino_version v1s8``), through transformers' ViTModel
DINO_DEFAULT = "facebook/dino-vits8"
#: the components of a Stable Diffusion folder the study loads
SD_COMPONENTS: tuple[str, ...] = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
#: what is fetched of a Stable Diffusion repository (about 2.6 GB for SD 2.1-base)
SD_FILES: tuple[str, ...] = (
    "model_index.json", "scheduler/scheduler_config.json", "tokenizer/*", "text_encoder/config.json",
    "text_encoder/model.safetensors", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
)
#: what is fetched of a ViT repository (DINO ViT-S/8: about 90 MB per weights file)
VIT_FILES: tuple[str, ...] = ("config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin")


def is_hub_id(spec: str | Path) -> bool:
    """``OWNER/NAME`` that is not an existing path (nor one starting with ``.`` or ``/``)."""
    s = str(spec)
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def fetch_snapshot(repo_id: str, patterns: tuple[str, ...], *, what: str, variable: str) -> Path:
    """The local folder of ``patterns`` of hub repository ``repo_id`` (fetched, or from the cache).

    Raises:
        ModelLoadError: offline with nothing cached (or any other failure), naming the repository,
            the files and ``make ... {variable}=FOLDER``.
    """
    from diffpath.models.zoo import _hub_reachable

    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with diffusers
        raise ModelLoadError("fetching from the hub needs huggingface_hub") from exc
    try:  # unreachable hub: the cache only (no minutes of retries)
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), local_files_only=not _hub_reachable()))
    except Exception as exc:  # offline: LocalEntryNotFoundError, ConnectionError, …
        raise ModelLoadError(
            f"cannot fetch the {what} {repo_id} from the Hugging Face hub ({type(exc).__name__}; offline?). "
            f"On a machine with the internet run `hf download {repo_id} "
            f"{' '.join(f'--include {p!r}' for p in patterns)} --local-dir models/paper/{repo_id.split('/')[-1]}`"
            f" (https://huggingface.co/{repo_id}), copy that folder here and pass it as {variable}=FOLDER"
        ) from exc


def stable_diffusion_problems(folder: Path) -> list[str]:
    """What a Stable Diffusion folder lacks (component folders, configurations, weights)."""
    problems = []
    for comp in SD_COMPONENTS:
        d = folder / comp
        if not d.is_dir():
            problems.append(f"{d}: missing (a diffusers Stable Diffusion folder has {', '.join(SD_COMPONENTS)})")
        elif comp in ("vae", "unet", "text_encoder") and not any(
                d.glob(p) for p in ("*.safetensors", "*.bin")):
            problems.append(f"{d}: no weights (*.safetensors or *.bin)")
    index = folder / "model_index.json"
    if index.is_file():
        cls = str(json.loads(index.read_text()).get("_class_name", ""))
        if "StableDiffusion" not in cls:
            problems.append(f"{index}: a {cls or 'unnamed'} pipeline, not a Stable Diffusion one")
    return problems


def stable_diffusion_folder(spec: str | Path) -> Path:
    """A local Stable Diffusion folder for ``spec`` (a folder, or a hub id fetched as
    :data:`SD_FILES`); raises :class:`~diffpath.models.ModelLoadError` when it is incomplete."""
    folder = fetch_snapshot(str(spec), SD_FILES, what="Stable Diffusion model", variable="MODEL") \
        if is_hub_id(spec) else Path(spec)
    if not folder.is_dir():
        raise ModelLoadError(f"{spec}: neither a Stable Diffusion folder nor a hub id (OWNER/NAME)")
    problems = stable_diffusion_problems(folder)
    if problems:
        raise ModelLoadError(f"{spec}: not a usable Stable Diffusion model: " + "; ".join(problems))
    return folder


def vit_folder(spec: str | Path) -> Path:
    """A local ViT folder (``config.json`` and weights) for ``spec`` (a folder, or a hub id fetched
    as :data:`VIT_FILES`)."""
    folder = fetch_snapshot(str(spec), VIT_FILES, what="ViT feature extractor", variable="DINO") \
        if is_hub_id(spec) else Path(spec)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{spec}: not a ViT folder (no config.json) nor a hub id (OWNER/NAME)")
    if not any(folder.glob(p) for p in ("*.safetensors", "*.bin")):
        raise ModelLoadError(f"{folder}: no weights (model.safetensors or pytorch_model.bin)")
    return folder
