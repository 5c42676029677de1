"""What every data module shares: the split type, the registry's record, checksums and resizing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Split", "DatasetInfo", "DatasetUnavailableError", "SPLITS", "checksum", "REPO_ROOT"]

SPLITS = ("train", "test")

REPO_ROOT = Path(__file__).resolve().parents[2]




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


