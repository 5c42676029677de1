"""The localisation table's maps, for the table (notebook 30) and for one image (notebook 35).

Both notebooks call :func:`table_maps` with the ``localization`` section of ``params.yaml`` (seed,
batch size, smoothing, ...), so the walkthrough's maps of an image are the table's maps of that
image, bit for bit: a stochastic row's noise depends on the batch an image sits in
(:func:`~diffpath.methods.localization.batch_generator`), and :func:`table_maps` with ``image``
runs exactly that batch (:func:`batch_maps` returns all of it: the walkthrough's threshold comes
from the normal images beside it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffpath.core.sampling import StepCallback
from diffpath.data import to_model_input
from diffpath.data.anomalies import AnomalySet, synthetic_anomalies
from diffpath.methods.localization import LocalizationResult, MapSpec, localize

__all__ = ["table_maps", "batch_maps", "write_example"]


def _one_image(callback: StepCallback | None, k: int) -> StepCallback | None:
    """``callback`` seeing every (B, C, H, W) tensor of a step dict cut to row ``k`` (1, C, H, W)."""
    if callback is None:
        return None
    return lambda step: callback({key: v[k : k + 1] if isinstance(v, torch.Tensor) and v.ndim == 4 else v
                                  for key, v in step.items()})


def table_maps(
    model: Any,
    bench: AnomalySet,
    spec: MapSpec,
    *,
    seed: int,
    batch_size: int,
    feature_t: int = 50,
    feature_layers: Sequence[str] | None = None,
    smooth_sigma: float | None = None,
    pool: int | None = None,
    weights: Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
    image: int | None = None,
    callback: StepCallback | None = None,
) -> LocalizationResult:
    """One row (``spec``) of the localisation table on a benchmark: maps on the images' own grid.

    Args:
        model: the ε-model (its ``image_size`` and ``channels`` shape the input).
        bench: the benchmark (``synthetic_anomalies(name, n_per_class, seed=seed, part=part)``).
        spec: the row.
        seed, batch_size, feature_t, feature_layers, smooth_sigma, pool, weights: the table's
            settings (params.yaml ``localization``), as :func:`~diffpath.methods.localization.localize`.
        scales: set-level scales of ``"combined"`` (default: over the images mapped; with
            ``image``, pass the table's ``scales``).
        image: map only this image, inside the batch that holds it in the table; the result's
            maps are then (1, H, W).
        callback: sees every step dict of the round trips (with ``image``: cut to that image).

    Returns:
        :class:`~diffpath.methods.localization.LocalizationResult` of every image (or of ``image``).
    """
    kw: dict[str, Any] = {"seed": seed, "batch_size": batch_size, "feature_t": feature_t,
                          "feature_layers": feature_layers, "smooth_sigma": smooth_sigma, "pool": pool,
                          "weights": weights, "scales": scales, "callback": callback}
    if image is None:
        x0 = to_model_input(bench.images, size=model.image_size, channels=model.channels)
        return localize(model, x0, spec, out_size=bench.images.shape[1:3], **kw)
    res, k = batch_maps(model, bench, spec, image, **kw)
    return res.take([k])


def batch_maps(model: Any, bench: AnomalySet, spec: MapSpec, image: int, *, seed: int, batch_size: int,
               scales: Mapping[str, float] | None = None, callback: StepCallback | None = None,
               **table: Any) -> tuple[LocalizationResult, int]:
    """The table's maps of the whole batch that holds ``image`` (as :func:`table_maps` with
    ``image``, which takes that image's row of this result), and the image's position in it.

    The batch is images ``lo … lo + batch_size − 1`` with ``lo = image // batch_size · batch_size``,
    its maps (B, H, W) those of the table; ``callback`` sees the steps cut to ``image``.
    ``table``: the other settings of :func:`table_maps`.
    """
    if not 0 <= int(image) < len(bench):
        raise IndexError(f"image {image} is not in the benchmark ({len(bench)} images)")
    if "combined" in spec.maps and scales is None:
        raise ValueError("the combined map of one image needs the table's set-level scales (scales=)")
    x0 = to_model_input(bench.images, size=model.image_size, channels=model.channels)
    lo = int(image) // int(batch_size) * int(batch_size)
    k = int(image) - lo
    res = localize(model, x0[lo : lo + batch_size], spec, first_index=lo, seed=seed, batch_size=batch_size,
                   scales=scales, callback=_one_image(callback, k), out_size=bench.images.shape[1:3], **table)
    return res, k


def write_example(folder: str | Path, dataset: str = "fashion_mnist", n_per_class: int = 60,
                  seed: int = 0) -> list[Path]:
    """Images to try ``diffpath localize`` on: the first patched image of every class of the
    table's benchmark, as ``folder/images/NN_<class>.png``, with its ground truth as
    ``folder/masks/NN_<class>.png`` (255 on the patch). Returns the image paths."""
    from PIL import Image

    bench = synthetic_anomalies(dataset, n_per_class=n_per_class, seed=seed)
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    paths = []
    for c, name in enumerate(bench.class_names):
        i = int(np.flatnonzero((bench.labels == 1) & (bench.classes == c))[0])
        stem = f"{c:02d}_" + "".join(ch if ch.isalnum() else "_" for ch in name)
        Image.fromarray(bench.images[i]).save(out / "images" / f"{stem}.png")
        Image.fromarray(bench.masks[i].astype(np.uint8) * 255).save(out / "masks" / f"{stem}.png")
        paths.append(out / "images" / f"{stem}.png")
    return paths
