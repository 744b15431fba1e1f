"""The vLLM stage kind (engine.stages.llm) without vLLM: stage building, the resource budget, and the
prepare/finish steps around the ray.data.llm Processor, fed a simulated Processor output.

The same steps with the real Processor and vLLM run in tests/test_vllm.py (the .venv-vllm environment).
"""

import pickle

import numpy as np
import pyarrow as pa
import pytest

from actors.prompt_writer import INSTRUCTION, PROMPT_SOURCE
from engine import schema
from engine.config import GenerateConfig, ModelRef, PromptConfig, StageSpec, load_config
from engine.recipes.aga_vllm_prompts import BackgroundPromptRequests, vllm_prompt_stage
from engine.stages.batch import object_array, pack, unpack
from engine.stages.llm import APPLIES, INFERENCE_ERROR, ROW, finish_results, prepare_requests
from engine.stages.loop import Stage, check_resource_budget

CLASSES = ["cat", "dog", "bird"]


def prompt_config(**kwargs) -> PromptConfig:
    return PromptConfig(
        backend="vllm",
        model=ModelRef(id="/tmp"),
        stage=StageSpec(batch_size=8, num_cpus=0.25),
        extra_forbidden_words=["sky"],
        **kwargs,
    )


@pytest.fixture(scope="module")
def ledger():
    import ray

    from engine.run.ledger import start_ledger

    ray.init(num_cpus=1, include_dashboard=False)
    yield start_ledger()
    ray.shutdown()


def rows(n_real: int, n_synthetic: int) -> dict[str, np.ndarray]:
    n = n_real + n_synthetic
    images = [np.full((6, 5, 3), i, dtype=np.uint8) for i in range(n)]
    return pack(
        {
            schema.ID: np.array([f"id{i}" for i in range(n)], dtype=object),
            schema.SOURCE_ID: np.array([f"src{i % max(n_real, 1)}" for i in range(n)], dtype=object),
            schema.RECIPE: np.array(["real"] * n_real + ["aga"] * n_synthetic, dtype=object),
            schema.SPLIT: np.array(["train"] * n, dtype=object),
            schema.CLASS_NAME: np.array([CLASSES[i % 3] for i in range(n)], dtype=object),
            schema.SEED: np.arange(100, 100 + n, dtype=np.int64),
            schema.IMAGE: object_array(images),
            schema.BBOX: np.tile(np.array([[1, 2, 3, 4]], dtype=np.float32), (n, 1)),
            schema.ERROR: np.full(n, "", dtype=object),
        }
    )


def simulate_processor(requests: pa.Table, texts: dict[int, str], errors: dict[int, str]) -> pa.Table:
    """What ray.data.llm hands back: the input columns plus the engine's output columns."""
    n = requests.num_rows
    return (
        requests.append_column("generated_text", pa.array([texts.get(i, "x") for i in range(n)]))
        .append_column(INFERENCE_ERROR, pa.array([errors.get(i, "") for i in range(n)]))
        .append_column("batch_uuid", pa.array(["b0"] * n))
        .append_column("time_taken_llm", pa.array([0.5] * n))
    )


def test_aga_picks_the_stage_by_backend(tmp_path):
    from tests.conftest import ROOT

    base = [f"data.path={tmp_path}", f"output.path={tmp_path / 'out'}", "prompt.model.id=/tmp"]
    for key in ("segment.detector.id", "segment.sam.id", "background.model.id"):
        base.append(f"{key}=/tmp")
    from engine.recipes import build_stages

    def prompt_stage(*overrides):
        config = load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", base + list(overrides))
        return next(s for s in build_stages(config, CLASSES, "hash") if s.name == "prompt")

    transformers, vllm = prompt_stage(), prompt_stage("prompt.backend=vllm")
    assert transformers.is_actor and not transformers.on_dataset
    assert vllm.on_dataset and not vllm.is_actor
    # Switching is one key: the same reads, writes and row selection.
    assert (transformers.reads, transformers.writes, transformers.only_synthetic) == (
        vllm.reads,
        vllm.writes,
        vllm.only_synthetic,
    )


def test_reservations_count_engines_and_template_actors():
    config = prompt_config(vllm={"tensor_parallel_size": 2, "template_num_cpus": 0.5})
    config.stage = StageSpec(num_cpus=1, num_gpus=1, concurrency=2)
    stage = vllm_prompt_stage(config, CLASSES)
    # 2 engines x 2 ranks, each {CPU: 1, GPU: 1}; one chat-template actor per engine at 0.5 CPU.
    assert stage.reserves == {"CPU": 2 * 2 * 1 + 2 * 0.5, "GPU": 4}
    check_resource_budget([stage], {"CPU": 5.5, "GPU": 4}, task_num_cpus=0.5)
    with pytest.raises(ValueError, match="prompt=5"):
        check_resource_budget([stage], {"CPU": 5.4, "GPU": 4}, task_num_cpus=0.5)
    with pytest.raises(ValueError, match="GPUs"):
        check_resource_budget([stage], {"CPU": 8, "GPU": 3}, task_num_cpus=0.5)


def test_an_engine_needs_some_resource():
    config = prompt_config()
    config.stage = StageSpec(num_cpus=0, num_gpus=0)
    with pytest.raises(ValueError, match="num_cpus or num_gpus"):
        vllm_prompt_stage(config, CLASSES)


def test_requests_carry_the_composed_question_and_the_row_seed():
    task = BackgroundPromptRequests(prompt_config(temperature=0.7), CLASSES)
    batch = {schema.SEED: np.array([5, 6]), schema.CLASS_NAME: np.array(["cat", "dog"], dtype=object)}
    requests = task.requests(batch)
    assert [r["messages"] for r in requests] == [task.prompts.compose(s).messages for s in (5, 6)]
    assert requests[1]["sampling_params"] == {"max_tokens": 48, "temperature": 0.7, "top_p": 0.95, "seed": 6}
    with pytest.raises(ValueError, match="not among the class_names"):
        task.requests({schema.SEED: np.array([1]), schema.CLASS_NAME: np.array(["zebra"], dtype=object)})


def test_prepare_and_finish_around_the_processor(ledger):
    import ray

    stage = vllm_prompt_stage(prompt_config(), CLASSES)
    task = stage.kwargs["task"]
    batch = rows(n_real=2, n_synthetic=4)
    requests = prepare_requests(dict(batch), stage=stage, ledger=ledger)
    assert requests.num_rows == 6
    assert requests[APPLIES].to_pylist() == [False, False, True, True, True, True]
    params = requests["sampling_params"].to_pylist()
    assert [p["max_tokens"] for p in params[:2]] == [1, 1]  # real rows: a one-token request, discarded
    assert [p["seed"] for p in params[2:]] == [102, 103, 104, 105]

    # Row 2 answers cleanly, row 3 names a class (template fallback), row 4 fails in vLLM.
    answer = "a quiet lake under pale evening light"
    output = simulate_processor(
        requests,
        texts={0: "junk", 2: answer, 3: "two dogs on a quiet beach at dusk"},
        errors={4: "engine said no"},
    )
    out = unpack(finish_results(output, stage=stage, ledger=ledger))

    assert list(out[schema.ID]) == ["id0", "id1", "id2", "id3", "id5"]
    # Real rows come back as they went in, with the stage's columns empty.
    assert list(out[schema.PROMPT][:2]) == [None, None] and list(out[PROMPT_SOURCE][:2]) == [None, None]
    assert np.array_equal(out[schema.IMAGE][1], np.full((6, 5, 3), 1, dtype=np.uint8))
    assert out[schema.BBOX].shape == (5, 4) and out[schema.BBOX].dtype == np.float32
    assert out[schema.PROMPT][2] == answer and out[PROMPT_SOURCE][2] == "llm"
    assert out[PROMPT_SOURCE][3] == "template" and out[schema.PROMPT][3] == task.prompts.fallback(103)
    assert out[INSTRUCTION][2] == task.prompts.compose(102).text
    assert list(out[schema.ERROR]) == [""] * 5
    assert not any(c.startswith("__") for c in out)

    snapshot = ray.get(ledger.snapshot.remote())
    assert snapshot["stages"]["prompt"]["rows_in"] == 4
    assert snapshot["stages"]["prompt"]["rows_out"] == 3
    assert snapshot["stages"]["prompt"]["synthetic_out"] == 3
    assert snapshot["stages"]["prompt"]["busy_s"] == pytest.approx(0.5)
    assert [(e[schema.ID], e["reason"], e["message"]) for e in snapshot["errors"]] == [
        ("id4", "inference", "engine said no")
    ]


def test_a_row_whose_request_fails_is_an_error_not_a_lost_batch(ledger):
    import ray

    class Picky(BackgroundPromptRequests):
        def requests(self, live):
            if 103 in set(live[schema.SEED].tolist()):
                raise RuntimeError("seed 103 is cursed")
            return super().requests(live)

    stage = vllm_prompt_stage(prompt_config(), CLASSES)
    stage.kwargs["task"] = Picky(prompt_config(), CLASSES)
    before = len(ray.get(ledger.snapshot.remote())["errors"])
    requests = prepare_requests(dict(rows(1, 3)), stage=stage, ledger=ledger)
    kept = [pickle.loads(b)[schema.ID][0] for b in requests[ROW].to_pylist()]
    assert kept == ["id0", "id1", "id2"]
    errors = ray.get(ledger.snapshot.remote())["errors"][before:]
    assert [(e[schema.ID], e["reason"]) for e in errors] == [("id3", "exception")]
    assert "cursed" in errors[0]["message"]


def test_missing_columns_are_named():
    stage = vllm_prompt_stage(prompt_config(), CLASSES)
    batch = rows(0, 2)
    del batch[schema.SEED]
    with pytest.raises(ValueError, match="seed"):
        prepare_requests(batch, stage=stage, ledger=None)


def test_on_dataset_stages_are_applied_as_dataset_transforms():
    from engine.stages.loop import apply_stages

    seen = []

    def transform(ds, stage, ledger, task_num_cpus):
        seen.append((stage.name, ledger, task_num_cpus))
        return ds + ["transformed"]

    stage = Stage("llm", transform, on_dataset=True, reserves={"CPU": 1.0})
    assert apply_stages(["ds"], [stage], "ledger", 0.5) == ["ds", "transformed"]
    assert seen == [("llm", "ledger", 0.5)]
