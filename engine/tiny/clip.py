"""A tiny random-weight CLIP (text + vision towers, projections, processor), built offline from configs.

For the label-fidelity filter (`actors/fidelity_filter.py`), which loads it with `CLIPModel.from_pretrained`
and `CLIPProcessor.from_pretrained` as it loads `openai/clip-vit-large-patch14` on a cluster. The tokenizer is
tiny SDXL's offline CLIP tokenizer, so any prompt tokenizes.
"""

from __future__ import annotations

from pathlib import Path

from engine.tiny.sdxl import BOS, EOS, build_tokenizer

IMAGE_SIZE = 32


def build_clip(out: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, vocab = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    # Same weights on every build, without reseeding the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
    )
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
