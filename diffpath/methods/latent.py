"""Optional: the Stable Diffusion (latent) variant of the localisation reconstruction, DIVAD's setting.

DIVAD runs the invert-then-denoise reconstruction in the latent space of Stable Diffusion with the
text prompt ``"an image of a {class}"``:

1. encode the image with the VAE: z0 = scaling_factor · E(x0) (the posterior *mean* here, so the
   result is deterministic; DIVAD samples from the posterior);
2. DDIM-invert z0 to ``t0`` and denoise it back with the text-conditioned UNet, on the same
   timesteps both ways (:func:`diffpath.methods.localization.reconstruct`, no x̂0 clipping in latent space);
3. decode: x̂0 = D(ẑ0 / scaling_factor), clamped to [-1, 1].

The pixel / SSIM maps of :mod:`diffpath.methods.localization` then compare x0 with x̂0 as for pixel-space
models. With ``guidance_scale`` ≠ 1, classifier-free guidance is applied at every step
(ε = ε_u + s·(ε_c − ε_u), DIVAD uses s = 3.5 with an empty negative prompt), which doubles the
UNet evaluations.

Loading a real Stable Diffusion checkpoint (:meth:`LatentDiffusion.from_pretrained`) needs the
``transformers`` package (CLIP text encoder) and the weights on disk or the internet; everything
else works with any diffusers ``AutoencoderKL`` + ``UNet2DConditionModel`` and precomputed text
embeddings (the tests build tiny random ones in code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffpath.core.schedule import NoiseSchedule, schedule_of
from diffpath.methods.localization import reconstruct

__all__ = [
    "PROMPT_TEMPLATE",
    "ConditionalEps",
    "LatentDiffusion",
    "LatentReconstruction",
    "latent_reconstruct",
]

PROMPT_TEMPLATE = "an image of a {}"


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

    @classmethod
    def from_pretrained(cls, spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentDiffusion:
        """Load a Stable Diffusion folder or hub id (e.g. ``stabilityai/stable-diffusion-2-1-base``,
        DIVAD's model). Needs ``transformers``; the weights must be on disk or downloadable."""
        try:
            from diffusers import StableDiffusionPipeline
            import transformers  # noqa: F401
        except ImportError as exc:
            raise ImportError("the Stable Diffusion variant needs `pip install transformers`") from exc
        pipe = StableDiffusionPipeline.from_pretrained(spec, torch_dtype=dtype)
        pipe.to(device)
        return cls(
            vae=pipe.vae.eval(),
            unet=pipe.unet.eval(),
            schedule=NoiseSchedule.from_diffusers_config(dict(pipe.scheduler.config)),
            scaling_factor=float(getattr(pipe.vae.config, "scaling_factor", 0.18215)),
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder.eval(),
        )

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
