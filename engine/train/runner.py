"""The driver's side of a Ray Train run, shared by the training and fine-tuning jobs: start or attach to Ray,
check that the workers can be scheduled, prepare (or resume) the run folder, build the `TorchTrainer` and
fit, and read back the summary the last checkpoint carries.

A job composes these in its own `main()`; the per-worker function and its datasets are the job's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from engine.config import RayConfig, save_resolved, with_defaults
from engine.train.loop import SUMMARY_FILE

# Changing these between a run and its resumption keeps the run meaningful; anything else is another run.
RESUMABLE_KEYS = ("epochs", "output", "ray", "scaling", "checkpoint")


def prepare_run_dir(
    config,
    resumable_keys: tuple[str, ...] = RESUMABLE_KEYS,
    *,
    plan: tuple[str, Callable[[dict], int]] | None = None,
) -> Path:
    """Create the run folder, or check that the checkpoints in it are this config's run (same config but for
    `resumable_keys`), since Ray Train resumes from whatever checkpoint the folder holds.

    `config` is a pydantic config with `run_dir()` and `output.overwrite` (TrainConfig, or a fine-tuning
    job's); it is saved as train_config.yaml in the folder. `plan`: (the config key that says how long the run
    is, a function from the latest checkpoint's reported metrics to how much of that the run has done). A
    resumable length lowered below what the folder already trained is refused: resuming would train past the
    new end and report a history longer than the config says.
    """
    run_dir = config.run_dir()
    saved = run_dir / "train_config.yaml"
    if config.output.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif saved.exists() and any(run_dir.glob("checkpoint_*")):
        previous = with_defaults(type(config), yaml.safe_load(saved.read_text())) or {}
        current = config.model_dump(mode="json")
        differs = sorted(k for k in current if k not in resumable_keys and previous.get(k) != current[k])
        if differs:
            raise ValueError(
                f"{run_dir} holds a run with different {differs}; pick another output.name or set "
                "output.overwrite=true"
            )
        if plan is not None:
            key, done = plan
            reported = latest_checkpoint_metrics(run_dir)
            if reported is not None and done(reported) > getattr(config, key):
                raise ValueError(
                    f"{run_dir} has already trained {done(reported)} of {key}, more than {key}="
                    f"{getattr(config, key)}; raise {key}, pick another output.name or set output.overwrite=true"
                )
    save_resolved(config, saved)
    return run_dir


def latest_checkpoint_metrics(run_dir: Path) -> dict | None:
    """The metrics reported with the checkpoint Ray Train would resume `run_dir` from; None when Ray Train
    recorded none (a run killed before its first checkpoint was registered)."""
    from ray.train import Result

    if not (run_dir / "checkpoint_manager_snapshot.json").exists():  # Ray Train's record of the checkpoints
        return None
    result = Result.from_path(str(run_dir.resolve()))
    return result.metrics if result.checkpoint is not None else None


def init_ray(config: RayConfig) -> dict[str, float]:
    """Attach to `config.address` or start a local Ray (logical CPUs from config); return its resources."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(
            address=config.address,
            num_cpus=config.local_num_cpus(),
            runtime_env={"env_vars": config.worker_env_vars()},
        )
    # Datasets copy the driver's context: this reaches the executors inside the workers too.
    context = DataContext.get_current()
    context.enable_progress_bars = config.progress_bars
    context.print_on_execution_start = config.progress_bars
    return ray.cluster_resources()


def check_budget(config, cluster: dict[str, float]) -> None:
    """Fail now if the workers plus one Ray Data task cannot be scheduled together (Ray would wait forever);
    skipped with ray.check_resources: false (autoscaling clusters add nodes on demand).

    `config` has `scaling` (engine.train.config.ScalingSpec) and `ray` (engine.config.RayConfig) sections.
    """
    if not config.ray.check_resources:
        return
    per_worker = dict(config.scaling.resources_per_worker)
    if config.scaling.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    needed = {name: amount * config.scaling.num_workers for name, amount in per_worker.items()}
    needed["CPU"] = needed.get("CPU", 0.0) + config.ray.task_num_cpus
    short = {name: amount for name, amount in needed.items() if amount > cluster.get(name, 0.0) + 1e-9}
    if short:
        have = {name: cluster.get(name, 0.0) for name in short}
        raise ValueError(
            f"{config.scaling.num_workers} workers x {per_worker} plus {config.ray.task_num_cpus} CPU for Ray Data "
            f"tasks need {short}, the cluster has {have}: lower scaling.resources_per_worker / num_workers / "
            "ray.task_num_cpus, or start Ray with more logical CPUs (ray.num_cpus)"
        )


def fit(
    train_loop: Callable[[dict], None],
    loop_config: dict,
    datasets: dict,
    *,
    run_dir: Path,
    config,
    preserve_order: bool = True,
):
    """Run `train_loop(loop_config)` on `config.scaling` workers with `datasets` (none split by Ray Train:
    each worker asks for its own by name), checkpointing into `run_dir`; returns Ray Train's Result.
    Workers get each dataset's blocks in order (`preserve_order`) unless told otherwise.

    `config` has `scaling` (ScalingSpec) and `checkpoint` (CheckpointSpec) sections.
    """
    from ray.train import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train gives each dataset the driver's global execution options; the datasets' own preserve_order
    # (engine.train.data) would be lost, and blocks would reach the workers in task completion order.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = preserve_order

    # Ray Train hands the poll interval from the driver's environment to its controller.
    if config.scaling.controller_poll_s is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(config.scaling.controller_poll_s)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.scaling.num_workers,
            use_gpu=config.scaling.use_gpu,
            resources_per_worker=dict(config.scaling.resources_per_worker),
        ),
        run_config=RunConfig(
            storage_path=str(run_dir.parent),
            name=run_dir.name,
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
            # Ray Train logs each report and checkpoint of each rank at INFO (several lines an epoch per
            # rank); rank 0 logs one line per epoch instead (engine.train.loop).
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    return trainer.fit()


def read_summary(result) -> dict:
    """The run's summary (history, val and test metrics) from the final checkpoint of `result`."""
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / SUMMARY_FILE).read_text())
