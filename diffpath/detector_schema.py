"""The schema of ``detector.json``: every field a detector folder declares, checked before use.

Detector folders are shared, so nothing in them is trusted: :func:`parse_meta` checks each field's
type and range (integers are integers, numbers finite, names known, sizes within the model limits)
and the fields against each other (the preprocessing against the model's size, the method's family,
dimensions and scorer kind, the calibration sizes against the accept fraction and the threshold's
rank). A bad field is a :class:`DetectorError` naming the file and the field, e.g.
``…/detector.json: threshold.accept must be a number in (0, 1], got 5``. The arrays the JSON
describes are checked against these sizes when they are read (:mod:`diffpath.detector_folder`).

The result, :class:`DetectorMeta`, is what the detector uses; the JSON itself is kept as
``Detector.meta_``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffpath.data.files import ALPHA_MODES, RESIZE_MODES, Preprocessing
from diffpath.models.validate import MAX_IMAGE_SIZE, MAX_TIMESTEPS
from diffpath.scoring.threshold import calibration_size

__all__ = ["CalibrationInfo", "DetectorError", "DetectorMeta", "FeaturesInfo", "ModelInfo",
           "ThresholdInfo", "parse_meta"]

MAX_STEPS = 10_000
_HEX = re.compile(r"[0-9a-f]{8,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DetectorError(ValueError):
    """A detector folder that cannot be used (missing, incompatible, corrupt, or its model changed)."""


class _Section:
    """One JSON object of ``detector.json`` (``name`` in dotted form), read field by field."""

    def __init__(self, obj: Any, name: str, file: Path):
        self.name, self.file = name, file
        if not isinstance(obj, Mapping):
            raise self._error("", "a JSON object", obj)
        self.obj = obj

    def _error(self, key: str, must: str, value: Any) -> DetectorError:
        field = f"{self.name}.{key}" if self.name and key else (self.name or key)
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return DetectorError(f"{self.file}: {field} must be {must}, got {shown}")

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise DetectorError(f"{self.file}: {self.name + '.' if self.name else ''}{key} is missing; "
                                "refit the detector with `diffpath fit`")
        return self.obj[key]

    def section(self, key: str) -> _Section:
        return _Section(self._get(key), f"{self.name}.{key}" if self.name else key, self.file)

    def int(self, key: str, lo: int, hi: int) -> int:
        v = self._get(key)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not lo <= v <= hi:
            raise self._error(key, f"an integer in [{lo}, {hi}]", v)
        return int(v)

    def number(self, key: str, lo: float, hi: float, *, open_lo: bool = False, null: bool = False) -> float | None:
        v = self._get(key)
        if v is None and null:
            return None
        ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
              and (lo < v if open_lo else lo <= v) and v <= hi)
        if not ok:
            interval = f" in {'(' if open_lo else '['}{lo:g}, {hi:g}]" if math.isfinite(lo) or math.isfinite(hi) else ""
            raise self._error(key, f"a finite number{interval}" + (" or null" if null else ""), v)
        return float(v)

    def str(self, key: str, choices: tuple[str, ...] | None = None, *, pattern: re.Pattern | None = None,
            null: bool = False) -> str | None:
        v = self._get(key)
        if v is None and null:
            return None
        if not isinstance(v, str) or len(v) > 4096 or (choices is not None and v not in choices) \
                or (pattern is not None and not pattern.fullmatch(v)):
            must = f"one of {', '.join(choices)}" if choices else "a string" + (" of hex digits" if pattern else "")
            raise self._error(key, must, v)
        return v

    def bool(self, key: str) -> bool:
        v = self._get(key)
        if not isinstance(v, bool):
            raise self._error(key, "true or false", v)
        return v

    def int_list(self, key: str, lo: int, hi: int, *, min_len: int = 0) -> tuple[int, ...]:
        v = self._get(key)
        if not isinstance(v, list) or not min_len <= len(v) <= MAX_STEPS or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) and lo <= t <= hi for t in v):
            raise self._error(key, f"a list of {min_len} to {MAX_STEPS} integers in [{lo}, {hi}]", v)
        return tuple(int(t) for t in v)


@dataclass(frozen=True)
class ModelInfo:
    """``model``: the spec as given, its absolute path, kind, size, channels and fingerprint."""

    spec: str
    resolved: str | None
    kind: str
    image_size: int
    channels: int
    fingerprint: str


@dataclass(frozen=True)
class FeaturesInfo:
    """``features``: the method and the settings of its model pass."""

    method: str
    family: str
    dims: int
    steps: int
    seed: int
    clip_denoised: bool
    noise_key: str
    clip_x0_hat: bool
    v2_timesteps: str | tuple[int, ...]

    def cache_settings(self) -> dict[str, Any]:
        """The settings :class:`~diffpath.cache.CacheConfig` takes (as ``detector._cache_config``)."""
        v2 = self.v2_timesteps if isinstance(self.v2_timesteps, str) else list(self.v2_timesteps)
        return {"family": self.family, "steps": self.steps, "seed": self.seed,
                "clip_denoised": self.clip_denoised, "noise_key": self.noise_key,
                "clip_x0_hat": self.clip_x0_hat, "v2_timesteps": v2}


@dataclass(frozen=True)
class CalibrationInfo:
    """``training``: N readable normal images, split into ``n_fit`` (the scorer's) and
    ``n_calibration`` (the threshold's) by ``fraction``."""

    n_images: int
    n_fit: int
    n_calibration: int
    fraction: float


@dataclass(frozen=True)
class ThresholdInfo:
    """``threshold``: ``accept``, the rank k of the threshold among the calibration scores
    (0: none) and its value (``-inf`` when k = 0)."""

    accept: float
    rank: int
    value: float


@dataclass(frozen=True)
class DetectorMeta:
    """``detector.json``, checked."""

    model: ModelInfo
    preprocessing: Preprocessing
    features: FeaturesInfo
    scorer_kind: str
    scorer_arrays: Mapping[str, Any]
    scorer_sha256: str
    training: CalibrationInfo
    threshold: ThresholdInfo


def _model(top: _Section) -> ModelInfo:
    m = top.section("model")
    return ModelInfo(spec=m.str("spec"), resolved=m.str("resolved", null=True), kind=m.str("kind"),
                     image_size=m.int("image_size", 1, MAX_IMAGE_SIZE), channels=m.int("channels", 1, 3),
                     fingerprint=m.str("fingerprint", pattern=_HEX))


def _preprocessing(top: _Section, model: ModelInfo) -> Preprocessing:
    p = top.section("preprocessing")
    size = p.int("size", model.image_size, model.image_size)  # the model's own size, nothing else
    channels = p.int("channels", model.channels, model.channels)
    return Preprocessing(size=size, channels=channels, resize=p.str("resize", RESIZE_MODES),
                         alpha=p.str("alpha", ALPHA_MODES))


def _features(top: _Section) -> FeaturesInfo:
    from diffpath.methods.registry import METHODS

    f = top.section("features")
    method = METHODS[f.str("method", tuple(METHODS))]
    v2 = f.obj.get("v2_timesteps", "diffpath")
    v2_ts = "diffpath" if v2 == "diffpath" else f.int_list("v2_timesteps", 0, MAX_TIMESTEPS - 1, min_len=2)
    return FeaturesInfo(method=method.name, family=f.str("family", (method.family,)),
                        dims=f.int("dims", method.dims, method.dims), steps=f.int("steps", 2, MAX_STEPS),
                        seed=f.int("seed", 0, 2**63 - 1), clip_denoised=f.bool("clip_denoised"),
                        noise_key=f.str("noise_key", ("content", "index")), clip_x0_hat=f.bool("clip_x0_hat"),
                        v2_timesteps=v2_ts)


def _training(top: _Section) -> CalibrationInfo:
    t, th = top.section("training"), top.section("threshold")
    n = t.int("n_images", 2, 10**9)
    fraction = float(th.number("calibration", 0.0, 1.0, open_lo=True))  # (not None: null=False)
    n_cal = t.int("n_calibration", calibration_size(n, fraction), calibration_size(n, fraction))
    n_fit = t.int("n_fit", n - n_cal, n - n_cal)
    return CalibrationInfo(n_images=n, n_fit=n_fit, n_calibration=n_cal, fraction=fraction)


def _threshold(top: _Section, n_cal: int) -> ThresholdInfo:
    from diffpath.scoring.threshold import conformal_rank

    th = top.section("threshold")
    accept = float(th.number("accept", 0.0, 1.0, open_lo=True))
    k = conformal_rank(n_cal, accept)
    th.int("rank", k, k)
    if k >= 1:
        return ThresholdInfo(accept=accept, rank=k, value=float(th.number("value", -math.inf, math.inf)))
    if th._get("value") is not None:
        raise th._error("value", f"null (rank 0: {n_cal} calibration images flag nothing at accept {accept:g})",
                        th.obj["value"])
    return ThresholdInfo(accept=accept, rank=0, value=-math.inf)


def parse_meta(meta: Any, file: Path) -> DetectorMeta:
    """Check the content of ``detector.json`` (read from ``file``) field by field.

    Raises:
        DetectorError: a missing field or a bad value, naming ``file`` and the field.
    """
    top = _Section(meta, "", file)
    model = _model(top)
    features = _features(top)
    sc = top.section("scorer")
    from diffpath.methods.registry import METHODS

    kind = sc.str("kind", (METHODS[features.method].scorer,))
    sc.str("file", ("scorer.npz",))
    arrays = sc.section("arrays").obj
    training = _training(top)
    return DetectorMeta(model=model, preprocessing=_preprocessing(top, model), features=features,
                        scorer_kind=kind, scorer_arrays=arrays, scorer_sha256=str(sc.str("sha256", pattern=_SHA256)),
                        training=training, threshold=_threshold(top, training.n_calibration))
