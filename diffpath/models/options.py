"""Execution options of an ε-model from the study's params: what ``auto`` means on each device."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from diffpath.models import RunOptions

__all__ = ["fast_run_options", "run_options_from_params"]


def fast_run_options(device: str | torch.device) -> RunOptions:
    """The fast options per device type (what ``auto`` means in params).

    * CUDA: bf16 autocast + channels_last (torch.compile / CUDA graphs are opt-in: they pay off on
      long runs, and compile for minutes first). Not yet measured on a GPU: the study's params keep
      fp32 until ``benchmarks/bench_errors.py`` and the evaluate stage show the features agree.
    * CPU: fp32 + channels_last. On the study's 2-core AVX2 CPU (no native bf16), bf16 autocast was
      several times *slower*; channels_last was the only option that helped; torch.compile
      (inductor C++) did not pay back its compile time; see ``benchmarks/README.md``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return RunOptions(precision="bf16", channels_last=True, compile=False, cuda_graphs=False)
    return RunOptions(precision="fp32", channels_last=True, compile=False, cuda_graphs=False)


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def _flag(name: str, value: Any, auto: bool) -> bool:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return auto
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"run option {name} must be a boolean or 'auto', got {value!r}")


def run_options_from_params(params: Mapping[str, Any] | None, device: str | torch.device) -> RunOptions:
    """:class:`RunOptions` from a params mapping (e.g. ``params["errors"]["run"]``).

    Keys: ``precision`` (``fp32`` | ``tf32`` | ``bf16`` | ``auto``), ``channels_last``,
    ``compile``, ``cuda_graphs`` (booleans or ``auto``). A missing key keeps the exact default
    (fp32, nothing else); ``auto`` takes :func:`fast_run_options`' value for ``device``. CUDA graphs
    are dropped (with a warning) off CUDA; ``tf32`` is plain fp32 off CUDA.

    ``{"precision": "auto", "channels_last": "auto", "compile": "auto", "cuda_graphs": "auto"}`` is
    the fast path that ``benchmarks/bench_errors.py`` measures.
    """
    params = dict(params or {})
    unknown = set(params) - {"precision", "channels_last", "compile", "cuda_graphs"}
    if unknown:
        raise ValueError(f"unknown run option(s) {sorted(unknown)}; expected precision, "
                         "channels_last, compile, cuda_graphs")
    dev = torch.device(device)
    fast = fast_run_options(dev)
    precision = params.get("precision", "fp32")
    if precision is None or str(precision).lower() == "auto":
        precision = fast.precision
    precision = str(precision).lower()
    default = RunOptions()
    channels_last = _flag("channels_last", params["channels_last"], fast.channels_last) \
        if "channels_last" in params else default.channels_last
    compile_ = _flag("compile", params["compile"], fast.compile) if "compile" in params else default.compile
    graphs = _flag("cuda_graphs", params["cuda_graphs"], fast.cuda_graphs) \
        if "cuda_graphs" in params else default.cuda_graphs
    if graphs and dev.type != "cuda":
        warnings.warn("cuda_graphs needs a CUDA device; ignored on " + dev.type, stacklevel=2)
        graphs = False
    return RunOptions(precision=precision, channels_last=channels_last, compile=compile_ or graphs,
                      cuda_graphs=graphs)
