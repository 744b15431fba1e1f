"""A tiny random-weight Stable Diffusion 1.5 text-to-image pipeline, built offline from configs.

The layout is SD1.5's (one CLIP text encoder, a cross-attention UNet, a VAE with the 8x latent scale and
SD1.5's 0.18215 latent scaling, SD1.5's PNDM scheduler config), so `StableDiffusionPipeline.from_pretrained`,
`load_textual_inversion` and `load_lora_weights` run their real code; only the widths are tiny. The
tokenizer is the tiny SDXL one (engine.tiny.sdxl): byte-level BPE in CLIP's format, 77 tokens.
"""

from __future__ import annotations

from pathlib import Path

from engine.tiny.sdxl import BOS, EOS, build_tokenizer

HIDDEN = 32  # text encoder width = the UNet's cross-attention width
# stable-diffusion-v1-5's scheduler/scheduler_config.json.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)


# The layout of `build_sd15`: SD1.5's 8x VAE, a two-level UNet over an 8 x 8 latent at 64 px.
SD15_LAYOUT = dict(vae_channels=(8, 8, 8, 8), unet_channels=(16, 32), latent_side=8, vae_groups=4)
# `build_sd15_domain`: the starting point of a generator trained from scratch on a small-image domain (the toy,
# 32 px): a 2x VAE (16 x 16 latent at 32 px: a toy shape spans 5-10 latent cells, where the 8x VAE gives it 1-3
# and draws blobs) with room to reconstruct textures, and a wider UNet. Measured in
# benchmarks/results/domain_generator.md.
DOMAIN_LAYOUT = dict(vae_channels=(32, 32), unet_channels=(32, 64), latent_side=16, vae_groups=8)


def build_sd15(out: Path) -> Path:
    """Write a tiny `StableDiffusionPipeline` to `out` (safetensors) and return `out`."""
    return _save(_tiny_pipeline, out)


def build_sd15_domain(out: Path) -> Path:
    """Write the random-weight SD1.5-layout pipeline of DOMAIN_LAYOUT to `out` (fine-tuning's `method: full`
    trains every weight of it on a domain: configs/finetune_full_toy_cpu.yaml)."""
    return _save(lambda: _tiny_pipeline(**DOMAIN_LAYOUT), out)


def _save(make, out: Path) -> Path:
    import torch

    # Same weights on every build, without reseeding the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = make()
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_pipeline(
    vae_channels: tuple[int, ...] = SD15_LAYOUT["vae_channels"],
    unet_channels: tuple[int, ...] = SD15_LAYOUT["unet_channels"],
    latent_side: int = SD15_LAYOUT["latent_side"],
    vae_groups: int = SD15_LAYOUT["vae_groups"],
):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = build_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",  # SD1.5's CLIP ViT-L/14
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )
    unet = UNet2DConditionModel(
        sample_size=latent_side,  # SD15_LAYOUT: 64 px images at the VAE's 8x scale
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
        cross_attention_dim=HIDDEN,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=vae_channels,  # SD15_LAYOUT: four levels, SD1.5's 8x latent scale
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        layers_per_block=1,
        norm_num_groups=vae_groups,
        sample_size=latent_side * 2 ** (len(vae_channels) - 1),
        scaling_factor=0.18215,  # SD1.5's
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
