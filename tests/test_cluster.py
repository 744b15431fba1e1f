"""Ray clusters: a multi-node run writes the rows a single-node run writes, and a job submitted through the
Jobs API to a `ray start` head runs the generation recipe from an uploaded working directory.

Every cluster here is private to its test: its own temp dir (RAY_TMPDIR, so no other `ray.init()` on the
machine finds it), loopback addresses only, and it is shut down before the test ends. One cluster at a time.
The tests whose driver is in this process run in a fresh interpreter each (`own_process`, tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config
from engine.tiny.toy_dataset import make_toy_dataset
from tests.conftest import ROOT, demo_overrides

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
# Columns that say what a row is; images are compared decoded (see below).
ROW_KEY = [
    schema.ID,
    schema.SOURCE_ID,
    schema.RECIPE,
    schema.LABEL,
    schema.SPLIT,
    schema.PROMPT,
    schema.PARAMS,
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    make_toy_dataset(out, num_classes=2, train_per_class=3, val_per_class=1, test_per_class=1, size=32)
    return out


@pytest.fixture
def ray_tmp(monkeypatch):
    """A private, short Ray temp dir (Unix socket paths are limited to about 100 characters), and every
    Ray address on 127.0.0.1: on Linux Ray otherwise advertises the machine's address, even when told
    127.0.0.1; its single-machine mode (the flag below, read by this process and inherited by the nodes'
    processes) keeps to loopback."""
    from ray._private import ray_constants

    path = tempfile.mkdtemp(prefix="sr-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pool_actors(ray) -> list[tuple[str, str, str]]:
    """(stage, node id, state) of every actor-pool worker the GCS actor table knows, dead ones included (no
    dashboard needed). Ray Data names them `MapWorker(MapBatches(<stage>))`."""
    return [
        (info["ActorClassName"].split("(")[-1].rstrip(")"), info["Address"]["NodeID"], info["State"])
        for info in ray._private.state.actors().values()
        if info["ActorClassName"].startswith("MapWorker(")
    ]


def background_actors(ray) -> list[tuple[str, str]]:
    return [(node, state) for stage, node, state in pool_actors(ray) if stage == "background"]


def read_rows(data_dir: Path) -> list[dict]:
    rows = pq.read_table(data_dir).to_pylist()
    return sorted(rows, key=lambda r: r[schema.ID])


def pixels(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


@pytest.mark.own_process(timeout=420)
def test_multi_node_run_writes_the_single_node_rows(toy, tiny_models_dir, tmp_path, ray_tmp):
    import ray
    from ray.cluster_utils import Cluster

    from engine.pipeline import run_generate

    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base = demo_overrides(toy, tiny_models_dir, tmp_path / "single")
    ray.shutdown()

    # 1. The reference: one node.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        single = run_generate(load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", base))
    finally:
        ray.shutdown()

    # 2. A head (driver + CPU tasks) and two workers, each with a custom resource that the stages ask for:
    #    segment and prompt actors can only run on worker A, background and composite only on worker B.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        node_a = cluster.add_node(num_cpus=1, resources={"node_a": 2})
        node_b = cluster.add_node(num_cpus=1, resources={"node_b": 2})
        ray.init(address=cluster.address, runtime_env={"env_vars": env})
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 3 and {n["NodeManagerAddress"] for n in alive} == {LOOPBACK}
        pinned = [
            *demo_overrides(toy, tiny_models_dir, tmp_path / "multi"),
            "segment.stage.resources={node_a: 1}",
            "prompt.stage.resources={node_a: 1}",
            "background.stage.resources={node_b: 1}",
            "composite.stage.resources={node_b: 1}",
        ]
        multi = run_generate(load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", pinned))
        placed = [(stage, node) for stage, node, _ in pool_actors(ray)]
    finally:
        ray.shutdown()
        cluster.shutdown()

    # 3. The actor pools ran where their resources are: two nodes besides the driver's. (With the
    #    dataset's masks, the demo config's default, there is no segment pool.)
    expected = {"prompt": node_a.node_id, "background": node_b.node_id, "composite": node_b.node_id}
    assert {stage for stage, _ in placed} == set(expected), placed
    for stage, node_id in placed:
        assert node_id == expected[stage], (stage, placed)

    # 4. The same rows, row for row: ids, provenance, prompts, parameters, and the same images.
    assert multi.data["rows"] == {
        **single.data["rows"],
        "synthetic_per_s": multi.data["rows"]["synthetic_per_s"],
    }
    assert multi.data["errors"]["total"] == single.data["errors"]["total"] == 0
    one, many = read_rows(tmp_path / "single" / "data"), read_rows(tmp_path / "multi" / "data")
    assert len(one) == len(many) == 2 * 5 + 2 * 3 * 2
    assert [[r[k] for k in ROW_KEY] for r in one] == [[r[k] for k in ROW_KEY] for r in many]
    for a, b in zip(one, many, strict=True):
        # Row-seeded noise makes a row's image independent of batching and placement; allow +-1 for the
        # last bit of batched float math on another process.
        assert abs(pixels(a[schema.IMAGE]) - pixels(b[schema.IMAGE])).max() <= 1, a[schema.ID]


@pytest.mark.own_process(timeout=420)
def test_removed_worker_node_loses_and_duplicates_nothing(tiny_models_dir, tmp_path, ray_tmp, monkeypatch):
    """A worker node running the background pool is killed (no graceful drain) after two of its batches;
    the pool carries on on the other node with the `gen` resource and the output holds every expected row
    exactly once."""
    import itertools
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from engine import pipeline
    from engine.run.ledger import start_ledger

    # Each attempt's ledger under a name, so the test can watch the first attempt's background pool.
    attempt = itertools.count(1)
    monkeypatch.setattr(pipeline, "start_ledger", lambda: start_ledger(name=f"test-ledger-{next(attempt)}"))

    def background_batches_done() -> int:
        try:
            snapshot = ray.get(ray.get_actor("test-ledger-1").snapshot.remote())
        except ValueError:  # not started yet
            return 0
        return int(snapshot["stages"].get("background", {}).get("batches", 0))

    toy = tmp_path / "toy"
    make_toy_dataset(toy, num_classes=2, train_per_class=6, val_per_class=1, test_per_class=1, size=32)
    out = tmp_path / "out"
    config = load_config(
        GenerateConfig,
        ROOT / "configs" / "aga_tiny_cpu.yaml",
        [
            *demo_overrides(toy, tiny_models_dir, out),
            # Slow enough that most batches are still to come at the removal.
            "background.height=64",
            "background.width=64",
            "background.num_inference_steps=12",
            "background.stage.batch_size=2",
            "background.stage.resources={gen: 1}",
            "background.stage.max_restarts=2",
            "background.stage.max_task_retries=3",
            "prompt.stage.resources={stable: 1}",
            "composite.stage.resources={stable: 1}",
            "output.rows_per_shard=4",
        ],
    )
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"stable": 2}, "include_dashboard": False},
    )
    finished = threading.Event()
    removed: dict = {}

    def remove_the_background_node() -> None:
        """Waits for two background batches, then kills the node of the live background actor."""
        deadline = time.monotonic() + 240
        while not finished.is_set() and time.monotonic() < deadline:
            alive = [node for node, state in background_actors(ray) if state == "ALIVE"]
            if alive and background_batches_done() >= 2:
                node = next(n for n in workers if n.node_id == alive[0])
                cluster.remove_node(node, allow_graceful=False)
                removed.update(node_id=node.node_id, while_running=not finished.is_set())
                return
            time.sleep(0.05)

    try:
        workers = [cluster.add_node(num_cpus=1, resources={"gen": 1}) for _ in range(2)]
        ray.init(
            address=cluster.address,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
        )
        watcher = threading.Thread(target=remove_the_background_node, daemon=True)
        watcher.start()
        try:
            report = pipeline.run_generate(config)
        finally:
            finished.set()
            watcher.join(timeout=30)
        # Where the background actors are now (an actor's entry moves with its restarts).
        placed = background_actors(ray)
    finally:
        ray.shutdown()
        cluster.shutdown()

    # 1. The node went away mid-run, with the live background actor on it, and the pool finished on the
    #    other `gen` node: by Ray's task retries alone, or (when they run out before Ray notices the node
    #    is gone, the usual case here) by a second attempt of the run that resumes from the shards.
    assert removed.get("while_running"), f"the run finished before a node was removed: {removed}"
    assert all(node != removed["node_id"] for node, _ in placed), placed
    assert all(a.startswith("stage background:") for a in report.data["failed_attempts"]), report.data

    # 2. Every expected row exactly once: 16 real rows (all splits) + 12 train images x 2 variants.
    rows = read_rows(out / "data")
    ids = [r[schema.ID] for r in rows]
    assert len(ids) == len(set(ids)) == 16 + 12 * 2, len(ids)
    synthetic = [r for r in rows if r[schema.RECIPE] != schema.RECIPE_REAL]
    per_source = {source: 0 for source in {r[schema.SOURCE_ID] for r in rows if r[schema.SPLIT] == "train"}}
    for r in synthetic:
        per_source[r[schema.SOURCE_ID]] += 1
    assert sorted(set(per_source.values())) == [2], per_source
    assert report.data["errors"]["total"] == 0
    assert report.data["rows"]["written_this_run"] == len(rows)


# --------------------------------------------------------------------------- Ray Jobs


def start_head(temp_dir: str) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on loopback; returns the process (a group leader) and the dashboard URL."""
    dashboard_port = free_port()
    env = {
        **os.environ,
        "RAY_TMPDIR": temp_dir,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # The job's `python` is this environment's interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    ray_cli = Path(sys.executable).parent / "ray"
    command = [
        str(ray_cli),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={free_port()}",
        f"--dashboard-host={LOOPBACK}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(Path(temp_dir) / "head.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, f"http://{LOOPBACK}:{dashboard_port}"


def stop_head(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops the node's processes; then clear the group it leads."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group of the head we started, nothing else
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def submit(
    address: str, submission_id: str, entrypoint: list[str], env_vars: dict
) -> subprocess.CompletedProcess:
    """The README's command, `ray job submit --working-dir . ...`, run from the repository root."""
    command = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--submission-id={submission_id}",
        "--working-dir=.",
        f"--runtime-env-json={json.dumps({'env_vars': env_vars})}",
        "--no-wait",
        "--",
        *entrypoint,
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(420)
def test_generate_job_submitted_to_a_local_cluster(toy, tiny_models_dir, tmp_path, ray_tmp):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "out"
    entrypoint = [
        "python",
        "-m",
        "jobs.generate",
        "--config",
        "configs/aga_tiny_cpu.yaml",
        *[f"--set={item}" for item in demo_overrides(toy, tiny_models_dir, out)],
    ]
    head, address = start_head(ray_tmp)
    try:
        # 1. Submit (retrying while the head's job agent starts), through the CLI the README shows.
        submission_id = f"synthray-test-{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + 90
        while True:
            result = submit(address, submission_id, entrypoint, {"SYNTHRAY_SUBMITTED": "1"})
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            assert head.poll() is None, (Path(ray_tmp) / "head.log").read_text()
            time.sleep(2)
        assert result.returncode == 0, result.stdout + result.stderr

        # 2. Wait on the Jobs API for a terminal status.
        client = JobSubmissionClient(address)
        terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        deadline = time.monotonic() + 240
        while (status := client.get_job_status(submission_id)) not in terminal:
            assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-5000:]
            time.sleep(2)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, logs[-5000:]
        info = client.get_job_info(submission_id)
        assert info.runtime_env["working_dir"].startswith("gcs://"), info.runtime_env
    finally:
        stop_head(head)

    # 3. The job wrote the shards and the run report where the config said.
    run = json.loads((out / "run.json").read_text())
    rows = read_rows(out / "data")
    assert len(rows) == run["rows"]["real_written"] + run["rows"]["synthetic_written"] == 2 * 5 + 2 * 3 * 2
    assert run["errors"]["total"] == 0 and "synthray aga" in logs
