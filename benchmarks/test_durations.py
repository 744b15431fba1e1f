"""Where `make test`'s time goes, per test module: tests, total seconds, the slowest test, from pytest's
JUnit XML (each test case's time is its setup + call + teardown, so a module-scoped fixture counts in the
first test that uses it).

    PYTEST_ADDOPTS=--junitxml=/tmp/main.xml make test    # (the vLLM suite writes the same file after: copy it)
    python -m benchmarks.test_durations /tmp/main.xml [--before /tmp/before.xml] > table.md

With `--before`, the table gains the earlier run's columns and the difference.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from collections import defaultdict


def module_times(path: str) -> dict[str, dict]:
    """{module file: {"tests": n, "seconds": total, "slowest": (seconds, name)}} of one JUnit XML file."""
    modules: dict[str, dict] = defaultdict(lambda: {"tests": 0, "seconds": 0.0, "slowest": (0.0, "")})
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        name = "/".join(module[:2]) + ".py" if len(module) >= 2 else case.get("classname", "?")
        seconds = float(case.get("time", 0))
        entry = modules[name]
        entry["tests"] += 1
        entry["seconds"] += seconds
        entry["slowest"] = max(entry["slowest"], (seconds, case.get("name", "")))
    return dict(modules)


def table(after: dict[str, dict], before: dict[str, dict] | None = None) -> str:
    names = sorted(set(after) | set(before or {}), key=lambda n: -(after.get(n) or before[n])["seconds"])
    if before is None:
        lines = ["| module | tests | s | slowest test (s) |", "|---|---:|---:|---|"]
    else:
        lines = [
            "| module | tests before | s before | tests after | s after | change s | slowest after (s) |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
    for name in names:
        a = after.get(name, {"tests": 0, "seconds": 0.0, "slowest": (0.0, "")})
        slowest = f"{a['slowest'][1]} ({a['slowest'][0]:.0f})" if a["tests"] else ""
        if before is None:
            lines.append(f"| {name} | {a['tests']} | {a['seconds']:.0f} | {slowest} |")
        else:
            b = before.get(name, {"tests": 0, "seconds": 0.0})
            lines.append(
                f"| {name} | {b['tests']} | {b['seconds']:.0f} | {a['tests']} | {a['seconds']:.0f} | "
                f"{a['seconds'] - b['seconds']:+.0f} | {slowest} |"
            )
    total_after = sum(m["seconds"] for m in after.values())
    count_after = sum(m["tests"] for m in after.values())
    if before is None:
        lines.append(f"| **total** | {count_after} | {total_after:.0f} | |")
    else:
        total_before = sum(m["seconds"] for m in before.values())
        count_before = sum(m["tests"] for m in before.values())
        lines.append(
            f"| **total** | {count_before} | {total_before:.0f} | {count_after} | {total_after:.0f} | "
            f"{total_after - total_before:+.0f} | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", help="pytest --junitxml output")
    parser.add_argument("--before", help="an earlier run's --junitxml output, to compare with")
    args = parser.parse_args(argv)
    print(table(module_times(args.junit), module_times(args.before) if args.before else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
