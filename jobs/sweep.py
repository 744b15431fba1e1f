"""Sweep job: `python -m jobs.sweep --config configs/sweep_toy_cpu.yaml [--set seeds=[0] ...]`.

Runs every variant (a name plus TrainConfig overrides: strategy, synthetic ratio, data) for every seed on
one Ray cluster, one training run after another, then prints a table of mean +- std over seeds and writes
<output>/sweep.json and <output>/sweep.md. Runs live in <output>/runs/<variant>-seed<seed>; a finished run
of the same config on the same shards is reused from its metrics.json (nothing retrained or re-evaluated),
an unfinished one resumes from its latest checkpoint, unless `overwrite: true`. The shards a run started on
are recorded in <output>/inputs/ (their content-hash names): other shards under the same path start it over.

A benchmark sweep (configs/bench_efficacy.yaml) also holds its inputs: `toy_dataset` is built first, each
variant's `generate` (a generation config + overrides) runs unless a finished run of that config is there,
and its shards become the variant's data. With `baseline`, each variant's delta to it is tested over seeds
(paired t-test); with `attention`, each run's subject attention is measured (engine.train.attention); with
`results`, the report (<results>.md, .json, .png) records the command, the machine and the wall time.

`compare_strategies` is the short form the demo calls on a generation run's shards.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from engine.config import load_config, parse_job_args
from engine.train.config import GenerationSpec, SweepConfig, SweepVariant, ToyDatasetSpec, TrainConfig

METRICS = (("test_top1", "test top-1"), ("test_worst_group", "test worst-group"), ("val_top1", "val top-1"))
# What the benchmark report shows and compares with the baseline.
REPORT_METRICS = (
    ("test_top1", "test top-1"),
    ("test_worst_group", "test worst-group"),
    ("subject_attention", "subject attention"),
)
SIGNIFICANCE = 0.05


def main(argv: list[str] | None = None) -> int:
    # 1. Config.
    args = parse_job_args(argv, "synthray sweep", __doc__.splitlines()[0], None, "seeds=[0]")
    command = " ".join(["synthray sweep", *(argv if argv is not None else sys.argv[1:])])
    try:
        config = load_config(SweepConfig, args.config, args.overrides)
        # 2. Inputs and runs, 3. table (and the report).
        rows = run_sweep(config, command=command)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(
        rows, title=f"{len(config.variants)} variants x seeds {config.seeds}", baseline=config.baseline
    )
    written = [Path(config.output) / "sweep.json", Path(config.output) / "sweep.md"]
    if config.results:
        written += [Path(f"{config.results}{suffix}") for suffix in (".md", ".json", ".png")]
    print(", ".join(map(str, written)))
    return 0


# ---------------------------------------------------------------- inputs: toy dataset, generation runs


def prepare_toy_dataset(spec: ToyDatasetSpec) -> bool:
    """Build the toy dataset unless `spec.out` holds one made with these arguments; True when (re)built."""
    from engine.toy_dataset import make_toy_dataset

    arguments = spec.model_dump(exclude={"out"})
    saved = Path(spec.out) / "dataset.json"
    if saved.is_file():
        previous = json.loads(saved.read_text()).get("arguments", {})
        if {k: previous.get(k) for k in arguments} == arguments:
            return False
    print(f"sweep: building the toy dataset {spec.out} ({arguments})", flush=True)
    make_toy_dataset(Path(spec.out), **arguments)
    return True


def generation_config(config: SweepConfig, spec: GenerationSpec):
    from engine.config import GenerateConfig

    return load_config(GenerateConfig, spec.config, [*config.generate_overrides, *spec.set])


def finished_generation(generate_config) -> bool:
    """A generation run of this config (same content hash) finished in its output folder."""
    from engine.config import config_hash

    run = Path(generate_config.output.path) / "run.json"
    if not run.is_file():
        return False
    report = json.loads(run.read_text())
    return (
        report.get("config_hash") == config_hash(generate_config)
        and not report.get("failed_attempts")
        and report.get("rows", {}).get("synthetic_written") is not None
    )


START_ATTEMPTS = 3


def start_local_ray(config: SweepConfig) -> None:
    """One local Ray for the whole sweep, which generation and training attach to, started here so that a start
    that times out (Ray waits a fixed 30 s for its raylet, which a heavily loaded machine can miss) is retried,
    each retry said in a line. Nothing to do when the runs name a cluster or Ray is up."""
    import ray

    ray_config = run_config(config, config.variants[0], config.seeds[0], "unused").ray
    if ray.is_initialized() or ray_config.address is not None or os.environ.get("RAY_ADDRESS"):
        return
    # What the generation runs would give their own local Ray (engine.pipeline.init_ray).
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    for variant in config.variants:
        if variant.generate is not None:
            env_vars.update(generation_config(config, variant.generate).ray.env_vars)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=ray_config.local_num_cpus(), runtime_env={"env_vars": env_vars})
            return
        except Exception as err:  # Ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
            ray.shutdown()
            print(
                f"sweep: Ray's local start timed out (attempt {attempt}/{START_ATTEMPTS}); retrying",
                flush=True,
            )


def run_generations(config: SweepConfig, dataset_rebuilt: bool) -> dict[str, str]:
    """Run each variant's generation (once per output folder) unless finished; variant name -> its data."""
    from jobs import generate

    data_of: dict[str, str] = {}
    outputs: dict[str, tuple[str, list[str]]] = {}  # output folder -> (config path, overrides) that fill it
    for variant in config.variants:
        if variant.generate is None:
            continue
        try:
            generate_config = generation_config(config, variant.generate)
        except ValueError as err:
            raise ValueError(f"variant {variant.name!r}: generation config: {err}") from None
        output = generate_config.output.path
        recipe = (variant.generate.config, [*config.generate_overrides, *variant.generate.set])
        if outputs.setdefault(output, recipe) != recipe:
            raise ValueError(f"variant {variant.name!r} generates into {output}, as another variant does")
        data_of[variant.name] = str(Path(output) / "data")
    done: set[str] = set()
    for variant in config.variants:
        if variant.generate is None or variant.name not in data_of:
            continue
        generate_config = generation_config(config, variant.generate)
        output = generate_config.output.path
        if output in done:
            continue
        done.add(output)
        # A rebuilt toy dataset is other images under the same path: the config hash cannot tell.
        if not dataset_rebuilt and finished_generation(generate_config):
            print(f"sweep: {variant.name}: reusing the generation run in {output}", flush=True)
            continue
        print(f"sweep: {variant.name}: generating into {output}", flush=True)
        sets = [arg for override in outputs[output][1] for arg in ("--set", override)]
        status = generate.main(["--config", variant.generate.config, *sets, "--set", "output.overwrite=true"])
        if status:
            raise ValueError(
                f"variant {variant.name!r}: its generation run failed (exit {status}), see above"
            )
    return data_of


def run_config(
    config: SweepConfig, variant: SweepVariant, seed: int, data: str | None = None, epochs: int | None = None
) -> TrainConfig:
    """The TrainConfig of one run: base YAML + sweep overrides + the variant's generated `data` (if any) +
    the variant's overrides + `epochs` (the budget's, if any) + seed and run folder."""
    return load_config(
        TrainConfig,
        config.train_config,
        [
            *config.overrides,
            *([f"data.paths={json.dumps([data])}"] if data else []),
            *variant.set,
            *([f"epochs={epochs}"] if epochs else []),
            f"seed={seed}",
            f"output.path={json.dumps(str(Path(config.output) / 'runs'))}",
            f"output.name={json.dumps(f'{variant.name}-seed{seed}')}",
            f"output.overwrite={str(config.overwrite).lower()}",
        ],
    )


def run_sweep(config: SweepConfig, command: str = "") -> list[dict]:
    """Build the inputs, train every (variant, seed); return one row per run and write sweep.json / sweep.md
    (and the benchmark report when `config.results` is set)."""
    from engine.train.data import load_training_data
    from jobs.train import run_training

    started, load_at_start = time.perf_counter(), os.getloadavg()
    # Every config is built first, so that a typo fails before hours of generation and training.
    for variant in config.variants:
        run_config(config, variant, config.seeds[0], "checked-later" if variant.generate else None)
        if variant.generate is not None:
            try:
                generation_config(config, variant.generate)
            except ValueError as err:
                raise ValueError(f"variant {variant.name!r}: generation config: {err}") from None
    rebuilt = prepare_toy_dataset(config.toy_dataset) if config.toy_dataset else False
    start_local_ray(config)
    data_of = run_generations(config, rebuilt)
    # Then every run's shards are checked, so that a bad shard fails before hours of training.
    plan = [
        (v, seed, run_config(config, v, seed, data_of.get(v.name)))
        for v in config.variants
        for seed in config.seeds
    ]
    if config.train_rows:
        plan = [
            (v, seed, run_config(config, v, seed, data_of.get(v.name), budget_epochs(c, config.train_rows)))
            for v, seed, c in plan
        ]
    checked: set[str] = set()
    for variant, _, train_config in plan:
        data = train_config.data.model_dump_json()
        if data not in checked:
            try:
                load_training_data(train_config.data, seed=train_config.seed)
            except ValueError as err:
                raise ValueError(f"variant {variant.name!r}: {err}") from None
            checked.add(data)
    rows = []
    for variant, seed, train_config in plan:
        title = f"sweep: {variant.name} seed {seed} ({len(rows) + 1}/{len(plan)})"
        train_config = fresh_if_inputs_changed(train_config, Path(config.output), title)
        metrics = finished_run(train_config)
        if metrics is not None:
            print(f"{title}: finished earlier, reusing {train_config.run_dir() / 'metrics.json'}", flush=True)
        else:
            print(title, flush=True)
            metrics = run_training(train_config)
        row = run_row(variant.name, metrics)
        if config.attention is not None:
            from engine.train.attention import run_attention

            attention = run_attention(
                train_config, metrics, config.attention.target_layer, config.attention.split
            )
            row["subject_attention"] = attention["subject_share"]
            row["attention"] = attention
        rows.append(row)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {"config": config.model_dump(mode="json"), "runs": rows, "summary": summarize(rows)}, indent=2
        )
        + "\n"
    )
    (out / "sweep.md").write_text(format_markdown(rows) + "\n")
    if config.results:
        write_report(
            config,
            rows,
            command=command,
            load_at_start=load_at_start,
            wall_s=time.perf_counter() - started,
        )
    return rows


def budget_epochs(config: TrainConfig, train_rows: int) -> int:
    """Epochs that make this run see about `train_rows` train rows: a variant with five times the rows per
    epoch trains a fifth of the epochs, so every variant takes the same number of optimizer steps."""
    from engine.train.data import load_training_data, plan_epochs

    data = load_training_data(config.data, seed=config.seed)
    one_epoch = config.model_copy(update={"epochs": 1})
    rows_per_epoch = sum(len(rank) for rank in plan_epochs(data, one_epoch)[0])
    return max(1, round(train_rows / max(rows_per_epoch, 1)))


def inputs_fingerprint(config: TrainConfig) -> str:
    """What a run trains on, as its data folders' shard names: shards are named by their content, so a
    regenerated run (e.g. from a rebuilt toy dataset under the same path) has other names, which the run's
    config cannot show. (A data path that is a dataset rather than a generation run's shards adds its
    .parquet names, or nothing for an image folder.)"""
    import hashlib

    from engine import storage

    names = [f"{path}\t{storage.list_files(path, '.parquet')}" for path in config.data.paths]
    return hashlib.sha1("\n".join(names).encode()).hexdigest()


def fresh_if_inputs_changed(config: TrainConfig, sweep_out: Path, title: str) -> TrainConfig:
    """The run's config, set to overwrite its folder when its data are not the ones it last trained (or
    resumed) on; the fingerprint is recorded under <sweep output>/inputs/ before the run starts, so an
    interrupted run resumes only on the same shards."""
    record = sweep_out / "inputs" / f"{config.run_name()}.json"
    fingerprint = inputs_fingerprint(config)
    previous = json.loads(record.read_text()).get("fingerprint") if record.is_file() else None
    if previous == fingerprint:
        return config
    if previous is not None and config.run_dir().exists():
        print(f"{title}: its data changed since it ran (other shards): training it again", flush=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"fingerprint": fingerprint, "paths": config.data.paths}) + "\n")
    return config.model_copy(update={"output": config.output.model_copy(update={"overwrite": True})})


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
        "epochs": len(history),
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
        for key in dict.fromkeys(k for k, _ in (*METRICS, *REPORT_METRICS)):
            values = [r[key] for r in runs if r.get(key) is not None]
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


def compare_with_baseline(rows: list[dict], baseline: str) -> dict[str, dict]:
    """Per variant and REPORT_METRICS key: mean and std of (variant - baseline) over the seeds both ran, and
    the paired t-test's p-value (scipy.stats.ttest_rel; None below 2 pairs or when every difference is the
    same, where the test is undefined). `significant`: p < SIGNIFICANCE."""
    from scipy.stats import ttest_rel

    by_seed = {(r["variant"], r["seed"]): r for r in rows}
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        out[variant] = {}
        for key, _ in REPORT_METRICS:
            pairs = [
                (by_seed[(variant, seed)][key], by_seed[(baseline, seed)][key])
                for (name, seed) in by_seed
                if name == variant
                and (baseline, seed) in by_seed
                and by_seed[(variant, seed)].get(key) is not None
                and by_seed[(baseline, seed)].get(key) is not None
            ]
            if not pairs:
                out[variant][key] = None
                continue
            deltas = [v - b for v, b in pairs]
            p_value = None
            if len(pairs) > 1 and len(set(deltas)) > 1:
                p_value = float(ttest_rel([v for v, _ in pairs], [b for _, b in pairs]).pvalue)
                p_value = None if math.isnan(p_value) else p_value
            out[variant][key] = {
                "mean": statistics.fmean(deltas),
                "std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                "num_pairs": len(pairs),
                "p_value": p_value,
                "significant": p_value is not None and p_value < SIGNIFICANCE,
            }
    return out


def _delta_cell(delta: dict | None, variant: str, baseline: str) -> str:
    if variant == baseline:
        return "—"
    if delta is None:
        return "n/a"
    p = "p n/a" if delta["p_value"] is None else f"p={delta['p_value']:.3f}"
    return f"{100 * delta['mean']:+.1f}{' *' if delta['significant'] else ''} ({p})"


def report_table(rows: list[dict], baseline: str | None) -> tuple[list[str], list[list[str]]]:
    """The benchmark table: per variant, each REPORT_METRICS mean ± std (%), its delta to the baseline in
    points with the paired test's p-value (* when p < SIGNIFICANCE), and synthetic rows per epoch."""
    deltas = compare_with_baseline(rows, baseline) if baseline else {}
    header = ["variant", "seeds", "epochs"]
    for _, label in REPORT_METRICS:
        header += [label] + ([f"Δ {label} vs {baseline}"] if baseline else [])
    header.append("synthetic rows / epoch")
    body = []
    for entry in summarize(rows):
        runs = [r for r in rows if r["variant"] == entry["variant"]]
        cells = [
            entry["variant"],
            str(len(entry["seeds"])),
            "/".join(sorted({str(r.get("epochs")) for r in runs})),
        ]
        for key, _ in REPORT_METRICS:
            cells.append(_cell(entry[key]))
            if baseline:
                cells.append(_delta_cell(deltas[entry["variant"]][key], entry["variant"], baseline))
        cells.append(f"{entry['synthetic_per_epoch']:.0f}")
        body.append(cells)
    return header, body


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def write_report(
    config: SweepConfig, rows: list[dict], *, command: str, load_at_start, wall_s: float
) -> None:
    """<results>.json (everything), <results>.md (the table, the command, the machine) and <results>.png."""
    from engine.train.evaluation import plot_variants

    prefix = Path(config.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    header, body = report_table(rows, config.baseline)
    summary = summarize(rows)
    deltas = compare_with_baseline(rows, config.baseline) if config.baseline else None
    context = {
        "command": command,
        "config": config.model_dump(mode="json"),
        "machine": machine(),
        "loadavg_at_start": [round(x, 2) for x in load_at_start],
        "wall_s": round(wall_s, 1),
    }
    Path(f"{prefix}.json").write_text(
        json.dumps({**context, "summary": summary, "deltas": deltas, "runs": rows}, indent=2) + "\n"
    )
    plot_variants(
        summary, REPORT_METRICS, Path(f"{prefix}.png"), title=f"{len(config.seeds)} seeds, mean ± std"
    )
    m = context["machine"]
    lines = [
        f"# Efficacy benchmark: {', '.join(e['variant'] for e in summary)}",
        "",
        f"Command: `{command}` (runs in {config.output}).",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, Python {m['python']}; "
        f"load average at start {' / '.join(f'{x:.2f}' for x in context['loadavg_at_start'])}; "
        f"wall time {wall_s / 60:.1f} min (cached generation and runs are reused, not re-timed).",
        f"Seeds: {config.seeds}. Accuracies and subject attention in %, mean ± std over seeds; Δ in points vs "
        f"`{config.baseline}`, paired t-test over seeds (scipy.stats.ttest_rel), * when p < {SIGNIFICANCE}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cells) + " |" for cells in body),
        "",
        f"![accuracy and subject attention per variant]({prefix.name}.png)",
    ]
    if config.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in config.notes)]
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict], title: str = "", baseline: str | None = None) -> None:
    """The sweep table (accuracies in %, mean ± std over seeds) on the terminal; with `baseline`, the
    benchmark's table (deltas and paired tests, subject attention)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    if baseline:
        header, body = report_table(rows, baseline)
        for name in header:
            table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
        for cells in body:
            table.add_row(*cells)
        Console(width=max(Console().width, 200)).print(table)
        return
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
