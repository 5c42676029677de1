"""A from-scratch re-implementation of improved-diffusion's ``UNetModel`` (Nichol & Dhariwal, 2021).

This is the network behind DiffPath's released CelebA-32 and ImageNet-64 checkpoints. The module tree
is laid out so that ``state_dict()`` has *exactly* the key names and shapes of the openai/
improved-diffusion implementation, so those checkpoints load with ``strict=True``:

* ``time_embed.{0,2}``: two linears (``C → 4C → 4C``) around a SiLU;
* ``input_blocks.N.M``: stage ``N`` of the encoder, layer ``M`` inside it (``0.0`` is the stem conv;
  a residual block is ``in_layers.{0,2}`` / ``emb_layers.1`` / ``out_layers.{0,3}`` /
  ``skip_connection``; attention is ``norm`` / ``qkv`` (1-D conv) / ``proj_out`` (1-D conv); a
  downsampling stage is ``op``);
* ``middle_block.{0,1,2}``: residual block, attention, residual block;
* ``output_blocks.N.M``: decoder stages (``conv`` for an upsampling layer);
* ``out.{0,2}``: final norm and conv.

Numerical conventions carried over from the reference (so that outputs agree to float32 rounding):
GroupNorm with 32 groups evaluated in float32; sinusoidal timestep features ``[cos, sin]`` with
frequencies ``exp(-ln(10000)·i/half)``; multi-head attention whose fused ``qkv`` channels are grouped
head by head as ``[q_h, k_h, v_h]``, with the usual ``1/√d`` logit scale; FiLM-style
``norm(h)·(1 + scale) + shift`` conditioning when ``use_scale_shift_norm`` is on.

Settings are improved-diffusion's ``model_and_diffusion_defaults`` keys (see
:func:`settings_defaults`); ``channel_mult``, ``in_channels`` and ``out_channels`` may be given
explicitly and are otherwise derived the way improved-diffusion's ``create_model`` derives them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffpath.models.errors import ModelLoadError

__all__ = [
    "ImprovedUNet",
    "build_from_settings",
    "load_checkpoint_into",
    "resolve_settings",
    "schedule_from_settings",
    "settings_defaults",
    "timestep_embedding",
]

# GroupNorm group count used throughout improved-diffusion.
_NORM_GROUPS = 32

# improved-diffusion's create_model: channel multipliers by image size.
_DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    256: (1, 1, 2, 2, 4, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def _load_error(message: str) -> Exception:
    return ModelLoadError(message)


# --------------------------------------------------------------------------------------------
# settings


def settings_defaults() -> dict[str, Any]:
    """improved-diffusion's ``model_and_diffusion_defaults`` (DiffPath's variant, which adds
    ``use_zero_module``). Settings files may give only the keys that differ from these."""
    return {
        "image_size": 64,
        "num_channels": 128,
        "num_res_blocks": 2,
        "num_heads": 4,
        "num_heads_upsample": -1,
        "attention_resolutions": "16,8",
        "dropout": 0.0,
        "learn_sigma": False,
        "sigma_small": False,
        "class_cond": False,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
        "timestep_respacing": "",
        "use_kl": False,
        "predict_xstart": False,
        "rescale_timesteps": True,
        "rescale_learned_sigmas": True,
        "use_checkpoint": False,
        "use_scale_shift_norm": True,
        "use_zero_module": True,
    }


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("yes", "true", "t", "y", "1"):
            return True
        if low in ("no", "false", "f", "n", "0"):
            return False
    raise _load_error(f"settings: {name} must be a boolean, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise _load_error(f"settings: {name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and out != value:
        raise _load_error(f"settings: {name} must be an integer, got {value!r}")
    return out


def _int_list(name: str, value: Any) -> list[int]:
    """A list of ints from a list/tuple or a comma-separated string ('' → [])."""
    if value is None:
        return []
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(" ", ",").split(",")]
        parts = [p for p in parts if p]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    return [_as_int(name, p) for p in parts]


def resolve_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings merged over :func:`settings_defaults`, with the derived architecture keys
    filled in: ``channel_mult`` (tuple), ``in_channels``, ``out_channels``,
    ``num_heads_upsample`` (``-1`` resolved to ``num_heads``) and ``attention_ds`` (the
    downsampling factors ``image_size // res`` at which attention is used)."""
    if not isinstance(settings, Mapping):
        raise _load_error(f"settings must be a mapping, got {type(settings).__name__}")
    if "image_size" not in settings:
        raise _load_error("settings: image_size is required (e.g. 32 for CelebA, 64 for ImageNet)")
    s: dict[str, Any] = {**settings_defaults(), **dict(settings)}

    s["image_size"] = image_size = _as_int("image_size", s["image_size"])
    s["num_channels"] = _as_int("num_channels", s["num_channels"])
    s["num_res_blocks"] = _as_int("num_res_blocks", s["num_res_blocks"])
    s["num_heads"] = _as_int("num_heads", s["num_heads"])
    s["num_heads_upsample"] = _as_int("num_heads_upsample", s["num_heads_upsample"])
    s["diffusion_steps"] = _as_int("diffusion_steps", s["diffusion_steps"])
    s["dropout"] = float(s["dropout"])
    for key in (
        "learn_sigma",
        "class_cond",
        "use_checkpoint",
        "use_scale_shift_norm",
        "rescale_timesteps",
        "use_zero_module",
    ):
        s[key] = _as_bool(key, s[key])

    mult = s.get("channel_mult")
    if mult is None or (isinstance(mult, str) and not mult.strip()):
        if image_size not in _DEFAULT_CHANNEL_MULT:
            raise _load_error(
                f"settings: no default channel_mult for image_size {image_size} "
                f"(improved-diffusion knows {sorted(_DEFAULT_CHANNEL_MULT)}); "
                "give channel_mult explicitly"
            )
        mult = _DEFAULT_CHANNEL_MULT[image_size]
    s["channel_mult"] = tuple(_int_list("channel_mult", mult))
    if not s["channel_mult"] or min(s["channel_mult"]) < 1:
        raise _load_error(f"settings: bad channel_mult {s['channel_mult']!r}")

    if s.get("in_channels") is None:
        s["in_channels"] = 3
    s["in_channels"] = _as_int("in_channels", s["in_channels"])
    if s.get("out_channels") is None:
        s["out_channels"] = s["in_channels"] * (2 if s["learn_sigma"] else 1)
    s["out_channels"] = _as_int("out_channels", s["out_channels"])

    if s["num_heads_upsample"] == -1:
        s["num_heads_upsample"] = s["num_heads"]

    resolutions = _int_list("attention_resolutions", s["attention_resolutions"])
    for res in resolutions:
        if res <= 0:
            raise _load_error(f"settings: bad attention resolution {res}")
    s["attention_ds"] = tuple(image_size // res for res in resolutions)
    return s


# --------------------------------------------------------------------------------------------
# building blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: ``(B,) → (B, dim)`` float32.

    The first half of the features are cosines, the second half sines, at frequencies
    ``max_period^(-i/half)`` for ``i = 0..half-1``; an odd ``dim`` is padded with one zero column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    angles = t.to(torch.float32)[:, None] * freqs[None, :]
    feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in (at least) float32 whatever the input dtype; the result has the input
    dtype. Half-precision inputs and parameters are upcast for the statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        y = F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps)
        return y.to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(_NORM_GROUPS, channels)


class _EmbBlock(nn.Module):
    """Marker base: blocks whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class _Stage(nn.Sequential):
    """A sequence of layers; those that want the timestep embedding get it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _EmbBlock) else layer(x)
        return x


class ResBlock(_EmbBlock):
    """GroupNorm-SiLU-conv, timestep conditioning, GroupNorm-SiLU-dropout-conv, plus a skip path
    (identity, or a 1×1 conv when the channel count changes)."""

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        out_ch = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch)
        )
        self.out_layers = nn.Sequential(
            _norm(out_ch), nn.SiLU(), nn.Dropout(p=dropout), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_ch == channels else nn.Conv2d(channels, out_ch, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        cond = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = cond.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + cond)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection.

    ``qkv`` is a 1×1 Conv1d to ``3·C`` channels; those are split into ``num_heads`` consecutive
    groups of ``3·C/num_heads``, each holding that head's queries, keys and values in that order.
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        n = flat.shape[-1]
        qkv = self.qkv(self.norm(flat))  # (b, 3c, n)
        head_dim = c // self.num_heads
        qkv = qkv.reshape(b, self.num_heads, 3, head_dim, n)
        # (b, heads, n, head_dim) each
        q, k, v = (qkv[:, :, i].transpose(-1, -2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
        out = out.transpose(-1, -2).reshape(b, c, n)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# --------------------------------------------------------------------------------------------
# the network


class ImprovedUNet(nn.Module):
    """improved-diffusion's UNet (unconditional, 2-D, learned conv resampling).

    ``forward(x, t)``: ``x`` (B, in_channels, H, W), ``t`` (B,) timesteps as the network expects
    them (already rescaled to ``[0, 1000)`` for ``rescale_timesteps`` models) →
    (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_ds: tuple[int, ...] | list[int],
        dropout: float = 0.0,
        channel_mult: tuple[int, ...] = (1, 2, 4, 8),
        num_heads: int = 1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        attn_at = set(attention_ds)
        emb_dim = 4 * model_channels

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, dropout, cout, use_scale_shift_norm)

        # encoder: remember each stage's output width for the skip connections
        self.input_blocks = nn.ModuleList(
            [_Stage(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_widths = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attn_at:
                    layers.append(AttentionBlock(ch, num_heads))
                self.input_blocks.append(_Stage(*layers))
                skip_widths.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(_Stage(Downsample(ch)))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = _Stage(res(ch, ch), AttentionBlock(ch, num_heads), res(ch, ch))

        # decoder: one more block per level than the encoder, each eating one skip tensor
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_widths.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attn_at:
                    layers.append(AttentionBlock(ch, num_heads_upsample))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Stage(*layers))

        self.out = nn.Sequential(
            _norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        feats = timestep_embedding(t, self.model_channels)
        emb = self.time_embed(feats.to(self.time_embed[0].weight.dtype))
        skips = []
        h = x
        for stage in self.input_blocks:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def build_from_settings(settings: Mapping[str, Any]) -> ImprovedUNet:
    """The UNet an improved-diffusion settings dict describes (weights randomly initialised).

    Raises:
        ModelLoadError: class-conditional models, or settings that improved-diffusion itself could
            not build (widths not divisible by 32 GroupNorm groups, heads not dividing widths,
            unknown default channel_mult).
    """
    s = resolve_settings(settings)
    if s["class_cond"]:
        raise _load_error(
            "settings: class_cond is true, but only unconditional improved-diffusion models are "
            "supported (DiffPath's CelebA-32 and ImageNet-64 models are unconditional)"
        )
    base, mult = s["num_channels"], s["channel_mult"]
    if base < 1 or s["num_res_blocks"] < 1 or s["num_heads"] < 1 or s["num_heads_upsample"] < 1:
        raise _load_error(
            "settings: num_channels, num_res_blocks, num_heads and num_heads_upsample must be "
            f"positive (got {base}, {s['num_res_blocks']}, {s['num_heads']}, "
            f"{s['num_heads_upsample']})"
        )
    widths = sorted({base * m for m in mult} | {base})
    bad = [w for w in widths if w % _NORM_GROUPS]
    if bad:
        raise _load_error(
            f"settings: num_channels={base} with channel_mult={mult} gives widths {bad} that are "
            f"not divisible by the {_NORM_GROUPS} GroupNorm groups improved-diffusion uses"
        )
    # widths that carry attention: the levels whose downsampling factor is listed, and the middle
    attn_widths = {base * mult[-1]}
    for level, m in enumerate(mult):
        if 2**level in s["attention_ds"]:
            attn_widths.add(base * m)
    for heads_key in ("num_heads", "num_heads_upsample"):
        heads = s[heads_key]
        bad = sorted(w for w in attn_widths if w % heads)
        if bad:
            raise _load_error(
                f"settings: {heads_key}={heads} does not divide attention width(s) {bad}"
            )
    return ImprovedUNet(
        in_channels=s["in_channels"],
        model_channels=base,
        out_channels=s["out_channels"],
        num_res_blocks=s["num_res_blocks"],
        attention_ds=s["attention_ds"],
        dropout=s["dropout"],
        channel_mult=mult,
        num_heads=s["num_heads"],
        num_heads_upsample=s["num_heads_upsample"],
        use_scale_shift_norm=s["use_scale_shift_norm"],
    )


# --------------------------------------------------------------------------------------------
# checkpoints and schedules

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema")
_PREFIXES = ("module.", "_orig_mod.")


def _unwrap_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(state, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise _load_error(
            f"{source}: expected a state_dict (a mapping of tensors), got {type(state).__name__}"
        )
    sd = dict(state)
    for prefix in _PREFIXES:
        if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    non_tensor = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise _load_error(
            f"{source}: checkpoint entries that are not tensors: {_preview(non_tensor)}"
        )
    return sd


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... (+{len(keys) - n} more)" if len(keys) > n else shown


def load_checkpoint_into(net: nn.Module, state_dict: Any, source: str) -> None:
    """Copy a checkpoint's weights into ``net``, strictly.

    Accepts a bare state_dict, one wrapped as ``{"state_dict": ...}`` (or ``model_state_dict``,
    ``model``, ``ema``), and keys prefixed by ``module.`` (DataParallel) or ``_orig_mod.``
    (``torch.compile``).

    Raises:
        ModelLoadError: one line naming the missing and unexpected keys (first few and counts) and
            the shape mismatches, when the checkpoint does not fit the architecture its settings
            file describes.
    """
    sd = _unwrap_state_dict(state_dict, source)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} (expected {tuple(expected[k].shape)}, got {tuple(sd[k].shape)})"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched, 3)}")
        hint = ""
        if any(k.startswith("label_emb.") for k in unexpected):
            hint = " (label_emb.* suggests a class-conditional model, which is not supported)"
        raise _load_error(
            f"{source}: the checkpoint does not fit its settings file (check image_size, "
            "num_channels, num_res_blocks, attention_resolutions, channel_mult, learn_sigma, "
            f"use_scale_shift_norm): {'; '.join(parts)}{hint}"
        )
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        msg = " ".join(str(exc).split())
        raise _load_error(f"{source}: cannot load the checkpoint: {msg}") from exc


def schedule_from_settings(settings: Mapping[str, Any]):
    """The training noise schedule: ``noise_schedule`` over ``diffusion_steps`` (float64)."""
    from diffpath.core.schedule import NoiseSchedule

    defaults = settings_defaults()
    name = settings.get("noise_schedule", defaults["noise_schedule"])
    steps = _as_int("diffusion_steps", settings.get("diffusion_steps", defaults["diffusion_steps"]))
    try:
        return NoiseSchedule.named(str(name), steps)
    except ValueError as exc:
        raise _load_error(f"settings: {exc}") from exc
