"""The synthetic anomaly benchmark (determinism, pinned checksum, structure) and the MVTec/VisA
loaders on tiny fake folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffpath.data.anomalies import DEFAULT_SOURCES, load_mvtec, load_visa, synthetic_anomalies

# Pinned: the benchmark with n_per_class=2 (20 images per base). A change means the recipe of
# diffpath.data.anomalies, or of the embedded sets it reads (diffpath.data), changed.
PINNED = {
    "fashion_mnist": "b15c5b5cd206bc04940f551e229350664316ea1a713e0686b36d9d9032a33793",
    "mnist": "33e4cf949afa6513f993544bd1d93c5fa2dff51fca19349447a1ca5c41826698",
}


@pytest.mark.parametrize("base", ["fashion_mnist", "mnist"])
def test_benchmark_is_deterministic_and_pinned(base):
    a = synthetic_anomalies(base, n_per_class=2)
    b = synthetic_anomalies(base, n_per_class=2)
    for field in ("images", "masks", "labels", "classes", "originals", "boxes", "sources"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.checksum() == PINNED[base]
    assert synthetic_anomalies(base, n_per_class=2, seed=1).checksum() != a.checksum()


def test_benchmark_structure():
    b = synthetic_anomalies("fashion_mnist", n_per_class=4)
    n = len(b)
    assert n == 40 and b.name == "fashion_mnist"
    assert b.images.dtype == np.uint8 and b.images.shape == (n, 28, 28)
    assert b.masks.dtype == bool and b.masks.shape == (n, 28, 28)
    assert b.labels.dtype == np.int64 and b.classes.dtype == np.int64
    assert np.bincount(b.classes).tolist() == [4] * 10
    assert np.bincount(b.labels).tolist() == [20, 20]
    assert len(b.class_names) == 10 and b.class_name_of()[0] == b.class_names[b.classes[0]]
    anom = b.labels == 1
    # normal images: untouched, empty mask, no box, no source
    assert not b.masks[~anom].any()
    np.testing.assert_array_equal(b.images[~anom], b.originals[~anom])
    assert (b.boxes[~anom] == -1).all() and set(b.sources[~anom]) == {""}
    # anomalous images: the mask is the box, pixels change only inside it, with real contrast
    assert set(b.sources[anom]) == set(DEFAULT_SOURCES["fashion_mnist"])
    for i in np.flatnonzero(anom):
        y, x, h, w = b.boxes[i]
        assert 7 <= h <= 12 and 7 <= w <= 12
        box = np.zeros((28, 28), bool)
        box[y : y + h, x : x + w] = True
        np.testing.assert_array_equal(b.masks[i], box)
        diff = np.abs(b.images[i].astype(int) - b.originals[i].astype(int))
        assert diff[~box].sum() == 0 and diff[box].mean() >= 40
    # nested in nothing but the seed: another base, other sources, other sizes
    m = synthetic_anomalies("mnist", n_per_class=2, sources=("noise",), patch_size=(5, 5))
    assert set(m.sources[m.labels == 1]) == {"noise"} and (m.boxes[m.labels == 1][:, 2:] == 5).all()
    with pytest.raises(ValueError):
        synthetic_anomalies("letters", 2)
    with pytest.raises(ValueError):
        synthetic_anomalies("mnist", 2, sources=("nope",))


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_load_mvtec_fake_layout(tmp_path):
    rng = np.random.default_rng(0)
    for cat in ("bottle", "cable"):
        _png(tmp_path / cat / "test" / "good" / "000.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        _png(tmp_path / cat / "test" / "crack" / "000.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        mask = np.zeros((20, 20), np.uint8)
        mask[5:10, 5:10] = 255
        _png(tmp_path / cat / "ground_truth" / "crack" / "000_mask.png", mask)
    (tmp_path / "license.txt").write_text("not a category")
    s = load_mvtec(tmp_path, size=8)
    assert s.name == "mvtec" and s.class_names == ("bottle", "cable")
    assert s.images.shape == (4, 8, 8, 3) and s.masks.shape == (4, 8, 8)
    assert s.labels.tolist() == [1, 0, 1, 0] and s.classes.tolist() == [0, 0, 1, 1]
    assert s.sources.tolist() == ["crack", "good", "crack", "good"]
    assert s.masks[0].sum() == 4 and not s.masks[1].any()
    assert load_mvtec(tmp_path, "cable", size=8).classes.tolist() == [0, 0]
    (tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError):
        load_mvtec(tmp_path, "bottle")


def test_load_visa_split_csv(tmp_path):
    rng = np.random.default_rng(1)
    img = lambda: rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)  # noqa: E731
    _png(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0000.JPG", img())
    _png(tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "0001.JPG", img())
    mask = np.zeros((12, 16), np.uint8)
    mask[:6] = 1
    _png(tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "0001.png", mask)
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/0001.JPG,candle/Data/Masks/Anomaly/0001.png\n"
    )
    s = load_visa(tmp_path, size=8)
    assert s.name == "visa" and s.class_names == ("candle",)
    assert s.labels.tolist() == [0, 1] and s.images.shape == (2, 8, 8, 3)
    assert not s.masks[0].any() and s.masks[1, :4].all() and not s.masks[1, 4:].any()
