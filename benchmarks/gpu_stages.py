"""GPU stage benchmark: SDXL base, SAM ViT-H image encoder and GroundingDINO at full size, random weights.

    python -m benchmarks.gpu_stages [--tiny] [--device cuda|cpu] [--only sdxl,sam,gdino] [--out-dir DIR]

Sections (each one's failure is recorded as "error: ..." and the others still run):
- matmul: the device's measured bf16 matmul rate (float32 on CPU), the denominator of MFU;
- sdxl: the diffusers pipeline called the plain way (fp16, batch 1, 30 steps, CFG 5.0, 1024 px) against the
  project's `BackgroundGenerator` actor called as Ray Data calls it (a numpy batch of `prompt` and `seed`),
  up a ladder of `BackgroundConfig` options: bf16, batch size, channels_last + fused QKV, torch.compile;
- sam: SamModel.get_image_embeddings (what actors/segmenter.py runs) by batch size and dtype, as a fraction
  of the compute-bound rate (achieved FLOP/s over the matmul rate);
- gdino: GroundingDINO tiny and base, a per-image loop against batched calls.
Warm-up calls (compile, autotune, allocator growth) are timed apart from the measured calls.

It imports no Ray, so it runs on the GPU machine, which has torch, transformers, numpy, pillow, pyarrow,
safetensors, tokenizers and huggingface_hub but no diffusers and no pydantic and no network. Carry the wheels:

    make gpu-wheels        # here: downloads them into .whl/ (git-ignored); `bash benchmarks/gpu_wheels.sh 3.X`
                           # for a GPU machine whose python3 is not 3.12
    # there (the device tool, with carry [".whl"]), from the repository root:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 && \\
        python3 -m benchmarks.gpu_stages --device cuda --only sdxl --out-dir $OUT
    # and, as a second command, the same with `--only sam,gdino`.

One section per 10-minute command: SDXL alone is several minutes (a 7 GB checkpoint written once and loaded
four times, 30-step calls up to batch 8, a compile); `--sdxl-batches 1,4` shortens it. Results are written
after each section, so a run stopped by a time limit keeps what it measured. A subset of sections writes
`gpu_stages_<sections>.json/.md`, all of them `gpu_stages.json/.md`.
`--tiny` runs the offline tiny models (64 px SDXL, 3 steps): a smoke test of this script, never GPU numbers.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from benchmarks import gpu_models
from benchmarks.gpu_report import render
from benchmarks.record import RESULTS_DIR, machine, versions, write_result

SECTIONS = ("sdxl", "sam", "gdino")
PROMPT = "a misty forest at dawn, soft warm light, high quality photo"
SEED = 1234
GUIDANCE = 5.0


@dataclass
class Settings:
    device: str
    tiny: bool
    repeats: int  # timed calls per measurement, after the warm-up calls
    sdxl_repeats: int  # fewer for SDXL: a batch of 8 at 1024 px is several seconds a call
    matmul_size: int
    sdxl_steps: int
    sdxl_batches: tuple[int, ...]
    compile_mode: str
    sam_batches: tuple[int, ...]
    gdino_images: int  # images per loop/batched measurement
    gdino_batches: tuple[int, ...]
    dtypes: tuple[str, ...]  # low-precision dtypes to try (float32 only on CPU: actors never emulate halves)


def make_settings(
    tiny: bool, device: str, compile_mode: str, sdxl_batches: tuple[int, ...] | None
) -> Settings:
    if tiny:
        sizes = dict(matmul_size=512, sdxl_steps=3, sdxl_batches=(1, 2), sam_batches=(1, 2))
        sizes.update(repeats=2, sdxl_repeats=2, gdino_images=4, gdino_batches=(2, 4))
    else:
        sizes = dict(matmul_size=8192, sdxl_steps=30, sdxl_batches=(1, 2, 4, 8), sam_batches=(1, 2, 4, 8, 16))
        sizes.update(repeats=3, sdxl_repeats=2, gdino_images=16, gdino_batches=(4, 8, 16))
    if sdxl_batches:
        sizes["sdxl_batches"] = sdxl_batches
    return Settings(device=device, tiny=tiny, compile_mode=compile_mode, dtypes=dtypes_for(device), **sizes)


def dtypes_for(device: str) -> tuple[str, ...]:
    return ("float32",) if device == "cpu" else ("bfloat16", "float16")


# --------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, warmups: int, repeats: int) -> dict:
    """Warm-up calls, then `repeats` timed calls; returns seconds (mean over the timed calls) and fn's last output."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmups):
        fn()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return {"warmup_s": warmup_s, "seconds": seconds, "mean_s": sum(seconds) / len(seconds), "output": output}


def reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def failure(error: Exception) -> str:
    """The "error" a result records; anything but running out of memory also prints its traceback."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        return f"out of memory: {str(error).splitlines()[0][:200]}"
    traceback.print_exception(error)
    return f"{type(error).__name__}: {str(error)[:500]}"


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def count_flops(fn) -> int:
    """FLOPs of one call as torch's FlopCounterMode counts them: matmuls, convolutions and attention
    (2 per multiply-add); norms, activations and elementwise ops are not counted (they are memory-bound)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- matmul rate


def measure_matmul(settings: Settings) -> dict:
    """Rate of back-to-back n^3 matmuls in the dtype the models run in: the compute-bound ceiling.

    The denominator is the best of 10 timed repeats (the mean is recorded too): on a dedicated GPU the two
    agree within noise; on a shared CPU the best is the repeat that other processes did not slow down."""
    import torch

    dtype = "float32" if settings.device == "cpu" else "bfloat16"
    n, per_call = settings.matmul_size, 10
    a = torch.randn(n, n, device=settings.device, dtype=torch_dtype(dtype))
    b = torch.randn(n, n, device=settings.device, dtype=torch_dtype(dtype))
    timing = timed(lambda: [a @ b for _ in range(per_call)], settings.device, warmups=3, repeats=10)
    flops = 2 * n**3 * per_call
    best = flops / min(timing["seconds"])
    return {
        "dtype": dtype,
        "n": n,
        "flops_per_s": best,
        "mean_flops_per_s": flops / timing["mean_s"],
        "tflops": round(best / 1e12, 3),
    }


def utilization(flops_per_image: int, images_per_s: float, matmul: dict) -> float:
    return flops_per_image * images_per_s / matmul["flops_per_s"]


# --------------------------------------------------------------------------- SDXL


def bench_sdxl(settings: Settings, work_dir: Path, matmul: dict) -> dict:
    device = settings.device
    start = time.perf_counter()
    path = gpu_models.build_sdxl(work_dir / "sdxl", device, settings.tiny)
    free_memory()
    out: dict = {
        "build_s": round(time.perf_counter() - start, 1),
        "steps": settings.sdxl_steps,
        "guidance_scale": GUIDANCE,
    }

    # 1. The plain call.
    plain, reference, flops = measure_plain_sdxl(path, settings, matmul)
    out.update(flops)
    out["image_side"] = side = reference.shape[0]
    out["rungs"] = [plain]
    free_memory()

    # 2. The engine's actor, Ray Data's way, up the ladder of BackgroundConfig options.
    engine_dtype = "float32" if device == "cpu" else "bfloat16"
    ladder = [(f"engine {engine_dtype}", {}, settings.sdxl_batches, 1)]
    ladder.append(("+ channels_last + fused QKV", {"channels_last": True, "fuse_qkv": True}, None, 1))
    if device.startswith("cuda"):
        compiled = {"channels_last": True, "fuse_qkv": True, "compile_mode": settings.compile_mode}
        # Two warm-up calls: the first compiles, the second catches a recompile on a guard failure.
        ladder.append((f"+ torch.compile ({settings.compile_mode})", compiled, None, 2))
    else:
        out["skipped"] = "torch.compile rung: cuda only (its compile time on a CPU dwarfs a tiny model)"
    best_batch = 1
    for name, tunings, batches, warmups in ladder:
        job = EngineRung(path, side, settings, engine_dtype, name, tunings, warmups)
        results = job.measure(batches or (best_batch,), out["flops_per_image"], matmul, reference)
        del job
        free_memory()
        out["rungs"] += results
        measured = [r for r in results if "images_per_s" in r]
        if batches and measured:
            best_batch = max(measured, key=lambda r: r["images_per_s"])["batch_size"]
    for result in out["rungs"]:
        if "images_per_s" in result:
            result["speedup_vs_plain"] = round(result["images_per_s"] / plain["images_per_s"], 3)
    return out


def measure_plain_sdxl(path: Path, settings: Settings, matmul: dict) -> tuple[dict, np.ndarray, dict]:
    """The diffusers pipeline the plain way: from_pretrained in fp16, batch 1, default settings but the step
    count and a seeded generator (so the engine's image for the same seed can be compared with it)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    device = settings.device
    dtype = "float32" if device == "cpu" else "float16"
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=torch_dtype(dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(num_steps: int = settings.sdxl_steps):
        generator = torch.Generator("cpu").manual_seed(SEED)
        return pipe(
            PROMPT, num_inference_steps=num_steps, guidance_scale=GUIDANCE, generator=generator
        ).images

    # FLOPs per image: the whole pipeline call (both text encoders, two UNet passes per step for CFG, the VAE
    # decode) counted at 1 and 2 steps; their difference is one step's UNet work.
    one_step, two_steps = count_flops(lambda: call(1)), count_flops(lambda: call(2))
    flops_per_image = one_step + (settings.sdxl_steps - 1) * (two_steps - one_step)
    flops = {"flops_per_image": flops_per_image, "flops_per_unet_step": two_steps - one_step}

    reset_peak_memory(device)
    timing = timed(call, device, warmups=1, repeats=settings.sdxl_repeats)
    plain = rung(f"plain diffusers {dtype}", dtype, 1, timing, flops_per_image, matmul, device)
    plain.update(max_abs_diff_vs_plain=None, psnr_vs_plain_db=None)
    return plain, np.asarray(timing["output"][0]), flops


class EngineRung:
    """One `BackgroundGenerator` (one set of `BackgroundConfig` options) measured at some batch sizes."""

    def __init__(
        self, path: Path, side: int, settings: Settings, dtype: str, name: str, tunings: dict, warmups: int
    ):
        self.path, self.side, self.settings, self.dtype = path, side, settings, dtype
        self.name, self.tunings, self.warmups = name, tunings, warmups
        self.generator = None

    def measure(self, batches, flops_per_image: int, matmul: dict, reference: np.ndarray) -> list[dict]:
        device, results = self.settings.device, []
        for batch_size in batches:
            try:
                reset_peak_memory(device)
                if self.generator is None:
                    self.generator = engine_generator(
                        self.path, self.side, self.settings, self.dtype, self.tunings
                    )
                batch = engine_batch(batch_size)
                timing = timed(
                    lambda b=batch: self.generator(b), device, self.warmups, self.settings.sdxl_repeats
                )
            except Exception as error:  # an OOM (or a failing option) ends this rung; the next one still runs
                results.append({"name": self.name, "batch_size": batch_size, "error": failure(error)})
                break
            result = rung(
                self.name, self.dtype, batch_size, timing, flops_per_image, matmul, device, self.tunings
            )
            result.update(compare_images(timing["output"]["background"][0], reference))
            result["nonfinite_rows"] = int(
                sum(e == "background_nonfinite" for e in timing["output"]["error"])
            )
            results.append(result)
        return results


def engine_generator(path: Path, side: int, settings: Settings, dtype: str, tunings: dict):
    from actors.background import BackgroundGenerator
    from engine.config import BackgroundConfig, ModelRef

    config = BackgroundConfig(
        model=ModelRef(id=str(path)),
        height=side,
        width=side,
        num_inference_steps=settings.sdxl_steps,
        guidance_scale=GUIDANCE,
        negative_prompt="",  # zero negative embeddings, as the plain call with no negative prompt uses
        device=settings.device,
        dtype=dtype,
        **tunings,
    )
    return BackgroundGenerator(config)


def engine_batch(batch_size: int) -> dict[str, np.ndarray]:
    """A batch as Ray Data's `map_batches(batch_format="numpy")` hands it over; row 0 has the plain call's seed."""
    return {
        "prompt": np.array([PROMPT] * batch_size, dtype=object),
        "seed": np.arange(SEED, SEED + batch_size, dtype=np.int64),
    }


def compare_images(image: np.ndarray, reference: np.ndarray) -> dict:
    """uint8 max abs difference and PSNR (None when the images are identical; JSON has no infinity).

    bf16 against the plain call's fp16 is expected to differ a little; a tuning that changes the image a lot
    shows here."""
    diff = image.astype(np.int16) - reference.astype(np.int16)
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 2)
    return {"max_abs_diff_vs_plain": int(np.abs(diff).max()), "psnr_vs_plain_db": psnr}


def rung(name, dtype, batch_size, timing, flops_per_image, matmul, device, tunings=None) -> dict:
    images_per_s = batch_size / timing["mean_s"]
    print(f"[gpu_stages]   {name}, batch {batch_size}: {images_per_s:.3g} images/s", flush=True)
    return {
        "name": name,
        "dtype": dtype,
        "batch_size": batch_size,
        "tunings": tunings or {},
        "warmup_s": round(timing["warmup_s"], 3),
        "seconds": [round(s, 4) for s in timing["seconds"]],
        "images_per_s": images_per_s,
        "peak_memory_gib": peak_memory_gib(device),
        "mfu": utilization(flops_per_image, images_per_s, matmul),
    }


# --------------------------------------------------------------------------- SAM image encoder


def bench_sam(settings: Settings, work_dir: Path, matmul: dict) -> dict:
    out: dict = {"rungs": []}
    # bf16 over every batch size; the other dtypes at one size for reference; then compile at the best.
    first = settings.dtypes[0]
    mid_batch = (settings.sam_batches[-1] // 2,)
    plan = [(first, settings.sam_batches, False)]
    plan += [(d, mid_batch, False) for d in (*settings.dtypes[1:], "float32") if d != first]
    if settings.device.startswith("cuda"):
        plan.append((first, None, True))
    best_batch = settings.sam_batches[0]
    for dtype, batches, compile_model in plan:
        results = measure_sam(settings, work_dir, matmul, dtype, batches or (best_batch,), compile_model, out)
        free_memory()
        out["rungs"] += results
        measured = [r for r in results if "images_per_s" in r]
        if batches and dtype == first and measured:
            best_batch = max(measured, key=lambda r: r["images_per_s"])["batch_size"]
    return out


def measure_sam(settings, work_dir, matmul, dtype, batches, compile_model, out) -> list[dict]:
    """One SAM encoder in `dtype` at `batches`; sets out's image side, attention and FLOPs on first use."""
    import torch

    device = settings.device
    model, side = gpu_models.build_sam(work_dir, device, torch_dtype(dtype), settings.tiny)
    out["image_side"], out["attn_implementation"] = side, model.config.vision_config._attn_implementation
    if "flops_per_image" not in out:
        pixels = torch.randn(1, 3, side, side, device=device, dtype=torch_dtype(dtype))
        with torch.inference_mode():
            out["flops_per_image"] = count_flops(lambda: model.get_image_embeddings(pixels))
    if compile_model:
        model.vision_encoder.compile(mode=settings.compile_mode)
    name = dtype + (f" + torch.compile ({settings.compile_mode})" if compile_model else "")
    results = []
    for batch_size in batches:
        pixels = torch.randn(batch_size, 3, side, side, device=device, dtype=torch_dtype(dtype))
        try:
            reset_peak_memory(device)
            with torch.inference_mode():
                timing = timed(
                    lambda p=pixels: model.get_image_embeddings(p),
                    device,
                    warmups=3 if compile_model else 2,
                    repeats=settings.repeats * 3,  # short calls: more of them
                )
        except Exception as error:  # an OOM (or a failing compile) ends this dtype's ladder
            results.append({"name": name, "batch_size": batch_size, "error": failure(error)})
            break
        result = rung(name, dtype, batch_size, timing, out["flops_per_image"], matmul, device)
        result["fraction_of_compute_bound"] = result.pop("mfu")
        results.append(result)
    return results


# --------------------------------------------------------------------------- GroundingDINO


def bench_gdino(settings: Settings, work_dir: Path, matmul: dict) -> dict:
    height, width = gpu_models.TINY_DETECTOR_IMAGE_HW if settings.tiny else gpu_models.DETECTOR_IMAGE_HW
    ids = gpu_models.detector_prompt_ids(settings.tiny)
    num_images = settings.gdino_images
    out: dict = {"image_hw": [height, width], "prompt_tokens": len(ids), "images": num_images, "models": {}}
    if settings.tiny:
        out["note"] = "tiny mode: both sizes run the engine's tiny GroundingDINO"
    for size in ("tiny", "base"):
        for dtype in ["float32"] + [d for d in settings.dtypes if d != "float32"][:1]:
            key = f"{size} {dtype}"
            try:
                out["models"][key] = bench_one_detector(size, dtype, settings, work_dir, (height, width), ids)
            except Exception as error:  # e.g. an op without a bf16 kernel: say so, go on
                out["models"][key] = {"error": failure(error)}
            free_memory()
    return out


def bench_one_detector(size, dtype, settings, work_dir, hw, ids) -> dict:
    import torch

    device = settings.device
    model = gpu_models.build_grounding_dino(size, work_dir, device, torch_dtype(dtype), settings.tiny)
    num_images = settings.gdino_images

    def inputs(batch_size: int) -> dict:
        return {
            "pixel_values": torch.randn(batch_size, 3, *hw, device=device, dtype=torch_dtype(dtype)),
            "pixel_mask": torch.ones(batch_size, *hw, device=device, dtype=torch.long),
            "input_ids": torch.tensor([ids] * batch_size, device=device),
            "attention_mask": torch.ones(batch_size, len(ids), device=device, dtype=torch.long),
        }

    def run(batch_size: int):
        batch = inputs(batch_size)
        return [model(**batch).logits for _ in range(num_images // batch_size)]

    result: dict = {"rungs": []}
    with torch.inference_mode():
        for batch_size in (1, *settings.gdino_batches):
            try:
                reset_peak_memory(device)
                timing = timed(lambda b=batch_size: run(b), device, warmups=1, repeats=settings.repeats)
            except Exception as error:  # an OOM ends the batch ladder
                result["rungs"].append({"batch_size": batch_size, "error": failure(error)})
                break
            images_per_s = num_images / timing["mean_s"]
            print(
                f"[gpu_stages]   GroundingDINO {size} {dtype}, batch {batch_size}: {images_per_s:.3g} images/s"
            )
            result["rungs"].append(
                {
                    "batch_size": batch_size,
                    "mode": "per-image loop" if batch_size == 1 else "batched",
                    "warmup_s": round(timing["warmup_s"], 3),
                    "images_per_s": images_per_s,
                    "peak_memory_gib": peak_memory_gib(device),
                }
            )
    if "error" in result["rungs"][0]:
        return {"error": f"per-image loop: {result['rungs'][0]['error']}"}
    loop = result["rungs"][0]["images_per_s"]
    batched = [r["images_per_s"] for r in result["rungs"][1:] if "images_per_s" in r]
    for r in result["rungs"]:
        if "images_per_s" in r:
            r["speedup_vs_loop"] = round(r["images_per_s"] / loop, 3)
    result["best_batched_speedup_vs_loop"] = round(max(batched) / loop, 3) if batched else None
    return result


BENCHES = {"sdxl": bench_sdxl, "sam": bench_sam, "gdino": bench_gdino}


# --------------------------------------------------------------------------- main


def all_versions() -> dict:
    import torch

    out = versions()
    for name in ("pydantic", "safetensors", "tokenizers", "timm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def run_section(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as error:  # one section's failure must not lose the others' numbers
        return {"error": failure(error)}
    finally:
        free_memory()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="offline tiny models: a smoke test, not GPU numbers"
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--work-dir", type=Path, help="where the SDXL checkpoint is saved (default: a temp dir)"
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compile rungs")
    parser.add_argument(
        "--sdxl-batches", help="comma-separated engine batch sizes (default 1,2,4,8; tiny 1,2)"
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown or not only:
        parser.error(f"unknown sections {unknown}; available: {', '.join(SECTIONS)}")
    sdxl_batches = tuple(int(b) for b in args.sdxl_batches.split(",")) if args.sdxl_batches else None

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars for every checkpoint would bury the tables at the end of the output.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda but torch sees no CUDA device (use --device cpu --tiny for the smoke run)"
        )
    settings = make_settings(args.tiny, args.device, args.compile_mode, sdxl_batches)
    # A subset gets its own file, so `--only sdxl` and `--only sam,gdino` runs do not overwrite each other.
    name = "gpu_stages" if set(only) == set(SECTIONS) else "_".join(["gpu_stages", *only])
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_stages_"))
    data: dict = {
        "name": name,
        "tiny": args.tiny,
        "device": args.device,
        "machine": machine(),
        "versions": all_versions(),
        "settings": asdict(settings),
    }
    try:
        data["matmul"] = run_section(measure_matmul, settings)
        for section in only:
            if "error" in data["matmul"]:
                data[section] = {"error": "no matmul rate measured"}
                continue
            print(f"[gpu_stages] {section} ...", flush=True)
            data[section] = run_section(BENCHES[section], settings, work_dir, data["matmul"])
            # After each section, so a run stopped by a time limit keeps what it measured.
            write_result(name, data, render(data), args.out_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    markdown = render(data)
    write_result(name, data, markdown, args.out_dir)
    print(markdown)
    return data


if __name__ == "__main__":
    main()
