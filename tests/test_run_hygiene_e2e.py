"""One generation run as a user starts it (`python -m jobs.generate`, Ray started by the job itself), then
what it left behind is read: outputs, run.json and Ray's own session logs.

- The hub token (HF_TOKEN, in the environment before Ray starts, so every Ray process inherits it) appears in
  no output file, not in the job's console output and not in any file of the Ray session.
- Output file names never carry data values: class names and source file names hold a marker that appears
  in the shards' columns but in no path under the output folder.
- The config's `ray.num_cpus` and `ray.env_vars` reach the cluster (`init_ray` starts it here; the other
  tests' fixtures start Ray first, so `init_ray` returns early there).
- Mixed-size, non-square images go through every stage: each synthetic row keeps its source's size, and its
  mask is the image's size.
- The console of a healthy run, piped as a job log is, holds nothing that reads as a failure: no model
  libraries' loading bars, no 77-token warnings, no deprecation warning from the project's own calls; the
  summary, with where the outputs are, comes last. `--verbose` brings the loading bars back.

Ray's session folder is found through RAY_TMPDIR, set to a fresh short folder (Unix socket paths have a
length limit) so only this run's session is there.
"""

import io
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import schema

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLASS_MARKER = "zqclassmarker"  # a class name
FILE_MARKER = "zqfilemarker"  # in every source file name
PROBE = "SYNTHRAY_PROBE"
# (height, width): landscape, portrait, square, odd sizes; each class gets all of them.
SIZES = [(40, 56), (64, 36), (48, 48), (33, 50)]


def make_dataset(root: Path) -> dict[str, tuple[int, int]]:
    """An image folder (train split, two classes) with masks; returns source id -> (height, width)."""
    rng = np.random.default_rng(0)
    sizes = {}
    for cls in (CLASS_MARKER, "plain"):
        for i, (h, w) in enumerate(SIZES):
            name = f"{FILE_MARKER}_{i}.png"
            for folder in (root / "train" / cls, root / "masks" / "train" / cls):
                folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / "train" / cls / name)
            mask = np.zeros((h, w), np.uint8)
            mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
            Image.fromarray(mask).save(root / "masks" / "train" / cls / name)
            sizes[f"train/{cls}/{name}"] = (h, w)
    return sizes


@pytest.fixture(scope="module")
def run(tiny_models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("hygiene-data")
    out = tmp_path_factory.mktemp("hygiene") / "out"
    sizes = make_dataset(data)
    ray_tmp = Path(tempfile.mkdtemp(prefix="srh-", dir="/tmp"))
    token = f"hf_canary_{secrets.token_hex(12)}"
    probe = f"probe_{secrets.token_hex(6)}"
    tiny = tiny_models_dir
    sets = [
        f"data.path={data}",
        f"data.masks_path={data / 'masks'}",
        "data.splits=[train]",
        "data.expand_splits=[train]",
        f"output.path={out}",
        "output.gallery_classes=2",  # the gallery writes files per class: their names are checked too
        "ray.progress_bars=false",
        "ray.num_cpus=3",
        f"ray.env_vars={{{PROBE}: {probe}}}",
        f"segment.detector.id={tiny / 'grounding-dino'}",
        f"segment.sam.id={tiny / 'sam'}",
        f"prompt.model.id={tiny / 'llm'}",
        f"background.model.id={tiny / 'sdxl'}",
        "background.height=32",
        "background.width=32",
        "background.num_inference_steps=1",
    ]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": token,
        "RAY_TMPDIR": str(ray_tmp),
    }
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-W", "default", "-m", "jobs.generate", *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sessions = sorted((ray_tmp / "ray").glob("session_2*"))
    assert len(sessions) == 1, sessions
    yield {
        "out": out,
        "result": result,
        "token": token,
        "probe": probe,
        "sizes": sizes,
        "logs": sessions[0] / "logs",
        "session": sessions[0],
        "sets": sets,
        "env": env,
    }
    shutil.rmtree(ray_tmp, ignore_errors=True)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def files_containing(folder: Path, needle: str) -> list[Path]:
    data = needle.encode()
    return [p for p in files_under(folder) if data in p.read_bytes()]


def test_hub_token_in_no_output_no_console_and_no_ray_log(run):
    token, out, logs = run["token"], run["out"], run["logs"]
    assert (out / "run.json").exists() and (out / "config.yaml").exists()
    # The logs are this run's (its stages' workers wrote them), so the scan below reads something real.
    assert list(logs.glob("python-core-worker-*.log")) and files_containing(logs, "MapBatches(prompt)")
    leaks = {
        "output files": files_containing(out, token),
        "console": token in run["result"].stdout + run["result"].stderr,
        "ray session files": files_containing(run["session"], token),
    }
    assert not any(leaks.values()), leaks


def test_output_file_names_carry_no_data_values(run):
    out = run["out"]
    rows = pq.read_table(out / "data", columns=[schema.CLASS_NAME, schema.SOURCE_ID]).to_pylist()
    # The markers are data: in the columns ...
    assert any(r[schema.CLASS_NAME] == CLASS_MARKER for r in rows)
    assert all(FILE_MARKER in r[schema.SOURCE_ID] for r in rows)
    assert list((out / "gallery").rglob("*.png")), "the gallery wrote per-image files"
    # ... and in no path under the output folder.
    for path in out.rglob("*"):
        relative = str(path.relative_to(out))
        assert CLASS_MARKER not in relative and FILE_MARKER not in relative, relative


def test_config_ray_settings_reach_the_cluster(run):
    """`ray.num_cpus: 3` is the local cluster's CPU count (the raylet's resource dump), and `ray.env_vars`
    is in the job's runtime environment (which Ray's runtime-env agent logs with its values: why secrets
    never go in env_vars, and config refuses HF_TOKEN there)."""
    logs = run["logs"]
    raylet = (logs / "raylet.out").read_text(errors="replace")
    assert "CPU: 3," in raylet or "CPU: 3}" in raylet, raylet[-2000:]
    assert files_containing(logs, run["probe"]), f"{PROBE} from ray.env_vars never reached Ray"


def test_mixed_size_non_square_images_keep_their_size(run):
    rows = pq.read_table(run["out"] / "data").to_pylist()
    sizes = run["sizes"]
    synthetic = [r for r in rows if r[schema.RECIPE] != schema.RECIPE_REAL]
    real = [r for r in rows if r[schema.RECIPE] == schema.RECIPE_REAL]
    assert len(real) == len(sizes) and len(synthetic) == 2 * len(sizes)  # num_variants: 2, no errors
    for r in rows:
        h, w = sizes[r[schema.SOURCE_ID]]
        image = Image.open(io.BytesIO(r[schema.IMAGE]))
        assert (r[schema.HEIGHT], r[schema.WIDTH]) == (h, w) and image.size == (w, h), r[schema.SOURCE_ID]
        assert Image.open(io.BytesIO(r[schema.MASK])).size == (w, h), r[schema.SOURCE_ID]


LIBRARY_CHATTER = (
    "Loading pipeline components",  # diffusers
    "Loading weights",  # transformers 5
    "Token indices sequence length is longer",  # a CLIP tokenizer reading a prompt past 77 tokens
    "The following part of your input was truncated",  # diffusers' CLIP text encoding
)


def test_a_healthy_runs_console_holds_no_library_chatter_and_ends_with_the_summary(run):
    import re

    console = run["result"].stdout + run["result"].stderr
    assert not [c for c in LIBRARY_CHATTER if c in console], [c for c in LIBRARY_CHATTER if c in console]
    # Warnings are shown (-W default): none may come from a call site of this project.
    own = re.findall(
        r"(?:engine|actors|jobs)/[\w/]+\.py:\d+: \w*(?:Deprecation|Future)Warning[^\n]*", console
    )
    assert not own, own
    last = [line for line in run["result"].stdout.splitlines() if line.strip()][-3:]
    assert any(str(run["out"]) in line for line in last), last


def test_verbose_brings_the_loading_bars_back(run, tmp_path):
    sets = [s for s in run["sets"] if not s.startswith("output.path=")] + [f"output.path={tmp_path / 'out'}"]
    result = subprocess.run(
        [sys.executable, "-m", "jobs.generate", "--verbose", *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT,
        env={**run["env"], "RAY_TMPDIR": tempfile.mkdtemp(prefix="srv-", dir="/tmp")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    console = result.stdout + result.stderr
    assert "Loading pipeline components" in console and "Loading weights" in console
