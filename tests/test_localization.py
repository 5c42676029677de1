"""DIVAD-style localisation: partial DDIM reconstruction, anomaly maps, pixel metrics (PRO)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffpath.data.anomalies import synthetic_anomalies
from diffpath.data import to_model_input
from diffpath.methods.localization import (
    CountingModel,
    anomaly_maps,
    combine_maps,
    feature_distance_map,
    gaussian_smooth,
    image_scores,
    localize,
    map_scales,
    pixel_distance_map,
    reconstruct,
    ssim_distance_map,
    to_image_grid,
)
from diffpath.core.sampling import CLEAN, partial_timesteps, round_trip_steps
from diffpath.models.hooks import UNetFeatures
from diffpath.scoring.metrics import (
    image_auroc,
    localization_metrics,
    pixel_auroc,
    pro_curve,
    pro_score,
)
from diffpath.models import EpsModel
from diffpath.core.schedule import NoiseSchedule
from conftest import ReconstructingEps
from diffpath.methods.localization import MapSpec, stochastic_reconstruct, timestep_of
from diffpath.methods.maps import gradient_magnitude_map, median_residual_map, model_free_map

torch.set_num_threads(1)

SCHED = NoiseSchedule.named("linear", 1000)
AC = SCHED.alphas_cumprod


class ZeroEps:
    schedule = SCHED

    def __call__(self, x, t):
        return torch.zeros_like(x)


def _images(b=3, c=1, s=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, s, s, generator=g) * 1.6 - 0.8  # inside [-0.8, 0.8]: no clipping


# --------------------------------------------------------------------------------------------
# reconstruction schedule


def test_partial_timesteps_and_round_trip_steps():
    assert partial_timesteps(400, 10) == list(range(0, 400, 40))
    assert partial_timesteps(250, 4) == [0, 62, 125, 188]  # round(j·62.5), numpy rounding (half-even)
    inv, den = round_trip_steps(400, 10)
    # the inversion visits the grid and ends exactly on t0; the denoising walks it back to clean
    assert inv == list(zip(range(0, 400, 40), range(40, 401, 40)))
    assert den == [(t, t - 40) for t in range(400, 40, -40)] + [(40, CLEAN)]
    with pytest.raises(ValueError):
        partial_timesteps(5, 10)
    with pytest.raises(ValueError, match="t0"):
        reconstruct(ZeroEps(), _images(), 1000, 10)


@pytest.mark.parametrize("t0,steps", [(400, 10), (999, 7), (50, 50), (1, 1)])
def test_oracle_model_reconstructs_exactly(t0, steps):
    x0 = _images()
    model = CountingModel(ReconstructingEps(x0, SCHED))
    rec = reconstruct(model, x0, t0, steps)
    torch.testing.assert_close(rec.x_hat, x0, atol=2e-5, rtol=0)
    # the constant ε of the oracle path is the one it returns for the clean image at t = 0
    eps0 = (x0.double() * (1 - np.sqrt(AC[0])) / np.sqrt(1 - AC[0]))
    expect = np.sqrt(AC[t0]) * x0.double() + np.sqrt(1 - AC[t0]) * eps0
    torch.testing.assert_close(rec.x_t0.double(), expect, atol=2e-5, rtol=0)
    assert rec.nfe == 2 * steps
    assert model.images == 2 * steps * x0.shape[0] and model.calls == 2 * steps


def test_zero_model_gives_the_known_scaling():
    # ε ≡ 0: every step rescales by √(ᾱ_next/ᾱ); the round trip ends at x0/√ᾱ_0 (x0 is taken as the
    # state at t = 0, the denoising ends at ᾱ = 1).
    x0 = _images()
    rec = reconstruct(ZeroEps(), x0, 300, 6, clip_denoised=False)
    torch.testing.assert_close(rec.x_t0, x0 * float(np.sqrt(AC[300] / AC[0])), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec.x_hat, x0 / float(np.sqrt(AC[0])), atol=1e-6, rtol=1e-5)


def test_callback_sees_both_phases_with_matching_timesteps():
    x0 = _images(b=1)
    seen = []
    reconstruct(ReconstructingEps(x0, SCHED), x0, 200, 4, callback=lambda s: seen.append((s["phase"], s["t"])))
    inv = [t for p, t in seen if p == "invert"]
    den = [t for p, t in seen if p == "denoise"]
    assert inv == [0, 50, 100, 150] and den == [200, 150, 100, 50]


# --------------------------------------------------------------------------------------------
# maps


def _tiny_diffusers_model(seed: int = 0) -> EpsModel:
    from diffusers import UNet2DModel

    from diffpath.models import _DiffusersAdapter

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, add_attention=False,
        block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3, norm_num_groups=4,
    )
    return EpsModel(net=_DiffusersAdapter(unet).eval(), schedule=SCHED, image_size=16, channels=1, kind="diffusers")


@pytest.fixture(scope="module")
def tiny_model() -> EpsModel:
    return _tiny_diffusers_model()


def test_map_shapes_ranges_and_identity(tiny_model):
    x = _images(b=2, s=16)
    y = _images(b=2, s=16, seed=1)
    for fn in (pixel_distance_map, ssim_distance_map):
        m = fn(x, y)
        assert m.shape == (2, 1, 16, 16)
        assert float(m.min()) >= 0.0 and float(m.max()) <= 2.0
        assert float(fn(x, x).abs().max()) < 1e-5
    assert torch.allclose(pixel_distance_map(x, y, power=2), ((x - y) ** 2).mean(1, keepdim=True))
    feats = UNetFeatures(tiny_model)
    # 3-level 16 px UNet: decoder outputs at 8, 16, 16 → the 8 px block and the first 16 px block
    assert feats.layers == ["up_blocks.0", "up_blocks.1"]
    f = feature_distance_map(feats, x, y, t=50)
    assert f.shape == (2, 1, 16, 16)
    assert float(f.min()) >= -1e-6 and float(f.max()) <= 2.0 + 1e-6
    assert float(feature_distance_map(feats, x, x).abs().max()) < 1e-5
    maps = anomaly_maps(x, y, ("pixel", "ssim", "feature", "combined"), model=tiny_model, smooth_sigma=1.0)
    assert set(maps) == {"pixel", "ssim", "feature"}
    assert all(v.shape == (2, 1, 16, 16) for v in maps.values())
    with pytest.raises(ValueError):
        UNetFeatures(tiny_model, ["nope.0"])


def test_improved_diffusion_features():
    from diffpath.models.improved_unet import build_from_settings

    torch.manual_seed(0)
    net = build_from_settings({
        "image_size": 16, "channel_mult": [1, 2], "num_channels": 32, "num_res_blocks": 1,
        "num_heads": 2, "attention_resolutions": "8", "learn_sigma": True,
    }).eval()
    model = EpsModel(net=net, schedule=SCHED, image_size=16, channels=3, kind="improved-diffusion")
    feats = UNetFeatures(model)
    assert all(n.startswith("output_blocks.") for n in feats.layers) and len(feats.layers) == 2
    out = feats(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    assert sorted(v.shape[-1] for v in out.values()) == [8, 16]


def test_smoothing_scores_grid_and_combination():
    m = torch.zeros(1, 1, 9, 9)
    m[0, 0, 4, 4] = 1.0
    s = gaussian_smooth(m, 1.0)
    assert s.shape == m.shape and abs(float(s.sum()) - 1.0) < 1e-5 and float(s.max()) < 1.0
    assert int(s.flatten().argmax()) == 40
    assert torch.equal(gaussian_smooth(m, 0.0), m)
    torch.testing.assert_close(gaussian_smooth(torch.full((1, 1, 5, 5), 3.0), 2.0), torch.full((1, 1, 5, 5), 3.0))
    # image score: max of the 2×2 average
    a = np.zeros((1, 4, 4))
    a[0, 0, 0], a[0, 0, 1] = 4.0, 2.0
    assert image_scores(a, k=2)[0] == pytest.approx(1.5)
    assert image_scores(a, k=1)[0] == pytest.approx(4.0)
    # maps at 32 of 28-px images that were zero-padded are cropped back; others resized
    big = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    np.testing.assert_array_equal(to_image_grid(big, (28, 28))[0], big[0, 0, 2:30, 2:30].numpy())
    assert to_image_grid(big, (20, 20)).shape == (1, 20, 20)
    # combination: divide each map by its set-level mean, weighted sum
    maps = {"pixel": torch.full((2, 1, 3, 3), 2.0), "ssim": torch.full((2, 1, 3, 3), 0.5)}
    assert map_scales(maps) == {"pixel": 2.0, "ssim": 0.5}
    torch.testing.assert_close(combine_maps(maps), torch.full((2, 1, 3, 3), 2.0))
    torch.testing.assert_close(combine_maps(maps, {"pixel": 1.0}), torch.full((2, 1, 3, 3), 1.0))


def test_oracle_reconstruction_localizes_the_pasted_patches():
    bench = synthetic_anomalies("fashion_mnist", n_per_class=2)
    x = torch.from_numpy(to_model_input(bench.images, 28, 1))
    x_hat = torch.from_numpy(to_model_input(bench.originals, 28, 1))  # the perfect "normal" reconstruction
    maps = anomaly_maps(x, x_hat, ("pixel", "ssim"))
    pix = maps["pixel"][:, 0].numpy()
    assert pixel_auroc(pix, bench.masks) > 0.9
    assert image_auroc(image_scores(pix), bench.labels) == 1.0
    assert pro_score(pix, bench.masks) > 0.5
    assert pixel_auroc(maps["ssim"][:, 0].numpy(), bench.masks) > 0.8


def test_localize_end_to_end_counts_unet_evaluations(tiny_model):
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 12, 12), dtype=np.uint8)
    x = to_model_input(imgs, 16, 1, resize="pad", pad_value=0)
    T = tiny_model.num_timesteps
    spec = MapSpec("deterministic", t0=(100 / T,), steps=3, maps=("pixel", "ssim", "feature", "combined"))
    r = localize(tiny_model, x, spec, batch_size=2, out_size=(12, 12))
    assert r.nfe == 2 * 3 + 2 == spec.nfe()
    assert set(r.maps) == {"pixel", "ssim", "feature", "combined"}
    assert all(v.shape == (5, 12, 12) and v.dtype == np.float32 for v in r.maps.values())
    assert all(v.shape == (5,) for v in r.scores.values())
    assert r.x_hat.shape == (5, 1, 16, 16)
    assert set(r.scales) == {"pixel", "ssim", "feature"}
    assert r.settings["t0_timesteps"] == [100]
    r2 = localize(tiny_model, x, MapSpec("deterministic", t0=(100 / T,), steps=3), batch_size=5)
    assert r2.nfe == 6 and set(r2.maps) == {"pixel"} and r2.maps["pixel"].shape == (5, 16, 16)
    np.testing.assert_allclose(r2.maps["pixel"][:, 2:14, 2:14], r.maps["pixel"], atol=1e-5)


def test_t0_is_a_fraction_of_T():
    assert timestep_of(0.2, 1000) == 200 and timestep_of(0.2, 4000) == 800
    assert timestep_of(0.001, 1000, steps=5) == 5 and timestep_of(0.9999, 1000) == 999
    for bad in (0.0, 1.0, 400):
        with pytest.raises(ValueError, match="fraction"):
            timestep_of(bad, 1000)
    with pytest.raises(ValueError, match="fraction"):
        MapSpec("deterministic", t0=(400,))
    with pytest.raises(ValueError, match="maps"):
        MapSpec("model_free", maps=("pixel",))


def test_stochastic_round_trip_goes_through_the_seeded_walk(tiny_model):
    x = torch.from_numpy(to_model_input(np.full((3, 16, 16), 90, np.uint8), 16, 1))
    t0 = timestep_of(0.3, tiny_model.num_timesteps)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = stochastic_reconstruct(tiny_model, x, t0, 2, draws=3, generator=g(0))
    b = stochastic_reconstruct(tiny_model, x, t0, 2, draws=3, generator=g(0))
    c = stochastic_reconstruct(tiny_model, x, t0, 2, draws=3, generator=g(1))
    assert a.shape == (3, 3, 1, 16, 16)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a[0], a[1])  # draws differ
    # inversion start with η = 0: every draw is the deterministic round trip
    inv = stochastic_reconstruct(tiny_model, x, t0, 2, draws=2, eta=0.0, start="invert", generator=g(0))
    det = reconstruct(tiny_model, x, t0, 2).x_hat
    torch.testing.assert_close(inv[0], det)
    torch.testing.assert_close(inv[1], det)


def test_stochastic_oracle_repairs_and_costs_are_counted():
    """With the oracle ε-model of the *originals*, every stochastic draw returns the originals, so
    the map is exactly |image − original|, whatever the noise."""
    bench = synthetic_anomalies("fashion_mnist", n_per_class=2)
    x = torch.from_numpy(to_model_input(bench.images, 28, 1))
    clean = torch.from_numpy(to_model_input(bench.originals, 28, 1)).double()
    oracle = ReconstructingEps(clean, SCHED)
    spec = MapSpec("stochastic", t0=(0.2, 0.3), steps=4, draws=2)
    r = localize(oracle, x.numpy(), spec, seed=0, batch_size=len(x), smooth_sigma=0)
    assert r.nfe == spec.nfe() == 2 * 2 * 4
    want = (x - clean.float()).abs()[:, 0].numpy()
    np.testing.assert_allclose(r.maps["pixel"], want, atol=2e-4)
    inv = MapSpec("stochastic", t0=(0.2,), steps=4, draws=3, start="invert", reduce="reconstruction")
    assert localize(oracle, x.numpy(), inv, batch_size=len(x), smooth_sigma=0).nfe == inv.nfe() == 4 + 3 * 4


def test_model_free_maps():
    flat = torch.zeros(2, 1, 16, 16)
    assert float(model_free_map(flat, "gradient").abs().max()) == 0.0
    assert float(model_free_map(flat, "median").abs().max()) == 0.0
    x = flat.clone()
    x[:, :, 6:9, 6:9] = 1.0  # a small bright square
    g = gradient_magnitude_map(x)[0, 0]
    assert g[7, 7] == 0 and g[6, 5] > 0  # flat inside, high at its edges
    med = median_residual_map(x)[0, 0]  # the 3×3 square is below half of a 5×5 window: removed
    assert med[7, 7] == pytest.approx(1.0) and med[0, 0] == 0
    r = localize(None, x.numpy(), MapSpec("model_free", maps=("gradient", "median")))
    assert r.nfe == 0 and r.x_hat is None and set(r.maps) == {"gradient", "median"}


# --------------------------------------------------------------------------------------------
# metrics


def _two_region_case():
    """Two images: image 0 with region A (2×2), image 1 with region B (1×3); one normal image."""
    masks = np.zeros((3, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 4, 2:5] = True
    return masks


def test_pro_perfect_constant_and_half():
    masks = _two_region_case()
    perfect = masks.astype(float) + np.random.default_rng(0).uniform(0, 0.5, masks.shape)
    assert pro_score(perfect, masks) == pytest.approx(1.0)
    assert pro_score(perfect, masks, num_thresholds=200) == pytest.approx(1.0)
    # a constant map: one threshold, the curve is the diagonal PRO = FPR → area 0.3²/2 / 0.3
    const = np.full(masks.shape, 0.7)
    assert pro_score(const, masks) == pytest.approx(0.15)
    assert pro_score(const, masks, num_thresholds=200) == pytest.approx(0.15)
    assert pro_score(const, masks, fpr_limit=1.0) == pytest.approx(0.5)
    # region A ranked above everything, region B below everything: PRO jumps to 1/2 at FPR 0 and
    # stays there until every normal pixel is in → normalised area 0.5
    half = np.random.default_rng(1).uniform(0.3, 0.6, masks.shape)
    half[0, 1:3, 1:3] = 1.0
    half[1, 4, 2:5] = 0.0
    assert pro_score(half, masks) == pytest.approx(0.5)
    assert pro_score(half, masks, num_thresholds=200) == pytest.approx(0.5)
    # regions are averaged with equal weight whatever their size: B perfect, A missed → also 0.5
    swap = half.copy()
    swap[0, 1:3, 1:3], swap[1, 4, 2:5] = 0.0, 1.0
    assert pro_score(swap, masks) == pytest.approx(0.5)
    # an inverted perfect map never overlaps before FPR 1
    assert pro_score(-perfect, masks) == pytest.approx(0.0)


def test_pro_partial_overlap_and_interpolation():
    # one image, one 4-pixel region of which the 2 top pixels are the highest values; 12 normals
    # with distinct values below. Curve: (0,0) → (0, 0.5) → then region pixels 3, 4 come last.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 0, :] = [10.0, 9.0, -1.0, -2.0]
    maps[0, 1:, :] = np.arange(12).reshape(3, 4) / 100.0
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0.0 and pro[0] == 0.0 and fpr[-1] == 1.0 and pro[-1] == 1.0
    assert pro_score(maps, masks) == pytest.approx(0.5)
    # at fpr_limit 1: 0.5 over [0, 1), then the last two region pixels add nothing to the area
    assert pro_score(maps, masks, fpr_limit=1.0) == pytest.approx(0.5)
    # a limit between two curve points is interpolated, not snapped: the constant map at 0.25
    const = np.zeros((1, 4, 4))
    assert pro_score(const, masks, fpr_limit=0.25) == pytest.approx(0.125)


def test_pro_connectivity_and_errors():
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region (8-conn) or two (4-conn)
    maps = np.zeros((1, 5, 5))
    maps[0, 1, 1] = 1.0
    maps[0, 2, 2] = -1.0
    # 8-connectivity: one region, half of it found at FPR 0 → 0.5; 4-connectivity: two regions,
    # one found → also 0.5 — but their curves differ after the normal pixels, so compare at 1.0
    assert pro_score(maps, masks, connectivity=2) == pytest.approx(0.5)
    assert pro_score(maps, masks, connectivity=1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pro_score(maps, np.zeros_like(masks))
    with pytest.raises(ValueError):
        pixel_auroc(maps, np.zeros_like(masks))
    with pytest.raises(ValueError):
        pro_score(maps, masks, fpr_limit=0.0)


def test_auroc_conventions_and_per_class_rows():
    masks = _two_region_case()
    maps = masks.astype(float)
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_auroc(-maps, masks) == 0.0  # never flipped
    assert image_auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert image_auroc([0.1, 0.2, 0.9], [1, 1, 0]) == 0.0
    rows = localization_metrics(
        np.concatenate([maps, maps]), np.concatenate([masks, masks]),
        scores=[1, 1, 0, 1, 0, 0.5], classes=[0, 0, 0, 1, 1, 1],
    )
    assert [r["class"] for r in rows] == [0, 1, "mean", "pooled"]
    assert rows[0] == {"class": 0, "n": 3, "image_auroc": 1.0, "pixel_auroc": 1.0, "pro": pytest.approx(1.0)}
    assert rows[1]["image_auroc"] == 0.5
    assert rows[2]["image_auroc"] == pytest.approx(0.75) and rows[2]["n"] == 6
    # a class with only normal images cannot define the metrics: NaN, left out of the mean
    rows = localization_metrics(maps, masks, scores=[1, 1, 0], classes=["a", "a", "b"])
    assert np.isnan(rows[1]["pro"]) and rows[2]["pro"] == pytest.approx(rows[0]["pro"])


# --------------------------------------------------------------------------------------------
# the optional Stable Diffusion (latent) variant, with tiny random parts built in code


def test_latent_reconstruction_with_tiny_parts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffpath.methods.latent import ConditionalEps, LatentDiffusion, latent_reconstruct

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16,
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4,
    ).eval()
    sched = NoiseSchedule.from_diffusers_config(
        {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    )
    assert sched.betas[0] == pytest.approx(0.00085) and sched.betas[-1] == pytest.approx(0.012)
    ld = LatentDiffusion(vae=vae, unet=unet, schedule=sched)
    x = _images(b=2, c=3, s=16)
    cond, uncond = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    rec = latent_reconstruct(ld, x, 200, 3, prompt_embeds=cond)
    assert rec.x_hat.shape == x.shape and rec.z0.shape == (2, 4, 8, 8) and rec.nfe == 6
    assert torch.isfinite(rec.x_hat).all()
    again = latent_reconstruct(ld, x, 200, 3, prompt_embeds=cond)
    torch.testing.assert_close(again.x_hat, rec.x_hat)  # deterministic (posterior mean)
    guided = latent_reconstruct(ld, x, 200, 3, prompt_embeds=cond, negative_embeds=uncond, guidance_scale=3.5)
    assert guided.nfe == 12
    # guidance 1 is the plain conditional ε; guidance s mixes uncond/cond linearly
    z, t = rec.z0, torch.full((2,), 100, dtype=torch.long)
    e_c = ConditionalEps(unet, cond, sched)(z, t)
    e_u = ConditionalEps(unet, uncond, sched)(z, t)
    e_g = ConditionalEps(unet, cond, sched, uncond=uncond, guidance_scale=3.5)(z, t)
    torch.testing.assert_close(e_g, e_u + 3.5 * (e_c - e_u), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        latent_reconstruct(ld, x, 200, 3)  # no prompt, no embeddings, no text encoder


def test_denoise_t0_ablation_restores_a_schedule_mismatch():
    x0 = _images()
    same = reconstruct(ZeroEps(), x0, 300, 6, clip_denoised=False, denoise_t0=300)
    torch.testing.assert_close(same.x_hat, x0 / float(np.sqrt(AC[0])), atol=1e-6, rtol=1e-5)
    # ε ≡ 0 and a latent at ᾱ_300 read as if at ᾱ_600: the output is x_300/√ᾱ_600
    mis = reconstruct(ZeroEps(), x0, 300, 6, clip_denoised=False, denoise_t0=600)
    torch.testing.assert_close(mis.x_hat, x0 * float(np.sqrt(AC[300] / AC[0] / AC[600])), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# the walkthrough (notebook 35) shows the table's (notebook 30) maps


@pytest.mark.parametrize("spec", [MapSpec("deterministic", t0=(0.4,), steps=2),
                                  MapSpec("stochastic", t0=(0.3,), steps=2, draws=2, maps=("pixel", "ssim"))])
def test_one_image_gets_the_tables_maps_bit_for_bit(tiny_model, spec):
    """``table_maps`` as notebook 30 calls it (every image) and as notebook 35 calls it (one image,
    with a callback): the same maps, scores and reconstruction, for images in the first, a middle
    and the last (short) batch; the stochastic draws the callback shows are the table's draws; and
    ``batch_maps`` gives the table's maps of the whole batch that holds an image."""
    from diffpath.study.localization import batch_maps, table_maps

    bench = synthetic_anomalies("fashion_mnist", n_per_class=2)  # 20 images, batches of 8, 8, 4
    kw = {"seed": 3, "batch_size": 8, "smooth_sigma": 3.0}
    table = table_maps(tiny_model, bench, spec, **kw)
    for i in (0, 9, 19):
        steps: list = []
        one = table_maps(tiny_model, bench, spec, image=i, callback=steps.append, **kw)
        for m in spec.maps:
            assert one.maps[m].shape == (1, 28, 28)
            assert np.array_equal(one.maps[m][0], table.maps[m][i]), (m, i)
            assert one.scores[m][0] == table.scores[m][i]
        assert np.array_equal(one.x_hat[0], table.x_hat[i]) and one.nfe == table.nfe
        assert all(v.shape[0] == 1 for s in steps for v in s.values() if isinstance(v, torch.Tensor))
        ends = [s["x_next"] for s in steps if s["phase"] == "denoise" and s["i"] == spec.steps - 1]
        assert len(ends) == spec.draws
        assert np.array_equal(torch.stack(ends).mean(0)[0].numpy(), table.x_hat[i])
    whole, k = batch_maps(tiny_model, bench, spec, 9, **kw)  # the batch beside image 9: images 8 … 15
    assert k == 1 and all(np.array_equal(whole.maps[m], table.maps[m][8:16]) for m in spec.maps)
    other = table_maps(tiny_model, bench, spec, image=9, **{**kw, "seed": 4})
    assert spec.kind == "deterministic" or not np.array_equal(other.maps["pixel"][0], table.maps["pixel"][9])
