"""What runs in each Ray Train worker: the model and optimizer builders, the learning-rate schedule and the
per-worker loop (resume, train an epoch on this rank's part of the plan, evaluate, checkpoint, report).

The loop reads one plain dict (`loop_config`), its datasets by name from `ray.train.get_dataset_shard`
(`engine.train.data.train_key` / `eval_key`) and writes CHECKPOINT_FILE into every checkpoint and
SUMMARY_FILE into the last one, where the driver (`engine.train.runner.read_summary`) finds the run's
metrics. torch and timm are imported inside the functions: the driver imports this module without them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from engine.train.config import ModelConfig, OptimConfig, TrainConfig

CHECKPOINT_FILE = "state.pt"
SUMMARY_FILE = "summary.json"


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
        "deterministic": config.scaling.deterministic,
    }


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


def worker_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's epoch (dropout, stochastic depth)."""
    return int(np.random.SeedSequence([seed, 3, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)


def use_deterministic_kernels(deterministic: bool, device) -> None:
    """On GPUs, pick deterministic kernels (cuDNN, cuBLAS, scatter/index ops) when `deterministic`; CPU
    kernels of a given thread count are deterministic already. Ops without a deterministic GPU version warn
    (torch's warn_only) instead of failing the run."""
    import torch

    if device.type != "cuda":
        return
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible matmuls (CUDA docs, "Results reproducibility").
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def train_batches(dataset, loop: dict, *, epoch: int, rank: int, device="auto"):
    """One rank's batches of one epoch from its dataset (a Dataset or Ray Train's DataIterator of it),
    through a local shuffle seeded by (shuffle_seed, epoch, rank)."""
    return dataset.iter_torch_batches(
        batch_size=loop["batch_size"],
        device=device,
        local_shuffle_buffer_size=max(min(loop["rows_per_rank"][epoch], loop["shuffle_buffer_rows"]), 1),
        local_shuffle_seed=loop["shuffle_seed"] * 100_003 + epoch * 101 + rank,
    )


def train_loop_per_worker(loop: dict) -> None:
    """One DDP rank: resume from Ray Train's latest checkpoint, then per epoch train on this rank's part of
    the plan (`train_e<epoch>_r<rank>`), evaluate val, checkpoint and report; test after the last epoch."""
    import contextlib

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from engine.train.data import TARGET, eval_key, train_key

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    _quiet_report_logs()
    # A fractional CPU reservation leaves torch at all cores; workers sharing a node would oversubscribe it.
    torch.set_num_threads(loop["torch_threads"])
    device = ray.train.torch.get_device()
    use_deterministic_kernels(loop["deterministic"], device)
    class_names = loop["class_names"]

    # 1. Model, optimizer, precision (the seed makes every rank build the same initial weights).
    torch.manual_seed(loop["seed"])
    model = build_model(loop["model"], len(class_names))
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model.parameters(), loop["optim"])
    amp_dtype, needs_scaler = _autocast(loop["precision"], device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    # Class-probability targets for every row (engine.train.data.soft_targets): a soft-label row (Diff-Mix)
    # trains on its mix, a one-hot row gives exactly the class-index loss, label smoothing included.
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
        from engine.train.evaluation import classification_metrics

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

    def final_tests() -> dict:
        """`test` and each extra test split (shifted / out-of-distribution sets), with the last weights."""
        extra = [s for s in loop["eval_splits"] if s not in ("train", "val", "test")]
        return {
            "test": evaluate("test") if "test" in loop["eval_splits"] else None,
            "extra_tests": {name: evaluate(name) for name in extra},
        }

    # 3. Epochs.
    epochs = loop["epochs"]
    for epoch in range(start_epoch, epochs):
        # Dropout (and any other draw in the model) restarts from (seed, epoch, rank): a run resumed at this
        # epoch draws what an uninterrupted one does.
        torch.manual_seed(worker_seed(loop["seed"], epoch, rank))
        model.train()
        started = time.perf_counter()
        phase = 1 if epoch < loop["phase1_epochs"] else 2
        steps_per_epoch = max(1, math.ceil(loop["rows_per_rank"][epoch] / loop["batch_size"]))
        loss_sum = correct = seen = synthetic = 0.0
        lr = 0.0
        batches = train_batches(
            ray.train.get_dataset_shard(train_key(epoch, rank)), loop, epoch=epoch, rank=rank, device=device
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
                loss = criterion(logits, batch[TARGET])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            count = len(batch["label"])
            loss_sum += float(loss.detach()) * count
            correct += float((logits.argmax(1) == batch["label"]).sum())  # accuracy: the hard label
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
            summary = {"history": history, "resumed_from_epoch": resumed_from, "val": val, **final_tests()}
        due = summary is not None or (epoch + 1) % loop["checkpoint_every"] == 0
        _report(record, summary, model, optimizer, scaler, epoch, history, rank, due=due)

    # 4. A run resumed after its last epoch still reports its test metrics (with the same weights).
    if start_epoch >= epochs:
        val = evaluate("val") if "val" in loop["eval_splits"] else None
        summary = {"history": history, "resumed_from_epoch": resumed_from, "val": val, **final_tests()}
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
