"""Zero-shot anomaly localisation by partial DDIM inversion and reconstruction (DIVAD-style).

An image x0 is DDIM-inverted (η = 0) to an intermediate timestep ``t0`` and then DDIM-denoised back
to 0 with the *same* model. A model trained on normal data pulls the path towards normal images, so
the reconstruction x̂0 keeps what looks normal and repairs what does not; the discrepancy between
x0 and x̂0 is the anomaly map.

Pipeline (all pure functions; the notebook ``notebooks/30_localization.ipynb`` strings them)::

    spec = MapSpec("deterministic", t0=(0.4,), steps=10, maps=("pixel",))
    res = localize(model, x0, spec, seed=0)                    # res.maps["pixel"]: (N, H, W)

A :class:`MapSpec` is one row of the localisation table; its ``kind`` picks the round trip:

``"deterministic"`` (DIVAD-style, :func:`reconstruct`)
    DDIM inversion (η = 0) to t0 and DDIM denoising back on the same grid: 2·steps evaluations.
``"stochastic"``, ``start="noise"`` (AnoDDPM-style, :func:`stochastic_reconstruct`)
    x_{t0} = √ᾱ·x0 + √(1−ᾱ)·z with fresh noise z, then ``steps`` DDIM steps with η (default 1,
    ancestral) back to 0; ``draws`` independent draws: draws·steps evaluations.
``"stochastic"``, ``start="invert"``
    the deterministic inversion to t0 once (``steps`` evaluations), then ``draws`` η-denoisings
    from that latent: steps·(1 + draws) evaluations.
``"model_free"``
    no model: :func:`diffpath.methods.maps.model_free_map` (``gradient`` or ``median``).

Several draws are reduced either as the mean of the per-draw maps (``reduce="maps"``) or as the
map of the mean reconstruction (``reduce="reconstruction"``); several ``t0`` average their maps.
**t0 is a fraction of T** (the model's number of training timesteps): 0.2 is timestep 200 of a
1,000-step model and 800 of a 4,000-step one (:func:`timestep_of`). All noise comes from one seeded
``torch.Generator`` per batch and goes through :func:`diffpath.core.sampling.ddim_walk`.

Reconstruction schedule
-----------------------
``steps`` timesteps are kept, evenly spaced on [0, t0): s_j = round(j·t0/steps), j = 0..steps−1.

* inversion visits x0 (taken as the state at s_0 = 0, where the model is first evaluated)
  → ᾱ_{s_1} → … → ᾱ_{s_{steps−1}} → ᾱ_{t0}: ``steps`` model evaluations at s_0 … s_{steps−1};
* denoising walks the same grid back: ᾱ_{t0} → ᾱ_{s_{steps−1}} → … → ᾱ_{s_1} → clean (ᾱ = 1, the
  final x̂0): ``steps`` model evaluations at t0, s_{steps−1}, …, s_1.

Both directions use the same timesteps, so an exact ε-model (one that returns the ε consistent
with a fixed clean image) reconstructs that image exactly. The public DIVAD reference code instead
inverts along a 50-step schedule and starts the denoising from that latent on a 100-step schedule,
i.e. at a timestep whose noise level does not match the latent it is given; we keep the two
consistent on purpose (``reconstruct(..., denoise_t0=t1)`` with t1 > t0 restores such a mismatch
for ablations). ``t0`` is given in the model's own training timesteps (0 … T−1).

A consequence worth keeping in mind: deterministic DDIM inversion followed by denoising on the same
grid is the identity in the limit of many steps, for normal and anomalous content alike. What
repairs anomalies is the coarse discretisation (few, large steps, along which ε is evaluated at
states the model finds unlikely) and the x̂0 clipping; ``t0`` and ``steps`` therefore act together
and are best tuned jointly.

Anomaly maps (:mod:`diffpath.methods.maps`; each ``(B, 1, H, W)``, higher = more anomalous)
-------------------------------------------------------------------------------
``"pixel"``
    |x0 − x̂0| averaged over channels (``pixel_power=2``: the squared difference).
``"ssim"``
    1 − SSIM(x0, x̂0) averaged over channels (:func:`diffpath.core.ssim.ssim_map`, 11-tap Gaussian
    window of σ = 1.5, data range 2); in [0, 2].
``"feature"``
    1 − cosine similarity over channels between the diffusion UNet's *own* intermediate
    activations of x0 and of x̂0, both evaluated at a small timestep ``feature_t`` (default 50 of
    1000, no added noise: the network is only used as a feature extractor, see
    :class:`UNetFeatures`), upsampled bilinearly to the image size and averaged over the chosen
    layers. Default layers: decoder (up-block) outputs at two resolutions, the highest ones below
    the input size first (16 and 8 px for a 4-level 32 px model; 16 and 32 px for a 3-level one).
    Costs 2 extra UNet evaluations per image.

Every map is then Gaussian-smoothed with σ = ``smooth_sigma`` pixels (default ``4·H/256``: DIVAD's
σ = 4 px at 256 px scaled to the image, 0.5 px at 32 px; 0 turns smoothing off).

``"combined"`` (:func:`combine_maps`) is Σ_k w_k · map_k / scale_k. No per-image min-max
normalisation (it would erase the difference between a clean and an anomalous image); each map is
instead divided by one *set-level* scale, by default its mean over every pixel of every image
passed (label-free, but transductive: pass ``scales`` computed on other images to avoid that).
Dividing by a positive constant keeps each map's ranking, so only the mix changes.

Image score (:func:`image_scores`): the maximum of the map after a k×k average pool (stride 1, no
padding), k = ``max(1, H // 8)`` by default (DIVAD pools 8×8 eight times at 256 px).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from diffpath.core.sampling import StepCallback, ddim_denoise, ddim_invert, partial_ddim_coefficients
from diffpath.core.schedule import alphas_cumprod_of
from diffpath.methods.maps import (  # noqa: F401  (re-exported: the maps used to live here)
    METHODS,
    MODEL_FREE,
    anomaly_maps,
    combine_maps,
    default_smooth_sigma,
    feature_distance_map,
    gaussian_smooth,
    image_scores,
    map_scales,
    model_free_map,
    pixel_distance_map,
    ssim_distance_map,
    to_image_grid,
)
from diffpath.models import EpsFn
from diffpath.models.hooks import UNetFeatures

__all__ = [
    "METHODS",
    "MODEL_FREE",
    "KINDS",
    "CountingModel",
    "Reconstruction",
    "MapSpec",
    "timestep_of",
    "reconstruct",
    "stochastic_reconstruct",
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


@torch.no_grad()
def reconstruct(
    model: EpsFn,
    x0: torch.Tensor,
    t0: int,
    steps: int,
    *,
    alphas_cumprod: np.ndarray | None = None,
    clip_denoised: bool = True,
    denoise_t0: int | None = None,
    callback: StepCallback | None = None,
) -> Reconstruction:
    """Invert x0 to ``t0`` along ``steps`` DDIM steps and denoise back with the same timesteps.

    Args:
        model: ε-model ``(x, t) -> ε``; its ``.schedule`` gives ᾱ unless ``alphas_cumprod`` is given.
        x0: (B, C, H, W) float images in [-1, 1], on the model's device.
        t0: intermediate timestep in the model's training timesteps (``steps <= t0 <= T − 1``;
            :func:`timestep_of` converts a fraction of T).
        steps: DDIM steps per direction.
        clip_denoised: clip every x̂0 to [-1, 1] (both directions).
        denoise_t0: ablation only. Denoise as if the latent sat at ``denoise_t0`` (its own
            ``steps`` evenly spaced timesteps) instead of ``t0``. ``None`` (default) keeps the two
            directions consistent; a value above ``t0`` imitates the reference code's mismatch
            (a latent inverted to t0 denoised on a schedule that starts at a higher noise level).
        callback: forwarded to both loops; each step dict gets ``"phase"``: ``"invert"`` or
            ``"denoise"``.

    Returns:
        :class:`Reconstruction`.
    """
    ac = alphas_cumprod_of(model, alphas_cumprod)
    inv, den = partial_ddim_coefficients(ac, t0, steps)
    if denoise_t0 is not None and int(denoise_t0) != int(t0):
        den = partial_ddim_coefficients(ac, int(denoise_t0), steps)[1]

    def tag(phase: str):
        if callback is None:
            return None
        return lambda step: callback({**step, "phase": phase})

    x_t0 = ddim_invert(model, x0, inv, clip_denoised=clip_denoised, callback=tag("invert"))
    x_hat = ddim_denoise(model, x_t0, den, clip_denoised=clip_denoised, callback=tag("denoise"))
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
    draws: int = 1,
    eta: float = 1.0,
    start: str = "noise",
    generator: torch.Generator | None = None,
    alphas_cumprod: np.ndarray | None = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """``draws`` stochastic round trips of x0 through timestep ``t0``.

    Args:
        model, x0, t0, steps, clip_denoised: as :func:`reconstruct`.
        draws: independent reconstructions per image.
        eta: DDIM η of the denoising walk (1: ancestral, DDPM-like; 0: deterministic).
        start: ``"noise"``: x_{t0} = √ᾱ_{t0}·x0 + √(1−ᾱ_{t0})·z, z ~ N(0, I) from ``generator``
            (AnoDDPM); ``"invert"``: the deterministic DDIM inversion of x0 to t0 (once, ``steps``
            evaluations), shared by the draws, which then differ only through η.
        generator: source of every random number (on x0's device).

    Returns:
        (draws, B, C, H, W) reconstructions in [-1, 1]. Cost: draws·steps evaluations per image
        (+ steps for ``start="invert"``).
    """
    if start not in ("noise", "invert"):
        raise ValueError(f"start must be 'noise' or 'invert', got {start!r}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    ac = alphas_cumprod_of(model, alphas_cumprod)
    inv, den = partial_ddim_coefficients(ac, t0, steps)
    x0 = x0.float()
    latent = None
    if start == "invert":
        latent = ddim_invert(model, x0, inv, clip_denoised=clip_denoised)
    a = float(ac[int(t0)])
    outs = []
    for _ in range(int(draws)):
        if latent is None:
            z = torch.randn(x0.shape, generator=generator, device=x0.device)
            x_t = np.sqrt(a) * x0 + np.sqrt(1.0 - a) * z
        else:
            x_t = latent
        outs.append(ddim_denoise(model, x_t, den, clip_denoised=clip_denoised, eta=eta, generator=generator))
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
        maps: map kinds: :data:`METHODS` for round trips, :data:`MODEL_FREE` for ``model_free``.
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
        known = MODEL_FREE if self.kind == "model_free" else METHODS
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


def _round_trip_maps(model, xb, spec, T, base, gen, feats, kw, clip_denoised):
    """Maps of one batch for every t0 of ``spec``, averaged over t0; also the first reconstruction."""
    acc: dict[str, torch.Tensor] = {}
    first = None
    for f in spec.t0:
        t0 = timestep_of(f, T, spec.steps)
        if spec.kind == "deterministic":
            dt0 = None if spec.denoise_t0 is None else timestep_of(spec.denoise_t0, T, spec.steps)
            recs = reconstruct(model, xb, t0, spec.steps, clip_denoised=clip_denoised, denoise_t0=dt0).x_hat[None]
        else:
            recs = stochastic_reconstruct(model, xb, t0, spec.steps, draws=spec.draws, eta=spec.eta,
                                          start=spec.start, generator=gen, clip_denoised=clip_denoised)
        if spec.reduce == "reconstruction":
            recs = recs.mean(0, keepdim=True)
        first = recs.mean(0) if first is None else first
        for r in recs:
            mp = anomaly_maps(xb, r, base, features=feats, **kw)
            for m, v in mp.items():
                acc[m] = acc.get(m, 0) + v / (len(recs) * len(spec.t0))
    return acc, first


def localize(
    model: Any,
    x0: np.ndarray | torch.Tensor,
    spec: MapSpec,
    *,
    seed: int = 0,
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
) -> LocalizationResult:
    """Every map of ``spec`` for N images, and their image scores.

    Args:
        model: an :class:`~diffpath.models.EpsModel` (``.schedule``, ``.num_timesteps``; the
            feature map also needs ``.net``). Unused for ``kind="model_free"``.
        x0: (N, C, H, W) float32 in [-1, 1] (e.g. from :func:`diffpath.data.to_model_input`).
        spec: the round trip and maps (:class:`MapSpec`).
        seed: seeds the stochastic round trips (one ``torch.Generator`` per batch, seeded with
            ``[seed, first image index]``; the same seed and batch size give the same maps).
        batch_size: images per UNet batch.
        feature_t, feature_layers: see :func:`~diffpath.methods.maps.feature_distance_map`.
        pixel_power, smooth_sigma: see :func:`~diffpath.methods.maps.anomaly_maps`.
        weights, scales: see :func:`~diffpath.methods.maps.combine_maps` (scales default to
            set-level means over these N images).
        pool: image-score window (default ``max(1, H // 8)`` of the grid scored).
        out_size: the images' original (H, W): maps are brought back to it with
            :func:`~diffpath.methods.maps.to_image_grid` before scoring.
    """
    x_all = torch.as_tensor(np.asarray(x0) if isinstance(x0, np.ndarray) else x0).float()
    N = int(x_all.shape[0])
    kw = {"feature_t": int(feature_t), "pixel_power": pixel_power, "smooth_sigma": smooth_sigma}
    per: dict[str, list[torch.Tensor]] = {}
    x_hats: list[torch.Tensor] = []
    counter = CountingModel(model) if spec.kind != "model_free" else None
    base = [m for m in METHODS if m != "combined" and (m in spec.maps or "combined" in spec.maps)]
    if "combined" in spec.maps and weights is not None:
        base = [m for m in base if m in spec.maps or float(weights.get(m, 0.0)) != 0.0]
    feats = UNetFeatures(counter, feature_layers) if counter is not None and "feature" in base else None
    probe = counter.images if counter is not None else 0
    dev = getattr(model, "device", torch.device("cpu")) if counter is not None else torch.device("cpu")
    T = len(alphas_cumprod_of(model, None)) if counter is not None else 0
    for lo in range(0, N, batch_size):
        xb = x_all[lo : lo + batch_size].to(dev)
        if counter is None:
            mp = {m: model_free_map(xb, m, smooth_sigma=smooth_sigma) for m in spec.maps}
        else:
            gen = torch.Generator(device=dev).manual_seed(int(seed) * 1_000_003 + lo)
            mp, rec = _round_trip_maps(counter, xb, spec, T, base, gen, feats, kw,
                                       clip_denoised)
            x_hats.append(rec.cpu())
        for m, v in mp.items():
            per.setdefault(m, []).append(v.cpu())
    maps_t = {m: torch.cat(v) for m, v in per.items()}
    used_scales: dict[str, float] = {}
    if "combined" in spec.maps:
        used_scales = map_scales(maps_t) if scales is None else {k: float(scales[k]) for k in maps_t}
        maps_t["combined"] = combine_maps(maps_t, weights, used_scales)  # type: ignore[assignment]
    if out_size is not None:
        maps = {m: to_image_grid(maps_t[m], out_size) for m in spec.maps}
    else:
        maps = {m: maps_t[m][:, 0].numpy().astype(np.float32) for m in spec.maps}
    scores = {m: image_scores(maps[m], pool) for m in spec.maps}
    grid = int(next(iter(maps.values())).shape[-2]) if maps else int(x_all.shape[-2])
    nfe = 0.0 if counter is None else (counter.images - probe) / max(N, 1)
    return LocalizationResult(
        maps=maps,
        scores=scores,
        x_hat=torch.cat(x_hats).numpy() if x_hats else None,
        scales=used_scales,
        nfe=float(nfe),
        settings={
            **spec.to_dict(), "seed": int(seed), "num_timesteps": T,
            "t0_timesteps": [timestep_of(f, T, spec.steps) for f in spec.t0] if T else None,
            "feature_t": int(feature_t),
            "feature_layers": None if feats is None else list(feats.layers),
            "pixel_power": pixel_power,
            "smooth_sigma": default_smooth_sigma(int(x_all.shape[-1])) if smooth_sigma is None else float(smooth_sigma),
            "pool": max(1, grid // 8) if pool is None else int(pool),
            "out_size": None if out_size is None else [int(v) for v in out_size],
            "weights": dict(weights) if weights is not None else None,
        },
    )
