"""benchmarks/gpu_stages.py in its tiny CPU mode: every section runs and reports what the GPU run will report.

The numbers are not checked for speed (tiny models on a shared CPU), only for being measured and sane.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    """One tiny CPU run in a fresh interpreter, which must never import Ray (the GPU machine has none)."""
    out_dir = tmp_path_factory.mktemp("gpu_stages")
    code = (
        "import sys\n"
        "from benchmarks.gpu_stages import main\n"
        "main(sys.argv[1:])\n"
        "assert 'ray' not in sys.modules, 'benchmarks.gpu_stages imported ray'\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = ["--tiny", "--device", "cpu", "--out-dir", str(out_dir)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out_dir / "gpu_stages.json").read_text()), (out_dir / "gpu_stages.md").read_text()


def check_utilization(value, rung: dict, flops_per_image: int, matmul: dict) -> None:
    """Utilization is the model's counted FLOPs per second over the best rate of back-to-back dense matmuls
    in the same dtype: it is what the reported numbers give (images/s from the timed calls), and at most 1,
    since a model's matmuls, convolutions and attention cannot outrun the dense matmul that is their ceiling
    (the denominator is the best of its repeats, the numerator a mean, so noise only lowers the ratio)."""
    mean_s = sum(rung["seconds"]) / len(rung["seconds"])  # each rounded to 0.1 ms in the report
    assert (
        rung["batch_size"] / (mean_s + 5e-5) <= rung["images_per_s"] <= rung["batch_size"] / (mean_s - 5e-5)
    )
    assert math.isclose(value, flops_per_image * rung["images_per_s"] / matmul["flops_per_s"], rel_tol=1e-9)
    assert isinstance(value, float) and 0 < value <= 1, rung


def test_tiny_run_is_marked_as_not_gpu_numbers(tiny_run):
    data, markdown = tiny_run
    assert data["tiny"] is True and data["device"] == "cpu"
    assert data["machine"]["gpu"] is None and data["versions"]["torch"]
    assert "NOT GPU numbers" in markdown
    for section in ("## sdxl", "## sam", "## gdino"):
        assert section in markdown
    assert "error" not in markdown
    assert data["matmul"]["dtype"] == "float32" and data["matmul"]["flops_per_s"] > 0


def test_sdxl_plain_call_against_the_engine_ladder(tiny_run):
    sdxl = tiny_run[0]["sdxl"]
    # An image is `steps` UNet steps plus the text encoders and the VAE decode.
    assert 0 < sdxl["steps"] * sdxl["flops_per_unet_step"] < sdxl["flops_per_image"]
    rungs = sdxl["rungs"]
    assert all("error" not in r for r in rungs), rungs
    assert [(r["name"], r["batch_size"]) for r in rungs][:3] == [
        ("plain diffusers float32", 1),
        ("engine float32", 1),
        ("engine float32", 2),
    ]
    tuned = rungs[-1]
    assert tuned["tunings"] == {"channels_last": True, "fuse_qkv": True}
    for r in rungs:
        assert r["images_per_s"] > 0 and r["speedup_vs_plain"] > 0
        check_utilization(r["mfu"], r, sdxl["flops_per_image"], tiny_run[0]["matmul"])
        assert len(r["seconds"]) == 2 and r["warmup_s"] >= 0
    assert rungs[0]["speedup_vs_plain"] == 1.0
    # fp32 on CPU: the actor reproduces the plain call's image for the same prompt and seed; batching and the
    # tunings change at most rounding.
    assert rungs[1]["max_abs_diff_vs_plain"] == 0
    for r in rungs[1:]:
        assert r["max_abs_diff_vs_plain"] <= 2 and r["nonfinite_rows"] == 0
    assert "compile" in sdxl["skipped"]


def test_sam_encoder_by_batch_size(tiny_run):
    sam = tiny_run[0]["sam"]
    assert sam["flops_per_image"] > 0 and sam["image_side"] == 64
    assert [r["batch_size"] for r in sam["rungs"]] == [1, 2]
    for r in sam["rungs"]:
        assert r["images_per_s"] > 0
        check_utilization(r["fraction_of_compute_bound"], r, sam["flops_per_image"], tiny_run[0]["matmul"])


def test_grounding_dino_loop_against_batched(tiny_run):
    gdino = tiny_run[0]["gdino"]
    assert set(gdino["models"]) == {"tiny float32", "base float32"}
    for model in gdino["models"].values():
        assert "error" not in model, model
        loop, *batched = model["rungs"]
        assert loop["mode"] == "per-image loop" and loop["speedup_vs_loop"] == 1.0
        assert [r["batch_size"] for r in batched] == [2, 4]
        assert all(r["images_per_s"] > 0 for r in model["rungs"])
        assert model["best_batched_speedup_vs_loop"] == max(r["speedup_vs_loop"] for r in batched)


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    from benchmarks import gpu_stages

    def broken(*args):
        raise RuntimeError("no kernel for this")

    monkeypatch.setitem(gpu_stages.BENCHES, "sdxl", broken)
    monkeypatch.setitem(
        gpu_stages.BENCHES,
        "gdino",
        lambda *args: {"models": {}, "image_hw": [1, 1], "prompt_tokens": 1, "images": 1},
    )
    data = gpu_stages.main(["--tiny", "--device", "cpu", "--only", "sdxl,gdino", "--out-dir", str(tmp_path)])
    assert data["sdxl"] == {"error": "RuntimeError: no kernel for this"}
    assert "error: RuntimeError: no kernel for this" in (tmp_path / "gpu_stages_sdxl_gdino.md").read_text()
    assert "models" in data["gdino"] and "sam" not in data


def test_unknown_section_is_a_usage_error(tmp_path):
    from benchmarks import gpu_stages

    with pytest.raises(SystemExit):
        gpu_stages.main(["--tiny", "--device", "cpu", "--only", "sdxl,vae", "--out-dir", str(tmp_path)])


def test_full_size_sdxl_builder_path_with_shrunken_widths(tmp_path, monkeypatch):
    """The GPU run's builder (special ids, device context, fp16 save) at tiny widths: a pipeline that loads."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from benchmarks import gpu_models

    small_unet = dict(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        norm_num_groups=8,
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    small_text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    monkeypatch.setattr(gpu_models, "SDXL_UNET", {**gpu_models.SDXL_UNET, **small_unet})
    monkeypatch.setattr(
        gpu_models,
        "SDXL_VAE",
        {**gpu_models.SDXL_VAE, "block_out_channels": (8,) * 4, "norm_num_groups": 4, "layers_per_block": 1},
    )
    monkeypatch.setattr(
        gpu_models, "SDXL_TEXT_ENCODER", {**gpu_models.SDXL_TEXT_ENCODER, **small_text, "projection_dim": 32}
    )
    monkeypatch.setattr(
        gpu_models,
        "SDXL_TEXT_ENCODER_2",
        {**gpu_models.SDXL_TEXT_ENCODER_2, **small_text, "projection_dim": 32},
    )

    path = gpu_models.build_sdxl(tmp_path / "sdxl", "cpu", tiny=False)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder_2.config.vocab_size == 49408
    eos = pipe.tokenizer.eos_token_id
    assert pipe.text_encoder.config.eos_token_id == pipe.text_encoder_2.config.eos_token_id == eos
    assert pipe.tokenizer("a forest").input_ids[-1] == eos
    image = pipe("a forest", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_full_size_architectures_have_the_published_parameter_counts():
    """Built on the meta device (no memory, and like CUDA it refuses numpy conversions at construction)."""
    import torch

    from benchmarks import gpu_models

    def millions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    pipe = gpu_models.sdxl_pipeline("meta")
    # stabilityai/stable-diffusion-xl-base-1.0: UNet 2.567 B, VAE 83.7 M, CLIP-L text 123.1 M, bigG text 694.7 M.
    assert millions(pipe.unet) == 2567.5 and millions(pipe.vae) == 83.7
    assert millions(pipe.text_encoder) == 123.1 and millions(pipe.text_encoder_2) == 694.7
    sam, side = gpu_models.build_sam(None, "meta", torch.bfloat16, tiny=False)
    assert side == 1024 and millions(sam) == 641.1  # facebook/sam-vit-huge
    # Swin-T (tiny) and Swin-B (base) backbones, each with the bert-base text tower and the DINO head.
    for size, expected in (("tiny", 172.3), ("base", 232.3)):
        assert (
            millions(gpu_models.build_grounding_dino(size, None, "meta", torch.float32, tiny=False))
            == expected
        )
