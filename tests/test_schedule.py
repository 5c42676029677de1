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


def test_predict_eps_inverts_predict_x0_and_coefficients_are_rounded_once():
    """predict_eps is the inverse of predict_x0 (improved-diffusion's pair); every coefficient is
    the float64 value rounded once to the images' dtype, whether t is an int or a tensor, on
    every call (the device table is built once)."""
    import torch

    from diffpath.core.schedule import _COEFFICIENTS

    s = NoiseSchedule.named("cosine", 400)
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 123, 399])
    x0 = s.predict_x0(xt, t, eps)
    back = s.predict_eps(xt, t, x0)
    assert torch.allclose(back, eps, rtol=0, atol=1e-9)
    like = torch.zeros(3, 1, 4, 4)
    for name, f in _COEFFICIENTS.items():
        want = torch.from_numpy(np.asarray(f(s.alphas_cumprod), dtype=np.float64)).float()
        (per_image,) = s.coefficients((name,), t, like)
        assert per_image.shape == (3, 1, 1, 1) and per_image.dtype == torch.float32
        assert torch.equal(per_image.flatten(), want[t])
        (one,) = s.coefficients((name,), 123, like)
        assert one.shape == () and torch.equal(one, want[123])
    # one table per (device, dtype), reused by every call above
    assert set(s._tables) == {("cpu", torch.float64), ("cpu", torch.float32)}
    with pytest.raises(ValueError):
        s.coefficients(("sqrt_ab",), 400, like)
    with pytest.raises(ValueError):
        s.coefficients(("sqrt_ab",), torch.tensor([0, 400]), like)


def test_schedule_of_takes_the_given_schedule_or_the_models():
    from diffpath.core.schedule import schedule_of

    a, b = NoiseSchedule.named("linear", 100), NoiseSchedule.named("cosine", 100)

    class WithSchedule:
        schedule = a

    assert schedule_of(WithSchedule()) is a and schedule_of(WithSchedule(), b) is b
    assert schedule_of(lambda x, t: x, b) is b
    with pytest.raises(ValueError, match="schedule"):
        schedule_of(lambda x, t: x)


def test_core_imports_nothing_else_of_diffpath():
    """Layers point down: diffpath.core (the maths) imports only numpy, torch and itself."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "diffpath" / "core"
    for f in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert not name.startswith("diffpath") or name.startswith("diffpath.core"), (f.name, name)
    from diffpath.core.protocols import EpsFn
    from diffpath.models import EpsFn as Reexported

    assert Reexported is EpsFn
