"""The generation run: read -> recipe stages -> encode -> Parquet shards, then errors, run.json, gallery.

The driver imports no GPU stack: actors load their models inside Ray workers.
"""

from __future__ import annotations

import json
import os
import posixpath
import time

from engine import schema, storage
from engine.config import GenerateConfig, config_hash, save_resolved
from engine.encode import encode_rows
from engine.ledger import start_ledger
from engine.models import check_local_models
from engine.readers import read_source
from engine.recipes import build_stages, model_tags
from engine.report import RunReport, build_report, count_rows, write_errors
from engine.shards import (
    completed_ids,
    read_manifest,
    remove_temporaries,
    shard_files,
    write_manifest,
    write_shard,
)
from engine.stages import apply_stages, check_resource_budget


def init_ray(config: GenerateConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), **config.ray.env_vars}
    ray.init(
        address=config.ray.address,
        num_cpus=config.ray.local_num_cpus(),
        runtime_env={"env_vars": env_vars},
        log_to_driver=True,
    )


def run_generate(config: GenerateConfig) -> RunReport:
    import ray
    import ray.data

    start = time.perf_counter()
    out = storage.resolve(config.output.path)  # a local path or a URI (s3://, gs://, ...)
    data_dir = storage.join(out, "data")
    digest = config_hash(config)
    check_local_models(config)
    done_ids = _prepare_output(out, digest, config.output.overwrite)
    synthetic_before = sum(n for recipe, n in count_rows(data_dir)[0].items() if recipe != schema.RECIPE_REAL)
    save_resolved(config, storage.join(out, "config.yaml"))
    write_manifest(str(out), {"config_hash": digest, "complete": False})

    # 1. Ray, the ledger, the source rows.
    init_ray(config)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = config.ray.progress_bars
    context.execution_options.preserve_order = config.ray.preserve_order
    ledger = start_ledger()
    ds, class_names = read_source(config.data, ray.data, config.ray.task_num_cpus)

    # 2. The recipe's stages, checked against what the cluster can schedule, then the stage loop.
    stages = build_stages(config, class_names, digest, frozenset(done_ids))
    if config.ray.check_resources:
        check_resource_budget(stages, ray.cluster_resources(), config.ray.task_num_cpus)
    ds = apply_stages(ds, stages, ledger, config.ray.task_num_cpus)

    # 3. Encode into the output schema and write each batch as one atomic shard.
    written = write_shards(ds, config, str(data_dir)).take_all()  # one small manifest entry per shard

    # 4. Errors, run.json, manifest, gallery.
    snapshot = ray.get(ledger.snapshot.remote())
    write_errors(snapshot["errors"], storage.join(out, "errors.parquet"))
    report = build_report(
        config, snapshot, data_dir, class_names, digest, time.perf_counter() - start, synthetic_before
    )
    report.data["rows"]["written_this_run"] = sum(int(w["rows"]) for w in written)
    storage.write_text(storage.join(out, "run.json"), json.dumps(report.data, indent=2))
    write_manifest(
        str(out),
        {
            "config_hash": digest,
            "complete": True,
            "shards": [posixpath.basename(path) for path in shard_files(data_dir)],
        },
    )
    if config.output.gallery_classes:
        from engine.gallery import write_gallery

        write_gallery(data_dir, storage.join(out, "gallery"), config.output.gallery_classes)
    return report


def write_shards(ds, config: GenerateConfig, data_uri: str):
    """The last step: encode + one atomic shard per `output.rows_per_shard` rows; yields manifest rows."""
    return ds.map_batches(
        encode_and_write,
        fn_kwargs={
            "data_uri": data_uri,
            "image_format": config.output.image_format,
            "quality": config.output.quality,
            "models_json": json.dumps(model_tags(config), sort_keys=True),
        },
        batch_format="numpy",
        batch_size=config.output.rows_per_shard,
        num_cpus=config.ray.task_num_cpus,
    )


def encode_and_write(batch, data_uri: str, image_format: str, quality: int, models_json: str) -> dict:
    """Last step: encode rows into the output schema and write them as one shard (see engine.shards)."""
    table = encode_rows(batch, image_format, quality, models_json)
    if table.num_rows == 0:
        return {"shard": [], "rows": []}
    entry = write_shard(table, data_uri)
    return {"shard": [entry["shard"]], "rows": [entry["rows"]]}


def _prepare_output(out: str, digest: str, overwrite: bool) -> set[str]:
    """Returns the ids already written. Same config: resume. Other config: refuse unless overwrite."""
    data_dir = storage.join(out, "data")
    if overwrite:
        storage.delete_dir(data_dir)
    storage.make_dirs(data_dir)
    remove_temporaries(str(data_dir))
    previous = read_manifest(str(out))
    existing = shard_files(str(data_dir))
    if existing and (previous is None or previous.get("config_hash") != digest):
        raise ValueError(
            f"{data_dir} holds shards of another config (hash {previous and previous.get('config_hash')}, "
            f"this one {digest}); pass --set output.overwrite=true to replace them or choose another output.path"
        )
    return completed_ids(str(data_dir))
