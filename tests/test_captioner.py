"""Captions: the transformers Captioner on the tiny VLM, the vLLM task's requests, and backend switching.

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
