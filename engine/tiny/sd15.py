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


def build_sd15(out: Path) -> Path:
    """Write a tiny `StableDiffusionPipeline` to `out` (safetensors) and return `out`."""
    import torch

    # Same weights on every build, without reseeding the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _tiny_pipeline()
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_pipeline():
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
        sample_size=8,  # latent side: 64 px images at the VAE's 8x scale
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
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
        block_out_channels=(8, 8, 8, 8),  # four levels: SD1.5's 8x latent scale
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
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
