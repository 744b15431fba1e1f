"""A tiny random-weight SDXL text-to-image pipeline, built offline from configs.

The layout is the real one (two CLIP text encoders, a "text_time" UNet, a VAE with the SDXL 8x latent
scale, an Euler scheduler), so `StableDiffusionXLPipeline.from_pretrained` runs its real code path; only the
widths are tiny: four 64 px images with 2-4 steps take about 0.05 s on 2 CPU cores once warm.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# Words the background-prompt stage tends to produce. Each becomes a single BPE token; any other text still
# tokenizes through the 256 byte-level symbols every byte-level BPE vocabulary holds.
PROMPT_WORDS = """
a an the of in on at with and under over by near behind through during without photo photograph picture
image scene view background landscape realistic detailed high quality sharp natural light lighting soft
warm cold bright dark dim sunny cloudy rainy foggy misty snowy stormy windy clear sky clouds sun moon stars
morning noon afternoon evening night dawn dusk sunset sunrise twilight midnight spring summer autumn fall
winter season day time forest woods jungle tree trees leaves grass meadow field farm garden park flowers
mountain mountains hill hills valley cliff rock rocks stone cave canyon desert sand dune beach coast shore
sea ocean wave waves lake river stream waterfall pond water ice glacier snow swamp marsh island volcano
city town village street road path bridge building buildings house room kitchen bedroom office studio
indoor outdoor interior wall floor table shelf window door market station airport harbor stadium library
classroom cafe restaurant empty quiet calm peaceful busy wide open distant close blue green red yellow
orange purple white black gray brown golden silver colorful wooden old new modern ancient rustic urban
rural wild tropical arctic underwater aerial people person animal text watermark blurry noisy cartoon
""".split()

# Real CLIP puts its two special tokens last; the text encoder pools at the end-of-text id.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

HIDDEN = 32  # per text encoder; the UNet cross-attends to both, concatenated
PROJECTION_DIM = 32  # text_encoder_2's pooled projection, fed to the UNet's "text_time" embedding
TIME_EMBED_DIM = 8  # per SDXL micro-condition (original size, crop, target size: 6 numbers)
# SDXL base's scheduler config: the tiny pipeline and the full-size GPU benchmark (benchmarks/gpu_models.py)
# use the real one.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    prediction_type="epsilon",
)


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab + merges in CLIP's format: byte symbols, then merges learned from `PROMPT_WORDS`."""
    from tokenizers import pre_tokenizers

    merges = learn_merges(PROMPT_WORDS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def build_tokenizer():
    """The offline CLIP tokenizer (padded to 77 tokens like the real one) and its vocab."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77), vocab


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training until every word is one symbol; ties break alphabetically, so builds are identical.

    (The `tokenizers` trainer breaks ties differently from run to run, which would change token ids.)
    """
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words), "byte-level symbols == letters"
    pieces = [[*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for p in pieces for pair in zip(p, p[1:], strict=False))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        pieces = [_merge(p, best) for p in pieces]


def _merge(piece: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(piece):
        if i + 1 < len(piece) and (piece[i], piece[i + 1]) == pair:
            merged.append(piece[i] + piece[i + 1])
            i += 2
        else:
            merged.append(piece[i])
            i += 1
    return merged


def build_sdxl(out: Path) -> Path:
    """Write a tiny `StableDiffusionXLPipeline` to `out` (safetensors) and return `out`."""
    import torch

    # Same weights on every build, without reseeding the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _tiny_pipeline()
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _tiny_pipeline():
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = build_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,  # SDXL reads the penultimate hidden state, so at least two layers
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=PROJECTION_DIM,
        hidden_act="gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    unet = UNet2DConditionModel(
        sample_size=8,  # latent side: 64 px images at the VAE's 8x scale
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        norm_num_groups=8,
        cross_attention_dim=2 * HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        # Four levels give SDXL's 8x latent scale; one layer each and 8 channels keep decoding cheap.
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,  # SDXL's
    )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
