"""Generation job: `python -m jobs.generate --config configs/aga_tiny_cpu.yaml [--set key=value ...]`.

Also the entry for `ray job submit --working-dir . -- python -m jobs.generate --config ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.config import GenerateConfig
from jobs.runner import JobFailed, run_job

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "aga_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    """Exit 0: the run finished within max_error_fraction. 1: the run failed (too many row errors, lost
    workers every attempt, a stage that could not start for a reason other than its config). 2: the config
    or the data cannot run (found before Ray starts and before anything is written, or a stage's config
    refused by its model while loading)."""
    return run_job(
        argv,
        prog="synthray generate",
        description=__doc__,
        config_cls=GenerateConfig,
        default_config=str(DEFAULT_CONFIG),
        example="num_variants=5",
        body=generate,
    )


def generate(config: GenerateConfig) -> None:
    from engine.pipeline import prepare_run, run_generate
    from engine.run.failures import ConfigError
    from engine.run.report import print_summary

    # 1. Every check that needs no Ray (a ValueError here: exit 2).
    plan = prepare_run(config)
    # 2. Run: past this point only a ConfigError is the config's fault.
    try:
        report = run_generate(config, plan)
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, ConfigError):
            raise
        raise JobFailed(f"the run stopped: {type(err).__name__}: {err}") from err
    # 3. Report, and the user's bars.
    print_summary(report)
    if config.filter is not None and report.filtered_fraction > config.filter.max_filtered_fraction:
        filtered = report.data["filtered"]
        raise JobFailed(
            f"the filter dropped {filtered['total']} of {report.data['stages']['filter']['rows_in']} "
            f"synthetic rows ({report.filtered_fraction:.1%}), above filter.max_filtered_fraction="
            f"{config.filter.max_filtered_fraction:.1%}: {filtered['by_rule']} (a broken generator?); see "
            f"{report.data['output']['filtered']}"
        )
    if report.all_synthetic_failed:
        errors = report.data["errors"]
        raise JobFailed(
            f"every one of the {report.data['rows']['synthetic_generated_this_run']} synthetic rows this run "
            f"generated failed (by stage {errors['by_stage']}, by reason {errors['by_reason']}); see "
            f"{report.data['output']['errors']}"
        )
    if report.error_fraction > config.max_error_fraction:
        raise JobFailed(
            f"{report.data['errors']['total']} of {report.data['rows']['real_in']} rows failed "
            f"({report.error_fraction:.1%}), above max_error_fraction={config.max_error_fraction:.1%}; "
            f"see {report.data['output']['errors']}"
        )


if __name__ == "__main__":
    sys.exit(main())
