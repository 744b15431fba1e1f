"""The UniDiffDA generator (actors/generator.py), in process on the tiny SD1.5 / InstructPix2Pix pipelines:
each mode's contract, the per-row draws, DDIM inversion, slerp and the bad-input rows. The recipe run with Ray
(class pools, shards, training on them) is tests/test_unidiffda_e2e.py."""

import json

import cv2
import numpy as np
import pytest

from engine import schema
from engine.config import GenerationConfig

CLASSES = ["circle", "cross", "diamond"]


def config(models, mode: str, **extra) -> GenerationConfig:
    model = "ip2p" if mode == "instruct_pix2pix" else "sd15"
    settings = dict(
        height=32, width=32, num_inference_steps=4, guidance_scale=1.0, dtype="float32", device="cpu"
    )
    return GenerationConfig(mode=mode, model={"id": str(models / model)}, **(settings | extra))


def smooth_image(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.resize(
        rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
    )


def batch(num_rows: int = 3, size: int = 32) -> dict:
    images = np.empty(num_rows, dtype=object)
    for i in range(num_rows):
        images[i] = smooth_image(i, size)
    return {
        schema.IMAGE: images,
        schema.CLASS_NAME: np.array([CLASSES[i % 3] for i in range(num_rows)], dtype=object),
        schema.LABEL: np.array([i % 3 for i in range(num_rows)], dtype=np.int64),
        schema.SOURCE_ID: np.array(
            [f"train/{CLASSES[i % 3]}/{i}.png" for i in range(num_rows)], dtype=object
        ),
        schema.SEED: np.arange(10, 10 + num_rows, dtype=np.int64),
    }


class ListPool:
    """A class pool's interface (engine.stages.class_pools.ClassPool: partner, row) over images in memory."""

    def __init__(self, members: dict[str, list[tuple[str, np.ndarray]]]):
        self.members = {name: [s for s, _ in rows] for name, rows in members.items()}
        self.images = {s: image for rows in members.values() for s, image in rows}

    def partner(self, class_name, source_id, seed):
        from engine.stages.class_pools import ClassPool

        return ClassPool.partner(self, class_name, source_id, seed)

    def row(self, source_id):
        return {schema.IMAGE_BYTES: cv2.imencode(".png", self.images[source_id][:, :, ::-1])[1].tobytes()}


@pytest.fixture(scope="module")
def models(tiny_models_dir):
    return tiny_models_dir


_LOADED: dict = {}  # mode -> a generator: each pipeline loads once per module (loading is most of a test)


def generator(models, mode, pool=None, fresh=False, **extra):
    """A generator with these settings; it shares its mode's loaded pipeline unless `fresh` (a test that
    changes weights) or adapters (loaded into the pipeline) ask for a new one."""
    import copy

    from actors.generator import DiffusionGenerator

    settings = config(models, mode, **extra)
    if fresh or "adapters" in extra:
        return DiffusionGenerator(settings, CLASSES, pool=pool)
    if mode not in _LOADED:
        _LOADED[mode] = DiffusionGenerator(config(models, mode), CLASSES, pool=ListPool({}))
    gen = copy.copy(_LOADED[mode])
    gen.config, gen.pool = settings, pool
    return gen


@pytest.mark.parametrize("mode", ["txt2img", "sdedit", "instruct_pix2pix", "diffmix"])
def test_each_mode_writes_images_prompts_and_params(models, mode):
    out = generator(models, mode)(batch())
    assert list(out[schema.ERROR]) == ["", "", ""]
    assert all(image.shape == (32, 32, 3) and image.dtype == np.uint8 for image in out[schema.IMAGE])
    assert all(mask is None for mask in out[schema.MASK]), "the real image's mask does not fit the new one"
    params = [json.loads(p) for p in out["generation"]]
    assert {p["mode"] for p in params} == {mode}
    assert [p["prompt"] for p in params] == list(out[schema.PROMPT])
    if mode == "instruct_pix2pix":
        from engine.config.generator import DIFFUSEMIX_STYLES

        assert all(p["prompt"] in DIFFUSEMIX_STYLES for p in params)
    elif mode != "diffmix":
        assert list(out[schema.PROMPT]) == [f"a photo of a {c}" for c in batch()[schema.CLASS_NAME]]
    if mode != "diffmix":
        assert all(s is None for s in out[schema.SOFT_LABEL])


def test_diffmix_rows_get_soft_labels_toward_another_class(models):
    gen = generator(models, "diffmix", strength=[0.5, 0.9], diffmix_gamma=0.5)
    out = gen(batch(6))
    for label, soft, params in zip(out[schema.LABEL], out[schema.SOFT_LABEL], out["generation"], strict=True):
        params = json.loads(params)
        source, target = soft
        assert source["label"] == label and target["label"] != label
        assert CLASSES[target["label"]] == params["target_class"]
        assert params["prompt"] == f"a photo of a {params['target_class']}"
        assert target["weight"] == pytest.approx(params["strength"] ** 0.5)
        assert source["weight"] + target["weight"] == pytest.approx(1.0)


def test_a_row_draws_the_same_choices_in_any_batch(models):
    gen = generator(models, "diffmix", strength=[0.25, 0.5, 0.75, 1.0])
    alone = gen.plan_row("cross", 1, "train/cross/7.png", 1234)
    assert all(gen.plan_row("cross", 1, "train/cross/7.png", 1234) == alone for _ in range(3))
    draws = {
        json.dumps(gen.plan_row("cross", 1, "train/cross/7.png", seed), sort_keys=True) for seed in range(40)
    }
    assert len(draws) > 3, "other seeds draw other strengths and targets"
    full = generator(models, "sdedit", strength=0.5)(batch(5))
    part = generator(models, "sdedit", strength=0.5)({k: v[3:] for k, v in batch(5).items()})
    assert all(np.array_equal(a, b) for a, b in zip(full[schema.IMAGE][3:], part[schema.IMAGE], strict=True))


def test_sdedit_stays_near_its_input_at_low_strength_and_not_at_full(models):
    import torch

    gen = generator(models, "sdedit", num_inference_steps=10)
    image = smooth_image(3)
    with torch.no_grad():
        clean = gen.encode([image])

    def edited(strength: float):
        latents = gen.pipe(
            prompt="a photo of a circle",
            image=cv2_pil(image),
            strength=strength,
            num_inference_steps=10,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator("cpu").manual_seed(0),
        ).images
        return float((latents - clean).norm() / clean.norm())

    assert edited(0.1) < 0.5 * edited(1.0)


def cv2_pil(image):
    from PIL import Image

    return Image.fromarray(image)


def test_ddim_inversion_then_denoising_with_weight_zero_gives_the_first_image_back(models):
    """With a UNet whose noise estimate is constant, DDIM inversion is exact, so what is left is the
    plumbing: the inverse and forward timesteps, the latent scaling and slerp's endpoint. (A random UNet's
    estimate changes too much between steps for inversion to be exact: that is the model, not the code.)"""
    import torch

    images = [smooth_image(1), smooth_image(2)]
    gen = generator(models, "ddim_interp", pool=ListPool({}), fresh=True, num_inference_steps=10)
    with torch.no_grad():
        gen.pipe.unet.conv_out.weight.zero_()
        gen.pipe.unet.conv_out.bias.fill_(0.3)
        first, second = gen.encode(images[:1]), gen.encode(images[1:])
        noise = gen.interpolated_latents(
            images[:1], images[1:], [{"weight": 0.0}], {"prompt": ["a photo of a circle"]}
        )
        back = gen.pipe(
            prompt=["a photo of a circle"],
            latents=noise,
            num_inference_steps=10,
            guidance_scale=1.0,
            output_type="latent",
        ).images
    assert float((back - first).norm() / first.norm()) < 1e-3
    assert float((back - second).norm() / first.norm()) > 0.1


def test_slerp_endpoints_are_the_inputs():
    import torch

    from actors.generator import slerp

    a, b = torch.randn(4, 8, 8), torch.randn(4, 8, 8)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    middle = slerp(a, b, 0.5)
    assert middle.norm() == pytest.approx(float((a.norm() + b.norm()) / 2), rel=0.15), "on the sphere"


def test_ddim_interp_draws_a_same_class_partner_and_refuses_a_class_without_one(models):
    pool = ListPool(
        {
            "circle": [("train/circle/0.png", smooth_image(0)), ("train/circle/3.png", smooth_image(3))],
            "cross": [("train/cross/1.png", smooth_image(1))],  # alone: no partner
        }
    )
    gen = generator(models, "ddim_interp", pool=pool, num_inference_steps=2)
    rows = {k: v[:2] for k, v in batch(4).items()}  # circle/0 and cross/1
    out = gen(rows)
    assert list(out[schema.ERROR]) == ["", "no_partner"]
    params = json.loads(out["generation"][0])
    assert params["partner"] == "train/circle/3.png" and 0.0 <= params["angle"] < 2 * np.pi
    arc = generator(models, "ddim_interp", pool=pool, num_inference_steps=2, interpolation=(0.2, 0.4))
    assert 0.2 <= json.loads(arc(rows)["generation"][0])["weight"] <= 0.4


def test_diff_ii_starts_with_the_suffixed_prompt_and_switches_to_the_class_prompt(models):
    """The UNet's text conditioning, call by call: inversion (both images, in its own step count) sees the
    class prompt; the first round(split_ratio x steps) denoising calls, the high-noise ones, the class prompt
    + the row's suffix, and the rest the class prompt (the reference's order, DiffDA-Eval diff_ii.py)."""
    pool = ListPool(
        {"circle": [("train/circle/0.png", smooth_image(0)), ("train/circle/3.png", smooth_image(3))]}
    )
    gen = generator(
        models,
        "ddim_interp",
        pool=pool,
        split_ratio=0.3,
        suffixes=[", in the snow"],
        num_inference_steps=10,
        inversion_steps=5,
    )
    seen = []
    hook = gen.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        out = gen({k: v[:1] for k, v in batch().items()})
    finally:
        hook.remove()
    assert list(out[schema.ERROR]) == [""]
    params = json.loads(out["generation"][0])
    assert params["switch"] == {"step": 3, "prompt": "a photo of a circle, in the snow"}
    assert out[schema.PROMPT][0] == "a photo of a circle"
    embed = {
        p: gen.prompt_embeds([p]).detach()
        for p in ("a photo of a circle", "a photo of a circle, in the snow")
    }
    assert len(seen) == 5 + 5 + 10  # invert the image, invert its partner, denoise
    expected = (
        ["a photo of a circle"] * 10 + ["a photo of a circle, in the snow"] * 3 + ["a photo of a circle"] * 7
    )
    for call, (conditioning, prompt) in enumerate(zip(seen, expected, strict=True)):
        assert np.allclose(conditioning.numpy(), embed[prompt].numpy(), atol=1e-6), (call, prompt)
    plain = generator(models, "ddim_interp", pool=pool, num_inference_steps=10, inversion_steps=5)
    assert not np.array_equal(
        plain({k: v[:1] for k, v in batch().items()})[schema.IMAGE][0], out[schema.IMAGE][0]
    )


def test_circle_interpolation_is_the_reference_formula():
    """Diff-II's rand_slerp with alpha * theta = angle: angle 0 is the first latent, -theta the second, every
    point of unit latents has norm 1, and drawn angles reach past the arc between the two."""
    import math

    import torch

    from actors.generator import circle_point, slerp

    generator_ = torch.Generator().manual_seed(0)
    a = torch.randn(4, 8, 8, generator=generator_, dtype=torch.float64)
    b = torch.randn(4, 8, 8, generator=generator_, dtype=torch.float64)
    a, b = a / a.norm(), b / b.norm()
    theta = float(torch.arccos((a * b).sum()))
    assert torch.allclose(circle_point(a, b, 0.0), a, atol=1e-12)
    assert torch.allclose(circle_point(a, b, -theta), b, atol=1e-9)
    for angle in (0.3, 1.0, 2.5, 4.0, 6.0):
        point = circle_point(a, b, angle)
        assert float(point.norm()) == pytest.approx(1.0, abs=1e-9)
        # The reference's own expression, alpha = angle / theta.
        alpha = angle / theta
        reference = (math.sin((1 + alpha) * theta) * a - math.sin(alpha * theta) * b) / math.sin(theta)
        assert torch.allclose(point, reference, atol=1e-9)
    # The arc (slerp weight w) is the stretch angle in [-theta, 0] of the same circle.
    assert torch.allclose(circle_point(a, b, -0.4 * theta), slerp(a, b, 0.4), atol=1e-9)
    far = circle_point(a, b, math.pi)
    assert torch.allclose(far, -a, atol=1e-9), "half a turn from a is -a, which no arc weight reaches"


def test_a_checkpoint_with_a_safety_checker_loads_without_it_unless_the_config_asks(models, tmp_path):
    """SD1.x checkpoints ship a safety checker that blacks out flagged images: the loader leaves it out, loads
    it only when asked, and refuses the request for a checkpoint that has none."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from engine.config import ModelRef
    from engine.models.diffusion import load_pipeline

    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 4}, projection_dim=32
        )
    )
    base = diffusers.StableDiffusionPipeline.from_pretrained(models / "sd15")
    with_checker = diffusers.StableDiffusionPipeline(
        **{
            **base.components,
            "safety_checker": checker,
            "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        },
        requires_safety_checker=True,
    )
    with_checker.save_pretrained(tmp_path / "sd15-checker")
    ref = ModelRef(id=str(tmp_path / "sd15-checker"))
    assert load_pipeline(ref, role="generate", device="cpu").safety_checker is None
    assert load_pipeline(ref, role="generate", device="cpu", safety_checker=True).safety_checker is not None
    with pytest.raises(ValueError, match="has no safety checker"):
        load_pipeline(ModelRef(id=str(models / "sd15")), role="generate", device="cpu", safety_checker=True)


def test_the_superclass_is_appended_where_the_prompt_asks_for_it(models):
    """The reference's 'a photo of a <token> <superclass>': one superclass for the dataset, a map over it per
    class, and no stray space when neither names one."""
    template = "a photo of a {token} {superclass}"
    assert generator(models, "txt2img", prompt=template, superclass="shape").class_prompt("circle") == (
        "a photo of a circle shape"
    )
    mapped = generator(models, "txt2img", prompt=template, superclass="shape", superclasses={"cross": "sign"})
    assert [mapped.class_prompt(c) for c in ("circle", "cross")] == [
        "a photo of a circle shape",
        "a photo of a cross sign",
    ]
    assert generator(models, "txt2img", prompt=template).class_prompt("circle") == "a photo of a circle"


def test_a_constant_output_is_dropped_as_blank_output(models):
    """A generator whose decoder outputs one colour: every row is dropped to filtered.parquet (the stage
    loop reads the `drop` column) with rule blank_output, never written as a training image."""
    import torch

    gen = generator(models, "txt2img", fresh=True)
    with torch.no_grad():
        gen.pipe.vae.decoder.conv_out.weight.zero_()
        gen.pipe.vae.decoder.conv_out.bias.fill_(0.2)
    out = gen(batch())
    assert list(out[schema.ERROR]) == ["", "", ""]
    assert list(out[schema.DROP]) == ["blank_output"] * 3
    assert all(image.min() == image.max() for image in out[schema.IMAGE])
    working = generator(models, "txt2img")(batch())
    assert list(working[schema.DROP]) == ["", "", ""], "the tiny model's real outputs are kept"


def test_diffusemix_keeps_half_the_real_image_and_blends_the_folders_fractal(models, tmp_path):
    from PIL import Image

    from engine.methods.diffusemix import blend, hybrid

    folder = tmp_path / "fractals"
    folder.mkdir()
    fractal = np.zeros((32, 32, 3), np.uint8)
    fractal[..., 0], fractal[::2, :, 1] = 200, 90
    Image.fromarray(fractal).save(folder / "f0.png")
    rows = batch(6)
    edited = generator(models, "instruct_pix2pix")(rows)[schema.IMAGE]
    gen = generator(
        models, "instruct_pix2pix", fresh=True, diffusemix={"fractals": str(folder), "fractal_weight": 0.5}
    )
    out = gen(rows)
    halves = set()
    for i, image in enumerate(out[schema.IMAGE]):
        mix = json.loads(out["generation"][i])["diffusemix"]
        assert mix["fractal"] == "f0.png" and mix["weight"] == 0.5
        halves.add(mix["half"])
        expected = blend(hybrid(rows[schema.IMAGE][i], edited[i], mix["half"]), fractal, 0.5)
        assert np.array_equal(image, expected), mix
    assert len(halves) > 1, "the half is drawn per row"


def test_diffusemix_halves_meet_in_a_20_pixel_band():
    """The reference's seam: the real half, a linear ramp over 20 pixels centred on the middle, the edited
    half (combine_images, blend_width=20); band=0 is a hard cut."""
    from engine.methods.diffusemix import hybrid

    real, edited = np.zeros((64, 48, 3), np.uint8), np.full((64, 48, 3), 200, np.uint8)
    top = hybrid(real, edited, "top")[:, 0, 0].astype(int)
    assert (top[:22] == 0).all() and (top[42:] == 200).all()
    ramp = top[22:42]
    assert (np.diff(ramp) > 0).all() and ramp[0] == 0 and ramp[-1] == 200, ramp
    left = hybrid(real, edited, "left")[0, :, 0].astype(int)
    assert (left[:14] == 0).all() and (left[34:] == 200).all() and 0 < left[24] < 200
    hard = hybrid(real, edited, "top", band=0)[:, 0, 0]
    assert (hard[:32] == 0).all() and (hard[32:] == 200).all()


def test_diffusemix_without_a_folder_blends_the_rows_own_julia_set(models):
    from engine.methods.diffusemix import hybrid

    rows = batch(2)
    edited = generator(models, "instruct_pix2pix")(rows)[schema.IMAGE]
    gen = generator(models, "instruct_pix2pix", diffusemix={"fractal_weight": 0.3})
    out, again = gen(rows), gen(rows)
    assert all(np.array_equal(a, b) for a, b in zip(out[schema.IMAGE], again[schema.IMAGE], strict=True))
    residues = []
    for i, image in enumerate(out[schema.IMAGE]):
        mix = json.loads(out["generation"][i])["diffusemix"]
        assert mix["fractal"] == "julia"
        base = hybrid(rows[schema.IMAGE][i], edited[i], mix["half"]).astype(np.float32)
        fractal = (image.astype(np.float32) - 0.7 * base) / 0.3  # the blend, undone (up to rounding)
        assert fractal.min() > -3 and fractal.max() < 258 and fractal.std() > 20, "a picture, not a constant"
        residues.append(fractal)
    assert np.abs(residues[0] - residues[1]).mean() > 10, "each row its own fractal"


def test_input_size_refuse_makes_error_rows_and_resize_does_not(models):
    rows = batch(2, size=40)
    refused = generator(models, "sdedit", input_size="refuse")(rows)
    assert list(refused[schema.ERROR]) == ["input_size", "input_size"]
    assert "40x40" in refused[schema.ERROR_MESSAGE][0]
    assert list(generator(models, "sdedit")(rows)[schema.ERROR]) == ["", ""]


def test_textual_inversion_tokens_stand_for_the_classes_in_prompts(models, tmp_path):
    import torch
    from safetensors.torch import save_file

    tokens = [f"<{name}>" for name in CLASSES]
    save_file(
        {"clip_l": torch.randn(3, 32)},
        str(tmp_path / "textual_inversion.safetensors"),
        metadata={"tokens": json.dumps(tokens), "classes": json.dumps(CLASSES)},
    )
    gen = generator(models, "txt2img", adapters={"textual_inversion": str(tmp_path)})
    out = gen(batch())
    assert list(out[schema.PROMPT]) == [f"a photo of a <{c}>" for c in batch()[schema.CLASS_NAME]]
    assert json.loads(out["generation"][0])["adapters"]["textual_inversion"].endswith("@local")
    base = generator(models, "txt2img")(batch())
    assert not np.array_equal(out[schema.IMAGE][0], base[schema.IMAGE][0]), "the token changes the image"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"strength": 0.0}, "strength must be in (0, 1]"),
        ({"strength": [0.5, 1.5]}, "strength must be in (0, 1]"),
        ({"prompt": "a photo of {class}"}, "{token} and {superclass}"),
        ({"interpolation": (0.8, 0.2)}, "interpolation"),
        ({"split_ratio": 0.5}, "split_ratio and generation.suffixes go together"),
        ({"split_ratio": 0.5, "suffixes": [", at night"]}, "split_ratio is a ddim_interp setting"),
        ({"diffusemix": {}}, "diffusemix is an instruct_pix2pix setting"),
        ({"interpolation": "line"}, "interpolation"),
        ({"strength": [0.1, 0.5]}, "strength 0.1 x num_inference_steps 4 gives no denoising step"),
        ({"inversion_steps": 50}, "inversion_steps is a ddim_interp setting"),
    ],
)
def test_bad_generation_settings_are_config_errors(models, bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")):
        config(models, "sdedit", **bad)


def test_sizes_the_vae_cannot_take_are_refused_at_start(models):
    with pytest.raises(ValueError, match="multiples of 8"):
        generator(models, "txt2img", fresh=True, height=36)


# ---------------------------------------------------------------- input_size pad and keep_mask (De-DA crops)


def crop_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth picture of any shape (a subject crop), detailed enough that a box one pixel off shows."""
    rng = np.random.default_rng(seed)
    return cv2.resize(
        rng.integers(0, 255, (4, 4, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC
    )


def rows_of(images: list[np.ndarray]) -> dict:
    """`batch()` with these images (any sizes) in place of its own."""
    rows = batch(len(images))
    rows[schema.IMAGE] = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        rows[schema.IMAGE][i] = image
    return rows


def test_pad_to_fit_centres_the_scaled_image_and_replicates_its_edges():
    from actors.generator import pad_to_fit

    # Shrunk: 20x36 (h x w) into 32x32 scales by 32/36 to 18x32 (INTER_AREA), 7 rows above and below.
    wide = crop_image(20, 36)
    padded, box = pad_to_fit(wide, 32, 32)
    assert padded.shape == (32, 32, 3) and padded.dtype == np.uint8
    assert box == (7, 0, 18, 32)
    assert np.array_equal(padded[7:25], cv2.resize(wide, (32, 18), interpolation=cv2.INTER_AREA))
    assert all(np.array_equal(padded[row], padded[7]) for row in range(7)), "top rows replicate the first"
    assert all(np.array_equal(padded[row], padded[24]) for row in range(25, 32)), "bottom rows the last"
    # Enlarged: 16x10 into 32x32 scales by 2 to 32x20 (INTER_LINEAR), 6 columns left and right.
    tall = crop_image(16, 10, seed=1)
    padded, box = pad_to_fit(tall, 32, 32)
    assert box == (0, 6, 32, 20)
    assert np.array_equal(padded[:, 6:26], cv2.resize(tall, (20, 32), interpolation=cv2.INTER_LINEAR))
    assert (padded[:, :6] == padded[:, 6:7]).all() and (padded[:, 26:] == padded[:, 25:26]).all()
    # An odd leftover: 30x8 into 32x40 scales by 32/30 to 32x9 (8.53 rounded); 15 columns left, 16 right.
    padded, box = pad_to_fit(crop_image(30, 8), 32, 40)
    assert box == (0, 15, 32, 9) and padded.shape == (32, 40, 3)
    padded, box = pad_to_fit(crop_image(8, 30), 40, 32)
    assert box == (15, 0, 9, 32) and padded.shape == (40, 32, 3)


def test_crop_back_undoes_pad_to_fit():
    from actors.generator import crop_back, pad_to_fit

    # Not rescaled (the height already fits): the crop is the image itself, exactly.
    narrow = crop_image(32, 20)
    padded, box = pad_to_fit(narrow, 32, 32)
    assert box == (0, 6, 32, 20)
    assert np.array_equal(crop_back(padded, box, narrow.shape[:2]), narrow)
    # Rescaled (20x36 -> 18x32 -> 20x36): the two resizes' loss only, so close to the original; a box one
    # row off is clearly worse.
    wide = crop_image(20, 36)
    padded, box = pad_to_fit(wide, 32, 32)
    back = crop_back(padded, box, wide.shape[:2])
    assert back.shape == wide.shape and back.dtype == np.uint8
    shrunk = cv2.resize(wide, (32, 18), interpolation=cv2.INTER_AREA)
    assert np.array_equal(back, cv2.resize(shrunk, (36, 20), interpolation=cv2.INTER_LINEAR))

    def difference(image):
        return float(np.abs(image.astype(np.float32) - wide.astype(np.float32)).mean())

    shifted = (box[0] + 1, box[1], box[2], box[3])
    assert difference(back) < 3.0
    assert difference(crop_back(padded, shifted, wide.shape[:2])) > 3 * difference(back)


def test_input_size_pad_gives_each_row_its_inputs_size(models):
    """SDEdit of crops of any shape: each output row has its input's size (and the height/width columns say
    so); an input already at height x width passes untouched. input_size resize squashes them all to 32x32."""
    shapes = [(20, 36), (36, 20), (23, 41), (32, 32)]
    rows = rows_of([crop_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)])
    out = generator(models, "sdedit", input_size="pad")(rows)
    assert list(out[schema.ERROR]) == [""] * 4
    assert [image.shape[:2] for image in out[schema.IMAGE]] == shapes
    assert list(zip(out[schema.HEIGHT], out[schema.WIDTH], strict=True)) == shapes
    assert all(image.dtype == np.uint8 for image in out[schema.IMAGE])
    squashed = generator(models, "sdedit")(rows)
    assert [image.shape[:2] for image in squashed[schema.IMAGE]] == [(32, 32)] * 4


def test_input_size_pad_crops_the_generated_image_back_to_the_input(models):
    """With a pipeline that returns its input unchanged, the actor's pad -> generate -> crop back is the
    helpers' round trip: exact for a crop that is only padded, the resizes' loss for one that is scaled."""
    from actors.generator import crop_back, pad_to_fit

    gen = generator(models, "sdedit", input_size="pad")
    seen = []

    def identity(rows, plans, inputs, partners, seeds):
        seen.extend(inputs[i] for i in rows)
        return np.stack([inputs[i] / 255.0 for i in rows]), [False] * len(rows)

    gen.generate = identity
    narrow, wide = crop_image(32, 20), crop_image(20, 36, seed=1)
    out = gen(rows_of([narrow, wide]))
    assert all(image.shape == (32, 32, 3) for image in seen), "the pipeline sees height x width"
    assert np.array_equal(seen[1], pad_to_fit(wide, 32, 32)[0])
    assert np.array_equal(out[schema.IMAGE][0], narrow)
    padded, box = pad_to_fit(wide, 32, 32)
    assert np.array_equal(out[schema.IMAGE][1], crop_back(padded, box, (20, 36)))
    assert np.abs(out[schema.IMAGE][1].astype(np.float32) - wide).mean() < 3.0


def test_ddim_interp_pads_its_partner_the_same_way(models):
    """The partner (a crop of another shape) is fitted like the row's image, so the two stack for the VAE;
    the output has the row's own size."""
    pool = ListPool(
        {
            "circle": [
                ("train/circle/0.png", crop_image(20, 36)),
                ("train/circle/3.png", crop_image(40, 24, 3)),
            ]
        }
    )
    gen = generator(models, "ddim_interp", pool=pool, num_inference_steps=2, input_size="pad")
    rows = {k: v[:1] for k, v in rows_of([crop_image(20, 36)]).items()}
    out = gen(rows)
    assert list(out[schema.ERROR]) == [""]
    assert json.loads(out["generation"][0])["partner"] == "train/circle/3.png"
    assert out[schema.IMAGE][0].shape == (20, 36, 3)


def masked_rows(shapes: list[tuple[int, int]]) -> dict:
    """Rows with a mask (0/255, the image's size) and a bbox around it."""
    rows = rows_of([crop_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)])
    masks, boxes = np.empty(len(shapes), dtype=object), np.empty(len(shapes), dtype=object)
    for i, (h, w) in enumerate(shapes):
        mask = np.zeros((h, w), np.uint8)
        mask[2 : h - 3, 4 : w - 1] = 255
        mask[5, 7] = 0  # not a rectangle: a mask that was regenerated from the bbox would differ
        masks[i], boxes[i] = mask, [4.0, 2.0, float(w - 1), float(h - 3)]
    rows[schema.MASK], rows[schema.BBOX] = masks, boxes
    return rows


def test_keep_mask_keeps_the_inputs_mask_and_bbox_and_the_default_clears_them(models):
    shapes = [(20, 36), (32, 32)]
    rows = masked_rows(shapes)
    out = generator(models, "sdedit", input_size="pad", keep_mask=True)(rows)
    assert list(out[schema.ERROR]) == ["", ""]
    for i, (h, w) in enumerate(shapes):
        mask = out[schema.MASK][i]
        assert mask.dtype == np.uint8 and mask.shape == (h, w) == out[schema.IMAGE][i].shape[:2]
        assert mask.tobytes() == rows[schema.MASK][i].tobytes()
        assert out[schema.BBOX][i] == rows[schema.BBOX][i]
    # input_size refuse: a crop of the generated size keeps its mask; another is an error row with its input.
    refused = generator(models, "sdedit", input_size="refuse", keep_mask=True)(rows)
    assert list(refused[schema.ERROR]) == ["input_size", ""]
    assert np.array_equal(refused[schema.MASK][1], rows[schema.MASK][1])
    assert np.array_equal(refused[schema.IMAGE][0], rows[schema.IMAGE][0])
    for cleared in (
        generator(models, "sdedit", input_size="pad")(rows),
        generator(models, "sdedit", input_size="pad", keep_mask=False)(rows),
    ):
        assert list(cleared[schema.MASK]) == [None, None] and list(cleared[schema.BBOX]) == [None, None]


@pytest.mark.parametrize(
    "mode, bad, message",
    [
        ("txt2img", {"keep_mask": True, "input_size": "pad"}, "keep_mask needs a real input image"),
        ("sdedit", {"keep_mask": True}, "keep_mask with input_size resize"),
        ("sdedit", {"keep_mask": True, "input_size": "resize"}, "set generation.input_size to pad"),
        ("sdedit", {"input_size": "crop"}, "input_size"),
    ],
)
def test_keep_mask_and_input_size_settings_are_checked(models, mode, bad, message):
    with pytest.raises(ValueError, match=message):
        config(models, mode, **bad)


def test_keep_mask_is_accepted_where_the_output_keeps_the_inputs_size_and_leaves_old_hashes_alone(models):
    from engine.config import content_of

    for mode in ("sdedit", "diffmix", "gif", "instruct_pix2pix", "ddim_interp"):
        extra = {"gif": {"clip": {"id": str(models / "clip")}}} if mode == "gif" else {}
        for input_size in ("pad", "refuse"):
            assert config(models, mode, keep_mask=True, input_size=input_size, **extra).keep_mask
    # Unset, the key is not part of the content hash: outputs written before it existed still resume.
    assert "keep_mask" not in content_of(config(models, "sdedit"))
