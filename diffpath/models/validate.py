"""Checks of the settings files in a model folder, before anything is built from them.

Model folders are shared like detector folders, so every value :func:`~diffpath.models.load_model`
reads from them is checked first, and a bad one is a :class:`~diffpath.models.ModelLoadError`
naming the file and the field (the command line prints it in one line):

* ``config.json`` of a diffusers UNet: ``sample_size`` (an integer, or a square pair, in
  [1, :data:`MAX_IMAGE_SIZE`]), ``in_channels`` and ``out_channels`` (positive integers);
* ``scheduler_config.json``: a JSON object; ``num_train_timesteps`` in [2,
  :data:`MAX_TIMESTEPS`]; ``beta_start`` ≤ ``beta_end``, finite, in (0, 1); ``beta_schedule`` and
  ``prediction_type`` strings; ``trained_betas`` absent or null (not supported);
* an improved-diffusion checkpoint's settings (``NAME.json`` / ``NAME.yaml``): a mapping, with
  ``image_size`` and ``diffusion_steps`` in the same ranges.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from diffpath.models.errors import ModelLoadError

__all__ = [
    "MAX_IMAGE_SIZE",
    "MAX_TIMESTEPS",
    "check_image_size",
    "check_scheduler_config",
    "check_timesteps",
    "check_unet_config",
    "read_json_object",
]

#: The largest square model input accepted (pixels a side): the largest released pixel-space
#: DDPMs are 1024 px; a larger size is a broken or hostile settings file, and its inputs alone
#: would take gigabytes per batch.
MAX_IMAGE_SIZE = 2048
#: The most training timesteps accepted (released models use 1000 to 4000).
MAX_TIMESTEPS = 100_000


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`ModelLoadError` naming the file when it cannot be
    read, is not JSON, or holds something other than an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read it ({exc})") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: must hold a JSON object, got a JSON {type(data).__name__}")
    return data


def check_image_size(value: Any, where: str, field: str = "image_size") -> int:
    """``value`` as a square model size in [1, :data:`MAX_IMAGE_SIZE`]."""
    if not _is_int(value) or not 1 <= value <= MAX_IMAGE_SIZE:
        raise ModelLoadError(f"{where}: {field} must be an integer in [1, {MAX_IMAGE_SIZE}], got {value!r}")
    return int(value)


def check_timesteps(value: Any, where: str, field: str) -> int:
    """``value`` as a number of training timesteps in [2, :data:`MAX_TIMESTEPS`]."""
    if not _is_int(value) or not 2 <= value <= MAX_TIMESTEPS:
        raise ModelLoadError(f"{where}: {field} must be an integer in [2, {MAX_TIMESTEPS}], got {value!r}")
    return int(value)


def check_unet_config(cfg: Mapping[str, Any], path: Path) -> int:
    """Check a diffusers UNet ``config.json``; returns its square ``sample_size``."""
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ModelLoadError(f"{path}: sample_size {list(size)!r} is not square; diffpath's models "
                                 "take square images (give one size)")
        size = size[0]
    size = check_image_size(size, str(path), "sample_size")
    for key in ("in_channels", "out_channels"):
        v = cfg.get(key, 3)
        if not _is_int(v) or not 1 <= v <= 64:
            raise ModelLoadError(f"{path}: {key} must be an integer in [1, 64], got {v!r}")
    return size


def _beta(cfg: Mapping[str, Any], key: str, default: float, path: Path) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0 < v < 1:
        raise ModelLoadError(f"{path}: {key} must be a number in (0, 1), got {v!r}")
    return float(v)


def check_scheduler_config(cfg: Mapping[str, Any], path: Path) -> None:
    """Check a diffusers ``scheduler_config.json`` (see the module docstring)."""
    if "num_train_timesteps" in cfg:
        check_timesteps(cfg["num_train_timesteps"], str(path), "num_train_timesteps")
    start, end = _beta(cfg, "beta_start", 1e-4, path), _beta(cfg, "beta_end", 0.02, path)
    if start > end:
        raise ModelLoadError(f"{path}: beta_start ({start}) must not exceed beta_end ({end})")
    for key in ("beta_schedule", "prediction_type"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ModelLoadError(f"{path}: {key} must be a string, got {cfg[key]!r}")
    if cfg.get("trained_betas") is not None:
        raise ModelLoadError(f"{path}: trained_betas are not supported; give beta_schedule, "
                             "beta_start and beta_end instead")
