"""Invariants of the DDIM path that hold for any ε-model, checked with analytic models."""

import numpy as np
import pytest
import torch

from diffpath.core.moments import MOMENTS, moments, order_norm_sums
from diffpath.methods.diffpath import diffpath_path, diffpath_statistics
from conftest import ReconstructingEps
from diffpath.core.schedule import NoiseSchedule
from diffpath.core.sampling import ddim_coefficients, ddim_denoise, ddim_invert


def zero_model(x, t):
    return torch.zeros_like(x)


@pytest.fixture
def coeffs():
    s = NoiseSchedule.named("linear", 1000)
    return ddim_coefficients(s.alphas_cumprod, s.respaced_timesteps(10))


def test_zero_model_scales_x0_by_known_factor(coeffs):
    """With ε_θ ≡ 0 (no clipping): x̂0 = x/√ᾱ_i, ε = 0, so x_{i+1} = √(ᾱ_next/ᾱ_i)·x_i and the
    product telescopes: x after step i is √(ᾱ_next,i/ᾱ_0)·x0."""
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    seen = []
    ddim_invert(zero_model, x0, coeffs, clip_denoised=False, callback=lambda s: seen.append(s["x_next"]))
    for i, x in enumerate(seen[:-1]):
        factor = np.sqrt(coeffs.alpha_bar_next[i] / coeffs.alpha_bar[0])
        torch.testing.assert_close(x, x0 * float(factor), rtol=1e-5, atol=1e-6)
    assert torch.all(seen[-1] == 0)  # ᾱ = 0 after the last step


def test_zero_model_gives_zero_eps_statistics(coeffs):
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    r = diffpath_path(zero_model, x0, coeffs, clip_denoised=False)
    stats = diffpath_statistics(r.eps_moments, r.deps_moments)
    assert all(np.all(v == 0) for v in stats.values())


def test_constant_eps_model_known_statistics(coeffs):
    """ε_θ ≡ c with x kept in range (no clipping active): ε = c at every step, so Σε = T·c·P and
    Δε = 0."""
    c = 0.3
    x0 = torch.zeros(2, 1, 4, 4)
    r = diffpath_path(lambda x, t: torch.full_like(x, c), x0, coeffs, clip_denoised=False)
    stats = diffpath_statistics(r.eps_moments, r.deps_moments)
    T, P = 10, 16
    np.testing.assert_allclose(stats["eps_sum"], T * c * P, rtol=1e-5)
    np.testing.assert_allclose(stats["eps_sum_cb"], T * c**3 * P, rtol=1e-5)
    np.testing.assert_allclose(stats["deps_dt_sq"], 0.0, atol=1e-8)


def test_inversion_then_denoise_is_identity_for_exact_model():
    """A model that predicts the exact noise of a fixed x0 makes inversion and denoising exact."""
    s = NoiseSchedule.named("cosine", 1000)
    ts = s.respaced_timesteps(5)
    coeffs = ddim_coefficients(s.alphas_cumprod, ts)
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    noise = torch.randn_like(x0)
    # forward-noise to the last kept timestep, then denoise back
    a_last = float(s.alphas_cumprod[ts[-1]])
    x_t = np.sqrt(a_last) * x0 + np.sqrt(1 - a_last) * noise
    rec = ddim_denoise(ReconstructingEps(x0, s), x_t.float(), coeffs, clip_denoised=True)
    # the oracle predicts x0 at every step, so only the last step's float32 rounding remains:
    # x̂0 = c1·x − c2·ε with |c1·x| ≲ 1 and ε cast from float64, four roundings of ≤ 2^-24 each
    torch.testing.assert_close(rec, x0, rtol=0, atol=4 * 2.0**-24)


def test_moments_match_numpy():
    q = torch.randn(3, 2, 5, 5)
    m = moments(q).numpy()
    x = q.double().numpy().reshape(3, -1)
    ref = np.stack([x.sum(1), np.abs(x).sum(1), (x**2).sum(1), (x**3).sum(1), (np.abs(x) ** 3).sum(1)], 1)
    np.testing.assert_allclose(m, ref, rtol=1e-12)
    assert len(MOMENTS) == m.shape[1]


def test_order_norm_sums():
    q = torch.randn(2, 3, 1, 4, 4)  # (B, T, C, H, W)
    m = torch.stack([moments(q[:, i]) for i in range(3)], 1)
    x = q.double().numpy().reshape(2, 3, -1)
    norms = order_norm_sums(m, "norm")
    np.testing.assert_allclose(norms[:, 0], np.abs(x).sum(-1).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(norms[:, 1], np.sqrt((x**2).sum(-1)).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(norms[:, 2], np.cbrt((np.abs(x) ** 3).sum(-1)).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(order_norm_sums(m, "power")[:, 2], (np.abs(x) ** 3).sum(-1).sum(-1), rtol=1e-12)


def test_timesteps_must_increase():
    s = NoiseSchedule.named("linear", 100)
    with pytest.raises(ValueError):
        ddim_coefficients(s.alphas_cumprod, [10, 5])
