"""The stage wrapper: row-level failure isolation and OOM batch splitting (with a real ledger actor)."""

import numpy as np
import pytest

from engine import schema
from engine.run.ledger import start_ledger
from engine.stages.batch import object_array, unpack
from engine.stages.loop import Stage, run_batch


@pytest.fixture(scope="module")
def ledger():
    import ray

    ray.init(num_cpus=1, include_dashboard=False)
    yield start_ledger()
    ray.shutdown()


def batch(n: int) -> dict:
    return {
        schema.SOURCE_ID: np.array([f"s{i}" for i in range(n)], dtype=object),
        schema.SEED: np.arange(n, dtype=np.int64),
        schema.IMAGE: object_array([np.full((4, 4, 3), i, np.uint8) for i in range(n)]),
    }


class OutOfMemoryError(RuntimeError):
    """Same name as torch.cuda.OutOfMemoryError, which the wrapper recognises by name."""


def test_one_bad_row_costs_that_row(ledger):
    import ray

    calls = []

    def fn(b):
        calls.append(len(b[schema.SEED]))
        if 3 in b[schema.SEED]:
            raise ValueError("model choked on row 3")
        return {**b, "doubled": b[schema.SEED] * 2}

    out = unpack(run_batch(fn, Stage("flaky", fn), ledger, batch(6)))
    assert sorted(out[schema.SEED].tolist()) == [0, 1, 2, 4, 5]
    assert (out["doubled"] == out[schema.SEED] * 2).all()
    assert calls == [6, 1, 1, 1, 1, 1, 1]  # the batch, then row by row
    errors = [e for e in ray.get(ledger.snapshot.remote())["errors"] if e["stage"] == "flaky"]
    assert [(e[schema.SOURCE_ID], e["reason"]) for e in errors] == [("s3", "exception")]
    assert "model choked" in errors[0]["message"]


def test_oom_splits_the_batch_in_halves_down_to_one_row(ledger):
    import ray

    sizes = []

    def fn(b):
        sizes.append(len(b[schema.SEED]))
        if len(b[schema.SEED]) > 2 or 7 in b[schema.SEED]:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return b

    out = unpack(run_batch(fn, Stage("big", fn), ledger, batch(8)))
    assert sorted(out[schema.SEED].tolist()) == [0, 1, 2, 3, 4, 5, 6]
    assert sizes[:3] == [8, 4, 2]  # halves, not single rows
    assert max(sizes[3:]) <= 4
    errors = [e for e in ray.get(ledger.snapshot.remote())["errors"] if e["stage"] == "big"]
    assert [(e[schema.SOURCE_ID], e["reason"]) for e in errors] == [("s7", "oom")]


def test_missing_columns_are_named(ledger):
    stage = Stage("needs", lambda b: b, reads=(schema.PROMPT,))
    with pytest.raises(ValueError, match=r"stage 'needs' needs columns \['prompt'\]"):
        run_batch(stage.fn, stage, ledger, batch(2))


def test_gpu_shortfall_names_the_pools_like_the_cpu_one():
    from engine.config import StageSpec
    from engine.stages.loop import check_resource_budget

    class Model:
        pass

    stages = [
        Stage("segment", Model, StageSpec(num_gpus=1, concurrency=1, num_cpus=0)),
        Stage("background", Model, StageSpec(num_gpus=1, concurrency=4, num_cpus=0)),
        Stage("composite", Model, StageSpec(num_gpus=0, concurrency=2, num_cpus=0)),
    ]
    with pytest.raises(
        ValueError, match=r"reserve 5 GPUs \(segment=1x1, background=1x4\) but the cluster has 4"
    ):
        check_resource_budget(stages, {"CPU": 8, "GPU": 4}, task_num_cpus=0.5)
    check_resource_budget(stages, {"CPU": 8, "GPU": 5}, task_num_cpus=0.5)


def test_actor_stage_sets_restarts_without_ray_deprecation_warnings(ledger):
    """Ray 2.60 takes actor restarts/retries only through the deprecated `**ray_remote_args`; the stage loop
    passes them (they are real settings) without flooding every run with the warning."""
    import warnings

    import ray

    from engine.config import StageSpec
    from engine.stages.loop import apply_stages

    class Model:
        def __call__(self, batch):
            return batch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = apply_stages(ray.data.range(4), [Stage("model", Model, StageSpec(max_restarts=1))], ledger, 0.25)
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]
    assert ds._logical_plan.dag.ray_remote_args["max_restarts"] == 1, "the setting still reaches Ray"
