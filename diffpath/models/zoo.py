"""Known released checkpoints: where to fetch them and the settings they were trained with.

DiffPath's models are improved-diffusion state dicts (``.pt``) whose architecture and schedule
live in a separate YAML file of the DiffPath repository. The settings are carried here, so that a
known checkpoint loads with no settings file written by hand:

==================  ======================================  =====================================
short name          file (Hugging Face repository)          settings (DiffPath's config)
==================  ======================================  =====================================
``diffpath-celeba32``  ``celeba_ema_0.9999_499999.pt``      ``configs/celeba_model_config.yaml``
                    (``ajrheng/diffpath``)
``imagenet64``      ``imagenet64_uncond_100M_1500K.pt``     ``configs/imagenet_model_config.yaml``
                    (openai's blob store, no hub repo)
==================  ======================================  =====================================

Specs that :func:`resolve_spec` understands (everything else is a local path or a diffusers hub
id, handled by :func:`diffpath.models.load_model`):

* a short name from :data:`ZOO` (``diffpath-celeba32``);
* ``hub:OWNER/REPO/FILE.pt``: one file of a Hugging Face repository.

Fetching uses :func:`huggingface_hub.hf_hub_download` (imported lazily) into the usual Hugging Face
cache, or, for a file with no hub repository (``imagenet64``), a plain download into
:func:`url_cache`; offline, with nothing cached, it raises one :class:`~diffpath.models.ModelLoadError`
that names the URL and where to put the file instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffpath.models.errors import ModelLoadError

__all__ = ["ZooEntry", "ZOO", "zoo_entry", "zoo_settings_for", "zoo_name_for", "is_remote_spec", "resolve_spec",
           "settings_dep", "url_cache", "ZOO_FILE"]

#: this module's path relative to the repository root: the DVC dependency of a zoo model's settings
ZOO_FILE = "diffpath/models/zoo.py"


@dataclass(frozen=True)
class ZooEntry:
    """A released checkpoint: its file, where it lives, and its improved-diffusion settings."""

    name: str
    filename: str
    url: str
    settings: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None  # Hugging Face repository, when the file is on the hub
    description: str = ""
    trained_on: str | None = None  # the base model's training set (the published figures' key)


# DiffPath's configs/celeba_model_config.yaml (the remaining keys: improved-diffusion's defaults).
_CELEBA32 = {"image_size": 32, "num_channels": 128, "num_res_blocks": 3, "learn_sigma": True,
             "diffusion_steps": 4000, "noise_schedule": "cosine", "class_cond": False, "dropout": 0.3,
             "use_zero_module": True}
# DiffPath's configs/imagenet_model_config.yaml (openai's L-hybrid unconditional ImageNet-64 model).
_IMAGENET64 = {**_CELEBA32, "image_size": 64, "dropout": 0.0}

ZOO: dict[str, ZooEntry] = {
    "diffpath-celeba32": ZooEntry(
        "diffpath-celeba32", "celeba_ema_0.9999_499999.pt",
        "https://huggingface.co/ajrheng/diffpath/resolve/main/celeba_ema_0.9999_499999.pt",
        _CELEBA32, repo_id="ajrheng/diffpath",
        description="DiffPath's CelebA 32x32 model (improved-diffusion, cosine, T=4000, learned sigma)",
        trained_on="celeba"),
    "imagenet64": ZooEntry(
        "imagenet64", "imagenet64_uncond_100M_1500K.pt",
        "https://openaipublic.blob.core.windows.net/diffusion/march-2021/imagenet64_uncond_100M_1500K.pt",
        _IMAGENET64, repo_id=None,
        description="openai improved-diffusion ImageNet 64x64, unconditional, L-hybrid (as DiffPath uses it)",
        trained_on="imagenet"),
}


def zoo_entry(name: str) -> ZooEntry | None:
    """The entry of a short name, or None."""
    return ZOO.get(name)


def zoo_settings_for(path: str | Path) -> dict[str, Any] | None:
    """The settings of a known checkpoint, found by its file name (None for unknown files)."""
    name = Path(path).name
    for e in ZOO.values():
        if e.filename == name:
            return dict(e.settings)
    return None


def zoo_name_for(spec: str | Path) -> str | None:
    """The zoo name of a spec: the name itself, or the entry whose released file ``spec`` is."""
    s = str(spec)
    if s in ZOO:
        return s
    name = Path(s).name
    return next((e.name for e in ZOO.values() if e.filename == name), None)


def is_remote_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names a zoo model or a ``hub:`` file (as opposed to a local path)."""
    s = str(spec)
    return s in ZOO or s.startswith("hub:")


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import os
    import socket

    if any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "DIFFPATH_OFFLINE")):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_file(repo_id: str, filename: str, url: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with diffusers
        raise ModelLoadError("fetching a checkpoint needs huggingface_hub (pip install huggingface_hub)") from exc
    try:  # unreachable hub: the cache only (no minutes of retries)
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=not _hub_reachable()))
    except Exception as exc:  # offline: LocalEntryNotFoundError, ConnectionError, …
        raise ModelLoadError(
            f"cannot fetch {filename} from the Hugging Face repository {repo_id} "
            f"({type(exc).__name__}; offline?). Download {url} on a machine with the internet and "
            f"put it anywhere, e.g. models/paper/{filename}, then pass that path as the model "
            f"(make paper MODEL=models/paper/{filename}); its settings are known to diffpath."
        ) from exc


def url_cache() -> Path:
    """Where zoo files without a hub repository are downloaded: ``$DIFFPATH_CACHE`` or
    ``$XDG_CACHE_HOME/diffpath/models`` (``~/.cache/diffpath/models``)."""
    import os

    if os.environ.get("DIFFPATH_CACHE"):
        return Path(os.environ["DIFFPATH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffpath" / "models"


def _url_file(e: ZooEntry) -> Path:
    """A zoo file served from a plain URL (openai's blob store), downloaded once into
    :func:`url_cache` (to a temporary name first, so a broken download is never taken as the file)."""
    import urllib.parse
    import urllib.request

    target = url_cache() / e.filename
    if target.is_file():
        return target
    host = urllib.parse.urlparse(e.url).hostname or ""
    if not _hub_reachable(host):
        raise ModelLoadError(
            f"cannot fetch {e.filename} ({host} unreachable; offline?). Download {e.url} on a machine with "
            f"the internet and put it at {target} (or anywhere, then pass that path: make paper "
            f"MODEL=models/paper/{e.filename}); its settings are known to diffpath.")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        urllib.request.urlretrieve(e.url, part)
        part.replace(target)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ModelLoadError(f"downloading {e.url} failed ({type(exc).__name__}: {exc}); put the file at "
                             f"{target}") from exc
    return target


def resolve_spec(spec: str | Path) -> str:
    """A local path for ``spec``: zoo names and ``hub:`` files are fetched into the Hugging Face
    cache (or found there), zoo files without a hub repository into :func:`url_cache`; anything
    else is returned unchanged.

    Raises:
        ModelLoadError: unknown ``hub:`` form, or a failed download (the message says where to put
            the file).
    """
    s = str(spec)
    if s in ZOO:
        e = ZOO[s]
        if e.repo_id is None:
            return str(_url_file(e))
        return str(_hub_file(e.repo_id, e.filename, e.url))
    if s.startswith("hub:"):
        parts = s[4:].split("/")
        if len(parts) < 3:
            raise ModelLoadError(f"{s}: expected hub:OWNER/REPO/FILE")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        return str(_hub_file(repo_id, filename, f"https://huggingface.co/{repo_id}/resolve/main/{filename}"))
    return s


def settings_dep(spec: str | Path) -> str:
    """The file that holds a model's settings, for DVC to depend on.

    A ``.pt`` with a ``.json``/``.yaml``/``.yml`` beside it → that file; a known checkpoint (or a
    zoo / ``hub:`` spec) without one → this module (:data:`ZOO_FILE`); a diffusers folder → its
    UNet ``config.json``; anything else → ``spec`` itself.
    """
    s = str(spec)
    if is_remote_spec(s):
        return ZOO_FILE
    p = Path(s)
    if p.suffix in (".pt", ".pth", ".ckpt"):
        for ext in (".json", ".yaml", ".yml"):
            if p.with_suffix(ext).is_file():
                return str(p.with_suffix(ext))
        return ZOO_FILE if zoo_settings_for(p) is not None else str(p.with_suffix(".json"))
    for cand in (p / "unet" / "config.json", p / "config.json"):
        if cand.is_file():
            return str(cand)
    return s
