"""Kill `synthray finetune` mid-run and run the same command again: it resumes from the last checkpoint Ray
Train recorded (not step 0) and ends at `max_steps`.

The job runs as a user runs it, `python -m jobs.finetune --config ... --set ...` in a subprocess with its own
local Ray, on a generation run's shards (subject crops from the masks its real rows carry). Once Ray Train
has recorded a checkpoint (its `checkpoint_manager_snapshot.json` in the run folder names one: what a rerun
resumes from; a checkpoint folder alone may not be recorded yet), the job's process group and every process
the job started get SIGKILL: Ray's workers (the training workers, Ray Train's controller) run in sessions of
their own, and left alive they go on training and recording checkpoints after the driver is gone.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.test_finetune import write_run_shards

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 100
EVERY_STEPS = 4
NO_MASK = "train/circle/circle_0001.png"  # one real row the segmenter found nothing in
RUN_TIMEOUT_S = 600


def finetune_command(data: Path, models: Path, out: Path) -> list[str]:
    settings = [
        f"data={{format: shards, path: {data}}}",
        "subject_only=true",
        f"model.id={models / 'sd15'}",
        f"output.path={out}",
        f"max_steps={MAX_STEPS}",
        f"checkpoint.every_steps={EVERY_STEPS}",
        "checkpoint.num_to_keep=100",  # keep the one the rerun resumes from, to compare with
        "log_every=1",
        "scaling.controller_poll_s=0.2",  # Ray Train records a checkpoint at its next poll
    ]
    config = ROOT / "configs" / "finetune_ti_tiny_cpu.yaml"
    return [sys.executable, "-m", "jobs.finetune", "--config", str(config), *(f"--set={s}" for s in settings)]


def recorded_checkpoint(run_dir: Path) -> dict | None:
    """The latest checkpoint in Ray Train's snapshot (what a rerun resumes from), None before the first."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return None
    return snapshot.get("latest_checkpoint_result")


def process_tree(root: int) -> list[int]:
    """`root` and every process it started, and they started (Ray's GCS and raylet, the raylet's workers)."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True)
    children = defaultdict(list)
    for line in ps.stdout.splitlines():
        pid, ppid = (int(n) for n in line.split())
        children[ppid].append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children[pid]
    return tree


def kill_job(job: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGKILL to the job's process group and to every process of its tree, then wait until none runs."""
    tree = process_tree(job.pid)
    os.killpg(job.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True)
        alive = [
            int(pid) for pid, stat in (line.split() for line in ps.stdout.splitlines()) if "Z" not in stat
        ]
        left = sorted(set(tree) & set(alive))
        if not left:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed job still run: {left}")


@pytest.mark.slow  # a job on a Ray of its own: slow as the shared Ray's tests are (SHARED_RAY_FIXTURES, conftest)
def test_killed_job_resumes_from_its_last_recorded_checkpoint(toy, tiny_models_dir, tmp_path):
    data = write_run_shards(toy, tmp_path / "gen", no_mask={NO_MASK})
    out = tmp_path / "out"
    run_dir = out / "ti-tiny"
    command = finetune_command(data, tiny_models_dir, out)

    # 1. Start, wait for a recorded checkpoint, kill the job and every process it started.
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (latest := recorded_checkpoint(run_dir)) is None:
            assert job.poll() is None, (
                f"the job ended before a checkpoint:\n{(tmp_path / 'killed.log').read_text()}"
            )
            assert time.monotonic() < deadline, "no checkpoint recorded in time"
            time.sleep(0.05)
        kill_job(job)
    latest = recorded_checkpoint(run_dir)  # it may have moved on between the poll and the kill
    step = latest["metrics"]["step"]
    assert not (run_dir / "finetune.json").exists(), "the job finished before it was killed"
    assert 0 < step < MAX_STEPS and step % EVERY_STEPS == 0
    killed_state = json.loads((run_dir / latest["checkpoint_dir_name"] / "state.json").read_text())
    assert killed_state["step"] == step

    # 2. The same command again.
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    report = json.loads((run_dir / "finetune.json").read_text())
    assert report["resumed_from_step"] == step and report["steps"] == MAX_STEPS
    assert [(s["from_step"], s["to_step"]) for s in report["segments"]] == [(0, step), (step, MAX_STEPS)]
    assert len(report["loss_history"]) == MAX_STEPS
    assert report["loss_history"][:step] == killed_state["loss_history"]
    assert f"{MAX_STEPS} steps (resumed at step {step})" in rerun.stdout
    logged = [int(n) for n in re.findall(r"finetune step (\d+)/", rerun.stdout + rerun.stderr)]
    assert logged and logged[0] == step + 1 and logged[-1] == MAX_STEPS, logged

    # The shards' real rows, as subject crops: the circle without a mask counted and left out.
    assert report["images_per_class"] == {"circle": 3, "cross": 4, "diamond": 4}
    assert report["skipped_rows"] == {"no_mask": 1}
    assert (run_dir / "textual_inversion.safetensors").exists()
