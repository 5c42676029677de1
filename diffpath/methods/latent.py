"""The Stable Diffusion (latent) variant of the localisation reconstruction, DIVAD's setting.

DIVAD runs the invert-then-denoise reconstruction in the latent space of Stable Diffusion with the
text prompt ``"An image of a {class}"`` (:data:`DIVAD_PROMPT`):

1. encode the image with the VAE: z0 = scaling_factor · E(x0) (the posterior *mean* by default, so
   the result is deterministic; DIVAD samples from the posterior without a seed);
2. DDIM-invert z0 and denoise it back with the text-conditioned UNet: here on the same timesteps
   both ways (:func:`latent_reconstruct`, through :func:`diffpath.methods.localization.reconstruct`,
   no x̂0 clipping in latent space); DIVAD's own schedules, mismatched as its code runs them, and
   their matched variant: :mod:`diffpath.methods.divad`;
3. decode: x̂0 = D(ẑ0 / scaling_factor), clamped to [-1, 1].

The maps of :mod:`diffpath.methods.maps` (pixel, SSIM) and :mod:`diffpath.methods.dino` (DINO
features) then compare x0 with x̂0. With ``guidance_scale`` ≠ 1, classifier-free guidance is applied
at every step (ε = ε_u + s·(ε_c − ε_u); DIVAD uses s = 3.5 with an empty negative prompt), which
doubles the UNet evaluations.

:meth:`LatentDiffusion.from_pretrained` loads a diffusers Stable Diffusion folder or hub id
component by component (``transformers`` for the CLIP text encoder and tokenizer); everything else
works with any diffusers ``AutoencoderKL`` + ``UNet2DConditionModel`` and precomputed text
embeddings (the tests build tiny random ones in code).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffpath.core.schedule import NoiseSchedule, schedule_of
from diffpath.methods.localization import reconstruct

__all__ = [
    "PROMPT_TEMPLATE",
    "DIVAD_PROMPT",
    "prompt_for",
    "ConditionalEps",
    "LatentDiffusion",
    "LatentReconstruction",
    "latent_reconstruct",
]

PROMPT_TEMPLATE = "an image of a {}"
#: DIVAD's prompt (``ddim_inversion.py``: ``f"An image of a {cl}"`` with the category's folder name;
#: CLIP's tokenizer lower-cases it)
DIVAD_PROMPT = "An image of a {class}"


def prompt_for(template: str, name: str = "") -> str:
    """``template`` with ``{class}`` (or ``{}``) replaced by ``name``, e.g. ``"An image of a screw"``."""
    if ("{class}" in template or "{}" in template) and not name:
        raise ValueError(f"the prompt {template!r} needs a class name")
    return template.replace("{class}", name).replace("{}", name)


class ConditionalEps:
    """A text-conditioned UNet seen as the ε-model protocol ``(z, t) -> ε``.

    Args:
        unet: diffusers ``UNet2DConditionModel`` (``unet(z, t, encoder_hidden_states=...)``).
        cond: (1 or B, L, D) prompt embeddings.
        uncond: (1 or B, L, D) negative-prompt embeddings; needed when ``guidance_scale != 1``.
        guidance_scale: classifier-free guidance scale s (1 = plain conditional ε).
        schedule: the UNet's training schedule.
    """

    def __init__(
        self,
        unet: nn.Module,
        cond: torch.Tensor,
        schedule: NoiseSchedule,
        *,
        uncond: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ):
        if guidance_scale != 1.0 and uncond is None:
            raise ValueError("classifier-free guidance needs the negative-prompt embeddings (uncond)")
        self.net = unet
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.schedule = schedule

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @staticmethod
    def _expand(e: torch.Tensor, B: int) -> torch.Tensor:
        return e.expand(B, *e.shape[1:]) if e.shape[0] == 1 else e

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        cond = self._expand(self.cond, B).to(z.device, z.dtype)
        if self.guidance_scale == 1.0:
            return self.net(z, t, encoder_hidden_states=cond).sample.float()
        assert self.uncond is not None
        uncond = self._expand(self.uncond, B).to(z.device, z.dtype)
        out = self.net(torch.cat([z, z]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = out.float().chunk(2)
        return e_u + self.guidance_scale * (e_c - e_u)


@dataclass
class LatentDiffusion:
    """The parts of a latent diffusion model the reconstruction needs.

    Attributes:
        vae: diffusers ``AutoencoderKL``.
        unet: diffusers ``UNet2DConditionModel``.
        schedule: the UNet's training schedule.
        scaling_factor: latent scale (``vae.config.scaling_factor``, 0.18215 for SD 1.x/2.x).
        tokenizer, text_encoder: CLIP parts for :meth:`embed` (optional).
    """

    vae: nn.Module
    unet: nn.Module
    schedule: NoiseSchedule
    scaling_factor: float = 0.18215
    tokenizer: Any = None
    text_encoder: Any = None

    #: the scheduler's configuration (``scheduler/scheduler_config.json``): DIVAD's timestep grids
    scheduler_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, spec: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> LatentDiffusion:
        """Load a Stable Diffusion folder or hub id (e.g. ``stabilityai/stable-diffusion-2-1-base``,
        DIVAD's model; fetched by :func:`diffpath.models.hub.stable_diffusion_folder`) component by
        component: VAE, UNet, CLIP text encoder and tokenizer, and the scheduler's configuration
        (ε-prediction only, as DIVAD's update rule)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffpath.models import ModelLoadError
        from diffpath.models.hub import stable_diffusion_folder

        folder = stable_diffusion_folder(spec)
        cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ModelLoadError(f"{spec}: predicts {cfg['prediction_type']!r}; the latent round trip needs an "
                                 "ε-prediction model (Stable Diffusion 2.1-base, 1.5, ...)")
        try:
            parts = {
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype,
                                                     low_cpu_mem_usage=False),
                "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype,
                                                             low_cpu_mem_usage=False),
                "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype),
                "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            }
        except Exception as exc:  # diffusers / transformers raise many kinds
            raise ModelLoadError(f"{folder}: cannot load the Stable Diffusion components: {exc}") from exc
        for name in ("vae", "unet", "text_encoder"):
            parts[name] = parts[name].to(device).eval()
        return cls(schedule=NoiseSchedule.from_diffusers_config(cfg),
                   scaling_factor=float(getattr(parts["vae"].config, "scaling_factor", 0.18215)),
                   scheduler_config=cfg, **parts)

    def fingerprint(self) -> str:
        """A short hash of the VAE's, UNet's and text encoder's weights and of the scheduler's
        configuration: identifies the model itself, not where it was loaded from."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.scheduler_config, sort_keys=True, default=str).encode())
        for part in (self.vae, self.unet, self.text_encoder):
            for name, tensor in sorted(part.state_dict().items()) if part is not None else ():
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def image_size(self) -> int:
        """The pixel size the UNet was trained at: its latent size × the VAE's downsampling."""
        s = self.unet.config.sample_size
        return int(s if isinstance(s, int) else s[0]) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def prompt_embeddings(self, template: str, name: str = "") -> torch.Tensor:
        """(1, L, D) embeddings of ``template`` with ``{class}`` replaced by ``name``
        (:func:`prompt_for`)."""
        return self.embed([prompt_for(template, name)])

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP embeddings (B, L, D) of the prompts (padded to the tokenizer's max length)."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("no tokenizer/text encoder: pass prompt embeddings directly")
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        dev = next(self.text_encoder.parameters()).device
        return self.text_encoder(tok.input_ids.to(dev))[0]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] → scaled latents (posterior mean unless ``sample``)."""
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return z * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents → (B, 3, H, W) images clamped to [-1, 1]."""
        return self.vae.decode(z / self.scaling_factor).sample.clamp(-1.0, 1.0)


@dataclass
class LatentReconstruction:
    """x_hat: (B, 3, H, W) reconstruction; z0 / z_hat: latents before / after; x_vae: D(E(x0)), the
    VAE-only reconstruction (compare with it to separate the VAE's own error); nfe: UNet
    evaluations per image (×2 with guidance)."""

    x_hat: torch.Tensor
    z0: torch.Tensor
    z_hat: torch.Tensor
    x_vae: torch.Tensor
    nfe: int


@torch.no_grad()
def latent_reconstruct(
    ld: LatentDiffusion,
    x0: torch.Tensor,
    t0: int,
    steps: int,
    *,
    schedule: NoiseSchedule | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    negative_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> LatentReconstruction:
    """DIVAD's latent reconstruction with consistent timesteps (see the module docstring).

    Args:
        ld: the model parts.
        x0: (B, 3, H, W) images in [-1, 1].
        t0, steps: see :func:`diffpath.methods.localization.reconstruct`.
        schedule: ᾱ (default ``ld.schedule``, the UNet's training schedule).
        prompt_embeds: (1 or B, L, D) embeddings; or ``prompts`` (strings, e.g.
            ``PROMPT_TEMPLATE.format("candle")``) embedded with :meth:`LatentDiffusion.embed`.
        negative_embeds: embeddings of the negative prompt (default: of ``""`` when guiding).
        guidance_scale: classifier-free guidance scale (1 = none).
    """
    if prompt_embeds is None:
        if prompts is None:
            raise ValueError("pass prompt_embeds or prompts")
        prompt_embeds = ld.embed(list(prompts))
    if guidance_scale != 1.0 and negative_embeds is None:
        negative_embeds = ld.embed([""])
    sched = schedule_of(ld, schedule)
    eps = ConditionalEps(ld.unet, prompt_embeds, sched, uncond=negative_embeds, guidance_scale=guidance_scale)
    z0 = ld.encode(x0.float())
    rec = reconstruct(eps, z0, t0, steps, schedule=sched, clip_denoised=False)
    return LatentReconstruction(
        x_hat=ld.decode(rec.x_hat),
        z0=z0,
        z_hat=rec.x_hat,
        x_vae=ld.decode(z0),
        nfe=rec.nfe * (1 if guidance_scale == 1.0 else 2),
    )
