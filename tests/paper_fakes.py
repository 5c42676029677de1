"""Small fakes of the paper profile's inputs in their real on-disk formats.

* CIFAR-10 (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``) and CIFAR-100
  (``cifar-100-python/train``, ``test``, ``meta`` with ``fine_labels``): protocol-2 pickles of
  dicts with ``data`` (N×3072 uint8, channel-major) and the labels;
* SVHN ``train_32x32.mat`` / ``test_32x32.mat``: ``X`` of shape 32×32×3×N, ``y`` (N×1) in 1..10;
* CelebA ``celeba/img_align_celeba/*.jpg`` (178×218) and ``celeba/list_eval_partition.txt``;
* DTD ``dtd/dtd/images/<class>/*.jpg`` with ``dtd/dtd/labels/{train,val,test}1.txt``;
* an improved-diffusion checkpoint (a state dict ``.pt``) with its settings ``.json`` beside it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np

__all__ = ["write_fake_downloads", "write_tiny_checkpoint", "TINY_SETTINGS"]

TINY_SETTINGS = {"image_size": 32, "channel_mult": [1, 2], "num_channels": 32, "num_res_blocks": 1,
                 "num_heads": 2, "attention_resolutions": "16", "learn_sigma": True, "diffusion_steps": 4000,
                 "noise_schedule": "cosine", "dropout": 0.3, "use_zero_module": True}


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def _jpeg(path: Path, rng: np.random.Generator, w: int, h: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (1, 1, 3))
    img = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def write_fake_downloads(root: Path, n_train: int = 10, n_test: int = 6, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write every paper set under ``root`` as torchvision leaves it; returns the split sizes."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    per_batch = -(-n_train // 5)
    c10 = root / "cifar-10-batches-py"
    for i in range(1, 6):
        _dump(c10 / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "data": _cifar_rows(rng, per_batch),
                                        "labels": rng.integers(0, 10, per_batch).tolist(), "filenames": []})
    _dump(c10 / "test_batch", {"batch_label": "testing batch 1 of 1", "data": _cifar_rows(rng, n_test),
                               "labels": rng.integers(0, 10, n_test).tolist(), "filenames": []})
    _dump(c10 / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch,
                                 "num_vis": 3072})
    c100 = root / "cifar-100-python"
    for split, n in (("train", n_train), ("test", n_test)):
        _dump(c100 / split, {"data": _cifar_rows(rng, n), "fine_labels": rng.integers(0, 100, n).tolist(),
                             "coarse_labels": rng.integers(0, 20, n).tolist(), "filenames": []})
    _dump(c100 / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                          "coarse_label_names": [f"k{i}" for i in range(20)]})
    for split, n in (("train", n_train), ("test", n_test)):
        savemat(str(root / f"{split}_32x32.mat"),
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                 "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    celeba = root / "celeba"
    lines = []
    for k, part in enumerate([0] * n_train + [1] * 2 + [2] * n_test, start=1):
        name = f"{k:06d}.jpg"
        _jpeg(celeba / "img_align_celeba" / name, rng, 178, 218)
        lines.append(f"{name} {part}")
    (celeba / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    dtd = root / "dtd" / "dtd"
    classes = ["banded", "dotted"]
    counts = {"train": n_train, "val": 2, "test": n_test}
    k = 0
    for split, n in counts.items():
        rel = []
        for j in range(n):
            cls = classes[j % 2]
            k += 1
            r = f"{cls}/{cls}_{k:04d}.jpg"
            _jpeg(dtd / "images" / r, rng, 64 + 8 * (k % 3), 48 + 4 * (k % 5))
            rel.append(r)
        (dtd / "labels").mkdir(parents=True, exist_ok=True)
        (dtd / "labels" / f"{split}1.txt").write_text("\n".join(rel) + "\n")
    return {name: {"train": n_train, "test": n_test} for name in ("cifar10", "cifar100", "svhn", "celeba",
                                                                   "textures_dtd")}


def write_tiny_checkpoint(path: Path, seed: int = 0, settings: dict | None = None) -> Path:
    """A random improved-diffusion UNet's state dict at ``path`` (``.pt``), settings beside it."""
    import torch

    from diffpath.models.improved_unet import build_from_settings, resolve_settings

    settings = dict(settings or TINY_SETTINGS)
    torch.manual_seed(seed)
    net = build_from_settings(resolve_settings(settings))
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
             for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    path.with_suffix(".json").write_text(json.dumps(settings))
    return path
