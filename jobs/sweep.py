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
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.config import load_config, with_defaults
from engine.train.config import GenerationSpec, SweepConfig, SweepVariant, ToyDatasetSpec, TrainConfig
from engine.train.sweep_report import format_markdown, print_table, run_row, summarize, write_report
from jobs.runner import run_job


def main(argv: list[str] | None = None) -> int:
    command = " ".join(["synthray sweep", *(argv if argv is not None else sys.argv[1:])])

    def sweep(config: SweepConfig) -> None:
        # 1. Inputs and runs, 2. table (and the report).
        rows = run_sweep(config, command=command)
        title = f"{len(dict.fromkeys(row['variant'] for row in rows))} variants x seeds {config.seeds}"
        print_table(rows, title=title, baseline=config.baseline)
        written = [Path(config.output) / "sweep.json", Path(config.output) / "sweep.md"]
        if config.results:
            written += [Path(f"{config.results}{suffix}") for suffix in (".md", ".json", ".png")]
        print(", ".join(map(str, written)))

    return run_job(
        argv,
        prog="synthray sweep",
        description=__doc__.splitlines()[0],
        config_cls=SweepConfig,
        default_config=None,
        example="seeds=[0]",
        body=sweep,
    )


# ---------------------------------------------------------------- inputs: toy dataset, generation runs


def prepare_toy_dataset(spec: ToyDatasetSpec) -> bool:
    """Build the toy dataset unless `spec.out` holds one made with these arguments; True when (re)built."""
    from engine.tiny.toy_dataset import make_toy_dataset

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
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), **ray_config.worker_env_vars()}
    for variant in config.variants:
        if variant.generate is not None:
            env_vars.update(generation_config(config, variant.generate).ray.worker_env_vars())
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


def run_generations(config: SweepConfig, dataset_rebuilt: bool) -> tuple[dict[str, str], bool]:
    """Run each variant's generation (once per output folder) unless finished; (variant name -> its data,
    whether any generation ran)."""
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
    generated = False
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
        generated = True
    return data_of, generated


def run_preparations(config: SweepConfig, generated: bool) -> None:
    """Each variant's `prepare` command, when what it creates is missing or a generation ran (its input may
    be new); a failing command stops the sweep naming the variant."""
    for variant in config.variants:
        spec = variant.prepare
        if spec is None or (Path(spec.creates).exists() and not generated):
            continue
        command = [sys.executable if spec.command[0] == "python" else spec.command[0], *spec.command[1:]]
        print(f"sweep: {variant.name}: preparing its data: {' '.join(spec.command)}", flush=True)
        status = subprocess.run(command, check=False).returncode
        if status or not Path(spec.creates).exists():
            raise ValueError(
                f"variant {variant.name!r}: its prepare command failed (exit {status}) or did not create "
                f"{spec.creates}: {' '.join(spec.command)}"
            )


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

    config = config.selected()
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
    data_of, generated = run_generations(config, rebuilt)
    run_preparations(config, generated)
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
    # two_phase's last phase2_epochs train on real rows only: probe one phase-1 epoch before them (a one-epoch
    # probe would be all phase 2, and the budget would count real rows only).
    tail = config.mix.phase2_epochs if config.mix.strategy == "two_phase" else 0
    plan = plan_epochs(data, config.model_copy(update={"epochs": tail + 1}))
    first, last = (sum(len(rank) for rank in plan[i]) for i in (0, -1))
    return tail + max(1, round((train_rows - tail * last) / max(first, 1)))


def inputs_fingerprint(config: TrainConfig, legacy: bool = False) -> str:
    """What a run trains on, as its data folders' shard names: shards are named by their content, so a
    regenerated run (e.g. from a rebuilt toy dataset under the same path) has other names, which the run's
    config cannot show. (A data path that is a dataset rather than a generation run's shards adds its
    .parquet names, or nothing for an image folder.)"""
    import hashlib
    import posixpath

    from engine import storage

    # Names, not the locations list_files returns: those are absolute, so the same shards read from another
    # checkout (or working directory) would look like other data. `legacy` is the older location-based form,
    # still accepted for records written before (fresh_if_inputs_changed).
    files = {path: storage.list_files(path, ".parquet") for path in config.data.paths}
    if legacy:
        names = [f"{path}\t{listed}" for path, listed in files.items()]
    else:
        names = [f"{path}\t{[posixpath.basename(f) for f in listed]}" for path, listed in files.items()]
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
    if previous is not None and previous == inputs_fingerprint(config, legacy=True):
        record.write_text(json.dumps({"fingerprint": fingerprint, "paths": config.data.paths}) + "\n")
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

    saved = with_defaults(type(config), metrics.get("config", {}))
    same = saved is not None and settings(saved) == settings(config.model_dump(mode="json"))
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


if __name__ == "__main__":
    sys.exit(main())
