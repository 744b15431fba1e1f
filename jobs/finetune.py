"""Fine-tuning job: `python -m jobs.finetune --config configs/finetune_ti_tiny_cpu.yaml [--set key=value ...]`.

Adapts a diffusion pipeline to a dataset with Ray Train (`TorchTrainer`, gradients averaged over
`scaling.num_workers` workers): `method: textual_inversion` learns one token per class, `dreambooth_lora` a UNet
LoRA (on top of a textual-inversion run's tokens when `lora.textual_inversion` names one), `full` whole modules,
`mvc` MVC's image-conditioned UNet on a caption run's shards (an InstructPix2Pix pipeline). Writes into
<output.path>/<run name>/: the Ray Train checkpoints, train_config.yaml, the adapter files
(textual_inversion.safetensors or lora/pytorch_lora_weights.safetensors, which generators load with
`adapters:`), finetune.json (steps, loss history, wall time, steps/s, rows not used and why) and loss.png. Running again with the same
run name resumes from the latest checkpoint. Also the entry for `ray job submit --working-dir . -- python -m
jobs.finetune --config ...`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from engine.finetune.config import RESUMABLE_KEYS, FinetuneConfig
from engine.finetune.loop import STATE_FILE, finetune_loop_per_worker, loop_config
from engine.train.runner import check_budget, fit, init_ray, prepare_run_dir
from jobs.runner import run_job

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune_ti_tiny_cpu.yaml"
ADAPTER_OUTPUTS = ("textual_inversion.safetensors", "lora", "pipeline")
# How long a run is, and how much of it a checkpoint has done (its reported step counts steps taken).
PLAN = ("max_steps", lambda reported: reported["step"])


def main(argv: list[str] | None = None) -> int:
    return run_job(
        argv,
        prog="synthray finetune",
        description=__doc__.splitlines()[0],
        config_cls=FinetuneConfig,
        default_config=str(DEFAULT_CONFIG),
        example="max_steps=200",
        body=lambda config: print_summary(run_finetune(config)),
    )


def print_summary(report: dict) -> None:
    resumed = report["resumed_from_step"]
    print(
        f"{report['run']}: {report['method']}, {report['steps']} steps"
        f"{f' (resumed at step {resumed})' if resumed is not None else ''}, "
        f"final loss {report['final_loss']:.4f}, {report['steps_per_s']:.2f} steps/s\n"
        f"  {report['run_dir']}: {', '.join(report['outputs'])}, finetune.json, loss.png ({report['wall_s']}s)"
    )
    if report["skipped_rows"]:
        print(f"  rows not used, by reason: {report['skipped_rows']}")
    if report.get("single_image_classes"):
        print(f"  classes with one image, paired with itself (mvc): {report['single_image_classes']}")


def run_finetune(config: FinetuneConfig) -> dict:
    """One run: rows -> TorchTrainer.fit -> adapter files + finetune.json + loss.png; returns the report."""
    import ray

    from engine.finetune.data import load_training_rows, rank_datasets, require_caption_column
    from engine.finetune.textual_inversion import check_tokenizers, placeholder_tokens
    from engine.models.references import check_local_models, resolve_model

    start = time.perf_counter()
    # 1. Models exist, placeholders are new and (mvc) the shards have captions, before anything starts.
    check_local_models(config, "finetune")
    if config.method == "mvc":
        require_caption_column(config.data)
    # 2. Run folder: resume or start over, never mix two configs in one folder.
    run_dir = prepare_run_dir(config, RESUMABLE_KEYS, plan=PLAN)
    # 3. Ray, with the reservation checked before anything waits on it; the real rows, every class usable.
    check_budget(config, init_ray(config.ray))
    data = load_training_rows(config, ray.data)
    class_names = data.class_names
    if config.method == "textual_inversion":
        tokens = placeholder_tokens(class_names, config.textual_inversion.placeholder)
        check_tokenizers(resolve_model(config.model, "finetune")[0], config.model, tokens)
    # 4. Fit; a user mistake found by a worker (an initializer word without tokens, a timestep range beyond
    # the scheduler's) comes back as that error, not as Ray Train's wrapper around it.
    try:
        result = fit(
            finetune_loop_per_worker,
            loop_config(config, class_names, [len(ids) for ids in data.rank_ids]),
            rank_datasets(data, config.ray.task_num_cpus),
            run_dir=run_dir,
            config=config,
        )
    except Exception as err:
        mistakes = [
            cause
            for failure in (getattr(err, "worker_failures", None) or {}).values()
            for cause in (failure, getattr(failure, "cause", None))
            if isinstance(cause, (ValueError, FileNotFoundError))
        ]
        if mistakes:
            raise ValueError(f"fine-tuning worker: {mistakes[0]}") from err
        raise
    # 5. Report: the adapter files of the last checkpoint, its state, the loss curve.
    with result.checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
        outputs = []
        for name in ADAPTER_OUTPUTS:
            source, target = Path(folder) / name, run_dir / name
            if not source.exists():
                continue
            if target.is_dir():
                shutil.rmtree(target)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
            outputs.append(name)
    segment = state["segments"][-1] if state["segments"] else None
    trained = segment["to_step"] - segment["from_step"] if segment else 0
    report = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "method": config.method,
        "steps": state["step"],
        "resumed_from_step": state["resumed_from_step"],
        "loss_history": state["loss_history"],
        "final_loss": state["loss_history"][-1] if state["loss_history"] else float("nan"),
        "steps_per_s": trained / segment["train_s"] if segment and segment["train_s"] else 0.0,
        "segments": state["segments"],
        "timesteps_seen": state["timesteps_seen"],
        "rank_weight_digests": state["rank_weight_digests"],
        "classes": class_names,
        "images_per_class": data.images_per_class,
        "rows_per_worker": [len(ids) for ids in data.rank_ids],
        # Each worker draws from a buffer of at most buffer_rows images; a share that fits is read once.
        "streamed": any(len(ids) > config.buffer_rows for ids in data.rank_ids),
        "skipped_rows": data.skipped,
        "rows_without_caption": data.uncaptioned,
        # MVC pairs each image with another of its class; a class with one image pairs it with itself.
        "single_image_classes": (
            [name for name, n in data.images_per_class.items() if n == 1] if config.method == "mvc" else None
        ),
        "tokens": state["tokens"],
        "outputs": outputs,
        "checkpoint": result.checkpoint.path,
        "wall_s": round(time.perf_counter() - start, 1),
        "config": config.model_dump(mode="json"),
    }
    (run_dir / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    if state["loss_history"]:
        plot_loss(state["loss_history"], run_dir / "loss.png", title=f"{run_dir.name} ({config.method})")
    return report


def plot_loss(history: list[float], path: Path, title: str) -> Path:
    import numpy as np

    from engine.train.evaluation import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(history) + 1)
    ax.plot(steps, history, alpha=0.4, label="loss")
    window = max(1, len(history) // 20)
    if window > 1:
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising MSE")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
