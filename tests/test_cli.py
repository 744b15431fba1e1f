"""The `synthray` command (the installed console script, jobs/cli.py): every subcommand reaches its own job,
arguments pass through, and the job's exit status is the command's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SYNTHRAY = Path(sys.executable).with_name("synthray")


def synthray(*args: str) -> subprocess.CompletedProcess:
    assert SYNTHRAY.exists(), f"{SYNTHRAY}: the console script is not installed (pip install -e .)"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(SYNTHRAY), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command():
    result = synthray("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in result.stdout, name


def test_unknown_command_is_a_usage_error():
    result = synthray("generte")
    assert result.returncode == 2
    assert "unknown command 'generte'; available: generate," in result.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_reaches_its_own_job(command):
    """`synthray <command> --help` is that job's own argument parser (named after the command)."""
    result = synthray(command, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    usage = result.stdout.lstrip().splitlines()[0]
    assert usage.startswith("usage:") and command in usage, result.stdout[:500]
    assert "commands:" not in result.stdout, "the dispatcher's own help, not the job's"


def test_arguments_and_exit_status_pass_through(tmp_path):
    result = synthray("generate", "--set", f"data.path={tmp_path / 'no-such-dataset'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: data.path {tmp_path / 'no-such-dataset'} does not exist" in result.stderr
