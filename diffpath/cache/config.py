"""What a cache pass computes (:class:`CacheConfig`) and how it runs (:class:`PassOptions`).

Both validate themselves when built, so every caller (the study, :class:`~diffpath.detector.
Detector`, the command lines) refuses the same bad values with the same message. The defaults here
are the only ones: the command lines (:mod:`diffpath.cli.options`) take theirs from this module.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from diffpath.methods.diffpathv2 import ScoreErrorConfig
from diffpath.models import PRECISIONS, EpsModel, RunOptions

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_STEPS",
    "FAMILIES",
    "CacheConfig",
    "PassOptions",
]

FAMILIES = ("diffpath", "diffpathv2")
#: DDIM steps of the DiffPath path (= DiffPathV2 timesteps), as DiffPath uses.
DEFAULT_STEPS = 10
#: Images per model call: fits a 2-core CPU and any GPU; give more on a large GPU.
DEFAULT_BATCH_SIZE = 128
#: Images per resumable chunk: what an interruption can lose (a multiple of the batch size).
DEFAULT_CHUNK_SIZE = 1024


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sizes(batch_size: int, chunk_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class CacheConfig:
    """What one cache pass computes.

    Attributes:
        families: which passes to run: ``"diffpath"`` (DDIM inversion) and/or ``"diffpathv2"``
            (forward-noised score errors). Each costs ``steps`` model evaluations per image.
        steps: DDIM steps of the DiffPath path (at least 2: the derivative needs two).
        clip_denoised: clip x̂0 on the DiffPath path (DiffPath does).
        v2_timesteps: ``"diffpath"`` (the same respaced timesteps as the path) or an explicit list.
        score_error: DiffPathV2's noise seed, noise keying, clipping and SSIM settings.
        batch_size: images per model call.
        chunk_size: images per resumable chunk.
        n_maps: keep per-pixel maps of this many leading images, for figures.
    """

    families: tuple[str, ...] = FAMILIES
    steps: int = DEFAULT_STEPS
    clip_denoised: bool = True
    v2_timesteps: str | list[int] = "diffpath"
    score_error: ScoreErrorConfig = field(default_factory=ScoreErrorConfig)
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    n_maps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.families = tuple(self.families)
        unknown = set(self.families) - set(FAMILIES)
        if unknown or not self.families:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if not _is_int(self.steps) or self.steps < 2:
            raise ValueError(f"steps must be at least 2 (the derivative needs two steps), got {self.steps!r}")
        _check_sizes(self.batch_size, self.chunk_size)
        if self.n_maps < 0:
            raise ValueError(f"n_maps must be 0 or more, got {self.n_maps}")
        if isinstance(self.score_error, dict):
            self.score_error = ScoreErrorConfig(**self.score_error)

    @classmethod
    def from_params(cls, **params: Any) -> CacheConfig:
        """From the flat settings of ``params.yaml``'s ``errors`` section (or the command line):
        ``seed``, ``noise_key`` and ``clip_x0_hat`` go to :attr:`score_error`; names neither
        class knows (``num_threads``, ...) are ignored."""
        own = {f.name for f in fields(cls)} - {"score_error", "extra"}
        v2 = {f.name for f in fields(ScoreErrorConfig)}
        return cls(**{k: v for k, v in params.items() if k in own},
                   score_error=ScoreErrorConfig(**{k: v for k, v in params.items() if k in v2}))

    def dp_timesteps(self, model: EpsModel) -> list[int]:
        """The ``steps`` respaced original timesteps of the DiffPath path."""
        return model.schedule.respaced_timesteps(self.steps)

    def v2_ts(self, model: EpsModel) -> list[int]:
        """The original timesteps of the score errors (sorted)."""
        if self.v2_timesteps == "diffpath":
            return self.dp_timesteps(model)
        ts = sorted(int(t) for t in self.v2_timesteps)
        if len(ts) < 2 or ts[0] < 0 or ts[-1] >= model.num_timesteps:
            raise ValueError(f"v2_timesteps must be ≥2 timesteps in [0, {model.num_timesteps - 1}]")
        return ts

    def evaluations_per_image(self, model: EpsModel) -> int:
        """UNet evaluations per image: one per kept step of each configured family."""
        return ((len(self.dp_timesteps(model)) if "diffpath" in self.families else 0)
                + (len(self.v2_ts(model)) if "diffpathv2" in self.families else 0))

    def fingerprint(self, model: EpsModel, n_images: int, data_key: str) -> str:
        """Identity of a run: a resumed run must match it exactly."""
        d = asdict(self)
        for k in ("batch_size", "chunk_size"):  # do not change the numbers
            d.pop(k)
        d.update(model=model.fingerprint(), model_kind=model.kind, n=n_images, data=data_key,
                 options=asdict(model.options))
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PassOptions:
    """How a model pass runs, never what it computes.

    Attributes:
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        precision: ``"fp32"`` (exact), ``"tf32"``, ``"bf16"``, or ``"auto"`` (the device's fast
            choice, :func:`diffpath.models.options.fast_run_options`).
        channels_last, compile, cuda_graphs: network options (:class:`~diffpath.models.RunOptions`).
        batch_size: images per model call; chunk_size: images per resumable chunk.
        work_dir: folder of a resumable pass (locked, removed on success); None: in memory.
        progress: show progress bars.
    """

    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    work_dir: str | os.PathLike | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("auto", *PRECISIONS):
            raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {self.precision!r}")
        _check_sizes(self.batch_size, self.chunk_size)

    def network_params(self) -> dict[str, Any]:
        """The network options as :func:`~diffpath.models.options.run_options_from_params` reads them."""
        return {"precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile, "cuda_graphs": self.cuda_graphs}

    def network(self, device: str | torch.device) -> RunOptions:
        """:class:`~diffpath.models.RunOptions` on ``device`` (``auto`` resolved for it)."""
        from diffpath.models.options import run_options_from_params

        return run_options_from_params(self.network_params(), device)

    def load_model(self, spec: str | os.PathLike) -> EpsModel:
        """Load the model ``spec`` on :attr:`device` with these network options."""
        from diffpath.models import load_model, resolve_device

        device = resolve_device(self.device)
        return load_model(spec, device=device, options=self.network(device))
