"""Random-weight models with the real architectures, for benchmarks/gpu_stages.py.

The compute of a forward pass depends on the architecture and the input shapes, not on the weights, so these
models cost what the real checkpoints cost without downloading them (the GPU machine has no network). The
configs are written out from the published ones:
- SDXL: stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/, scheduler/);
- SAM: facebook/sam-vit-huge (segment_anything's `build_sam_vit_h`);
- GroundingDINO: IDEA-Research/grounding-dino-tiny (transformers' default GroundingDinoConfig: Swin-T,
  bert-base) and IDEA-Research/grounding-dino-base (Swin-B at 384 px, window 12; bert-base).
With `tiny=True` every builder returns the offline tiny model of `engine/tiny/` instead, for the CPU smoke run.
"""

from __future__ import annotations

from pathlib import Path

# --------------------------------------------------------------------------- SDXL base 1.0

SDXL_UNET = dict(
    sample_size=128,  # latent side: 1024 px at the VAE's 8x scale
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # diffusers' legacy name: these are head counts (64-wide heads)
    cross_attention_dim=2048,  # 768 (CLIP-L) + 1280 (OpenCLIP bigG), concatenated
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 micro-conditions x 256 + the 1280-wide pooled text
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,  # the pipeline decodes in float32 when the VAE is float16: part of the plain call's cost
)
# CLIP ViT-L/14's text tower.
SDXL_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    layer_norm_eps=1e-5,
)
# OpenCLIP ViT-bigG/14's text tower (CLIPTextModelWithProjection: its pooled projection conditions the UNet).
SDXL_TEXT_ENCODER_2 = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
    layer_norm_eps=1e-5,
)

# --------------------------------------------------------------------------- SAM ViT-H, GroundingDINO

SAM_VIT_H = dict(
    hidden_size=1280,
    num_hidden_layers=32,
    num_attention_heads=16,
    global_attn_indexes=[7, 15, 23, 31],
    image_size=1024,
    patch_size=16,
    window_size=14,
    mlp_dim=5120,
    output_channels=256,
)
SWIN_B_384 = dict(
    image_size=384,
    patch_size=4,
    embed_dim=128,
    depths=[2, 2, 18, 2],
    num_heads=[4, 8, 16, 32],
    window_size=12,
    out_indices=[2, 3, 4],
)
# "a dog. a cat." as GroundingDINO's processor tokenizes it. bert-base-uncased ids for the full-size models;
# the tiny model's vocabulary has the same words (engine/tiny/segmentation.py).
DETECTOR_PROMPT = ["[CLS]", "a", "dog", ".", "a", "cat", ".", "[SEP]"]
BERT_BASE_UNCASED_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "a": 1037, "dog": 3899, "cat": 4937}
# A 3:2 photo as the processor resizes it (shortest edge 800, longest at most 1333).
DETECTOR_IMAGE_HW = (800, 1200)
TINY_DETECTOR_IMAGE_HW = (64, 96)


def build_sdxl(out: Path, device: str, tiny: bool) -> Path:
    """Save a random-weight SDXL pipeline (float16 safetensors; float32 when tiny) to `out`; return `out`.

    Built on `device`: initialising 3.5 B parameters is minutes on a CPU and seconds on a GPU.
    """
    if tiny:
        from engine.tiny.sdxl import build_sdxl as build_tiny_sdxl

        return build_tiny_sdxl(out)

    import torch

    pipe = sdxl_pipeline(device)
    pipe.to(dtype=torch.float16)  # what the hub ships, and half the bytes to write and read back
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def sdxl_pipeline(device: str):
    """The full-size random-weight `StableDiffusionXLPipeline` (float32), its models created on `device`."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.tiny.sdxl import BOS, EOS, SDXL_SCHEDULER, build_tokenizer

    # The offline byte-level BPE tokenizer: prompts tokenize to realistic lengths and are padded to 77 tokens
    # as with the real one. The encoders pool at its end-of-text id, so their special ids must be its ids.
    tokenizer, vocab = build_tokenizer()
    special_ids = dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    torch.manual_seed(0)
    # Only the models under the device context: the scheduler turns tensors into numpy arrays as it starts.
    with torch.device(device):
        models = dict(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER, **special_ids)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_2, **special_ids)),
            unet=UNet2DConditionModel(**SDXL_UNET),
        )
    return StableDiffusionXLPipeline(
        **models,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )


def build_sam(work_dir: Path, device: str, dtype, tiny: bool):
    """A transformers `SamModel` (what actors/segmenter.py loads), ViT-H or tiny; returns (model, image side)."""
    import torch
    from transformers import SamConfig, SamModel, SamVisionConfig

    if tiny:
        from engine.tiny.segmentation import build_sam as build_tiny_sam

        path = Path(work_dir) / "sam-tiny"
        if not path.exists():
            build_tiny_sam(path)
        model = SamModel.from_pretrained(path)
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = SamModel(SamConfig(vision_config=SamVisionConfig(**SAM_VIT_H)))
    model = model.to(device, dtype).eval()
    return model, model.config.vision_config.image_size


def build_grounding_dino(name: str, work_dir: Path, device: str, dtype, tiny: bool):
    """GroundingDINO `tiny` or `base` (random weights); with `tiny=True` the engine's tiny model for both."""
    import torch
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    if name not in ("tiny", "base"):
        raise ValueError(f"unknown GroundingDINO size {name!r}; available: tiny, base")
    if tiny:
        from engine.tiny.segmentation import build_grounding_dino as build_tiny_grounding_dino

        path = Path(work_dir) / "grounding-dino-tiny-random"
        if not path.exists():
            build_tiny_grounding_dino(path)
        model = GroundingDinoForObjectDetection.from_pretrained(path)
    else:
        # Defaults are grounding-dino-tiny's: Swin-T backbone, bert-base text, d_model 256, 6+6 layers,
        # 900 queries, 4 feature levels.
        config = (
            GroundingDinoConfig()
            if name == "tiny"
            else GroundingDinoConfig(backbone_config=SwinConfig(**SWIN_B_384))
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = GroundingDinoForObjectDetection(config)
    return model.to(device, dtype).eval()


def detector_prompt_ids(tiny: bool) -> list[int]:
    if tiny:
        from engine.tiny.segmentation import tokenizer_vocab

        vocab = tokenizer_vocab()
        return [vocab[token] for token in DETECTOR_PROMPT]
    return [BERT_BASE_UNCASED_IDS[token] for token in DETECTOR_PROMPT]
