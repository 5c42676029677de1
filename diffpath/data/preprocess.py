"""uint8 images → the model's input: channels, spatial size and the [-1, 1] scale."""

from __future__ import annotations

import numpy as np

from diffpath.data.base import _resize_uint8

__all__ = ["RESIZE_METHODS", "rgb_to_luma", "to_model_input"]


RESIZE_METHODS = ("auto", "pad", "bilinear")


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 RGB (``..., 3``) with Pillow's fixed-point rounding, so the result
    equals ``Image.convert("L")`` (and torchvision's ``Grayscale``):
    ``(19595·R + 38470·G + 7471·B + 2¹⁵) >> 16``."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


def to_model_input(
    images: np.ndarray,
    size: int,
    channels: int,
    *,
    resize: str = "auto",
    pad_value: int = 0,
) -> np.ndarray:
    """uint8 images → float32 model input ``(N, channels, size, size)`` in ``[-1, 1]``.

    Steps, in this order, all on uint8:

    1. channels: RGBA drops alpha (no compositing); RGB → 1 channel by :func:`rgb_to_luma`
       (ITU-R 601-2, as PIL/torchvision); 1 channel → 3 by repetition (done last, after resizing).
    2. spatial size, per ``resize``:
       ``"pad"``: pad every side with ``pad_value`` (the background, 0 for the white-on-black sets)
       by ``(size − H) / 2`` (needs ``size − H`` even and ≥ 0; same for W), as the Fashion-MNIST base
       model is trained on 28 → 32 zero-padded images;
       ``"bilinear"``: Pillow bilinear resize to ``size``×``size`` (torchvision ``Resize((s, s))`` on
       PIL images gives the same bytes; Pillow antialiases when shrinking);
       ``"auto"``: nothing if already ``size``×``size``; ``"pad"`` if ``size − H`` and ``size − W``
       are both even and in 1..4; ``"bilinear"`` otherwise.
    3. scale: ``x / 127.5 − 1`` (= ToTensor + Normalize(0.5, 0.5)).
    """
    if resize not in RESIZE_METHODS:
        raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_METHODS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4:
        if x.shape[-1] not in (3, 4):
            raise ValueError(f"channel-last images need 1, 3 or 4 channels, got shape {x.shape}")
        x = x[..., :3]
        if channels == 1:
            x = rgb_to_luma(x)
    elif x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    n, h, w = x.shape[:3]
    dh, dw = size - h, size - w
    method = resize
    if method == "auto":
        if dh == 0 and dw == 0:
            method = "none"
        elif 0 < dh <= 4 and 0 < dw <= 4 and dh % 2 == 0 and dw % 2 == 0:
            method = "pad"
        else:
            method = "bilinear"
    if method == "pad":
        if dh < 0 or dw < 0 or dh % 2 or dw % 2:
            raise ValueError(f"cannot pad {h}×{w} to {size}×{size} symmetrically")
        pads = [(0, 0), (dh // 2, dh // 2), (dw // 2, dw // 2)] + [(0, 0)] * (x.ndim - 3)
        x = np.pad(x, pads, mode="constant", constant_values=pad_value)
    elif method == "bilinear" and (dh or dw):
        out = np.empty((n, size, size) + x.shape[3:], np.uint8)
        for i in range(n):
            out[i] = _resize_uint8(np.ascontiguousarray(x[i]), size, size, "bilinear")
        x = out
    if x.ndim == 3:
        x = x[:, None]
        if channels == 3:
            x = np.repeat(x, 3, axis=1)
    else:
        x = x.transpose(0, 3, 1, 2)
    return (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)
