"""The run ledger: one small Ray actor that every stage reports to (rows in/out, busy time, row errors).

Why an actor: Ray Data has one output stream, but a run has two results, the rows and the errors. Stages
hand failed rows to the ledger and drop them from the stream; the driver reads the ledger at the end to
write `errors.parquet` and `run.json`. Calls are synchronous (ray.get) so nothing is in flight when a pool
shuts down.
"""

from __future__ import annotations

import time
from collections import defaultdict

import ray


class RunLedger:
    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = defaultdict(
            lambda: {"rows_in": 0, "rows_out": 0, "synthetic_out": 0, "batches": 0, "busy_s": 0.0}
        )
        self.errors: list[dict[str, str]] = []
        self.filtered: list[dict[str, str]] = []

    def record_batch(
        self,
        stage: str,
        rows_in: int,
        rows_out: int,
        synthetic_out: int,
        seconds: float,
        counts: dict[str, int] | None = None,
    ) -> None:
        entry = self.stages[stage]
        for name, count in (counts or {}).items():  # see Stage.counts
            entry[f"count:{name}"] = entry.get(f"count:{name}", 0) + count
        entry["rows_in"] += rows_in
        entry["rows_out"] += rows_out
        entry["synthetic_out"] += synthetic_out
        entry["batches"] += 1
        entry["busy_s"] += seconds
        # Wall-clock times of the first and last batch: whether the stages overlap (streaming) shows here.
        now = time.time()
        entry.setdefault("first_batch_at", now)
        entry["last_batch_at"] = now

    def record_errors(self, errors: list[dict[str, str]]) -> None:
        self.errors.extend(errors)

    def record_filtered(self, rows: list[dict[str, str]]) -> None:
        self.filtered.extend(rows)

    def snapshot(self) -> dict:
        return {"stages": dict(self.stages), "errors": list(self.errors), "filtered": list(self.filtered)}


def start_ledger(name: str | None = None):
    """A ledger actor owned by this driver; it reserves no CPU so it never competes with the stages.

    Pinned to the driver's node: the run ends with the driver anyway, and a worker node that goes away
    (preemption, scale-down) must not take the run's error records with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=here)(RunLedger)
        .options(name=name)
        .remote()
    )
