"""Sweep job: `python -m jobs.sweep --config configs/sweep_toy_cpu.yaml [--set seeds=[0] ...]`.

Runs every variant (a name plus TrainConfig overrides: strategy, synthetic ratio, data) for every seed on
one Ray cluster, one training run after another, then prints a table of mean +- std over seeds and writes
<output>/sweep.json and <output>/sweep.md. Runs live in <output>/runs/<variant>-seed<seed>; a finished run
of the same config is reused from its metrics.json (nothing retrained or re-evaluated), an unfinished one
resumes from its latest checkpoint, unless `overwrite: true`.

`compare_strategies` is the short form the demo calls on a generation run's shards.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from engine.config import load_config, parse_job_args
from engine.train.config import SweepConfig, SweepVariant, TrainConfig

METRICS = (("test_top1", "test top-1"), ("test_worst_group", "test worst-group"), ("val_top1", "val top-1"))


def main(argv: list[str] | None = None) -> int:
    # 1. Config.
    args = parse_job_args(argv, "synthray sweep", __doc__.splitlines()[0], None, "seeds=[0]")
    try:
        config = load_config(SweepConfig, args.config, args.overrides)
        # 2. Runs, 3. table.
        rows = run_sweep(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(rows, title=f"{len(config.variants)} variants x seeds {config.seeds}")
    print(f"{Path(config.output) / 'sweep.json'}, {Path(config.output) / 'sweep.md'}")
    return 0


def run_config(config: SweepConfig, variant: SweepVariant, seed: int) -> TrainConfig:
    """The TrainConfig of one run: base YAML + sweep overrides + the variant's + seed and run folder."""
    return load_config(
        TrainConfig,
        config.train_config,
        [
            *config.overrides,
            *variant.set,
            f"seed={seed}",
            f"output.path={json.dumps(str(Path(config.output) / 'runs'))}",
            f"output.name={json.dumps(f'{variant.name}-seed{seed}')}",
            f"output.overwrite={str(config.overwrite).lower()}",
        ],
    )


def run_sweep(config: SweepConfig) -> list[dict]:
    """Train every (variant, seed); return one row per run and write sweep.json / sweep.md."""
    from engine.train.data import load_training_data
    from jobs.train import run_training

    # Every run config is built and its shards checked first, so that a typo or a bad shard fails before
    # hours of training.
    plan = [(v, seed, run_config(config, v, seed)) for v in config.variants for seed in config.seeds]
    checked: set[str] = set()
    for variant, _, train_config in plan:
        data = train_config.data.model_dump_json()
        if data not in checked:
            try:
                load_training_data(train_config.data)
            except ValueError as err:
                raise ValueError(f"variant {variant.name!r}: {err}") from None
            checked.add(data)
    rows = []
    for variant, seed, train_config in plan:
        title = f"sweep: {variant.name} seed {seed} ({len(rows) + 1}/{len(plan)})"
        metrics = finished_run(train_config)
        if metrics is not None:
            print(f"{title}: finished earlier, reusing {train_config.run_dir() / 'metrics.json'}", flush=True)
        else:
            print(title, flush=True)
            metrics = run_training(train_config)
        rows.append(run_row(variant.name, metrics))
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {"config": config.model_dump(mode="json"), "runs": rows, "summary": summarize(rows)}, indent=2
        )
        + "\n"
    )
    (out / "sweep.md").write_text(format_markdown(rows) + "\n")
    return rows


def finished_run(config: TrainConfig) -> dict | None:
    """The metrics.json of a finished run of this config (all its epochs, same settings but `ray` and
    `output.overwrite`), or None: the run then trains, resuming from its checkpoints if it has some."""
    path = config.run_dir() / "metrics.json"
    if config.output.overwrite or not path.is_file():
        return None
    metrics = json.loads(path.read_text())

    def settings(dumped: dict) -> dict:
        return {
            **{k: v for k, v in dumped.items() if k != "ray"},
            "output": {k: v for k, v in dumped.get("output", {}).items() if k != "overwrite"},
        }

    same = settings(metrics.get("config", {})) == settings(config.model_dump(mode="json"))
    finished = len(metrics.get("history", [])) == config.epochs and "test" in metrics
    return metrics if same and finished else None


def compare_strategies(
    data_paths: list[str],
    output: str,
    *,
    strategies: tuple[str, ...] = ("real", "concat"),
    seeds: tuple[int, ...] = (0,),
    overrides: tuple[str, ...] = (),
    train_config: str | None = None,
) -> list[dict]:
    """The demo's comparison: each strategy on `data_paths` (a generation run's <out>/data), base config
    configs/train_toy_cpu.yaml; print it with `print_table(rows)`."""
    from jobs.train import DEFAULT_CONFIG

    config = SweepConfig(
        train_config=train_config or str(DEFAULT_CONFIG),
        overrides=[f"data.paths={json.dumps(list(data_paths))}", *overrides],
        variants=[SweepVariant(name=s, set=[f"mix.strategy={s}"]) for s in strategies],
        seeds=list(seeds),
        output=output,
        overwrite=True,
    )
    return run_sweep(config)


# ---------------------------------------------------------------- table


def run_row(variant: str, metrics: dict) -> dict:
    test = metrics.get("test") or {}
    history = metrics["history"]
    return {
        "variant": variant,
        "strategy": metrics["strategy"],
        "seed": metrics["seed"],
        "test_top1": test.get("top1"),
        "test_worst_group": test.get("worst_group"),
        "val_top1": history[-1]["val_top1"] if history else None,
        "synthetic_per_epoch": metrics["rows_seen"]["synthetic"] / max(len(history), 1),
        "real_per_epoch": metrics["rows_seen"]["real"] / max(len(history), 1),
        "wall_s": metrics["wall_s"],
        "run_dir": metrics["run_dir"],
    }


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and (sample) std over seeds per variant, in first-seen order; std is 0 for a single seed."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "strategy": runs[0]["strategy"], "seeds": [r["seed"] for r in runs]}
        for key, _ in METRICS:
            values = [r[key] for r in runs if r[key] is not None]
            entry[key] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
        entry["synthetic_per_epoch"] = statistics.fmean(r["synthetic_per_epoch"] for r in runs)
        out.append(entry)
    return out


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def format_markdown(rows: list[dict]) -> str:
    header = ["variant", "strategy", "seeds", *(label for _, label in METRICS), "synthetic rows / epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summarize(rows):
        cells = [entry["variant"], entry["strategy"], str(len(entry["seeds"]))]
        cells += [_cell(entry[key]) for key, _ in METRICS]
        cells.append(f"{entry['synthetic_per_epoch']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict], title: str = "") -> None:
    """The sweep table (accuracies in %, mean ± std over seeds) on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for name in ("variant", "strategy", "seeds", *(label for _, label in METRICS), "synthetic rows / epoch"):
        table.add_column(name, justify="left" if name in ("variant", "strategy") else "right", no_wrap=True)
    for entry in summarize(rows):
        table.add_row(
            entry["variant"],
            entry["strategy"],
            str(len(entry["seeds"])),
            *(_cell(entry[key]) for key, _ in METRICS),
            f"{entry['synthetic_per_epoch']:.0f}",
        )
    # Not a terminal (logs, CI): rich would squeeze the table into 80 columns.
    console = Console()
    Console(width=max(console.width, 120)).print(table)


if __name__ == "__main__":
    sys.exit(main())
