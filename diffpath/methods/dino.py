"""The DINO map: cosine distance between ViT patch features of an image and of its reconstruction.

DIVAD's ``test.py`` (``--use_dino --dino_version v1s8``) compares the last-layer patch tokens of DINO
ViT-S/8 (after the final LayerNorm: ``get_intermediate_layers(x)[0][:, 1:]``) of the input and of the
reconstruction, both resized to 256² and normalised with ImageNet's mean and std:

1. d = 1 − cos(f(x), f(x̂)) over the feature dimension, per patch: (B, 1, 256/8, 256/8);
2. upsampled bilinearly (``align_corners=True``) to the image size (256²);
3. multiplied by a foreground mask when one is given (DIVAD: CutLER masks, read from files);
4. blurred with a Gaussian of σ = 5 px (scipy's ``gaussian_filter``: reflective border, 4σ radius;
   :func:`diffpath.methods.maps.gaussian_smooth` is the same filter).

The ViT here is transformers' ``ViTModel`` (``facebook/dino-vits8``, the same weights as
``torch.hub``'s ``dino_vits8``) or any transformers vision transformer whose output ends with its
h·w patch tokens (DINOv2 too); the position embeddings are interpolated to 256² by transformers
(bicubic to the patch grid's size; DINO's own code passes a scale factor of (32 + 0.1)/28 instead, so
features can differ from torch.hub's in the last digits).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn.functional as F

from diffpath.methods.maps import gaussian_smooth

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DINO_SIGMA", "PatchFeatures", "dino_distance_map"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: DIVAD's blur of the DINO map, in pixels at 256²
DINO_SIGMA = 5.0


class PatchFeatures:
    """Last-layer patch tokens of a transformers ViT as feature maps.

    ``__call__((B, 3, H, W) images in [-1, 1]) → (B, D, H/p, W/p)`` float32 (p: the patch size;
    H and W multiples of p), on the model's device.
    """

    def __init__(self, model: torch.nn.Module, patch_size: int):
        self.model = model.eval()
        self.patch_size = int(patch_size)
        params = inspect.signature(model.forward).parameters
        self._kw = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}

    @classmethod
    def from_pretrained(cls, spec: str | Path, device: str | torch.device = "cpu") -> PatchFeatures:
        """A ViT folder or hub id (fetched by :func:`diffpath.models.hub.vit_folder`)."""
        from transformers import AutoConfig, AutoModel

        from diffpath.models import ModelLoadError
        from diffpath.models.hub import vit_folder

        folder = vit_folder(spec)
        try:
            cfg = AutoConfig.from_pretrained(folder)
            kw = {"add_pooling_layer": False} if cfg.model_type == "vit" else {}
            model = AutoModel.from_pretrained(folder, **kw)
        except Exception as exc:  # transformers raises many kinds
            raise ModelLoadError(f"{folder}: cannot load a transformers vision model: {exc}") from exc
        return cls(model.to(device), int(cfg.patch_size))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        if h * self.patch_size != H or w * self.patch_size != W:
            raise ValueError(f"image size {H}×{W} is not a multiple of the patch size {self.patch_size}")
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        pix = ((x.float() + 1) / 2 - mean) / std
        tokens = self.model(pixel_values=pix.to(self.device), **self._kw).last_hidden_state
        return tokens[:, -h * w:, :].float().transpose(1, 2).reshape(B, -1, h, w)


def dino_distance_map(
    features: PatchFeatures,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    *,
    sigma: float = DINO_SIGMA,
    foreground: torch.Tensor | None = None,
    x_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """DIVAD's DINO map (module docstring): (B, 1, H, W), in [0, 2] before the blur.

    Args:
        features: the ViT.
        x, x_hat: (B, 3, H, W) image and reconstruction in [-1, 1] (DIVAD: 256²).
        sigma: Gaussian blur in pixels (0: none).
        foreground: optional (B, H, W) or (B, 1, H, W) mask (bool or 0/1) the map is multiplied by.
        x_features: ``features(x)`` when already computed (several reconstructions of one image).
    """
    H, W = x.shape[-2:]
    fx = features(x) if x_features is None else x_features
    fr = features(x_hat)
    d = (1.0 - F.cosine_similarity(fx, fr, dim=1, eps=1e-8)).unsqueeze(1)
    amap = F.interpolate(d, size=(H, W), mode="bilinear", align_corners=True)
    if foreground is not None:
        fg = foreground.to(amap.device, amap.dtype)
        amap = amap * (fg if fg.ndim == 4 else fg.unsqueeze(1))
    return gaussian_smooth(amap, float(sigma))
