"""Zero-shot anomaly localisation by partial DDIM round trips (DIVAD-style).

An image x0 goes to an intermediate timestep t0 and back with the same model; the discrepancy
between x0 and the reconstruction x̂0 is the anomaly map (:mod:`diffpath.methods.maps`). One row of
the localisation table is a :class:`MapSpec`; :func:`localize` gives its maps and image scores::

    spec = MapSpec("deterministic", t0=(0.4,), steps=5, maps=("pixel",))
    res = localize(model, x0, spec, seed=0, smooth_sigma=3.0)     # res.maps["pixel"]: (N, H, W)

Round trips: ``"deterministic"`` (:func:`reconstruct`: DDIM inversion to t0 and denoising back on
one grid, 2·steps evaluations), ``"stochastic"`` (:func:`stochastic_reconstruct`: fresh forward
noise to t0, or the inversion, then η-denoising, ``draws`` times), ``"model_free"`` (no model).
**t0 is a fraction of T** (:func:`timestep_of`). Images are (N, C, H, W) in [-1, 1]; maps are
(N, H, W), higher = more anomalous. Smoothing σ defaults to 3·H/32 px, the table's own setting
(params.yaml ``localization.smooth_sigma``: 3 px at 32 px, tuned on a separate split). All
noise of a batch comes from one generator (:func:`batch_generator`). The step dict a ``callback``
sees: :mod:`diffpath.core.sampling`. Why these choices: ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from diffpath.core.protocols import EpsFn
from diffpath.core.sampling import Step, StepCallback, ddim_walk, round_trip_steps
from diffpath.core.schedule import NoiseSchedule, schedule_of
from diffpath.methods.maps import (  # noqa: F401  (re-exported: the maps used to live here)
    MAP_KINDS, MODEL_FREE, anomaly_maps, combine_maps, default_smooth_sigma, feature_distance_map,
    gaussian_smooth, image_scores, map_scales, model_free_map, pixel_distance_map, ssim_distance_map,
    to_image_grid,
)
from diffpath.models.hooks import UNetFeatures

__all__ = [
    "MAP_KINDS",
    "MODEL_FREE",
    "KINDS",
    "CountingModel",
    "Reconstruction",
    "MapSpec",
    "timestep_of",
    "reconstruct",
    "stochastic_reconstruct",
    "batch_generator",
    "anomaly_maps",
    "combine_maps",
    "image_scores",
    "to_image_grid",
    "LocalizationResult",
    "localize",
]

KINDS: tuple[str, ...] = ("model_free", "deterministic", "stochastic")


# ----------------------------------------------------------------------------------------------
# reconstruction


class CountingModel:
    """Wraps an ε-model and counts its evaluations, per image (``images`` sums the batch sizes)."""

    def __init__(self, model: EpsFn):
        self.model = model
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += int(x.shape[0])
        return self.model(x, t)

    def __getattr__(self, name: str) -> Any:  # schedule, net, image_size, … of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


@dataclass
class Reconstruction:
    """What :func:`reconstruct` gives.

    Attributes:
        x_hat: (B, C, H, W) the reconstruction in [-1, 1] (with clipping).
        x_t0: (B, C, H, W) the inverted latent at ``t0``.
        t0, steps: the settings.
        nfe: UNet evaluations per image (2·steps).
    """

    x_hat: torch.Tensor
    x_t0: torch.Tensor
    t0: int
    steps: int
    nfe: int


def _tagged(callback: StepCallback | None, **tags: Any) -> StepCallback | None:
    """``callback`` seeing every step dict with ``tags`` added (None stays None)."""
    if callback is None:
        return None
    return lambda step: callback({**step, **tags})


def _round_trip(schedule: NoiseSchedule, t0: int, steps: int) -> tuple[list[Step], list[Step]]:
    """:func:`~diffpath.core.sampling.round_trip_steps`, with t0 checked against the schedule."""
    if not 0 < int(t0) < schedule.num_timesteps:
        raise ValueError(f"t0 must lie in [1, {schedule.num_timesteps - 1}], got {t0}")
    return round_trip_steps(int(t0), steps)


@torch.no_grad()
def reconstruct(
    model: EpsFn,
    x0: torch.Tensor,
    t0: int,
    steps: int,
    *,
    schedule: NoiseSchedule | None = None,
    clip_denoised: bool = True,
    denoise_t0: int | None = None,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """Invert x0 to ``t0`` along ``steps`` DDIM steps and denoise back with the same timesteps
    (:func:`~diffpath.core.sampling.round_trip_steps`).

    Args:
        model: ε-model ``(x, t) -> ε̂``.
        x0: (B, C, H, W) float images in [-1, 1], on the model's device.
        t0: intermediate timestep in the model's training timesteps (``steps <= t0 <= T − 1``;
            :func:`timestep_of` converts a fraction of T).
        steps: DDIM steps per direction.
        schedule: ᾱ (default ``model.schedule``).
        clip_denoised: clip every x̂0 to [-1, 1] (both directions).
        denoise_t0: ablation only. Denoise as if the latent sat at ``denoise_t0`` (its own
            ``steps`` evenly spaced timesteps) instead of ``t0``. ``None`` (default) keeps the two
            directions consistent; a value above ``t0`` imitates the reference code's mismatch.
        callback: forwarded to both walks, each step dict with ``"phase"``: ``"invert"`` or
            ``"denoise"``.
    """
    sched = schedule_of(model, schedule)
    inv, den = _round_trip(sched, t0, steps)
    if denoise_t0 is not None and int(denoise_t0) != int(t0):
        den = _round_trip(sched, int(denoise_t0), steps)[1]
    kw = {"schedule": sched, "clip_denoised": clip_denoised}
    x_t0 = ddim_walk(model, x0, inv, callback=_tagged(callback, phase="invert"), **kw)
    x_hat = ddim_walk(model, x_t0, den, callback=_tagged(callback, phase="denoise"), **kw)
    return Reconstruction(x_hat=x_hat, x_t0=x_t0, t0=int(t0), steps=int(steps), nfe=2 * int(steps))


def timestep_of(fraction: float, num_timesteps: int, steps: int = 1) -> int:
    """The training timestep at ``fraction`` of T: ``round(fraction · T)``, kept in [steps, T − 1].

    Raises ``ValueError`` unless 0 < fraction < 1 (a timestep such as 400 is not a fraction).
    """
    f = float(fraction)
    if not 0.0 < f < 1.0:
        raise ValueError(f"t0 is a fraction of the model's T in (0, 1), got {fraction}")
    return int(min(max(round(f * int(num_timesteps)), int(steps)), int(num_timesteps) - 1))


@torch.no_grad()
def stochastic_reconstruct(
    model: EpsFn,
    x0: torch.Tensor,
    t0: int,
    steps: int,
    *,
    schedule: NoiseSchedule | None = None,
    draws: int = 1,
    eta: float = 1.0,
    start: str = "noise",
    generator: torch.Generator | None = None,
    clip_denoised: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """``draws`` stochastic round trips of x0 through timestep ``t0``.

    Args:
        model, x0, t0, steps, schedule, clip_denoised: as :func:`reconstruct`.
        draws: independent reconstructions per image.
        eta: DDIM η of the denoising walk (1: ancestral, DDPM-like; 0: deterministic).
        start: ``"noise"``: x_{t0} = ``schedule.q_sample(x0, t0, z)``, z ~ N(0, I) from
            ``generator`` (AnoDDPM); ``"invert"``: the deterministic DDIM inversion of x0 to t0
            (once, ``steps`` evaluations), shared by the draws, which then differ only through η.
        generator: source of every random number (on x0's device).
        callback: sees every step dict, with ``"phase"`` and (denoising) ``"draw"``.

    Returns:
        (draws, B, C, H, W) reconstructions in [-1, 1]. Cost: draws·steps evaluations per image
        (+ steps for ``start="invert"``).
    """
    if start not in ("noise", "invert"):
        raise ValueError(f"start must be 'noise' or 'invert', got {start!r}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    sched = schedule_of(model, schedule)
    inv, den = _round_trip(sched, t0, steps)
    x0 = x0.float()
    latent = None
    if start == "invert":
        latent = ddim_walk(model, x0, inv, schedule=sched, clip_denoised=clip_denoised,
                           callback=_tagged(callback, phase="invert"))
    outs = []
    for d in range(int(draws)):
        if latent is None:
            x_t = sched.q_sample(x0, int(t0), torch.randn(x0.shape, generator=generator, device=x0.device))
        else:
            x_t = latent
        outs.append(ddim_walk(model, x_t, den, schedule=sched, clip_denoised=clip_denoised, eta=eta,
                              generator=generator, callback=_tagged(callback, phase="denoise", draw=d)))
    return torch.stack(outs)


@dataclass(frozen=True)
class MapSpec:
    """One row of the localisation table: a round trip (or none) and the maps taken from it.

    Attributes:
        kind: one of :data:`KINDS`.
        t0: fractions of T (one or several; several average their maps).
        steps: DDIM steps of each walk.
        draws: stochastic round trips per t0 (``kind="stochastic"``).
        eta: DDIM η of the stochastic denoising.
        start: ``"noise"`` or ``"invert"`` (see :func:`stochastic_reconstruct`).
        reduce: ``"maps"`` (mean of the per-draw maps) or ``"reconstruction"`` (map of the mean
            reconstruction).
        maps: map kinds: :data:`MAP_KINDS` for round trips, :data:`MODEL_FREE` for ``model_free``.
        denoise_t0: ablation of the reference code's mismatch (``kind="deterministic"``): denoise
            as if the latent sat at this fraction of T.
    """

    kind: str = "deterministic"
    t0: tuple[float, ...] = (0.4,)
    steps: int = 10
    draws: int = 1
    eta: float = 1.0
    start: str = "noise"
    reduce: str = "maps"
    maps: tuple[str, ...] = ("pixel",)
    denoise_t0: float | None = None

    def __post_init__(self) -> None:
        t0 = (self.t0,) if isinstance(self.t0, (int, float)) else tuple(self.t0)
        object.__setattr__(self, "t0", tuple(float(v) for v in t0))
        object.__setattr__(self, "maps", (self.maps,) if isinstance(self.maps, str) else tuple(self.maps))
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; known: {list(KINDS)}")
        known = MODEL_FREE if self.kind == "model_free" else MAP_KINDS
        bad = [m for m in self.maps if m not in known]
        if bad or not self.maps:
            raise ValueError(f"maps {bad or '[]'} do not fit kind {self.kind!r}; choose from {list(known)}")
        if self.kind != "model_free":
            if not self.t0:
                raise ValueError("t0 needs at least one fraction of T")
            for f in self.t0 + (() if self.denoise_t0 is None else (self.denoise_t0,)):
                if not 0.0 < f < 1.0:
                    raise ValueError(f"t0 is a fraction of the model's T in (0, 1), got {f}")
            if self.steps < 1 or self.draws < 1:
                raise ValueError("steps and draws must be >= 1")
        if self.reduce not in ("maps", "reconstruction"):
            raise ValueError(f"reduce must be 'maps' or 'reconstruction', got {self.reduce!r}")
        if self.start not in ("noise", "invert"):
            raise ValueError(f"start must be 'noise' or 'invert', got {self.start!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MapSpec:
        """From a params.yaml mapping (unknown keys are an error)."""
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def nfe(self) -> int:
        """UNet evaluations per image (the feature map's 2 per comparison included)."""
        if self.kind == "model_free":
            return 0
        per_draw_feat = 2 if ({"feature", "combined"} & set(self.maps)) else 0
        if self.kind == "deterministic":
            return len(self.t0) * (2 * self.steps + per_draw_feat)
        n_cmp = 1 if self.reduce == "reconstruction" else self.draws
        inv = self.steps if self.start == "invert" else 0
        return len(self.t0) * (inv + self.draws * self.steps + n_cmp * per_draw_feat)


@dataclass
class LocalizationResult:
    """What :func:`localize` gives for N images (numpy, on the CPU).

    Attributes:
        maps: map kind → (N, H, W) float32 anomaly maps (model resolution, or ``out_size``).
        scores: map kind → (N,) float64 image scores (:func:`image_scores`).
        x_hat: (N, C, H, W) float32 reconstruction (the mean over draws; the first t0), or None.
        scales: the set-level scales used by ``"combined"``.
        nfe: UNet evaluations per image, counted.
        settings: the spec and the other parameters used.
    """

    maps: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    x_hat: np.ndarray | None
    scales: dict[str, float]
    nfe: float
    settings: dict[str, Any] = field(default_factory=dict)

    def take(self, index: Sequence[int]) -> LocalizationResult:
        """The result of the images at ``index`` (same scales, cost and settings)."""
        idx = np.asarray(index, dtype=np.int64)
        return LocalizationResult(
            maps={m: v[idx] for m, v in self.maps.items()}, scores={m: v[idx] for m, v in self.scores.items()},
            x_hat=None if self.x_hat is None else self.x_hat[idx], scales=dict(self.scales), nfe=self.nfe,
            settings=dict(self.settings))


# ----------------------------------------------------------------------------------------------
# the maps of a table row


def batch_generator(seed: int, first_index: int, device: torch.device | str) -> torch.Generator:
    """The generator of every random number of one batch of a stochastic row: seeded with
    ``seed · 1,000,003 + first_index`` (the index of the batch's first image in the whole set)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(first_index))


@dataclass
class _Pass:
    """What every batch of one :func:`localize` call shares."""

    model: CountingModel
    schedule: NoiseSchedule
    spec: MapSpec
    base: list[str]  # the reconstruction-based maps computed per draw ("combined" is set-level)
    features: UNetFeatures | None
    map_kw: dict[str, Any]
    clip_denoised: bool
    probe: int  # evaluations spent before the first batch (the feature hooks' probe pass)

    def nfe(self, n_images: int) -> float:
        """UNet evaluations per image since the start."""
        return (self.model.images - self.probe) / max(n_images, 1)

    def timestep(self, fraction: float) -> int:
        return timestep_of(fraction, self.schedule.num_timesteps, self.spec.steps)

    def reconstructions(self, xb: torch.Tensor, fraction: float, gen: torch.Generator,
                        callback: StepCallback | None) -> torch.Tensor:
        """(draws, B, C, H, W) round trips of ``xb`` through the t0 at ``fraction`` of T."""
        spec, t0 = self.spec, self.timestep(fraction)
        kw = {"schedule": self.schedule, "clip_denoised": self.clip_denoised,
              "callback": _tagged(callback, t0=t0)}
        if spec.kind == "deterministic":
            dt0 = None if spec.denoise_t0 is None else self.timestep(spec.denoise_t0)
            return reconstruct(self.model, xb, t0, spec.steps, denoise_t0=dt0, **kw).x_hat[None]
        return stochastic_reconstruct(self.model, xb, t0, spec.steps, draws=spec.draws, eta=spec.eta,
                                      start=spec.start, generator=gen, **kw)

    def batch_maps(self, xb: torch.Tensor, gen: torch.Generator,
                   callback: StepCallback | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Maps of one batch averaged over draws and t0, and the first t0's mean reconstruction."""
        acc: dict[str, torch.Tensor] = {}
        first = None
        n_t0 = len(self.spec.t0)
        for f in self.spec.t0:
            recs = self.reconstructions(xb, f, gen, callback)
            if self.spec.reduce == "reconstruction":
                recs = recs.mean(0, keepdim=True)
            first = recs.mean(0) if first is None else first
            for r in recs:
                for m, v in anomaly_maps(xb, r, self.base, features=self.features, **self.map_kw).items():
                    acc[m] = acc.get(m, 0) + v / (len(recs) * n_t0)
        assert first is not None
        return acc, first


def _start(model: Any, spec: MapSpec, schedule: NoiseSchedule | None, feature_layers: Sequence[str] | None,
           weights: Mapping[str, float] | None, map_kw: dict[str, Any], clip_denoised: bool) -> _Pass:
    """The shared state of a round-trip row: counted model, schedule, per-draw maps, feature hooks."""
    base = [m for m in MAP_KINDS if m != "combined" and (m in spec.maps or "combined" in spec.maps)]
    if "combined" in spec.maps and weights is not None:
        base = [m for m in base if m in spec.maps or float(weights.get(m, 0.0)) != 0.0]
    counter = CountingModel(model)
    feats = UNetFeatures(counter, feature_layers) if "feature" in base else None
    return _Pass(counter, schedule_of(model, schedule), spec, base, feats, map_kw, clip_denoised,
                 probe=counter.images)


def _set_level(maps_t: dict[str, torch.Tensor], spec: MapSpec, weights: Mapping[str, float] | None,
               scales: Mapping[str, float] | None,
               out_size: tuple[int, int] | None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The ``"combined"`` map from set-level scales, then every map as (N, H, W) float32 numpy."""
    used: dict[str, float] = {}
    if "combined" in spec.maps:
        used = map_scales(maps_t) if scales is None else {k: float(scales[k]) for k in maps_t}
        maps_t["combined"] = combine_maps(maps_t, weights, used)  # type: ignore[assignment]
    if out_size is not None:
        return {m: to_image_grid(maps_t[m], out_size) for m in spec.maps}, used
    return {m: maps_t[m][:, 0].numpy().astype(np.float32) for m in spec.maps}, used


def _map_batches(run: _Pass | None, spec: MapSpec, x_all: torch.Tensor, dev: torch.device, *, seed: int,
                 first_index: int, batch_size: int, smooth_sigma: float | None,
                 callback: StepCallback | None) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """Every batch's maps, concatenated on the CPU, and the reconstructions (round trips only)."""
    per: dict[str, list[torch.Tensor]] = {}
    x_hats: list[torch.Tensor] = []
    for lo in range(0, int(x_all.shape[0]), batch_size):
        xb = x_all[lo : lo + batch_size].to(dev)
        if run is None:
            mp = {m: model_free_map(xb, m, smooth_sigma=smooth_sigma) for m in spec.maps}
        else:
            mp, rec = run.batch_maps(xb, batch_generator(seed, first_index + lo, dev), callback)
            x_hats.append(rec.cpu())
        for m, v in mp.items():
            per.setdefault(m, []).append(v.cpu())
    return {m: torch.cat(v) for m, v in per.items()}, (torch.cat(x_hats).numpy() if x_hats else None)


def _settings(spec: MapSpec, run: _Pass | None, width: int, grid: int, *, seed: int, feature_t: int,
              pixel_power: int, smooth_sigma: float | None, pool: int | None,
              out_size: tuple[int, int] | None, weights: Mapping[str, float] | None) -> dict[str, Any]:
    """The spec and every other parameter a :func:`localize` call used (defaults resolved)."""
    return {
        **spec.to_dict(), "seed": int(seed), "num_timesteps": run.schedule.num_timesteps if run is not None else 0,
        "t0_timesteps": [run.timestep(f) for f in spec.t0] if run is not None else None,
        "feature_t": int(feature_t),
        "feature_layers": None if run is None or run.features is None else list(run.features.layers),
        "pixel_power": pixel_power,
        "smooth_sigma": default_smooth_sigma(width) if smooth_sigma is None else float(smooth_sigma),
        "pool": max(1, grid // 8) if pool is None else int(pool),
        "out_size": None if out_size is None else [int(v) for v in out_size],
        "weights": dict(weights) if weights is not None else None,
    }


def localize(
    model: Any,
    x0: np.ndarray | torch.Tensor,
    spec: MapSpec,
    *,
    schedule: NoiseSchedule | None = None,
    seed: int = 0,
    first_index: int = 0,
    batch_size: int = 64,
    feature_t: int = 50,
    feature_layers: Sequence[str] | None = None,
    pixel_power: int = 1,
    smooth_sigma: float | None = None,
    weights: Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
    pool: int | None = None,
    out_size: tuple[int, int] | None = None,
    clip_denoised: bool = True,
    callback: StepCallback | None = None,
) -> LocalizationResult:
    """Every map of ``spec`` for N images (N, C, H, W) in [-1, 1], and their image scores.

    Args:
        model: an :class:`~diffpath.models.EpsModel` (unused for ``kind="model_free"``).
        x0, spec, schedule: the images, the row (:class:`MapSpec`), ᾱ (default ``model.schedule``).
        seed, first_index: batch ``[lo, lo + batch_size)`` draws its noise from
            :func:`batch_generator` ``(seed, first_index + lo)``: a slice of a larger set passed
            with its ``first_index`` (a multiple of ``batch_size``) gets that set's maps.
        batch_size: images per UNet batch.
        feature_t, feature_layers, pixel_power, smooth_sigma, weights, scales: see
            :mod:`diffpath.methods.maps` (σ default 3·H/32 px; scales default to set-level means
            over these N images).
        pool: image-score window (default ``max(1, H // 8)`` of the grid scored).
        out_size: the images' original (H, W): maps go back to it (:func:`to_image_grid`).
        callback: sees every step dict of the round trips (with ``"phase"``, ``"t0"``, ``"draw"``).
    """
    x_all = torch.as_tensor(np.asarray(x0) if isinstance(x0, np.ndarray) else x0).float()
    map_kw = {"feature_t": int(feature_t), "pixel_power": pixel_power, "smooth_sigma": smooth_sigma}
    run = None if spec.kind == "model_free" else _start(model, spec, schedule, feature_layers, weights,
                                                        map_kw, clip_denoised)
    dev = getattr(model, "device", torch.device("cpu")) if run is not None else torch.device("cpu")
    maps_t, x_hat = _map_batches(run, spec, x_all, dev, seed=seed, first_index=first_index, batch_size=batch_size,
                                 smooth_sigma=smooth_sigma, callback=callback)
    maps, used_scales = _set_level(maps_t, spec, weights, scales, out_size)
    grid = int(next(iter(maps.values())).shape[-2]) if maps else int(x_all.shape[-2])
    settings = _settings(spec, run, int(x_all.shape[-1]), grid, seed=seed, feature_t=feature_t,
                         pixel_power=pixel_power, smooth_sigma=smooth_sigma, pool=pool, out_size=out_size,
                         weights=weights)
    return LocalizationResult(
        maps=maps, scores={m: image_scores(maps[m], pool) for m in spec.maps}, x_hat=x_hat,
        scales=used_scales, nfe=0.0 if run is None else run.nfe(int(x_all.shape[0])), settings=settings)
