"""When do shards land? The demo config on a larger toy set, each shard's arrival time and the store peak.

    python -m benchmarks.shard_timeline [--train-per-class 40] [--num-variants 3] [--out-dir DIR]

A streaming pipeline writes synthetic shards all through the run: a kill at any moment keeps the share of
the work done so far, and the object store holds only rows in flight. This runs `run_generate` on the toy
dataset (4 classes; 40 train + 15 val + 15 test images per class: 280 sources by default, the train split
expanded K=3 times) with configs/aga_tiny_cpu.yaml and the offline tiny models, times each shard by its
modification time (shards are renamed into place when complete), and samples the object store's used bytes.
Prints the first / median / last synthetic shard in seconds from the start, and the store peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.engine_overhead import MemorySampler

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "aga_tiny_cpu.yaml"


def measure(train_per_class: int, num_variants: int, work: Path, extra: list[str] | None = None) -> dict:
    import ray

    from engine import schema
    from engine.config import GenerateConfig, load_config
    from engine.pipeline import run_generate
    from engine.tiny.registry import build_tiny_models
    from engine.tiny.toy_dataset import make_toy_dataset

    models = ROOT / ".cache" / "tiny-models"
    build_tiny_models(models)
    toy = work / "toy"
    make_toy_dataset(toy, train_per_class=train_per_class, val_per_class=15, test_per_class=15)
    out = work / "out"
    config = load_config(
        GenerateConfig,
        CONFIG,
        [
            f"data.path={toy}",
            f"data.masks_path={toy / 'masks'}",
            f"output.path={out}",
            f"num_variants={num_variants}",
            "output.gallery_classes=0",
            "ray.progress_bars=false",
            f"segment.detector.id={models / 'grounding-dino'}",
            f"segment.sam.id={models / 'sam'}",
            f"prompt.model.id={models / 'llm'}",
            f"background.model.id={models / 'sdxl'}",
            *(extra or []),
        ],
    )
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        start = time.time()
        with MemorySampler(0.1) as memory:
            report = run_generate(config)
    finally:
        ray.shutdown()
    real, synthetic = [], []
    for path in (out / "data").glob("*.parquet"):
        recipes = pq.read_table(path, columns=[schema.RECIPE])[schema.RECIPE].to_pylist()
        landed = round(path.stat().st_mtime - start, 2)
        (real if recipes[0] == schema.RECIPE_REAL else synthetic).append(landed)
    synthetic.sort()
    wall = report.data["wall_s"]
    return {
        "sources": report.data["rows"]["sources_in"],
        "synthetic_rows": report.data["rows"]["synthetic_written"],
        "wall_s": wall,
        "real_shards_s": [min(real), max(real)] if real else None,
        "synthetic_shards": len(synthetic),
        "first_synthetic_s": synthetic[0] if synthetic else None,
        "median_synthetic_s": statistics.median(synthetic) if synthetic else None,
        "last_synthetic_s": synthetic[-1] if synthetic else None,
        "first_synthetic_fraction_of_wall": round(synthetic[0] / wall, 3) if synthetic else None,
        "peak_object_store_mib": memory.summary()["peak_object_store_mib"],
        # Seconds from the start to the end of each stage's first and last batch.
        "stages": {
            name: [s["first_batch_s"], s["last_batch_s"]] for name, s in report.data["stages"].items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--num-variants", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="synthray-timeline-") as work:
        result = measure(args.train_per_class, args.num_variants, Path(work), args.overrides)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
