"""``diffpath localize`` on a Stable Diffusion model (tiny random parts in diffusers' folder layout):
the same outputs and checks as the pixel-space path, DIVAD's round trip, ``--map dino``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from localization_fakes import write_tiny_stable_diffusion, write_tiny_vit

from diffpath.cli import main


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latent_cli")
    return write_tiny_stable_diffusion(tmp / "sd", image_size=16), write_tiny_vit(tmp / "vit")


@pytest.fixture()
def images(tmp_path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(imgs / "screw_a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(imgs / "gray.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    return imgs


def test_dino_maps_of_a_stable_diffusion_model_on_each_images_grid(parts, images, tmp_path, capsys):
    sd, vit = parts
    out = tmp_path / "out"
    args = ["localize", "--model", str(sd), "--prompt", "an image of a {class}", "--class", "screw", str(images),
            "--out", str(out), "--map", "dino", "--dino", str(vit), "--eval-size", "32", "--device", "cpu"]
    assert main(args) == 0
    assert "136 UNet and 2 VAE evaluations per image" in capsys.readouterr().err
    maps = {p.name: np.load(p) for p in out.glob("*_map.npy")}
    assert {m.shape for m in maps.values()} == {(20, 20), (30, 44)} and len(list(out.glob("*_overlay.png"))) == 2
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "index,path,score,map,overlay" and len(rows) == 3
    meta = json.loads((out / "localize.json").read_text())
    assert meta["settings"]["round_trip"] == "divad_code" and meta["settings"]["latent_level"] == 161
    assert meta["settings"]["sample_from"] == 591 and meta["unet_evaluations_per_image"] == 136
    assert meta["n_images"] == 2 and len(meta["skipped"]) == 1  # the broken file, skipped with a warning
    # a rerun into its own folder gives the same maps (seeded; the VAE's posterior mean)
    assert main(args) == 0
    assert all(np.array_equal(np.load(out / n), m) for n, m in maps.items())


def test_other_round_trips_and_maps(parts, images, tmp_path):
    sd, _ = parts
    base = ["localize", "--model", str(sd), "--class", "screw", str(images), "--eval-size", "32", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "m"), "--round-trip", "matched", "--map", "pixel"]) == 0
    assert json.loads((tmp_path / "m/localize.json").read_text())["unet_evaluations_per_image"] == 50
    assert main([*base, "--out", str(tmp_path / "s"), "--round-trip", "vae", "--map", "ssim"]) == 0


def test_bad_requests_are_one_line_and_exit_2(parts, images, tmp_path, capsys):
    sd, _ = parts
    base = ["localize", "--model", str(sd), str(images), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2  # the default prompt names a class
    assert "--class" in capsys.readouterr().err
    assert main([*base, "--class", "screw", "--map", "feature", "--out", str(tmp_path / "b")]) == 2
    assert "not available for Stable Diffusion" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_map_dino_needs_a_stable_diffusion_model(tmp_path, images, capsys):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       add_attention=False)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    assert main(["localize", "--model", str(tmp_path / "ddpm"), str(images), "--out", str(tmp_path / "o"),
                 "--map", "dino"]) == 2
    assert "needs a Stable Diffusion model" in capsys.readouterr().err
