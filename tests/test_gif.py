"""GIF (engine/methods/gif.py, engine/models/gif_guide.py, the generator's `gif` mode): the CLIP score as the
reference computes it, the bounded signed-gradient step, and the mode on the tiny SD1.5 + tiny CLIP."""

import json

import numpy as np
import pytest
import torch

from engine import schema
from engine.config.generator import GIF_DOMAINS
from engine.methods import gif
from tests.test_generator import CLASSES, batch


def test_score_is_entropy_change_plus_kept_class_probability_plus_divergence():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    features = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    reference = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    source = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    probs = (10.0 * features @ text.T).softmax(-1)
    expected = 0.0
    for i, kept in enumerate([0, 2]):  # the source's CLIP class, not a label
        h = lambda p: -(p * p.log()).sum()  # noqa: E731
        p, q = features[i].softmax(-1), reference[i].softmax(-1)
        expected += h(probs[i]) - h(source[i]) + probs[i, kept] + (p * (p / q).log()).sum()
    assert gif.gif_score(features, reference, source, text, 10.0).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_guided_latents_move_by_the_signed_step_within_the_bound():
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 4, 4)
    projection = torch.randn(4 * 16, 8)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)

    def decode(z):  # stands in for the VAE: any differentiable map to images
        return torch.sigmoid(z)

    def embed(images):
        return torch.nn.functional.normalize(images.flatten(1) @ projection, dim=-1)

    source = embed(decode(latents)).detach() @ text.T
    noise, bias = torch.rand(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    for constraint in (0.05, 100.0):
        out = gif.guide_latents(latents, noise, bias, decode, embed, source.softmax(-1), text, 10.0,
                                step_size=0.1, constraint=constraint)  # fmt: skip
        assert (out - latents).abs().max() <= constraint + 1e-6
        assert not torch.equal(out, latents)
    # Unbounded, the result is latents x (1 + noise + a) + bias + b, a and b one signed step (+-0.1, 0 where
    # the gradient is 0) per row and channel.
    residual = out - latents * (1 + noise) - bias
    assert residual.abs().amax((2, 3)).min() > 0.05, "every row and channel took a step"
    steps = [-0.1, 0.0, 0.1]
    for row in range(2):
        for channel in range(4):
            z, r = latents[row, channel], residual[row, channel]
            assert any(torch.allclose(r, z * a + b, atol=1e-5) for a in steps for b in steps), (row, channel)


def test_gif_needs_its_section_and_only_gif_takes_it(tiny_models_dir):
    from pydantic import ValidationError

    from engine.config import GenerationConfig

    model = {"id": str(tiny_models_dir / "sd15")}
    with pytest.raises(ValidationError, match="generation.gif .* required for mode gif"):
        GenerationConfig(mode="gif", model=model)
    with pytest.raises(ValidationError, match="only for it; mode is sdedit"):
        GenerationConfig(mode="sdedit", model=model, gif={"clip": {"id": str(tiny_models_dir / "clip")}})


@pytest.fixture(scope="module")
def gif_generator(tiny_models_dir):
    from actors.generator import DiffusionGenerator
    from engine.config import GenerationConfig

    config = GenerationConfig(
        mode="gif", model={"id": str(tiny_models_dir / "sd15")}, prompt="{token}", strength=0.9,
        gif={"clip": {"id": str(tiny_models_dir / "clip")}, "constraint": 0.8},
        height=32, width=32, num_inference_steps=4, guidance_scale=1.0, dtype="float32", device="cpu",
    )  # fmt: skip
    return DiffusionGenerator(config, CLASSES)


def test_gif_mode_writes_guided_images_the_same_in_any_batch(gif_generator):
    rows = batch(4)
    out = gif_generator(rows)
    assert list(out[schema.ERROR]) == ["", "", "", ""]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in out[schema.IMAGE])
    params = [json.loads(p) for p in out["generation"]]
    for p, class_name in zip(params, rows[schema.CLASS_NAME], strict=True):
        assert p["mode"] == "gif" and p["strength"] == 0.9 and p["prompt"].endswith(class_name)
        assert any(p["prompt"].startswith(domain + " ") for domain in GIF_DOMAINS)
    part = gif_generator({k: v[2:] for k, v in rows.items()})
    for a, b in zip(out[schema.IMAGE][2:], part[schema.IMAGE], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float noise across batch shapes at most


def test_gif_step_changes_what_sdedit_alone_would_decode(gif_generator, monkeypatch):
    import engine.methods.gif as method

    guided = gif_generator(batch(2))[schema.IMAGE]
    monkeypatch.setattr(method, "guide_latents", lambda latents, *a, **k: latents.detach())
    plain = gif_generator(batch(2))[schema.IMAGE]
    assert any(not np.array_equal(a, b) for a, b in zip(guided, plain, strict=True))
