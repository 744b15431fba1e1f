"""Tiny random-weight chat LLM (Llama architecture) with a tokenizer built offline from a word list.

Stands in for the instruction LLM of the AGA background prompts: same `from_pretrained`, chat template and
`generate` path as a real checkpoint. head_dim is 64 because vLLM's CPU attention rejects small head dims
and the vLLM stage runs this same model.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.methods.background_prompts import FALLBACK_STYLES, INSTRUCTION_SUFFIX, INSTRUCTIONS, SCENES, TIMES

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One user/assistant turn per message, each closed by EOS: generation stops at the end of its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }} {{ message['content'] }} {{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Enough ordinary words for a random model to emit sentence-like gibberish, plus a few common class names
# ("cat", "dog", ...) so the forbidden-word filter has something to catch.
EXTRA_WORDS = """
a an the of and or in on at to with by from over under near behind beside across through along
is are was were has have there here this that its their it
sky sun clouds cloud light shadow shadows trees tree grass water waves sand stone rocks hills hill
bright dark soft warm cold calm gentle misty empty wide open distant green blue grey gray white golden
orange pink purple brown silver pale deep quiet peaceful serene
photo photograph background scene view landscape place description
cat cats dog dogs bird birds car cars person people animal animals horse boat
. , ; : ! ? ' " - ( )
""".split()


def vocabulary() -> list[str]:
    """Special tokens first, then every word of the templates and the extra words (lower case)."""
    words: set[str] = set(EXTRA_WORDS)
    for text in (*INSTRUCTIONS, INSTRUCTION_SUFFIX, *SCENES, *TIMES, *FALLBACK_STYLES):
        words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    return [PAD, BOS, EOS, UNK, *ROLE_TOKENS, *sorted(words)]


def build_tokenizer():
    return word_level_tokenizer(
        vocabulary(), (BOS, EOS, PAD, UNK), list(ROLE_TOKENS), CHAT_TEMPLATE, model_max_length=512
    )


def word_level_tokenizer(
    words: list[str],
    specials: tuple[str, str, str, str],
    extra_special_tokens: list[str],
    chat_template: str,
    model_max_length: int,
):
    """A lower-casing word-level tokenizer over `words`; `specials` are its (bos, eos, pad, unk) tokens.
    Shared by the tiny LLM and the tiny VLM."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk = specials
    vocab = {token: i for i, token in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(
        prefix="##", cleanup=True
    )  # joins words with spaces, tidies punctuation
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=extra_special_tokens,
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_llm(out: Path) -> Path:
    """Write a tiny `LlamaForCausalLM` and its tokenizer (safetensors) into exactly `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=48,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
