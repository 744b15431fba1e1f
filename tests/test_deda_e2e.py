"""De-DA on the path a user takes, on one local Ray: decouple (GroundingDINO + SAM, no dataset masks) ->
textual inversion on the run's subjects for a few steps -> decouple again with the CDPs edited with those
tokens -> train with the online recombination. The pieces' rules without Ray are tests/test_deda.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def deda_config(toy: Path, models: Path, out: Path, *extra: str) -> GenerateConfig:
    return load_config(
        GenerateConfig,
        ROOT / "configs" / "deda_tiny_cpu.yaml",
        [
            f"data.path={toy}",
            f"output.path={out}",
            f"segment.detector.id={models / 'grounding-dino'}",
            f"segment.sam.id={models / 'sam'}",
            f"generation.model.id={models / 'sd15'}",
            "generation.num_inference_steps=2",
            "output.gallery_classes=0",
            "ray.progress_bars=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def runs(ray4, toy, tiny_models_dir, tmp_path_factory) -> dict:
    from engine.finetune.config import FinetuneConfig
    from engine.pipeline import run_generate
    from jobs.finetune import run_finetune

    base = tmp_path_factory.mktemp("deda")
    # 1. Decouple only (no edit): CDPs and CIPs, and the real rows' masks for the tokens.
    first = deda_config(toy, tiny_models_dir, base / "decouple")
    first = first.model_copy(update={"generation": None})
    decouple = run_generate(first).data
    # 2. The class tokens on the isolated subjects of run 1.
    ti = run_finetune(
        load_config(
            FinetuneConfig,
            ROOT / "configs" / "finetune_ti_deda_tiny_cpu.yaml",
            [
                f"data.path={base / 'decouple' / 'data'}",
                f"model.id={tiny_models_dir / 'sd15'}",
                f"output.path={base / 'finetune'}",
                "max_steps=3",
                "checkpoint.every_steps=3",
                "ray.progress_bars=false",
            ],
        )
    )
    # 3. Decouple and edit the CDPs with those tokens.
    edit = run_generate(
        deda_config(
            toy,
            tiny_models_dir,
            base / "edit",
            f"generation.adapters={{textual_inversion: {ti['run_dir']}}}",
            "num_variants=2",
        )
    ).data
    return {"decouple": (decouple, base / "decouple"), "edit": (edit, base / "edit"), "ti": ti}


def rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "data").to_pylist(), key=lambda r: r[schema.ID])


def test_each_train_image_becomes_its_parts_with_its_label_and_source(runs, toy):
    report, out = runs["edit"]
    assert report["errors"]["total"] == 0, report["errors"]
    table = rows(out)
    real = {r[schema.SOURCE_ID]: r for r in table if r[schema.RECIPE] == "real"}
    by_source: dict[str, list[str]] = {}
    for row in table:
        if row[schema.RECIPE] == "deda":
            source = real[row[schema.SOURCE_ID]]
            assert (row[schema.LABEL], row[schema.CLASS_NAME]) == (
                source[schema.LABEL],
                source[schema.CLASS_NAME],
            )
            by_source.setdefault(row[schema.SOURCE_ID], []).append(row[schema.PART])
    train_real = [s for s, r in real.items() if r[schema.SPLIT] == "train"]
    assert sorted(by_source) == sorted(train_real) and len(train_real) == 12
    for parts in by_source.values():
        assert sorted(parts) == ["cdp", "cdp_edited", "cdp_edited", "cip"]
    edited = [r for r in table if r[schema.PART] == "cdp_edited"]
    cdps = {r[schema.SOURCE_ID]: r for r in table if r[schema.PART] == "cdp"}
    for row in edited:
        cdp = cdps[row[schema.SOURCE_ID]]
        # The edit keeps the crop's size and its mask; the prompt carries the class token.
        assert (row[schema.WIDTH], row[schema.HEIGHT]) == (cdp[schema.WIDTH], cdp[schema.HEIGHT])
        assert row[schema.MASK] == cdp[schema.MASK]
        assert row[schema.PROMPT] == f"a photo of a <{row[schema.CLASS_NAME]}>"
        assert json.loads(row[schema.PARAMS])["generation"]["mode"] == "sdedit"
    assert report["stages"]["edit"]["rows_in"] == len(edited) == 24
    assert runs["ti"]["tokens"] == ["<circle>", "<cross>", "<diamond>"]


def test_training_recombines_cdps_with_other_classes_cips(runs, tmp_path):
    from engine.train.config import TrainConfig
    from jobs.train import run_training

    _, out = runs["edit"]
    config = load_config(
        TrainConfig,
        ROOT / "configs" / "train_deda_toy_cpu.yaml",
        [
            f"data.paths=[{out / 'data'}]",
            f"output.path={tmp_path}",
            "epochs=2",
            "data.image_size=32",
            "mix.deda_prob=0.75",
        ],
    )
    metrics = run_training(config)
    plan = metrics["plan"]
    assert [p["real"] + p["synthetic"] for p in plan] == [12, 12]  # the epoch is the real count
    assert sum(p["synthetic"] for p in plan) > 0 and metrics["history"][-1]["train_loss"] > 0
    assert metrics["data"]["train_real"] == 12 and metrics["test"]["top1"] >= 0


def test_composites_are_the_same_whatever_the_batching(runs):
    """A composite is a function of (seed, epoch, row id, draw): splitting the rows into other batches (as
    another worker count does) gives the same pixels."""
    import pyarrow as pa

    from engine.methods.recombine import CipBank
    from engine.train.data import decode_and_transform

    _, out = runs["edit"]
    files = sorted(str(p) for p in (out / "data").glob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files)
    cips = table.filter(pa.compute.equal(table[schema.PART], "cip"))[schema.ID].to_numpy(zero_copy_only=False)
    recombine = {"bank": CipBank.read(files, cips), "paste": {"rotation_deg": (0.0, 0.0)}}
    cdps = table.filter(pa.compute.is_in(table[schema.PART], pa.array(["cdp", "cdp_edited"])))
    batch = {name: cdps[name].to_numpy(zero_copy_only=False) for name in cdps.column_names}
    kwargs = {"train": True, "image_size": 32, "augment": {}, "seed": 3, "epoch": 1, "recombine": recombine}
    whole = decode_and_transform(batch, **kwargs)["image"]
    order = np.arange(len(cdps))[::-1]
    halves = [order[: len(order) // 2], order[len(order) // 2 :]]
    parts = [decode_and_transform({k: v[h] for k, v in batch.items()}, **kwargs)["image"] for h in halves]
    again = np.empty_like(whole)
    for half, images in zip(halves, parts, strict=True):
        again[half] = images
    assert np.array_equal(whole, again)
    plain = decode_and_transform(batch, **{**kwargs, "recombine": None})["image"]
    assert not np.array_equal(whole, plain), "the composites differ from the bare CDPs"


def test_the_gallery_shows_the_parts_and_composites(runs, tmp_path):
    from PIL import Image

    from engine.run.gallery import NUM_COMPOSITES, THUMB, write_gallery

    _, out = runs["edit"]
    page = Path(write_gallery(out / "data", tmp_path, max_classes=3)).read_text()
    for kind in ("cdp_edited", "cip", "composite"):
        assert f"<b>{kind}</b>" in page, kind
    assert page.count("<b>composite</b>") == 3 * NUM_COMPOSITES
    # real, mask, CDP, CIP, 2 edited CDPs, 2 composites per class row
    assert Image.open(tmp_path / "contact_sheet.png").size == (8 * THUMB, 3 * (THUMB + 14))
