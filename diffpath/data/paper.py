"""The paper sets, read from the on-disk layout torchvision's downloaders produce (downloaded through
torchvision only when missing): CIFAR-10/100, SVHN, CelebA and DTD."""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from diffpath.data.base import REPO_ROOT, DatasetUnavailableError, Split, _pil

__all__ = ["CELEBA_CROP", "default_root", "load_paper_split"]



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
    return Path(env) if env else REPO_ROOT / "data" / "downloads"


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




def load_paper_split(name: str, split: str, root: Path, download: bool, size: int):
    """The whole split of a paper set: a :class:`Split`, or a lazily decoded one for CelebA / DTD."""
    if name in ("cifar10", "cifar100"):
        return _cifar(name, split, root, download)
    if name == "svhn":
        return _svhn(split, root, download)
    if name == "celeba":
        return _celeba(split, root, download, size)
    return _dtd(split, root, download, size)
