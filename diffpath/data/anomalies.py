"""Anomaly-localisation benchmarks: an offline synthetic one, and loaders for MVTec AD and VisA.

Synthetic benchmark (:func:`synthetic_anomalies`)
-------------------------------------------------
Built deterministically, offline, from the embedded sets of :mod:`diffpath.data` (read only):
test images of a *base* set (``fashion_mnist`` or ``mnist``), half of them left untouched (normal,
mask all zero) and half with one rectangular patch of *foreign* content pasted in (anomalous, mask
= the rectangle). Recipe, per class ``c`` of the base set (all classes, ascending):

1. ``n_per_class`` test images of class ``c``: positions ``part·n_per_class`` …
   ``(part+1)·n_per_class − 1`` of ``default_rng([seed, base_code, c]).permutation(<indices of
   class c>)``. Different ``part`` values of one seed are therefore *disjoint* image sets (the study
   chooses its settings on ``part=1`` and reports on ``part=0``).
2. The first ``round(anomalous_fraction · n_per_class)`` of them (at least 1 and at most
   ``n_per_class − 1`` when ``n_per_class ≥ 2``) become anomalous; the j-th anomalous image of class
   ``c`` takes its patch from ``sources[(c + j) % len(sources)]``, so every source appears in
   every class once there are enough images.
3. Per anomalous image, all draws come from ``default_rng([seed, base_code, c, j, 1])`` (with
   ``part`` appended when ``part > 0``): patch
   height and width uniform in ``patch_size`` (inclusive), a position whose patch centre lies on
   the base image's foreground bounding box (pixels > 0), a source image (test split) and its
   content:

   * ``textures`` / ``noise`` (28×28 gray) and ``photos`` (32×32 RGB, ITU-R 601 luma): a random
     crop of the patch's size (the texture itself is the anomaly);
   * ``mnist`` / ``letters`` / ``fashion_mnist`` / ``digits`` / ``faces`` (centred objects): the
     central 20×20 of the source image resized (PIL bilinear) to the patch (a small foreign
     object on its own background).

   A draw is kept when the mean absolute difference between the patch and the pixels it replaces
   is at least ``min_contrast`` grey levels; otherwise the draw is repeated (from the same
   generator, so still deterministic), at most 50 times.

``DEFAULT_SOURCES``: ``textures``, ``photos``, ``mnist``, ``noise`` for ``fashion_mnist``; the same
with ``letters`` in place of ``mnist`` for ``mnist`` itself. Images keep the base set's 28×28; the
model input is padded to 32 by :func:`diffpath.data.to_model_input` and the maps are cropped back
(:func:`diffpath.methods.localization.to_image_grid`), so metrics are computed on the 28×28 grid.

MVTec AD / VisA (:func:`load_mvtec`, :func:`load_visa`; for online users with the files)
-----------------------------------------------------------------------------------------
* MVTec AD: ``root/<category>/test/<defect>/<name>.png`` with ``good`` the normal folder, and
  ``root/<category>/ground_truth/<defect>/<name>_mask.png``.
* VisA: the official ``root/split_csv/1cls.csv`` (columns ``object,split,label,image,mask``, paths
  relative to ``root``; ``label`` is ``normal`` or ``anomaly``), as in the VisA release; or, when
  that file is missing, the MVTec-like layout that many reprocessing scripts write
  (``root/<category>/test/{good,bad}/…`` with masks ``ground_truth/bad/<name>.png``).

Both return images resized (PIL bilinear) to ``size``×``size`` RGB and masks resized with nearest
neighbour, as an :class:`AnomalySet` whose ``classes`` index ``class_names`` (the categories).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AnomalySet",
    "DEFAULT_SOURCES",
    "SYNTHETIC_BASES",
    "synthetic_anomalies",
    "load_mvtec",
    "load_visa",
    "AnomalyFile",
    "mvtec_files",
    "visa_files",
]

SYNTHETIC_BASES: tuple[str, ...] = ("fashion_mnist", "mnist")
DEFAULT_SOURCES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("textures", "photos", "mnist", "noise"),
    "mnist": ("textures", "photos", "letters", "noise"),
}
_CROP_SOURCES = ("textures", "noise", "photos")
_OBJECT_SOURCES = ("mnist", "letters", "fashion_mnist", "digits", "faces")
_BASE_CODE = {"fashion_mnist": 1, "mnist": 2}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass
class AnomalySet:
    """Images with pixel-level ground truth.

    Attributes:
        name: the benchmark's name (the base set, or ``mvtec`` / ``visa``).
        images: uint8 (N, H, W) or (N, H, W, 3).
        masks: bool (N, H, W), True on anomalous pixels (all False for normal images).
        labels: int64 (N,), 1 anomalous / 0 normal.
        classes: int64 (N,), index into ``class_names`` (the base set's label).
        class_names: name of each class.
        sources: (N,) str, the set a pasted patch came from ('' for normal images), or the defect
            type for MVTec/VisA.
        originals: uint8 like ``images``: the images before pasting (the oracle "normal"
            reconstruction; equal to ``images`` for real benchmarks).
        boxes: int64 (N, 4) ``y, x, h, w`` of the pasted patch (−1 for normal / real images).
    """

    name: str
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    class_names: tuple[str, ...]
    sources: np.ndarray
    originals: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def checksum(self) -> str:
        """SHA-256 over images, masks, labels and classes (see :func:`diffpath.data.checksum`)."""
        from diffpath.data import checksum

        h = hashlib.sha256()
        for arr in (self.images, self.masks.astype(np.uint8), self.labels, self.classes):
            h.update(checksum(arr).encode())
        return h.hexdigest()

    def class_name_of(self) -> np.ndarray:
        """(N,) the class name of every image."""
        return np.asarray([self.class_names[c] for c in self.classes])


def _luma(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3:
        from diffpath.data import rgb_to_luma

        return rgb_to_luma(img[..., :3])
    return img


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.BILINEAR))


def _patch_content(source: str, src: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = _luma(src)
    if source in _OBJECT_SOURCES:
        H, W = img.shape
        c = 20 if min(H, W) >= 20 else min(H, W)
        y0, x0 = (H - c) // 2, (W - c) // 2
        return _resize(img[y0 : y0 + c, x0 : x0 + c], h, w)
    H, W = img.shape
    if H < h or W < w:
        img = _resize(img, max(H, h), max(W, w))
        H, W = img.shape
    y = int(rng.integers(H - h + 1))
    x = int(rng.integers(W - w + 1))
    return img[y : y + h, x : x + w]


def _foreground_box(img: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(img > 0)
    if len(ys) == 0:
        return 0, 0, img.shape[0] - 1, img.shape[1] - 1
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def _checked_recipe(base: str, sources: Sequence[str] | None, patch_size: tuple[int, int], n_per_class: int,
                    part: int, anomalous_fraction: float) -> tuple[tuple[str, ...], tuple[int, int], int]:
    """The patch sources, the (min, max) patch side and the number of anomalous images per class
    (step 2 of the recipe), after checking every argument."""
    if base not in _BASE_CODE:
        raise ValueError(f"unknown base {base!r}; choose one of {', '.join(SYNTHETIC_BASES)}")
    srcs = tuple(DEFAULT_SOURCES[base] if sources is None else sources)
    bad = [s for s in srcs if s not in _CROP_SOURCES + _OBJECT_SOURCES]
    if not srcs or bad:
        raise ValueError(f"unsupported sources {bad or srcs}; use {_CROP_SOURCES + _OBJECT_SOURCES}")
    lo, hi = int(patch_size[0]), int(patch_size[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"patch_size must satisfy 1 <= min <= max, got {patch_size}")
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    if part < 0:
        raise ValueError(f"part must be >= 0, got {part}")
    n_anom = int(round(anomalous_fraction * n_per_class))
    if n_per_class >= 2:
        n_anom = min(max(n_anom, 1), n_per_class - 1)
    return srcs, (lo, hi), n_anom


def _class_images(labels: np.ndarray, c: int, seed: int, base: str, n_per_class: int, part: int,
                  split: str) -> np.ndarray:
    """Step 1 of the recipe: indices of the ``part``-th block of ``n_per_class`` images of class c."""
    idx = np.flatnonzero(labels == c)
    lo_i, hi_i = part * n_per_class, (part + 1) * n_per_class
    if len(idx) < hi_i:
        raise ValueError(f"class {c} of {base} has only {len(idx)} {split} images "
                         f"(part {part} of {n_per_class} per class needs {hi_i})")
    return idx[np.random.default_rng([seed, _BASE_CODE[base], c]).permutation(len(idx))[lo_i:hi_i]]


def _paste(orig: np.ndarray, source: str, pool: np.ndarray, rng: np.random.Generator, side: tuple[int, int],
           min_contrast: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Step 3 of the recipe: ``orig`` (H, W) with one patch of ``source`` pasted on its foreground;
    returns the image, the (H, W) bool mask and the box ``(y, x, h, w)``."""
    H, W = orig.shape
    fy0, fx0, fy1, fx1 = _foreground_box(orig)
    for _ in range(50):
        h = int(rng.integers(side[0], side[1] + 1))
        w = int(rng.integers(side[0], side[1] + 1))
        cy = int(rng.integers(fy0, fy1 + 1))
        cx = int(rng.integers(fx0, fx1 + 1))
        y = min(max(cy - h // 2, 0), H - h)
        x = min(max(cx - w // 2, 0), W - w)
        patch = _patch_content(source, pool[int(rng.integers(len(pool)))], h, w, rng)
        region = orig[y : y + h, x : x + w].astype(np.float64)
        if np.mean(np.abs(patch.astype(np.float64) - region)) >= min_contrast:
            break
    img = orig.copy()
    mask = np.zeros((H, W), dtype=bool)
    img[y : y + h, x : x + w] = patch
    mask[y : y + h, x : x + w] = True
    return img, mask, (y, x, h, w)


def synthetic_anomalies(
    base: str = "fashion_mnist",
    n_per_class: int = 8,
    *,
    anomalous_fraction: float = 0.5,
    sources: Sequence[str] | None = None,
    patch_size: tuple[int, int] = (7, 12),
    min_contrast: float = 40.0,
    seed: int = 0,
    split: str = "test",
    part: int = 0,
) -> AnomalySet:
    """The synthetic pasted-patch benchmark on ``base`` (see the module docstring).

    Args:
        base: ``"fashion_mnist"`` or ``"mnist"``.
        n_per_class: images per class (normal + anomalous); 10 classes each.
        anomalous_fraction: share of anomalous images per class.
        sources: sets the patches come from (default :data:`DEFAULT_SOURCES` of ``base``).
        patch_size: (min, max) side of the pasted rectangle in pixels, inclusive.
        min_contrast: minimum mean |patch − replaced pixels| in grey levels.
        seed: the benchmark's seed.
        split: split of the base set and the sources.
        part: which disjoint block of each class's permutation to take (0: the first).

    Returns:
        :class:`AnomalySet` ordered by class, anomalous images first within a class.
    """
    from diffpath.data import load_split

    srcs, side, n_anom = _checked_recipe(base, sources, patch_size, n_per_class, part, anomalous_fraction)
    full = load_split(base, split)
    H, W = full.images.shape[1:3]
    if side[1] > min(H, W):
        raise ValueError(f"patch_size max {side[1]} exceeds the image size {H}×{W}")
    src_images = {s: load_split(s, split).images for s in dict.fromkeys(srcs)}
    code = _BASE_CODE[base]
    rows: dict[str, list] = {k: [] for k in ("images", "masks", "labels", "classes", "sources", "originals", "boxes")}
    for c in np.unique(full.labels).tolist():
        for j, i in enumerate(_class_images(full.labels, c, seed, base, n_per_class, part, split).tolist()):
            orig = np.asarray(full.images[i])
            img, mask, box, src_name = orig.copy(), np.zeros((H, W), dtype=bool), (-1, -1, -1, -1), ""
            if j < n_anom:  # step 2: the first n_anom of a class get a patch
                src_name = srcs[(c + j) % len(srcs)]
                rng = np.random.default_rng([seed, code, c, j, 1] + ([part] if part else []))
                img, mask, box = _paste(orig, src_name, src_images[src_name], rng, side, min_contrast)
            for k, v in zip(rows, (img, mask, int(j < n_anom), c, src_name, orig, box)):
                rows[k].append(v)
    return _assembled(base, rows)


def _assembled(base: str, rows: dict[str, list]) -> AnomalySet:
    """The benchmark from its per-image rows (in the order they were made)."""
    names = FASHION_MNIST_CLASSES if base == "fashion_mnist" else tuple(str(d) for d in range(10))
    return AnomalySet(
        name=base,
        images=np.stack(rows["images"]).astype(np.uint8),
        masks=np.stack(rows["masks"]),
        labels=np.asarray(rows["labels"], dtype=np.int64),
        classes=np.asarray(rows["classes"], dtype=np.int64),
        class_names=tuple(names),
        sources=np.asarray(rows["sources"], dtype=object).astype(str),
        originals=np.stack(rows["originals"]).astype(np.uint8),
        boxes=np.asarray(rows["boxes"], dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------------
# real benchmarks (files on disk)

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".JPG", ".PNG")


def _read_rgb(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def _read_mask(path: Path | None, size: int) -> np.ndarray:
    if path is None:
        return np.zeros((size, size), dtype=bool)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0


@dataclass(frozen=True)
class AnomalyFile:
    """One test image of a real benchmark, as its release lays it out.

    Attributes:
        image: the image file.
        mask: its ground-truth mask file (None for a normal image).
        label: 1 anomalous, 0 normal.
        defect: the defect folder (``good`` for normal MVTec images) or VisA's label.
        category: the object category (the folder under the root, VisA's ``object``).
    """

    image: Path
    mask: Path | None
    label: int
    defect: str
    category: str


def _assemble(name: str, items: list[AnomalyFile], class_names: Sequence[str], size: int) -> AnomalySet:
    if not items:
        raise FileNotFoundError(f"{name}: no test images found")
    images = np.stack([_read_rgb(f.image, size) for f in items])
    masks = np.stack([_read_mask(f.mask, size) for f in items])
    return AnomalySet(
        name=name,
        images=images,
        masks=masks,
        labels=np.asarray([f.label for f in items], dtype=np.int64),
        classes=np.asarray([list(class_names).index(f.category) for f in items], dtype=np.int64),
        class_names=tuple(class_names),
        sources=np.asarray([f.defect for f in items]).astype(str),
        originals=images,
        boxes=np.full((len(items), 4), -1, dtype=np.int64),
    )


def _categories(root: Path, categories: str | Sequence[str] | None) -> list[str]:
    if categories is None:
        return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    return [categories] if isinstance(categories, str) else list(categories)


def _mvtec_like_files(root: Path, cats: list[str], name: str, mask_suffix: str) -> list[AnomalyFile]:
    items: list[AnomalyFile] = []
    for cat in cats:
        test = root / cat / "test"
        if not test.is_dir():
            raise FileNotFoundError(f"{test}: missing (expected {name} layout root/<category>/test/<defect>/)")
        for defect in sorted(p.name for p in test.iterdir() if p.is_dir()):
            normal = defect in ("good", "ok", "normal")
            for img in sorted(p for p in (test / defect).iterdir() if p.suffix in _IMAGE_EXT):
                mask = None
                if not normal:
                    gt = root / cat / "ground_truth" / defect
                    cands = [gt / f"{img.stem}{mask_suffix}{ext}" for ext in (".png", ".bmp", ".jpg")]
                    mask = next((c for c in cands if c.is_file()), None)
                    if mask is None:
                        raise FileNotFoundError(f"{img}: no ground-truth mask (looked for {cands[0]})")
                items.append(AnomalyFile(img, mask, int(not normal), defect, cat))
    return items


def mvtec_files(root: str | Path, categories: str | Sequence[str] | None = None) -> list[AnomalyFile]:
    """The MVTec AD test images and their masks (layout: the module docstring), category by
    category, defects and files sorted by name. ``categories``: one, several, or None for every
    folder with a ``test/`` inside."""
    root = Path(root)
    return _mvtec_like_files(root, _categories(root, categories), "mvtec", "_mask")


def visa_files(root: str | Path, categories: str | Sequence[str] | None = None) -> list[AnomalyFile]:
    """The VisA test images and their masks, from ``split_csv/1cls.csv`` (in its row order) or,
    without that file, an MVTec-like layout."""
    root = Path(root)
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        return _mvtec_like_files(root, _categories(root, categories), "visa", "")
    with table.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split", "").strip() == "test"]
    cats = sorted({r["object"] for r in rows}) if categories is None else _categories(root, categories)
    items: list[AnomalyFile] = []
    for r in rows:
        if r["object"] not in cats:
            continue
        anomalous = r["label"].strip().lower() == "anomaly"
        mask = (root / r["mask"].strip()) if anomalous and r.get("mask", "").strip() else None
        items.append(AnomalyFile(root / r["image"].strip(), mask, int(anomalous), r["label"].strip(), r["object"]))
    return items


def load_mvtec(root: str | Path, categories: str | Sequence[str] | None = None, *, size: int = 256) -> AnomalySet:
    """MVTec AD test images and masks (see the module docstring for the layout).

    Args:
        root: the folder holding one sub-folder per category.
        categories: one category, several, or None for every folder with a ``test/`` inside.
        size: output side (bilinear for images, nearest for masks).
    """
    cats = _categories(Path(root), categories)
    return _assemble("mvtec", mvtec_files(root, cats), cats, size)


def load_visa(root: str | Path, categories: str | Sequence[str] | None = None, *, size: int = 256) -> AnomalySet:
    """VisA test images and masks, from ``split_csv/1cls.csv`` or an MVTec-like layout."""
    items = visa_files(root, categories)
    cats = sorted({f.category for f in items}) if categories is None else _categories(Path(root), categories)
    return _assemble("visa", items, cats, size)
