"""AGA background prompts: template engine (composition, cleaning, fallback) and the transformers actor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.config import ModelRef, PromptConfig
from engine.methods.background_prompts import INSTRUCTIONS, SCENES, TIMES, BackgroundPromptEngine

CLASSES = ["cat", "dog", "bird"]
SUPERCLASSES = {"cat": "animal", "dog": "animal", "bird": "animal"}
# Class sets that collide with template words, plural-only names and multiword names.
CLASS_SETS = [
    CLASSES + ["animal"],
    ["beach", "forest", "lake", "sunset", "summer", "kitchen", "road"],
    ["golden retriever", "sea lion", "garden spider", "Black-footed Albatross"],
    ["sneakers", "puppy", "wolf", "person", "train"],
]


def independent_hits(text: str, names: list[str]) -> list[str]:
    """A second, simpler check of forbidden words (each word of each name, optional s/es)."""
    words = {w for name in names for w in re.findall(r"[a-z]+", name.lower()) if len(w) > 2}
    return [w for w in words if re.search(rf"\b{w}(?:s|es)?\b", text, re.IGNORECASE)]


# --------------------------------------------------------------------------- templates and composition


def test_default_template_sizes():
    assert len(set(INSTRUCTIONS)) >= 3 and len(set(SCENES)) >= 18 and len(set(TIMES)) >= 13
    engine = BackgroundPromptEngine()
    assert (len(engine.instructions), len(engine.scenes), len(engine.times)) == (3, 18, 13)
    assert engine.num_combinations == 3 * 18 * 13


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_instructions": len(INSTRUCTIONS) + 1},
        {"num_scenes": len(SCENES) + 1},
        {"num_times": len(TIMES) + 1},
        {"num_scenes": 0},
    ],
)
def test_too_many_templates_raise(kwargs):
    with pytest.raises(ValueError, match="template|must be"):
        BackgroundPromptEngine(**kwargs)


def test_forbidden_templates_are_dropped_and_counted(caplog):
    engine = BackgroundPromptEngine(forbidden_words=["beach", "autumn"], num_scenes=18, num_times=5)
    assert not any("beach" in s for s in engine.scenes)
    assert not any("autumn" in t for t in engine.times)
    assert engine.shortfalls == {} and engine.notes == []
    # Forbidding every template's words empties the pools: a neutral setting, counted, never an error.
    words = ["a", "an", "the", "at", "on", "in", "under", "as", "after", "before", "during"]
    engine = BackgroundPromptEngine(forbidden_words=words)
    assert engine.shortfalls == {"scene": 18, "time": 13}
    assert len(engine.notes) == 2 and all(note in caplog.text for note in engine.notes)
    for seed in range(50):
        composed, fallback = engine.compose(seed), engine.fallback(seed)
        assert "  " not in composed.text and not engine.contains_forbidden(fallback)
        assert fallback.startswith(composed.setting) and composed.setting
    # Fewer left than asked for: all that are left, counted.
    engine = BackgroundPromptEngine(forbidden_words=["spring", "winter", "summer", "autumn"], num_times=40)
    assert engine.shortfalls == {"time": 40 - len(engine.times)} and len(engine.times) >= 30


# --------------------------------------------------------------------------- real datasets' class names

CLASS_NAME_FILES = sorted((Path(__file__).parent / "data" / "class_names").glob("*.txt"))
STOPWORDS = {"a", "an", "the", "of", "and", "or", "in", "on", "at", "to", "for", "with", "des"}


def read_class_names(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def words_hit(text: str, names: list[str]) -> list[str]:
    """An independent check: content words (2+ letters, not numbers) of any name, as whole words with
    an optional s/es, in `text`."""
    words = set()
    for name in names:
        parts = re.findall(r"[^\W_]+", name.lower())
        words.update(
            p for p in parts if len(parts) == 1 or (p not in STOPWORDS and len(p) > 1 and not p.isdigit())
        )
    found = re.findall(r"[^\W_]+", text.lower())
    return sorted(
        {w for w in found for base in (w, w.removesuffix("s"), w.removesuffix("es")) if base in words}
    )


def test_class_name_files_are_real_lists():
    sizes = {path.stem: len(read_class_names(path)) for path in CLASS_NAME_FILES}
    assert sizes["food101"] == 101 and sizes["cub200"] == 200 and sizes["imagenet1k"] >= 990
    assert sizes["iwildcam"] >= 100


@pytest.mark.parametrize("path", CLASS_NAME_FILES, ids=lambda p: p.stem)
def test_real_dataset_class_names_all_yield_prompts(path):
    """Every class of Food-101, CUB-200, ImageNet-1k and iWildCam gets a question and a template fallback
    free of every class word, with the default template counts (no pool comes up short)."""
    names = read_class_names(path)
    config = PromptConfig(model=ModelRef(id="/models/llm"))
    engine = BackgroundPromptEngine.from_config(config, names)
    assert engine.shortfalls == {}, engine.notes
    assert engine.num_combinations == config.num_instructions * config.num_scenes * config.num_times
    for template in [*engine.scenes, *engine.times, *engine.styles]:
        assert not words_hit(template, names), template
    for row, name in enumerate(names):
        seed = row * 7919
        composed, fallback = engine.compose(seed), engine.fallback(seed)
        assert composed.scene and composed.time and name
        assert fallback.startswith(composed.setting) and not words_hit(fallback, names), (name, fallback)


def test_odd_class_names_do_not_forbid_everything():
    """Single letters and numbers of multiword names ("T-shirt", CUB's "001." prefix) are not words."""
    engine = BackgroundPromptEngine(
        forbidden_words=["T-shirt", "001.Black_footed_Albatross", "jack-o'-lantern"]
    )
    assert not engine.contains_forbidden("a town where the light isn't harsh at 001 hours")
    assert engine.contains_forbidden("a shirt") and engine.contains_forbidden("an albatross")


def test_compose_is_deterministic_and_diverse():
    engine = BackgroundPromptEngine()
    assert engine.compose(123) == engine.compose(123)
    picks = [engine.compose(seed) for seed in range(3000)]
    combos = {(c.instruction, c.scene, c.time) for c in picks}
    assert len(combos) > 0.9 * engine.num_combinations
    assert {c.scene for c in picks} == set(engine.scenes)
    assert {c.time for c in picks} == set(engine.times)
    assert {c.instruction for c in picks} == set(engine.instructions)
    first = picks[7]
    assert f"{first.instruction} {first.scene} {first.time}." in first.text
    assert first.messages == [{"role": "user", "content": first.text}]


def test_compose_is_stable_across_processes():
    code = "from engine.methods.background_prompts import BackgroundPromptEngine as E; print(E().compose(99).text)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == BackgroundPromptEngine().compose(99).text


# --------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            '"Background: A misty pine forest at dawn, soft light."',
            "A misty pine forest at dawn, soft light.",
        ),
        (
            "<|assistant|> Sure! Here is a description:\n\n**Description:** 'a quiet beach at sunset'</s>",
            "a quiet beach at sunset",
        ),
        ("  a   quiet \t beach\x00 at\x07 dusk  ", "a quiet beach at dusk"),
        (
            "- \u201cA foggy harbor with wooden piers\u201d\nSecond line ignored.",
            "A foggy harbor with wooden piers",
        ),
        ("<think>the user wants a beach</think>\nA calm lake at noon.", "A calm lake at noon."),
        ("The category of a wide open field at noon", "The category of a wide open field at noon"),
    ],
)
def test_clean_accepts_and_tidies(raw, expected):
    assert BackgroundPromptEngine(forbidden_words=CLASSES).clean(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "Two cats sleeping on a quiet beach at sunset",
        "A CAT's shadow on a sunlit wall",
        "a dog-friendly park in spring",
        "Birds flying over a calm lake",
        "",
        "   ",
        None,
        "ok.",
        "!!! ### 123 ... ??? ---",
        "<think>still thinking about the beach and the light",
    ],
)
def test_clean_rejects(raw):
    assert BackgroundPromptEngine(forbidden_words=CLASSES).clean(raw) is None


def test_forbidden_forms_and_multiword_names():
    engine = BackgroundPromptEngine(
        num_scenes=10,
        num_times=10,
        forbidden_words=["golden retriever", "puppy", "wolf", "person", "sneakers"],
    )
    for text in [
        "a retriever",
        "golden light",
        "three puppies",
        "wolves at night",
        "people walking",
        "a sneaker",
    ]:
        assert engine.contains_forbidden(text), text
    assert not engine.contains_forbidden("a wolfram lamp on a personal desk")
    # Stopwords of multiword names are not forbidden on their own.
    lake = BackgroundPromptEngine(forbidden_words=["lady of the lake"])
    assert lake.contains_forbidden("the lady") and not lake.contains_forbidden("the top of a hill")


def test_clean_caps_length_on_a_word_boundary():
    engine = BackgroundPromptEngine(max_chars=60)
    cleaned = engine.clean("a very long description of a quiet field " * 10)
    assert cleaned is not None and len(cleaned) <= 60
    assert ("a very long description of a quiet field " * 10).startswith(cleaned + " ")


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("names", CLASS_SETS)
def test_fallback_never_contains_forbidden_words(names):
    engine = BackgroundPromptEngine(num_scenes=10, num_times=8, forbidden_words=names)
    for template in [*engine.scenes, *engine.times, *engine.styles]:
        assert not independent_hits(template, names), template
    for seed in range(400):
        text = engine.fallback(seed)
        assert not engine.contains_forbidden(text), text
        assert not independent_hits(text, names), text
        assert text.startswith(engine.compose(seed).setting)
    assert engine.fallback(5) == engine.fallback(5)


# --------------------------------------------------------------------------- the actor on the tiny LLM


@pytest.fixture(scope="module")
def llm_dir(tiny_models_dir):
    return tiny_models_dir / "llm"


@pytest.fixture(scope="module")
def config(llm_dir):
    return PromptConfig(model=ModelRef(id=str(llm_dir)), max_new_tokens=24)


@pytest.fixture(scope="module")
def writer(config):
    from actors.prompt_writer import PromptWriter

    return PromptWriter(config, CLASSES, SUPERCLASSES)


def make_batch(seeds) -> dict[str, np.ndarray]:
    seeds = np.asarray(seeds, dtype=np.int64)
    return {
        "seed": seeds,
        "class_name": np.array([CLASSES[s % 3] for s in seeds], dtype=object),
        "id": np.array([f"row-{s}" for s in seeds], dtype=object),
    }


SEEDS = [int(s) for s in np.random.default_rng(0).integers(0, 2**31 - 1, size=16)]


def test_row_seeded_sampler():
    import torch

    from actors.prompt_writer import RowSeededSampler

    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def pick(seeds, rows, temperature=1.0, top_p=1.0):
        masked = RowSeededSampler(seeds, temperature, top_p)(None, scores[rows])
        assert torch.isfinite(masked).sum(dim=-1).tolist() == [1] * len(rows)  # one token per row
        return masked.argmax(dim=-1).tolist()

    assert pick([1, 2, 3], [0, 1, 2], temperature=0.0) == scores.argmax(dim=-1).tolist()
    assert pick([1, 2, 3], [0, 1, 2], top_p=1e-6) == scores.argmax(dim=-1).tolist()
    # A row's draw depends on its own seed and logits only.
    assert pick([7, 8, 9], [0, 1, 2])[1] == pick([8], [1])[0]
    draws = {pick([seed], [0], temperature=5.0)[0] for seed in range(40)}
    assert len(draws) > 5


def test_tiny_llm_loads_offline(llm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    model = AutoModelForCausalLM.from_pretrained(llm_dir)
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer.apply_chat_template(
        BackgroundPromptEngine().compose(1).messages, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert tokenizer.unk_token_id not in ids  # the vocabulary covers the templates
    assert ids[0] == tokenizer.bos_token_id


def test_writer_columns_and_no_forbidden_words(writer):
    batch = make_batch(SEEDS)
    out = writer(batch)
    for column in [*batch, "prompt", "prompt_source", "instruction"]:
        assert len(out[column]) == len(SEEDS), column
    assert list(out["id"]) == list(batch["id"])
    assert set(out["prompt_source"]) == {"llm", "template"}  # the tiny LLM's gibberish is sometimes rejected
    forbidden = [*CLASSES, "animal"]
    assert set(forbidden) <= set(writer.prompts.forbidden_words)  # superclass names are forbidden too
    for seed, prompt, source, instruction in zip(
        SEEDS, out["prompt"], out["prompt_source"], out["instruction"], strict=True
    ):
        assert isinstance(prompt, str) and prompt
        assert not writer.prompts.contains_forbidden(prompt) and not independent_hits(prompt, forbidden)
        assert instruction == writer.prompts.compose(seed).text
        if source == "template":
            assert prompt == writer.prompts.fallback(seed)


def test_writer_filter_catches_llm_class_words(writer):
    # The tiny vocabulary holds "cat", "dogs", ...: some raw answers must contain them and be rejected.
    raw = writer.generate([writer.prompts.compose(s) for s in SEEDS])
    leaking = [text for text in raw if independent_hits(text, CLASSES)]
    assert leaking and all(writer.prompts.clean(text) is None for text in leaking)


def test_writer_is_deterministic_across_instances(writer, config):
    from actors.prompt_writer import PromptWriter

    first = writer(make_batch(SEEDS))
    second = PromptWriter(config, CLASSES, SUPERCLASSES)(make_batch(SEEDS))
    assert list(first["prompt"]) == list(second["prompt"])
    assert list(first["prompt_source"]) == list(second["prompt_source"])


def test_writer_output_does_not_depend_on_batch_composition(writer):
    seeds = SEEDS[:10]
    whole = writer.generate([writer.prompts.compose(s) for s in seeds])
    alone = [writer.generate([writer.prompts.compose(s)])[0] for s in seeds[:4]]
    assert alone == whole[:4]
    # Reversed order, mixed with other rows (different prompt lengths, so different left padding).
    mixed_seeds = [*reversed(seeds), 1, 2, 3]
    mixed = writer(make_batch(mixed_seeds))
    by_seed = dict(zip(mixed_seeds, mixed["prompt"], strict=True))
    reference = writer(make_batch(seeds))
    assert [by_seed[s] for s in seeds] == list(reference["prompt"])
    assert "llm" in set(reference["prompt_source"])  # so LLM text, not only the fallback, is compared


def test_writer_input_errors(writer, config):
    from actors.prompt_writer import PromptWriter

    with pytest.raises(ValueError, match="seed"):
        writer({"class_name": np.array(["cat"], dtype=object)})
    with pytest.raises(ValueError, match="zebra"):
        writer({"seed": np.array([1]), "class_name": np.array(["zebra"], dtype=object)})
    with pytest.raises(ValueError, match="vLLM"):
        PromptWriter(config.model_copy(update={"backend": "vllm"}), CLASSES)
    empty = writer(make_batch([]))
    assert len(empty["prompt"]) == 0 and len(empty["instruction"]) == 0


# --------------------------------------------------------------------------- the template backend


def test_domain_words_replace_the_built_in_pools():
    config = PromptConfig(
        backend="template", scenes=["grass", "water", "sand", "circle field"], times=[], styles=["toy photo"]
    )
    engine = BackgroundPromptEngine.from_config(config, ["circle", "square"])
    # Used whole, minus the scene with a class word; no time words at all is not a shortfall.
    assert engine.scenes == ["grass", "water", "sand"] and engine.times == [""]
    assert engine.shortfalls == {"scene": 1}
    prompts = {engine.fallback(seed) for seed in range(200)}
    assert prompts == {"grass, toy photo", "water, toy photo", "sand, toy photo"}
    bare = BackgroundPromptEngine.from_config(
        PromptConfig(backend="template", scenes=["sand"], styles=[]), []
    )
    assert bare.fallback(3).startswith("sand ") and bare.times[0] in TIMES  # built-in times stay by default


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend": "transformers"}, "prompt.model is required for backend 'transformers'"),
        ({"backend": "vllm"}, "prompt.model is required for backend 'vllm'"),
        (
            {"backend": "template", "scenes": ["sand"], "num_scenes": 4},
            "give prompt.scenes or prompt.num_scenes",
        ),
        ({"backend": "template", "scenes": []}, "prompt.scenes is empty"),
    ],
)
def test_template_config_errors_name_the_key(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PromptConfig(**fields)


def test_template_writer_writes_each_rows_template_without_a_model():
    from actors.template_prompts import TemplatePromptWriter

    config = PromptConfig(backend="template", scenes=["grass", "water"], times=["at noon"], styles=[])
    writer = TemplatePromptWriter(config, ["circle"])
    seeds = np.array([5, 6, 7, 5], np.int64)
    out = writer({"seed": seeds, "class_name": np.array(["circle"] * 4, object)})
    assert list(out["prompt_source"]) == ["template"] * 4
    assert set(out["prompt"]) <= {"grass at noon", "water at noon"} and out["prompt"][0] == out["prompt"][3]
    assert all("grass" in q or "water" in q for q in out["instruction"])
    # A row's prompt depends on its seed only, not on its batch.
    assert writer({"seed": seeds[2:3]})["prompt"][0] == out["prompt"][2]
