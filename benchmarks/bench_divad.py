"""What DIVAD's latent round trip costs on this machine: the tiny test parts, and Stable Diffusion 2.1-base's
shapes with random weights.

* ``tiny``: the localisation paper profile's test parts (tests/localization_fakes.py: a 16-px
  Stable Diffusion, a patch-8 ViT): images per second of every row of params-paper-localization.yaml
  (the round trip and its three maps), batch 8;
* ``sd21``: a ``UNet2DConditionModel`` and an ``AutoencoderKL`` built with Stable Diffusion
  2.1-base's published configurations (865 M and 84 M parameters; random weights: the cost of a
  forward pass does not depend on them): seconds per UNet evaluation at 64² latents with
  classifier-free guidance (one call on a batch of 2 = 2 evaluations), per VAE encoding and
  decoding at 512², and what one image of each row costs from that.

Writes ``reports/benchmarks/cpu_divad.md`` (and ``.jsonl``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_divad.py [--skip-sd21] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)


def _rows():
    from diffpath.methods.divad import RoundTripSpec

    rows = yaml.safe_load((ROOT / "params-paper-localization.yaml").read_text())["industrial"]["rows"]
    return {name: RoundTripSpec.from_dict(d) for name, d in rows.items()}


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def bench_tiny(repeats: int = 3) -> list[dict]:
    """Images per second of every row on the test parts (round trip + DINO, pixel and SSIM maps)."""
    from localization_fakes import write_tiny_stable_diffusion, write_tiny_vit

    from diffpath.methods.dino import PatchFeatures, dino_distance_map
    from diffpath.methods.divad import latent_round_trip
    from diffpath.methods.latent import DIVAD_PROMPT, LatentDiffusion
    from diffpath.methods.maps import anomaly_maps

    tmp = Path(tempfile.mkdtemp())
    ld = LatentDiffusion.from_pretrained(write_tiny_stable_diffusion(tmp / "sd", image_size=16))
    vit = PatchFeatures.from_pretrained(write_tiny_vit(tmp / "vit"))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    xe = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear")
    cond, uncond = ld.prompt_embeddings(DIVAD_PROMPT, "screw"), ld.embed([""])
    out = []
    for name, spec in _rows().items():
        plan = spec.plan(ld.scheduler_config)

        def one():
            rec = latent_round_trip(ld, x, plan, cond=cond, uncond=uncond, guidance_scale=3.5,
                                    generator=torch.Generator().manual_seed(0)).x_hat
            for r in rec:
                r = torch.nn.functional.interpolate(r, size=(32, 32), mode="bilinear")
                dino_distance_map(vit, xe, r, sigma=0.625)
                anomaly_maps(xe, r, ("pixel", "ssim"), smooth_sigma=0.625)

        sec = _median(one, repeats)
        out.append({"bench": "tiny", "row": name, "unet_evals": plan.nfe(3.5), "images_per_s": round(8 / sec, 2),
                    "unet_evals_per_s": round(8 * plan.nfe(3.5) / sec, 1)})
        print(out[-1], file=sys.stderr)
    return out


@torch.no_grad()
def bench_sd21(repeats: int = 2) -> list[dict]:
    """Seconds per UNet evaluation (guided batch of 2) and per VAE pass at Stable Diffusion 2.1-base's shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from localization_fakes import SD21_SCHEDULER

    torch.manual_seed(0)
    unet, vae = UNet2DConditionModel(**SD21_UNET).eval(), AutoencoderKL(**SD21_VAE).eval()
    z, emb = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 1024)
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    unet(z, torch.full((2,), 500), encoder_hidden_states=emb)  # warm-up
    s_unet = _median(lambda: unet(z, torch.full((2,), 500), encoder_hidden_states=emb), repeats) / 2
    s_enc = _median(lambda: vae.encode(x), repeats)
    s_dec = _median(lambda: vae.decode(torch.randn(1, 4, 64, 64)), repeats)
    out = [{"bench": "sd21", "part": "unet", "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "s_per_eval": round(s_unet, 2)},
           {"bench": "sd21", "part": "vae", "params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 1),
            "s_encode": round(s_enc, 2), "s_decode": round(s_dec, 2)}]
    for name, spec in _rows().items():
        plan = spec.plan(SD21_SCHEDULER)
        sec = plan.nfe(3.5) * s_unet + s_enc + (plan.vae_evals() - 1) * s_dec
        out.append({"bench": "sd21", "row": name, "unet_evals": plan.nfe(3.5), "vae_evals": plan.vae_evals(),
                    "s_per_image": round(sec, 1)})
    for r in out:
        print(r, file=sys.stderr)
    return out


def _cpu() -> str:
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)"
    except (OSError, IndexError):
        return platform.processor() or "CPU"


def _markdown(rows: list[dict], threads: int, load: float) -> str:
    head = (f"# DIVAD's latent round trip on the CPU\n\n`benchmarks/bench_divad.py`, {_cpu()}, shared (load "
            f"average {load:.1f} at the end), torch {torch.__version__}, {threads} thread(s), fp32, medians.\n\n")
    tiny = [r for r in rows if r["bench"] == "tiny"]
    sd = [r for r in rows if r["bench"] == "sd21"]
    md = head
    if tiny:
        md += ("## Tiny test parts (16-px Stable Diffusion, patch-8 ViT), batch 8, round trip + 3 maps\n\n"
               "| row | UNet evals / image | images / s | UNet evals / s |\n| --- | ---: | ---: | ---: |\n")
        md += "".join(f"| {r['row']} | {r['unet_evals']} | {r['images_per_s']} | {r['unet_evals_per_s']} |\n" for r in tiny)
    if sd:
        u = next(r for r in sd if r.get("part") == "unet")
        v = next(r for r in sd if r.get("part") == "vae")
        md += (f"\n## Stable Diffusion 2.1-base's shapes (random weights), 512² images, 64² latents\n\n"
               f"UNet ({u['params_m']} M parameters): {u['s_per_eval']} s per evaluation (guided batch of 2); "
               f"VAE ({v['params_m']} M): {v['s_encode']} s per encoding, {v['s_decode']} s per decoding.\n\n"
               "| row | UNet evals / image | VAE evals / image | s / image |\n| --- | ---: | ---: | ---: |\n")
        md += "".join(f"| {r['row']} | {r['unet_evals']} | {r['vae_evals']} | {r['s_per_image']} |\n"
                      for r in sd if "row" in r)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-sd21", action="store_true", help="only the tiny parts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/cpu_divad"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench_tiny() + ([] if args.skip_sd21 else bench_sd21())
    Path(args.out).with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(args.out).with_suffix(".md").write_text(_markdown(rows, args.threads, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
