"""MVTec AD and VisA from their release layouts, read as DIVAD reads them.

Layouts (the folders the releases unpack to, under the profile's download folder):

* **MVTec AD** (``mvtec_anomaly_detection/``, https://www.mvtec.com/company/research/datasets/mvtec-ad):
  ``<category>/train/good/*.png``, ``<category>/test/<defect>/<name>.png`` (``good`` = normal) and
  ``<category>/ground_truth/<defect>/<name>_mask.png``;
* **VisA** (``VisA_20220922/``, https://github.com/amazon-science/spot-diff): ``split_csv/1cls.csv``
  (columns ``object,split,label,image,mask``) and the files it names, e.g.
  ``candle/Data/Images/Anomaly/000.JPG`` and ``candle/Data/Masks/Anomaly/000.png``.

:func:`missing` lists what is not on disk, with where to get it; :func:`prepare` writes every
category's arrays (the profile's ``industrial_data`` stage). :func:`read_files` reads a
category's test images as DIVAD does: the diffusion model's input resized to ``model_size``²
(PIL's default bicubic, ``ddim_inversion.py``'s ``load_image``), the evaluation image to
``eval_size``² (PIL bilinear: ``test.py``'s torchvision ``Resize``), and the ground truth resized
bilinearly and thresholded at > 0 (``test.py`` resizes the mask like an image and its metrics count
any positive value as anomalous). Optional foreground masks (DIVAD: CutLER's) are read from
``<foreground_dir>/<category>/<defect>/<file name>_cutler.png.npz`` (``arr_0``, one or several
masks, united) or ``…/<stem>.png``, resized with nearest neighbour; DIVAD uses none for MVTec's
textures (:data:`NO_FOREGROUND`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpath.data.anomalies import AnomalyFile, mvtec_files, visa_files

__all__ = ["IndustrialBenchmark", "BENCHMARKS", "NO_FOREGROUND", "benchmark_files", "missing", "read_files",
           "prepare", "categories"]


@dataclass(frozen=True)
class IndustrialBenchmark:
    """A benchmark's release: its folder, categories and where to get it."""

    name: str
    folder: str
    categories: tuple[str, ...]
    url: str
    how: str


BENCHMARKS: dict[str, IndustrialBenchmark] = {
    "mvtec": IndustrialBenchmark(
        "mvtec", "mvtec_anomaly_detection",
        ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
         "tile", "toothbrush", "transistor", "wood", "zipper"),
        "https://www.mvtec.com/company/research/datasets/mvtec-ad",
        "download mvtec_anomaly_detection.tar.xz from {url} (free registration) and extract it into {root} "
        "(mkdir -p {root} && tar -xf mvtec_anomaly_detection.tar.xz -C {root})"),
    "visa": IndustrialBenchmark(
        "visa", "VisA_20220922",
        ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
         "pcb4", "pipe_fryum"),
        "https://github.com/amazon-science/spot-diff",
        "download VisA_20220922.tar (linked from {url}) and extract it into {root} (mkdir -p {root} && "
        "tar -xf VisA_20220922.tar -C {root}); split_csv/1cls.csv comes with it and with {url}"),
}
#: MVTec AD's texture categories (and zipper), for which DIVAD's test.py uses no foreground mask
NO_FOREGROUND = ("carpet", "leather", "wood", "tile", "zipper")


def _spec(name: str) -> IndustrialBenchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")
    return BENCHMARKS[name]


def benchmark_files(name: str, root: str | Path, categories: Sequence[str] | None = None) -> list[AnomalyFile]:
    """The test files of ``categories`` (None: the release's) of benchmark ``name`` under ``root``."""
    cats = list(categories) if categories else list(_spec(name).categories)
    return mvtec_files(root, cats) if name == "mvtec" else visa_files(root, cats)


def _missing_files(name: str, root: Path, cats: list[str]) -> list[str]:
    """The categories (or files) that a present release lacks."""
    if name == "visa":
        listed = {f.category for f in visa_files(root, cats)}
        absent = [c for c in cats if c not in listed]
        if absent:
            return [f"{root / 'split_csv/1cls.csv'} lists no test images of {', '.join(absent)}"]
        files = visa_files(root, cats)
    else:
        absent = [c for c in cats if not (root / c / "test").is_dir()]
        if absent:
            return [f"{', '.join(absent)} (expected {root}/<category>/test/<defect>/*.png)"]
        try:
            files = mvtec_files(root, cats)
        except FileNotFoundError as exc:
            return [str(exc)]
    gone = [str(p) for f in files for p in (f.image, f.mask) if p is not None and not p.is_file()]
    return [f"{len(gone)} files named by the release are missing, e.g. {gone[0]}"] if gone else []


def missing(name: str, root: str | Path, categories: Sequence[str] | None = None) -> list[str]:
    """One line per problem with benchmark ``name`` under ``root``, each saying where to get it."""
    spec, root = _spec(name), Path(root)
    cats = list(categories) if categories else list(spec.categories)
    where = spec.how.format(url=spec.url, root=root)
    layout_file = root / "split_csv" / "1cls.csv" if name == "visa" else root / cats[0] / "test"
    if not layout_file.exists() and not (name == "mvtec" and root.is_dir() and any(root.iterdir())):
        return [f"data: {name} is not in {root} (expected {layout_file}{'' if name == 'visa' else '/'}). "
                f"To fix: {where}"]
    return [f"data: {name}: {p}. To fix: {where}" for p in _missing_files(name, root, cats)]


def _resized(path: Path, size: int, mode: str, resample: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert(mode).resize((size, size), getattr(Image.Resampling, resample)))


def _foreground(folder: Path, f: AnomalyFile, size: int) -> np.ndarray:
    from PIL import Image

    base = folder / f.category / f.defect
    npz, png = base / f"{f.image.name}_cutler.png.npz", base / f"{f.image.stem}.png"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as z:
            m = np.asarray(z["arr_0"]).astype(bool)
        m = m.any(0) if m.ndim == 3 else m
    elif png.is_file():
        return _resized(png, size, "L", "NEAREST") > 0
    else:
        raise FileNotFoundError(f"no foreground mask for {f.image} (looked for {npz} and {png})")
    return np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST)).astype(bool)


def read_files(files: Sequence[AnomalyFile], *, model_size: int, eval_size: int, root: str | Path,
               foreground_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """A category's arrays (module docstring for the resizing rules):

    ``images`` (N, model_size, model_size, 3) uint8, ``eval_images`` (N, eval_size, eval_size, 3)
    uint8, ``masks`` (N, eval_size, eval_size) bool, ``foreground`` (same; all True without masks),
    ``labels`` (N,) int64, ``defects`` and ``names`` (N,) str (the image paths relative to ``root``).
    """
    fg = None if foreground_dir is None else Path(foreground_dir)
    E = int(eval_size)
    masks = [np.zeros((E, E), bool) if f.mask is None else _resized(f.mask, E, "L", "BILINEAR") > 0 for f in files]
    return {
        "images": np.stack([_resized(f.image, int(model_size), "RGB", "BICUBIC") for f in files]),
        "eval_images": np.stack([_resized(f.image, E, "RGB", "BILINEAR") for f in files]),
        "masks": np.stack(masks),
        "foreground": np.stack([np.ones((E, E), bool) if fg is None or f.category in NO_FOREGROUND
                                else _foreground(fg, f, E) for f in files]),
        "labels": np.asarray([f.label for f in files], dtype=np.int64),
        "defects": np.asarray([f.defect for f in files]).astype(str),
        "names": np.asarray([f.image.relative_to(root).as_posix() for f in files]).astype(str),
    }


def prepare(benchmark: str, root: str | Path, out_dir: str | Path, *, categories: Sequence[str] | None,
            model_size: int, eval_size: int, foreground_dir: str | Path | None = None) -> list[dict[str, object]]:
    """Write :func:`read_files`' arrays of every category to ``out_dir/<category>.npz`` and the
    order of the categories to ``out_dir/index.json``; returns the counts per category."""
    from diffpath.io import save_npz_atomic, write_json_atomic

    files = benchmark_files(benchmark, root, categories)
    out = Path(out_dir)
    order = list(dict.fromkeys(f.category for f in files))
    counts: list[dict[str, object]] = []
    for cat in order:
        arrays = read_files([f for f in files if f.category == cat], model_size=model_size, eval_size=eval_size,
                            root=root, foreground_dir=foreground_dir)
        save_npz_atomic(out / f"{cat}.npz", arrays)
        counts.append({"category": cat, "images": len(arrays["labels"]), "anomalous": int(arrays["labels"].sum()),
                       "defect types": len(set(arrays["defects"][arrays["labels"] == 1].tolist()))})
    write_json_atomic(out / "index.json", {"benchmark": benchmark, "categories": order,
                                           "model_size": int(model_size), "eval_size": int(eval_size)})
    return counts


def categories(prepared_dir: str | Path) -> list[str]:
    """The categories of a prepared benchmark, in the order :func:`prepare` wrote them."""
    import json

    return list(json.loads((Path(prepared_dir) / "index.json").read_text())["categories"])
