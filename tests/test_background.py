"""BackgroundGenerator on the tiny offline SDXL pipeline (CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.background import NONFINITE, BackgroundGenerator
from engine import schema
from engine.config import BackgroundConfig, ModelRef

HEIGHT, WIDTH = 64, 48  # non-square, so swapped axes would show


def make_config(model_dir, **overrides) -> BackgroundConfig:
    fields = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, device="cpu", dtype="float32")
    fields.update(overrides)
    return BackgroundConfig(model=ModelRef(id=str(model_dir)), **fields)


def make_batch(prompts: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
    return {
        schema.ID: np.array([f"row{i}" for i in range(len(prompts))]),
        schema.PROMPT: np.array(prompts, dtype=object),
        schema.SEED: np.array(seeds, dtype=np.int64),
    }


@pytest.fixture(scope="module")
def sdxl_dir(tiny_models_dir):
    return tiny_models_dir / "sdxl"


@pytest.fixture(scope="module")
def generator(sdxl_dir) -> BackgroundGenerator:
    return BackgroundGenerator(make_config(sdxl_dir))


def test_tiny_sdxl_loads_as_sdxl_pipeline_and_tokenizes_any_text(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from engine.tiny.sdxl import PROMPT_WORDS

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, use_safetensors=True)
    assert pipe.vae_scale_factor == 8
    tokenizer = CLIPTokenizer.from_pretrained(sdxl_dir / "tokenizer_2")
    assert tokenizer.model_max_length == 77
    # Prompt words are whole tokens; anything else falls back to byte symbols, never to unknown.
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in PROMPT_WORDS)
    ids = tokenizer("Zyxq 日本 ☃!!", add_special_tokens=False).input_ids
    assert len(ids) > 5 and tokenizer.unk_token_id not in ids


def test_writes_one_uint8_image_per_row_and_keeps_input_columns(generator):
    batch = make_batch(["a misty forest at dawn", "city street at night", "some unseen wörds"], [1, 2, 3])
    out = generator(batch)

    assert set(batch) <= set(out)
    np.testing.assert_array_equal(out[schema.ID], batch[schema.ID])
    backgrounds = out[schema.BACKGROUND]
    assert backgrounds.dtype == object and len(backgrounds) == 3
    for image in backgrounds:
        assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
        assert image.std() > 0  # an actual picture, not a constant fill
    assert list(out[schema.ERROR]) == ["", "", ""]


def test_same_seed_same_image_and_different_seeds_differ(generator):
    first = generator(make_batch(["a sandy beach", "a sandy beach"], [7, 8]))[schema.BACKGROUND]
    again = generator(make_batch(["a sandy beach", "a sandy beach"], [7, 8]))[schema.BACKGROUND]

    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert np.abs(first[0].astype(int) - first[1].astype(int)).mean() > 1.0


def test_row_image_does_not_depend_on_batch_composition(generator):
    alone = generator(make_batch(["snowy mountain valley"], [123]))[schema.BACKGROUND][0]
    prompts = ["desert", "harbor at noon", "snowy mountain valley", "a quiet library", "x"]
    inside = generator(make_batch(prompts, [5, 6, 123, 8, 9]))[schema.BACKGROUND][2]
    # Measured exact on CPU/float32 (batch sizes 1-16, any position): per-row generators, and the tiny
    # model's kernels give the same per-row results whatever the batch size. GPU kernels need not.
    np.testing.assert_array_equal(alone, inside)


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-sdxl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        BackgroundGenerator(make_config(missing))


def test_missing_columns_are_named(generator):
    with pytest.raises(ValueError, match="seed"):
        generator({schema.PROMPT: np.array(["a forest"], dtype=object)})


def test_size_must_fit_the_vae_scale(sdxl_dir):
    with pytest.raises(ValueError, match="multiples of 8"):
        BackgroundGenerator(make_config(sdxl_dir, height=60))


def test_nonfinite_rows_are_marked_not_raised(generator, monkeypatch):
    calls = []

    def fake_pipe(**kwargs):
        calls.append(kwargs)
        images = np.full((len(kwargs["prompt"]), HEIGHT, WIDTH, 3), 0.5, dtype=np.float32)
        images[1, 0, 0, 0] = np.nan  # what an fp16 overflow in the VAE looks like
        return type("Output", (), {"images": images})()

    monkeypatch.setattr(generator, "pipe", fake_pipe)
    batch = make_batch(["a", "b", "c"], [1, 2, 3])
    # A fixed-width '<U0' error column, as numpy makes from all-empty strings, must not truncate the reason.
    batch[schema.ERROR] = np.array(["", "", ""])
    batch[schema.ERROR_MESSAGE] = np.array(["", "", ""])
    out = generator(batch)

    assert list(out[schema.ERROR]) == ["", NONFINITE, ""]
    assert "NaN" in out[schema.ERROR_MESSAGE][1] and out[schema.ERROR_MESSAGE][0] == ""
    assert out[schema.BACKGROUND][1].dtype == np.uint8
    assert len(calls) == 1 and len(calls[0]["generator"]) == 3  # one pipeline call, one generator per row
    assert calls[0]["negative_prompt"] == [generator.config.negative_prompt] * 3


def test_empty_negative_prompt_is_passed_as_none(sdxl_dir):
    # None lets SDXL's `force_zeros_for_empty_prompt` use zero embeddings, as the model was trained.
    assert BackgroundGenerator(make_config(sdxl_dir, negative_prompt="")).negative_prompt is None


def test_empty_batch_gives_empty_columns(generator):
    out = generator(make_batch([], []))
    assert len(out[schema.BACKGROUND]) == 0 and len(out[schema.ERROR]) == 0


def test_gpu_tunings_are_typed_options_off_by_default(sdxl_dir):
    from pydantic import ValidationError

    config = make_config(sdxl_dir)
    assert (config.channels_last, config.fuse_qkv, config.compile_mode) == (False, False, None)
    with pytest.raises(ValidationError, match="compile_mode"):
        make_config(sdxl_dir, compile_mode="fastest")
    assert make_config(sdxl_dir, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"


def test_channels_last_and_fused_qkv_are_applied_and_keep_the_images(sdxl_dir, generator):
    import torch
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    tuned = BackgroundGenerator(make_config(sdxl_dir, channels_last=True, fuse_qkv=True))
    unet = tuned.pipe.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tuned.pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    assert not generator.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    batch = make_batch(["a misty forest at dawn", "city street at night"], [5, 6])
    expected, got = generator(batch)[schema.BACKGROUND], tuned(batch)[schema.BACKGROUND]
    # The same math in another memory layout and one matmul for q/k/v: float32 rounding differs at most.
    for a, b in zip(expected, got, strict=True):
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1


def test_long_prompts_are_cut_to_what_the_text_encoder_reads(generator, caplog):
    """A prompt past CLIP's 77 tokens: the row keeps the text that was read and the number of tokens cut,
    and the tokenizer's per-batch 'sequence length' warning no longer appears."""
    import logging

    from actors.background import PROMPT_TRIMMED

    long_prompt = " ".join(["a quiet meadow under soft morning light"] * 20)
    with caplog.at_level(logging.WARNING):
        out = generator(make_batch([long_prompt, "a quiet meadow"], [1, 2]))
    trimmed = list(out[PROMPT_TRIMMED])
    tokenizer = generator.pipe.tokenizer
    assert trimmed[0] == len(tokenizer(long_prompt, add_special_tokens=False, verbose=False).input_ids) - 75
    assert trimmed[1] == 0 and out[schema.PROMPT][1] == "a quiet meadow"
    assert len(tokenizer(out[schema.PROMPT][0], add_special_tokens=False).input_ids) <= 75
    assert out[schema.PROMPT][0].startswith("a quiet meadow under soft morning light")
    assert "sequence length" not in caplog.text and "truncated" not in caplog.text


def test_fitted_prompts_are_read_whole_by_every_tokenizer(sdxl_dir):
    """Cut ids decoded and tokenized again are not always the same ids (a word cut mid-BPE re-tokenizes
    longer): on random-character prompts, like a random-weight LLM writes, a one-shot cut by the first
    tokenizer leaves some over 75 tokens; the fit leaves none, for both of SDXL's tokenizers."""
    from transformers import CLIPTokenizer

    from actors.background import fit_prompts

    tokenizers = [CLIPTokenizer.from_pretrained(sdxl_dir / name) for name in ("tokenizer", "tokenizer_2")]
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz,.!")
    prompts = [
        " ".join("".join(rng.choice(letters, size=rng.integers(2, 12))) for _ in range(60))
        for _ in range(200)
    ]

    def count(tokenizer, text):
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    one_shot = [
        tokenizers[0].decode(tokenizers[0](p, add_special_tokens=False).input_ids[:75]) for p in prompts
    ]
    assert sum(max(count(t, p) for t in tokenizers) > 75 for p in one_shot) > 0, "the case this guards"
    fitted, trimmed = fit_prompts(tokenizers, prompts)
    assert all(max(count(t, p) for t in tokenizers) <= 75 for p in fitted)
    assert all(
        count(tokenizers[0], p) - count(tokenizers[0], f) == n
        for p, f, n in zip(prompts, fitted, trimmed, strict=True)
    )


def test_an_sd15_pipeline_draws_backgrounds_with_a_negative_prompt(tiny_models_dir):
    """AGA's background stage on an SD1.5-layout pipeline (what a domain generator trained by `synthray
    finetune` method full is): its pipeline takes the negative prompt only as a list beside a list."""
    config = make_config(tiny_models_dir / "sd15", negative_prompt="people, text")
    out = BackgroundGenerator(config)(make_batch(["grass", "water"], [1, 2]))
    assert list(out[schema.ERROR]) == ["", ""]
    assert [b.shape for b in out[schema.BACKGROUND]] == [(HEIGHT, WIDTH, 3)] * 2
