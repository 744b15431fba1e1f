"""A tiny random-weight InstructPix2Pix pipeline (`StableDiffusionInstructPix2PixPipeline`), built offline.

InstructPix2Pix is SD1.5 with a UNet that reads 8 latent channels: the noisy latents and the encoded input
image, concatenated (timbrooks/instruct-pix2pix). So this is the tiny SD1.5 pipeline (engine.tiny.sd15)
with its UNet rebuilt from the same config at `in_channels=8`; everything else is shared.
"""

from __future__ import annotations

from pathlib import Path

from engine.tiny.sd15 import _tiny_pipeline


def build_ip2p(out: Path) -> Path:
    """Write a tiny `StableDiffusionInstructPix2PixPipeline` to `out` (safetensors) and return `out`."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = _tiny_pipeline()
        unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 8})
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
