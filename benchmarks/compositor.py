"""Compositor benchmark: `engine.methods.paste.composite_one` against a straightforward per-image PIL version.

    python -m benchmarks.compositor [--sizes 512 1024] [--num-images 16] [--repeats 5] [--out-dir DIR]

Both implementations get the same rows: a source image of S x S px with a random elliptical subject mask
covering about 30% of it, an SDXL-size (1024 x 1024) background to cover-resize, and a seed from which both
draw the same flip, angle, scale and position. Both resample bilinearly, feather the edge with a Gaussian of
sigma `feather_px` and return a binary mask. The comparison is single-core: OpenCV runs with
`cv2.setNumThreads(1)` (PIL and numpy are single-threaded here); a second row reports OpenCV with its default
thread count. The `Compositor` row is the actor's `__call__` on one batch of all rows (what Ray Data runs).

Timing: each implementation runs over all rows `repeats` times, interleaved so that a change of machine
load hits all of them alike; images/s is the best pass (timeit's convention on a noisy machine), the
median is recorded too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from actors.compositor import Compositor
from benchmarks.record import RESULTS_DIR, machine, markdown_table, versions, write_result
from engine import schema
from engine.config import CompositeConfig
from engine.methods.paste import composite_one

BACKGROUND_SIZE = 1024  # SDXL's output
SUBJECT_AREA = 0.3
DEFAULT_CV2_THREADS = cv2.getNumThreads()  # read at import, before this benchmark changes it

Row = tuple[np.ndarray, np.ndarray, np.ndarray, int]  # image, mask, background, seed


# ---------------------------------------------------------------- the baseline


def composite_one_pil(
    image: np.ndarray, mask: np.ndarray, background: np.ndarray, seed: int, config: CompositeConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The natural per-image PIL implementation: crop the subject as RGBA, flip, scale, rotate (expand),
    shrink to fit if needed, feather the alpha with GaussianBlur, paste at a random position.

    Same draws from the seed as `composite_one`; returns (composite, binary mask, bbox).
    """
    height, width = image.shape[:2]
    rng = np.random.default_rng(seed)
    flip = bool(rng.random() < config.flip_prob)
    angle = float(rng.uniform(*config.rotation_deg))
    scale = float(rng.uniform(*config.scale))
    position = rng.random(2)

    canvas = ImageOps.fit(Image.fromarray(background), (width, height), Image.Resampling.BILINEAR)
    alpha = Image.fromarray(mask).point(lambda v: 255 if v >= 128 else 0)
    box = alpha.getbbox()
    if box is None:
        raise ValueError("empty mask")
    subject = Image.fromarray(image).convert("RGBA")
    subject.putalpha(alpha)
    subject = subject.crop(box)
    if flip:
        subject = subject.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = (max(1, round(subject.width * scale)), max(1, round(subject.height * scale)))
    subject = subject.resize(size, Image.Resampling.BILINEAR)
    subject = subject.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    if subject.width > width or subject.height > height:
        subject.thumbnail((width, height), Image.Resampling.BILINEAR)

    subject_alpha = subject.getchannel("A")
    subject_mask = subject_alpha.point(lambda v: 255 if v >= 128 else 0)
    if config.feather_px > 0:
        subject_alpha = subject_alpha.filter(ImageFilter.GaussianBlur(config.feather_px))
    x = int(position[0] * (width - subject.width))
    y = int(position[1] * (height - subject.height))
    canvas.paste(subject.convert("RGB"), (x, y), subject_alpha)
    out_mask = Image.new("L", (width, height), 0)
    out_mask.paste(subject_mask, (x, y))
    bbox = np.array(out_mask.getbbox() or (np.nan,) * 4, np.float32)
    return np.asarray(canvas), np.asarray(out_mask), bbox


# ---------------------------------------------------------------- inputs


def make_rows(size: int, num_images: int, seed: int = 0) -> list[Row]:
    """Smooth random images with one elliptical subject of ~30% of the area, and 1024 px backgrounds."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        image = _smooth_noise(rng, size)
        aspect = rng.uniform(0.6, 1.0)
        # Ellipse area pi * a * b = SUBJECT_AREA * size^2, with b = aspect * a.
        a = np.sqrt(SUBJECT_AREA * size * size / (np.pi * aspect))
        axes = (int(round(a)), int(round(a * aspect)))
        margin = axes[0] + 1
        centre = (int(rng.integers(margin, size - margin + 1)), int(rng.integers(margin, size - margin + 1)))
        mask = np.zeros((size, size), np.uint8)
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
        rows.append((image, mask, _smooth_noise(rng, BACKGROUND_SIZE), 1000 + i))
    return rows


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return cv2.add(image, rng.integers(0, 12, image.shape, dtype=np.uint8))


# ---------------------------------------------------------------- timing


def _check_outputs(name: str, rows: list[Row], fn: Callable, config: CompositeConfig) -> None:
    """Both implementations must do the same work: the pasted subject keeps roughly its drawn area."""
    for image, mask, background, seed in rows:
        out, out_mask, _ = fn(image, mask, background, seed, config)[:3]
        assert out.shape == image.shape and out.dtype == np.uint8, (name, out.shape, out.dtype)
        assert out_mask.shape == mask.shape, (name, out_mask.shape)
        rng = np.random.default_rng(seed)
        rng.random(), rng.uniform(*config.rotation_deg)
        scale = rng.uniform(*config.scale)
        ratio = (out_mask > 0).sum() / ((mask > 0).sum() * scale**2)
        # Shrink-to-fit may lower the area; anything else is a bug in one of the two.
        assert 0.3 < ratio < 1.15, f"{name}: pasted area is {ratio:.2f} of the drawn area (seed {seed})"


def _time_pass(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(size: int, num_images: int, repeats: int, config: CompositeConfig) -> list[dict]:
    rows = make_rows(size, num_images)
    _check_outputs("composite_one", rows, composite_one, config)
    _check_outputs("pil", rows, composite_one_pil, config)
    batch = {
        schema.IMAGE: _objects([r[0] for r in rows]),
        schema.MASK: _objects([r[1] for r in rows]),
        schema.BACKGROUND: _objects([r[2] for r in rows]),
        schema.SEED: np.array([r[3] for r in rows], np.int64),
    }
    actor = Compositor(config)

    def each(fn: Callable) -> Callable[[], None]:
        return lambda: [fn(*row, config) for row in rows]

    cases: list[tuple[str, str, int, Callable[[], object]]] = [
        ("PIL per image (baseline)", "pil", 1, each(composite_one_pil)),
        ("synthray composite_one", "composite_one", 1, each(composite_one)),
        ("synthray Compositor (one batch)", "compositor_batch", 1, lambda: actor(dict(batch))),
        ("synthray composite_one", "composite_one", DEFAULT_CV2_THREADS, each(composite_one)),
    ]
    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    try:
        for _, _, threads, fn in cases:  # warm-up: first calls pay for lazy initialisation
            cv2.setNumThreads(threads)
            fn()
        for _ in range(repeats):
            for i, (_, _, threads, fn) in enumerate(cases):
                cv2.setNumThreads(threads)
                times[i].append(_time_pass(fn))
    finally:
        cv2.setNumThreads(DEFAULT_CV2_THREADS)

    results = []
    baseline = num_images / min(times[0])
    for i, (label, key, threads, _) in enumerate(cases):
        best = num_images / min(times[i])
        results.append(
            {
                "size": size,
                "implementation": key,
                "label": label,
                "cv2_threads": threads,
                "images": num_images,
                "repeats": repeats,
                "images_per_s": round(best, 2),
                "images_per_s_median": round(num_images / statistics.median(times[i]), 2),
                "ms_per_image": round(1000 / best, 3),
                "speedup_vs_pil": round(best / baseline, 2),
            }
        )
    return results


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# ---------------------------------------------------------------- entry point


def run(
    sizes: tuple[int, ...] = (512, 1024),
    num_images: int = 16,
    repeats: int = 5,
    out_dir: Path | None = RESULTS_DIR,
) -> dict:
    config = CompositeConfig()  # the product's defaults: flip 0.5, +-15 deg, scale 0.8-1.2, feather 1.5 px
    results = [r for size in sizes for r in bench_size(size, num_images, repeats, config)]
    data = {
        "benchmark": "compositor",
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "sizes": list(sizes),
            "num_images": num_images,
            "repeats": repeats,
            "background_px": BACKGROUND_SIZE,
            "subject_area": SUBJECT_AREA,
            "composite_config": config.model_dump(mode="json", exclude={"stage"}),
            "timing": "best of `repeats` passes over all rows, implementations interleaved",
        },
        "results": results,
    }
    if out_dir is not None:
        write_result("compositor", data, to_markdown(data), out_dir)
    return data


def to_markdown(data: dict) -> str:
    headers = ["image px", "implementation", "cv2 threads", "images/s", "ms/image", "vs PIL"]
    rows = [
        [
            r["size"],
            r["label"],
            r["cv2_threads"],
            f"{r['images_per_s']:.1f}",
            f"{r['ms_per_image']:.2f}",
            f"{r['speedup_vs_pil']:.2f}x",
        ]
        for r in data["results"]
    ]
    m = data["machine"]
    note = (
        f"\n{data['settings']['num_images']} rows per size, background {data['settings']['background_px']} px, "
        f"best of {data['settings']['repeats']} passes; {m['cpu']}, {m['logical_cpus']} logical CPUs, "
        f"load average {m['load_average_1_5_15']}.\n"
    )
    return markdown_table(headers, rows) + note


def print_table(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Compositor: images/s (single core unless noted)")
    for header in ("image px", "implementation", "cv2 threads", "images/s", "ms/image", "vs PIL"):
        left = header == "implementation"
        table.add_column(header, justify="left" if left else "right", no_wrap=left)
    for r in data["results"]:
        table.add_row(
            str(r["size"]),
            r["label"],
            str(r["cv2_threads"]),
            f"{r['images_per_s']:.1f}",
            f"{r['ms_per_image']:.2f}",
            f"{r['speedup_vs_pil']:.2f}x",
        )
    Console(width=max(Console().width, 110)).print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compositor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="Source image sides, px")
    parser.add_argument("--num-images", type=int, default=16, help="Rows per size")
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes per implementation")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="Where the .json/.md go")
    args = parser.parse_args(argv)
    data = run(tuple(args.sizes), args.num_images, args.repeats, args.out_dir)
    print_table(data)
    print(f"results: {args.out_dir / 'compositor.json'}, {args.out_dir / 'compositor.md'}")
    return data


if __name__ == "__main__":
    main()
