"""`make bench`: the CPU benchmarks, one after the other, then one Markdown page with every table.

    python -m benchmarks.run_all [--smoke] [--out-dir benchmarks/results]

Writes `<out-dir>/engine_overhead.{json,md}`, `<out-dir>/compositor.{json,md}` and `<out-dir>/performance.md`
(the tables with the device, versions and commands, in the form docs/performance.md links to).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks import compositor, engine_overhead
from benchmarks.record import RESULTS_DIR

COMMANDS = (
    "make bench   # = python -m benchmarks.run_all\n"
    "python -m benchmarks.engine_overhead --num-images 48 --memory-scale 4\n"
    "python -m benchmarks.compositor --sizes 512 1024"
)


def performance_page(engine: dict, comp: dict) -> str:
    m, v = engine["machine"], engine["versions"]
    device = (
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, no GPU; {m['platform']}; "
        f"load average (1/5/15 min) at the end of the run {m['load_average_1_5_15']}"
    )
    packages = ", ".join(f"{name} {version}" for name, version in v.items() if version)
    return (
        "## Performance (CPU)\n\n"
        f"Device: {device}.\n\nVersions: Python {m['python']}, {packages}.\n\n"
        f"Commands:\n\n```\n{COMMANDS}\n```\n\n"
        "### Engine overhead (tiny models)\n\n"
        "Synthetic rows/s of each stage run alone (same batch size, actors and CPUs, over its materialised "
        "input) and of the whole pipeline (`run_generate`). Steady = between the outputs at 25% and 90% "
        "of the rows (no start-up, fill or drain); wall = from the start, start-up included.\n\n"
        f"{engine_overhead.to_markdown(engine)}\n"
        "### Compositor\n\n"
        "Images/s of `engine.methods.paste.composite_one` against a per-image PIL implementation of the same "
        "transform (`benchmarks/compositor.py`), single core unless noted.\n\n"
        f"{compositor.to_markdown(comp)}\n"
        "GPU numbers: not measured here (no GPU on this machine).\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="Where results go")
    args = parser.parse_args(argv)

    engine_args = ["--out-dir", str(args.out_dir)] + (["--smoke"] if args.smoke else [])
    engine = engine_overhead.main(engine_args)
    comp_args = ["--out-dir", str(args.out_dir)]
    if args.smoke:
        comp_args += ["--sizes", "64", "128", "--num-images", "2", "--repeats", "1"]
    comp = compositor.main(comp_args)
    page = args.out_dir / "performance.md"
    page.write_text(performance_page(engine, comp))
    print(f"performance page: {page}")


if __name__ == "__main__":
    main()
