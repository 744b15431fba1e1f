"""Captions: the transformers Captioner on the tiny VLM and on the tiny BLIP-2 (`caption.model_type: blip2`),
the vLLM task's requests, and backend switching.

The vLLM backend itself (ray.data.llm + vLLM on the tiny VLM) runs in tests/test_vllm.py.
"""

import io

import numpy as np
import pytest
from PIL import Image

from actors.captioner import CAPTION, CaptionRequests, caption_stage, caption_text
from engine import schema
from engine.config import CaptionConfig, ModelRef


def images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=object)
    for i in range(n):
        out[i] = (rng.random((40 + 4 * i, 48, 3)) * 255).astype(np.uint8)
    return out


def batch(n: int) -> dict[str, np.ndarray]:
    return {
        schema.IMAGE: images(n),
        schema.CLASS_NAME: np.array(["circle", "star", "ring", "cross"][:n], dtype=object),
        schema.SEED: np.arange(7, 7 + n, dtype=np.int64),
    }


@pytest.fixture(scope="module")
def vlm_dir(tiny_models_dir):
    return tiny_models_dir / "vlm"


def test_caption_text_keeps_the_prefix_and_one_line():
    prefix = "This is an image of {class_name}. "
    assert (
        caption_text(prefix, "star", "  a red\tstar \n\nsecond line")
        == "This is an image of star. a red star"
    )
    assert caption_text(prefix, "star", "") == "This is an image of star."
    assert (
        caption_text(prefix, "star", None)
        == caption_text(prefix, "star", " \n\t\n")
        == "This is an image of star."
    )
    assert caption_text("", "star", "a red star") == "a red star"


def test_prefix_may_only_name_the_class():
    with pytest.raises(ValueError, match="class_name"):
        CaptionConfig(model=ModelRef(id="/tmp"), prefix="An image of {label}. ")


def test_backend_is_one_key():
    transformers = caption_stage(CaptionConfig(model=ModelRef(id="/tmp")))
    vllm = caption_stage(CaptionConfig(model=ModelRef(id="/tmp"), backend="vllm"))
    assert transformers.is_actor and vllm.on_dataset
    assert (
        (transformers.reads, transformers.writes)
        == (vllm.reads, vllm.writes)
        == (
            (schema.IMAGE, schema.CLASS_NAME),
            (CAPTION,),
        )
    )


def test_vllm_requests_carry_the_image_and_the_instruction():
    config = CaptionConfig(model=ModelRef(id="/tmp"), backend="vllm", instruction="What is shown?")
    b = batch(2)
    requests = CaptionRequests(config).requests(b)
    content = requests[1]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image", "text"] and content[1]["text"] == "What is shown?"
    decoded = np.asarray(Image.open(io.BytesIO(requests[1]["image"])).convert("RGB"))
    assert np.array_equal(decoded, b[schema.IMAGE][1])  # PNG: lossless
    assert requests[0]["sampling_params"]["temperature"] == 0.0


def test_transformers_captioner_on_the_tiny_vlm(vlm_dir):
    from actors.captioner import Captioner

    config = CaptionConfig(model=ModelRef(id=str(vlm_dir)), device="cpu", max_new_tokens=8)
    captioner = Captioner(config)
    out = captioner(batch(3))
    assert len(out[CAPTION]) == 3
    for caption, name in zip(out[CAPTION], ["circle", "star", "ring"], strict=True):
        assert caption.startswith(f"This is an image of {name}. ")
    # Greedy decoding: a row's caption does not depend on its batch.
    alone = captioner({k: v[1:2] for k, v in batch(3).items()})
    assert alone[CAPTION][0] == out[CAPTION][1]


def test_sampled_captions_follow_the_row_seed(vlm_dir):
    from actors.captioner import Captioner

    config = CaptionConfig(model=ModelRef(id=str(vlm_dir)), device="cpu", max_new_tokens=8, temperature=1.0)
    captioner = Captioner(config)
    full = captioner(batch(3))[CAPTION]
    tail = captioner({k: v[1:] for k, v in batch(3).items()})[CAPTION]
    assert list(tail) == list(full[1:])
    no_seed = {k: v for k, v in batch(1).items() if k != schema.SEED}
    with pytest.raises(ValueError, match="seed"):
        captioner(no_seed)


# BLIP-2 (MVC's captioner): no chat template, no text prompt.


@pytest.fixture(scope="module")
def blip2_dir(tiny_models_dir):
    return tiny_models_dir / "blip2"


def blip2_config(blip2_dir, **kwargs) -> CaptionConfig:
    return CaptionConfig(
        model=ModelRef(id=str(blip2_dir)), model_type="blip2", device="cpu", max_new_tokens=8, **kwargs
    )


def test_blip2_runs_on_transformers_only():
    with pytest.raises(ValueError, match=r"caption\.model_type 'blip2'.*caption\.backend 'transformers'"):
        CaptionConfig(model=ModelRef(id="/tmp"), model_type="blip2", backend="vllm")
    stage = caption_stage(CaptionConfig(model=ModelRef(id="/tmp"), model_type="blip2"))
    assert stage.is_actor and (stage.reads, stage.writes) == ((schema.IMAGE, schema.CLASS_NAME), (CAPTION,))


def test_blip2_refuses_an_instruction_it_would_ignore():
    with pytest.raises(ValueError, match=r"caption\.instruction.*blip2"):
        CaptionConfig(model=ModelRef(id="/tmp"), model_type="blip2", instruction="What is shown?")
    # The resolved config (every key written out, the default instruction included) loads again.
    config = CaptionConfig(model=ModelRef(id="/tmp"), model_type="blip2")
    assert CaptionConfig.model_validate(config.model_dump(mode="json")) == config


def test_model_type_chat_keeps_existing_content_hashes():
    from engine.config.loading import config_hash, content_of

    default = CaptionConfig(model=ModelRef(id="/tmp"))
    named = CaptionConfig(model=ModelRef(id="/tmp"), model_type="chat")
    blip2 = CaptionConfig(model=ModelRef(id="/tmp"), model_type="blip2")
    assert "model_type" not in content_of(default) and "model_type" not in content_of(named)
    assert config_hash(named) == config_hash(default) != config_hash(blip2)
    assert content_of(blip2)["model_type"] == "blip2"


def test_blip2_captioner_on_the_tiny_blip2(blip2_dir):
    from transformers import Blip2ForConditionalGeneration

    from actors.captioner import Captioner

    captioner = Captioner(blip2_config(blip2_dir))
    assert isinstance(captioner.model, Blip2ForConditionalGeneration)
    out = captioner(batch(3))
    assert len(out[CAPTION]) == 3
    for caption, name in zip(out[CAPTION], ["circle", "star", "ring"], strict=True):
        assert caption.startswith(f"This is an image of {name}. ")
        # Only the answer is decoded: no image placeholders or other special tokens leak into it.
        assert "<" not in caption
    assert any(len(c) > len("This is an image of circle.") for c in out[CAPTION]), "the model wrote something"
    # Greedy decoding: a row's caption does not depend on its batch.
    alone = captioner({k: v[1:2] for k, v in batch(3).items()})
    assert alone[CAPTION][0] == out[CAPTION][1]


def test_blip2_sampled_captions_follow_the_row_seed(blip2_dir):
    from actors.captioner import Captioner

    captioner = Captioner(blip2_config(blip2_dir, temperature=1.0))
    full = captioner(batch(3))[CAPTION]
    tail = captioner({k: v[1:] for k, v in batch(3).items()})[CAPTION]
    assert list(tail) == list(full[1:]), "same seed, same caption, whatever the batch"
    reseeded = {**batch(3), schema.SEED: np.arange(100, 103, dtype=np.int64)}
    assert list(captioner(reseeded)[CAPTION]) != list(full), "another seed samples other captions"
    no_seed = {k: v for k, v in batch(1).items() if k != schema.SEED}
    with pytest.raises(ValueError, match="seed"):
        captioner(no_seed)


def test_blip2_empty_answer_leaves_the_prefix_alone(blip2_dir, monkeypatch):
    import torch

    from actors.captioner import Captioner

    captioner = Captioner(blip2_config(blip2_dir))
    config, tokenizer = captioner.model.config, captioner.processor.tokenizer
    # What generate returns when the first new token is EOS: the query (image) tokens, BOS, EOS.
    prompt = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]

    def generate(pixel_values, **kwargs):
        return torch.tensor([[*prompt, tokenizer.eos_token_id]] * pixel_values.shape[0])

    monkeypatch.setattr(captioner.model, "generate", generate)
    out = captioner(batch(2))
    assert list(out[CAPTION]) == ["This is an image of circle.", "This is an image of star."]


def test_blip2_loads_under_the_weight_policy(blip2_dir, tmp_path):
    """The BLIP-2 path resolves through the same loading policy as the chat path: pickled weights are refused
    unless the model says allow_pickle."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from actors.captioner import Captioner

    pickled = shutil.copytree(blip2_dir, tmp_path / "blip2")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="caption BLIP-2 model .* set allow_pickle: true"):
        Captioner(blip2_config(pickled))
    config = blip2_config(pickled)
    config.model = ModelRef(id=str(pickled), allow_pickle=True)
    assert len(Captioner(config)(batch(1))[CAPTION]) == 1


def test_captions_a_dataset_already_has_come_from_its_file(tmp_path):
    """caption.captions_file: no model; the file's caption behind the prefix, the prefix alone where the file
    has none, and a file without the columns is an error naming them."""
    from actors.captioner import FileCaptioner, caption_stage
    from engine.config import CaptionConfig

    path = tmp_path / "captions.csv"
    path.write_text('source_id,caption\ntrain/circle/a.png,"a circle, on sand"\ntrain/circle/b.png,\n')
    config = CaptionConfig(captions_file=str(path))
    assert caption_stage(config).fn is FileCaptioner
    batch = {
        "source_id": np.array(
            ["train/circle/a.png", "train/circle/b.png", "train/circle/c.png"], dtype=object
        ),
        "class_name": np.array(["circle"] * 3, dtype=object),
    }
    out = FileCaptioner(config)(batch)
    assert list(out["caption"]) == [
        "This is an image of circle. a circle, on sand",
        "This is an image of circle.",
        "This is an image of circle.",
    ]
    (tmp_path / "bad.csv").write_text("id,text\nx,y\n")
    with pytest.raises(
        ValueError, match=r"caption.captions_file .*bad.csv has no column\(s\) \['source_id', 'caption'\]"
    ):
        FileCaptioner(CaptionConfig(captions_file=str(tmp_path / "bad.csv")))
    with pytest.raises(ValueError, match="exactly one of caption.model and caption.captions_file"):
        CaptionConfig()
