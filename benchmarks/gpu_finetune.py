"""GPU fine-tuning benchmark: the step every `synthray finetune` worker takes (engine.finetune.loop.training_step)
on full-size SD1.5 and SDXL architectures with random weights, which cost exactly the compute of the real
checkpoints.

    python -m benchmarks.gpu_finetune [--tiny] [--device cuda|cpu] [--only sd15,sdxl] [--out-dir DIR]

For each model and method (textual inversion: new rows of the token embeddings, gradients through the text
encoders; DreamBooth-LoRA: rank-4 peft LoRA on the UNet attention projections) and batch size: optimizer
steps/s and images/s after warm-up steps, and peak GPU memory. bf16 autocast on CUDA, as `precision: bf16`.
No Ray (the loop's Ray parts are the scaffolding around this step): it runs on the GPU machine with the wheels
of `make gpu-wheels` (diffusers, pydantic; peft is there already), the way benchmarks/gpu_stages.py documents:

    python3 -m benchmarks.gpu_finetune --device cuda --out-dir $OUT

`--tiny` runs the offline tiny models at 64 px: a smoke test of this script, never GPU numbers.
Writes `<out-dir>/gpu_finetune.json/.md` after each model, so a run stopped by a time limit keeps its numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import traceback
from pathlib import Path

import numpy as np

from benchmarks.record import RESULTS_DIR, machine, markdown_table, versions, write_result

MODELS = ("sd15", "sdxl")
METHODS = ("textual_inversion", "dreambooth_lora")
CLASSES = ["class_a", "class_b", "class_c", "class_d"]

# stable-diffusion-v1-5's component configs (UNet 860 M, CLIP ViT-L/14 text tower, the 8x VAE).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)


def sd15_pipeline(device: str):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.gpu_models import SDXL_TEXT_ENCODER
    from engine.tiny.sd15 import SD15_SCHEDULER
    from engine.tiny.sdxl import BOS, EOS, build_tokenizer

    tokenizer, vocab = build_tokenizer()
    special_ids = dict(bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    torch.manual_seed(0)
    with torch.device(device):
        models = dict(
            vae=AutoencoderKL(**SD15_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER, **special_ids)),  # CLIP ViT-L/14
            unet=UNet2DConditionModel(**SD15_UNET),
        )
    return StableDiffusionPipeline(
        **models,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(model: str, device: str, tiny: bool):
    import torch

    if tiny:
        from engine.tiny import sd15, sdxl

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return (sd15 if model == "sd15" else sdxl)._tiny_pipeline().to(device)
    if model == "sd15":
        return sd15_pipeline(device)
    from benchmarks.gpu_models import sdxl_pipeline

    return sdxl_pipeline(device)


def bench_method(model: str, method_name: str, settings: dict) -> list[dict]:
    """One fresh pipeline, one method, steps/s by batch size."""
    import torch
    from diffusers import DDPMScheduler

    from engine.finetune.loop import training_step
    from engine.finetune.lora import DreamBoothLora
    from engine.finetune.textual_inversion import TextualInversion

    device = settings["device"]
    pipe = build_pipeline(model, device, settings["tiny"])
    pipe.set_progress_bar_config(disable=True)
    for name in ("vae", "unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    if method_name == "textual_inversion":
        spec = {"placeholder": "<{class_name}>", "initializer": "the", "initializers": {}}
        method = TextualInversion(pipe, CLASSES, spec)
    else:
        spec = {"rank": 4, "alpha": 4, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
        method = DreamBoothLora(pipe, CLASSES, {**spec, "prompt": "a photo of a {token}"}, None)
    trainable = sum(p.numel() for p in method.parameters())
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-4)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    side = settings["sides"][model]
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else contextlib.nullcontext
    )
    results = []
    for batch_size in settings["batches"]:
        loop = {
            "method": method_name,
            "seed": 0,
            "resolution": side,
            "hflip": True,
            "batch_size": batch_size,
            "accumulation": 1,
            "timestep_range": None,
        }
        pixels = torch.randint(0, 256, (batch_size, 3, side, side), dtype=torch.uint8)
        labels = np.arange(batch_size) % len(CLASSES)
        row = {
            "model": model,
            "method": method_name,
            "batch_size": batch_size,
            "side": side,
            "trainable": trainable,
        }
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            step = 0
            for _ in range(settings["warmups"]):
                training_step(
                    pipe,
                    scheduler,
                    method,
                    optimizer,
                    pixels,
                    labels,
                    loop,
                    step=step,
                    rank=0,
                    device=device,
                    autocast=amp,
                )
                step += 1
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(settings["steps"]):
                loss, _ = training_step(
                    pipe,
                    scheduler,
                    method,
                    optimizer,
                    pixels,
                    labels,
                    loop,
                    step=step,
                    rank=0,
                    device=device,
                    autocast=amp,
                )
                step += 1
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / settings["steps"]
            row.update(
                steps_per_s=round(1 / seconds, 3),
                images_per_s=round(batch_size / seconds, 2),
                loss=round(loss, 4),
            )
            if device == "cuda":
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as error:  # noqa: BLE001 (an OOM at one batch size must not lose the others)
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            if "out of memory" not in str(error):
                traceback.print_exc()
        results.append(row)
    del pipe, method, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def render(data: dict) -> str:
    rows = [
        [
            r["model"],
            r["method"],
            r["side"],
            r["batch_size"],
            r.get("steps_per_s", r.get("error")),
            r.get("images_per_s"),
            r.get("peak_gib"),
        ]
        for r in data["results"]
    ]
    title = "# Fine-tuning step (engine.finetune.loop.training_step)" + (
        " - TINY smoke run, not GPU numbers" if data["tiny"] else ""
    )
    return (
        f"{title}\n\ndevice {data['device']}, {data['machine'].get('gpu') or 'cpu'}; bf16 autocast on CUDA; "
        f"AdamW; full-size architectures, random weights\n\n"
        + markdown_table(["model", "method", "px", "batch", "steps/s", "images/s", "peak GiB"], rows)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="offline tiny models: a smoke test, not GPU numbers"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--only", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    parser.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (default 1,2,4; tiny 1,2)"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    if not only or set(only) - set(MODELS):
        parser.error(f"unknown models {sorted(set(only) - set(MODELS))}; available: {', '.join(MODELS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda but torch sees no CUDA device (use --device cpu --tiny for the smoke run)"
        )
    default_batches = "1,2" if args.tiny else "1,2,4"
    settings = {
        "device": args.device,
        "tiny": args.tiny,
        "batches": [int(b) for b in (args.batches or default_batches).split(",")],
        "sides": {"sd15": 64, "sdxl": 64} if args.tiny else {"sd15": 512, "sdxl": 1024},
        "warmups": 1 if args.tiny else 3,
        "steps": 2 if args.tiny else 10,
    }
    data = {
        "name": "gpu_finetune",
        "tiny": args.tiny,
        "device": args.device,
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
        "results": [],
    }
    for model in only:
        for method in METHODS:
            print(f"[gpu_finetune] {model} {method} ...", flush=True)
            data["results"] += bench_method(model, method, settings)
            write_result("gpu_finetune", data, render(data), args.out_dir)
    print(render(data))
    return data


if __name__ == "__main__":
    main()
