"""Engine overhead: the whole AGA pipeline against each of its stages run alone (CPU, tiny models).

    python -m benchmarks.engine_overhead [--num-images 48] [--memory-scale 4] [--out-dir DIR]

One process, one local Ray (2 logical CPUs by default), the toy dataset, configs/aga_tiny_cpu.yaml with the
offline tiny models and the dataset's masks, every train image expanded to K synthetic rows.

1. End to end: `engine.pipeline.run_generate`, unchanged, on N source images and on M = `memory_scale` x N.
   Output rows are timed by the shards' modification times (each shard is renamed into place when written).
2. Each stage alone on the M images, with the same StageSpec (batch size, concurrency, num_cpus) and task
   CPUs: the stage's input is materialised once (the previous stage's output, kept as object refs), then
   only that stage runs over it and its output is consumed (block refs collected, nothing fetched while the
   clock runs); `read` is the file reads (the listing runs in the driver before the clock starts) and
   `write` is encode + shard writing, with `run_generate`'s arguments.

Throughput is in synthetic rows per second: the product's unit, the same for every stage (before `expand`
a source counts as the K synthetic rows it becomes). Two measures, for both modes alike:
- steady = rows/s between the outputs that bring out 25% and 90% of the rows (STEADY_WINDOW): excludes
  actor start-up (model loading), pipeline fill, the catch-up burst of a stage that started late, and the
  drain. The headline ratio is end-to-end steady / slowest stage-alone steady, both on the M images (the
  longer run, where steady state dominates).
- wall = all rows / (last output - start): start-up and fill included (the wall ratio divides by the
  stage whose wall rate is lowest).
`busy_s` is the time the stage's own code ran (from the run ledger); end to end against alone it shows
whether a stage ran slower inside the pipeline (CPU contention between pools on a small machine).

Memory: a background thread samples the driver's RSS (psutil) and the object store's used bytes (the
raylet's store stats: what `ray memory --stats-only` prints) every `sample_interval_s` during both
end-to-end runs; with streaming, the peaks should not grow with the input.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.record import RESULTS_DIR, machine, markdown_table, versions, write_result

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "aga_tiny_cpu.yaml"
MIB = 2**20
# Steady throughput: rows/s between the outputs that bring out 25% and 90% of the rows. The window starts
# past actor start-up, pipeline fill and the burst in which a late downstream stage catches up; it ends
# before the drain. Shorter windows are not timed (stages that quick are never the bottleneck).
STEADY_WINDOW = (0.25, 0.9)
MIN_STEADY_WINDOW_S = 1.0


@dataclass(frozen=True)
class OverheadSettings:
    num_images: int = 48  # N source images (all in train, all expanded)
    memory_scale: int = 4  # the second end-to-end run has memory_scale x N images
    num_classes: int = 4
    image_size: int = 64  # toy images, px
    num_variants: int = 2  # K synthetic rows per source
    # Larger than the demo's 64 px / 4 steps so that model time dominates fixed per-batch costs.
    background_size: int = 128
    background_steps: int = 8
    rows_per_block: int = 16  # source rows per Ray Data block (the config's default)
    rows_per_shard: int = 16  # small shards: finer timing of the end-to-end output
    num_cpus: int = 2  # logical CPUs of the local Ray
    sample_interval_s: float = 0.1

    @property
    def throughput_images(self) -> int:
        """Throughput is compared on the larger run: start-up and fill are a smaller part of it."""
        return self.num_images * self.memory_scale

    def overrides(self, num_images: int, toy: Path, out: Path, models: Path) -> list[str]:
        """`--set` overrides on configs/aga_tiny_cpu.yaml (printed with the results)."""
        return [
            f"data.path={toy}",
            f"data.masks_path={toy / 'masks'}",
            "data.splits=[train]",
            "data.expand_splits=[train]",
            f"data.rows_per_block={self.rows_per_block}",
            f"data.max_images={num_images}",
            f"output.path={out}",
            "output.gallery_classes=0",  # the gallery is drawn after the last shard: not throughput
            f"output.rows_per_shard={self.rows_per_shard}",
            "ray.progress_bars=false",
            f"num_variants={self.num_variants}",
            f"prompt.model.id={models / 'llm'}",
            f"background.model.id={models / 'sdxl'}",
            f"background.height={self.background_size}",
            f"background.width={self.background_size}",
            f"background.num_inference_steps={self.background_steps}",
            f"segment.detector.id={models / 'grounding-dino'}",
            f"segment.sam.id={models / 'sam'}",
            "segment.use_dataset_masks=true",
        ]


SMOKE = OverheadSettings(
    num_images=8,
    memory_scale=2,
    num_classes=2,
    image_size=32,
    background_size=32,
    background_steps=1,
    rows_per_block=4,
    rows_per_shard=8,
)


# ---------------------------------------------------------------- measuring


@dataclass
class Arrivals:
    """When output rows came out of a run: `start` and (time, synthetic rows) per output unit."""

    start: float
    times: list[float]
    synthetic: list[int]

    def summary(self) -> dict:
        order = sorted(range(len(self.times)), key=self.times.__getitem__)
        times = [self.times[i] for i in order]
        cumulative = list(itertools.accumulate(self.synthetic[i] for i in order))
        total = cumulative[-1] if cumulative else 0
        out = {
            "synthetic_rows": total,
            "outputs": len(times),
            "first_output_s": round(times[0] - self.start, 3) if times else None,
            "wall_s": round(times[-1] - self.start, 3) if times else None,
            "wall_rows_per_s": round(total / (times[-1] - self.start), 3) if times else None,
            "steady_s": None,
            "steady_rows_per_s": None,
        }
        if total:
            # The outputs at which STEADY_WINDOW's fractions of the rows are out: rows between them / time.
            a, b = (next(i for i, c in enumerate(cumulative) if c >= q * total) for q in STEADY_WINDOW)
            if times[b] - times[a] >= MIN_STEADY_WINDOW_S:
                out["steady_s"] = round(times[b] - times[a], 3)
                out["steady_rows_per_s"] = round((cumulative[b] - cumulative[a]) / (times[b] - times[a]), 3)
        return out


class MemorySampler:
    """Peak driver RSS and object-store bytes in use, sampled in a thread while the block runs."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> MemorySampler:
        import ray
        from ray._private.internal_api import get_state_from_address

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.baseline = self._sample()
        self.peak = dict(self.baseline)
        self.samples = 1
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._update(self._sample())
        self._state.disconnect()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update(self._sample())

    def _update(self, sample: dict[str, int]) -> None:
        self.samples += 1
        for key, value in sample.items():
            self.peak[key] = max(self.peak[key], value)

    def _sample(self) -> dict[str, int]:
        # Ray 2.60 has no public call for the store's used bytes; this is what `ray memory --stats-only`
        # (ray._private.internal_api.memory_summary) reads.
        from ray._private.internal_api import get_memory_info_reply

        store = get_memory_info_reply(self._state).store_stats
        return {
            "driver_rss": self.process.memory_info().rss,
            "object_store": int(store.object_store_bytes_used),
        }

    def summary(self) -> dict:
        return {
            "samples": self.samples,
            "driver_rss_before_mib": round(self.baseline["driver_rss"] / MIB, 1),
            "peak_driver_rss_mib": round(self.peak["driver_rss"] / MIB, 1),
            "driver_rss_growth_mib": round((self.peak["driver_rss"] - self.baseline["driver_rss"]) / MIB, 1),
            "object_store_before_mib": round(self.baseline["object_store"] / MIB, 1),
            "peak_object_store_mib": round(self.peak["object_store"] / MIB, 1),
        }


# ---------------------------------------------------------------- the two modes


def run_end_to_end(config, sample_interval_s: float) -> dict:
    """`run_generate` as users run it; output rows timed by shard modification times."""
    from engine.pipeline import run_generate

    start = time.time()
    with MemorySampler(sample_interval_s) as memory:
        report = run_generate(config)
    shards = sorted(Path(config.output.path, "data").glob("*.parquet"))
    arrivals = Arrivals(
        start=start,
        times=[p.stat().st_mtime_ns / 1e9 for p in shards],
        synthetic=[_synthetic_in_shard(p) for p in shards],
    )
    return {
        **arrivals.summary(),
        "run_generate_s": report.data["wall_s"],
        "shards_mib": round(sum(p.stat().st_size for p in shards) / MIB, 2),
        "busy_s": {name: s["busy_s"] for name, s in report.data["stages"].items()},
        "memory": memory.summary(),
    }


def run_stages_alone(config, work: Path) -> list[dict]:
    """Each stage over its materialised input, alone; returns one summary per stage (read ... write)."""
    import ray
    import ray.data
    from ray.data.block import BlockAccessor

    from engine.config import config_hash
    from engine.pipeline import pipeline_stages, write_shards
    from engine.readers import read_source
    from engine.run.ledger import start_ledger
    from engine.stages.loop import apply_stages

    ledger = start_ledger()
    task_cpus = config.ray.task_num_cpus
    results = []

    def timed(name: str, spec: dict, ds, count: Callable[[pa.Table], int]) -> list:
        """Run `ds`, timing each output bundle; returns the output's block refs (the next input)."""
        start = time.time()
        times, refs = [], []
        for bundle in ds.iter_internal_ref_bundles():
            assert bundle.num_rows() == sum(m.num_rows for m in bundle.metadata), "sliced output bundle"
            times.append(time.time())
            refs.append(bundle.block_refs)
        # Counted after the clock stopped: nothing is fetched while the stage runs.
        synthetic = [sum(count(BlockAccessor.for_block(b).to_arrow()) for b in ray.get(r)) for r in refs]
        busy = ray.get(ledger.snapshot.remote())["stages"].get(name, {}).get("busy_s")
        summary = Arrivals(start, times, synthetic).summary()
        results.append({"stage": name, **spec, **summary, "busy_s": _round(busy)})
        return [ref for r in refs for ref in r]

    def task(batch_size: int | None) -> dict:
        return {"kind": "task", "batch_size": batch_size, "concurrency": None, "num_cpus": task_cpus}

    def per_source(table: pa.Table) -> int:
        return table.num_rows * config.num_variants  # every source is in an expanded split

    # 1. read: the folders' listing (tasks), as run_generate builds it; the files are read by `read_bytes`.
    source, class_names = read_source(config.data, ray.data, config.ray.task_num_cpus, with_bytes=False)
    refs = timed("read", task(config.data.rows_per_block), source, per_source)
    # 2. The recipe's stages, one at a time, each over the previous one's output.
    count = per_source
    real_dir = work / "alone-write-real"  # write_real's shards
    real_dir.mkdir(parents=True, exist_ok=True)
    for stage in pipeline_stages(config, class_names, config_hash(config), frozenset(), str(real_dir)):
        ds = apply_stages(ray.data.from_arrow_refs(refs), [stage], ledger, task_cpus)
        if stage.is_actor:
            sp = stage.spec
            spec = {
                "kind": "actor",
                "batch_size": sp.batch_size,
                "concurrency": sp.concurrency,
                "num_cpus": sp.num_cpus,
            }
        else:
            spec = task(stage.spec.batch_size if stage.spec else 32)  # as apply_stages batches them
        if stage.name == "expand":
            count = _synthetic_in
        refs = timed(stage.name, spec, ds, count)
    # 3. write: encode + one shard per batch, with run_generate's arguments.
    data_dir = work / "alone-write"
    data_dir.mkdir(parents=True, exist_ok=True)
    ds = write_shards(ray.data.from_arrow_refs(refs), config, str(data_dir))

    def in_shards(manifest: pa.Table) -> int:  # write's output rows name the shards it wrote
        return sum(_synthetic_in_shard(data_dir / name) for name in manifest["shard"].to_pylist())

    timed("write", task(config.output.rows_per_shard), ds, in_shards)
    ray.kill(ledger)
    return results


def _synthetic_in(table: pa.Table) -> int:
    from engine import schema

    if schema.RECIPE not in table.column_names:
        return 0
    return int(pc.sum(pc.not_equal(table[schema.RECIPE], schema.RECIPE_REAL)).as_py() or 0)


def _synthetic_in_shard(path: Path) -> int:
    from engine import schema

    return _synthetic_in(pq.read_table(path, columns=[schema.RECIPE]))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ---------------------------------------------------------------- entry point


def run(settings: OverheadSettings = OverheadSettings(), out_dir: Path | None = RESULTS_DIR) -> dict:
    import ray

    from engine.config import GenerateConfig, load_config
    from engine.tiny.registry import build_tiny_models
    from engine.tiny.toy_dataset import make_toy_dataset

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    models = ROOT / ".cache" / "tiny-models"
    build_tiny_models(models)  # no-op when present
    work = Path(tempfile.mkdtemp(prefix="synthray-bench-"))
    own_ray = not ray.is_initialized()
    load_before = os.getloadavg()
    try:
        configs = {}
        for scale in (1, settings.memory_scale):
            n = settings.num_images * scale
            toy = work / f"toy-{n}"
            make_toy_dataset(
                toy,
                num_classes=settings.num_classes,
                train_per_class=math.ceil(n / settings.num_classes),
                val_per_class=0,
                test_per_class=0,
                size=settings.image_size,
            )
            overrides = settings.overrides(n, toy, work / f"out-{n}", models)
            configs[n] = load_config(GenerateConfig, CONFIG, overrides)
        if own_ray:
            ray.init(
                num_cpus=settings.num_cpus,
                include_dashboard=False,
                log_to_driver=False,  # actors' model-loading progress bars; errors still reach the driver
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
            )
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per dataset otherwise

        store = _object_store_budget()
        end_to_end = {str(k): run_end_to_end(c, settings.sample_interval_s) for k, c in configs.items()}
        alone = run_stages_alone(configs[settings.throughput_images], work)
    finally:
        if own_ray:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    steady = [s for s in alone if s["steady_rows_per_s"]]
    slowest = min(steady, key=lambda s: s["steady_rows_per_s"]) if steady else None
    slowest_wall = min(alone, key=lambda s: s["wall_rows_per_s"])
    e2e = end_to_end[str(settings.throughput_images)]
    data = {
        "benchmark": "engine_overhead",
        "machine": {**machine(), "load_average_before_1_5_15": [round(x, 2) for x in load_before]},
        "versions": versions(),
        "settings": {
            **dataclasses.asdict(settings),
            "config": str(CONFIG.relative_to(ROOT)),
            "overrides": settings.overrides(
                settings.num_images, Path("<toy>"), Path("<out>"), Path(".cache/tiny-models")
            ),
            "throughput_images": settings.throughput_images,
            "throughput_unit": "synthetic rows/s (a source before `expand` counts as K rows)",
        },
        "object_store": store,
        "end_to_end": end_to_end,
        "stages_alone": alone,
        "ratio": {
            "steady": _ratio(e2e["steady_rows_per_s"], slowest and slowest["steady_rows_per_s"]),
            "slowest_stage_steady": slowest and slowest["stage"],
            "wall": _ratio(e2e["wall_rows_per_s"], slowest_wall["wall_rows_per_s"]),
            "slowest_stage_wall": slowest_wall["stage"],
            "goal": 0.9,
        },
    }
    if out_dir is not None:
        write_result("engine_overhead", data, to_markdown(data), out_dir)
    return data


def _object_store_budget() -> dict:
    """The object store's size and the share Ray Data streams within by default (its backpressure budget):
    below that budget reading runs ahead of the slowest stage, so peaks follow the input size until then."""
    import ray
    from ray.data._internal.execution.resource_manager import ResourceManager

    capacity = ray.cluster_resources().get("object_store_memory", 0.0)
    fraction = ray.data.DataContext.get_current().override_object_store_memory_limit_fraction
    fraction = fraction or ResourceManager.DEFAULT_OBJECT_STORE_MEMORY_LIMIT_FRACTION
    return {"capacity_mib": round(capacity / MIB), "ray_data_budget_mib": round(capacity * fraction / MIB)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# ---------------------------------------------------------------- output

THROUGHPUT_HEADERS = [
    "stage",
    "resources",
    "batch",
    "first output s",
    "steady rows/s",
    "wall rows/s",
    "busy s alone",
    "busy s in pipeline",
]
MEMORY_HEADERS = [
    "input images",
    "synthetic rows",
    "wall s",
    "peak driver RSS MiB",
    "driver RSS growth MiB",
    "peak object store MiB",
    "shards written MiB",
]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _throughput_rows(data: dict) -> list[list[str]]:
    e2e = data["end_to_end"][str(data["settings"]["throughput_images"])]
    rows = []
    for s in data["stages_alone"]:
        resources = f"tasks x {s['num_cpus']:g} CPU"
        if s["kind"] == "actor":
            resources = f"{s['concurrency']} actor x {s['num_cpus']:g} CPU"
        rows.append(
            [
                s["stage"],
                resources,
                str(s["batch_size"] or "-"),
                _fmt(s["first_output_s"]),
                _fmt(s["steady_rows_per_s"]),
                _fmt(s["wall_rows_per_s"]),
                _fmt(s["busy_s"], 2),
                _fmt(e2e["busy_s"].get(s["stage"]), 2),
            ]
        )
    rows.append(
        [
            "whole pipeline",
            "all of the above",
            "-",
            _fmt(e2e["first_output_s"]),
            _fmt(e2e["steady_rows_per_s"]),
            _fmt(e2e["wall_rows_per_s"]),
            "-",
            _fmt(sum(e2e["busy_s"].values()), 2),
        ]
    )
    return rows


def _memory_rows(data: dict) -> list[list[str]]:
    rows = []
    for n, e in data["end_to_end"].items():
        m = e["memory"]
        rows.append(
            [
                n,
                str(e["synthetic_rows"]),
                _fmt(e["wall_s"]),
                f"{m['peak_driver_rss_mib']:.0f}",
                f"{m['driver_rss_growth_mib']:.0f}",
                f"{m['peak_object_store_mib']:.1f} ({m['object_store_before_mib']:.1f} at start)",
                f"{e['shards_mib']:.1f}",
            ]
        )
    return rows


def _ratio_line(data: dict) -> str:
    r = data["ratio"]
    steady = "not timed (every output window under MIN_STEADY_WINDOW_S: use more images)"
    if r["steady"] is not None:
        steady = f"{r['steady']} (slowest: {r['slowest_stage_steady']})"
    return (
        f"end-to-end / slowest stage alone: steady {steady}, goal >= {r['goal']}; "
        f"wall, start-up included: {r['wall']} (slowest: {r['slowest_stage_wall']})"
    )


def _settings_line(data: dict) -> str:
    s, m = data["settings"], data["machine"]
    return (
        f"Throughput on M = {s['throughput_images']} images, memory on N and M; "
        f"N = {s['num_images']} toy images of {s['image_size']} px, K = {s['num_variants']}, background "
        f"{s['background_size']} px / {s['background_steps']} steps, {s['num_cpus']} logical CPUs for Ray; "
        f"{m['cpu']}, {m['logical_cpus']} CPUs, load average before {m['load_average_before_1_5_15']}, "
        f"after {m['load_average_1_5_15']}. Object store {data['object_store']['capacity_mib']} MiB, of which "
        f"Ray Data streams within {data['object_store']['ray_data_budget_mib']} MiB by default."
    )


def to_markdown(data: dict) -> str:
    return (
        markdown_table(THROUGHPUT_HEADERS, _throughput_rows(data))
        + f"\n{_ratio_line(data)}\n\n"
        + markdown_table(MEMORY_HEADERS, _memory_rows(data))
        + f"\n{_settings_line(data)}\n"
    )


def print_tables(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    table = Table(
        title="Engine overhead: synthetic rows/s, each stage alone and the whole pipeline (M images)"
    )
    for header in THROUGHPUT_HEADERS:
        table.add_column(header, justify="left" if header in ("stage", "resources") else "right")
    for row in _throughput_rows(data):
        table.add_row(*row)
    console.print(table)
    console.print(_ratio_line(data))
    memory = Table(title="Peak memory, end to end (streaming: flat in N)")
    for header in MEMORY_HEADERS:
        memory.add_column(header, justify="right")
    for row in _memory_rows(data):
        memory.add_row(*row)
    console.print(memory)
    console.print(_settings_line(data))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_overhead", description=__doc__.split("\n")[0]
    )
    defaults = OverheadSettings()
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="N source images")
    parser.add_argument(
        "--memory-scale", type=int, default=defaults.memory_scale, help="second run: this x N"
    )
    parser.add_argument("--background-size", type=int, default=defaults.background_size, help="px")
    parser.add_argument("--background-steps", type=int, default=defaults.background_steps)
    parser.add_argument(
        "--num-cpus", type=int, default=defaults.num_cpus, help="logical CPUs of the local Ray"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that it runs, no meaningful numbers"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="Where the .json/.md go")
    args = parser.parse_args(argv)
    settings = (
        SMOKE
        if args.smoke
        else dataclasses.replace(
            defaults,
            num_images=args.num_images,
            memory_scale=args.memory_scale,
            background_size=args.background_size,
            background_steps=args.background_steps,
            num_cpus=args.num_cpus,
        )
    )
    print(f"engine overhead: {settings}")
    data = run(settings, args.out_dir)
    print_tables(data)
    print(f"results: {args.out_dir / 'engine_overhead.json'}, {args.out_dir / 'engine_overhead.md'}")
    return data


if __name__ == "__main__":
    main()
