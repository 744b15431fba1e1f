"""What a run writes, checked without Ray: strict-JSON params, Hugging Face features in the shards (and the
dataset card), model provenance tags, and the contact sheet's lettering."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from engine import schema
from engine.config import ModelRef
from engine.output.shards import write_shard
from engine.stages.batch import object_array
from engine.stages.encode import encode_rows

CLASSES = ["Straße", "crème brûlée", "spring_rolls"]
SOFT_ROW = [{"label": 0, "weight": 0.75}, {"label": 2, "weight": 0.25}]


def rows_batch(n: int = 4) -> dict[str, np.ndarray]:
    """Encoded-stage input: one real row per class and a synthetic variant of the first."""
    rng = np.random.default_rng(0)
    labels = [i % len(CLASSES) for i in range(n - 1)] + [0]
    return {
        schema.ID: np.array([f"id{i}" for i in range(n)], dtype=object),
        schema.IMAGE: object_array([rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(n)]),
        schema.MASK: object_array([np.full((16, 16), 255, np.uint8)] * n),
        schema.LABEL: np.array(labels),
        schema.CLASS_NAME: np.array([CLASSES[i] for i in labels], dtype=object),
        schema.SPLIT: np.array(["val"] + ["train"] * (n - 1), dtype=object),
        schema.SOURCE_ID: np.array([f"src{i}" for i in range(n - 1)] + ["src0"], dtype=object),
        schema.RECIPE: np.array(["real"] * (n - 1) + ["aga"], dtype=object),
        schema.SEED: np.arange(n),
        schema.PROMPT: np.array([None] * (n - 1) + ["a quiet meadow"], dtype=object),
        # What the segmenter leaves for rows it never scored (val/test) after Ray's Arrow round trip.
        "detect_score": np.array([np.nan] + [0.5] * (n - 1)),
        "composite_params": np.array([None] * (n - 1) + ['{"angle": NaN, "scale": 1.1}'], dtype=object),
        # The synthetic row is a Diff-Mix-style mix of its source class and another one.
        schema.SOFT_LABEL: object_array([None] * (n - 1) + [SOFT_ROW]),
    }


def strict_json(text: str):
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"not JSON: {token} in {text}"))


def test_params_are_strict_json():
    table = encode_rows(rows_batch(), "png", 95, json.dumps({"llm": "/m@local"}), CLASSES)
    params = [strict_json(text) for text in table.column(schema.PARAMS).to_pylist()]
    assert params[0]["detect_score"] is None and params[1]["detect_score"] == 0.5
    assert params[-1]["composite_params"] == {"angle": None, "scale": 1.1}


def test_shards_load_in_datasets_with_image_and_classlabel(tmp_path):
    import datasets

    table = encode_rows(rows_batch(), "png", 95, "{}", CLASSES)
    (tmp_path / "data").mkdir()
    write_shard(table, str(tmp_path / "data"))
    (tmp_path / "README.md").write_text(schema.dataset_card(CLASSES))
    stored = pq.read_schema(next((tmp_path / "data").glob("*.parquet")))
    assert stored.field(schema.IMAGE).type == schema.OUTPUT_SCHEMA.field(schema.IMAGE).type  # still binary

    # The bare Parquet loader: ClassLabel from the shards' own metadata.
    bare = datasets.load_dataset("parquet", data_files=str(tmp_path / "data" / "*.parquet"), split="train")
    assert bare.features[schema.LABEL] == datasets.ClassLabel(names=CLASSES)
    assert bare.features[schema.LABEL].int2str(bare[1][schema.LABEL]) == bare[1][schema.CLASS_NAME]
    # The output directory as a dataset: Image() and ClassLabel from the card.
    loaded = datasets.load_dataset(str(tmp_path), split="rows")
    assert loaded.features[schema.IMAGE] == datasets.Image()
    assert loaded.features[schema.MASK] == datasets.Image()
    assert loaded.features[schema.LABEL] == datasets.ClassLabel(names=CLASSES)
    assert loaded[0][schema.IMAGE].size == (16, 16) and loaded[0][schema.MASK].mode == "L"
    assert set(schema.OUTPUT_SCHEMA.names) == set(loaded.column_names)
    soft = datasets.List({"label": datasets.Value("int64"), "weight": datasets.Value("float32")})
    assert loaded.features[schema.SOFT_LABEL] == soft
    assert loaded[0][schema.SOFT_LABEL] is None and loaded[3][schema.SOFT_LABEL] == SOFT_ROW
    assert loaded[0][schema.SCHEMA_VERSION_COLUMN] == schema.SCHEMA_VERSION == 3
    assert loaded[0][schema.PART] is None  # a row no decoupling made: the whole image
    assert loaded[0][schema.CAPTION] is None  # no caption stage ran


def test_the_part_column_is_written_as_given_and_older_tables_read_as_whole_images():
    batch = rows_batch()
    batch[schema.PART] = object_array([schema.PART_WHOLE, schema.PART_CDP, schema.PART_CIP, None])
    table = encode_rows(batch, "png", 95, "{}", CLASSES)
    assert table.column(schema.PART).to_pylist() == ["whole", "cdp", "cip", None]
    assert schema.PART not in strict_json(table.column(schema.PARAMS)[1].as_py())
    old = table.drop_columns([schema.PART])
    assert schema.with_part(old).column(schema.PART).null_count == len(old)


def test_soft_labels_are_written_as_given_and_null_means_one_hot():
    table = encode_rows(rows_batch(), "png", 95, "{}", CLASSES)
    assert table.schema.field(schema.SOFT_LABEL).type == schema.SOFT_LABEL_TYPE
    assert table.column(schema.SOFT_LABEL).to_pylist() == [None, None, None, SOFT_ROW]
    assert schema.SOFT_LABEL not in strict_json(table.column(schema.PARAMS)[3].as_py())
    # A batch without the column (every recipe but Diff-Mix), or all None after Ray's round trip (NaN).
    for column in (None, np.full(4, np.nan)):
        batch = rows_batch()
        if column is None:
            del batch[schema.SOFT_LABEL]
        else:
            batch[schema.SOFT_LABEL] = column
        assert encode_rows(batch, "png", 95, "{}", CLASSES).column(schema.SOFT_LABEL).null_count == 4


@pytest.mark.parametrize(
    "bad",
    [[], [{"label": 0, "weight": 0.6}, {"label": 1, "weight": 0.6}], [{"label": -1, "weight": 1.0}]],
)
def test_a_soft_label_that_is_no_distribution_is_refused(bad):
    batch = rows_batch()
    batch[schema.SOFT_LABEL] = object_array([None, None, None, bad])
    with pytest.raises(ValueError, match="not a distribution"):
        encode_rows(batch, "png", 95, "{}", CLASSES)


def test_model_tags_record_what_was_loaded(tmp_path):
    assert ModelRef(id=str(tmp_path), revision="0123abcd").tag() == f"{tmp_path}@local"
    assert ModelRef(id="./models/sdxl", revision="0123abcd").tag() == "./models/sdxl@local"
    assert ModelRef(id="s3://bucket/sdxl").tag() == "s3://bucket/sdxl@uri"
    assert ModelRef(id="org/model", revision="0123abcd").tag() == "org/model@0123abcd"


def test_contact_sheet_draws_latin_letters(tmp_path):
    from engine.run.gallery import label_font, write_gallery

    font = label_font()

    def drawn(text: str, width: int = 60) -> np.ndarray:
        canvas = Image.new("L", (width, 14), 255)
        ImageDraw.Draw(canvas).text((0, 0), text, fill=0, font=font)
        return np.asarray(canvas)

    missing = drawn("\ue000")  # a private-use code point: the font's "no glyph" box
    for letter in "ßäöüÀÉçñøåæœŁąčğışțž":
        assert not np.array_equal(drawn(letter), missing), letter

    (tmp_path / "data").mkdir()
    write_shard(encode_rows(rows_batch(), "png", 95, "{}", CLASSES), str(tmp_path / "data"))
    write_gallery(tmp_path / "data", tmp_path / "gallery", max_classes=4)
    sheet = Image.open(tmp_path / "gallery" / "contact_sheet.png").convert("L")
    expected = Image.new("L", (sheet.width, 14), 255)
    ImageDraw.Draw(expected).text((2, 0), "Straße", fill=0, font=font)
    assert np.array_equal(np.asarray(sheet)[:14], np.asarray(expected))


@pytest.mark.parametrize(
    ("image_format", "pil_format", "tolerance"),
    [("png", "PNG", 0), ("jpeg", "JPEG", 12), ("webp", "WEBP", 12)],
)
def test_every_output_format_decodes_to_the_image(image_format, pil_format, tolerance):
    """Each `output.image_format` writes a standard file of that format, at the image's (non-square) size
    and in RGB order (cv2 encodes BGR), within the lossy formats' error; quality trades size for error."""
    import io

    from engine.stages.encode import encode_image

    image = np.zeros((24, 40, 3), np.uint8)  # 40 wide, 24 tall; flat colour halves survive compression
    image[:, :20] = (220, 30, 30)
    image[:, 20:] = (30, 30, 220)
    data = encode_image(image, image_format, quality=95)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == pil_format and decoded.size == (40, 24)
    pixels = np.asarray(decoded.convert("RGB")).astype(int)
    assert np.abs(pixels[4:20, 2:16] - (220, 30, 30)).max() <= tolerance  # red stays red
    assert np.abs(pixels[4:20, 24:38] - (30, 30, 220)).max() <= tolerance
    if image_format != "png":
        noisy = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
        assert len(encode_image(noisy, image_format, 20)) < len(encode_image(noisy, image_format, 95))


def test_model_tags_name_the_prompt_llm_only_when_one_writes_the_prompts():
    from engine.config import GenerateConfig, load_config
    from engine.recipes import model_tags

    aga = Path(__file__).resolve().parents[1] / "configs" / "aga_tiny_cpu.yaml"
    llm = load_config(GenerateConfig, aga, [])
    template = load_config(GenerateConfig, aga, ["prompt.backend=template"])
    assert "prompt_llm" in model_tags(llm) and template.prompt.model is not None
    assert "prompt_llm" not in model_tags(template) and "background" in model_tags(template)
