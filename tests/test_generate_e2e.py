"""End to end: the AGA recipe on a local Ray cluster, tiny models, the toy dataset; shards read back."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = pytest.mark.slow


def tiny_config(toy, tiny_models_dir, out, *overrides):
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
            f"background.model.id={tiny_models_dir / 'sdxl'}",
            "background.height=32",
            "background.width=32",
            "background.num_inference_steps=2",
            *overrides,
        ],
    )


def test_aga_end_to_end(ray_local, toy, tiny_models_dir, tmp_path, monkeypatch):
    from engine.pipeline import run_generate

    monkeypatch.setenv("HF_TOKEN", "hf_canary_token_value")

    # A corrupt file in the train split must become an error row, not a crash. Planted in this test's own
    # copy of the dataset, so the module's other tests see the toy dataset as it was made.
    toy = Path(shutil.copytree(toy, tmp_path / "toy"))
    (toy / "train" / "circle" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    config = tiny_config(toy, tiny_models_dir, tmp_path / "out", "segment.use_dataset_masks=false")
    report = run_generate(config)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run == report.data

    real_train = 3 * 4 + 1
    assert run["rows"]["real_in"] == real_train + 3 * 2 * 2
    assert run["errors"]["by_reason"].get("decode") == 1
    # Every synthetic row the run owed is either written or accounted for as an error.
    pre_expansion_errors = sum(
        1
        for r in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
        if r["stage"] in ("decode", "segment")
    )
    train_errors = pre_expansion_errors  # the only pre-expansion errors here are in train
    assert run["rows"]["synthetic_written"] == run["rows"]["synthetic_expected"]
    later = run["errors"]["total"] - pre_expansion_errors
    assert run["rows"]["synthetic_written"] == (real_train - train_errors) * 2 - later

    # The shards: one schema, read back by pyarrow and by Hugging Face datasets.
    table = pq.read_table(tmp_path / "out" / "data")
    assert table.schema.field(schema.IMAGE).type == schema.OUTPUT_SCHEMA.field(schema.IMAGE).type
    rows = table.to_pylist()
    synthetic = [r for r in rows if r[schema.RECIPE] == "aga"]
    assert len(synthetic) == run["rows"]["synthetic_written"] > 0
    assert all(r[schema.SPLIT] == "train" for r in synthetic)
    assert len({r[schema.ID] for r in rows}) == len(rows)
    real_ids = {r[schema.SOURCE_ID] for r in rows if r[schema.RECIPE] == "real"}
    for r in synthetic:
        assert r[schema.SOURCE_ID] in real_ids
        assert r[schema.MASK] is not None and r[schema.PROMPT]
        assert json.loads(r[schema.MODELS])["background"].endswith("@local")
        assert "composite_params" in json.loads(r[schema.PARAMS])

    from datasets import load_dataset

    hf = load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert len(hf) == len(rows)
    first = hf[0]
    assert isinstance(first[schema.LABEL], int) and first[schema.CLASS_NAME]
    assert set(schema.OUTPUT_SCHEMA.names) <= set(hf.column_names)

    # Images decode and match their recorded size; masks align with images.
    import io

    from PIL import Image

    r = synthetic[0]
    img = Image.open(io.BytesIO(r[schema.IMAGE]))
    mask = np.asarray(Image.open(io.BytesIO(r[schema.MASK])))
    assert img.size == (r[schema.WIDTH], r[schema.HEIGHT]) and mask.shape == (
        r[schema.HEIGHT],
        r[schema.WIDTH],
    )

    assert (tmp_path / "out" / "gallery" / "index.html").exists()
    assert (tmp_path / "out" / "gallery" / "contact_sheet.png").exists()
    assert (tmp_path / "out" / "config.yaml").exists()
    # The hub token in the driver's environment appears in no output file (set before Ray starts, and
    # Ray's logs read too: tests/test_run_hygiene_e2e.py).
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"hf_canary_token_value" not in path.read_bytes(), path


def test_dataset_masks_subject_is_pasted_intact(ray_local, toy, tiny_models_dir, tmp_path):
    """With the dataset's masks, each synthetic row's mask covers the real subject's colour."""
    import io

    from PIL import Image

    from engine.pipeline import run_generate

    config = tiny_config(
        toy, tiny_models_dir, tmp_path / "out", "data.splits=[train]", "composite.feather_px=0"
    )
    run = run_generate(config).data
    # With the dataset's masks nothing is segmented, and the toy dataset has no bad file.
    assert "segment" not in run["stages"] and run["errors"]["total"] == 0, run["errors"]
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    real = {r[schema.SOURCE_ID]: r for r in rows if r[schema.RECIPE] == "real"}
    synthetic = [r for r in rows if r[schema.RECIPE] == "aga"]
    assert len(synthetic) == 2 * len(real)

    def pixels(row, key):
        return np.asarray(Image.open(io.BytesIO(row[key])))

    for row in synthetic[:6]:
        src = real[row[schema.SOURCE_ID]]
        subject_colour = pixels(src, schema.IMAGE)[pixels(src, schema.MASK) > 0].mean(axis=0)
        pasted = pixels(row, schema.IMAGE)[pixels(row, schema.MASK) > 0].mean(axis=0)
        assert np.abs(subject_colour - pasted).max() < 25, (subject_colour, pasted)


def test_same_config_and_seed_give_byte_identical_shards(ray_local, toy, tiny_models_dir, tmp_path):
    from engine.pipeline import run_generate

    def shards(out):
        return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.parquet"))}

    overrides = ("data.splits=[train]", "output.rows_per_shard=8", "data.rows_per_block=4")
    for name in ("a", "b"):
        run_generate(tiny_config(toy, tiny_models_dir, tmp_path / name, *overrides))
    first, second = shards(tmp_path / "a"), shards(tmp_path / "b")
    assert len(first) > 2
    assert first == second
