"""Intermediate activations of an ε-model's UNet, through forward hooks (for deep-feature maps)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["UNetFeatures", "block_modules"]


def _output_tensor(out: Any) -> torch.Tensor:
    """A block's output tensor: diffusers' down blocks return ``(hidden, residuals)``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot take a feature tensor from a block output of type {type(out).__name__}")


def block_modules(net: nn.Module) -> dict[str, nn.Module]:
    """Named encoder/decoder blocks of a supported UNet: diffusers ``UNet2DModel`` (reached as
    ``net.unet`` through the adapter, or directly) → ``down_blocks.i`` / ``up_blocks.i``;
    improved-diffusion → ``input_blocks.i`` / ``output_blocks.i``."""
    unet = getattr(net, "unet", net)
    found: dict[str, nn.Module] = {}
    for enc, dec in (("down_blocks", "up_blocks"), ("input_blocks", "output_blocks")):
        if hasattr(unet, enc) and hasattr(unet, dec):
            for kind in (enc, dec):
                for i, blk in enumerate(getattr(unet, kind)):
                    found[f"{kind}.{i}"] = blk
            return found
    raise ValueError(
        f"{type(unet).__name__}: no down_blocks/up_blocks (diffusers) or input_blocks/output_blocks "
        "(improved-diffusion) to take features from"
    )


class UNetFeatures:
    """Intermediate activations of an ε-model's UNet, through forward hooks.

    ``layers`` names blocks as ``"up_blocks.0"`` (diffusers) or ``"output_blocks.5"``
    (improved-diffusion). ``None`` picks, from one probe pass at the model's image size, the first
    *decoder* block that reaches each output resolution, and keeps ``n_resolutions`` (2) of them:
    the highest resolutions strictly below the input's first, then the input's own. So a 4-level
    32 px UNet gives its 16 and 8 px decoder features, a 3-level one (32 → 16 → 8) its 16 px and
    first 32 px decoder features (never the final block right before the output convolution
    unless nothing else is there).

    Calling ``feats(x, t)`` runs the model once and returns ``{name: (B, C_l, h_l, w_l)}``.
    """

    def __init__(self, model: Any, layers: Sequence[str] | None = None, *, n_resolutions: int = 2):
        net = getattr(model, "net", model)
        self.model = model
        self.blocks = block_modules(net)
        if layers is not None:
            missing = [name for name in layers if name not in self.blocks]
            if missing:
                raise ValueError(f"unknown layers {missing}; available: {list(self.blocks)}")
            self.layers = list(layers)
        else:
            self.layers = self._default_layers(n_resolutions)

    def _probe(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        size = int(getattr(self.model, "image_size", 32))
        ch = int(getattr(self.model, "channels", 3))
        dev = getattr(self.model, "device", torch.device("cpu"))
        x = torch.zeros(1, ch, size, size, device=dev)
        return self._run(x, torch.zeros(1, dtype=torch.long, device=dev), names)

    def _default_layers(self, n_resolutions: int) -> list[str]:
        dec = [n for n in self.blocks if n.startswith(("up_blocks", "output_blocks"))]
        size = int(getattr(self.model, "image_size", 32))
        shapes = {n: f.shape[-1] for n, f in self._probe(dec).items()}
        first: dict[int, str] = {}
        for name in dec:  # decoder order: lowest resolution first
            first.setdefault(shapes[name], name)
        below = sorted((r for r in first if r < size), reverse=True)
        rest = sorted((r for r in first if r >= size))
        return [first[r] for r in (below + rest)[:n_resolutions]]

    def _run(self, x: torch.Tensor, t: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:
            def hook(_m, _inp, out, name=name):
                store[name] = _output_tensor(out).float()
            handles.append(self.blocks[name].register_forward_hook(hook))
        try:
            self.model(x, t)
        finally:
            for h in handles:
                h.remove()
        return {n: store[n] for n in names}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._run(x, t, self.layers)
