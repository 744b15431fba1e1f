"""Tiny random-weight BLIP-2 (ViT + Q-Former + OPT) with an offline tokenizer and image processor.

Stands in for MVC's captioner (`Salesforce/blip2-opt-2.7b`): the same `Blip2ForConditionalGeneration`
checkpoint layout and `Blip2Processor` files (image processor, tokenizer with the `<image>` token,
`num_query_tokens`), so `actors.captioner.Captioner` loads it through the real `from_pretrained` path. BLIP-2
has no chat template: it captions an image with no text prompt.

Sizes: 32 px images in 8 px patches (16 patches), vision/Q-Former/OPT hidden 32 with one layer each, 4 query
tokens, a word-level vocabulary of about 200 words (the tiny VLM's caption words).
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.tiny.llm import EXTRA_WORDS, word_level_tokenizer
from engine.tiny.vlm import CAPTION_WORDS

# OPT's special tokens, in OPT's order; BLIP-2's processor puts `num_query_tokens` image tokens first.
BOS, PAD, EOS, UNK, IMAGE = "<s>", "<pad>", "</s>", "<unk>", "<image>"
IMAGE_SIZE, PATCH_SIZE, HIDDEN, NUM_QUERY_TOKENS = 32, 8, 32, 4


def vocabulary() -> list[str]:
    words = {w for word in (*EXTRA_WORDS, *CAPTION_WORDS) for w in re.findall(r"\w+|[^\w\s]", word.lower())}
    return [BOS, PAD, EOS, UNK, IMAGE, *sorted(words)]


def build_processor():
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = word_level_tokenizer(vocabulary(), (BOS, EOS, PAD, UNK), [IMAGE], None, model_max_length=512)
    # The PIL backend needs no torchvision; 32 px, the vision tower's size.
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )


def build_blip2(out: Path) -> Path:
    """Write a tiny `Blip2ForConditionalGeneration` (OPT language model) with its processor into `out`."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, GenerationConfig

    out = Path(out)
    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (BOS, PAD, EOS, IMAGE)}
    config = Blip2Config(
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        qformer_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": HIDDEN,
            "ffn_dim": 64,
            "word_embed_proj_dim": HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
            "pad_token_id": ids[PAD],
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=HIDDEN,
        image_token_index=ids[IMAGE],
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], max_new_tokens=24
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
