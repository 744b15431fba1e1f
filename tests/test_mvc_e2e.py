"""MVC on the path a user takes, on one local Ray: caption (BLIP-2) -> fine-tune the image-conditioned UNet
(method mvc) -> generate from mixed caption embeddings with both models -> train with MVC's three strategies.
The pieces without Ray: tests/test_mvc.py, tests/test_mvc_mix.py, tests/test_finetune_mvc.py."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(ray4, toy, tiny_models_dir, tmp_path_factory) -> dict:
    from engine.finetune.config import FinetuneConfig
    from engine.pipeline import run_generate
    from jobs.finetune import run_finetune

    base = tmp_path_factory.mktemp("mvc")
    common = [f"data.path={toy}", "output.gallery_classes=0", "ray.progress_bars=false"]
    captions = run_generate(
        load_config(
            GenerateConfig,
            ROOT / "configs" / "mvc_caption_tiny_cpu.yaml",
            [*common, f"output.path={base / 'captions'}", f"caption.model.id={tiny_models_dir / 'blip2'}"],
        )
    ).data
    finetune = run_finetune(
        load_config(
            FinetuneConfig,
            ROOT / "configs" / "finetune_mvc_tiny_cpu.yaml",
            [
                f"data.path={base / 'captions' / 'data'}",
                f"model.id={tiny_models_dir / 'sd15'}",
                f"output.path={base / 'finetune'}",
                "max_steps=2",
                "ray.progress_bars=false",
            ],
        )
    )
    generated = run_generate(
        load_config(
            GenerateConfig,
            ROOT / "configs" / "mvc_tiny_cpu.yaml",
            [
                *common,
                f"output.path={base / 'mvc'}",
                f"mvc.captions={base / 'captions' / 'data'}",
                f"mvc.model.id={Path(finetune['run_dir']) / 'pipeline'}",
                f"mvc.pretrained.id={tiny_models_dir / 'sd15'}",
                "mvc.num_inference_steps=2",
            ],
        )
    ).data
    return {"captions": (captions, base / "captions"), "mvc": (generated, base / "mvc")}


def test_captions_land_in_their_column_and_feed_both_generators(runs):
    report, out = runs["captions"]
    assert report["errors"]["total"] == 0 and report["rows"]["synthetic_written"] == 0
    rows = pq.read_table(out / "data").to_pylist()
    train = [r for r in rows if r[schema.SPLIT] == "train"]
    assert len(train) == 12 and all(
        r[schema.CAPTION].startswith(f"This is an image of {r[schema.CLASS_NAME]}.") for r in train
    )
    assert all(r[schema.CAPTION] is None for r in rows if r[schema.SPLIT] != "train")

    report, out = runs["mvc"]
    assert report["errors"]["total"] == 0, report["errors"]
    synthetic = [r for r in pq.read_table(out / "data").to_pylist() if r[schema.RECIPE] == "mvc"]
    assert len(synthetic) == 12 * 2
    captions = {r[schema.CAPTION] for r in train}
    params = [json.loads(r[schema.PARAMS])["mvc"] for r in synthetic]
    assert {p["source"] for p in params} == {"finetuned", "pretrained"}
    for row, p in zip(synthetic, params, strict=True):
        assert row[schema.PROMPT] in captions and row[schema.PROMPT].startswith(
            f"This is an image of {row[schema.CLASS_NAME]}."
        )
        if p["source"] == "finetuned":
            assert (
                p["mixed"] and p["partner"].split("/")[1] == row[schema.CLASS_NAME]
            )  # a real image of the class
        assert (row[schema.WIDTH], row[schema.HEIGHT]) == (32, 32)


@pytest.mark.parametrize("strategy", ["concat", "rsp", "two_phase"])
def test_training_runs_mvcs_strategies(runs, tmp_path, strategy):
    from engine.train.config import TrainConfig
    from jobs.train import run_training

    _, out = runs["mvc"]
    config = load_config(
        TrainConfig,
        ROOT / "configs" / "train_toy_cpu.yaml",
        [
            f"data.paths=[{out / 'data'}]",
            f"output.path={tmp_path}",
            f"mix.strategy={strategy}",
            "mix.rsp_prob=0.8",
            "mix.phase2_epochs=1",
            "epochs=2",
            "data.image_size=32",
        ],
    )
    metrics = run_training(config)
    synthetic = [p["synthetic"] for p in metrics["plan"]]
    assert synthetic[0] > 0, metrics["plan"]
    if strategy == "two_phase":
        assert synthetic[1] == 0  # phase 2: real rows only


def test_gallery_shows_each_conditioned_row_after_its_condition(runs, tmp_path):
    import html

    import numpy as np
    from PIL import Image

    from engine.run.gallery import _thumbnail, write_gallery

    _, out = runs["mvc"]
    rows = {r[schema.ID]: r for r in pq.read_table(out / "data").to_pylist()}
    page = Path(write_gallery(out / "data", tmp_path, max_classes=3)).read_text()
    # Each tile: (its label, the row id it shows, its image file).
    tiles = [
        (
            f.split("<b>")[1].split("</b>")[0],
            f.split('title="')[1].split('"')[0],
            f.split('src="')[1].split('"')[0],
        )
        for f in page.split("<figure>")[1:]
    ]
    labels = [label for label, _, _ in tiles]
    assert "mvc finetuned" in labels and "mvc pretrained" in labels
    assert labels.count("condition") == labels.count("mvc finetuned")
    for i, (label, row_id, _) in enumerate(tiles):
        if label != "mvc finetuned":
            continue
        partner = json.loads(rows[row_id][schema.PARAMS])["mvc"]["partner"]
        condition_label, condition_id, image = tiles[i - 1]
        assert condition_label == "condition" and rows[condition_id][schema.SOURCE_ID] == partner
        assert rows[condition_id][schema.RECIPE] == schema.RECIPE_REAL
        shown = np.asarray(Image.open(tmp_path / image).convert("RGB"))
        assert np.array_equal(shown, np.asarray(_thumbnail(rows[condition_id][schema.IMAGE])))
        assert html.escape(rows[row_id][schema.PROMPT]) in page  # its caption is the tile's text
