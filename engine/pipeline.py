"""The generation run: read -> recipe stages -> encode -> Parquet shards, then errors, run.json, gallery.

The driver imports no GPU stack: actors load their models inside Ray workers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from engine.config import GenerateConfig, config_hash, save_resolved
from engine.encode import encode_rows
from engine.ledger import start_ledger
from engine.models import check_local_models
from engine.readers import read_source
from engine.recipes import build_stages, model_tags
from engine.report import RunReport, build_report, write_errors
from engine.stages import apply_stages, check_resource_budget


def init_ray(config: GenerateConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), **config.ray.env_vars}
    ray.init(
        address=config.ray.address,
        num_cpus=config.ray.num_cpus if config.ray.address is None else None,
        runtime_env={"env_vars": env_vars},
        log_to_driver=True,
    )


def run_generate(config: GenerateConfig) -> RunReport:
    import ray
    import ray.data

    start = time.perf_counter()
    out = Path(config.output.path).expanduser().resolve()
    data_dir = out / "data"
    check_local_models(config)
    _prepare_output(data_dir, config.output.overwrite)
    save_resolved(config, out / "config.yaml")
    digest = config_hash(config)

    # 1. Ray, the ledger, the source rows.
    init_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = config.ray.progress_bars
    ledger = start_ledger()
    ds, class_names = read_source(config.data, ray.data)

    # 2. The recipe's stages, checked against what the cluster can schedule, then the stage loop.
    stages = build_stages(config, class_names, digest)
    check_resource_budget(stages, ray.cluster_resources(), config.ray.task_num_cpus)
    ds = apply_stages(ds, stages, ledger, config.ray.task_num_cpus)

    # 3. Encode into the output schema and write the shards.
    models_json = json.dumps(model_tags(config), sort_keys=True)
    ds = ds.map_batches(
        encode_rows,
        fn_kwargs={
            "image_format": config.output.image_format,
            "quality": config.output.quality,
            "models_json": models_json,
        },
        batch_format="numpy",
        batch_size=32,
        num_cpus=config.ray.task_num_cpus,
    )
    ds.write_parquet(str(data_dir))

    # 4. Errors, run.json, gallery.
    snapshot = ray.get(ledger.snapshot.remote())
    write_errors(snapshot["errors"], out / "errors.parquet")
    report = build_report(config, snapshot, data_dir, class_names, digest, time.perf_counter() - start)
    (out / "run.json").write_text(json.dumps(report.data, indent=2))
    if config.output.gallery_classes:
        from engine.gallery import write_gallery

        write_gallery(data_dir, out / "gallery", config.output.gallery_classes)
    return report


def _prepare_output(data_dir: Path, overwrite: bool) -> None:
    if data_dir.exists() and any(data_dir.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{data_dir} already holds shards; pass --set output.overwrite=true to replace them "
                "or choose another output.path"
            )
        shutil.rmtree(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
