"""Generation job: `python -m jobs.generate --config configs/aga_tiny_cpu.yaml [--set key=value ...]`.

Also the entry for `ray job submit --working-dir . -- python -m jobs.generate --config ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.config import GenerateConfig, load_config, parse_job_args

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "aga_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> int:
    from engine.pipeline import run_generate
    from engine.report import print_summary

    # 1. Config.
    args = parse_job_args(argv, "synthray generate", __doc__, str(DEFAULT_CONFIG), "num_variants=5")
    try:
        config = load_config(GenerateConfig, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # 2. Run, 3. report.
    report = run_generate(config)
    print_summary(report)
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
