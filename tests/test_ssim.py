"""diffpath.core.ssim against scikit-image's reference SSIM (Wang et al. settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from diffpath.core.ssim import gaussian_window, ssim_map, symmetric_pad_index

torch.set_num_threads(1)

C2 = (0.03 * 2.0) ** 2
# float32 bound: the local variances are differences of O(1) numbers (|x| ≤ 1), so each carries
# an absolute error of a few float32 ulps of 1; they are divided by at least C2 = 3.6e-3, so one
# SSIM value is off by at most ~ 4·eps32 / C2 ≈ 1.3e-4 (observed: a few 1e-6).
TOL32 = 4 * float(np.finfo(np.float32).eps) / C2
TOL64 = 1e-10


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """skimage's full SSIM map, channel by channel, float64: (B, C, H, W)."""
    out = np.empty_like(a, dtype=np.float64)
    for i in range(a.shape[0]):
        for c in range(a.shape[1]):
            _, s = structural_similarity(
                a[i, c],
                b[i, c],
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=2,
                full=True,
            )
            out[i, c] = s
    return out


def _pairs(shape, seed):
    rng = np.random.default_rng(seed)
    B, C, H, W = shape
    rand = rng.uniform(-1, 1, shape)
    noisy = np.clip(rand + 0.3 * rng.standard_normal(shape), -1, 1)
    yy, xx = np.mgrid[0:H, 0:W]
    # structured: smooth gradients and stripes, a blurred/brightened/contrast-reduced copy
    struct = np.empty(shape)
    for i in range(B):
        for c in range(C):
            struct[i, c] = 0.8 * np.sin(xx / (2.0 + i + c)) * np.cos(yy / 3.0) + 0.1 * (c - 1)
    edge = struct.copy()
    edge[..., : H // 2, :] = -0.9
    shifted = np.clip(0.7 * struct + 0.2, -1, 1)
    return [(rand, noisy), (struct, shifted), (edge, np.roll(edge, 1, axis=-1)), (rand, struct)]


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 13, 20), (1, 1, 11, 11)])
def test_matches_skimage_everywhere(shape):
    for k, (a, b) in enumerate(_pairs(shape, seed=sum(shape))):
        ref = _reference(a, b)
        m64 = ssim_map(torch.from_numpy(a), torch.from_numpy(b))
        assert m64.dtype == torch.float64 and m64.shape == shape
        # skimage filters with scipy's mode="reflect" (edge repeated): we pad the same way, so
        # every pixel matches, borders included
        np.testing.assert_allclose(m64.numpy(), ref, rtol=0, atol=TOL64, err_msg=f"pair {k}")
        m32 = ssim_map(torch.from_numpy(a).float(), torch.from_numpy(b).float())
        assert m32.dtype == torch.float32
        np.testing.assert_allclose(m32.numpy(), ref, rtol=0, atol=TOL32, err_msg=f"pair {k}")
        # interior pixels (≥ 5 px from the border), where no padding is involved at all
        inner = (..., slice(5, -5), slice(5, -5))
        if shape[-1] > 10 and shape[-2] > 10:
            np.testing.assert_allclose(m32.numpy()[inner], ref[inner], rtol=0, atol=TOL32)


def test_identity_is_one():
    x = torch.rand(3, 3, 16, 12) * 2 - 1
    s = ssim_map(x, x)
    torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-6)
    c = torch.full((1, 1, 12, 12), 0.3)
    torch.testing.assert_close(ssim_map(c, c), torch.ones_like(c), rtol=0, atol=1e-6)


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(4, 3, 16, 16, generator=g)).clamp(-1, 1)
    full = ssim_map(x, y)
    for i in range(4):
        one = ssim_map(x[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(full[i : i + 1], one, rtol=0, atol=1e-6)
    # channels are never mixed
    torch.testing.assert_close(full[:, 1:2], ssim_map(x[:, 1:2], y[:, 1:2]), rtol=0, atol=1e-6)


def test_constant_shift_is_luminance_term():
    mu, d = 0.2, -0.3
    x = torch.full((1, 1, 12, 12), mu, dtype=torch.float64)
    c1 = (0.01 * 2) ** 2
    expect = (2 * mu * (mu + d) + c1) / (mu**2 + (mu + d) ** 2 + c1)
    s = ssim_map(x, x + d)
    torch.testing.assert_close(s, torch.full_like(s, expect), rtol=0, atol=1e-12)


def test_helpers():
    g = gaussian_window(11, 1.5, dtype=torch.float64)
    assert g.shape == (11,) and abs(float(g.sum()) - 1) < 1e-15 and torch.equal(g, g.flip(0))
    # scipy "reflect": d c b a | a b c d | d c b a, also when the pad exceeds the size
    assert symmetric_pad_index(4, 2).tolist() == [1, 0, 0, 1, 2, 3, 3, 2]
    assert symmetric_pad_index(2, 5).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        gaussian_window(10, 1.5)
    with pytest.raises(ValueError):
        ssim_map(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


def test_small_image_matches_scipy_filter():
    # images smaller than the window: the periodic symmetric extension is scipy's "reflect"
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(3)
    a = rng.uniform(-1, 1, (1, 1, 4, 6))
    b = rng.uniform(-1, 1, (1, 1, 4, 6))

    def f(v):
        return gaussian_filter(v, 1.5, mode="reflect", truncate=3.5)

    x, y = a[0, 0], b[0, 0]
    mx, my = f(x), f(y)
    vx, vy, vxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * 2) ** 2, C2
    ref = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ssim_map(torch.from_numpy(a), torch.from_numpy(b))[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=TOL64)
