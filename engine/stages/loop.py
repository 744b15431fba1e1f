"""Stages and the one loop that applies them.

A `Stage` says what runs (a callable class for a model, a plain function for a stateless CPU step) and,
for classes, how Ray schedules it (`StageSpec` from config). `apply_stages` is the visible loop of
`map_batches` calls; `run_batch` is what every stage does around its own work: skip rows it does not apply
to, time the call, hand failed rows to the run ledger and drop them from the stream.
"""

from __future__ import annotations

import inspect
import json
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import schema
from engine.config import StageSpec
from engine.run.failures import StageSetupError
from engine.stages.batch import Batch, concat, num_rows, pack, take, unpack


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]  # a class (actor pool: built once per actor) or a function (CPU tasks)
    spec: StageSpec | None = (
        None  # scheduling for classes; for functions only batch_size counts (else a block)
    )
    kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # constructor kwargs (class) / call kwargs (function)
    reads: tuple[str, ...] = ()  # columns the stage needs; checked before each call
    writes: tuple[str, ...] = ()  # columns it adds: present (None-filled) even when no row applies
    only_synthetic: bool = False  # real rows (recipe "real") pass through untouched
    only_splits: tuple[str, ...] | None = None  # rows of other splits pass through untouched
    only_parts: tuple[str, ...] | None = None  # rows of other parts (schema.PART) pass through untouched
    # Columns the stage writes whose non-zero rows run.json counts (stages.<name>.counts), e.g. prompts
    # trimmed to the text encoder's length, template fallbacks: what a user should know happened.
    counts: tuple[str, ...] = ()
    # A stage made of several Ray Data operators rather than one map_batches callable (a `ray.data.llm`
    # Processor): `fn(ds, stage=, ledger=, task_num_cpus=)` returns the new dataset and records rows, errors
    # and busy time in the ledger itself; `reserves` is what its actor pools hold ({"CPU": n, "GPU": n}).
    on_dataset: bool = False
    reserves: dict[str, float] = field(default_factory=dict)

    @property
    def is_actor(self) -> bool:
        return inspect.isclass(self.fn) and not self.on_dataset


class StageRunner:
    """The callable class Ray Data builds per actor: the stage's model, loaded once, plus `run_batch`."""

    def __init__(self, stage: Stage, ledger) -> None:
        self.stage = stage
        self.ledger = ledger
        try:
            self.fn = stage.fn(**stage.kwargs)
        except Exception as err:
            # Named so that the driver reports it as this stage's error, not as lost workers to retry.
            raise StageSetupError.from_exception(stage.name, err) from err

    def __call__(self, batch: Batch) -> Batch:
        return run_batch(self.fn, self.stage, self.ledger, batch)


def run_function_stage(batch: Batch, stage: Stage, ledger) -> Batch:
    """Task-side entry for function stages (no state to load)."""

    def fn(b: Batch) -> Batch:
        return stage.fn(b, **stage.kwargs)

    return run_batch(fn, stage, ledger, batch)


def run_batch(fn: Callable[[Batch], Batch], stage: Stage, ledger, batch: Batch) -> Batch:
    import ray

    batch = unpack(dict(batch))
    n = num_rows(batch)
    applies = np.ones(n, dtype=bool)
    if stage.only_synthetic and schema.RECIPE in batch:
        applies &= batch[schema.RECIPE] != schema.RECIPE_REAL
    if stage.only_splits is not None:
        applies &= np.isin(batch[schema.SPLIT].astype(str), stage.only_splits)
    if stage.only_parts is not None:
        parts = batch.get(schema.PART, np.full(n, None, dtype=object))
        applies &= np.isin(np.asarray(parts, dtype=object).astype(str), stage.only_parts)
    live = take(batch, np.flatnonzero(applies))
    if not num_rows(live):
        # Every block leaving a stage has the same columns, or Ray fails to concatenate tensor columns.
        # (pack drops all-None columns Ray can type from other blocks; tensor and image columns stay.)
        for name in stage.writes:
            batch.setdefault(name, np.full(n, None, dtype=object))
        return pack(batch)
    schema.require_columns(live, stage.reads, stage.name)

    start = time.perf_counter()
    out = _call_with_row_fallback(fn, live, stage.name)
    seconds = time.perf_counter() - start

    failed = out[schema.ERROR] != ""
    if failed.any():
        ray.get(ledger.record_errors.remote(_error_records(take(out, np.flatnonzero(failed)), stage.name)))
    rules = out.pop(schema.DROP, None)  # a filtering stage's verdict: "" keeps the row
    rules = np.full(num_rows(out), "", dtype=object) if rules is None else np.asarray(rules, dtype=object)
    dropped = ~failed & (rules != "")
    if dropped.any():  # to filtered.parquet, with the rule and the scores the stage wrote
        index = np.flatnonzero(dropped)
        ray.get(ledger.record_filtered.remote(_filtered_records(take(out, index), rules[index], stage)))
    kept = take(out, np.flatnonzero(~failed & ~dropped))
    synthetic = int((kept[schema.RECIPE] != schema.RECIPE_REAL).sum()) if schema.RECIPE in kept else 0
    counts = {name: int(np.count_nonzero(kept[name])) for name in stage.counts if name in kept}
    ray.get(
        ledger.record_batch.remote(stage.name, num_rows(live), num_rows(kept), synthetic, seconds, counts)
    )
    return pack(concat([take(batch, np.flatnonzero(~applies)), kept]))


def _call_with_row_fallback(fn: Callable[[Batch], Batch], live: Batch, stage_name: str) -> Batch:
    """Run the batch; on failure, retry so that one bad row costs that row, not its batch.

    Out of memory: split the batch in half and retry each half, down to single rows (reason "oom").
    Any other error: retry row by row (reason "exception" for the rows that still fail).
    """
    try:
        return _with_error_columns(fn(live))
    except Exception as exc:  # noqa: BLE001 - any model error becomes a row error, never a lost batch
        n = num_rows(live)
        if n == 1:
            return _mark_failed(live, exc)
        if _is_out_of_memory(exc):
            _release_cached_memory()
            halves = np.array_split(np.arange(n), 2)
        else:
            halves = [np.array([i]) for i in range(n)]
        return concat([_call_with_row_fallback(fn, take(live, part), stage_name) for part in halves])


def _is_out_of_memory(exc: BaseException) -> bool:
    # By name and message: the driver and CPU stages never import torch to get the exception class.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _release_cached_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _with_error_columns(batch: Batch) -> Batch:
    n = num_rows(batch)
    if schema.ERROR not in batch:
        batch[schema.ERROR] = np.full(n, "", dtype=object)
    if schema.ERROR_MESSAGE not in batch:
        batch[schema.ERROR_MESSAGE] = np.full(n, "", dtype=object)
    return batch


def _mark_failed(row: Batch, exc: Exception) -> Batch:
    row = dict(row)
    row[schema.ERROR] = np.array(["oom" if _is_out_of_memory(exc) else "exception"], dtype=object)
    detail = traceback.format_exception_only(exc)[-1].strip()
    row[schema.ERROR_MESSAGE] = np.array([detail[:500]], dtype=object)
    return row


def _error_records(failed: Batch, stage_name: str) -> list[dict[str, str]]:
    n = num_rows(failed)
    sources = failed.get(schema.SOURCE_ID, np.full(n, ""))
    ids = failed.get(schema.ID, np.full(n, ""))
    return [
        {
            schema.SOURCE_ID: str(sources[i]),
            schema.ID: str(ids[i] or ""),
            "stage": stage_name,
            "reason": str(failed[schema.ERROR][i]),
            "message": str(failed[schema.ERROR_MESSAGE][i]),
        }
        for i in range(n)
    ]


def _filtered_records(dropped: Batch, rules: np.ndarray, stage: Stage) -> list[dict[str, str]]:
    scores = [name for name in stage.writes if name in dropped]
    return [
        {
            schema.SOURCE_ID: str(dropped[schema.SOURCE_ID][i]),
            schema.ID: str(dropped[schema.ID][i]),
            schema.CLASS_NAME: str(dropped.get(schema.CLASS_NAME, [""] * num_rows(dropped))[i]),
            "stage": stage.name,
            "rule": str(rules[i]),
            "scores": json.dumps({name: _json_value(dropped[name][i]) for name in scores}),
        }
        for i in range(num_rows(dropped))
    ]


def _json_value(value):
    if isinstance(value, np.ndarray):  # an image a dropped row carried: its shape, not its pixels
        return f"array{list(value.shape)}"
    return value.item() if isinstance(value, np.generic) else value


def check_resource_budget(stages: list[Stage], cluster: dict[str, float], task_num_cpus: float) -> None:
    """Fail before running when actor pools cannot all be scheduled (Ray Data would wait forever)."""
    cpus = sum(s.spec.num_cpus * s.spec.concurrency for s in stages if s.is_actor)
    gpus = sum(s.spec.num_gpus * s.spec.concurrency for s in stages if s.is_actor)
    cpus += sum(s.reserves.get("CPU", 0.0) for s in stages if s.on_dataset)
    gpus += sum(s.reserves.get("GPU", 0.0) for s in stages if s.on_dataset)
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if cpus + task_num_cpus > have_cpus + 1e-9:
        pools = ", ".join(
            f"{s.name}={s.spec.num_cpus}x{s.spec.concurrency}"
            if s.is_actor
            else f"{s.name}={s.reserves.get('CPU', 0.0):g}"
            for s in stages
            if s.is_actor or s.on_dataset
        )
        raise ValueError(
            f"actor pools reserve {cpus:g} CPUs ({pools}) plus {task_num_cpus:g} for CPU tasks, but the "
            f"cluster has {have_cpus:g}: lower <stage>.stage.num_cpus/concurrency or add CPUs (ray.num_cpus)"
        )
    if gpus > have_gpus + 1e-9:
        pools = ", ".join(
            f"{s.name}={s.spec.num_gpus:g}x{s.spec.concurrency}"
            if s.is_actor
            else f"{s.name}={s.reserves.get('GPU', 0.0):g}"
            for s in stages
            if (s.is_actor and s.spec.num_gpus) or (s.on_dataset and s.reserves.get("GPU"))
        )
        raise ValueError(
            f"actor pools reserve {gpus:g} GPUs ({pools}) but the cluster has {have_gpus:g}: lower "
            "<stage>.stage.num_gpus/concurrency, add GPU nodes, or set ray.check_resources=false on an "
            "autoscaling cluster"
        )
    custom: dict[str, float] = {}
    for s in stages:
        for name, amount in (s.spec.resources if s.is_actor else {}).items():
            custom[name] = custom.get(name, 0.0) + amount * s.spec.concurrency
    for name, amount in sorted(custom.items()):
        if amount > cluster.get(name, 0.0) + 1e-9:
            raise ValueError(
                f"actor pools reserve {amount:g} of resource {name!r} but the cluster has "
                f"{cluster.get(name, 0.0):g}: give nodes that resource (ray start --resources) "
                "or change <stage>.stage.resources"
            )


def apply_stages(ds, stages: list[Stage], ledger, task_num_cpus: float):
    """The stage loop: one `map_batches` per stage, scheduled from its spec (`on_dataset` stages add
    their own operators)."""
    for stage in stages:
        if stage.on_dataset:
            ds = stage.fn(ds, stage=stage, ledger=ledger, task_num_cpus=task_num_cpus)
        elif stage.is_actor:
            # A subclass per stage only so that Ray Data's progress bars show the stage's name.
            runner = type(stage.name, (StageRunner,), {})
            with warnings.catch_warnings():
                # Ray 2.60 has no named parameter for actor restarts/retries: `**ray_remote_args` is the only
                # way to set them (deprecated for Ray 2.64, pinned 2.60 here), and warns on every stage.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
                ds = _map_actor_pool(ds, runner, stage, ledger)
        else:
            ds = ds.map_batches(
                _named_function(stage.name),
                fn_kwargs={"stage": stage, "ledger": ledger},
                batch_format="numpy",
                # No spec: one block per call. Task stages are fused into one Ray Data operator whose input
                # bundle is the largest batch size among them, so a large batch here would make every task
                # take that many source rows and hold all their output until it ends (no streaming).
                batch_size=stage.spec.batch_size if stage.spec else None,
                num_cpus=task_num_cpus,
            )
    return ds


def _map_actor_pool(ds, runner: type, stage: Stage, ledger):
    from ray.data import ActorPoolStrategy

    spec = stage.spec
    return ds.map_batches(
        runner,
        fn_constructor_kwargs={"stage": stage, "ledger": ledger},
        compute=ActorPoolStrategy(size=spec.concurrency),
        batch_size=spec.batch_size,
        batch_format="numpy",
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        resources=spec.resources or None,
        max_restarts=spec.max_restarts,
        max_task_retries=spec.max_task_retries,
    )


def _named_function(name: str) -> Callable[..., Batch]:
    def fn(batch: Batch, stage: Stage, ledger) -> Batch:
        return run_function_stage(batch, stage, ledger)

    fn.__name__ = fn.__qualname__ = name
    return fn
