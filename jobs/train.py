"""Training job: `python -m jobs.train --config configs/train_toy_cpu.yaml [--set key=value ...]`.

Fits a timm classifier with Ray Train (`TorchTrainer`, DDP over `scaling.num_workers` workers) on the
shards of a generation run, using the train split's real and synthetic rows as `mix.strategy` says and the
real rows of val/test for evaluation. Writes into <output.path>/<run name>/: the Ray Train checkpoints,
train_config.yaml, metrics.json and curves.png. Running again with the same run name resumes from the
latest checkpoint. Also the entry for `ray job submit --working-dir . -- python -m jobs.train --config ...`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engine.train.config import TrainConfig
from engine.train.data import build_datasets, load_training_data, plan_epochs, summarize_plan
from engine.train.evaluation import plot_curves
from engine.train.loop import loop_config, train_loop_per_worker
from engine.train.runner import check_budget, fit, init_ray, prepare_run_dir, read_summary
from jobs.runner import run_job

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train_toy_cpu.yaml"
# How long a run is, and how much of it a checkpoint has done (its reported epoch counts from 0).
PLAN = ("epochs", lambda reported: reported["epoch"] + 1)


def main(argv: list[str] | None = None) -> int:
    return run_job(
        argv,
        prog="synthray train",
        description=__doc__.splitlines()[0],
        config_cls=TrainConfig,
        default_config=str(DEFAULT_CONFIG),
        example="mix.strategy=concat",
        body=lambda config: print_summary(run_training(config)),
    )


def run_training(config: TrainConfig) -> dict:
    """One run: sampling plan -> Ray Datasets -> TorchTrainer.fit -> metrics.json + curves.png; returns metrics."""
    start = time.perf_counter()
    # 1. Rows and the sampling plan: driver side, no images, no Ray.
    data = load_training_data(config.data, seed=config.seed)
    plan = plan_epochs(data, config)
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    plan_summary = summarize_plan(data, plan, config)
    # 2. Run folder: resume or start over, never mix two configs in one folder.
    run_dir = prepare_run_dir(config, plan=PLAN)
    # 3. Ray, with the reservation checked before anything waits on it; the lazy per-(epoch, rank) datasets.
    check_budget(config, init_ray(config.ray))
    datasets = build_datasets(data, plan, config)
    # 4. Fit.
    result = fit(
        train_loop_per_worker,
        loop_config(config, data.class_names, plan_summary, sorted(data.eval)),
        datasets,
        run_dir=run_dir,
        config=config,
        preserve_order=config.ray.preserve_order,
    )
    # 5. Report.
    summary = read_summary(result)
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
        "extra_tests": summary.get("extra_tests") or {},
        "rows_seen": {
            "real": sum(h["train_rows"]["real"] for h in history),
            "synthetic": sum(h["train_rows"]["synthetic"] for h in history),
        },
        "data": {
            "files": len(data.files),
            "train_real": int(data.index.real_positions.size),
            "train_synthetic": int(data.index.synthetic_positions.size),
            "train_soft_label": data.num_soft_rows,
            **{split: len(table) for split, table in data.eval.items()},
            "excluded": data.excluded,
            "class_names": data.class_names,
            "sources": data.sources,
            "notes": data.notes,
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
        f"test top-1 {pct(test.get('top1'))}, worst group {pct(test.get('worst_group'))}"
        + "".join(
            f"; {name} top-1 {pct(m.get('top1'))}, worst group {pct(m.get('worst_group'))}"
            for name, m in (metrics.get("extra_tests") or {}).items()
        )
        + "\n"
        f"  {metrics['run_dir']}/metrics.json, curves.png, checkpoint {metrics['checkpoint']} ({metrics['wall_s']}s)"
    )


if __name__ == "__main__":
    sys.exit(main())
