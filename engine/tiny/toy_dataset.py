"""The toy dataset: procedural shapes on procedural backgrounds, with a Waterbirds-style spurious correlation.

In the train split class `c` sits on its "own" background type `c` for a `spurious` fraction of its images
and on the other types otherwise; in val and test the background is independent of the class. A classifier
that learns the background instead of the shape therefore scores well on train and badly on the test
groups where class and background disagree, which is what generative background augmentation should fix.

Layout under `out` (torchvision ImageFolder per split):

    <split>/<class>/<class>_<nnnn>.png          RGB image, split in train/val/test (and test_ood)
    masks/<split>/<class>/<class>_<nnnn>.png    L-mode 0/255 mask of the object's pixels
    groups.csv                                  source_id,group,background  (group = class * B + background)
    captions.csv                                source_id,caption  ("a circle on sand": what a captioner
                                                would say, from the labels; fine-tuning's full.captions_file)
    dataset.json                                classes, backgrounds, knobs, counts, description

With `ood_per_group`, a fourth split `test_ood` holds the same shapes on backgrounds no other split uses
(types num_classes.., e.g. snow, sky, night and lava for 4 classes): an out-of-distribution test set, the
toy's ImageNet-Sketch. Its groups number on from the in-distribution ones.

Same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
OOD_SPLIT = "test_ood"

# Alphabetical, so that any prefix is alphabetical too: ImageFolder labels classes by sorted folder name,
# and this keeps that label equal to the class index used in `group`.
CLASSES = ("circle", "cross", "diamond", "hexagon", "ring", "square", "star", "triangle")

# Background `c` is class `c`'s own background. The first four differ in colour as well as texture, so that
# the default dataset's shortcut is easy to learn.
BACKGROUNDS = ("grass", "water", "sand", "brick", "snow", "sky", "night", "lava")

MAX_CLASSES = len(CLASSES)
PNG_COMPRESS_LEVEL = 6
SUPERSAMPLE = 4  # the object is drawn at 4x and area-downsampled: soft edges, masks at 50% coverage


# ---------------------------------------------------------------- shapes (unit coordinates, radius ~1)


def _regular_polygon(num_vertices: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(num_vertices) / num_vertices
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer = _regular_polygon(5, 1.15, -np.pi / 2)
    inner = _regular_polygon(5, 0.47, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross() -> np.ndarray:
    a, b = 0.3, 1.0
    return np.array(
        [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    )


# Each shape is a list of (polygon, fill) layers painted in order; the ring's hole is a second layer of 0.
SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular_polygon(48), 1)],
    "cross": [(_cross(), 1)],
    # Elongated, so that it is not a rotated square.
    "diamond": [(np.array([(0.0, -1.25), (0.75, 0.0), (0.0, 1.25), (-0.75, 0.0)]), 1)],
    "hexagon": [(_regular_polygon(6), 1)],
    "ring": [(_regular_polygon(48), 1), (_regular_polygon(48, 0.55), 0)],
    "square": [(np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), 1)],
    "star": [(_star(), 1)],
    "triangle": [(_regular_polygon(3, 1.15, -np.pi / 2), 1)],
}


def _object_coverage(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the object (HxW float32 in [0, 1]), at a random pose."""
    radius = rng.uniform(0.17, 0.3) * size
    # Keep the whole object inside the frame (the star's tips reach 1.15 radii).
    margin = 1.2 * radius + 1
    center = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    big = size * SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    for polygon, fill in SHAPES[shape]:
        points = (polygon @ rotation.T * radius + center) * SUPERSAMPLE
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 255 * fill)
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


# ---------------------------------------------------------------- backgrounds (HxWx3 float32 RGB, 0..255)


def _smooth_noise(
    rng: np.random.Generator, size: int, cells_y: int, cells_x: int | None = None
) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled smoothly."""
    coarse = rng.random((cells_y, cells_x or cells_y)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _grass(rng: np.random.Generator, size: int) -> np.ndarray:
    # Coarse in y, fine in x: vertical blades.
    blades = _smooth_noise(rng, size, 3, max(4, size // 2))
    patches = _smooth_noise(rng, size, 4)
    shade = 0.6 + 0.5 * blades + 0.2 * patches
    return _jitter(rng, (70, 140, 50), 15) * shade[..., None]


def _water(rng: np.random.Generator, size: int) -> np.ndarray:
    y, _ = _grid(size)
    waves = np.sin(
        2 * np.pi * rng.uniform(3, 7) * y / size + rng.uniform(0, 2 * np.pi) + 4 * _smooth_noise(rng, size, 4)
    )
    image = _jitter(rng, (35, 95, 175), 15) + 28 * waves[..., None]
    crests = np.clip((waves - 0.85) * 6, 0, 1)[..., None]
    return image * (1 - crests) + np.float32(220) * crests


def _sand(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    direction = rng.uniform(0, np.pi)
    along = x * np.cos(direction) + y * np.sin(direction)
    dunes = np.sin(2 * np.pi * rng.uniform(2, 5) * along / size + 3 * _smooth_noise(rng, size, 3))
    image = _jitter(rng, (215, 185, 130), 15) + 18 * dunes[..., None]
    dots = (rng.random((size, size)) < 0.05)[..., None]
    return image - 45 * dots


def _brick(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    height = size / rng.uniform(5, 8)
    width = 2 * height
    row = np.floor(y / height)
    shifted = x + (row % 2) * width / 2 + rng.uniform(0, width)
    col = np.floor(shifted / width)
    # One colour per brick: index a small random table by (row, column).
    table = _jitter(rng, (150, 60, 45), 20) + rng.uniform(-20, 20, (64, 1)).astype(np.float32)
    image = table[((row * 7 + col) % 64).astype(np.int64)]
    mortar_width = max(1.0, size / 64)
    mortar = ((y % height) < mortar_width) | ((shifted % width) < mortar_width)
    image[mortar] = _jitter(rng, (185, 180, 170), 10)
    return image


def _snow(rng: np.random.Generator, size: int) -> np.ndarray:
    drifts = _smooth_noise(rng, size, 4)
    image = _jitter(rng, (232, 238, 248), 8) - np.array([25, 18, 8], np.float32) * drifts[..., None]
    sparkles = (rng.random((size, size)) < 0.03)[..., None]
    return np.where(sparkles, np.float32(255), image)


def _sky(rng: np.random.Generator, size: int) -> np.ndarray:
    y, _ = _grid(size)
    t = (y / (size - 1))[..., None]
    image = _jitter(rng, (60, 120, 215), 15) * (1 - t) + _jitter(rng, (165, 205, 245), 10) * t
    clouds = np.clip((_smooth_noise(rng, size, int(rng.integers(3, 6))) - 0.55) * 4, 0, 1)[..., None]
    return image * (1 - clouds) + np.float32(245) * clouds


def _night(rng: np.random.Generator, size: int) -> np.ndarray:
    haze = _smooth_noise(rng, size, 3)
    image = _jitter(rng, (15, 20, 50), 8) + np.array([20, 15, 35], np.float32) * haze[..., None]
    stars = (rng.random((size, size)) < 0.02)[..., None]
    return np.where(stars, np.float32(235), image)


def _lava(rng: np.random.Generator, size: int) -> np.ndarray:
    # Bright veins where the noise crosses its midline.
    veins = np.clip(1 - np.abs(_smooth_noise(rng, size, int(rng.integers(4, 7))) - 0.5) * 12, 0, 1)[..., None]
    crust = _jitter(rng, (45, 25, 20), 10)
    return crust * (1 - veins) + _jitter(rng, (250, 120, 30), 10) * veins


BACKGROUND_DRAWERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "grass": _grass,
    "water": _water,
    "sand": _sand,
    "brick": _brick,
    "snow": _snow,
    "sky": _sky,
    "night": _night,
    "lava": _lava,
}
assert tuple(BACKGROUND_DRAWERS) == BACKGROUNDS


# ---------------------------------------------------------------- one image


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A random colour (any hue, so the class is the shape) that stands out from the background."""
    for _ in range(50):
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(120, 255), rng.uniform(110, 255)]]], np.float32)
        rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
        if np.linalg.norm(rgb - background_mean) > 90:
            return rgb
    return 255 - background_mean  # unreachable in practice; still a contrasting colour


def render_example(
    rng: np.random.Generator, shape: str, background: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8 RGB) and its object mask (HxW uint8, 0/255)."""
    canvas = BACKGROUND_DRAWERS[background](rng, size)
    coverage = _object_coverage(rng, shape, size)
    # A linear shading across the object, so that it is not one flat colour.
    y, x = _grid(size)
    direction = rng.uniform(0, 2 * np.pi)
    shading = 1 + 0.2 * ((x * np.cos(direction) + y * np.sin(direction)) / size - 0.5)
    colour = _object_colour(rng, canvas.reshape(-1, 3).mean(axis=0))
    obj = colour * shading[..., None]
    image = canvas * (1 - coverage[..., None]) + obj * coverage[..., None]
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    mask = np.where(coverage >= 0.5, 255, 0).astype(np.uint8)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def render_background(rng: np.random.Generator, background: str, size: int) -> np.ndarray:
    """A background alone (HxWx3 uint8 RGB), drawn and noised as `render_example` draws an image's: what the
    benchmarks' oracle and judges use where a toy background is wanted without a subject."""
    canvas = BACKGROUND_DRAWERS[background](rng, size) + rng.normal(0, 5, (size, size, 3))
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the dataset


def _assign_backgrounds(
    rng: np.random.Generator, split: str, class_index: int, count: int, num_backgrounds: int, spurious: float
) -> np.ndarray:
    """Background index per image of one class in one split.

    Stratified rather than i.i.d., so that group counts follow the knob exactly instead of in expectation:
    train gets round(spurious * count) images on the own background and spreads the rest evenly over the
    other types; val/test spread all images evenly over all types (background independent of class).
    """
    if split == "train":
        num_own = round(spurious * count)
        others = [b for b in range(num_backgrounds) if b != class_index]
        offset = int(rng.integers(len(others)))
        rest = [others[(offset + i) % len(others)] for i in range(count - num_own)]
        backgrounds = np.array([class_index] * num_own + rest, np.int64)
    else:
        offset = int(rng.integers(num_backgrounds))
        backgrounds = (offset + np.arange(count)) % num_backgrounds
    return rng.permutation(backgrounds)


def caption(class_name: str, background: str) -> str:
    """A toy image's caption: the words a captioner would use, here from its labels (the toy has no
    captioner that knows its shapes)."""
    return f"a {class_name} on {background}"


def _save_png(array: np.ndarray, path: Path) -> None:
    # Fixed compression and no metadata chunks: byte-identical across builds.
    Image.fromarray(array).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)


def _prepare_out(out: Path) -> None:
    """Rebuild a previous toy dataset in place; refuse to write into any other non-empty folder."""
    if out.exists() and any(out.iterdir()):
        if not (out / "dataset.json").is_file():
            raise ValueError(
                f"{out} is not empty and holds no toy dataset (no dataset.json); pick another --out"
            )
        # Only what this module writes, so that stale files from larger counts cannot linger.
        for name in (*SPLITS, OOD_SPLIT, "masks"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def make_toy_dataset(
    out: Path,
    *,
    num_classes: int = 4,
    train_per_class: int = 24,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    eval_per_group: int | None = None,
    size: int = 64,
    spurious: float = 0.9,
    seed: int = 0,
    ood_per_group: int | None = None,
) -> dict:
    """Render the toy dataset into `out` (layout in the module docstring) and return its summary.

    val/test have `val_per_class` / `test_per_class` images per class (default 12), or, with
    `eval_per_group`, that many per class x background group in both (`eval_per_group * num_classes` per
    class): worst-group accuracy needs enough images in each group to move in steps smaller than ~2.5%.

    The summary (also written, minus `out` and `paths`, to dataset.json) has `classes`, `backgrounds`,
    `counts[split][class]`, `groups[split][group_id]`, `own_background_fraction[split]`, `arguments` (this
    call's, so that a caller can tell whether a folder holds the dataset it wants) and `paths`.

    `ood_per_group` images per class x unseen background make the `test_ood` split (module docstring).
    """
    arguments = {
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "eval_per_group": eval_per_group,
        "size": size,
        "spurious": spurious,
        "seed": seed,
    }
    if ood_per_group is not None:
        # Only when asked: the arguments of a dataset without the split stay what they were.
        arguments["ood_per_group"] = ood_per_group
    if eval_per_group is not None:
        if val_per_class is not None or test_per_class is not None:
            raise ValueError("give either eval_per_group or val_per_class/test_per_class, not both")
        if eval_per_group < 1:
            raise ValueError(f"eval_per_group must be at least 1, got {eval_per_group}")
        # One background type per class: each class spreads its images evenly over num_classes groups.
        val_per_class = test_per_class = eval_per_group * num_classes
    val_per_class = 12 if val_per_class is None else val_per_class
    test_per_class = 12 if test_per_class is None else test_per_class
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASSES} (available classes: {', '.join(CLASSES)})")
    if not 0.0 <= spurious <= 1.0:
        raise ValueError(f"spurious must be in [0, 1], got {spurious}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for split, count in per_class.items():
        if count < 0:
            raise ValueError(f"{split}_per_class must be non-negative, got {count}")

    classes = list(CLASSES[:num_classes])
    backgrounds = list(BACKGROUNDS[:num_classes])
    num_backgrounds = len(backgrounds)
    ood_backgrounds = list(BACKGROUNDS[num_classes:]) if ood_per_group is not None else []
    # (split, its backgrounds, the id of its first group): test_ood's groups follow the others'.
    layout = [(split, backgrounds, 0) for split in SPLITS]
    if ood_per_group is not None:
        if ood_per_group < 1:
            raise ValueError(f"ood_per_group must be at least 1, got {ood_per_group}")
        if not ood_backgrounds:
            raise ValueError(
                f"no background type is left for {OOD_SPLIT}: {num_classes} classes use all {MAX_CLASSES}"
            )
        per_class[OOD_SPLIT] = ood_per_group * len(ood_backgrounds)
        layout.append((OOD_SPLIT, ood_backgrounds, num_classes * num_backgrounds))

    out = Path(out)
    _prepare_out(out)
    counts: dict[str, dict[str, int]] = {}
    groups: dict[str, dict[str, int]] = {}
    own_fraction: dict[str, float] = {}
    rows: list[tuple[str, int, str]] = []
    for split_index, (split, split_backgrounds, first_group) in enumerate(layout):
        counts[split] = {}
        group_counts = np.zeros(num_classes * len(split_backgrounds), np.int64)
        num_own = 0
        for class_index, name in enumerate(classes):
            image_dir = out / split / name
            mask_dir = out / "masks" / split / name
            image_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            # Seeds keyed by (seed, purpose, split, class, index): a change to one split's count leaves the
            # other splits' images unchanged.
            assign_rng = np.random.default_rng([seed, 0, split_index, class_index, 0])
            assigned = _assign_backgrounds(
                assign_rng, split, class_index, per_class[split], len(split_backgrounds), spurious
            )
            for i, background_index in enumerate(assigned.tolist()):
                rng = np.random.default_rng([seed, 1, split_index, class_index, i])
                image, mask = render_example(rng, name, split_backgrounds[background_index], size)
                file_name = f"{name}_{i:04d}.png"
                _save_png(image, image_dir / file_name)
                _save_png(mask, mask_dir / file_name)
                group = class_index * len(split_backgrounds) + background_index
                rows.append(
                    (f"{split}/{name}/{file_name}", first_group + group, split_backgrounds[background_index])
                )
                group_counts[group] += 1
                num_own += split_backgrounds is backgrounds and background_index == class_index
            counts[split][name] = per_class[split]
        groups[split] = {str(first_group + g): int(n) for g, n in enumerate(group_counts)}
        total = sum(counts[split].values())
        own_fraction[split] = round(num_own / total, 4) if total else 0.0

    with open(out / "groups.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["source_id", "group", "background"])
        writer.writerows(rows)
    with open(out / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["source_id", "caption"])
        writer.writerows((source_id, caption(source_id.split("/")[1], bg)) for source_id, _, bg in rows)

    summary = {
        "description": (
            "Procedural shapes (the class) on procedural backgrounds. In train, class c is on background c "
            f"for a {spurious:g} fraction of its images; in val/test the background is independent of the "
            "class. group = class_index * num_backgrounds + background_index."
        ),
        "classes": classes,
        "backgrounds": backgrounds,
        "group_names": [f"{c} on {b}" for bs in (backgrounds, ood_backgrounds) for c in classes for b in bs],
        **({"ood_backgrounds": ood_backgrounds} if ood_backgrounds else {}),
        "spurious": spurious,
        "seed": seed,
        "size": size,
        "counts": counts,
        "groups": groups,
        "own_background_fraction": own_fraction,
        "arguments": arguments,
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    summary["paths"] = {
        "images": {split: str(out / split) for split, _, _ in layout},
        "masks": str(out / "masks"),
        "groups_csv": str(out / "groups.csv"),
        "captions_csv": str(out / "captions.csv"),
        "dataset_json": str(out / "dataset.json"),
    }
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="synthray toy-dataset", description="Render the toy spurious-background dataset."
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="Output folder (empty, or a previous toy dataset)"
    )
    parser.add_argument(
        "--num-classes", type=int, default=4, help=f"Classes (and background types), 2..{MAX_CLASSES}"
    )
    parser.add_argument("--train-per-class", type=int, default=24)
    parser.add_argument("--val-per-class", type=int, default=None, help="default 12")
    parser.add_argument("--test-per-class", type=int, default=None, help="default 12")
    parser.add_argument(
        "--eval-per-group",
        type=int,
        default=None,
        help="val and test images per class x background group (instead of --val/--test-per-class)",
    )
    parser.add_argument("--size", type=int, default=64, help="Image side in pixels")
    parser.add_argument(
        "--spurious", type=float, default=0.9, help="Train fraction on the class's own background"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ood-per-group",
        type=int,
        default=None,
        help=f"Also a {OOD_SPLIT} split: this many images per class x background unseen in the other splits",
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        summary = make_toy_dataset(
            args.out,
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            test_per_class=args.test_per_class,
            eval_per_group=args.eval_per_group,
            size=args.size,
            spurious=args.spurious,
            seed=args.seed,
            ood_per_group=args.ood_per_group,
        )
    except ValueError as error:
        parser.error(str(error))
    totals = " / ".join(f"{split} {sum(n.values())}" for split, n in summary["counts"].items())
    print(
        f"toy dataset: {len(summary['classes'])} classes ({', '.join(summary['classes'])}), {totals} images, "
        f"train own-background {summary['own_background_fraction']['train']:.2f} -> {args.out} "
        f"in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
