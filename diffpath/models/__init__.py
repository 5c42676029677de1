"""ε-models behind one callable protocol: ``model(x, t) -> ε`` (:class:`EpsFn`, defined in
:mod:`diffpath.core.protocols` and re-exported here).

* ``x``: ``(B, C, H, W)`` float tensor, images (or noisy images) in the model's [-1, 1] space.
* ``t``: ``(B,)`` int64 tensor of *original* training timesteps ``0 .. T-1`` of the model's own
  schedule (each adapter converts them to what its network expects, e.g. improved-diffusion's
  ``t·1000/T`` rescaling).
* returns ``(B, C, H, W)`` float32: the predicted noise ε (the ε half of a learned-σ output).

:func:`load_model` turns a *spec* into an :class:`EpsModel`:

* a folder holding a diffusers ``UNet2DModel`` (either a pipeline folder with ``unet/`` and
  ``scheduler/``, or a bare UNet folder with ``config.json``);
* an improved-diffusion checkpoint ``NAME.pt`` with its settings in ``NAME.json`` (or ``NAME.yaml``)
  beside it: the format of DiffPath's released CelebA-32 and ImageNet-64 models;
* a Hugging Face hub id (only for users who are online; imported lazily);
* a known released checkpoint by short name (``diffpath-celeba32``) or ``hub:OWNER/REPO/FILE.pt``
  (:mod:`diffpath.models.zoo`: fetched into the Hugging Face cache, settings carried by diffpath).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffpath.core.protocols import EpsFn
from diffpath.core.schedule import NoiseSchedule
from diffpath.models.errors import ModelLoadError

__all__ = [
    "EpsFn",
    "EpsModel",
    "ModelLoadError",
    "PRECISIONS",
    "RunOptions",
    "load_model",
    "resolve_device",
]


#: What a diffusers model may predict (its scheduler config's ``prediction_type``); ε is computed
#: from each (:meth:`EpsModel._to_eps`). Anything else is refused when the model is loaded.
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

#: The network precisions of :class:`RunOptions` (``"auto"`` in params and on the command line picks
#: one per device: :func:`diffpath.models.options.fast_run_options`).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available")
    return dev


@dataclass
class RunOptions:
    """How the network is executed (not *what* it computes).

    Attributes:
        precision: ``"fp32"`` (exact float32, TF32 off), ``"tf32"`` (float32 storage, TF32 matmuls
            and convolutions on Ampere+), or ``"bf16"`` (bfloat16 autocast). Outputs are always
            returned as float32.
        channels_last: run convolutions in NHWC memory format.
        compile: wrap the network in ``torch.compile``.
        cuda_graphs: compile with ``mode="reduce-overhead"`` (CUDA graphs); implies ``compile``.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32, tf32 or bf16, got {self.precision!r}")

    @classmethod
    def defaults_for(cls, device: torch.device) -> RunOptions:
        """Safe defaults: exact fp32 everywhere (the fast path is opt-in through params)."""
        return cls()


class _DiffusersAdapter(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


@dataclass
class EpsModel:
    """A network seen as ε(x, t), with the schedule it was trained under.

    Attributes:
        net: ``net(x, t_net) -> output``; ``output[:, :channels]`` is ε.
        schedule: the model's training noise schedule (float64).
        image_size: the square input size the model was trained at.
        channels: image channels.
        timestep_scale: ``t_net = t · timestep_scale`` (1000/T for improved-diffusion's
            ``rescale_timesteps``; 1 otherwise).
        kind: ``"diffusers"`` or ``"improved-diffusion"``.
        spec: where it was loaded from.
        prediction_type: what ``output[:, :channels]`` is: ``"epsilon"`` (ε), ``"v_prediction"``
            (v = √ᾱ·ε − √(1−ᾱ)·x0) or ``"sample"`` (x̂0); the last two are converted to ε in
            float64 with the model's own ᾱ_t (see :data:`PREDICTION_TYPES`).
    """

    net: nn.Module
    schedule: NoiseSchedule
    image_size: int
    channels: int
    timestep_scale: float = 1.0
    kind: str = "custom"
    spec: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    options: RunOptions = field(default_factory=RunOptions)
    prediction_type: str = "epsilon"
    _runner: nn.Module | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.net.parameters()).device
        except StopIteration:  # parameter-free analytic nets
            return torch.device("cpu")

    def fingerprint(self) -> str:
        """A short hash of the network's weights and the schedule (identifies the model itself,
        not where it was loaded from). Computed once per model object."""
        if self._fingerprint is not None:
            return self._fingerprint
        import hashlib

        h = hashlib.sha256()
        for name, tensor in sorted(self.net.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.schedule.betas.tobytes())
        h.update(repr((self.timestep_scale, self.channels, self.image_size)).encode())
        if self.prediction_type != "epsilon":  # same weights, other meaning (ε models: unchanged)
            h.update(self.prediction_type.encode())
        self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def to(self, device: str | torch.device) -> EpsModel:
        self.net.to(resolve_device(device))
        self._runner = None
        return self

    def configure(self, options: RunOptions | None = None) -> EpsModel:
        """Apply execution options (precision, channels_last, compile, CUDA graphs)."""
        self.options = options or RunOptions()
        net = self.net.eval()
        if self.options.channels_last:
            net = net.to(memory_format=torch.channels_last)
        runner: nn.Module = net
        if self.options.compile or self.options.cuda_graphs:
            mode = "reduce-overhead" if self.options.cuda_graphs else None
            runner = torch.compile(net, mode=mode, dynamic=False)  # type: ignore[assignment]
        self._runner = runner
        return self

    def _autocast(self, device: torch.device):
        if self.options.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε prediction. ``x``: (B, C, H, W); ``t``: (B,) int64 original timesteps → (B, C, H, W)."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"expected images of shape (B, {self.channels}, H, W), got {tuple(x.shape)}"
            )
        runner = self._runner if self._runner is not None else self.net.eval()
        t_net: torch.Tensor = t.to(x.device)
        if self.timestep_scale != 1.0:
            t_net = t_net.to(torch.float32) * self.timestep_scale
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        tf32 = self.options.precision == "tf32"
        prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            with self._autocast(x.device):
                out = runner(x, t_net)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
        pred = out[:, : self.channels]
        if self.prediction_type == "epsilon":
            return pred.float().contiguous()
        return self._to_eps(pred, x, t).float().contiguous()

    def _to_eps(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε from a v or x̂0 prediction ``pred`` (B, C, H, W) at x_t ``x`` (B, C, H, W), timesteps
        ``t`` (B,), in float64 with the model's own ᾱ_t:
        v: ε = √ᾱ·v + √(1−ᾱ)·x_t;  x̂0: ε = (x_t − √ᾱ·x̂0) / √(1−ᾱ)."""
        ac_all = torch.from_numpy(self.schedule.alphas_cumprod)  # (T,) float64
        ac = ac_all[t.detach().cpu().long()].to(x.device).view(-1, 1, 1, 1)
        p, xt = pred.double(), x.double()
        if self.prediction_type == "v_prediction":
            return ac.sqrt() * p + (1.0 - ac).sqrt() * xt
        if self.prediction_type == "sample":
            return (xt - ac.sqrt() * p) / (1.0 - ac).sqrt()
        raise ModelLoadError(f"prediction_type {self.prediction_type!r} cannot be converted to ε")


# --------------------------------------------------------------------------------------------
# loading


def _schedule_from_diffusers_config(cfg: dict[str, Any]) -> NoiseSchedule:
    try:
        return NoiseSchedule.from_diffusers_config(cfg)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc


def _load_diffusers_folder(folder: Path) -> EpsModel:
    from diffusers import UNet2DModel

    from .validate import check_scheduler_config, check_unet_config, read_json_object

    if (folder / "unet").is_dir():
        unet_dir = folder / "unet"
        sched_file = folder / "scheduler" / "scheduler_config.json"
    elif (folder / "config.json").is_file():
        unet_dir = folder
        sched_file = folder / "scheduler_config.json"
    else:
        raise ModelLoadError(
            f"{folder}: not a diffusers model folder (expected unet/ or config.json inside)"
        )
    image_size = check_unet_config(read_json_object(unet_dir / "config.json"), unet_dir / "config.json")
    sched_cfg = read_json_object(sched_file) if sched_file.is_file() else {}
    check_scheduler_config(sched_cfg, sched_file)
    prediction_type = str(sched_cfg.get("prediction_type", "epsilon"))
    if prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"{sched_file}: prediction_type {prediction_type!r} is not supported; diffpath needs "
            f"the model's noise ε and can convert only {', '.join(PREDICTION_TYPES)}"
        )
    schedule = _schedule_from_diffusers_config(sched_cfg)
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises a zoo of exception types
        raise ModelLoadError(f"{unet_dir}: cannot load UNet2DModel: {exc}") from exc
    cfg = dict(unet.config)
    return EpsModel(
        net=_DiffusersAdapter(unet).eval(),
        schedule=schedule,
        image_size=image_size,
        channels=int(cfg["in_channels"]),
        timestep_scale=1.0,
        kind="diffusers",
        spec=str(folder),
        settings={"unet": cfg, "scheduler": sched_cfg},
        prediction_type=prediction_type,
    )


def _load_hub(repo_id: str) -> EpsModel:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with diffusers
        raise ModelLoadError("loading from the hub needs huggingface_hub") from exc
    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin"])
    except Exception as exc:
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}). "
            "Offline? Download it elsewhere and pass the local folder instead."
        ) from exc
    return _load_diffusers_folder(Path(local))


def _read_settings(pt: Path) -> dict[str, Any]:
    from .validate import read_json_object

    for ext in (".json", ".yaml", ".yml"):
        cand = pt.with_suffix(ext)
        if cand.is_file():
            if ext == ".json":
                return read_json_object(cand)
            import yaml

            try:
                data = yaml.safe_load(cand.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ModelLoadError(f"{cand}: not readable YAML ({' '.join(str(exc).split())})") from exc
            if not isinstance(data, dict):
                raise ModelLoadError(f"{cand}: must hold a mapping of settings, got {type(data).__name__}")
            # DiffPath's configs nest the settings under a top-level key in some files
            if "model" in data and isinstance(data["model"], dict):
                data = {**data, **data["model"]}
            return data
    from .zoo import zoo_settings_for

    known = zoo_settings_for(pt)  # a released checkpoint: its settings are carried by diffpath
    if known is not None:
        return known
    raise ModelLoadError(
        f"{pt}: no settings file beside the checkpoint (expected {pt.with_suffix('.json').name} "
        "holding improved-diffusion's model_and_diffusion_defaults keys)"
    )


def _load_improved(pt: Path) -> EpsModel:
    from .improved_unet import (
        build_from_settings,
        load_checkpoint_into,
        resolve_settings,
        schedule_from_settings,
    )

    from .validate import check_image_size, check_timesteps

    settings = resolve_settings(_read_settings(pt))
    check_image_size(settings["image_size"], f"{pt}'s settings")
    check_timesteps(settings["diffusion_steps"], f"{pt}'s settings", "diffusion_steps")
    net = build_from_settings(settings)
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{pt}: cannot read the checkpoint: {exc}") from exc
    load_checkpoint_into(net, state, source=str(pt))
    schedule = schedule_from_settings(settings)
    T = schedule.num_timesteps
    return EpsModel(
        net=net.eval(),
        schedule=schedule,
        image_size=int(settings["image_size"]),
        channels=int(settings.get("in_channels", 3)),
        timestep_scale=(1000.0 / T) if settings.get("rescale_timesteps", False) else 1.0,
        kind="improved-diffusion",
        spec=str(pt),
        settings=settings,
    )


def load_model(
    spec: str | Path,
    device: str | torch.device = "cpu",
    options: RunOptions | None = None,
) -> EpsModel:
    """Load an ε-model from a diffusers folder, an improved-diffusion ``.pt``, a hub id, a short
    name of :mod:`diffpath.models.zoo` (``diffpath-celeba32``) or ``hub:OWNER/REPO/FILE.pt``
    (the last two are fetched into the Hugging Face cache)."""
    from .zoo import is_remote_spec, resolve_spec

    if is_remote_spec(spec):
        spec = resolve_spec(spec)
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such checkpoint file")
        model = _load_improved(path)
    elif path.is_dir():
        model = _load_diffusers_folder(path)
    elif path.exists():
        raise ModelLoadError(
            f"{path}: expected a diffusers model folder or an improved-diffusion .pt checkpoint"
        )
    elif str(spec).count("/") == 1 and not str(spec).startswith((".", "/")):
        model = _load_hub(str(spec))
    else:
        raise ModelLoadError(f"{spec}: no such model folder or checkpoint")
    model.to(device)
    return model.configure(options)
