"""DIVAD's latent round trip (diffpath.methods.divad) and its DINO map (diffpath.methods.dino), on
tiny random diffusers / transformers parts: the schedules its code runs (t ≈ 161 handed to a sampler
at t ≈ 591), step for step against its loops restated here, fixed seeds, and the DINO map against a
direct computation from the ViT's hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from localization_fakes import SD21_SCHEDULER, write_tiny_stable_diffusion, write_tiny_vit
from scipy import ndimage

from diffpath.methods.divad import RoundTripSpec, ddim_grid, latent_round_trip
from diffpath.methods.dino import IMAGENET_MEAN, IMAGENET_STD, PatchFeatures, dino_distance_map
from diffpath.methods.latent import DIVAD_PROMPT, LatentDiffusion, prompt_for
from diffpath.methods.localization import batch_generator


@pytest.fixture(scope="module")
def ld(tmp_path_factory) -> LatentDiffusion:
    return LatentDiffusion.from_pretrained(write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "sd",
                                                                       image_size=16))


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> PatchFeatures:
    return PatchFeatures.from_pretrained(write_tiny_vit(tmp_path_factory.mktemp("vit") / "vit"))


def _images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_divads_code_hands_a_latent_at_161_to_a_sampler_that_starts_at_591():
    from diffusers import DDIMInverseScheduler

    spec = RoundTripSpec("divad_code")  # --nis 50 --inf_step 100 --ss 40
    assert spec.divad_levels(SD21_SCHEDULER) == (161, 591)
    assert ddim_grid(SD21_SCHEDULER, 50)[:3] == [1, 21, 41] and ddim_grid(SD21_SCHEDULER, 100)[-1] == 991
    inverse = DDIMInverseScheduler.from_config({k: v for k, v in SD21_SCHEDULER.items() if k != "skip_prk_steps"})
    inverse.set_timesteps(50)
    assert inverse.timesteps.tolist() == ddim_grid(SD21_SCHEDULER, 50)  # the inverse scheduler's grid too
    plan = spec.plan(SD21_SCHEDULER)
    # 8 inversion steps (levels 1 → 21 … 141 → 161), ε at each step's destination
    assert plan.invert[0] == (1, 21) and plan.invert[-1] == (141, 161) and len(plan.invert) == 8
    assert dict(plan.eval_at) == {t - 20: t for t in range(21, 162, 20)}
    # 60 sampling steps from 591; the last one, from 1 to 1, is the identity
    assert plan.denoise[0] == (591, 581) and plan.denoise[-1] == (1, 1) and len(plan.denoise) == 60
    assert (plan.latent_level, plan.sample_from, plan.nfe(3.5), plan.reference_steps) == (161, 591, 136, 108)
    matched = RoundTripSpec("matched").plan(SD21_SCHEDULER)
    assert matched.invert == plan.invert and matched.sample_from == matched.latent_level == 161
    assert matched.nfe(3.5) == 2 * (8 + 17)
    stochastic = RoundTripSpec("stochastic").plan(SD21_SCHEDULER)
    assert stochastic.latent_level == 591 and stochastic.nfe(3.5) == plan.nfe(3.5)  # equal cost
    # the levels follow the configuration: without diffusers' steps_offset they are 160 and 590
    assert spec.divad_levels({**SD21_SCHEDULER, "steps_offset": 0}) == (160, 590)


def _divads_loops(ld: LatentDiffusion, z0, cond, uncond, guidance, nis=50, inf_step=100, ss=40):
    """ddim_inversion.py's ``invert`` and ``sample`` restated: diffusers' DDIMScheduler grids and its
    float32 ᾱ, ε at the destination during the inversion, every inverted latent kept."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(dict(ld.scheduler_config))
    ac = sch.alphas_cumprod

    def eps(z, t):
        out = ld.unet(torch.cat([z, z]), torch.full((2 * len(z),), int(t)),
                      encoder_hidden_states=torch.cat([uncond.expand(len(z), -1, -1), cond.expand(len(z), -1, -1)]))
        e_u, e_c = out.sample.chunk(2)
        return e_u + guidance * (e_c - e_u)

    sch.set_timesteps(nis)
    ts = list(reversed(sch.timesteps.tolist()))
    z, kept = z0, []
    for i in range(1, nis - 1):
        t, cur = ts[i], max(0, ts[i] - 1000 // nis)
        e = eps(z, t)
        z = (z - (1 - ac[cur]).sqrt() * e) * (ac[t].sqrt() / ac[cur].sqrt()) + (1 - ac[t]).sqrt() * e
        kept.append(z)
    z = kept[-(ss + 1)]
    sch.set_timesteps(inf_step)
    for t in sch.timesteps[ss:].tolist():
        prev = max(1, t - 1000 // inf_step)
        e = eps(z, t)
        x0 = (z - (1 - ac[t]).sqrt() * e) / ac[t].sqrt()
        z = ac[prev].sqrt() * x0 + (1 - ac[prev]).sqrt() * e
    return z


@torch.no_grad()
def test_the_round_trip_is_divads_loops_step_for_step(ld):
    x = _images()
    cond, uncond = ld.prompt_embeddings(DIVAD_PROMPT, "screw"), ld.embed([""])
    res = latent_round_trip(ld, x, RoundTripSpec("divad_code").plan(ld.scheduler_config), cond=cond, uncond=uncond,
                            guidance_scale=3.5)
    want = ld.decode(_divads_loops(ld, ld.encode(x), cond, uncond, 3.5))
    # float64 ᾱ rounded once (here) vs diffusers' float32 cumulative product (there): ~1e-7 per
    # coefficient, carried through 68 steps of a random UNet (ε at the source instead: 0.19)
    torch.testing.assert_close(res.x_hat[0], want, atol=5e-5, rtol=0)  # measured: 8e-6
    assert (res.nfe_unet, res.nfe_vae) == (136, 2) and prompt_for(DIVAD_PROMPT, "screw") == "An image of a screw"


@torch.no_grad()
def test_a_rerun_gives_the_same_numbers_and_the_seed_matters(ld):
    x, cond, uncond = _images(), ld.prompt_embeddings(DIVAD_PROMPT, "bottle"), ld.embed([""])

    def run(kind, seed, **kw):
        plan = RoundTripSpec(kind, invert_steps=10, sample_steps=20, start_step=4, steps=4, draws=2).plan(
            ld.scheduler_config)
        return latent_round_trip(ld, x, plan, cond=cond, uncond=uncond, guidance_scale=3.5,
                                 generator=batch_generator(seed, 0, "cpu"), **kw).x_hat

    for kind in ("divad_code", "matched", "stochastic", "vae"):
        assert torch.equal(run(kind, 0), run(kind, 0)), kind
    assert torch.equal(run("divad_code", 0), run("divad_code", 1))  # no randomness: the posterior mean
    assert not torch.equal(run("stochastic", 0), run("stochastic", 1))
    assert torch.equal(run("vae", 0, vae_sample=True), run("vae", 0, vae_sample=True))
    assert not torch.equal(run("vae", 0, vae_sample=True), run("vae", 0))


def _direct_dino(vit: PatchFeatures, x: torch.Tensor, x_hat: torch.Tensor, sigma: float, fg=None) -> np.ndarray:
    """The DINO map from the ViT's hidden states, computed here without diffpath: CLS dropped, cosine
    distance in float64 numpy, bilinear (align_corners) upsampling, scipy's Gaussian (reflect)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    H = x.shape[-1]
    h = H // 8

    def tokens(img):
        out = vit.model(pixel_values=((img + 1) / 2 - mean) / std, interpolate_pos_encoding=True)
        return out.last_hidden_state[:, 1:].double().numpy().reshape(len(img), h, h, -1)

    a, b = tokens(x), tokens(x_hat)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    up = torch.nn.functional.interpolate(torch.from_numpy(1 - cos)[:, None], size=(H, H), mode="bilinear",
                                         align_corners=True)[:, 0].numpy()
    if fg is not None:
        up = up * fg
    return np.stack([ndimage.gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in up])


@torch.no_grad()
def test_dino_map_equals_the_cosine_distance_of_the_features_computed_directly(vit):
    x, x_hat = _images(3, 48, 1), _images(3, 48, 2)  # 48²: the position embeddings interpolated (ViT at 32²)
    got = dino_distance_map(vit, x, x_hat, sigma=2.0)[:, 0].numpy()
    np.testing.assert_allclose(got, _direct_dino(vit, x, x_hat, 2.0), atol=2e-6, rtol=0)
    fg = (np.random.default_rng(0).random((3, 48, 48)) > 0.3)
    got_fg = dino_distance_map(vit, x, x_hat, sigma=2.0, foreground=torch.from_numpy(fg))[:, 0].numpy()
    np.testing.assert_allclose(got_fg, _direct_dino(vit, x, x_hat, 2.0, fg), atol=2e-6, rtol=0)
    same = dino_distance_map(vit, x, x, sigma=0.0)
    assert float(same.abs().max()) < 1e-5  # an image is no distance from itself
