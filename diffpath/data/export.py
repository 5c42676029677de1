"""Writing a registered data set's images as files: ``diffpath export-images`` (offline demo data).

``diffpath export-images fashion_mnist --split train --n 500 --out demo/normal`` writes images of
any registered data set (:func:`diffpath.data.load_split`) as PNG files, for trying
``diffpath fit`` / ``diffpath score`` offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffpath.io import atomic_path

__all__ = ["EXPORT_FORMATS", "export_images"]

#: ``--format`` → Pillow's format name.
EXPORT_FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP",
                                  "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP"}


def export_images(
    dataset: str,
    out: str | os.PathLike,
    *,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    fmt: str = "png",
) -> list[Path]:
    """Write images of a registered data set as files ``00000.png``, ``00001.png``, ... in the
    subset's order, each atomically with the usual permissions (:func:`diffpath.io.atomic_path`).

    The images are the split's uint8 arrays, (H, W) or (H, W, 3), unchanged. Returns the files.
    """
    from PIL import Image

    from diffpath.data import load_split

    fmt = fmt.lower().lstrip(".")
    pil_format = EXPORT_FORMATS.get(fmt)
    if pil_format is None:
        raise ValueError(f"unsupported export format {fmt!r}; choose png, jpg, bmp, tiff or webp")
    sp = load_split(dataset, split, n=n, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(len(sp) - 1, 0))))
    written = []
    for i, img in enumerate(sp.images):
        target = out / f"{i:0{width}d}.{fmt}"
        with atomic_path(target) as tmp:
            Image.fromarray(np.ascontiguousarray(img)).save(tmp, format=pil_format)
        written.append(target)
    return written
