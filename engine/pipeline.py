"""The generation run: read -> recipe stages -> encode -> Parquet shards, then errors, run.json, gallery.

The driver imports no GPU stack: actors load their models inside Ray workers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from engine import schema, storage
from engine.config import GenerateConfig, save_resolved
from engine.models.references import check_local_models
from engine.output.resume import prepare_output, resume_identity, run_manifest
from engine.output.shards import shard_files, write_manifest, write_shard
from engine.output.written_ids import WrittenIds, count_rows_in_task, written_ids
from engine.readers import (
    SourceInfo,
    defers_bytes,
    inspect_source,
    read_file_bytes,
    read_source,
)
from engine.recipes import build_stages, model_tags, pool_spec
from engine.recipes.filter import filter_stage
from engine.run.failures import ConfigError, RunFailed, describe, is_infrastructure_failure, setup_failure
from engine.run.ledger import start_ledger
from engine.run.report import RunReport, build_report, write_errors, write_filtered
from engine.stages.batch import Batch, take
from engine.stages.class_pools import ClassPool, build_class_pool
from engine.stages.encode import encode_rows
from engine.stages.loop import Stage, apply_stages, check_resource_budget

logger = logging.getLogger(__name__)


def init_ray(config: GenerateConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), **config.ray.worker_env_vars()}
    ray.init(
        address=config.ray.address,
        num_cpus=config.ray.local_num_cpus(),
        runtime_env={"env_vars": env_vars},
        log_to_driver=True,
    )


@dataclass(frozen=True)
class RunPlan:
    """What `prepare_run` found before anything ran or was written."""

    out: str  # the output root, a local path or a URI
    digest: str  # the content hash in every row id (see `resume_identity`)
    source: SourceInfo
    # The stages as built for the checks (no ids written yet): their resources and names do not depend on
    # what a resumed run skips, so the cluster check and the error mapping read them from here.
    stages: tuple[Stage, ...]

    @property
    def data_dir(self) -> str:
        return storage.join(self.out, "data")


def prepare_run(config: GenerateConfig) -> RunPlan:
    """Every check that needs neither Ray nor a write: the models exist, the data can be read, the recipe
    builds its stages, the backends are installed, the output resumes. Raises ValueError or
    FileNotFoundError naming the problem, and writes nothing."""
    out = storage.resolve(config.output.path)  # a local path or a URI (s3://, gs://, ...)
    check_local_models(config)
    source = inspect_source(config.data)
    digest = resume_identity(out, config)
    # Unknown recipe, missing sections, class prompts: everything a stage checks when it is built.
    stages = pipeline_stages(config, source.class_names, digest, frozenset(), storage.join(out, "data"))
    check_backends(config, stages)
    return RunPlan(out, digest, source, tuple(stages))


def run_generate(config: GenerateConfig, plan: RunPlan | None = None) -> RunReport:
    import ray
    import ray.data

    start, started_at = time.perf_counter(), time.time()
    plan = plan or prepare_run(config)
    out, data_dir, digest = plan.out, plan.data_dir, plan.digest

    # 1. Ray, and the check that the cluster can hold the actor pools (still nothing written).
    init_ray(config)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = config.ray.progress_bars
    context.execution_options.preserve_order = config.ray.preserve_order
    context.execution_no_progress_timeout_s = config.ray.no_progress_timeout_s
    _check_cluster(config, plan)

    # 2. The output: resume from its shards (or replace them), the resolved config, an open manifest.
    done_ids = prepare_output(out, config.output.overwrite)
    counts = count_rows_in_task(data_dir)[0]  # rows per recipe already in the shards
    rows_before = sum(counts.values())
    save_resolved(config, storage.join(out, "config.yaml"))
    write_manifest(str(out), run_manifest(config, digest, complete=False))

    # 3. The stages. Each attempt is a resume: it skips the rows already in the shards (engine.run.failures).
    attempts, generated = [], 0
    for attempt in range(1, config.ray.max_run_attempts + 1):
        synthetic_before = sum(n for recipe, n in counts.items() if recipe != schema.RECIPE_REAL)
        ledger = start_ledger()
        try:
            # The first attempt's cluster check ran before anything was written (`_check_cluster`).
            _run_attempt(config, plan, ledger, done_ids, check_cluster=attempt > 1)
            snapshot = ray.get(ledger.snapshot.remote())
            break
        except Exception as err:
            setup = setup_failure(err, _operator_stages(plan))
            if setup is not None:  # a stage that cannot start fails the same way on every attempt
                raise setup from None
            if not is_infrastructure_failure(err):
                raise
            attempts.append(describe(err))
            if attempt == config.ray.max_run_attempts:
                raise RunFailed(
                    f"{attempts[-1]} - Ray workers were lost in each of {attempt} attempts "
                    "(ray.max_run_attempts); the rows written so far are kept: rerun to resume"
                ) from err
            logger.warning(
                "attempt %d lost Ray workers (%s); resuming from the shards", attempt, attempts[-1]
            )
            generated += _generated(ledger)
            done_ids = written_ids(str(data_dir))
            counts = count_rows_in_task(data_dir)[0]
        finally:
            ray.kill(ledger)

    # 4. Errors, run.json, manifest, dataset card, gallery.
    class_names = plan.source.class_names
    write_errors(snapshot["errors"], storage.join(out, "errors.parquet"))
    # The fidelity filter's verdicts, and rows any generating stage dropped (engine.stages.output_checks).
    if config.filter is not None or snapshot["filtered"]:
        write_filtered(snapshot["filtered"], storage.join(out, "filtered.parquet"))
    report = build_report(
        config,
        snapshot,
        data_dir,
        class_names,
        digest,
        time.perf_counter() - start,
        synthetic_before,
        started_at,
    )
    rows = report.data["rows"]
    rows["synthetic_generated_this_run"] += generated
    rows["written_this_run"] = rows["real_written"] + rows["synthetic_written"] - rows_before
    report.data["failed_attempts"] = attempts
    report.data["data_notes"] = list(plan.source.notes)
    storage.write_text(storage.join(out, "run.json"), json.dumps(report.data, indent=2, allow_nan=False))
    manifest = run_manifest(config, digest, complete=True)
    manifest["num_shards"] = len(shard_files(data_dir))  # the shards are found by listing data/
    write_manifest(str(out), manifest)
    storage.write_text(storage.join(out, "README.md"), schema.dataset_card(class_names))  # load_dataset(out)
    if config.output.gallery_classes:
        from engine.run.gallery import write_gallery

        write_gallery(data_dir, storage.join(out, "gallery"), config.output.gallery_classes)
    return report


def check_backends(config: GenerateConfig, stages: list[Stage]) -> None:
    """A vLLM stage needs vLLM where the driver runs a local Ray (on a cluster, the workers' image has it)."""
    local = config.ray.address is None and not os.environ.get("RAY_ADDRESS")
    vllm_stages = [stage.name for stage in stages if stage.on_dataset]
    if local and vllm_stages and importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"stage {vllm_stages[0]!r} has backend vllm, but vLLM is not installed in this environment "
            f"({sys.executable}); run it in the vLLM environment (.venv-vllm, or the cluster image) or set "
            "the stage's backend to transformers"
        )


def _check_cluster(config: GenerateConfig, plan: RunPlan) -> None:
    import ray

    if not config.ray.check_resources:
        return
    try:
        check_resource_budget(list(plan.stages), ray.cluster_resources(), config.ray.task_num_cpus)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _operator_stages(plan: RunPlan) -> dict[str, str]:
    """Ray Data operator names of stages that are not our callable classes -> the stage: a `ray.data.llm`
    processor's engine actors are `vLLMEngineStageUDF` (one vLLM stage per run at most names it)."""
    on_dataset = [stage.name for stage in plan.stages if stage.on_dataset]
    return {"vLLMEngineStageUDF": on_dataset[0]} if len(on_dataset) == 1 else {}


def _run_attempt(
    config: GenerateConfig, plan: RunPlan, ledger, done_ids: WrittenIds, check_cluster: bool
) -> None:
    """Source rows -> the recipe's stages (checked against the cluster on a retry, which may have lost
    nodes) -> atomic shards."""
    import ray.data

    if check_cluster:
        _check_cluster(config, plan)
    # Image files are read by the recipe opening's `read_bytes` stage, after `skip_done`.
    ds, class_names = read_source(
        config.data, ray.data, config.ray.task_num_cpus, plan.source, with_bytes=False
    )
    spec = pool_spec(config)
    pool = None
    if spec:
        reader = read_file_bytes if defers_bytes(config.data) else None
        pool = build_class_pool(ds, spec, config.seed, config.ray.task_num_cpus, read_bytes=reader)
    if pool is not None:
        logger.info("class pool: %d rows of %d classes", len(pool.where), len(pool.members))
    stages = pipeline_stages(config, class_names, plan.digest, done_ids, plan.data_dir, pool)
    ds = apply_stages(ds, stages, ledger, config.ray.task_num_cpus)
    # Drained by reference: the driver never fetches the manifest rows (one per shard, unused here) nor
    # keeps them, so what it holds at the end does not grow with the number of shards (issue 18, scale).
    tasks_only = not any(stage.is_actor or stage.on_dataset for stage in stages)
    for _ in write_shards(ds, config, plan.data_dir, class_names, tasks_only).iter_internal_ref_bundles():
        pass


def _generated(ledger) -> int:
    """Synthetic rows a failed attempt started (its ledger lives on the driver's node, so it survives)."""
    import ray

    try:
        snapshot = ray.get(ledger.snapshot.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a statistic; the run goes on without it
        return 0
    return int(snapshot["stages"].get("expand", {}).get("synthetic_out", 0))


def write_shards(
    ds, config: GenerateConfig, data_uri: str, class_names: list[str] | None = None, tasks_only: bool = False
):
    """The last step: encode + one atomic shard per `output.rows_per_shard` rows; yields manifest rows.

    After an actor stage, whose outputs are blocks of its batch size, the writer gathers `rows_per_shard`
    rows per call. When every stage is a CPU task (`tasks_only`), Ray Data fuses them all, the source's
    listing included, into one operator whose tasks take as many source rows as its largest batch size:
    there the writer takes one block per call and cuts it into shards itself."""
    return ds.map_batches(
        encode_and_write,
        fn_kwargs=_shard_format(config, data_uri, class_names),
        batch_format="numpy",
        batch_size=None if tasks_only else config.output.rows_per_shard,
        num_cpus=config.ray.task_num_cpus,
    )


def encode_and_write(
    batch,
    data_uri: str,
    image_format: str,
    quality: int,
    models_json: str,
    class_names: list[str],
    rows_per_shard: int,
) -> dict:
    """Last step: encode rows into the output schema and write them as shards of at most `rows_per_shard`
    rows (see engine.output.shards)."""
    table = encode_rows(batch, image_format, quality, models_json, class_names)
    entries = [
        write_shard(table.slice(at, rows_per_shard), data_uri)
        for at in range(0, table.num_rows, rows_per_shard)
    ]
    return {"shard": [e["shard"] for e in entries], "rows": [e["rows"] for e in entries]}


def write_real_rows(batch: Batch, **shard_format) -> Batch:
    """Writes the batch's real rows as one shard and passes on the synthetic rows only."""
    real = np.asarray(batch[schema.RECIPE]) == schema.RECIPE_REAL
    if real.any():
        encode_and_write(take(batch, np.flatnonzero(real)), **shard_format)  # the last step that can fail
    return take(batch, np.flatnonzero(~real))


def pipeline_stages(
    config: GenerateConfig,
    class_names: list[str],
    digest: str,
    done_ids: Collection[str],
    data_uri: str,
    pool: ClassPool | None = None,
) -> list[Stage]:
    """The recipe's stages as the pipeline runs them (the benchmarks run the same list), with the stages any
    recipe gets from config: the real rows' early writer and the label-fidelity filter. `pool`: the class
    pool the recipe declared (None for the checks before a run: they build no actor)."""
    stages = build_stages(config, class_names, digest, done_ids, pool)
    if config.filter is not None:
        stages.append(filter_stage(config.filter, class_names))
    return _write_real_rows_early(stages, config, data_uri, class_names)


def _write_real_rows_early(
    stages: list[Stage], config: GenerateConfig, data_uri: str, class_names: list[str]
) -> list[Stage]:
    """Real rows need no model: written right after `expand`, they stop riding through the actor pools, which
    then get batches of synthetic rows only (a GPU stage of batch size 8 would otherwise see about 5 of
    them per call at K=2, fewer with val/test rows in the stream)."""
    names = [stage.name for stage in stages]
    if "expand" not in names:
        return stages
    at = names.index("expand") + 1
    # One call per block: a block's real rows (`data.rows_per_block` sources) become one shard. A larger
    # batch would make every fused read..write_real task take that many sources (see engine.stages.loop).
    writer = Stage(
        "write_real",
        write_real_rows,
        kwargs=_shard_format(config, data_uri, class_names),
        reads=(schema.RECIPE,),
    )
    return [*stages[:at], writer, *stages[at:]]


def _shard_format(config: GenerateConfig, data_uri: str, class_names: list[str] | None) -> dict:
    return {
        "class_names": list(class_names or []),  # the shards' ClassLabel metadata
        "data_uri": data_uri,
        "image_format": config.output.image_format,
        "quality": config.output.quality,
        "models_json": json.dumps(model_tags(config), sort_keys=True),
        "rows_per_shard": config.output.rows_per_shard,
    }
