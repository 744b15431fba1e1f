"""Run reporting: errors.parquet, run.json (rows per stage, errors by reason, rates) and the summary table."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine import schema, storage
from engine.config import GenerateConfig


@dataclass
class RunReport:
    data: dict

    @property
    def filtered_fraction(self) -> float:
        """Dropped by the filter, of the synthetic rows the filter saw this run."""
        seen = self.data["stages"].get("filter", {}).get("rows_in", 0)
        return self.data["filtered"]["total"] / seen if seen else 0.0

    @property
    def error_fraction(self) -> float:
        real_in = self.data["rows"]["real_in"]
        return self.data["errors"]["total"] / real_in if real_in else 0.0

    @property
    def all_synthetic_failed(self) -> bool:
        """This run generated synthetic rows and every one of them failed: a broken generating stage, however
        small its share of all rows (the error fraction counts real sources, so it can stay under its bar)."""
        rows = self.data["rows"]
        return 0 < rows["synthetic_generated_this_run"] <= rows["synthetic_errors_this_run"]


def write_errors(errors: list[dict], path: str | Path) -> None:
    table = pa.Table.from_pylist(errors, schema=schema.ERRORS_SCHEMA)
    fs, inner = storage.filesystem(path)
    pq.write_table(
        table.sort_by([(schema.SOURCE_ID, "ascending"), ("stage", "ascending")]), inner, filesystem=fs
    )


def write_filtered(rows: list[dict], path: str | Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema.FILTERED_SCHEMA)
    fs, inner = storage.filesystem(path)
    pq.write_table(table.sort_by([(schema.ID, "ascending")]), inner, filesystem=fs)


def build_report(
    config: GenerateConfig,
    snapshot: dict,
    data_dir: Path,
    class_names: list[str],
    digest: str,
    wall_s: float,
    synthetic_before: int = 0,
    started_at: float | None = None,
) -> RunReport:
    """`synthetic_before`: synthetic rows already in the shards when this run started (a resumed run);
    `started_at`: the run's start (`time.time()`), for each stage's first and last batch."""
    stages = {}
    for name, s in snapshot["stages"].items():
        stages[name] = {
            "rows_in": int(s["rows_in"]),
            "rows_out": int(s["rows_out"]),
            "synthetic_out": int(s["synthetic_out"]),
            "batches": int(s["batches"]),
            "busy_s": round(s["busy_s"], 3),
            "rows_per_busy_s": round(s["rows_in"] / s["busy_s"], 3) if s["busy_s"] > 0 else None,
            # Seconds from the run's start to the end of the stage's first and last batch.
            "first_batch_s": _since(s.get("first_batch_at"), started_at),
            "last_batch_s": _since(s.get("last_batch_at"), started_at),
        }
        counts = {k.removeprefix("count:"): int(v) for k, v in s.items() if k.startswith("count:")}
        if counts:
            stages[name]["counts"] = counts
    errors = snapshot["errors"]
    # In a Ray task: reading every id of a million-row output on the driver would grow its memory with it.
    from engine.output.written_ids import count_rows_in_task

    written, duplicates = count_rows_in_task(str(data_dir))
    real_in = stages.get("decode", {}).get("rows_in", 0)
    skip = stages.get("skip_done", {"rows_in": real_in, "rows_out": real_in})
    # Expansion emits the synthetic rows (K per expandable source); each later error costs one of them.
    synthetic_emitted = stages.get("expand", {}).get("synthetic_out", 0)
    later_errors = sum(1 for e in errors if e["stage"] not in ("decode", "segment", "expand"))
    filtered = snapshot.get("filtered", [])
    made = synthetic_emitted - later_errors - len(filtered)  # synthetic rows this run made and kept
    synthetic_written = sum(v for k, v in written.items() if k != schema.RECIPE_REAL)
    data = {
        "recipe": config.recipe,
        "config_hash": digest,
        "schema_version": schema.SCHEMA_VERSION,
        "num_variants": config.num_variants,
        "classes": class_names,
        "wall_s": round(wall_s, 2),
        "rows": {
            "sources_in": skip["rows_in"],
            "sources_already_done": skip["rows_in"] - skip["rows_out"],
            "real_in": real_in,
            "real_written": written.get(schema.RECIPE_REAL, 0),
            "synthetic_expected": synthetic_before + made,
            "synthetic_written": synthetic_written,
            "synthetic_generated_this_run": synthetic_emitted,
            "synthetic_errors_this_run": later_errors,
            "duplicate_ids": duplicates,
            # Rows this run made, not rows already in the shards (a rerun of a finished run made none).
            "synthetic_per_s": round(made / wall_s, 3) if wall_s > 0 else None,
        },
        "stages": stages,
        "filtered": {
            "total": len(filtered),
            "by_rule": dict(Counter(f["rule"] for f in filtered)),
            "by_stage": dict(Counter(f["stage"] for f in filtered)),
        },
        "errors": {
            "total": len(errors),
            "by_reason": dict(Counter(e["reason"] for e in errors)),
            "by_stage": dict(Counter(e["stage"] for e in errors)),
        },
        "output": {
            "data": storage.resolve(data_dir),
            "errors": storage.join(storage.parent(data_dir), "errors.parquet"),
        },
    }
    if config.filter is not None or filtered:
        data["output"]["filtered"] = storage.join(storage.parent(data_dir), "filtered.parquet")
    if config.output.gallery_classes:
        data["output"]["gallery"] = storage.join(storage.parent(data_dir), "gallery", "index.html")
    return RunReport(data)


def _since(at: float | None, started_at: float | None) -> float | None:
    return round(at - started_at, 2) if at is not None and started_at is not None else None


def print_summary(report: RunReport) -> None:
    from rich.console import Console
    from rich.table import Table

    data = report.data
    table = Table(title=f"synthray {data['recipe']}: {data['wall_s']} s")
    for column in ("stage", "rows in", "rows out", "busy s", "rows / busy s"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for name, s in data["stages"].items():
        table.add_row(
            name, str(s["rows_in"]), str(s["rows_out"]), f"{s['busy_s']:.1f}", str(s["rows_per_busy_s"])
        )
    console = Console()
    console.print(table)
    rows = data["rows"]
    console.print(
        f"real in {rows['real_in']}, real written {rows['real_written']}, synthetic written "
        f"{rows['synthetic_written']} (expected {rows['synthetic_expected']}), "
        f"errors {data['errors']['total']} {data['errors']['by_reason']}"
    )
    if data["filtered"]["total"]:
        console.print(f"filtered {data['filtered']['total']} synthetic rows {data['filtered']['by_rule']}")
    for number, failure in enumerate(data.get("failed_attempts", []), start=1):
        console.print(f"[yellow]attempt {number} lost Ray workers and was resumed:[/yellow] {failure}")
    for note in data.get("data_notes", []):
        console.print(f"[yellow]data:[/yellow] {note}")
    for name, path in data["output"].items():
        console.print(f"{name:>8}: {path}")
