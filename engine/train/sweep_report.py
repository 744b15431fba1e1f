"""The sweep's report: one row per training run, the summary over seeds, the paired comparison with a
baseline, and the tables and files a sweep writes (`sweep.md`, `<results>.{md,json,png}`) and prints.

Pure functions of the runs' metrics (no Ray, no training): `jobs.sweep` runs the variants and calls these.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

from engine.train.config import SweepConfig

METRICS = (("test_top1", "test top-1"), ("test_worst_group", "test worst-group"), ("val_top1", "val top-1"))
# What the benchmark report shows and compares with the baseline.
REPORT_METRICS = (
    ("test_top1", "test top-1"),
    ("test_worst_group", "test worst-group"),
    ("subject_attention", "subject attention"),
)
SIGNIFICANCE = 0.05
TEST_KEYS = ("test_top1", "val_top1")


def run_row(variant: str, metrics: dict) -> dict:
    test = metrics.get("test") or {}
    history = metrics["history"]
    return {
        "variant": variant,
        "strategy": metrics["strategy"],
        "seed": metrics["seed"],
        "test_top1": test.get("top1"),
        "test_worst_group": test.get("worst_group"),
        "val_top1": history[-1]["val_top1"] if history else None,
        "synthetic_per_epoch": metrics["rows_seen"]["synthetic"] / max(len(history), 1),
        "epochs": len(history),
        "real_per_epoch": metrics["rows_seen"]["real"] / max(len(history), 1),
        "wall_s": metrics["wall_s"],
        "run_dir": metrics["run_dir"],
        **{
            f"{name}_{key}": result.get(key)
            for name, result in (metrics.get("extra_tests") or {}).items()
            for key in ("top1", "worst_group")
        },
    }


def extra_test_metrics(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    """(key, label) of the extra test splits' top-1 and worst group the runs report (data.extra_test_splits),
    in first-seen order: they join the tables beside test."""
    names = dict.fromkeys(
        key[: -len("_top1")] for row in rows for key in row if key.endswith("_top1") and key not in TEST_KEYS
    )
    return tuple(
        item
        for name in names
        for item in ((f"{name}_top1", f"{name} top-1"), (f"{name}_worst_group", f"{name} worst-group"))
    )


def report_metrics(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    """REPORT_METRICS with the extra test splits' columns after test's."""
    return (*REPORT_METRICS[:2], *extra_test_metrics(rows), *REPORT_METRICS[2:])


def table_metrics(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    """METRICS with the extra test splits' columns after test's."""
    return (*METRICS[:2], *extra_test_metrics(rows), *METRICS[2:])


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and (sample) std over seeds per variant, in first-seen order; std is 0 for a single seed."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        entry = {"variant": variant, "strategy": runs[0]["strategy"], "seeds": [r["seed"] for r in runs]}
        for key in dict.fromkeys(k for k, _ in (*table_metrics(rows), *report_metrics(rows))):
            values = [r[key] for r in runs if r.get(key) is not None]
            entry[key] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
        entry["synthetic_per_epoch"] = statistics.fmean(r["synthetic_per_epoch"] for r in runs)
        out.append(entry)
    return out


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def format_markdown(rows: list[dict]) -> str:
    metrics = table_metrics(rows)
    header = ["variant", "strategy", "seeds", *(label for _, label in metrics), "synthetic rows / epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summarize(rows):
        cells = [entry["variant"], entry["strategy"], str(len(entry["seeds"]))]
        cells += [_cell(entry[key]) for key, _ in metrics]
        cells.append(f"{entry['synthetic_per_epoch']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_with_baseline(rows: list[dict], baseline: str) -> dict[str, dict]:
    """Per variant and REPORT_METRICS key: mean and std of (variant - baseline) over the seeds both ran, and
    the paired t-test's p-value (scipy.stats.ttest_rel; None below 2 pairs or when every difference is the
    same, where the test is undefined). `significant`: p < SIGNIFICANCE."""
    from scipy.stats import ttest_rel

    by_seed = {(r["variant"], r["seed"]): r for r in rows}
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        out[variant] = {}
        for key, _ in report_metrics(rows):
            pairs = [
                (by_seed[(variant, seed)][key], by_seed[(baseline, seed)][key])
                for (name, seed) in by_seed
                if name == variant
                and (baseline, seed) in by_seed
                and by_seed[(variant, seed)].get(key) is not None
                and by_seed[(baseline, seed)].get(key) is not None
            ]
            if not pairs:
                out[variant][key] = None
                continue
            deltas = [v - b for v, b in pairs]
            p_value = None
            if len(pairs) > 1 and len(set(deltas)) > 1:
                p_value = float(ttest_rel([v for v, _ in pairs], [b for _, b in pairs]).pvalue)
                p_value = None if math.isnan(p_value) else p_value
            out[variant][key] = {
                "mean": statistics.fmean(deltas),
                "std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                "num_pairs": len(pairs),
                "p_value": p_value,
                "significant": p_value is not None and p_value < SIGNIFICANCE,
            }
    return out


def _delta_cell(delta: dict | None, variant: str, baseline: str) -> str:
    if variant == baseline:
        return "—"
    if delta is None:
        return "n/a"
    p = "p n/a" if delta["p_value"] is None else f"p={delta['p_value']:.3f}"
    return f"{100 * delta['mean']:+.1f}{' *' if delta['significant'] else ''} ({p})"


def report_table(rows: list[dict], baseline: str | None) -> tuple[list[str], list[list[str]]]:
    """The benchmark table: per variant, each REPORT_METRICS mean ± std (%), its delta to the baseline in
    points with the paired test's p-value (* when p < SIGNIFICANCE), and synthetic rows per epoch."""
    deltas = compare_with_baseline(rows, baseline) if baseline else {}
    metrics = report_metrics(rows)
    header = ["variant", "seeds", "epochs"]
    for _, label in metrics:
        header += [label] + ([f"Δ {label} vs {baseline}"] if baseline else [])
    header.append("synthetic rows / epoch")
    body = []
    for entry in summarize(rows):
        runs = [r for r in rows if r["variant"] == entry["variant"]]
        cells = [
            entry["variant"],
            str(len(entry["seeds"])),
            "/".join(sorted({str(r.get("epochs")) for r in runs})),
        ]
        for key, _ in metrics:
            cells.append(_cell(entry[key]))
            if baseline:
                cells.append(_delta_cell(deltas[entry["variant"]][key], entry["variant"], baseline))
        cells.append(f"{entry['synthetic_per_epoch']:.0f}")
        body.append(cells)
    return header, body


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def write_report(
    config: SweepConfig, rows: list[dict], *, command: str, load_at_start, wall_s: float
) -> None:
    """<results>.json (everything), <results>.md (the table, the command, the machine) and <results>.png."""
    from engine.train.evaluation import plot_variants

    prefix = Path(config.results)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    header, body = report_table(rows, config.baseline)
    summary = summarize(rows)
    deltas = compare_with_baseline(rows, config.baseline) if config.baseline else None
    context = {
        "command": command,
        "config": config.model_dump(mode="json"),
        "machine": machine(),
        "loadavg_at_start": [round(x, 2) for x in load_at_start],
        "wall_s": round(wall_s, 1),
    }
    Path(f"{prefix}.json").write_text(
        json.dumps({**context, "summary": summary, "deltas": deltas, "runs": rows}, indent=2) + "\n"
    )
    plot_variants(
        summary, report_metrics(rows), Path(f"{prefix}.png"), title=f"{len(config.seeds)} seeds, mean ± std"
    )
    m = context["machine"]
    lines = [
        f"# Efficacy benchmark: {', '.join(e['variant'] for e in summary)}",
        "",
        f"Command: `{command}` (runs in {config.output}).",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['memory_gib']} GiB, Python {m['python']}; "
        f"load average at start {' / '.join(f'{x:.2f}' for x in context['loadavg_at_start'])}; "
        f"wall time {wall_s / 60:.1f} min (cached generation and runs are reused, not re-timed).",
        f"Seeds: {config.seeds}. Accuracies and subject attention in %, mean ± std over seeds; Δ in points vs "
        f"`{config.baseline}`, paired t-test over seeds (scipy.stats.ttest_rel), * when p < {SIGNIFICANCE}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cells) + " |" for cells in body),
        "",
        f"![accuracy and subject attention per variant]({prefix.name}.png)",
    ]
    if config.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in config.notes)]
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict], title: str = "", baseline: str | None = None) -> None:
    """The sweep table (accuracies in %, mean ± std over seeds) on the terminal; with `baseline`, the
    benchmark's table (deltas and paired tests, subject attention)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    if baseline:
        header, body = report_table(rows, baseline)
        for name in header:
            table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
        for cells in body:
            table.add_row(*cells)
        Console(width=max(Console().width, 200)).print(table)
        return
    metrics = table_metrics(rows)
    for name in ("variant", "strategy", "seeds", *(label for _, label in metrics), "synthetic rows / epoch"):
        table.add_column(name, justify="left" if name in ("variant", "strategy") else "right", no_wrap=True)
    for entry in summarize(rows):
        table.add_row(
            entry["variant"],
            entry["strategy"],
            str(len(entry["seeds"])),
            *(_cell(entry[key]) for key, _ in metrics),
            f"{entry['synthetic_per_epoch']:.0f}",
        )
    # Not a terminal (logs, CI): rich would squeeze the table into 80 columns.
    console = Console()
    Console(width=max(console.width, 120)).print(table)
