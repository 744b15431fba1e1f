"""Scale: does the engine's cost per row stay flat from 10^4 to 10^6 sources, and does resume stay cheap?

    python -m benchmarks.scale                                  # N = 10^4, 10^5, 10^6 at K = 10 (make bench-scale)
    python -m benchmarks.scale --sizes 10000 100000 --num-variants 10 --num-cpus 2
    python -m benchmarks.scale --format parquet --sizes 10000 100000 --num-variants 10 --num-cpus 2
    python -m benchmarks.scale --sizes 1000000 --num-variants 1 --num-cpus 2 --full-only  # memory only

A synthetic source of N tiny images (8x8 PNG) written once under .cache/scale/: an image folder
(`train/c<k>/<i>.png`, about 1000 per class folder) or, with `--format parquet`, Hugging Face style Parquet
(`data/train-<k>-of-<n>.parquet` of 10,000 rows in row groups of 1000, an Image struct {bytes, path} and a
ClassLabel in the `huggingface` schema metadata, as `datasets` writes them). It goes through the generation job with no model: read -> skip_done ->
read_bytes -> decode -> expand x K -> write_real -> a pass-through step -> write, the engine's own
`run_generate` in a subprocess per run. The pass-through recipe is registered in that subprocess only (`RECIPES` is a dict),
never in the shipped recipes. Per size: a full run (wall, rows/s, the driver's peak RSS, the object
store's peak use), then a second output killed (SIGKILL of the job's process group) once half of its rows
are in shards, and resumed: the resumed output must hold every expected id exactly once (and the same ids as
the full run); resume's extra cost is its wall time minus the full run's time for the rows it had left.
Each run also samples the driver's RSS every second (`driver_rss_mib_over_time` in the JSON: where it grows).
Results: benchmarks/results/scale.{json,md} (parquet: scale-parquet.{json,md}; `--full-only`:
scale-k<K>-full-only.{json,md}), with the command, the machine and its load (`os.getloadavg`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PASS_THROUGH = "scale_pass_through"
IMAGES_PER_CLASS = 1000  # ImageNet has about 1300 per class folder


# ---------------------------------------------------------------- the source and the recipe


def tiny_png() -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.full((8, 8, 3), 120, np.uint8))
    assert ok
    return data.tobytes()


def make_source(num_sources: int, cache: Path = ROOT / ".cache" / "scale") -> Path:
    """`train/c<k>/<i>.png`, IMAGES_PER_CLASS a folder; written once (a marker file says it is whole)."""
    root = cache / f"n{num_sources}"
    if (root / "complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    png = tiny_png()
    for i in range(num_sources):
        folder = root / "train" / f"c{i // IMAGES_PER_CLASS:04d}"
        if i % IMAGES_PER_CLASS == 0:
            folder.mkdir(parents=True)
        (folder / f"{i:07d}.png").write_bytes(png)
    (root / "complete").write_text(str(num_sources))
    return root


PARQUET_ROWS_PER_FILE = 10_000
PARQUET_ROW_GROUP = 1000


def make_parquet_source(num_sources: int, cache: Path = ROOT / ".cache" / "scale") -> Path:
    """`data/train-<k>-of-<n>.parquet` as `datasets` writes an image dataset; written once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = cache / f"parquet-n{num_sources}"
    if (root / "complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    png = tiny_png()
    num_classes = -(-num_sources // IMAGES_PER_CLASS)
    features = {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": [f"c{k:04d}" for k in range(num_classes)]},
    }
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    num_files = -(-num_sources // PARQUET_ROWS_PER_FILE)
    for k in range(num_files):
        ids = range(k * PARQUET_ROWS_PER_FILE, min(num_sources, (k + 1) * PARQUET_ROWS_PER_FILE))
        table = pa.table(
            {
                "image": pa.array(
                    [{"bytes": png, "path": f"c{i // IMAGES_PER_CLASS:04d}/{i:07d}.png"} for i in ids],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
                "label": pa.array([i // IMAGES_PER_CLASS for i in ids], pa.int64()),
            }
        ).replace_schema_metadata(metadata)
        name = f"train-{k:05d}-of-{num_files:05d}.parquet"
        pq.write_table(table, root / "data" / name, row_group_size=PARQUET_ROW_GROUP)
    (root / "complete").write_text(str(num_sources))
    return root


def pass_through(batch):
    """The recipe's model step, doing nothing: what remains is the engine's own cost per row."""
    return batch


def pass_through_stages(config, class_names, config_hash, done_ids, *_):
    """The recipe opening (skip_done -> read_bytes -> decode) -> expand -> pass-through (the pipeline adds
    write_real after expand)."""
    from engine import schema
    from engine.recipes.opening import opening_stages
    from engine.stages.expand import Expansion, expand_variants
    from engine.stages.loop import Stage

    expansion = Expansion(
        recipe=config.recipe,
        num_variants=config.num_variants,
        base_seed=config.seed,
        config_hash=config_hash,
        include_real=config.output.include_real,
        expand_splits=None,
    )
    return [
        *opening_stages(config, expansion, done_ids),
        Stage(
            "expand",
            expand_variants,
            kwargs={"expansion": expansion, "done_ids": done_ids},
            reads=(schema.SOURCE_ID, schema.SPLIT),
        ),
        Stage("pass_through", pass_through, reads=(schema.IMAGE,), only_synthetic=True),
    ]


def make_config(source: Path, out: Path, args) -> dict:
    data = {
        "format": args.format,
        "path": str(source),
        "splits": ["train"],
        "rows_per_block": args.rows_per_block,
    }
    return {
        "recipe": PASS_THROUGH,
        "num_variants": args.num_variants,
        "data": data,
        "output": {"path": str(out), "gallery_classes": 0, "rows_per_shard": args.rows_per_shard},
        "ray": {"num_cpus": args.num_cpus, "progress_bars": False},
    }


# ---------------------------------------------------------------- one run (in its own process)


def object_store_used_mib() -> float:
    """MiB in the object stores now (what `ray memory --stats-only` reports)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    # This driver's cluster by address: other local Rays may run on the same machine.
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return reply.store_stats.object_store_bytes_used / 2**20


def child(config_json: str, result_path: str) -> int:
    """Runs `run_generate` with the pass-through recipe; writes its measurements as JSON."""
    import psutil
    import ray

    from engine import recipes
    from engine.config import GenerateConfig
    from engine.pipeline import init_ray, run_generate

    recipes.RECIPES[PASS_THROUGH] = recipes.Recipe(pass_through_stages)  # this process only
    config = GenerateConfig.model_validate(json.loads(config_json))
    start = time.perf_counter()
    for attempt in range(3):  # a busy machine's raylet may miss Ray's fixed 30 s start window
        try:
            init_ray(config)
            break
        except Exception as err:  # noqa: BLE001 - retried, then raised
            if attempt == 2 or "timed out during startup" not in str(err):
                raise
            ray.shutdown()
    ray_start_s = time.perf_counter() - start
    peak_store = [0.0]
    rss: list[tuple[float, float]] = []  # (seconds into the run, the driver's RSS MiB): where it grows
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not stop.wait(1.0):
            peak_store[0] = max(peak_store[0], object_store_used_mib())
            rss.append((time.perf_counter() - start, me.memory_info().rss / 2**20))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = run_generate(config).data
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    rows = report["rows"]
    result = {
        "wall_s": round(wall, 2),
        "ray_start_s": round(ray_start_s, 2),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "object_store_peak_mib": round(peak_store[0], 1),
        "driver_rss_mib_over_time": [[round(t), round(m)] for t, m in rss[:: max(1, len(rss) // 40)]],
        "rows_written_this_run": rows["written_this_run"],
        "sources_already_done": rows["sources_already_done"],
        "duplicate_ids": rows["duplicate_ids"],
        "skip_done_busy_s": report["stages"].get("skip_done", {}).get("busy_s"),
        "files_read": report["stages"].get("read_bytes", {}).get("rows_in", 0),
    }
    Path(result_path).write_text(json.dumps(result))
    ray.shutdown()
    return 0


def run_child(config: dict, work: Path, kill_at_rows: int | None = None) -> dict:
    """The job in a subprocess (its own process group); killed once `kill_at_rows` rows are in shards."""
    result = work / f"result-{time.time_ns()}.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(config), str(result)]
    log = (work / "child.log").open("ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    data_dir = Path(config["output"]["path"]) / "data"
    counted: dict[str, int] = {}
    while proc.poll() is None:
        time.sleep(0.5)
        if kill_at_rows is not None and rows_in_shards(data_dir, counted) >= kill_at_rows:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(2)  # the local Ray's processes go with their group
            return {"killed_at_rows": rows_in_shards(data_dir, counted)}
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}); see {work / 'child.log'}")
    if kill_at_rows is not None:
        raise RuntimeError("the run finished before it could be killed")
    return json.loads(result.read_text())


def rows_in_shards(data_dir: Path, counted: dict[str, int]) -> int:
    """Rows in the complete shards (footers only; each file read once)."""
    import pyarrow.parquet as pq

    if data_dir.exists():
        for path in data_dir.glob("part-*.parquet"):
            if path.name not in counted:
                try:
                    counted[path.name] = pq.read_metadata(path).num_rows
                except OSError:
                    pass
    return sum(counted.values())


def sorted_ids(data_dir: Path) -> np.ndarray:
    from engine.output.written_ids import _sorted_ids

    return _sorted_ids(str(data_dir))[0]


def first_new_row_s(out: Path) -> float:
    """Seconds from the run's start to the end of its first decode batch (run.json)."""
    return json.loads((out / "run.json").read_text())["stages"]["decode"]["first_batch_s"]


def check_resumed(resumed: Path, full: Path, expected_rows: int) -> dict:
    """Every expected id exactly once in the resumed output, and the same ids as the uninterrupted run."""
    ids = sorted_ids(resumed / "data")
    duplicates = int((ids[1:] == ids[:-1]).sum())
    same = bool(np.array_equal(ids, sorted_ids(full / "data")))
    return {
        "rows": len(ids),
        "expected_rows": expected_rows,
        "duplicate_ids": duplicates,
        "same_ids_as_full_run": same,
        "exactly_once": len(ids) == expected_rows and duplicates == 0 and same,
    }


# ---------------------------------------------------------------- the grid


def measure(num_sources: int, args, work: Path) -> dict:
    source = make_parquet_source(num_sources) if args.format == "parquet" else make_source(num_sources)
    expected = num_sources * (args.num_variants + 1)
    name = f"{args.format}-{num_sources}"
    full_out, resumed_out = work / f"full-{name}", work / f"resumed-{name}"
    for out in (full_out, resumed_out):
        shutil.rmtree(out, ignore_errors=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    full = run_child(make_config(source, full_out, args), work)
    result = {
        "sources": num_sources,
        "num_variants": args.num_variants,
        "rows": expected,
        "full": {**full, "rows_per_s": round(expected / full["wall_s"], 1)},
        "load_avg_before": load_before,
    }
    if args.full_only:  # the driver's memory over time, without the 2 more runs of kill and resume
        return {**result, "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    killed = run_child(make_config(source, resumed_out, args), work, kill_at_rows=expected // 2)
    resumed = run_child(make_config(source, resumed_out, args), work)
    check = check_resumed(resumed_out, full_out, expected)
    left = expected - killed["killed_at_rows"]
    skip_s = first_new_row_s(resumed_out) - first_new_row_s(full_out)
    # What resume adds: its wall time less the full run's time for the rows it still had to make.
    extra = resumed["wall_s"] - full["wall_s"] * left / expected
    return {
        **result,
        "killed_at_rows": killed["killed_at_rows"],
        "resume": {**resumed, "exactly_once": check},
        "resume_extra_s": round(extra, 2),
        "resume_extra_fraction_of_full": round(extra / full["wall_s"], 3),
        # Less exposed to the load changing between runs: how much later the resumed run decoded its first
        # new source than the full run did (its start-up plus skipping the done sources).
        "resume_skip_phase_s": round(skip_s, 2),
        "resume_skip_phase_fraction_of_full": round(skip_s / full["wall_s"], 3),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def write_results(results: list[dict], args, command: str, notes: tuple[str, ...] = ()) -> None:
    data = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "settings": {
            "num_variants": args.num_variants,
            "rows_per_block": args.rows_per_block,
            "rows_per_shard": args.rows_per_shard,
            "ray_num_cpus": args.num_cpus,
            "format": args.format,
            "images_per_class": IMAGES_PER_CLASS,
        },
        "results": results,
        "notes": list(notes),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "scale" if args.format == "image_folder" else f"scale-{args.format}"
    if args.full_only:  # beside, not over, the table with resumes
        stem += f"-k{args.num_variants}-full-only"
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    source = (
        f"Synthetic image folder (8x8 PNGs, {IMAGES_PER_CLASS} per class folder)"
        if args.format == "image_folder"
        else f"Synthetic Hugging Face Parquet (8x8 PNGs in Image structs, {PARQUET_ROWS_PER_FILE:,} rows a file, "
        f"row groups of {PARQUET_ROW_GROUP}, {IMAGES_PER_CLASS} per class)"
    )
    lines = [
        "# Scale: the engine without models, 10^4 to 10^6 sources",
        "",
        f"`{command}` on {data['machine']}. {source}, K = {args.num_variants}, rows_per_block {args.rows_per_block}, rows_per_shard "
        f"{args.rows_per_shard}, a local Ray of {args.num_cpus} CPUs. Wall time excludes Ray's start. Resume: "
        "a second output killed (SIGKILL) once half its rows were in shards, then rerun; its extra cost is its "
        "wall time less the full run's time for the rows it had left; its skip phase is how much later than the "
        "full run it decoded its first new source (start-up plus skipping the done sources), less exposed to "
        "the load changing between runs. Load: 1-minute load average before/after.",
        "",
        "| sources | rows | wall s | rows/s | driver peak RSS MiB | object store peak MiB | killed at rows "
        "| resume wall s | resume extra (of full) | resume skip phase (of full) | exactly once "
        "| load before/after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in results:
        f, res = r["full"], r.get("resume")
        resume_cells = (
            "- | - | - | - | -"  # --full-only
            if res is None
            else f"{r['killed_at_rows']:,} | {res['wall_s']} | "
            f"{r['resume_extra_s']} s ({r['resume_extra_fraction_of_full']:.1%}) | "
            f"{r['resume_skip_phase_s']} s ({r['resume_skip_phase_fraction_of_full']:.1%}) | "
            f"{'yes' if res['exactly_once']['exactly_once'] else 'NO'}"
        )
        lines.append(
            f"| {r['sources']:,} | {r['rows']:,} | {f['wall_s']} | {f['rows_per_s']:,} | "
            f"{f['driver_peak_rss_mib']} | {f['object_store_peak_mib']} | {resume_cells} | "
            f"{r['load_avg_before'][0]} / {r['load_avg_after'][0]} |"
        )
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--format", choices=["image_folder", "parquet"], default="image_folder")
    parser.add_argument("--num-variants", type=int, default=10, help="K")
    parser.add_argument("--rows-per-block", type=int, default=256)
    # All stages here are tasks, fused into one Ray Data operator whose tasks take the largest batch size
    # among them (engine.stages.loop): a larger rows_per_shard would make each task take that many sources.
    parser.add_argument("--rows-per-shard", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="the local Ray's CPUs")
    parser.add_argument(
        "--full-only", action="store_true", help="only the full run per size (no kill and resume)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "scale" / "work")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.scale " + " ".join(argv)
    results = []
    for n in args.sizes:
        results.append(measure(n, args, args.work))
        print(json.dumps(results[-1], indent=2), flush=True)
        write_results(results, args, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
