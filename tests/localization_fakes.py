"""Small fakes of the localisation paper profile's inputs in their real on-disk formats.

* MVTec AD: ``root/<category>/{train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``
  (PNG, masks 0/255), ``good`` the normal test folder;
* VisA: ``root/split_csv/1cls.csv`` (``object,split,label,image,mask``) and the files it names,
  ``<object>/Data/Images/{Normal,Anomaly}/NNN.JPG`` and ``<object>/Data/Masks/Anomaly/NNN.png``;
* a Stable Diffusion folder in diffusers' layout with tiny random parts: ``vae/``
  (``AutoencoderKL``), ``unet/`` (``UNet2DConditionModel``), ``text_encoder/`` (transformers'
  ``CLIPTextModel``), ``tokenizer/`` (a ``CLIPTokenizer`` built from a small vocabulary and merges
  written here: nothing is downloaded), ``scheduler/`` (Stable Diffusion 2.1-base's scheduler
  configuration) and ``model_index.json``;
* a ViT folder (transformers' ``ViTModel``, patch 8) standing in for DINO ViT-S/8.
"""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path

import numpy as np

__all__ = ["SD21_SCHEDULER", "write_fake_mvtec", "write_fake_visa", "write_tiny_stable_diffusion", "write_tiny_vit"]

#: Stable Diffusion 2.1-base's scheduler/scheduler_config.json (the values DIVAD's grids follow from)
SD21_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def _image(path: Path, rng: np.random.Generator, size: int, defect: tuple[int, int, int] | None = None) -> None:
    """A textured image (a colour gradient with noise); ``defect`` (y, x, side): a bright square."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([120 + 60 * yy, 90 + 80 * xx, 140 - 40 * yy * xx], -1) + rng.normal(0, 8, (size, size, 3))
    if defect is not None:
        y, x, s = defect
        img[y:y + s, x:x + s] = [250, 30, 30]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


def _mask(path: Path, size: int, defect: tuple[int, int, int]) -> None:
    from PIL import Image

    m = np.zeros((size, size), np.uint8)
    y, x, s = defect
    m[y:y + s, x:x + s] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def _defect(rng: np.random.Generator, size: int) -> tuple[int, int, int]:
    s = int(rng.integers(size // 8, size // 4))
    y, x = rng.integers(0, size - s, 2)
    return int(y), int(x), s


def write_fake_mvtec(root: Path, categories=("bottle", "screw"), n_good: int = 3, n_bad: int = 3, size: int = 48,
                     seed: int = 0) -> dict[str, int]:
    """MVTec AD's layout under ``root``; returns the test images per category."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        for i in range(2):
            _image(root / cat / "train" / "good" / f"{i:03d}.png", rng, size)
        for i in range(n_good):
            _image(root / cat / "test" / "good" / f"{i:03d}.png", rng, size)
        for i in range(n_bad):
            defect_type = ("crack", "scratch")[i % 2]
            name = f"{i // 2:03d}"
            d = _defect(rng, size)
            _image(root / cat / "test" / defect_type / f"{name}.png", rng, size, d)
            _mask(root / cat / "ground_truth" / defect_type / f"{name}_mask.png", size, d)
    return {c: n_good + n_bad for c in categories}


def write_fake_visa(root: Path, categories=("candle", "pcb1"), n_normal: int = 3, n_anomaly: int = 3, size: int = 48,
                    seed: int = 1) -> dict[str, int]:
    """VisA's layout (``split_csv/1cls.csv`` and the files it names) under ``root``."""
    rng = np.random.default_rng(seed)
    rows = []
    for cat in categories:
        base = Path(cat) / "Data"
        for i in range(n_normal + 2):
            rel = base / "Images" / "Normal" / f"{i:04d}.JPG"
            _image(root / rel, rng, size)
            rows.append([cat, "train" if i < 2 else "test", "normal", rel.as_posix(), ""])
        for i in range(n_anomaly):
            rel, mrel = base / "Images" / "Anomaly" / f"{i:03d}.JPG", base / "Masks" / "Anomaly" / f"{i:03d}.png"
            d = _defect(rng, size)
            _image(root / rel, rng, size, d)
            _mask(root / mrel, size, d)
            rows.append([cat, "test", "anomaly", rel.as_posix(), mrel.as_posix()])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return {c: n_normal + n_anomaly for c in categories}


def _tokenizer(folder: Path, max_length: int) -> int:
    """A CLIP BPE tokenizer over lower-case letters, digits and ``_-!.`` (each its own token,
    plus a few merges), saved to ``folder``; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + "_-!.")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["a n</w>", "i m", "a g", "ag e</w>"]
    for tok in ("an</w>", "im", "ag", "age</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    src = folder.parent / "tokenizer_source"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return len(vocab)


def write_tiny_stable_diffusion(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A diffusers Stable Diffusion folder with tiny random parts (module docstring)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    n_vocab = _tokenizer(folder / "tokenizer", max_length=32)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=4, sample_size=image_size).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         norm_num_groups=4, attention_head_dim=4).save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32, bos_token_id=n_vocab - 2,
                                 eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)).save_pretrained(
        folder / "text_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def write_tiny_vit(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A transformers ViT folder (patch 8, 16 features, one layer) standing in for DINO ViT-S/8."""
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder
