"""MVC's generator and recipe checks without Ray: Eq. 6's guidance mapping, each row's plan, one batch through
the tiny pipelines, and the errors at start. Algorithm 1 itself: tests/test_mvc_mix.py; the whole path on a
local Ray: tests/test_mvc_e2e.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.mvc_generator import FINETUNED, PRETRAINED, MvcGenerator, ip2p_scales
from engine import schema
from engine.config import MvcConfig
from engine.recipes.mvc import check_caption_classes, check_image_conditioned
from engine.stages.batch import object_array

CLASSES = ["circle", "cross"]
CAPTIONS = {
    "circle": [f"This is an image of circle. a round thing number {i}" for i in range(5)],
    "cross": ["This is an image of cross. the only caption"],
}


def test_eq6_guidance_is_the_instruct_pix2pix_combination_with_equal_scales():
    """InstructPix2Pix combines its three branches (diffusers pipeline_stable_diffusion_instruct_pix2pix.py:
    uncond + s_T (text - image) + s_I (image - uncond)); with ip2p_scales(w) that is MVC's Eq. 6,
    uncond + w (text_and_image - uncond)."""
    g = torch.Generator().manual_seed(0)
    text, image, uncond = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for w in (0.0, 1.0, 7.5):
        scales = ip2p_scales(w)
        ip2p = (
            uncond
            + scales["guidance_scale"] * (text - image)
            + scales["image_guidance_scale"] * (image - uncond)
        )
        torch.testing.assert_close(ip2p, uncond + w * (text - uncond))


class StubPool:
    """The class pool's interface (engine.stages.class_pools.ClassPool) over in-memory images."""

    def __init__(self, images: dict[str, tuple[str, bytes]]):
        self.images = images  # source_id -> (class_name, png bytes)

    def partner(self, class_name: str, source_id: str, seed: int) -> str | None:
        others = sorted(s for s, (c, _) in self.images.items() if c == class_name and s != source_id)
        return others[int(np.random.default_rng(seed).integers(len(others)))] if others else None

    def row(self, source_id: str) -> dict:
        return {schema.IMAGE_BYTES: self.images[source_id][1]}


@pytest.fixture(scope="module")
def generator(tiny_models_dir):
    import cv2

    from engine.tiny.toy_dataset import render_example

    rng = np.random.default_rng(0)
    images = {}
    for name in CLASSES:
        for k in range(2):
            image, _ = render_example(rng, name, "sand", 32)
            images[f"{name}-{k}"] = (name, cv2.imencode(".png", image[..., ::-1])[1].tobytes())
    config = MvcConfig(
        captions="unused",
        model={"id": str(tiny_models_dir / "ip2p")},
        pretrained={"id": str(tiny_models_dir / "sd15")},
        pretrained_share=0.5,
        num_inference_steps=2,
        height=32,
        width=32,
        device="cpu",
    )
    return MvcGenerator(config, CLASSES, StubPool(images), CAPTIONS)


def test_each_rows_plan_is_a_function_of_its_seed(generator):
    plans = [generator.plan_row("circle", "circle-0", seed) for seed in range(400)]
    again = [generator.plan_row("circle", "circle-0", seed) for seed in range(400)]
    assert [json.dumps({k: v for k, v in p.items() if not k.startswith("_")}) for p in plans] == [
        json.dumps({k: v for k, v in p.items() if not k.startswith("_")}) for p in again
    ]
    pretrained = sum(p["source"] == PRETRAINED for p in plans)
    assert abs(pretrained - 200) <= 3 * np.sqrt(400 * 0.25), pretrained
    for plan in plans:
        assert plan["prompt"] == CAPTIONS["circle"][plan["caption"]]
        if plan["source"] == FINETUNED:
            assert plan["mixed"] and plan["caption"] == plan["mix"]["base"]
            assert plan["partner"] == "circle-1"  # another real image of the class
    single = generator.plan_row("cross", "cross-0", next(s for s in range(50) if _finetuned(generator, s)))
    assert single["mixed"] is False and single["prompt"] == CAPTIONS["cross"][0]


def _finetuned(generator, seed: int) -> bool:
    return generator.plan_row("cross", "cross-0", seed)["source"] == FINETUNED


def test_a_batch_gets_images_from_both_generators_with_their_params(generator):
    n = 8
    batch = {
        schema.CLASS_NAME: np.array(["circle", "cross"] * 4, dtype=object),
        schema.SOURCE_ID: np.array(["circle-0", "cross-0"] * 4, dtype=object),
        schema.SEED: np.arange(n, dtype=np.int64),
        schema.IMAGE: object_array([np.zeros((32, 32, 3), np.uint8)] * n),
    }
    out = generator(batch)
    params = [json.loads(p) for p in out["mvc"]]
    assert {p["source"] for p in params} == {FINETUNED, PRETRAINED}
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in out[schema.IMAGE])
    assert list(out[schema.ERROR]) == [""] * n
    assert all(mask is None for mask in out[schema.MASK])
    unmixed = [p["source"] == FINETUNED and not p["mixed"] for p in params]
    assert list(out["mvc_unmixed"]) == [int(u) for u in unmixed] and any(unmixed)
    # The same seeds again: the same pixels.
    again = generator({k: v.copy() for k, v in batch.items()})
    assert all(np.array_equal(a, b) for a, b in zip(out[schema.IMAGE], again[schema.IMAGE], strict=True))


def test_caption_classes_must_be_the_datasets_and_the_unet_must_take_the_image(tiny_models_dir):
    with pytest.raises(
        ValueError, match=r"classes without captions \['diamond'\].*not in the dataset \['star'\]"
    ):
        check_caption_classes({"circle": ["a"], "star": ["b"]}, ["circle", "diamond"], "runs/captions")
    check_caption_classes(CAPTIONS, CLASSES, "runs/captions")

    from engine.config import GenerateConfig

    def config(model: str) -> GenerateConfig:
        return GenerateConfig.model_validate(
            {
                "recipe": "mvc",
                "data": {"format": "image_folder", "path": "x"},
                "output": {"path": "y"},
                "mvc": {"captions": "c", "model": {"id": model}, "pretrained_share": 0.0},
            }
        )

    with pytest.raises(ValueError, match=r"sd15: its UNet takes 4 input channels.*needs 8"):
        check_image_conditioned(config(str(tiny_models_dir / "sd15")))
    check_image_conditioned(config(str(tiny_models_dir / "ip2p")))
    with pytest.raises(ValueError, match="mvc.pretrained_share is 0.5: set mvc.pretrained"):
        MvcConfig(captions="c", model={"id": "./x"})
