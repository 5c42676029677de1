"""The parameters a stage reads, checked before its notebook runs.

:func:`check_stage_params` is called by the runner (:func:`diffpath.study.runner.run_stage`) before
papermill starts a kernel: a bad value is one line naming the stage and the parameter (a
:class:`ParamError`, exit status 2 from ``python -m diffpath.study``), instead of a traceback from
inside the notebook, and nothing is written. Each rule in :data:`RULES` covers one dotted key of
``params.yaml``; a stage's rules are those under the keys it reads (:class:`~diffpath.study.stages.
Stage`'s ``params``). Data sets must be registered (:func:`diffpath.data.available_datasets`), the
foreach item one of its list, counts positive integers, step counts at least 2, numbers numeric
and finite. Keys no rule names pass unchecked (their stage checks them).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["ParamError", "RULES", "check_stage_params"]


class ParamError(ValueError):
    """A stage parameter with a bad value: one line naming the stage and the parameter."""


Check = Callable[[Any], bool]


def _int(lo: int, hi: float = math.inf, *, null: bool = False) -> tuple[Check, str]:
    def ok(v: Any) -> bool:
        return (v is None and null) or (isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi)

    hi_text = "" if hi == math.inf else f" and at most {hi}"
    return ok, f"an integer ≥ {lo}{hi_text}" + (" or null" if null else "")


def _num(lo: float, hi: float = math.inf, *, open_lo: bool = False, null: bool = False) -> tuple[Check, str]:
    def ok(v: Any) -> bool:
        if v is None:
            return null
        return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and (v > lo if open_lo else v >= lo) and v <= hi)

    bounds = f"{'>' if open_lo else '≥'} {lo:g}" + (f" and ≤ {hi:g}" if hi < math.inf else "")
    return ok, f"a finite number {bounds}" + (" or null" if null else "")


def _bool(*extra: Any) -> tuple[Check, str]:
    return (lambda v: isinstance(v, bool) or v in extra), "true or false" + "".join(f" or {e}" for e in extra)


def _choice(*choices: Any) -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and v in choices), f"one of {', '.join(map(str, choices))}"


def _names(known: Callable[[], list[str]], what: str, *, empty: bool = False) -> tuple[Check, str]:
    def ok(v: Any) -> bool:
        return isinstance(v, list) and (empty or bool(v)) and all(isinstance(x, str) and x in known() for x in v)

    return ok, f"a {'' if empty else 'non-empty '}list of {what} ({', '.join(known())})"


def _name(known: Callable[[], list[str]], what: str) -> tuple[Check, str]:
    return (lambda v: isinstance(v, str) and v in known()), f"a {what} ({', '.join(known())})"


def _registry(module: str) -> Any:
    """A registry module, imported by name: the check changes no stage's output, so the stages'
    DVC dependencies (found from their imports by :mod:`diffpath.study.pipeline`) leave it out."""
    return importlib.import_module(module)


def _datasets() -> list[str]:
    return list(_registry("diffpath.data.registry").available_datasets())


def _methods() -> list[str]:
    return list(_registry("diffpath.methods.registry").METHODS)


def _timesteps(v: Any) -> bool:
    return v == "diffpath" or (isinstance(v, list) and len(v) >= 2 and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in v))


_COUNT, _SEED, _THREADS = _int(1), _int(0), _int(0, null=True)
#: dotted key → (check, what it must be)
RULES: dict[str, tuple[Check, str]] = {
    "data.size": _int(1, 2048), "data.channels": (lambda v: v in (1, 3) and not isinstance(v, bool), "1 or 3"),
    "data.datasets": _names(_datasets, "registered data sets"),
    "data.in_dist": _names(_datasets, "registered data sets"),
    "data.n_train": _int(1, null=True), "data.n_test": _int(1, null=True), "data.seed": _SEED,
    "errors.steps": _int(2), "errors.v2_timesteps": (_timesteps, '"diffpath" or a list of at least 2 timesteps ≥ 0'),
    "errors.clip_denoised": _bool(), "errors.clip_x0_hat": _bool(), "errors.seed": _SEED,
    "errors.noise_key": _choice("content", "index"), "errors.batch_size": _COUNT, "errors.chunk_size": _COUNT,
    "errors.n_maps": _int(0), "errors.num_threads": _THREADS,
    "model.spec": ((lambda v: isinstance(v, str) and bool(v)), "a model spec (a non-empty string)"),
    "model.device": ((lambda v: isinstance(v, str) and bool(v)), "a device (auto, cpu, cuda, cuda:N)"),
    "model.precision": _choice("auto", "fp32", "tf32", "bf16"), "model.channels_last": _bool("auto"),
    "model.compile": _bool(), "model.cuda_graphs": _bool(),
    "methods": _names(_methods, "methods"),
    "scorers.gmm.n_components": ((lambda v: isinstance(v, list) and bool(v) and all(_COUNT[0](k) for k in v)),
                                 "a non-empty list of integers ≥ 1"),
    "scorers.gmm.covariance_type": ((lambda v: isinstance(v, list) and bool(v) and all(
        k in ("full", "tied", "diag", "spherical") for k in v)), "a non-empty list of full, tied, diag, spherical"),
    "scorers.gmm.cv": _int(2), "scorers.gmm.max_iter": _COUNT, "scorers.kde.bandwidth": _num(0, open_lo=True),
    "report.main_method": _name(_methods, "method"), "report.compare": _names(_methods, "methods"),
    "report.ablation": _names(_methods, "methods"),
    "walkthrough.in_dist": _name(_datasets, "registered data set"),
    "walkthrough.ood": _name(_datasets, "registered data set"),
    "walkthrough.index_in": _int(0), "walkthrough.index_ood": _int(0), "walkthrough.method": _name(_methods, "method"),
    "localization.datasets": _names(_datasets, "registered data sets"), "localization.n_per_class": _COUNT,
    "localization.seed": _SEED, "localization.n_boot": _COUNT, "localization.smooth_sigma": _num(0, null=True),
    "localization.batch_size": _COUNT, "localization.num_threads": _THREADS, "localization.n_figure": _int(0),
    "localization_walkthrough.index": _int(0), "localization_walkthrough.steps": _COUNT,
    "localization_walkthrough.draws": _COUNT, "localization_walkthrough.seed": _SEED,
    "localization_walkthrough.t0_deterministic": _num(0, 1, open_lo=True),
    "localization_walkthrough.t0_stochastic": _num(0, 1, open_lo=True),
    "base_model.steps": _COUNT, "base_model.batch_size": _COUNT, "base_model.lr": _num(0, open_lo=True),
    "base_model.image_size": _int(1, 2048), "base_model.warmup_steps": _int(0), "base_model.ema_decay": _num(0, 1),
    "base_model.seed": _SEED, "base_model.n_train": _int(1, null=True), "base_model.num_threads": _THREADS,
    "base_model_eval.n_eval_images": _COUNT, "base_model_eval.n_eval_timesteps": _COUNT,
    "base_model_eval.n_samples": _int(0), "base_model_eval.sample_steps": _COUNT, "base_model_eval.seed": _SEED,
    "base_model_eval.num_threads": _THREADS,
}


def _lookup(params: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _read_keys(stage: str) -> list[str]:
    """The dotted keys (and sections) ``stage`` reads."""
    from diffpath.study.stages import stage_of

    return [entry.partition(" as ")[0].removesuffix(".*") for entry in stage_of(stage).params]


def _fail(stage: str, key: str, must: str, value: Any) -> ParamError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ParamError(f"stage {stage}: params {key} must be {must}, got {shown}")


def check_stage_params(stage: str, params: Mapping[str, Any], item: str | None = None) -> None:
    """Check every parameter ``stage`` reads (and its foreach ``item``) against :data:`RULES`.

    Raises:
        ParamError: the first bad value, naming the stage and the parameter.
    """
    from diffpath.study.stages import stage_of

    read = _read_keys(stage)
    for key, (ok, must) in RULES.items():
        if any(key == r or key.startswith(r + ".") for r in read):
            found, value = _lookup(params, key)
            if found and not ok(value):
                raise _fail(stage, key, must, value)
    found, in_dist = _lookup(params, "data.in_dist")
    has_sets, sets = _lookup(params, "data.datasets")
    if found and has_sets and isinstance(in_dist, list) and isinstance(sets, list) and not set(in_dist) <= set(sets):
        raise _fail(stage, "data.in_dist", f"a subset of data.datasets ({', '.join(map(str, sets))})", in_dist)
    st = stage_of(stage)
    if st.foreach is not None and item is not None:
        has, items = _lookup(params, st.foreach)
        if has and isinstance(items, list) and item not in items:
            raise ParamError(f"stage {stage}: {st.item} {item!r} is not in params {st.foreach} "
                             f"({', '.join(map(str, items))})")
