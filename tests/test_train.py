"""Fast tests of diffpath.study.train on a tiny seeded UNet (16×16, two levels): a few seconds on 2 cores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffpath.core.sampling import ddim_sample
from diffpath.study.base_model import denoising_loss_per_timestep, image_grid, untrained_like
from diffpath.study.train import (
    TrainConfig,
    UNetConfig,
    build_unet,
    ema_decay_at,
    lr_at,
    save_pipeline,
    train,
    train_schedule,
)

TINY = UNetConfig(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=4,
    add_attention=False,
)


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(
        unet=TINY,
        batch_size=16,
        lr=3e-3,
        warmup_steps=2,
        steps=20,
        ema_decay=0.99,
        seed=0,
        log_every=5,
        checkpoint_every=5,
        num_threads=None,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """64 smooth 16×16 blobs in [-1, 1] (background −1), shape (64, 1, 16, 16)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32)
    out = np.empty((64, 1, 16, 16), np.float32)
    for i in range(64):
        cy, cx = rng.uniform(4, 12, size=2)
        r = rng.uniform(2.0, 5.0)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out[i, 0] = 2.0 * blob - 1.0
    return out


def _eps_fn(unet):
    unet = unet.eval()

    def f(x, t):
        return unet(x, t).sample

    return f


def test_tiny_training_reduces_heldfixed_loss(images, tmp_path):
    cfg = tiny_cfg()
    sched = train_schedule(cfg)
    ts = [50, 200, 400, 600]
    with torch.no_grad():
        before = denoising_loss_per_timestep(_eps_fn(build_unet(cfg)), images[:32], ts, 7, schedule=sched)
    res = train(cfg, images, tmp_path / "run", resume=False, progress=False)
    with torch.no_grad():
        after = denoising_loss_per_timestep(_eps_fn(res.model), images[:32], ts, 7, schedule=sched)
    assert res.step == 20
    assert len(res.history) == 4 and res.history[-1]["step"] == 20
    assert after.mean() < 0.8 * before.mean(), (before, after)
    assert (tmp_path / "run" / "train_log.csv").is_file()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint.pt").is_file()


def test_resume_reproduces_uninterrupted_run(images, tmp_path):
    cfg = tiny_cfg(steps=10, checkpoint_every=3)
    full = train(cfg, images, tmp_path / "full", resume=False, progress=False)
    part = train(cfg, images, tmp_path / "part", resume=False, progress=False, stop_at=4)
    assert part.step == 4
    rest = train(cfg, images, tmp_path / "part", resume=True, progress=False)
    assert rest.step == 10
    for a, b in ((full.model, rest.model), (full.ema_model, rest.ema_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    # a wall-clock budget stops at the first checkpoint after it, and resuming finishes the run
    cut = train(cfg, images, tmp_path / "cut", resume=False, progress=False, max_seconds=0.0)
    assert cut.step == 3
    # a constant-lr run cut by the budget is continued (or extended) whatever `steps` says
    const = tiny_cfg(steps=10, checkpoint_every=3, lr_schedule="constant")
    ref = train(tiny_cfg(steps=6, checkpoint_every=3, lr_schedule="constant"), images,
                tmp_path / "ref", resume=False, progress=False)
    train(const, images, tmp_path / "const", resume=False, progress=False, stop_at=6)
    same = train(tiny_cfg(steps=6, checkpoint_every=3, lr_schedule="constant"), images,
                 tmp_path / "const", progress=False)
    assert same.step == 6
    for k, v in ref.ema_model.state_dict().items():
        assert torch.equal(v, same.ema_model.state_dict()[k]), k
    with pytest.raises(ValueError, match="beyond steps"):
        train(tiny_cfg(steps=5, checkpoint_every=3, lr_schedule="constant"), images,
              tmp_path / "const", progress=False)
    # a different config must not silently resume that checkpoint
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(tiny_cfg(steps=10, checkpoint_every=3, lr=1e-4), images, tmp_path / "part", progress=False)


def test_save_pipeline_loads_as_eps_model(tmp_path):
    from diffpath.models import load_model

    unet = build_unet(TINY, seed=1)
    folder = save_pipeline(unet, tmp_path / "pipe")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert (folder / "model_index.json").is_file()
    model = load_model(folder)
    assert model.kind == "diffusers" and model.channels == 1 and model.image_size == 16
    assert model.num_timesteps == 1000
    np.testing.assert_allclose(
        model.schedule.betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-12
    )
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor([0, 500, 999])
    eps = model(x, t)
    assert eps.shape == (3, 1, 16, 16) and eps.dtype == torch.float32
    with torch.no_grad():
        ref = unet.eval()(x, t).sample
    torch.testing.assert_close(eps, ref)
    # saving again over an existing folder replaces it cleanly
    save_pipeline(build_unet(TINY, seed=2), folder)
    assert not any(p.name.startswith((".saving", ".old_")) for p in folder.iterdir())

    fresh = untrained_like(model, seed=0)
    assert fresh.schedule is model.schedule and fresh.image_size == 16
    assert fresh(x, t).shape == eps.shape and not torch.allclose(fresh(x, t), eps)

    samples = ddim_sample(model, 5, steps=4, seed=0)
    assert samples.shape == (5, 1, 16, 16)
    torch.testing.assert_close(samples, ddim_sample(model, 5, steps=4, seed=0, batch_size=2))
    grid = image_grid(samples, nrow=3)
    assert grid.shape == (2 * 17 + 1, 3 * 17 + 1)
    # tile 4 (row 1, column 1) holds sample 4, mapped from [-1, 1] to [0, 1]; padding is white
    np.testing.assert_array_equal(grid[18:34, 18:34], (samples[4, 0].numpy() + 1) / 2)
    assert np.all(grid[0] == 1.0) and np.all(grid[17] == 1.0)


def test_ddim_sample_of_an_oracle_model_is_its_image():
    """The sampler walks pure noise down to the image an exact ε-model is consistent with."""
    from conftest import ReconstructingEps

    x0 = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    oracle = ReconstructingEps(x0, train_schedule(TrainConfig(unet=TINY)))
    samples = ddim_sample(oracle, 3, steps=5, seed=2)
    torch.testing.assert_close(samples, x0.expand(3, -1, -1, -1), rtol=0, atol=4 * 2.0**-24)


def test_denoising_loss_of_zero_model_is_one():
    # ε̂ ≡ 0 gives mean ε² over n = N·C·H·W pixels per timestep: mean 1, sd √(2/n) (Var ε² = 2).
    x0 = torch.rand(64, 1, 16, 16) * 2 - 1
    n = x0.numel()
    tol = 5.0 * math.sqrt(2.0 / n)  # 5 sd ≈ 0.055

    def zero(x, t):
        return torch.zeros_like(x)

    sched = train_schedule(tiny_cfg())
    ts = [0, 10, 100, 500, 999]
    loss = denoising_loss_per_timestep(zero, x0, ts, seed=3, schedule=sched, batch_size=24)
    assert loss.shape == (5,) and loss.dtype == np.float64
    assert np.all(np.abs(loss - 1.0) < tol), (loss, tol)
    # the same seed gives the same noise, whatever the images or batch size
    again = denoising_loss_per_timestep(zero, -x0, ts, seed=3, schedule=sched, batch_size=64)
    np.testing.assert_allclose(loss, again, rtol=1e-12)


def test_schedules():
    cfg = tiny_cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1)
    assert lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    assert lr_at(TrainConfig(**{**cfg.to_dict(), "lr_schedule": "constant"}), 80) == 1.0
    assert ema_decay_at(cfg, 0) == pytest.approx(0.1)
    assert ema_decay_at(cfg, 10_000) == cfg.ema_decay


def test_a_chain_trains_the_continued_run_once_and_starts_from_its_ema(images, tmp_path):
    """cfg.init: the continued run is trained (or found) in checkpoint_dir/init and its EMA weights
    initialise the next run; a second call finds both finished and trains nothing."""
    from diffpath.study.train import finished_run, train_chain

    first = tiny_cfg(steps=6, lr_schedule="constant")
    cfg = tiny_cfg(steps=4, seed=1, lr=1e-3, precision="bf16", init=first)
    start = train_chain(cfg, images, tmp_path / "out", checkpoint_dir=tmp_path / "ck", progress=False)
    assert start.step == 4 and finished_run(tmp_path / "ck" / "init", first)
    alone = train(first, images, tmp_path / "alone", resume=False, progress=False)
    # the continuation starts from the first run's EMA: stop it before its first step
    zero = train(cfg, images, tmp_path / "zero", resume=False, progress=False, stop_at=0,
                 init_weights=tmp_path / "ck" / "init")
    for k, v in alone.ema_model.state_dict().items():
        assert torch.equal(zero.model.state_dict()[k], v), k
    # nothing left to do: the init run is not retrained and the last run resumes at its end
    init_file = tmp_path / "ck" / "init" / "unet" / "diffusion_pytorch_model.safetensors"
    before = init_file.stat().st_mtime_ns
    again = train_chain(cfg, images, tmp_path / "out", checkpoint_dir=tmp_path / "ck", progress=False)
    assert init_file.stat().st_mtime_ns == before and again.step == 4
    for k, v in start.ema_model.state_dict().items():
        assert torch.equal(again.ema_model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="init_weights"):
        train(cfg, images, tmp_path / "no_init", resume=False, progress=False)
    # the continued run's settings are part of the checkpoint's identity
    other = tiny_cfg(steps=4, seed=1, lr=1e-3, precision="bf16", init=tiny_cfg(steps=5, lr_schedule="constant"))
    with pytest.raises(ValueError, match="different TrainConfig"):
        train(other, images, tmp_path / "out", checkpoint_dir=tmp_path / "ck", progress=False)
