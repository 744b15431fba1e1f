"""Every shipped generation config runs end to end with its own data, segment and output settings.

Only what cannot run here is swapped: the models become the offline tiny ones (same `from_pretrained` path),
the vLLM prompt backend becomes transformers (the vLLM suite runs that backend in its own environment), sizes
and stage resources shrink to CPU ones, and the data is the toy dataset, with masks only where the config
reads masks. `configs/aga_sdxl_gpu.yaml` reads a plain image folder without masks, as most users' data is:
that path once failed on every row while all tests used the toy dataset's masks.
"""

import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from engine import schema
from engine.config import GenerateConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
GENERATE_CONFIGS = [
    p for p in sorted((ROOT / "configs").glob("*.yaml")) if "recipe" in (yaml.safe_load(p.read_text()) or {})
]
CPU_STAGE = {"batch_size": 4, "concurrency": 1, "num_gpus": 0, "num_cpus": 0.25}
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def with_tiny_models(raw: dict, toy: Path, models: Path, out: Path) -> dict:
    """The shipped config with only the things that cannot run here swapped (see the module docstring)."""
    raw = dict(raw)
    raw["data"] = {**raw["data"], "path": str(toy), "max_images": 12}
    if raw["data"].get("masks_path"):
        raw["data"]["masks_path"] = str(toy / "masks")
    raw["output"] = {**raw["output"], "path": str(out), "gallery_classes": 0, "overwrite": False}
    raw["ray"] = {"progress_bars": False, "task_num_cpus": 0.5}
    if raw["recipe"] == "unidiffda":
        return with_tiny_generator(raw, models)
    if raw["recipe"] == "caption":
        name = "blip2" if raw["caption"].get("model_type") == "blip2" else "vlm"
        raw["caption"] |= {"model": {"id": str(models / name)}, "device": "cpu", "dtype": "float32"}
        raw["caption"] |= {"stage": CPU_STAGE, "max_new_tokens": 4}
        return raw
    if raw["recipe"] == "mvc":  # the tiny InstructPix2Pix stands in for the fine-tuned 8-channel pipeline
        raw["mvc"] |= {
            "captions": str(caption_shards(toy, out.parent)),
            "model": {"id": str(models / "ip2p")},
        }
        if raw["mvc"].get("pretrained"):
            raw["mvc"]["pretrained"] = {"id": str(models / "sd15")}
        raw["mvc"] |= {
            "height": 32,
            "width": 32,
            "num_inference_steps": 2,
            "device": "cpu",
            "dtype": "float32",
        }
        raw["mvc"]["stage"] = CPU_STAGE
        raw["num_variants"] = 1
        return raw
    if raw["recipe"] == "deda":
        raw["segment"] |= {
            "detector": {"id": str(models / "grounding-dino")},
            "sam": {"id": str(models / "sam")},
            "backend": "transformers",
            "device": "cpu",
            "stage": CPU_STAGE,
        }
        raw["decouple"] = {**raw["decouple"], "stage": CPU_STAGE}
        # Random SAM masks cover the whole image: only the bounds are widened, the rest is the config's.
        raw["decouple"] |= {"min_area": 0.0, "max_area": 1.0}
        return with_tiny_generator(raw, models) if raw.get("generation") else raw
    tiny = {
        "segment": ("detector", "grounding-dino"),
        "prompt": ("model", "llm"),
        "background": ("model", "sdxl"),
    }
    for section, (key, name) in tiny.items():
        raw[section] = {**raw[section], key: {"id": str(models / name)}, "device": "cpu", "stage": CPU_STAGE}
    raw["segment"]["sam"] = {"id": str(models / "sam")}
    raw["segment"]["backend"] = "transformers"
    raw["prompt"] = {k: v for k, v in raw["prompt"].items() if k != "vllm"} | {"backend": "transformers"}
    raw["background"] |= {"height": 32, "width": 32, "num_inference_steps": 1, "compile_mode": None}
    if raw["background"].get("unet"):  # a distilled UNet file: the tiny SDXL's own UNet, saved as one
        raw["background"]["unet"] = {
            "id": str(tiny_unet_file(models, out.parent)),
            "file": "unet.safetensors",
        }
    raw["composite"] = {**raw["composite"], "stage": CPU_STAGE}
    return raw


def with_tiny_generator(raw: dict, models: Path) -> dict:
    """A UniDiffDA preset: the tiny SD1.5 (InstructPix2Pix for that mode), no adapters (they come from a
    fine-tuning run on the real checkpoint), 32 px in 2 steps (DDIM inversion: 2 more), one variant. An
    img2img preset gets the steps its lowest strength needs for one denoising step (0.1: 10)."""
    generation = raw["generation"]
    name = "ip2p" if generation["mode"] == "instruct_pix2pix" else "sd15"
    steps = 2
    if generation["mode"] in ("sdedit", "diffmix", "gif"):
        strength = generation.get("strength", 0.5)
        steps = max(steps, math.ceil(1 / min(strength if isinstance(strength, list) else [strength])))
    raw["generation"] = {k: v for k, v in generation.items() if k != "adapters"} | {
        "model": {"id": str(models / name)},
        "device": "cpu",
        "dtype": "float32",
        "height": 32,
        "width": 32,
        "num_inference_steps": steps,
        "inversion_steps": None,
        "stage": CPU_STAGE,
    }
    if generation.get("gif"):
        raw["generation"]["gif"] = {**generation["gif"], "clip": {"id": str(models / "clip")}}
    raw["num_variants"] = 1
    return raw


def caption_shards(toy: Path, where: Path) -> Path:
    """What a caption run (recipe caption) leaves for MVC's caption pools: per train image its class and caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.output.shards import SHARD_GLOB_PREFIX

    images = sorted((toy / "train").glob("*/*.png"))
    table = pa.table(
        {
            schema.ID: [f"caption-{i}" for i in range(len(images))],
            schema.CLASS_NAME: [p.parent.name for p in images],
            schema.SPLIT: ["train"] * len(images),
            schema.CAPTION: [
                f"This is an image of {p.parent.name}. a shape, {i}" for i, p in enumerate(images)
            ],
        }
    )
    out = where / "captions" / "data"
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / f"{SHARD_GLOB_PREFIX}0.parquet")
    return out


def tiny_unet_file(models: Path, where: Path) -> Path:
    """The tiny SDXL UNet's weights as one .safetensors state dict, as SDXL-Lightning ships its UNet."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(models / "sdxl", subfolder="unet")
    save_file(unet.state_dict(), str(where / "unet.safetensors"))
    return where


@pytest.mark.parametrize("path", GENERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_runs_end_to_end(ray_local, toy, tiny_models_dir, tmp_path, path):
    from engine.pipeline import run_generate

    shipped = yaml.safe_load(path.read_text())
    config = GenerateConfig.model_validate(with_tiny_models(shipped, toy, tiny_models_dir, tmp_path / "out"))
    if config.segment is not None:
        assert config.segment.use_dataset_masks == bool(shipped["segment"].get("use_dataset_masks", False))
    run = run_generate(config).data

    assert run["errors"]["total"] == 0, run["errors"]
    assert "gallery" not in run["output"], "gallery_classes=0 writes no gallery, so none is named"
    real_train = run["stages"]["expand"]["rows_in"] - (run["rows"]["real_in"] - run["rows"]["real_written"])
    expanded = [r for r in pq.read_table(tmp_path / "out" / "data").to_pylist() if r[schema.RECIPE] != "real"]
    assert run["rows"]["real_written"] == run["rows"]["real_in"] == 12
    if config.recipe == "caption":  # captions on the train split's real rows, no synthetic row
        rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
        assert not expanded and all(
            r[schema.CAPTION].startswith("This is an image of") for r in rows if r[schema.SPLIT] == "train"
        )
        return
    assert len(expanded) == run["rows"]["synthetic_written"] == run["rows"]["synthetic_expected"] > 0
    train_sources = {r[schema.SOURCE_ID] for r in expanded}
    per_source = config.num_variants + (2 if config.recipe == "deda" else 0)  # De-DA's CDP and CIP
    assert len(expanded) == len(train_sources) * per_source, real_train
    fmt = FORMATS[config.output.image_format]
    if config.recipe == "deda":  # the generator made only the edited CDPs
        assert {r[schema.PART] for r in expanded} == {"cdp", "cip", "cdp_edited"}
        expanded = [r for r in expanded if r[schema.PART] == "cdp_edited"]
    for row in expanded[:4]:
        image = Image.open(io.BytesIO(row[schema.IMAGE]))
        assert image.format == fmt and image.size == (row[schema.WIDTH], row[schema.HEIGHT])
        assert row[schema.PROMPT]
        params = json.loads(row[schema.PARAMS])
        if config.recipe in ("aga", "deda"):  # the subject is pasted back / edited with its mask
            assert row[schema.MASK] is not None
        if config.recipe == "mvc":
            assert params["mvc"]["source"] in ("finetuned", "pretrained")
        elif config.recipe != "aga":  # the generator says how it made the row
            assert params["generation"]["mode"] == config.generation.mode
