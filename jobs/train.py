"""Training job: `python -m jobs.train --config configs/train_toy_cpu.yaml [--set key=value ...]`.

Fits a timm classifier with Ray Train (`TorchTrainer`, DDP over `scaling.num_workers` workers) on the
shards of a generation run, using the train split's real and synthetic rows as `mix.strategy` says and the
real rows of val/test for evaluation. Writes into <output.path>/<run name>/: the Ray Train checkpoints,
train_config.yaml, metrics.json and curves.png. Running again with the same run name resumes from the
latest checkpoint. Also the entry for `ray job submit --working-dir . -- python -m jobs.train --config ...`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from engine.config import RayConfig, load_config, parse_job_args, save_resolved
from engine.train_config import ModelConfig, OptimConfig, TrainConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train_toy_cpu.yaml"
CHECKPOINT_FILE = "state.pt"
SUMMARY_FILE = "summary.json"
# Changing these between a run and its resumption keeps the run meaningful; anything else is another run.
RESUMABLE_KEYS = ("epochs", "output", "ray", "scaling", "checkpoint")


def main(argv: list[str] | None = None) -> int:
    # 1. Config.
    args = parse_job_args(
        argv, "synthray train", __doc__.splitlines()[0], str(DEFAULT_CONFIG), "mix.strategy=concat"
    )
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # 2. Train and evaluate, 3. report.
    try:
        metrics = run_training(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(metrics)
    return 0


# ---------------------------------------------------------------- driver


def run_training(config: TrainConfig) -> dict:
    """One run: sampling plan -> Ray Datasets -> TorchTrainer.fit -> metrics.json + curves.png; returns metrics."""
    from ray.train import CheckpointConfig, DataConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from engine.evaluation import plot_curves
    from engine.train_data import build_datasets, load_training_data, plan_epochs, summarize_plan

    start = time.perf_counter()
    # 1. Rows and the sampling plan: driver side, no images, no Ray.
    data = load_training_data(config.data)
    plan = plan_epochs(data, config)
    plan_summary = summarize_plan(data, plan, config)
    # 2. Run folder: resume or start over, never mix two configs in one folder.
    run_dir = prepare_run_dir(config)
    # 3. Ray, with the reservation checked before anything waits on it; the lazy per-(epoch, rank) datasets.
    check_budget(config, init_ray(config.ray))
    datasets = build_datasets(data, plan, config)
    # 4. Fit. Ray Train hands the poll interval from the driver's environment to its controller.
    if config.scaling.controller_poll_s is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(config.scaling.controller_poll_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(config, data.class_names, plan_summary, sorted(data.eval)),
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
            # rank); rank 0 logs one line per epoch instead (_report).
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    # 5. Report.
    with result.checkpoint.as_directory() as folder:
        summary = json.loads((Path(folder) / SUMMARY_FILE).read_text())
    history = summary["history"]
    metrics = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "strategy": config.mix.strategy,
        "seed": config.seed,
        "model": config.model.name,
        "epochs": config.epochs,
        "resumed_from_epoch": summary.get("resumed_from_epoch"),
        "history": history,
        "val": summary.get("val"),
        "test": summary.get("test"),
        "rows_seen": {
            "real": sum(h["train_rows"]["real"] for h in history),
            "synthetic": sum(h["train_rows"]["synthetic"] for h in history),
        },
        "data": {
            "files": len(data.files),
            "train_real": int(data.index.real_positions.size),
            "train_synthetic": int(data.index.synthetic_positions.size),
            **{split: len(table) for split, table in data.eval.items()},
            "excluded": data.excluded,
            "class_names": data.class_names,
        },
        "plan": plan_summary,
        "checkpoint": result.checkpoint.path,
        "wall_s": round(time.perf_counter() - start, 1),
        "config": config.model_dump(mode="json"),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if history:
        plot_curves(history, run_dir / "curves.png", title=f"{run_dir.name} ({config.model.name})")
    return metrics


def prepare_run_dir(config: TrainConfig) -> Path:
    """Create the run folder, or check that the checkpoints in it are this config's run (same config but for
    RESUMABLE_KEYS), since Ray Train resumes from whatever checkpoint the folder holds."""
    run_dir = config.run_dir()
    saved = run_dir / "train_config.yaml"
    if config.output.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    elif saved.exists() and any(run_dir.glob("checkpoint_*")):
        previous = yaml.safe_load(saved.read_text())
        current = config.model_dump(mode="json")
        differs = sorted(k for k in current if k not in RESUMABLE_KEYS and previous.get(k) != current[k])
        if differs:
            raise ValueError(
                f"{run_dir} holds a run with different {differs}; pick another output.name or set "
                "output.overwrite=true"
            )
    save_resolved(config, saved)
    return run_dir


def init_ray(config: RayConfig) -> dict[str, float]:
    """Attach to `config.address` or start a local Ray (logical CPUs from config); return its resources."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(
            address=config.address,
            num_cpus=config.local_num_cpus(),
            runtime_env={"env_vars": dict(config.env_vars)} if config.env_vars else None,
        )
    # Datasets copy the driver's context: this reaches the executors inside the workers too.
    context = DataContext.get_current()
    context.enable_progress_bars = config.progress_bars
    context.print_on_execution_start = config.progress_bars
    return ray.cluster_resources()


def check_budget(config: TrainConfig, cluster: dict[str, float]) -> None:
    """Fail now if the workers plus one Ray Data task cannot be scheduled together (Ray would wait forever);
    skipped with ray.check_resources: false (autoscaling clusters add nodes on demand)."""
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


def loop_config(
    config: TrainConfig, class_names: list[str], plan_summary: list[dict], eval_splits: list[str]
) -> dict:
    """What each worker needs, as plain values (it crosses process boundaries)."""
    return {
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "eval_batch_size": config.eval_batch_size,
        "class_names": class_names,
        "model": config.model.model_dump(mode="json"),
        "optim": config.optim.model_dump(mode="json"),
        "phase1_epochs": next((p["epoch"] for p in plan_summary if p["phase"] == 2), config.epochs),
        "phase2_lr_scale": config.mix.phase2_lr_scale,
        "rows_per_rank": [p["rows_per_rank"] for p in plan_summary],
        "eval_splits": eval_splits,
        "precision": config.scaling.precision,
        "torch_threads": max(1, math.floor(config.scaling.resources_per_worker.get("CPU", 1.0))),
        "checkpoint_every": config.checkpoint.every_epochs,
        "shuffle_seed": config.seed,
        "shuffle_buffer_rows": config.data.shuffle_buffer_rows,
    }


def print_summary(metrics: dict) -> None:
    last = metrics["history"][-1] if metrics["history"] else {}
    test = metrics.get("test") or {}

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    print(
        f"{metrics['run']}: {metrics['strategy']}, {len(metrics['history'])} epochs"
        f"{' (resumed after epoch ' + str(metrics['resumed_from_epoch']) + ')' if metrics['resumed_from_epoch'] is not None else ''}, "
        f"rows seen real {metrics['rows_seen']['real']} / synthetic {metrics['rows_seen']['synthetic']}\n"
        f"  val top-1 {pct(last.get('val_top1'))}, worst group {pct(last.get('val_worst_group'))}; "
        f"test top-1 {pct(test.get('top1'))}, worst group {pct(test.get('worst_group'))}\n"
        f"  {metrics['run_dir']}/metrics.json, curves.png, checkpoint {metrics['checkpoint']} ({metrics['wall_s']}s)"
    )


# ---------------------------------------------------------------- worker


def learning_rate(
    progress: float, optim: dict, *, epochs: int, phase1_epochs: int, phase2_lr_scale: float
) -> float:
    """LR at `progress` epochs: linear warmup then cosine to 0 over phase 1; two_phase's phase 2 restarts a
    cosine from lr * phase2_lr_scale (its fine-tuning schedule). Other strategies have phase1 = all epochs."""
    lr = optim["lr"]
    if progress >= phase1_epochs:
        span = max(epochs - phase1_epochs, 1e-9)
        return (
            lr * phase2_lr_scale * 0.5 * (1 + math.cos(math.pi * min((progress - phase1_epochs) / span, 1.0)))
        )
    warmup = min(optim["warmup_epochs"], phase1_epochs)
    if progress < warmup:
        return lr * (progress + 1e-3) / warmup
    span = max(phase1_epochs - warmup, 1e-9)
    return lr * 0.5 * (1 + math.cos(math.pi * min((progress - warmup) / span, 1.0)))


def build_model(model: ModelConfig | dict, num_classes: int):
    """A timm model with a `num_classes` head: random init, or local pretrained weights (head re-initialized
    when its size differs)."""
    import timm

    model = ModelConfig.model_validate(model)
    if model.pretrained is None:
        return timm.create_model(
            model.name, pretrained=False, num_classes=num_classes, drop_rate=model.drop_rate
        )
    path = Path(model.pretrained.id).expanduser()
    if not path.is_file():
        raise ValueError(f"model.pretrained {path} is not a weights file")
    if path.suffix != ".safetensors" and not model.pretrained.allow_pickle:
        raise ValueError(
            f"model.pretrained {path} is pickled: convert it to .safetensors or set allow_pickle: true"
        )
    return timm.create_model(
        model.name,
        pretrained=True,
        num_classes=num_classes,
        drop_rate=model.drop_rate,
        pretrained_cfg_overlay={"file": str(path)},
    )


def build_optimizer(parameters, optim: OptimConfig | dict):
    import torch

    optim = OptimConfig.model_validate(optim)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=optim.lr, momentum=optim.momentum, nesterov=True, weight_decay=optim.weight_decay
        )
    return torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay)


def _autocast(precision: str, device):
    """(autocast dtype or None, whether fp16 needs a GradScaler): mixed precision on GPUs only."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None, False
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)


def train_loop_per_worker(loop: dict) -> None:
    """One DDP rank: resume from Ray Train's latest checkpoint, then per epoch train on this rank's part of
    the plan (`train_e<epoch>_r<rank>`), evaluate val, checkpoint and report; test after the last epoch."""
    import contextlib

    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from engine.train_data import eval_key, train_key

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _quiet_report_logs()
    # A fractional CPU reservation leaves torch at all cores; workers sharing a node would oversubscribe it.
    torch.set_num_threads(loop["torch_threads"])
    device = ray.train.torch.get_device()
    class_names = loop["class_names"]

    # 1. Model, optimizer, precision (the seed makes every rank build the same initial weights).
    torch.manual_seed(loop["seed"])
    model = build_model(loop["model"], len(class_names))
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model.parameters(), loop["optim"])
    amp_dtype, needs_scaler = _autocast(loop["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=loop["optim"]["label_smoothing"])

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    # 2. Resume.
    start_epoch, history, resumed_from = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        getattr(model, "module", model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, resumed_from = state["epoch"] + 1, state["history"], state["epoch"]

    def all_sum(values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def evaluate(split: str) -> dict:
        from engine.evaluation import classification_metrics

        # The bare module: DDP's forward may broadcast buffers, a collective that ranks with unequal eval
        # batch counts would never all reach.
        net = getattr(model, "module", model)
        net.eval()
        labels, predictions, groups, synthetic = [], [], [], 0
        with torch.no_grad(), autocast():
            for batch in ray.train.get_dataset_shard(eval_key(split, rank)).iter_torch_batches(
                batch_size=loop["eval_batch_size"], device=device
            ):
                predictions.append(net(batch["image"]).argmax(1).cpu())
                labels.append(batch["label"].cpu())
                groups.append(batch["group"].cpu())
                synthetic += int(batch["synthetic"].sum())
        local = [
            torch.cat(x).numpy() if x else torch.zeros(0, dtype=torch.int64).numpy()
            for x in (labels, predictions, groups)
        ]
        gathered = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(gathered, (*local, synthetic))
        else:
            gathered = [(*local, synthetic)]
        merged = [np.concatenate([g[i] for g in gathered]) for i in range(3)]
        metrics = classification_metrics(*merged, class_names)
        metrics["synthetic_rows"] = sum(g[3] for g in gathered)
        return metrics

    # 3. Epochs.
    epochs = loop["epochs"]
    for epoch in range(start_epoch, epochs):
        model.train()
        started = time.perf_counter()
        phase = 1 if epoch < loop["phase1_epochs"] else 2
        steps_per_epoch = max(1, math.ceil(loop["rows_per_rank"][epoch] / loop["batch_size"]))
        loss_sum = correct = seen = synthetic = 0.0
        lr = 0.0
        batches = ray.train.get_dataset_shard(train_key(epoch, rank)).iter_torch_batches(
            batch_size=loop["batch_size"],
            device=device,
            local_shuffle_buffer_size=max(min(loop["rows_per_rank"][epoch], loop["shuffle_buffer_rows"]), 1),
            local_shuffle_seed=loop["shuffle_seed"] * 100_003 + epoch * 101 + rank,
        )
        for step, batch in enumerate(batches):
            lr = learning_rate(
                epoch + step / steps_per_epoch,
                loop["optim"],
                epochs=epochs,
                phase1_epochs=loop["phase1_epochs"],
                phase2_lr_scale=loop["phase2_lr_scale"],
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast():
                logits = model(batch["image"])
                loss = criterion(logits, batch["label"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            count = len(batch["label"])
            loss_sum += float(loss.detach()) * count
            correct += float((logits.argmax(1) == batch["label"]).sum())
            seen += count
            synthetic += float(batch["synthetic"].sum())
        loss_sum, correct, seen, synthetic = all_sum([loss_sum, correct, seen, synthetic])
        val = evaluate("val") if "val" in loop["eval_splits"] else None
        record = {
            "epoch": epoch,
            "phase": phase,
            "lr": lr,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "train_rows": {"real": int(seen - synthetic), "synthetic": int(synthetic)},
            "val_top1": val["top1"] if val else None,
            "val_worst_group": val["worst_group"] if val else None,
            "val_synthetic_rows": val["synthetic_rows"] if val else None,
            "epoch_s": round(time.perf_counter() - started, 2),
        }
        history.append(record)
        summary = None
        if epoch == epochs - 1:
            test = evaluate("test") if "test" in loop["eval_splits"] else None
            summary = {"history": history, "resumed_from_epoch": resumed_from, "val": val, "test": test}
        due = summary is not None or (epoch + 1) % loop["checkpoint_every"] == 0
        _report(record, summary, model, optimizer, scaler, epoch, history, rank, due=due)

    # 4. A run resumed after its last epoch still reports its test metrics (with the same weights).
    if start_epoch >= epochs:
        val, test = (evaluate(s) if s in loop["eval_splits"] else None for s in ("val", "test"))
        summary = {"history": history, "resumed_from_epoch": resumed_from, "val": val, "test": test}
        _report(history[-1], summary, model, optimizer, scaler, epochs - 1, history, rank, due=True)


def _report(metrics, summary, model, optimizer, scaler, epoch, history, rank, *, due: bool) -> None:
    """Report the epoch's `metrics` from every rank; rank 0 attaches a checkpoint when one is due.

    The run's `summary` (history, val and test metrics) goes into the final checkpoint as SUMMARY_FILE, where
    the driver reads it (Ray Train's Result points at the latest checkpoint, on whatever storage it is).
    """
    import tempfile

    import ray.train
    import torch

    if rank == 0:
        logging.getLogger("synthray.train").info(_epoch_line(metrics))
    if not (due and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        state = {
            "model": getattr(model, "module", model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "history": history,
        }
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        if summary is not None:
            (Path(folder) / SUMMARY_FILE).write_text(json.dumps(summary))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _quiet_report_logs() -> None:
    """Ray Train 2.60 logs every rank's every report at INFO through a logger named by its file path, outside
    `ray.train`, so `LoggingConfig` misses it; the epoch line (_report) says the same once per epoch."""
    import importlib

    try:
        module = importlib.import_module("ray.train.v2._internal.execution.context")
    except ImportError:  # another Ray layout: its logs stay as they are
        return
    logging.getLogger(module.__file__).setLevel(logging.WARNING)


def _epoch_line(metrics: dict) -> str:
    val = metrics.get("val_top1")
    return (
        f"epoch {metrics['epoch']} (phase {metrics.get('phase', 1)}): loss {metrics['train_loss']:.3f}, "
        f"train top-1 {metrics['train_acc']:.3f}, val top-1 {'-' if val is None else f'{val:.3f}'}, "
        f"{metrics['epoch_s']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
