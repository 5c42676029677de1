"""Bootstrap intervals of the localisation metrics, the benchmark's disjoint parts, and
``diffpath localize`` on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from diffpath.data.anomalies import synthetic_anomalies
from diffpath.scoring.bootstrap import class_counts, difference_interval, paired_bootstrap
from diffpath.scoring.metrics import localization_metrics


def _case(seed=0):
    rng = np.random.default_rng(seed)
    n = 24
    masks = np.zeros((n, 12, 12), bool)
    for i in range(12):
        y, x = rng.integers(0, 8, 2)
        masks[i, y : y + 4, x : x + 3] = True
    maps = np.round(rng.random((n, 12, 12)) + 0.6 * masks, 2)  # ties on purpose
    return maps, masks, maps.reshape(n, -1).max(1), (np.arange(n) < 12).astype(int), np.tile(np.arange(3), 8)


def test_bootstrap_point_values_match_the_exact_metrics_and_intervals_cover_them():
    maps, masks, scores, labels, classes = _case()
    noisy = maps + np.random.default_rng(1).random(maps.shape)
    table, reps = paired_bootstrap({"a": (maps, scores), "b": (noisy, scores[::-1])}, masks, labels, classes,
                                   n_boot=300, seed=0)
    ref = [r for r in localization_metrics(maps, masks, scores, labels, classes) if r["class"] == "mean"][0]
    for k in ("image_auroc", "pixel_auroc", "pro"):
        assert table["a"][k] == pytest.approx(ref[k], abs=1e-9)
        assert table["a"][f"{k}_lo"] <= ref[k] <= table["a"][f"{k}_hi"]
        assert table["a"][f"{k}_hi"] > table["a"][f"{k}_lo"] or k == "image_auroc"
    d = difference_interval(reps, "a", "b")
    assert d["pixel_auroc"][0] > 0  # a is clearly the better map, on the same resamples
    one = paired_bootstrap({"a": (maps, scores)}, masks, labels, classes, n_boot=300, seed=0)[1]
    np.testing.assert_array_equal(one["a"]["pixel_auroc"], reps["a"]["pixel_auroc"])


def test_bootstrap_replicate_equals_the_exact_metric_on_the_resample():
    maps, masks, scores, labels, classes = _case(2)
    counts = class_counts(classes, 3, seed=5)
    assert (counts.sum(1) == len(classes)).all()
    table, reps = paired_bootstrap({"a": (maps, scores)}, masks, labels, classes, n_boot=3, seed=5, grid=100000)
    for b in range(3):
        idx = np.repeat(np.arange(len(classes)), counts[b])
        ref = [r for r in localization_metrics(maps[idx], masks[idx], scores[idx], labels[idx], classes[idx])
               if r["class"] == "mean"][0]
        assert reps["a"]["pixel_auroc"][b] == pytest.approx(ref["pixel_auroc"], abs=1e-9)
        assert reps["a"]["image_auroc"][b] == pytest.approx(ref["image_auroc"], abs=1e-9)
        assert reps["a"]["pro"][b] == pytest.approx(ref["pro"], abs=2e-3)


def test_benchmark_parts_are_disjoint():
    a = synthetic_anomalies("fashion_mnist", n_per_class=3, part=0)
    b = synthetic_anomalies("fashion_mnist", n_per_class=3, part=1)
    both = synthetic_anomalies("fashion_mnist", n_per_class=6, part=0)
    ka = {x.tobytes() for x in a.originals}
    assert not ka & {x.tobytes() for x in b.originals}
    assert ka | {x.tobytes() for x in b.originals} == {x.tobytes() for x in both.originals}
    with pytest.raises(ValueError, match="part"):
        synthetic_anomalies("mnist", n_per_class=60, part=1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, add_attention=False)
    d = tmp_path_factory.mktemp("model") / "tiny_ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(d)
    return d


def test_localize_command_writes_maps_overlays_and_scores(tiny_model_dir, tmp_path):
    from PIL import Image

    from diffpath.cli import main

    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (14, 14), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(imgs / "sub" / "a.png")
    (imgs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    rc = main(["localize", "--model", str(tiny_model_dir), str(imgs), "--out", str(out), "--t0", "0.2",
               "--steps", "2", "--draws", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert "scores.csv" in names and "localize.json" in names
    assert sum(n.endswith("_overlay.png") for n in names) == 2
    maps = sorted(out.glob("*_map.npy"))
    assert len(maps) == 2 and {np.load(m).shape for m in maps} == {(14, 14), (20, 20)}
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "index,path,score,map,overlay" and len(rows) == 3
    # a folder it did not write is refused; a bad t0 is one line, exit 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["localize", "--model", str(tiny_model_dir), str(imgs), "--out", str(other)]) == 2
    assert main(["localize", "--model", str(tiny_model_dir), str(imgs), "--out", str(out), "--t0", "400"]) == 2
    assert (other / "keep.txt").exists()


def test_localize_smooth_sigma_reaches_the_maps(tiny_model_dir, tmp_path):
    from PIL import Image

    import torch

    from diffpath.cli import main
    from diffpath.methods.maps import gaussian_smooth

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16), dtype=np.uint8)).save(imgs / "a.png")
    base = ["localize", "--model", str(tiny_model_dir), str(imgs), "--t0", "0.2", "--steps", "2",
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "raw"), "--smooth-sigma", "0"]) == 0
    assert main([*base, "--out", str(tmp_path / "s3"), "--smooth-sigma", "3"]) == 0
    raw = np.load(next((tmp_path / "raw").glob("*_map.npy")))
    s3 = np.load(next((tmp_path / "s3").glob("*_map.npy")))
    # a 16-px image on the 16-px model: no resizing, so the σ = 3 map is the raw map smoothed
    want = gaussian_smooth(torch.from_numpy(raw)[None, None], 3.0)[0, 0].numpy()
    np.testing.assert_allclose(s3, want, rtol=1e-6, atol=1e-7)  # same float32 operations
    assert not np.allclose(raw, s3)
    assert main([*base, "--out", str(tmp_path / "bad"), "--smooth-sigma", "-1"]) == 2
    assert not (tmp_path / "bad").exists()
