"""Exactly-once output: a run killed halfway resumes the rest; the finished run re-run writes nothing.

The generation job runs as a subprocess (`python -m jobs.generate`), as a user or `ray job submit` would.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.tiny.toy_dataset import make_toy_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, num_classes=4, train_per_class=12, val_per_class=1, test_per_class=1, size=48)
    return out


def generate_cmd(toy: Path, tiny: Path, out: Path, *extra: str) -> list[str]:
    sets = [
        f"data.path={toy}",
        f"data.masks_path={toy / 'masks'}",
        "data.splits=[train]",
        f"output.path={out}",
        "output.overwrite=false",
        "output.rows_per_shard=4",
        "data.rows_per_block=4",
        "output.gallery_classes=0",
        "ray.progress_bars=false",
        "ray.num_cpus=2",
        f"segment.detector.id={tiny / 'grounding-dino'}",
        f"segment.sam.id={tiny / 'sam'}",
        f"prompt.model.id={tiny / 'llm'}",
        f"background.model.id={tiny / 'sdxl'}",
        "background.stage.batch_size=2",
        "prompt.stage.batch_size=4",
        *extra,
    ]
    return [sys.executable, "-m", "jobs.generate", *[a for s in sets for a in ("--set", s)]]


def env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def ids_in(out: Path) -> list[str]:
    return pq.read_table(out / "data", columns=[schema.ID]).column(schema.ID).to_pylist()


def wait_until_stable(data: Path, quiet_s: float = 4.0) -> int:
    """Shards a killed run's last workers were already writing may still land; wait until none do."""
    count, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        now = len(list(data.glob("part-*.parquet")))
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.2)
    return count


def synthetic_rows_in(data: Path) -> int:
    """Synthetic rows in the shards (every visible shard is complete: they are renamed into place)."""
    recipes = [pq.read_table(p, columns=[schema.RECIPE]).column(0).to_pylist() for p in data.glob("part-*")]
    return sum(r != schema.RECIPE_REAL for shard in recipes for r in shard)


def test_killed_run_resumes_exactly_once_and_a_finished_run_writes_nothing(toy, tiny_models_dir, tmp_path):
    """At the default block size (16 sources a block), synthetic shards land while the run goes, so a kill
    mid-run keeps them, and the resumed run generates exactly the rows that are missing; run once more, it
    writes nothing; with another config, it is refused."""
    num_synthetic = 48 * 2
    # Slow the background stage a little so the kill lands mid-run; shards of one block's synthetic rows.
    slow = ("background.height=96", "background.width=96", "background.num_inference_steps=12")
    sizes = ("data.rows_per_block=16", "output.rows_per_shard=32")
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        generate_cmd(toy, tiny_models_dir, out, *slow, *sizes),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the local Ray with it
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        # Real rows are written first (they need no model): wait for a third of the synthetic ones.
        if synthetic_rows_in(out / "data") >= num_synthetic // 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until_stable(out / "data")
    kept = synthetic_rows_in(out / "data")
    assert 0 < kept < num_synthetic

    # Resumed with other scheduling settings (batch sizes, block and shard sizes): the same rows.
    other = ("data.rows_per_block=8", "output.rows_per_shard=16", "background.stage.batch_size=4")
    result = subprocess.run(
        generate_cmd(toy, tiny_models_dir, out, *slow, *other),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = run_json(out)
    ids = ids_in(out)
    assert len(ids) == len(set(ids)) == 48 * 3, "every expected row exactly once"
    assert resumed["rows"]["duplicate_ids"] == 0
    assert resumed["rows"]["synthetic_written"] == num_synthetic
    assert not list((out / "data").glob(".tmp-*"))
    print(f"killed with {kept}/{num_synthetic} synthetic rows written")
    assert resumed["rows"]["synthetic_generated_this_run"] == num_synthetic - kept
    # Only the sources still owed rows had their files read (skip_done runs before read_bytes).
    rows = resumed["rows"]
    assert rows["sources_already_done"] > 0
    assert resumed["stages"]["read_bytes"]["rows_in"] == rows["sources_in"] - rows["sources_already_done"]

    # The finished run again, with scheduling and I/O settings changed too (they may change between a run
    # and its resumption): the same ids, nothing to do. (One rerun for both: each costs a job's start-up.)
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    knobs = (
        "data.rows_per_block=3",
        "output.rows_per_shard=5",
        "prompt.stage.batch_size=2",
        "ray.num_cpus=3",
    )
    subprocess.run(
        generate_cmd(toy, tiny_models_dir, out, *slow, *other, *knobs),
        cwd=ROOT,
        env=env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    again = run_json(out)["rows"]
    assert again["written_this_run"] == 0 and again["sources_already_done"] == 48
    assert again["synthetic_generated_this_run"] == 0 and again["synthetic_per_s"] == 0
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == shards

    # Another config over the same output is refused, naming the way out and what changed.
    result = subprocess.run(
        generate_cmd(toy, tiny_models_dir, out, *slow, *other, "seed=1"),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "output.overwrite=true" in result.stderr
    assert "seed: 0 -> 1" in result.stderr
