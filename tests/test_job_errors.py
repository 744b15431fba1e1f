"""Mistakes a user makes first: one line on stderr, exit 2, and nothing written; a failed run exits 1.

The generation job runs as a subprocess (`python -m jobs.generate`), as a user or `ray job submit` would.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import demo_overrides

ROOT = Path(__file__).resolve().parents[1]


def generate(toy: Path, tiny: Path, out: Path, *extra: str, timeout: int = 300):
    sets = [*demo_overrides(toy, tiny, out), "ray.num_cpus=2", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "jobs.generate", *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result, time.monotonic() - start


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("data.path=/nonexistent/dataset", "data.path /nonexistent/dataset does not exist"),
        ("prompt.model.id=/nonexistent/llm", "prompt.model model not found at /nonexistent/llm"),
        ("recipe=nosuchrecipe", "unknown recipe 'nosuchrecipe'; available: aga"),
        ("prompt.backend=vllm", "vLLM is not installed in this environment"),
    ],
)
def test_user_error_is_one_line_exit_2_before_ray_and_nothing_written(
    toy, tiny_models_dir, tmp_path, override, says
):
    out = tmp_path / "out"
    result, _ = generate(toy, tiny_models_dir, out, override)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1 and says in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout  # found before Ray started
    assert not out.exists(), "nothing may be written on a user error"


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_stage_that_cannot_load_fails_once_naming_the_stage(toy, tiny_models_dir, tmp_path):
    """background.height=60 is refused by the SDXL actor's constructor (not a multiple of the VAE's 8): the
    run ends at the first attempt with that message, not as 'Ray workers were lost' after 3 attempts."""
    result, _ = generate(toy, tiny_models_dir, tmp_path / "out", "background.height=60", "data.max_images=4")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr[-3000:]
    assert "stage 'background' could not start: ValueError" in lines[0]
    assert "multiples of 8" in lines[0]
    assert "lost Ray workers" not in result.stderr


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_run_over_max_error_fraction_exits_1_and_a_missing_split_is_a_note(toy, tiny_models_dir, tmp_path):
    """The run itself went (exit 1, not 2): every row is missing its required dataset mask. The split with no
    folder is skipped with a note, not an error (one job for both: each costs a job's start-up)."""
    result, _ = generate(
        toy,
        tiny_models_dir,
        tmp_path / "out",
        f"data.masks_path={tmp_path / 'no-masks-here'}",
        "segment.use_dataset_masks=true",
        "data.splits=[train,holdout]",
        "data.max_images=4",
        "max_error_fraction=0.5",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "split 'holdout' has no folder" in result.stdout + result.stderr
    assert "above max_error_fraction" in error_lines(result)[-1]
    assert (tmp_path / "out" / "errors.parquet").exists()


@pytest.mark.parametrize(("errors", "fails"), [(800, True), (799, False)])
def test_a_run_whose_every_synthetic_row_failed_fails_under_any_error_bar(monkeypatch, errors, fails):
    """AGA on 2320 sources, 400 of them train (K=2: 800 synthetic rows): 800 background errors are 34% of the
    sources, under a 50% bar, yet the run wrote no synthetic row at all (found by the efficacy sweep)."""
    from types import SimpleNamespace

    import engine.pipeline
    import engine.run.report
    from engine.run.report import RunReport
    from jobs.generate import generate as generate_job
    from jobs.runner import JobFailed

    report = RunReport(
        {
            "rows": {
                "real_in": 2320,
                "synthetic_generated_this_run": 800,
                "synthetic_errors_this_run": errors,
            },
            "stages": {},
            "errors": {
                "total": errors,
                "by_stage": {"background": errors},
                "by_reason": {"exception": errors},
            },
            "output": {"errors": "out/errors.parquet"},
        }
    )
    monkeypatch.setattr(engine.pipeline, "prepare_run", lambda config: None)
    monkeypatch.setattr(engine.pipeline, "run_generate", lambda config, plan: report)
    monkeypatch.setattr(engine.run.report, "print_summary", lambda report: None)
    # What generate() reads past the (patched) run; the AGA CPU preset's bar.
    config = SimpleNamespace(filter=None, max_error_fraction=0.5)
    assert report.error_fraction < config.max_error_fraction
    if fails:
        with pytest.raises(JobFailed, match="every one of the 800 synthetic rows .*'background': 800"):
            generate_job(config)
    else:
        generate_job(config)
