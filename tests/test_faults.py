"""Lost actors: a dead actor's batch is retried on a restarted actor (no row lost or duplicated); when
restarts run out the run fails with the stage's name instead of hanging."""

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import StageSpec
from engine.run.failures import RunFailed
from engine.run.ledger import start_ledger
from engine.stages.batch import unpack
from engine.stages.loop import Stage, apply_stages
from tests.conftest import ROOT, demo_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_of_its_own():
    import ray

    # Workers import this module to rebuild DiesOnBatch. 3 logical CPUs: the exhausted-restarts test leaves its
    # doomed pool (0.5 CPU, restarting) in this Ray, and a run's read is a folder-listing task plus the tasks
    # that consume it, so 2 CPUs left the next run's listing task waiting forever.
    tests_dir = str(Path(__file__).parent)
    ray.init(num_cpus=3, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield
    ray.shutdown()


class DiesOnBatch:
    """Exits its process (as a segfault or a preempted node would) on its Nth batch, once per marker."""

    def __init__(self, marker: str, die_on_batch: int, always: bool = False, tag: bool = True) -> None:
        self.marker, self.die_on_batch, self.always, self.tag = Path(marker), die_on_batch, always, tag
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.die_on_batch and (self.always or not self.marker.exists()):
            self.marker.write_text("died")
            os._exit(1)
        if not self.tag:
            return batch
        return {**batch, "seen_by": np.full(len(batch[schema.SEED]), os.getpid())}


def source(n: int):
    import ray.data

    rows = [{schema.SOURCE_ID: f"s{i}", schema.SEED: i} for i in range(n)]
    return ray.data.from_items(rows, override_num_blocks=8)


def test_actor_death_loses_and_duplicates_nothing(ray_of_its_own, tmp_path):
    marker = tmp_path / "died"
    spec = StageSpec(batch_size=4, concurrency=1, num_cpus=0.5, max_restarts=2, max_task_retries=2)
    stage = Stage("fragile", DiesOnBatch, spec, {"marker": str(marker), "die_on_batch": 3})
    ds = apply_stages(source(32), [stage], start_ledger(), task_num_cpus=0.5)
    rows = ds.take_all()
    assert marker.exists(), "the actor really died"
    seeds = sorted(r[schema.SEED] for r in rows)
    assert seeds == list(range(32))
    assert len({r["seen_by"] for r in rows}) == 2, "a restarted actor (new process) finished the work"


def test_exhausted_restarts_fail_naming_the_stage(ray_of_its_own, tmp_path):
    spec = StageSpec(batch_size=4, concurrency=1, num_cpus=0.5, max_restarts=1, max_task_retries=1)
    stage = Stage(
        "doomed_stage", DiesOnBatch, spec, {"marker": str(tmp_path / "m"), "die_on_batch": 1, "always": True}
    )
    ds = apply_stages(source(16), [stage], start_ledger(), task_num_cpus=0.5)
    import ray

    # The actor's death, naming its pool, not any error that happens to mention the stage.
    with pytest.raises(ray.exceptions.RayActorError, match="doomed_stage"):
        ds.take_all()


def run_with_fragile_stage(monkeypatch, toy, models, out, *extra: str, **fragile_kwargs):
    """The demo recipe with a `fragile` actor stage (no restarts, no task retries) before composite."""
    from engine import pipeline
    from engine.config import GenerateConfig, load_config

    recipe_stages = pipeline.build_stages

    def with_fragile_stage(*args, **kwargs):
        stages = recipe_stages(*args, **kwargs)
        spec = StageSpec(batch_size=4, concurrency=1, num_cpus=0.25, max_restarts=0, max_task_retries=0)
        return [
            *stages[:-1],
            Stage("fragile", DiesOnBatch, spec, {**fragile_kwargs, "tag": False}),
            stages[-1],
        ]

    monkeypatch.setattr(pipeline, "build_stages", with_fragile_stage)
    config = load_config(
        GenerateConfig,
        ROOT / "configs" / "aga_tiny_cpu.yaml",
        [*demo_overrides(toy, models, out), "output.rows_per_shard=4", *extra],
    )
    return pipeline.run_generate(config)


def test_a_run_that_loses_an_actor_starts_over_from_its_shards(
    ray_of_its_own, toy, tiny_models_dir, tmp_path, monkeypatch
):
    marker = tmp_path / "died"
    report = run_with_fragile_stage(
        monkeypatch, toy, tiny_models_dir, tmp_path / "out", marker=str(marker), die_on_batch=3
    )
    assert marker.exists(), "the actor really died"
    assert len(report.data["failed_attempts"]) == 1
    assert report.data["failed_attempts"][0].startswith("stage fragile: ActorDiedError")
    ids = pq.read_table(tmp_path / "out" / "data", columns=[schema.ID]).column(schema.ID).to_pylist()
    # The toy set: 3 classes x (4 train + 2 val + 2 test) real rows, plus 3 x 4 train images x 2 variants.
    assert len(ids) == len(set(ids)) == 24 + 24
    assert report.data["rows"]["written_this_run"] == 48 and report.data["errors"]["total"] == 0


def test_a_run_gives_up_after_its_attempts_naming_the_stage(
    ray_of_its_own, toy, tiny_models_dir, tmp_path, monkeypatch
):
    with pytest.raises(RunFailed, match=r"stage fragile: .* each of 2 attempts"):
        run_with_fragile_stage(
            monkeypatch,
            toy,
            tiny_models_dir,
            tmp_path / "out",
            "ray.max_run_attempts=2",
            marker=str(tmp_path / "m"),
            die_on_batch=1,
            always=True,
        )


def test_a_pool_that_can_never_start_fails_instead_of_hanging(ray_of_its_own, toy, tiny_models_dir, tmp_path):
    """The background pool asks for a resource no node has (say its GPU nodes were lost, on a cluster where
    the up-front check is off for autoscaling): the run fails naming the stage, after the timeout."""
    from ray.data.exceptions import ExecutionTimeoutError

    from engine.config import GenerateConfig, load_config
    from engine.pipeline import run_generate

    overrides = [
        *demo_overrides(toy, tiny_models_dir, tmp_path / "out"),
        "background.stage.resources={lost_gpu_node: 1}",
        "ray.check_resources=false",
        "ray.no_progress_timeout_s=5",
    ]
    config = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", overrides)
    with pytest.raises(ExecutionTimeoutError, match=r"no progress[\s\S]*MapBatches\(background\)"):
        run_generate(config)


def test_unpack_roundtrip_of_packed_columns():
    from engine.stages.batch import object_array, pack

    images = object_array([np.zeros((3, 5, 3), np.uint8), None, np.ones((2, 2, 3), np.uint8)])
    packed = pack({schema.IMAGE: images, schema.BBOX: object_array([None, [1, 2, 3, 4], None])})
    assert packed[schema.BBOX].shape == (3, 4) and np.isnan(packed[schema.BBOX][0]).all()
    out = unpack(packed)
    assert out[schema.IMAGE][1] is None and out[schema.IMAGE][0].shape == (3, 5, 3)
    assert (out[schema.IMAGE][2] == 1).all()
