"""Generation job: `python -m jobs.generate --config configs/aga_tiny_cpu.yaml [--set key=value ...]`.

Also the entry for `ray job submit --working-dir . -- python -m jobs.generate --config ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.config import GenerateConfig, load_config, parse_job_args

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "aga_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    """Exit 0: the run finished within max_error_fraction. 1: the run failed (too many row errors, lost
    workers every attempt, a stage that could not start for a reason other than its config). 2: the config
    or the data cannot run (found before Ray starts and before anything is written, or a stage's config
    refused by its model while loading)."""
    from engine.failures import ConfigError, RunFailed, StageSetupError
    from engine.pipeline import prepare_run, run_generate
    from engine.report import print_summary

    # 1. Config, and every check that needs no Ray.
    args = parse_job_args(argv, "synthray generate", __doc__, str(DEFAULT_CONFIG), "num_variants=5")
    try:
        config = load_config(GenerateConfig, args.config, args.overrides)
        plan = prepare_run(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # 2. Run, 3. report.
    try:
        report = run_generate(config, plan)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StageSetupError as err:
        print(f"error: {err.summary()}", file=sys.stderr)
        return 2 if err.config_mistake else 1
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_summary(report)
    if config.filter is not None and report.filtered_fraction > config.filter.max_filtered_fraction:
        filtered = report.data["filtered"]
        print(
            f"error: the filter dropped {filtered['total']} of {report.data['stages']['filter']['rows_in']} "
            f"synthetic rows ({report.filtered_fraction:.1%}), above filter.max_filtered_fraction="
            f"{config.filter.max_filtered_fraction:.1%}: {filtered['by_rule']} (a broken generator?); see "
            f"{report.data['output']['filtered']}",
            file=sys.stderr,
        )
        return 1
    if report.error_fraction > config.max_error_fraction:
        print(
            f"error: {report.data['errors']['total']} of {report.data['rows']['real_in']} rows failed "
            f"({report.error_fraction:.1%}), above max_error_fraction={config.max_error_fraction:.1%}; "
            f"see {report.data['output']['errors']}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
