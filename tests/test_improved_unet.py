"""The improved-diffusion UNet re-implementation: checkpoint layout, numerics, settings, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpath.models import ModelLoadError, load_model
from diffpath.models.improved_unet import (
    AttentionBlock,
    ImprovedUNet,
    build_from_settings,
    load_checkpoint_into,
    resolve_settings,
    schedule_from_settings,
    settings_defaults,
    timestep_embedding,
)
from diffpath.core.schedule import NoiseSchedule

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
FIX_PT = FIXTURES / "diffpath_tiny.pt"


@pytest.fixture(scope="module")
def fixture_settings() -> dict:
    return json.loads((FIXTURES / "diffpath_tiny.json").read_text())


@pytest.fixture(scope="module")
def fixture_state() -> dict:
    return torch.load(FIX_PT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def fixture_arrays() -> dict:
    with np.load(FIXTURES / "diffpath_tiny.npz") as z:
        return {k: z[k] for k in ("x0", "eps", "xt")}


@pytest.fixture(scope="module")
def fixture_net(fixture_settings, fixture_state) -> ImprovedUNet:
    net = build_from_settings(fixture_settings)
    load_checkpoint_into(net, fixture_state, source=str(FIX_PT))
    return net.eval()


def _small(**overrides) -> dict:
    """A tiny 16×16 model; override any key."""
    base = {
        "image_size": 16,
        "channel_mult": [1, 2],
        "num_channels": 32,
        "num_res_blocks": 1,
        "num_heads": 2,
        "attention_resolutions": "8",
        "learn_sigma": True,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
    }
    base.update(overrides)
    return base


def _randomised(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------------------------
# the fixture checkpoint


def test_fixture_layout_matches_exactly(fixture_settings, fixture_state):
    net = build_from_settings(fixture_settings)
    ours = net.state_dict()
    assert list(ours) == list(fixture_state)
    assert len(ours) == 222
    for k, v in fixture_state.items():
        assert tuple(ours[k].shape) == tuple(v.shape), k


def test_fixture_first_step_eps(fixture_net, fixture_settings, fixture_arrays):
    abar0 = float(NoiseSchedule.named("cosine", 4000).alphas_cumprod[0])
    x0 = torch.from_numpy(fixture_arrays["x0"])
    t = torch.zeros(x0.shape[0])  # original timestep 0 → rescaled 0·1000/4000 = 0
    with torch.no_grad():
        eps_model = fixture_net(x0, t)[:, :3].double()
    x0d = x0.double()
    c_recip, c_recipm1 = math.sqrt(1 / abar0), math.sqrt(1 / abar0 - 1)
    x0_hat = (c_recip * x0d - c_recipm1 * eps_model).clamp(-1, 1)
    eps = (c_recip * x0d - x0_hat) / c_recipm1
    err = np.abs(eps.numpy() - fixture_arrays["eps"][:, 0]).max()
    assert err < 1e-3, err


def test_fixture_full_ddim_inversion(fixture_net, fixture_settings, fixture_arrays):
    """An independent 10-step DDIM-inversion loop reproduces every recorded ε and x."""
    abar = NoiseSchedule.named(
        fixture_settings["noise_schedule"], fixture_settings["diffusion_steps"]
    ).alphas_cumprod
    kept = fixture_settings["respaced_timesteps"]
    T = fixture_settings["diffusion_steps"]
    assert kept == list(range(0, T, T // fixture_settings["n_ddim_steps"]))
    x = torch.from_numpy(fixture_arrays["x0"])

    def f32(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float32)

    worst_eps = worst_x = 0.0
    with torch.no_grad():
        for i, t in enumerate(kept):
            a = abar[t]
            a_next = abar[kept[i + 1]] if i + 1 < len(kept) else 0.0
            out = fixture_net(x, torch.full((x.shape[0],), t * 1000.0 / T))
            assert out.shape == (x.shape[0], 6, 32, 32)
            eps_model = out[:, :3]
            c_recip, c_recipm1 = f32(math.sqrt(1 / a)), f32(math.sqrt(1 / a - 1))
            x0_hat = (c_recip * x - c_recipm1 * eps_model).clamp(-1, 1)
            eps = (c_recip * x - x0_hat) / c_recipm1
            x = x0_hat * f32(math.sqrt(a_next)) + f32(math.sqrt(1 - a_next)) * eps
            eps_err = np.abs(eps.numpy() - fixture_arrays["eps"][:, i]).max()
            x_err = np.abs(x.numpy() - fixture_arrays["xt"][:, i]).max()
            worst_eps, worst_x = max(worst_eps, float(eps_err)), max(worst_x, float(x_err))
    assert worst_eps < 1e-3, worst_eps
    assert worst_x < 1e-3, worst_x


def test_load_model_end_to_end(fixture_arrays):
    """The package loader reads the .pt + .json pair and gives ε at original timesteps."""
    model = load_model(FIX_PT, device="cpu")
    assert model.kind == "improved-diffusion"
    assert model.image_size == 32 and model.channels == 3
    assert model.timestep_scale == pytest.approx(0.25)
    assert model.num_timesteps == 4000
    x0 = torch.from_numpy(fixture_arrays["x0"][:2])
    eps = model(x0, torch.full((2,), 400, dtype=torch.int64))
    assert eps.shape == (2, 3, 32, 32) and eps.dtype == torch.float32
    assert torch.isfinite(eps).all()


# --------------------------------------------------------------------------------------------
# numerics of the pieces


def test_timestep_embedding_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1, :4], torch.cos(3 * freqs))
    torch.testing.assert_close(emb[1, 4:], torch.sin(3 * freqs))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (2, 7) and torch.all(odd[:, -1] == 0)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_matches_naive_head_grouping(heads):
    """qkv channels are grouped per head as [q_h, k_h, v_h]; logits scaled by 1/sqrt(d)."""
    torch.manual_seed(0)
    c, n = 32, 9
    blk = AttentionBlock(c, num_heads=heads).eval()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, c, 3, 3)
    with torch.no_grad():
        got = blk(x)
        flat = x.reshape(2, c, n)
        qkv = blk.qkv(blk.norm(flat))
        d = c // heads
        outs = []
        for h in range(heads):
            chunk = qkv[:, h * 3 * d : (h + 1) * 3 * d]
            q, k, v = chunk[:, :d], chunk[:, d : 2 * d], chunk[:, 2 * d :]
            w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
            outs.append(torch.einsum("bts,bcs->bct", w, v))
        want = (flat + blk.proj_out(torch.cat(outs, dim=1))).reshape(x.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_groupnorm_runs_in_float32():
    net = build_from_settings(_small(attention_resolutions=""))
    norm = net.out[0]
    assert norm.num_groups == 32
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(1, 32, 4, 4).to(torch.bfloat16)
    got = norm(x)
    assert got.dtype == torch.bfloat16  # result cast back to the input dtype
    want = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(got, want.to(torch.bfloat16), atol=0, rtol=0)
    # float64 models (e.g. for reference computations) run end to end
    x64 = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    assert net.double()(x64, torch.tensor([5.0])).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# other settings: build, forward, round-trip their own random weights


VARIANTS = {
    "linear_no_sigma": dict(learn_sigma=False),
    "width64_heads4_two_blocks": dict(num_channels=64, num_heads=4, num_res_blocks=2),
    "heads1": dict(num_heads=1),
    "heads_upsample_differs": dict(num_heads=1, num_heads_upsample=2),
    "no_attention": dict(attention_resolutions=""),
    "attention_list": dict(attention_resolutions=[16, 8]),
    "gray_in_channels_1": dict(in_channels=1, learn_sigma=True),
    "mult_as_string": dict(channel_mult="1,2,2"),
    "no_scale_shift_norm": dict(use_scale_shift_norm=False, dropout=0.1),
    "explicit_out_channels": dict(out_channels=5),
    "image32_default_mult": dict(image_size=32, channel_mult=None, attention_resolutions="8"),
    "image64_default_mult": dict(
        image_size=64, channel_mult=None, attention_resolutions="8", num_heads=1
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_builds_runs_and_round_trips(name):
    settings = _small(**VARIANTS[name])
    s = resolve_settings(settings)
    net = build_from_settings(settings).eval()
    sd = _randomised(net, seed=len(name))
    twin = build_from_settings(settings).eval()
    load_checkpoint_into(twin, sd, source=name)
    for k, v in twin.state_dict().items():
        assert torch.equal(v, sd[k]), k

    size = s["image_size"]
    x = torch.randn(2, s["in_channels"], size, size)
    with torch.no_grad():
        out = twin(x, torch.tensor([0, 999]))  # int timesteps
        out_f = twin(x, torch.tensor([0.0, 999.0]))  # float timesteps
    assert out.shape == (2, s["out_channels"], size, size)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_f)


def test_variant_structure_details():
    s = resolve_settings(_small(learn_sigma=False, attention_resolutions="16,8"))
    assert s["out_channels"] == 3 and s["in_channels"] == 3
    assert s["attention_ds"] == (1, 2)
    assert resolve_settings(_small(in_channels=1, learn_sigma=True))["out_channels"] == 2
    for size, mult in [(64, (1, 2, 3, 4)), (32, (1, 2, 2, 2)), (256, (1, 1, 2, 2, 4, 4))]:
        assert resolve_settings(_small(image_size=size, channel_mult=None))["channel_mult"] == mult
    assert resolve_settings(_small(channel_mult="1, 2"))["channel_mult"] == (1, 2)

    # no attention anywhere but the middle block
    keys = build_from_settings(_small(attention_resolutions="")).state_dict()
    assert {k.split(".qkv.")[0] for k in keys if ".qkv." in k} == {"middle_block.1"}

    # num_heads_upsample: -1 → num_heads; otherwise used in the decoder only
    net = build_from_settings(
        _small(num_heads=1, num_heads_upsample=2, attention_resolutions="16,8")
    )
    attn = {n: m.num_heads for n, m in net.named_modules() if isinstance(m, AttentionBlock)}
    enc = [h for n, h in attn.items() if n.startswith("input")]
    dec = [h for n, h in attn.items() if n.startswith("output")]
    assert enc and set(enc) == {1} and dec and set(dec) == {2}
    net = build_from_settings(_small(num_heads=4, num_heads_upsample=-1))
    assert {m.num_heads for m in net.modules() if isinstance(m, AttentionBlock)} == {4}

    # scale-shift norm doubles the embedding projection
    w = build_from_settings(_small()).state_dict()["input_blocks.1.0.emb_layers.1.weight"]
    assert w.shape == (64, 128)
    w = build_from_settings(_small(use_scale_shift_norm=False)).state_dict()[
        "input_blocks.1.0.emb_layers.1.weight"
    ]
    assert w.shape == (32, 128)


def test_partial_settings_use_defaults():
    s = resolve_settings({"image_size": 32, "num_channels": 32, "num_res_blocks": 1})
    d = settings_defaults()
    assert s["num_heads"] == d["num_heads"] == 4
    assert s["num_heads_upsample"] == 4
    assert s["attention_ds"] == (2, 4)
    assert s["out_channels"] == 3 and s["use_scale_shift_norm"] is True
    assert s["rescale_timesteps"] is True


def test_bool_strings_accepted():
    s = resolve_settings(_small(learn_sigma="False", use_scale_shift_norm="true"))
    assert s["learn_sigma"] is False and s["use_scale_shift_norm"] is True


# --------------------------------------------------------------------------------------------
# schedules


def test_schedule_from_settings():
    cos = schedule_from_settings({"noise_schedule": "cosine", "diffusion_steps": 4000})
    assert cos.num_timesteps == 4000
    np.testing.assert_array_equal(cos.betas, NoiseSchedule.named("cosine", 4000).betas)
    lin = schedule_from_settings({"noise_schedule": "linear", "diffusion_steps": 1000})
    np.testing.assert_allclose(lin.betas[[0, -1]], [1e-4, 0.02])
    with pytest.raises(ModelLoadError, match="sigmoid"):
        schedule_from_settings({"noise_schedule": "sigmoid", "diffusion_steps": 10})


# --------------------------------------------------------------------------------------------
# settings that cannot be built


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(class_cond=True), "class_cond"),
        (dict(num_channels=16), "GroupNorm"),  # improved-diffusion cannot build it either
        (dict(num_channels=32, num_heads=3), "num_heads"),
        (dict(image_size=48, channel_mult=None), "channel_mult"),
        (dict(num_res_blocks="two"), "num_res_blocks"),
    ],
)
def test_unbuildable_settings(overrides, needle):
    with pytest.raises(ModelLoadError, match=needle):
        build_from_settings(_small(**overrides))


def test_missing_image_size():
    with pytest.raises(ModelLoadError, match="image_size"):
        build_from_settings({"num_channels": 32})


# --------------------------------------------------------------------------------------------
# checkpoint loading: wrappers and mismatches


def test_wrapped_and_prefixed_state_dicts(fixture_settings, fixture_state):
    for wrapped in (
        {"state_dict": fixture_state},
        {f"module.{k}": v for k, v in fixture_state.items()},
        {"state_dict": {f"module.{k}": v for k, v in fixture_state.items()}},
    ):
        net = build_from_settings(fixture_settings)
        load_checkpoint_into(net, wrapped, source="wrapped.pt")
        torch.testing.assert_close(
            net.state_dict()["out.2.weight"], fixture_state["out.2.weight"], atol=0, rtol=0
        )


def test_missing_key_is_named(fixture_settings, fixture_state):
    sd = dict(fixture_state)
    del sd["middle_block.1.proj_out.weight"]
    net = build_from_settings(fixture_settings)
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint_into(net, sd, source="broken.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "broken.pt" in msg and "settings file" in msg
    assert "1 missing" in msg and "middle_block.1.proj_out.weight" in msg


def test_extra_key_is_named(fixture_settings, fixture_state):
    sd = dict(fixture_state)
    sd["label_emb.weight"] = torch.zeros(1000, 128)
    net = build_from_settings(fixture_settings)
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint_into(net, sd, source="extra.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "1 unexpected" in msg and "label_emb.weight" in msg and "class-conditional" in msg


def test_wrong_shape_is_named(fixture_settings, fixture_state):
    sd = dict(fixture_state)
    sd["input_blocks.3.1.qkv.weight"] = torch.zeros(96, 64, 1)
    net = build_from_settings(fixture_settings)
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint_into(net, sd, source="shape.pt")
    msg = str(info.value)
    assert "\n" not in msg
    assert "input_blocks.3.1.qkv.weight" in msg
    assert "(192, 64, 1)" in msg and "(96, 64, 1)" in msg


def test_checkpoint_for_other_settings_is_rejected(fixture_settings, fixture_state):
    """learn_sigma false against a learned-σ checkpoint: the output conv has the wrong shape."""
    net = build_from_settings({**fixture_settings, "learn_sigma": False, "out_channels": None})
    with pytest.raises(ModelLoadError, match=r"out\.2\.weight"):
        load_checkpoint_into(net, fixture_state, source="mismatch.pt")
    # a different width: many keys, reported with counts and a preview
    net = build_from_settings({**fixture_settings, "num_channels": 64})
    with pytest.raises(ModelLoadError, match=r"\d+ shape mismatch\(es\).*more"):
        load_checkpoint_into(net, fixture_state, source="mismatch.pt")


def test_non_mapping_checkpoint_rejected(fixture_settings):
    net = build_from_settings(fixture_settings)
    with pytest.raises(ModelLoadError, match="state_dict"):
        load_checkpoint_into(net, [1, 2, 3], source="list.pt")
