"""What the core asks of a model: the ε-model protocol ``model(x, t) -> ε``.

* ``x``: (B, C, H, W) float tensor, images or noisy images in the model's [-1, 1] space;
* ``t``: (B,) int64 tensor of original training timesteps ``0 .. T−1``;
* returns (B, C, H, W): the predicted noise ε̂.

:class:`diffpath.models.EpsModel` implements it (and re-exports :class:`EpsFn`); the walks and
passes also accept any callable of this shape (analytic oracles in the tests).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["EpsFn"]


@runtime_checkable
class EpsFn(Protocol):
    """An ε-model: ``(x (B, C, H, W), t (B,) int64) -> ε̂ (B, C, H, W)``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
