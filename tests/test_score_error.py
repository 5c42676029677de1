"""DiffPathV2 score errors with analytic ε-models (no network)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import ReconstructingEps
from diffpath.core.schedule import NoiseSchedule
from diffpath.methods.diffpathv2 import (
    MAP_NAMES,
    ScoreErrorConfig,
    diffpathv2_1d,
    diffpathv2_features,
    score_error_path,
)
from diffpath.core.noise import gaussian_noise, image_keys
from diffpath.core.ssim import ssim_map
from diffpath.core.moments import moments

torch.set_num_threads(1)

SCHED = NoiseSchedule.named("linear", 1000)
ABAR = SCHED.alphas_cumprod
TS = SCHED.respaced_timesteps(5)  # [0, 200, 400, 600, 800], the DDIM-5 path's timesteps
SHAPE = (3, 16, 16)
N_PIX = 3 * 16 * 16
EPS32 = float(np.finfo(np.float32).eps)


def _images(b: int = 8, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x = 0.5 * x + 0.4 * torch.sin(xx / 3.0 + yy / 5.0).to(torch.float64)  # some structure
    return x.clamp(-1, 1).to(dtype)


class TrueNoise:
    """Oracle that knows the keys and seed: returns exactly the noise that was added."""

    def __init__(self, keys: torch.Tensor, seed: int = 0, offset_per_step: float = 0.0):
        self.keys, self.seed, self.c = keys, seed, offset_per_step
        self.step = {t: i for i, t in enumerate(TS)}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = int(t[0])
        eps = gaussian_noise(self.keys, tt, tuple(x.shape[1:]), self.seed).to(x.dtype)
        # the linear-error model: ε̂ = ε + c·i (constant per pixel at step i)
        return eps + self.c * self.step[tt]


def smooth_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A per-pixel nonlinear ε-model (each image's output depends on that image only)."""
    s = (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)
    return 0.7 * x + 0.2 * torch.tanh(3 * x) - s * x * x


# --------------------------------------------------------------------------------------------
# oracles


def test_true_noise_oracle_gives_zero_error_and_unit_ssim():
    x0 = _images(4)
    keys = image_keys(x0)
    res = score_error_path(TrueNoise(keys), x0, TS, schedule=SCHED, keep_maps=True)
    for m in (res.err_moments, res.derr_moments, res.werr_moments, res.dwerr_moments):
        assert m.dtype == torch.float64
        assert torch.count_nonzero(m) == 0  # exactly zero: ε̂ is bit-identical to ε
    assert np.all(diffpathv2_features(res.werr_moments, res.dwerr_moments) == 0)
    assert np.all(diffpathv2_features(res.err_moments, res.derr_moments, kind="power") == 0)
    assert np.all(diffpathv2_1d(res.dwerr_moments) == 0)
    # x̂0 equals x0 up to float32 rounding (≤ a few ulps of |x_t| divided by √ᾱ)
    for i, t in enumerate(TS):
        bound = 4 * EPS32 * (1 + 4) / math.sqrt(ABAR[t])
        assert (res.maps["x0_hat"][:, i] - x0).abs().max() <= bound
    # so the SSIM map is 1 (to float32 SSIM precision, see test_ssim) and the weighted error 0
    ones = torch.ones_like(res.maps["ssim"])
    torch.testing.assert_close(res.maps["ssim"], ones, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.ssim_mean, torch.ones_like(res.ssim_mean), rtol=0, atol=1e-4)
    assert torch.count_nonzero(res.maps["werr"]) == 0


def test_true_noise_oracle_float64_has_exact_reconstruction():
    x0 = _images(2, dtype=torch.float64)
    res = score_error_path(TrueNoise(image_keys(x0)), x0, TS, schedule=SCHED, keep_maps=True)
    assert torch.count_nonzero(res.err_moments) == 0
    expect = x0.unsqueeze(1).expand(-1, len(TS), -1, -1, -1)
    torch.testing.assert_close(res.maps["x0_hat"], expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.ssim_mean, torch.ones_like(res.ssim_mean), rtol=0, atol=1e-12)


def test_reconstructing_oracle_error_is_rounding_only():
    x0 = _images(3)
    res = score_error_path(ReconstructingEps(x0, SCHED), x0, TS, schedule=SCHED, keep_maps=True)
    T = len(TS)
    # x_t is rounded to float32 (|x_t| ≲ 5); the oracle divides that rounding by √(1−ᾱ)
    bound = np.array([2 * EPS32 * 5 / math.sqrt(1 - ABAR[t]) for t in TS])
    for i in range(T):
        e = res.maps["err"][:, i]
        assert e.abs().max() <= bound[i], (TS[i], float(e.abs().max()), bound[i])
        assert torch.all(res.err_moments[:, i, 1] <= N_PIX * bound[i])
    # feature bounds from the per-pixel bound (norms of n values each ≤ β; |Δe| ≤ 2·T·max β)
    d = 2 * T * bound.max()
    limit = np.array(
        [
            N_PIX * bound.sum(),
            math.sqrt(N_PIX) * bound.sum(),
            N_PIX ** (1 / 3) * bound.sum(),
            (T - 1) * N_PIX * d,
            (T - 1) * math.sqrt(N_PIX) * d,
            (T - 1) * N_PIX ** (1 / 3) * d,
        ]
    )
    assert np.all(diffpathv2_features(res.err_moments, res.derr_moments) <= limit)
    # |1 − SSIM| ≤ 2, so the weighted error obeys twice the bound
    assert np.all(diffpathv2_features(res.werr_moments, res.dwerr_moments) <= 2 * limit)
    torch.testing.assert_close(res.ssim_mean, torch.ones_like(res.ssim_mean), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# a model whose error grows linearly with the step index


def _expected_linear(c: float, T: int, n: int):
    i = np.arange(T, dtype=np.float64)
    d = c * T  # Δe per pixel at every step
    err = np.stack([c * i * n, c * i * n, (c * i) ** 2 * n, (c * i) ** 3 * n, (c * i) ** 3 * n], 1)
    derr = np.tile([d * n, d * n, d**2 * n, d**3 * n, d**3 * n], (T - 1, 1))
    norm = [
        (c * i).sum() * n,
        (c * i).sum() * math.sqrt(n),
        (c * i).sum() * n ** (1 / 3),
        (T - 1) * d * n,
        (T - 1) * d * math.sqrt(n),
        (T - 1) * d * n ** (1 / 3),
    ]
    power = [
        (c * i).sum() * n,
        ((c * i) ** 2).sum() * n,
        ((c * i) ** 3).sum() * n,
        (T - 1) * d * n,
        (T - 1) * d**2 * n,
        (T - 1) * d**3 * n,
    ]
    return err, derr, np.array(norm), np.array(power)


def test_linear_error_float64_exact():
    c, T = 0.125, len(TS)
    x0 = _images(3, dtype=torch.float64)
    res = score_error_path(TrueNoise(image_keys(x0), offset_per_step=c), x0, TS, schedule=SCHED)
    err, derr, norm, power = _expected_linear(c, T, N_PIX)
    # e_i = c·i and Δe = c·T are dyadic, so float64 represents every sum exactly
    for b in range(3):
        np.testing.assert_allclose(res.err_moments[b].numpy(), err, rtol=1e-13, atol=0)
        np.testing.assert_allclose(res.derr_moments[b].numpy(), derr, rtol=1e-13, atol=0)
    f = diffpathv2_features(res.err_moments, res.derr_moments)
    np.testing.assert_allclose(f, np.tile(norm, (3, 1)), rtol=1e-13)
    f = diffpathv2_features(res.err_moments, res.derr_moments, kind="power")
    np.testing.assert_allclose(f, np.tile(power, (3, 1)), rtol=1e-13)
    f3 = diffpathv2_features(res.err_moments, res.derr_moments, derivative=False)
    np.testing.assert_allclose(f3, np.tile(norm[:3], (3, 1)), rtol=1e-13)
    np.testing.assert_allclose(
        diffpathv2_1d(res.derr_moments),
        np.full(3, math.sqrt((T - 1) * (c * T) ** 2 * N_PIX)),
        rtol=1e-13,
    )


def test_linear_error_float32_to_rounding():
    c, T = 0.125, len(TS)
    x0 = _images(2)
    res = score_error_path(TrueNoise(image_keys(x0), offset_per_step=c), x0, TS, schedule=SCHED)
    err, derr, norm, _ = _expected_linear(c, T, N_PIX)
    # ε̂ = fl(ε + c·i) with |ε + c·i| < 8: each e is c·i within 2^-24·8 ≈ 5e-7 ≈ 4·eps32
    tol = 4 * EPS32
    for b in range(2):
        got = res.err_moments[b, :, :2].numpy()
        np.testing.assert_allclose(got, err[:, :2], rtol=tol, atol=N_PIX * tol)
        np.testing.assert_allclose(res.derr_moments[b].numpy(), derr, rtol=3 * T * tol)
    f = diffpathv2_features(res.err_moments, res.derr_moments)
    np.testing.assert_allclose(f, np.tile(norm, (2, 1)), rtol=1e-5)


def test_linear_error_weighted_by_analytic_ssim():
    """A constant image and a constant error: x̂0_i = μ + δ_i is constant, so the SSIM map is the
    luminance term alone, (2μ(μ+δ)+C1)/(μ²+(μ+δ)²+C1), at every pixel (borders included)."""
    c, T, mu = 0.125, len(TS), 0.3
    x0 = torch.full((2, *SHAPE), mu, dtype=torch.float64)
    x0[1] = -0.4  # second image: another level
    keys = image_keys(x0)
    res = score_error_path(TrueNoise(keys, offset_per_step=c), x0, TS, schedule=SCHED)
    c1 = (0.01 * 2) ** 2
    for b, m in enumerate((mu, -0.4)):
        e = c * np.arange(T)
        delta = -np.sqrt(1 - ABAR[TS]) / np.sqrt(ABAR[TS]) * e
        s = (2 * m * (m + delta) + c1) / (m**2 + (m + delta) ** 2 + c1)
        w = (1 - s) * e
        dw = np.diff(w) * T
        np.testing.assert_allclose(res.ssim_mean[b].numpy(), s, rtol=0, atol=1e-9)
        wm, dwm = res.werr_moments[b].numpy(), res.dwerr_moments[b].numpy()
        np.testing.assert_allclose(wm[:, 0], w * N_PIX, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(wm[:, 2], w**2 * N_PIX, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(dwm[:, 0], dw * N_PIX, rtol=1e-8)
        np.testing.assert_allclose(dwm[:, 4], np.abs(dw) ** 3 * N_PIX, rtol=1e-8)
        curvature = diffpathv2_1d(res.dwerr_moments)[b]
        np.testing.assert_allclose(curvature, math.sqrt((dw**2).sum() * N_PIX), rtol=1e-8)


# --------------------------------------------------------------------------------------------
# deterministic noise


def _features(x0, keys=None, seed=0):
    cfg = ScoreErrorConfig(seed=seed)
    res = score_error_path(smooth_model, x0, TS, schedule=SCHED, keys=keys, config=cfg)
    return np.concatenate(
        [
            diffpathv2_features(res.werr_moments, res.dwerr_moments),
            diffpathv2_features(res.err_moments, res.derr_moments),
        ],
        axis=1,
    )


@pytest.mark.parametrize("noise_key", ["content", "index"])
def test_features_do_not_depend_on_the_batch(noise_key):
    x0 = _images(8, seed=1)
    index = torch.arange(100, 108)  # "global" indices of these images
    ref = _features(x0, index if noise_key == "index" else None)
    perm = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    for order in (torch.arange(8), perm):
        for bs in (1, 3, 8):
            out = np.empty_like(ref)
            for start in range(0, 8, bs):
                sel = order[start : start + bs]
                keys = index[sel] if noise_key == "index" else None
                out[sel.numpy()] = _features(x0[sel], keys)
            np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0, err_msg=f"batch size {bs}")


def test_noise_is_bitwise_batch_independent_and_seeded():
    x0 = _images(8, seed=2)
    keys = image_keys(x0)
    perm = torch.tensor([3, 0, 7, 1])
    assert torch.equal(image_keys(x0[perm]), keys[perm])
    z = gaussian_noise(keys, 200, SHAPE, seed=0)
    assert z.dtype == torch.float32 and z.shape == (8, *SHAPE)
    assert torch.equal(gaussian_noise(keys[perm], 200, SHAPE, seed=0), z[perm])
    assert torch.equal(gaussian_noise(keys[4:5], 200, SHAPE, seed=0), z[4:5])
    assert torch.equal(gaussian_noise(keys, 200, SHAPE, seed=0), z)  # reproducible
    # different seeds, timesteps and keys give different noise, and different features
    assert not torch.allclose(gaussian_noise(keys, 200, SHAPE, seed=1), z)
    assert not torch.allclose(gaussian_noise(keys, 400, SHAPE, seed=0), z)
    assert not torch.allclose(gaussian_noise(keys + 1, 200, SHAPE, seed=0), z)
    f0, f1 = _features(x0[:2], seed=0), _features(x0[:2], seed=1)
    assert np.all(np.abs(f0 - f1) > 1e-6 * np.abs(f0))
    # content keys and index keys give different noise for the same image
    assert not np.allclose(_features(x0[:2]), _features(x0[:2], torch.tensor([0, 1])))
    # seeds are taken modulo 2^64; negative and huge seeds work
    z_neg = gaussian_noise(keys, 0, SHAPE, seed=-1)
    assert torch.equal(z_neg, gaussian_noise(keys, 0, SHAPE, seed=2**64 - 1))


def test_noise_is_standard_normal():
    keys = torch.arange(8)
    z = torch.stack([gaussian_noise(keys, t, (3, 32, 32), seed=7) for t in (0, 500)]).double()
    n = z.numel()  # 49,152 draws; 5σ bounds for a N(0,1) sample of this size
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)  # Var(z⁴) = 105 − 9
    tail = float((z.abs() > 1.959964).double().mean())
    assert abs(tail - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)

    def corr(a, b):
        a, b = a.flatten(), b.flatten()
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(r) < 5 / math.sqrt(a.numel()), r

    corr(z[..., :-1], z[..., 1:])  # horizontal neighbours
    corr(z[..., :-1, :], z[..., 1:, :])  # vertical neighbours
    corr(z[:, :, 0], z[:, :, 1])  # channels
    corr(z[:, :-1], z[:, 1:])  # consecutive keys
    corr(z[0], z[1])  # timesteps
    flat = z.reshape(-1)
    corr(flat[:-1], flat[1:])  # consecutive counters across rows and channels


def test_image_keys():
    x0 = _images(6, seed=3)
    q = torch.round((x0 + 1) * 127.5)
    centred = q / 127.5 - 1  # exactly on quantisation levels
    keys = image_keys(centred)
    assert keys.dtype == torch.int64 and keys.shape == (6,)
    assert torch.all(keys >= 0) and torch.all(keys < 2**62)
    assert len(set(keys.tolist())) == 6
    jitter = (torch.rand(x0.shape, generator=torch.Generator().manual_seed(9)) - 0.5) * 2e-3
    assert torch.equal(image_keys(centred + jitter), keys)  # below half a level: same key
    bumped = centred.clone()
    bumped[2, 1, 7, 7] += 1 / 127.5  # one pixel, one level
    assert image_keys(bumped)[2] != keys[2]
    assert torch.equal(image_keys(bumped)[[0, 1, 3, 4, 5]], keys[[0, 1, 3, 4, 5]])
    swapped = centred.clone()
    swapped[0, 0, 0, 0], swapped[0, 0, 0, 1] = centred[0, 0, 0, 1], centred[0, 0, 0, 0]
    assert centred[0, 0, 0, 0] != centred[0, 0, 0, 1]  # (so the swap below changes the image)
    assert image_keys(swapped)[0] != keys[0]  # positions matter, not just the histogram


# --------------------------------------------------------------------------------------------
# outputs, options, errors


def test_result_shapes_maps_and_callback():
    x0 = _images(3)
    T = len(TS)
    seen = []
    res = score_error_path(smooth_model, x0, TS, schedule=SCHED, callback=seen.append)
    assert res.maps is None
    for name, shape in [
        ("err_moments", (3, T, 5)),
        ("derr_moments", (3, T - 1, 5)),
        ("werr_moments", (3, T, 5)),
        ("dwerr_moments", (3, T - 1, 5)),
        ("ssim_mean", (3, T)),
    ]:
        v = getattr(res, name)
        assert v.shape == shape and v.dtype == torch.float64, name
    assert [s["i"] for s in seen] == list(range(T)) and [s["t"] for s in seen] == TS
    assert set(seen[0]) == {"i", "t", "x_t", "eps_true", "eps_hat", "err", "x0_hat", "ssim", "werr"}

    kept = score_error_path(smooth_model, x0, TS, schedule=SCHED, keep_maps=True)
    assert set(kept.maps) == set(MAP_NAMES)
    for name in MAP_NAMES:
        assert kept.maps[name].shape == (3, T, *SHAPE) and kept.maps[name].device.type == "cpu"
    m = kept.maps
    torch.testing.assert_close(m["werr"], (1 - m["ssim"]) * m["err"])
    torch.testing.assert_close(kept.werr_moments, res.werr_moments)
    for i in range(T):
        torch.testing.assert_close(kept.err_moments[:, i], moments(m["err"][:, i]))
        torch.testing.assert_close(m["ssim"][:, i], ssim_map(x0, m["x0_hat"][:, i]))
        torch.testing.assert_close(m["err"][:, i], m["eps_hat"][:, i] - seen[i]["eps_true"])
        assert torch.equal(m["xt"][:, i], seen[i]["x_t"]) and torch.equal(m["x0_hat"][:, i], seen[i]["x0_hat"])
    for i in range(T - 1):
        dw = (m["werr"][:, i + 1] - m["werr"][:, i]) * T
        torch.testing.assert_close(kept.dwerr_moments[:, i], moments(dw))


def test_clipping_option():
    x0 = _images(2)
    keys = image_keys(x0)
    model = TrueNoise(keys, offset_per_step=0.5)  # large errors push x̂0 out of [-1, 1]
    raw = score_error_path(model, x0, TS, schedule=SCHED, keep_maps=True)
    cfg = ScoreErrorConfig(clip_x0_hat=True)
    clipped = score_error_path(model, x0, TS, schedule=SCHED, keep_maps=True, config=cfg)
    assert raw.maps["x0_hat"].abs().max() > 1
    assert clipped.maps["x0_hat"].abs().max() <= 1
    torch.testing.assert_close(clipped.err_moments, raw.err_moments)  # e does not depend on x̂0
    assert not torch.allclose(clipped.werr_moments, raw.werr_moments)


def test_single_step_and_errors():
    x0 = _images(2)
    res = score_error_path(smooth_model, x0, [300], schedule=SCHED)
    assert res.derr_moments.shape == (2, 0, 5)
    f = diffpathv2_features(res.werr_moments, res.derr_moments)
    assert f.shape == (2, 6) and np.all(f[:, 3:] == 0)
    with pytest.raises(ValueError, match="index"):
        score_error_path(smooth_model, x0, TS, schedule=SCHED, config=ScoreErrorConfig(noise_key="index"))
    with pytest.raises(ValueError):
        ScoreErrorConfig(noise_key="position")
    with pytest.raises(ValueError, match="increasing"):
        score_error_path(smooth_model, x0, [200, 100], schedule=SCHED)
    with pytest.raises(ValueError):
        score_error_path(smooth_model, x0, [0, 1000], schedule=SCHED)
    with pytest.raises(ValueError):
        score_error_path(smooth_model, x0, TS, schedule=SCHED, keys=torch.arange(3))


def test_result_knows_its_cache_keys():
    """``as_cache`` gives the error cache's arrays under the cache's (on-disk) names, maps only when
    kept; the registry's methods read the same names."""
    from diffpath.methods.registry import method_features

    x0 = _images(2)
    res = score_error_path(smooth_model, x0, TS, schedule=SCHED)
    cache = res.as_cache()
    assert set(cache) == {"v2_err", "v2_derr", "v2_werr", "v2_dwerr", "v2_ssim"}
    assert cache["v2_werr"] is res.werr_moments and cache["v2_ssim"] is res.ssim_mean
    kept = score_error_path(smooth_model, x0, TS, schedule=SCHED, keep_maps=True).as_cache()
    assert set(kept) - set(cache) == {f"maps_v2_{n}" for n in ("xt", "eps_hat", "err", "x0_hat", "ssim", "werr")}
    arrays = {k: v.numpy() for k, v in cache.items()}
    np.testing.assert_array_equal(method_features("diffpathv2", arrays),
                                  diffpathv2_features(res.werr_moments, res.dwerr_moments))
    np.testing.assert_array_equal(method_features("score_error", arrays),
                                  diffpathv2_features(res.err_moments, res.derr_moments))
