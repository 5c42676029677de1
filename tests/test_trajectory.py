"""Invariants of the DDIM path that hold for any ε-model, checked with analytic models."""

import numpy as np
import pytest
import torch

from diffpath.core.moments import MOMENTS, moments, order_norm_sums
from diffpath.methods.diffpath import diffpath_path, diffpath_statistics
from conftest import ReconstructingEps
from diffpath.core.schedule import NoiseSchedule
from diffpath.core.sampling import CLEAN, ddim_denoise, ddim_invert, ddim_walk, denoising_steps, inversion_steps

SCHED = NoiseSchedule.named("linear", 1000)
TS = SCHED.respaced_timesteps(10)


def zero_model(x, t):
    return torch.zeros_like(x)


def test_zero_model_scales_x0_by_known_factor():
    """With ε_θ ≡ 0 (no clipping): x̂0 = x/√ᾱ_i, ε = 0, so x_{i+1} = √(ᾱ_next/ᾱ_i)·x_i and the
    product telescopes: x after step i is √(ᾱ_next,i/ᾱ_0)·x0."""
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    seen = []
    ddim_invert(zero_model, x0, TS, schedule=SCHED, clip_denoised=False, callback=lambda s: seen.append(s["x_next"]))
    ab = SCHED.alphas_cumprod
    for i, x in enumerate(seen[:-1]):
        factor = np.sqrt(ab[TS[i + 1]] / ab[TS[0]])
        torch.testing.assert_close(x, x0 * float(factor), rtol=1e-5, atol=1e-6)
    assert torch.all(seen[-1] == 0)  # ᾱ = 0 after the last step


def test_walk_steps_and_the_step_dict():
    assert inversion_steps([0, 5, 9], to=20) == [(0, 5), (5, 9), (9, 20)]
    assert denoising_steps([0, 5, 9]) == [(9, 5), (5, 0), (0, CLEAN)]
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    seen = []
    out = ddim_walk(lambda x, t: torch.full_like(x, 0.1), x, [(300, 100), (100, CLEAN)], schedule=SCHED,
                    callback=seen.append)
    assert [set(s) for s in seen] == [{"i", "t", "x_t", "eps_hat", "x0_hat", "eps", "x_next"}] * 2
    assert [s["t"] for s in seen] == [300, 100] and seen[0]["x_t"] is x and seen[1]["x_t"] is seen[0]["x_next"]
    # x̂0 and ε are the schedule's formulas; the step to CLEAN returns x̂0 itself
    torch.testing.assert_close(seen[0]["x0_hat"], SCHED.predict_x0(x, 300, seen[0]["eps_hat"]).clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(seen[0]["eps"], SCHED.predict_eps(x, 300, seen[0]["x0_hat"]), rtol=0, atol=0)
    assert torch.equal(out, seen[1]["x0_hat"])
    with pytest.raises(ValueError, match="schedule"):
        ddim_walk(zero_model, x, [(300, CLEAN)])  # a bare function carries no schedule


def test_zero_model_gives_zero_eps_statistics():
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    r = diffpath_path(zero_model, x0, TS, schedule=SCHED, clip_denoised=False)
    stats = diffpath_statistics(r.eps_moments, r.deps_moments)
    assert all(np.all(v == 0) for v in stats.values())


def test_constant_eps_model_known_statistics():
    """ε_θ ≡ c with x kept in range (no clipping active): ε = c at every step, so Σε = K·c·P and
    Δε = 0."""
    c = 0.3
    x0 = torch.zeros(2, 1, 4, 4)
    r = diffpath_path(lambda x, t: torch.full_like(x, c), x0, TS, schedule=SCHED, clip_denoised=False)
    stats = diffpath_statistics(r.eps_moments, r.deps_moments)
    K, P = 10, 16
    np.testing.assert_allclose(stats["eps_sum"], K * c * P, rtol=1e-5)
    np.testing.assert_allclose(stats["eps_sum_cb"], K * c**3 * P, rtol=1e-5)
    np.testing.assert_allclose(stats["deps_dt_sq"], 0.0, atol=1e-8)


def test_inversion_then_denoise_is_identity_for_exact_model():
    """A model that predicts the exact noise of a fixed x0 makes inversion and denoising exact."""
    s = NoiseSchedule.named("cosine", 1000)
    ts = s.respaced_timesteps(5)
    x0 = torch.rand(2, 1, 4, 4) * 1.6 - 0.8
    noise = torch.randn_like(x0)
    # forward-noise to the last kept timestep, then denoise back
    x_t = s.q_sample(x0, ts[-1], noise)
    rec = ddim_denoise(ReconstructingEps(x0, s), x_t, ts, clip_denoised=True)
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
    with pytest.raises(ValueError):
        inversion_steps([10, 5], to=100)
    with pytest.raises(ValueError):
        denoising_steps([])


def test_result_knows_its_cache_keys():
    """``as_cache`` gives the error cache's arrays under the cache's (on-disk) names, maps only when
    kept; the registry reads the same names."""
    from diffpath.methods.diffpath import diffpath_6d
    from diffpath.methods.registry import method_features

    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    r = diffpath_path(lambda x, t: 0.3 * x, x0, TS, schedule=SCHED)
    cache = r.as_cache()
    assert set(cache) == {"dp_eps", "dp_deps"}
    assert cache["dp_eps"] is r.eps_moments and cache["dp_deps"] is r.deps_moments
    kept = diffpath_path(lambda x, t: 0.3 * x, x0, TS, schedule=SCHED, keep_maps=True).as_cache()
    assert set(kept) == {"dp_eps", "dp_deps", "maps_dp_eps", "maps_dp_xt"}
    assert kept["maps_dp_eps"].shape == kept["maps_dp_xt"].shape == (2, len(TS), 1, 8, 8)
    f = method_features("diffpath", {k: v.numpy() for k, v in cache.items()})
    np.testing.assert_array_equal(f, diffpath_6d(diffpath_statistics(r.eps_moments, r.deps_moments)))
