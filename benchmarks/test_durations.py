"""Where `make test`'s time goes, per test module: tests, total seconds, the slowest test, and (from a phases
file) how much of it is setup (fixtures: Ray start-up, shared runs) and how much the tests' own calls.

    SYNTHRAY_TEST_PHASES=/tmp/main.jsonl make test     # tests/conftest.py appends a line per test phase
    python -m benchmarks.test_durations /tmp/main.jsonl [--before /tmp/before.jsonl] > table.md

Either file may also be pytest's JUnit XML (`--junitxml`), which holds only each test's sum of setup + call +
teardown (a module-scoped fixture counts in the first test that uses it): its setup and call columns are
blank. With `--before`, the table gains the earlier run's totals and the difference.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict


def _entry() -> dict:
    return {"tests": 0, "seconds": 0.0, "setup": None, "call": None, "slowest": (0.0, "")}


def _junit_cases(path: str):
    """(module file, test name, total seconds, None) per JUnit test case."""
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        name = "/".join(module[:2]) + ".py" if len(module) >= 2 else case.get("classname", "?")
        yield name, case.get("name", ""), float(case.get("time", 0)), None


def _phase_cases(path: str):
    """(module file, test name, total seconds, {phase: seconds}) per test in a phases file."""
    tests: dict[str, dict[str, float]] = defaultdict(dict)
    with open(path) as lines:
        for line in lines:
            record = json.loads(line)
            phases = tests[record["nodeid"]]
            phases[record["when"]] = phases.get(record["when"], 0.0) + record["s"]
    for nodeid, phases in tests.items():
        module, _, name = nodeid.partition("::")
        yield module, name, sum(phases.values()), phases


def module_times(path: str) -> dict[str, dict]:
    """{module file: {"tests", "seconds", "setup", "call", "slowest": (seconds, name)}} of one run; setup and
    call are None for a JUnit file."""
    cases = _junit_cases(path) if path.endswith(".xml") else _phase_cases(path)
    modules: dict[str, dict] = defaultdict(_entry)
    for module, name, seconds, phases in cases:
        entry = modules[module]
        entry["tests"] += 1
        entry["seconds"] += seconds
        if phases is not None:
            entry["setup"] = (entry["setup"] or 0.0) + phases.get("setup", 0.0)
            entry["call"] = (entry["call"] or 0.0) + phases.get("call", 0.0)
        entry["slowest"] = max(entry["slowest"], (seconds, name))
    return dict(modules)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def table(after: dict[str, dict], before: dict[str, dict] | None = None) -> str:
    names = sorted(set(after) | set(before or {}), key=lambda n: -(after.get(n) or before[n])["seconds"])
    head = "| module | tests | s | setup s | call s | slowest test (s) |"
    if before is not None:
        head = "| module | tests before | s before | tests after | s after | setup s | call s | change s | slowest after (s) |"
    lines = [head, "|---|" + "---:|" * (head.count(" | ") - 1) + "---|"]
    for name in names:
        a = after.get(name, _entry())
        slowest = f"{a['slowest'][1]} ({a['slowest'][0]:.0f})" if a["tests"] else ""
        split = f"{_seconds(a['setup'])} | {_seconds(a['call'])}"
        if before is None:
            lines.append(f"| {name} | {a['tests']} | {a['seconds']:.0f} | {split} | {slowest} |")
        else:
            b = before.get(name, _entry())
            lines.append(
                f"| {name} | {b['tests']} | {b['seconds']:.0f} | {a['tests']} | {a['seconds']:.0f} | {split} | "
                f"{a['seconds'] - b['seconds']:+.0f} | {slowest} |"
            )
    total = {k: sum(m[k] or 0.0 for m in after.values()) for k in ("tests", "seconds", "setup", "call")}
    has_split = any(m["setup"] is not None for m in after.values())
    split = f"{total['setup']:.0f} | {total['call']:.0f}" if has_split else " | "
    if before is None:
        lines.append(f"| **total** | {total['tests']:.0f} | {total['seconds']:.0f} | {split} | |")
    else:
        total_before = sum(m["seconds"] for m in before.values())
        count_before = sum(m["tests"] for m in before.values())
        lines.append(
            f"| **total** | {count_before} | {total_before:.0f} | {total['tests']:.0f} | {total['seconds']:.0f} | "
            f"{split} | {total['seconds'] - total_before:+.0f} | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a phases file (SYNTHRAY_TEST_PHASES) or pytest --junitxml output")
    parser.add_argument("--before", help="an earlier run's phases file or JUnit XML, to compare with")
    args = parser.parse_args(argv)
    print(table(module_times(args.run), module_times(args.before) if args.before else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
