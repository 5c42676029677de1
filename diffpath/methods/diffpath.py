"""DiffPath (Heng et al., NeurIPS 2024): the DDIM inversion path of an image, and its features.

The pass (:func:`diffpath_path`) DDIM-inverts x0 along K respaced timesteps and reduces ε at every
step, and its rate of change Δε = diff(ε)·K, to per-image moments on the device
(:mod:`diffpath.core.moments`); every feature below is then a function of those cached moments.
Notation: :mod:`diffpath.core.sampling`; the method and its conformance: ``docs/methods.md``.

Statistics are sums over *all* steps, pixels and channels of the ε path and of Δε; DiffPath saves
twelve of them under these names:

``eps_sum`` Σε, ``eps_sum_abs`` Σ|ε|, ``eps_sum_sq`` Σε², ``eps_sum_sq_sqrt`` √Σε²,
``eps_sum_cb`` Σε³, ``eps_sum_cb_cbrt`` ∛Σε³, and the same six of Δε as ``deps_dt``,
``deps_dt_abs``, ``deps_dt_sq``, ``deps_dt_sq_sqrt``, ``deps_dt_cb``, ``deps_dt_cb_cbrt``.

The 6-D feature stacks (eps_sum, eps_sum_sq, eps_sum_cb, deps_dt, deps_dt_sq, deps_dt_cb); the 1-D
feature is the path's curvature ``deps_dt_sq_sqrt`` = √Σ‖Δε‖².
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffpath.core.moments import MOMENTS, as_moments, moment, moments
from diffpath.core.protocols import EpsFn
from diffpath.core.sampling import StepCallback, ddim_invert
from diffpath.core.schedule import NoiseSchedule

__all__ = [
    "DIFFPATH_KEYS",
    "DIFFPATH_MAP_KEYS",
    "DIFFPATH_STAT_NAMES",
    "diffpath_statistics",
    "diffpath_6d",
    "diffpath_1d",
    "DiffPathResult",
    "diffpath_path",
]

DIFFPATH_STAT_NAMES: tuple[str, ...] = (
    "eps_sum",
    "eps_sum_abs",
    "eps_sum_sq",
    "eps_sum_sq_sqrt",
    "eps_sum_cb",
    "eps_sum_cb_cbrt",
    "deps_dt",
    "deps_dt_abs",
    "deps_dt_sq",
    "deps_dt_sq_sqrt",
    "deps_dt_cb",
    "deps_dt_cb_cbrt",
)


#: The error cache's keys of a DiffPath pass's moments (:meth:`DiffPathResult.as_cache`).
DIFFPATH_KEYS: dict[str, str] = {"eps": "dp_eps", "deps": "dp_deps"}
#: ... and of its per-pixel maps, kept for a few images only.
DIFFPATH_MAP_KEYS: dict[str, str] = {"eps": "maps_dp_eps", "xt": "maps_dp_xt"}


def _six(m: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    total = m.sum(axis=1)  # over steps: (B, 5)
    s1, a1, s2, s3 = (moment(total, k) for k in ("sum", "abs", "sq", "cb"))
    return {
        f"{prefix}": s1,
        f"{prefix}_abs": a1,
        f"{prefix}_sq": s2,
        f"{prefix}_sq_sqrt": np.sqrt(s2),
        f"{prefix}_cb": s3,
        f"{prefix}_cb_cbrt": np.cbrt(s3),
    }


def diffpath_statistics(eps_moments: np.ndarray | torch.Tensor,
                        deps_moments: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """The twelve DiffPath statistics, each (B,) float64, from (B, K, 5) and (B, K−1, 5) moments."""
    eps = _six(as_moments(eps_moments), "eps_sum")
    deps = _six(as_moments(deps_moments), "deps_dt")
    return {**eps, **deps}


def diffpath_6d(stats: dict[str, np.ndarray]) -> np.ndarray:
    """(B, 6): eps_sum, eps_sum_sq, eps_sum_cb, deps_dt, deps_dt_sq, deps_dt_cb."""
    keys = ("eps_sum", "eps_sum_sq", "eps_sum_cb", "deps_dt", "deps_dt_sq", "deps_dt_cb")
    return np.column_stack([stats[k] for k in keys])


def diffpath_1d(stats: dict[str, np.ndarray]) -> np.ndarray:
    """(B,): the curvature √Σ‖Δε‖² (``deps_dt_sq_sqrt``)."""
    return np.asarray(stats["deps_dt_sq_sqrt"], dtype=np.float64)


@dataclass
class DiffPathResult:
    """What one DiffPath pass over a batch gives (K kept steps).

    Attributes:
        eps_moments: (B, K, 5) float64, :func:`moments` of ε at each inversion step.
        deps_moments: (B, K−1, 5) float64, moments of Δε_k = (ε_{k+1} − ε_k)·K.
        xT: (B, C, H, W) the inverted latent.
        eps: (B, K, C, H, W) the ε path, only with ``keep_maps``.
        xt: (B, K, C, H, W) x after each step, only with ``keep_maps``.
    """

    eps_moments: torch.Tensor
    deps_moments: torch.Tensor
    xT: torch.Tensor
    eps: torch.Tensor | None = None
    xt: torch.Tensor | None = None

    def as_cache(self) -> dict[str, torch.Tensor]:
        """The error cache's arrays of this pass (:data:`DIFFPATH_KEYS`, and
        :data:`DIFFPATH_MAP_KEYS` when the maps were kept), as the tensors computed."""
        out = {DIFFPATH_KEYS["eps"]: self.eps_moments, DIFFPATH_KEYS["deps"]: self.deps_moments}
        if self.eps is not None and self.xt is not None:
            out.update({DIFFPATH_MAP_KEYS["eps"]: self.eps, DIFFPATH_MAP_KEYS["xt"]: self.xt})
        return out


@torch.no_grad()
def diffpath_path(
    model: EpsFn,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    *,
    schedule: NoiseSchedule | None = None,
    clip_denoised: bool = True,
    keep_maps: bool = False,
    callback: StepCallback | None = None,
) -> DiffPathResult:
    """DiffPath: DDIM-invert x0 and reduce the ε path to per-step moments on the device.

    Args:
        model: ε-model ``(x, t) -> ε̂``.
        x0: (B, C, H, W) images in [-1, 1].
        timesteps: the K ascending kept timesteps (the study's: ``schedule.respaced_timesteps(K)``);
            the last step goes to pure noise, as DiffPath's ``ddim_reverse_sample_loop``.
        schedule: ᾱ (default ``model.schedule``).
        clip_denoised: clip x̂0 on the path (DiffPath does).
        keep_maps: also return the ε path and the states, (B, K, C, H, W) on the CPU.
        callback: sees each step's dict (:mod:`diffpath.core.sampling`).

    The rate of change is Δε_k = (ε_{k+1} − ε_k)·K (DiffPath's ``diff(ε)·T`` with its T = K).
    """
    K = len(timesteps)
    eps_m: list[torch.Tensor] = []
    deps_m: list[torch.Tensor] = []
    eps_maps: list[torch.Tensor] = []
    xt_maps: list[torch.Tensor] = []
    prev: list[torch.Tensor | None] = [None]

    def record(step: dict[str, Any]) -> None:
        eps = step["eps"]
        eps_m.append(moments(eps))
        if prev[0] is not None:
            deps_m.append(moments((eps - prev[0]) * K))
        prev[0] = eps
        if keep_maps:
            eps_maps.append(eps.cpu())
            xt_maps.append(step["x_next"].cpu())
        if callback is not None:
            callback(step)

    xT = ddim_invert(model, x0, timesteps, schedule=schedule, clip_denoised=clip_denoised, callback=record)
    B = x0.shape[0]
    empty = torch.zeros(B, 0, len(MOMENTS), dtype=torch.float64, device=x0.device)
    return DiffPathResult(
        eps_moments=torch.stack(eps_m, 1),
        deps_moments=torch.stack(deps_m, 1) if deps_m else empty,
        xT=xT,
        eps=torch.stack(eps_maps, 1) if keep_maps else None,
        xt=torch.stack(xt_maps, 1) if keep_maps else None,
    )
