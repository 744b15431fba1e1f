"""A quick proxy of the efficacy benchmark, outside the engine: which toy-data setting lets worst-group move?

    python -m benchmarks.efficacy_proxy --spurious 0.9 --k 0 5             # real-only, then real + K=5
    python -m benchmarks.efficacy_proxy --spurious 0.9 --k 5 --synthetic-only
    python -m benchmarks.efficacy_proxy --spurious 0.5 --k 0 5
    python -m benchmarks.efficacy_proxy --spurious 0.5 --k 0 2 --background toy --budget 64000

One process, no Ray: the toy dataset (engine.tiny.toy_dataset) is built under --out, and a timm classifier is
trained with the sweep's recipe (AdamW 3e-3, weight decay 0.05, batch 32, random crops of 60-100% area,
flips, one-cycle schedule, epochs = round(budget / rows per epoch)) on the real train rows plus K rows per
source that stand in for AGA's with random-weight generators: the subject (dataset mask) flipped, rotated
by a multiple of 90 degrees, rescaled 0.8-1.2x and pasted at a random place on a noise background (blocky
colour noise plus per-pixel noise). Prints test top-1, worst-group and every group's accuracy as JSON.

It takes a minute a setting on 2 cores where a sweep takes an hour, which is what it is for: choosing the
benchmark's data (configs/bench_efficacy.yaml). Its numbers are not the benchmark's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images, masks, labels and groups (groups.csv) of one split of a toy dataset."""
    groups = {}
    for line in (root / "groups.csv").read_text().splitlines()[1:]:
        source_id, group, _ = line.split(",")
        groups[source_id] = int(group)
    images, masks, labels, group_of = [], [], [], []
    for label, name in enumerate(sorted(p.name for p in (root / split).iterdir())):
        for path in sorted((root / split / name).glob("*.png")):
            images.append(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
            masks.append(cv2.imread(str(root / "masks" / split / name / path.name), cv2.IMREAD_GRAYSCALE))
            labels.append(label)
            group_of.append(groups[f"{split}/{name}/{path.name}"])
    return np.stack(images), np.stack(masks), np.array(labels), np.array(group_of)


def noise_background(rng: np.random.Generator, size: int) -> np.ndarray:
    cells = int(rng.integers(4, 12))
    blocks = cv2.resize(
        rng.random((cells, cells, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_NEAREST
    )
    return (0.6 * blocks + 0.4 * rng.random((size, size, 3))).astype(np.float32) * 255


def toy_background(rng: np.random.Generator, size: int, kinds: list[str]) -> np.ndarray:
    """A background of one of the training split's types, drawn by the toy's own drawers (the oracle)."""
    from engine.tiny.toy_dataset import BACKGROUND_DRAWERS

    canvas = BACKGROUND_DRAWERS[kinds[int(rng.integers(len(kinds)))]](rng, size) + rng.normal(
        0, 5, (size, size, 3)
    )
    return np.clip(canvas, 0, 255).astype(np.float32)


def paste_on_noise(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, kinds: list[str] | None = None
) -> np.ndarray:
    """The subject, flipped / rotated / rescaled, at a random place on a noise background (or, with `kinds`,
    on a toy background of one of those types)."""
    size = image.shape[0]
    ys, xs = np.nonzero(mask > 0)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    subject, alpha = image[box].astype(np.float32), (mask[box] > 0).astype(np.float32)
    if rng.random() < 0.5:
        subject, alpha = subject[:, ::-1], alpha[:, ::-1]
    turns = int(rng.integers(4))
    subject, alpha = np.rot90(subject, turns), np.rot90(alpha, turns)
    scale = rng.uniform(0.8, 1.2)
    height = int(np.clip(alpha.shape[0] * scale, 2, size))
    width = int(np.clip(alpha.shape[1] * scale, 2, size))
    subject = cv2.resize(np.ascontiguousarray(subject), (width, height))
    alpha = cv2.resize(np.ascontiguousarray(alpha), (width, height))[..., None]
    canvas = noise_background(rng, size) if kinds is None else toy_background(rng, size, kinds)
    y, x = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    region = canvas[y : y + height, x : x + width]
    canvas[y : y + height, x : x + width] = region * (1 - alpha) + subject * alpha
    return np.clip(canvas, 0, 255).astype(np.uint8)


def train_and_test(
    root: Path,
    k: int,
    *,
    synthetic_only: bool,
    budget: int,
    model: str,
    seed: int,
    kinds: list[str] | None = None,
) -> dict:
    import timm
    import torch

    train_images, train_masks, train_labels, _ = load_split(root, "train")
    test_images, _, test_labels, test_groups = load_split(root, "test")
    rng = np.random.default_rng(seed)
    images, labels = train_images, train_labels
    if k:
        pasted = np.stack(
            [
                paste_on_noise(rng, x, m, kinds)
                for x, m in zip(train_images, train_masks, strict=True)
                for _ in range(k)
            ]
        )
        repeated = np.repeat(train_labels, k)
        images = pasted if synthetic_only else np.concatenate([train_images, pasted])
        labels = repeated if synthetic_only else np.concatenate([train_labels, repeated])
    size = images.shape[1]

    def tensor(batch: np.ndarray, augment: bool):
        out = []
        for image in batch:
            if augment:
                side = int(size * np.sqrt(rng.uniform(0.6, 1.0)))
                y, x = rng.integers(0, size - side + 1, 2)
                image = cv2.resize(image[y : y + side, x : x + side], (size, size))
                if rng.random() < 0.5:
                    image = image[:, ::-1]
            out.append((image.astype(np.float32) / 255 - MEAN) / STD)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()

    torch.manual_seed(seed)
    net = timm.create_model(model, num_classes=int(labels.max()) + 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05)
    epochs = max(1, round(budget / len(images)))
    steps = epochs * int(np.ceil(len(images) / 32))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps, pct_start=0.01)
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = rng.permutation(len(images))
        for i in range(0, len(images), 32):
            index = order[i : i + 32]
            loss = torch.nn.functional.cross_entropy(
                net(tensor(images[index], True)), torch.from_numpy(labels[index])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [net(tensor(test_images[i : i + 128], False)).argmax(1) for i in range(0, len(test_images), 128)]
        ).numpy()
    correct = predicted == test_labels
    by_group = {int(g): float(correct[test_groups == g].mean()) for g in np.unique(test_groups)}
    return {
        "k": k,
        "synthetic_only": synthetic_only,
        "epochs": epochs,
        "test_top1": round(float(correct.mean()), 3),
        "test_worst_group": round(min(by_group.values()), 3),
        "groups": [round(by_group[g], 2) for g in sorted(by_group)],
        "train_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    from engine.tiny.toy_dataset import make_toy_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/toy-proxy"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--eval-per-group", type=int, default=40)
    parser.add_argument("--spurious", type=float, default=0.9)
    parser.add_argument(
        "--k", type=int, nargs="+", default=[0, 5], help="pasted rows per source (0: real only)"
    )
    parser.add_argument("--synthetic-only", action="store_true", help="train on the pasted rows alone")
    parser.add_argument("--budget", type=int, default=16000, help="train rows seen (the sweep's train_rows)")
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--background",
        choices=["noise", "toy"],
        default="noise",
        help="what the pasted rows' subjects sit on: noise (random-weight generators) or the training "
        "split's background types drawn by the toy (the sweep's oracle row)",
    )
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    toy = make_toy_dataset(
        args.out,
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        eval_per_group=args.eval_per_group,
        size=args.size,
        spurious=args.spurious,
        seed=args.seed,
    )
    results = []
    for k in args.k:
        result = train_and_test(
            args.out,
            k,
            synthetic_only=args.synthetic_only and k > 0,
            budget=args.budget,
            model=args.model,
            seed=args.seed,
            kinds=toy["backgrounds"][: args.num_classes] if args.background == "toy" else None,
        )
        results.append(
            {"spurious": args.spurious, "size": args.size, "model": args.model, "background": args.background,
             "budget": args.budget, **result}
        )  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
