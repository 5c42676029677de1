import math

import numpy as np
import pytest

from diffpath.core.schedule import NoiseSchedule, cosine_betas, linear_betas, space_timesteps


def test_linear_betas_match_ddpm_at_1000():
    b = linear_betas(1000)
    assert b.dtype == np.float64
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    # other lengths are rescaled so the total noise stays comparable
    b4 = linear_betas(4000)
    assert b4[0] == pytest.approx(1e-4 / 4) and b4[-1] == pytest.approx(0.02 / 4)


def test_cosine_alpha_bar_follows_closed_form():
    T = 4000
    ab = np.cumprod(1 - cosine_betas(T))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # unclipped steps reproduce ᾱ(t+1)/ᾱ(0) exactly (the product telescopes)
    for t in (0, 10, 1000, 2000, 3000):
        assert ab[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10)
    assert cosine_betas(T).max() <= 0.999


def test_space_timesteps_ddim_rule():
    assert space_timesteps(4000, 10) == list(range(0, 4000, 400))
    assert space_timesteps(1000, 10) == list(range(0, 1000, 100))
    assert space_timesteps(1000, 7) == list(range(0, 1000, 143))
    ts = space_timesteps(10, 6)  # no integer stride gives exactly 6 → evenly spaced sections
    assert len(ts) == 6 and ts[0] == 0 and ts[-1] == 9
    with pytest.raises(ValueError):
        space_timesteps(10, 11)


def test_respace_rederives_betas_from_kept_alpha_bars():
    s = NoiseSchedule.named("linear", 1000)
    kept = s.respaced_timesteps(10)
    r = s.respace(kept)
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule.named("quadratic", 10)
    with pytest.raises(ValueError):
        NoiseSchedule(np.array([0.1, 1.5]))
    with pytest.raises(ValueError):
        NoiseSchedule.named("linear", 10).alpha_bar([10])


def test_q_sample_and_predict_x0_are_inverse_and_round_coefficients_once():
    """q_sample/predict_x0 are the schedule's one noising formula and its inverse: coefficients
    in float64, rounded once to the images' dtype; per-image timesteps broadcast over (C, H, W)."""
    import torch

    s = NoiseSchedule.named("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 2, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, eps)
    ab = s.alphas_cumprod[t.numpy()]
    for i in range(4):
        a = torch.tensor(np.sqrt(ab[i]), dtype=torch.float32)
        b = torch.tensor(np.sqrt(1.0 - ab[i]), dtype=torch.float32)
        assert torch.equal(xt[i], a * x0[i] + b * eps[i])
    # one integer timestep gives the same as a tensor of it
    assert torch.equal(s.q_sample(x0, 500, eps)[2], xt[2])
    # the inverse, in float64 so only the formula is tested: exact up to rounding
    x0d, epsd = x0.double(), eps.double()
    back = s.predict_x0(s.q_sample(x0d, t, epsd), t, epsd)
    assert torch.allclose(back, x0d, rtol=0, atol=1e-12 / np.sqrt(ab.min()))  # float64 rounding × 1/√ᾱ
    assert s.predict_x0(xt, t, eps).dtype == torch.float32
