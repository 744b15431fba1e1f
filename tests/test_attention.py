"""Subject attention (engine.train.attention): Grad-CAM mass inside the subject mask, on constructed models
whose output depends only on the subject's pixels or only on the background's, and on shards with masks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine import schema
from engine.config import load_config
from engine.tiny.toy_dataset import make_toy_dataset
from engine.train.attention import (
    ATTENTION_FILE,
    read_masked_rows,
    run_attention,
    subject_attention,
    subject_share,
)
from engine.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 24


class SeesOnly(torch.nn.Module):
    """Logits from the pixels where `keep` is 1 and nothing else: features = relu(1x1 conv(x * keep)) with
    positive weights, so every feature outside `keep` is exactly 0, then mean-pool and a linear head."""

    def __init__(self, keep: np.ndarray, num_classes: int = 3):
        super().__init__()
        self.register_buffer("keep", torch.from_numpy(keep.astype(np.float32))[None, None])
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, num_classes)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.rand(4, 3, 1, 1) + 0.1)
            self.features[0].bias.zero_()
            self.head.weight.copy_(torch.rand(num_classes, 4) + 0.1)

    def forward(self, x):
        return self.head(self.features(x * self.keep).mean((2, 3)))


def _disc_mask(center=(8, 10), radius=5) -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE]
    return (y - center[0]) ** 2 + (x - center[1]) ** 2 <= radius**2


@pytest.fixture
def images() -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    # Positive pixels, so that a positive-weight feature is positive wherever the model looks.
    return generator.uniform(0.2, 1.0, (6, 3, SIZE, SIZE)).astype(np.float32), np.array([0, 1, 2, 0, 1, 2])


def test_a_model_that_sees_only_the_subject_attends_only_to_it(images):
    x, labels = images
    mask = _disc_mask()
    masks = np.repeat(mask[None], len(x), axis=0)
    result = subject_attention(SeesOnly(mask), "features", x, labels, masks)
    assert result["subject_share"] == pytest.approx(1.0, abs=1e-6)
    assert result["num_rows"] == 6 and result["num_empty"] == 0
    assert result["mask_area"] == pytest.approx(mask.mean())


def test_a_model_that_sees_only_the_background_does_not_attend_to_the_subject(images):
    x, labels = images
    mask = _disc_mask()
    masks = np.repeat(mask[None], len(x), axis=0)
    result = subject_attention(SeesOnly(~mask), "features", x, labels, masks)
    assert result["subject_share"] == pytest.approx(0.0, abs=1e-6)
    # Another subject than the one the model sees: share is the overlap's mass only, between 0 and 1.
    other = np.repeat(_disc_mask((14, 12), 6)[None], len(x), axis=0)
    partial = subject_attention(SeesOnly(mask), "features", x, labels, other)["subject_share"]
    assert 0.05 < partial < 0.95


def test_subject_share_arithmetic_and_empty_maps():
    cams = np.zeros((3, 2, 2))
    cams[0] = [[1, 1], [1, 1]]
    cams[1] = [[3, 0], [0, 1]]
    masks = np.array([[[1, 0], [0, 0]]] * 3, bool)
    shares = subject_share(cams, masks)
    assert shares[:2] == pytest.approx([0.25, 0.75])
    assert np.isnan(shares[2])  # no evidence at all: left out, not counted as 0
    with pytest.raises(ValueError, match="shape"):
        subject_share(cams, masks[:, :1])
    with pytest.raises(ValueError, match="target_layer 'nope'"):
        subject_attention(
            SeesOnly(_disc_mask()), "nope", np.zeros((1, 3, SIZE, SIZE), np.float32), [0], masks
        )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def masked_shards(tmp_path_factory) -> tuple[Path, Path]:
    """Real rows of a tiny toy dataset in OUTPUT_SCHEMA with their masks, except the first test row's."""
    out = tmp_path_factory.mktemp("attention")
    toy = make_toy_dataset(out / "toy", num_classes=2, train_per_class=4, eval_per_group=2, size=32, seed=3)
    rows = []
    for split in ("train", "val", "test"):
        for label, name in enumerate(toy["classes"]):
            for path in sorted((out / "toy" / split / name).iterdir()):
                source_id = f"{split}/{name}/{path.name}"
                mask = out / "toy" / "masks" / source_id
                rows.append(
                    {
                        schema.ID: f"real-{source_id}",
                        schema.IMAGE: path.read_bytes(),
                        schema.WIDTH: 32,
                        schema.HEIGHT: 32,
                        schema.LABEL: label,
                        schema.CLASS_NAME: name,
                        schema.SPLIT: split,
                        schema.SOURCE_ID: source_id,
                        schema.RECIPE: schema.RECIPE_REAL,
                        schema.MASK: None
                        if source_id == "test/circle/circle_0000.png"
                        else mask.read_bytes(),
                        schema.GROUP: 0,
                        schema.SCHEMA_VERSION_COLUMN: schema.SCHEMA_VERSION,
                    }
                )
    (out / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA), out / "data" / "part-0.parquet")
    return out / "data", out / "toy"


def _config(data: Path, *extra: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        ROOT / "configs" / "train_toy_cpu.yaml",
        [f"data.paths=[{json.dumps(str(data))}]", *extra],
    )


@pytest.mark.parametrize("image_size", [32, 16])
def test_masks_follow_the_evaluation_transform(masked_shards, image_size):
    data, toy = masked_shards
    images, labels, masks, unmasked = read_masked_rows(_config(data, f"data.image_size={image_size}"), "test")
    assert unmasked == 1 and len(images) == len(labels) == len(masks) == 7  # 8 test rows, one without a mask
    assert images.shape[1:] == (3, image_size, image_size) and masks.shape[1:] == (image_size, image_size)
    # Rows come sorted by id: test/circle/circle_0001 is the first with a mask.
    expected = np.asarray(Image.open(toy / "masks" / "test" / "circle" / "circle_0001.png")) >= 128
    if image_size == 32:
        assert (masks[0] == expected).all()
    else:
        assert abs(masks[0].mean() - expected.mean()) < 0.05
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_run_attention_reads_the_checkpoint_and_caches_its_result(masked_shards, tmp_path):
    from engine.train.loop import CHECKPOINT_FILE, build_model

    data, _ = masked_shards
    config = _config(data, "data.image_size=32")
    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint_000000"
    checkpoint.mkdir()
    torch.save({"model": build_model(config.model, 2).state_dict()}, checkpoint / CHECKPOINT_FILE)
    metrics = {"checkpoint": str(checkpoint), "run_dir": str(tmp_path), "data": {"class_names": ["a", "b"]}}
    result = run_attention(config, metrics, "layer2")  # 4 x 4 at 32 px
    assert result["num_rows"] == 7 and result["rows_without_mask"] == 1
    assert result["num_empty"] < 7 and 0.0 <= result["subject_share"] <= 1.0
    saved = json.loads((tmp_path / ATTENTION_FILE).read_text())
    assert saved["attention"] == result
    # Cached: a second call reads the file (a planted value proves it did not recompute).
    saved["attention"]["subject_share"] = 0.123
    (tmp_path / ATTENTION_FILE).write_text(json.dumps(saved))
    assert run_attention(config, metrics, "layer2")["subject_share"] == 0.123
    assert run_attention(config, metrics, "layer3")["subject_share"] != 0.123  # another layer: recomputed


def test_the_driver_imports_attention_without_torch():
    import subprocess
    import sys

    code = (
        "import sys, engine.train.attention, jobs.sweep, jobs.demo\n"
        "heavy = [m for m in ('torch', 'pytorch_grad_cam', 'scipy') if m in sys.modules]\n"
        "print(heavy)\nsys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
