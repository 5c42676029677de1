"""Batched SSIM *maps* on the tensor's device (Wang et al., 2004).

:func:`ssim_map` returns the per-pixel structural similarity between two batches of images, one
value per pixel *and channel* (channels are never mixed), so that DiffPathV2 can weight a
per-pixel score error by ``1 − SSIM``.

Definition
----------
With a normalised Gaussian window ``g`` (``window_size`` taps per axis, standard deviation
``sigma``) and local statistics taken per channel,

* μx = g∗x, μy = g∗y
* σx² = g∗x² − μx², σy² = g∗y² − μy², σxy = g∗(xy) − μx·μy  (population, i.e. *weighted*
  moments with weights summing to one; no ``N/(N−1)`` sample correction)
* C1 = (k1·L)², C2 = (k2·L)² with L = ``data_range`` (2 for images in [-1, 1])
* SSIM = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))

Border handling
---------------
The map has the image's size. Before filtering, images are extended *symmetrically* about the
edge, the edge pixel repeated (``d c b a | a b c d | d c b a``, numpy's ``"symmetric"``), which is
what :func:`scipy.ndimage.gaussian_filter` calls ``mode="reflect"``. scikit-image's
``structural_similarity(..., gaussian_weights=True)`` filters with
``skimage.filters.gaussian(..., mode="reflect", truncate=3.5)``, i.e. exactly this extension and an
11-tap kernel for σ = 1.5, so the two maps agree at *every* pixel, borders included (skimage's
scalar ``mssim`` then averages only the interior; our per-image means in
:mod:`diffpath.methods.diffpathv2` average the whole map). Note that torch's own ``"reflect"`` padding is
the *other* reflection (edge pixel not repeated, scipy's ``"mirror"``), so it is not used here. The
extension is periodic with period 2·size, so images smaller than the window are handled too.

Precision
---------
The arithmetic runs in float64 when either input is float64, otherwise in float32 (half and
bfloat16 inputs are promoted). In float32 the variances are differences of O(1) quantities
(``g∗x² − μx²`` for |x| ≤ 1), so they carry an absolute error of a few float32 ulps of 1
(~1e-7); they meet the constant C2 = (0.03·2)² = 3.6e-3 in the denominator, which bounds the
error of an SSIM value at roughly ``few·1.2e-7 / 3.6e-3`` ≈ 1e-4 in the worst case and far less on
typical images (see ``tests/test_ssim.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["gaussian_window", "symmetric_pad_index", "gaussian_filter", "ssim_map"]


def gaussian_window(
    window_size: int = 11,
    sigma: float = 1.5,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A normalised 1-D Gaussian of ``window_size`` (odd) taps, computed in float64, then cast.

    Tap k (k = −r..r, r = window_size // 2) has weight ∝ exp(−k²/(2σ²)), as scipy.ndimage builds it.
    """
    if window_size < 1 or window_size % 2 != 1:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    r = window_size // 2
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (k / float(sigma)) ** 2)
    return (g / g.sum()).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _filter_setup(window_size: int, sigma: float, dtype: torch.dtype, device: torch.device, H: int, W: int):
    # built once per (window, dtype, device, image size): no host→device copy inside the loops
    r = window_size // 2
    return (
        gaussian_window(window_size, sigma, dtype=dtype, device=device),
        symmetric_pad_index(H, r, device),
        symmetric_pad_index(W, r, device),
    )


def symmetric_pad_index(n: int, pad: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source indices ``(n + 2·pad,)`` int64 of a symmetric (edge-repeating) extension of length n.

    Extended position p ∈ [−pad, n + pad) reads the original index obtained by folding p into
    one period ``[0, 2n)`` and mirroring the second half: ``m = p mod 2n; m if m < n else 2n−1−m``.
    """
    p = torch.arange(-pad, n + pad, dtype=torch.int64, device=device)
    m = torch.remainder(p, 2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


def gaussian_filter(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian filter of (B, C, H, W) maps, channel by channel, same size out.

    The window has ``2·radius + 1`` taps (:func:`gaussian_window`); borders are extended
    symmetrically, the edge pixel repeated (scipy's ``mode="reflect"``). Rows are filtered
    first, then columns, in ``x``'s dtype and on its device.
    """
    B, C, H, W = x.shape
    g, idx_h, idx_w = _filter_setup(2 * int(radius) + 1, float(sigma), x.dtype, x.device, H, W)
    x = x.index_select(2, idx_h)
    x = x.index_select(3, idx_w)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)


def _compute_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    if x.dtype == torch.float64 or y.dtype == torch.float64:
        return torch.float64
    return torch.float32


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 2.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel, per-channel SSIM between two image batches.

    Args:
        x, y: (B, C, H, W) tensors on the same device (any float dtype).
        window_size: odd number of Gaussian taps per axis (11 as in Wang et al.).
        sigma: standard deviation of the Gaussian window in pixels (1.5).
        data_range: dynamic range L of the images (2 for [-1, 1]).
        k1, k2: the stabilising constants, C1 = (k1·L)², C2 = (k2·L)².

    Returns:
        (B, C, H, W) SSIM map, float64 if either input is float64, else float32, on ``x``'s device.
        Matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
        use_sample_covariance=False, full=True)`` (σ = 1.5, truncate 3.5 ⇒ 11 taps) at every pixel.
    """
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    dtype = _compute_dtype(x, y)
    dev = x.device
    x = x.to(device=dev, dtype=dtype)
    y = y.to(device=dev, dtype=dtype)
    if window_size < 1 or window_size % 2 != 1:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    C = x.shape[1]
    # the five local statistics are filtered in one depthwise pass: (B, 5C, H, W)
    stats = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), sigma, window_size // 2)
    mx, my, mxx, myy, mxy = stats.split(C, dim=1)

    vx = mxx - mx * mx
    vy = myy - my * my
    vxy = mxy - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * vxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return num / den
