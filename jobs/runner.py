"""What every job shares: its arguments, its config, and its exit codes.

`run_job` parses `--config PATH` and repeatable `--set key.path=value`, loads and validates the config, runs
the job's body and turns what the body raises into one `error: ...` line on stderr and an exit code:

- 0: done.
- 1: the run failed: `JobFailed` (e.g. too many row errors), `RunFailed` (Ray workers lost on every
  attempt), a stage that could not start for a reason other than its config.
- 2: the config or the data cannot run: `ValueError`, `FileNotFoundError` (found before anything is
  written, or a stage's config refused by its model while loading).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class JobFailed(RuntimeError):
    """The job ran, and its result fails a bar the user set, or an unexpected error ended it: exit 1. A
    `__cause__` (an unexpected error) is printed as a traceback before the error line."""


def add_overrides(parser: argparse.ArgumentParser, example: str, what: str = "a config value") -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {what}, e.g. --set {example} (repeatable)",
    )


def add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="the model libraries' loading bars and info logs inside the Ray workers (ray.verbose=true)",
    )


def parse_job_args(
    argv: list[str] | None,
    prog: str,
    description: str,
    default_config: str | None,
    example: str,
    verbose: bool = True,
) -> argparse.Namespace:
    """The arguments every job takes: `--config PATH`, repeatable `--set key.path=value` and, for jobs whose
    config has a `ray` section, `--verbose` (added to the overrides as ray.verbose=true)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if default_config is None:
        parser.add_argument("--config", required=True, help="YAML config")
    else:
        parser.add_argument(
            "--config", default=default_config, help=f"YAML config (default {default_config})"
        )
    add_overrides(parser, example)
    if verbose:
        add_verbose(parser)
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        args.overrides.append("ray.verbose=true")
    return args


def run_job(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    config_cls: type[ConfigT],
    default_config: str | None,
    example: str,
    body: Callable[[ConfigT], None],
) -> int:
    """Parse, load `config_cls`, run `body(config)`; returns the exit code (module docstring)."""
    from engine.config import load_config
    from engine.run.failures import RunFailed, StageSetupError

    # 1. Arguments (`--help` answers here), 2. config, 3. the job.
    args = parse_job_args(argv, prog, description, default_config, example, "ray" in config_cls.model_fields)
    try:
        body(load_config(config_cls, args.config, args.overrides))
    except StageSetupError as err:
        print(f"error: {err.summary()}", file=sys.stderr)
        return EXIT_CONFIG if err.config_mistake else EXIT_FAILED
    except (JobFailed, RunFailed) as err:
        if err.__cause__ is not None:
            traceback.print_exception(err.__cause__)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
