"""`diffpath localize` at its defaults finds pasted patches on the README's example.

The example (README, "Anomaly localisation"): the first patched image of every Fashion-MNIST class
of the localisation table's benchmark (`diffpath.study.localization.write_example`), mapped with the
study's committed base model. The target: the median over the ten images of each image's pixel
AUROC (its map's values ranking the patch's pixels above the rest of the image) above 0.9.

Measured (CPU, the committed model): the defaults of today, the deterministic row at DIVAD's
scaled σ = 0.5 px, reach a median of 0.844 (3 of 10 images above 0.9); the same row at the table's
tuned σ = 3 px reaches 0.941 (6 of 10), the stochastic row (t0 = 0.3, 2 draws) at 3 px 0.942.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fashion_mnist_ddpm"


@pytest.mark.xfail(strict=True, reason="defaults change after the CLI merge")
def test_localize_defaults_rank_the_pasted_patch_first(tmp_path):
    from diffpath.cli import main
    from diffpath.scoring.metrics import pixel_auroc
    from diffpath.study.localization import write_example

    images = write_example(tmp_path / "example")
    assert main(["localize", "--model", str(MODEL), str(tmp_path / "example" / "images"),
                 "--out", str(tmp_path / "maps"), "--device", "cpu"]) == 0
    per_image = []
    for k, path in enumerate(images):
        amap = np.load(tmp_path / "maps" / f"{k:04d}_{path.stem}_map.npy")
        mask = np.asarray(Image.open(tmp_path / "example" / "masks" / path.name)) > 0
        per_image.append(pixel_auroc(amap[None], mask[None]))
    assert np.median(per_image) > 0.9, [round(v, 3) for v in per_image]
