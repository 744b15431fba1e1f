"""End to end with a dataset as Hugging Face `datasets` saves it: image files cast to `Image()`, a
`ClassLabel` label, Hub-layout train/test Parquet files (`to_parquet`), through `run_generate` with the
tiny models; the shards load back in `datasets` with Image and ClassLabel features."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from engine import schema
from engine.config import GenerateConfig, load_config

pytestmark = pytest.mark.slow

# Food-101 names: "spring_rolls" forbids "spring", "winter melon" forbids "winter" in the prompt templates.
CLASSES = ["spring_rolls", "winter melon", "crème brûlée"]


@pytest.fixture(scope="module")
def hub_dataset(toy, tmp_path_factory):
    """<root>/images/<split>/<file>.png and <root>/data/{train,test}-00000-of-00001.parquet, paths stored
    relative to <root> with no bytes (what `to_parquet` writes for images loaded from files)."""
    import os

    import datasets

    root = tmp_path_factory.mktemp("hub")
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}
    )
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for split in ("train", "test"):
            paths, masks, labels = [], [], []
            for label, toy_class in enumerate(sorted(p.name for p in (toy / split).iterdir())):
                for image in sorted((toy / split / toy_class).glob("*.png"))[:2]:
                    rel = f"images/{split}/{image.name}"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(image, root / rel)
                    mask_rel = f"masks/{split}/{image.name}"
                    (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(toy / "masks" / split / toy_class / image.name, root / mask_rel)
                    paths.append(rel)
                    masks.append(mask_rel)
                    labels.append(label)
            ds = datasets.Dataset.from_dict(
                {"image": paths, "mask": masks, "label": labels}, features=features
            )
            ds.to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
    finally:
        os.chdir(cwd)
    return root


def test_hf_parquet_end_to_end(ray_local, hub_dataset, tiny_models_dir, tmp_path):
    from datasets import load_dataset

    from engine.pipeline import run_generate
    from tests.conftest import ROOT

    out = tmp_path / "out"
    config = load_config(
        GenerateConfig,
        ROOT / "configs" / "aga_tiny_cpu.yaml",
        [
            "data.format=parquet",
            f"data.path={hub_dataset}",
            "data.masks_path=null",
            "data.splits=[train, test]",
            f"output.path={out}",
            f"segment.detector.id={tiny_models_dir / 'grounding-dino'}",
            f"segment.sam.id={tiny_models_dir / 'sam'}",
            f"prompt.model.id={tiny_models_dir / 'llm'}",
            f"background.model.id={tiny_models_dir / 'sdxl'}",
            "background.height=32",
            "background.width=32",
            "background.num_inference_steps=2",
            "output.gallery_classes=0",
            "ray.progress_bars=false",
        ],
    )
    report = run_generate(config).data
    assert report["errors"]["total"] == 0, report["errors"]
    rows = pq.read_table(out / "data").to_pylist()
    real = [r for r in rows if r[schema.RECIPE] == schema.RECIPE_REAL]
    synthetic = [r for r in rows if r[schema.RECIPE] != schema.RECIPE_REAL]

    # Every image read once, with its split from the Hub file name and its id from its path.
    assert sorted(r[schema.SOURCE_ID] for r in real) == sorted(
        f"images/{split}/{p.name}"
        for split in ("train", "test")
        for p in (hub_dataset / "images" / split).iterdir()
    )
    assert all(r[schema.SPLIT] == r[schema.SOURCE_ID].split("/")[1] for r in real)
    assert {r[schema.CLASS_NAME] for r in real} == set(CLASSES)
    # Test images never get synthetic variants (expand_splits: [train]).
    assert {r[schema.SPLIT] for r in synthetic} == {"train"}
    assert len(synthetic) == 2 * sum(r[schema.SPLIT] == "train" for r in real) > 0
    assert len({r[schema.ID] for r in rows}) == len(rows)

    # Strict JSON provenance: no NaN for rows the segmenter never scored; local models tagged @local.
    def strict(text):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON {token}"))

    for r in rows:
        strict(r[schema.PARAMS])
        assert all(tag.endswith("@local") for tag in strict(r[schema.MODELS]).values())

    # The shards as a Hugging Face dataset: ClassLabel from the shards' metadata, Image via the card.
    files = str(out / "data" / "*.parquet")
    bare = load_dataset("parquet", data_files=files, split="train")
    assert bare.features[schema.LABEL].names == CLASSES
    loaded = load_dataset(str(out), split="rows")
    assert type(loaded.features[schema.IMAGE]).__name__ == "Image"
    assert type(loaded.features[schema.MASK]).__name__ == "Image"
    assert loaded.features[schema.LABEL].names == CLASSES
    first = loaded[0]
    assert first[schema.IMAGE].size == (first[schema.WIDTH], first[schema.HEIGHT])
