"""Synthetic shards stream out while the run goes, at the default block and shard sizes.

Ray Data fuses consecutive task stages into one operator whose tasks take the largest batch size among
them, and a task's outputs coalesce into blocks of up to 128 MiB: once, every synthetic row of a run sat in
the object store and all synthetic shards landed in the last second. The shards' modification times (each
is renamed into place when complete) against the ledger's time of the last stage's last batch show it.
"""

import json
import statistics
import time

import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.tiny.toy_dataset import make_toy_dataset
from tests.conftest import ROOT, demo_overrides

pytestmark = pytest.mark.slow


def test_synthetic_shards_land_while_the_last_stage_still_runs(ray_local, tiny_models_dir, tmp_path):
    from engine.config import GenerateConfig, load_config
    from engine.pipeline import run_generate

    toy = tmp_path / "toy"
    make_toy_dataset(toy, num_classes=4, train_per_class=40, val_per_class=1, test_per_class=1, size=48)
    out = tmp_path / "out"
    overrides = demo_overrides(toy, tiny_models_dir, out) + ["data.splits=[train]", "ray.num_cpus=2"]
    config = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", overrides)
    assert config.data.rows_per_block == 16 and config.output.rows_per_shard == 64  # the defaults
    started = time.time()
    run = run_generate(config).data

    landed = []
    for path in (out / "data").glob("part-*.parquet"):
        recipes = pq.read_table(path, columns=[schema.RECIPE])[schema.RECIPE].to_pylist()
        if recipes[0] != schema.RECIPE_REAL:
            landed.append(path.stat().st_mtime - started)
    composite_done = run["stages"]["composite"]["last_batch_s"]
    print(
        json.dumps(
            {"synthetic_shards_s": sorted(round(t, 2) for t in landed), "composite_done_s": composite_done}
        )
    )
    assert run["rows"]["synthetic_written"] == 160 * 2 and len(landed) == 5
    # Most synthetic shards are complete before the composite stage has finished its last batch.
    assert statistics.median(landed) < composite_done
    assert sum(t < composite_done for t in landed) >= 3
