"""The data contract: column names, the versioned output schema and the column checks stages use.

Two kinds of columns exist:
- output columns (`OUTPUT_SCHEMA`): what lands in `<out>/data/*.parquet`, one schema for real and synthetic rows;
- working columns: carried between stages as numpy values (decoded images, masks) and dropped or encoded
  by the final encode step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

# 2: the `soft_label` column; 3: the `part` and `caption` columns. Older shards stay valid input: a missing column reads as
# all null (see `with_soft_label`, `with_part`).
SCHEMA_VERSION = 3

# Output columns.
ID = "id"
IMAGE = "image"  # working: HxWx3 uint8 array; output: encoded bytes
WIDTH = "width"
HEIGHT = "height"
LABEL = "label"
CLASS_NAME = "class_name"
SPLIT = "split"
SOURCE_ID = "source_id"
RECIPE = "recipe"
MASK = "mask"  # working: HxW uint8 array (0/255) or None; output: PNG bytes or null
BBOX = "bbox"  # [x0, y0, x1, y1] in pixels of this row's image, or null
PROMPT = "prompt"
SEED = "seed"
MODELS = "models"  # JSON: role -> "id@revision"
PARAMS = "params"  # JSON: recipe parameters of this row
GROUP = "group"  # optional group label (e.g. background group) for worst-group accuracy; -1 if unknown
# Class-probability target: a list of {label, weight} (weights sum to 1), or null for one-hot on `label`.
# `label` of a soft row stays its source (dominant) class. Working: None or a list of {"label", "weight"} dicts.
SOFT_LABEL = "soft_label"
# Which part of its source image a row holds (De-DA's decoupling): null or "whole" = the whole image; "cdp" =
# the class-dependent part (the subject cropped to its box, its mask beside it); "cip" = the class-independent
# part (the background with the subject's region filled); "cdp_edited" = a generated edit of the cdp.
PART = "part"
PART_WHOLE, PART_CDP, PART_CIP, PART_CDP_EDITED = "whole", "cdp", "cip", "cdp_edited"
# A caption of the row's image (MVC: "This is an image of <class>. <a VLM's description>"), or null.
CAPTION = "caption"
SCHEMA_VERSION_COLUMN = "schema_version"

# Working columns.
IMAGE_BYTES = "image_bytes"  # raw encoded source bytes, as read
MASK_BYTES = "mask_bytes"  # raw encoded source mask bytes, as read (optional)
VARIANT = "variant"  # 0 for the real row, 1..K for synthetic variants
BACKGROUND = "background"  # HxWx3 uint8 array drawn by the background stage
ERROR = "error"  # "" when the row is fine, else a short reason ("no_detection", "decode", ...)
ERROR_MESSAGE = "error_message"  # free text detail for ERROR
DROP = "drop"  # "" to keep the row, else the rule of a filtering stage that drops it (filtered.parquet)

RECIPE_REAL = "real"

# Columns whose values are objects (bytes, text, arrays) or None. An all-None column of these can come back
# from Ray's Arrow round trip as floats; `engine.stages.batch.unpack` restores the None values.
OBJECT_COLUMNS = (IMAGE_BYTES, MASK_BYTES, IMAGE, MASK, BACKGROUND, PROMPT, PARAMS, MODELS, ID, SOFT_LABEL)

SOFT_LABEL_TYPE = pa.list_(pa.struct([("label", pa.int64()), ("weight", pa.float32())]))

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        # Nullable, as `datasets` types it: it takes a ClassLabel from the metadata only for a field equal
        # to its own (int64, nullable).
        pa.field(LABEL, pa.int64()),
        pa.field(CLASS_NAME, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(SOURCE_ID, pa.string(), nullable=False),
        pa.field(RECIPE, pa.string(), nullable=False),
        pa.field(MASK, pa.binary()),
        pa.field(BBOX, pa.list_(pa.float32(), 4)),
        pa.field(PROMPT, pa.string()),
        pa.field(SEED, pa.int64()),
        pa.field(MODELS, pa.string()),
        pa.field(PARAMS, pa.string()),
        pa.field(GROUP, pa.int64()),
        pa.field(SOFT_LABEL, SOFT_LABEL_TYPE),
        pa.field(PART, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(SCHEMA_VERSION_COLUMN, pa.int32(), nullable=False),
    ],
    metadata={"synthray.schema_version": str(SCHEMA_VERSION)},
)


def huggingface_features(class_names: Sequence[str] | None = None) -> dict:
    """The `datasets` features of the columns whose Arrow type does not say what they are: image and mask
    are `Image()` (encoded files), label a `ClassLabel` with the class names (when known).

    `datasets.load_dataset("parquet", data_files=...)` takes the ClassLabel from the shards' metadata;
    it keeps a binary column as bytes, whatever the metadata says, so Image() applies when the loader is
    given the features: `load_dataset(<output dir>)` reads them from the dataset card (`dataset_card`).
    """
    features: dict = {IMAGE: {"_type": "Image"}, MASK: {"_type": "Image"}}
    if class_names:
        features[LABEL] = {"_type": "ClassLabel", "names": [str(n) for n in class_names]}
    return features


def output_schema(class_names: Sequence[str] | None = None) -> pa.Schema:
    """OUTPUT_SCHEMA with the Hugging Face features metadata (ClassLabel names included)."""
    features = json.dumps({"info": {"features": huggingface_features(class_names)}})
    return OUTPUT_SCHEMA.with_metadata({**OUTPUT_SCHEMA.metadata, b"huggingface": features.encode()})


_CARD_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64"}


def dataset_card(class_names: Sequence[str] | None = None) -> str:
    """A Hugging Face dataset card (README.md) for an output directory: `datasets.load_dataset(<dir>)`
    then gives image and mask as Image() and label as ClassLabel. One split, "rows": the `split` column
    holds train/val/test (filter on it; never train on all of "rows")."""
    import yaml

    features = []
    for f in OUTPUT_SCHEMA:
        if f.name in (IMAGE, MASK):
            features.append({"name": f.name, "dtype": "image"})
        elif f.name == LABEL and class_names:
            names = {str(i): str(n) for i, n in enumerate(class_names)}
            features.append({"name": f.name, "dtype": {"class_label": {"names": names}}})
        elif f.name == BBOX:
            features.append({"name": f.name, "list": "float32", "length": 4})
        elif f.name == SOFT_LABEL:
            items = [{"name": "label", "dtype": "int64"}, {"name": "weight", "dtype": "float32"}]
            features.append({"name": f.name, "list": items})
        else:
            features.append({"name": f.name, "dtype": _CARD_DTYPES[f.type]})
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "rows", "path": "data/*.parquet"}]}],
        "dataset_info": {"features": features},
    }
    body = (
        "# synthray output\n\nReal rows (`recipe: real`) and synthetic rows in one schema "
        f"(version {SCHEMA_VERSION}); the `split` column says train / val / test. Load with "
        '`datasets.load_dataset(<this directory>, split="rows")`, or read `data/*.parquet` with pyarrow or Ray.\n'
    )
    return "---\n" + yaml.safe_dump(header, sort_keys=False, allow_unicode=True) + "---\n\n" + body


# Rows a filtering stage dropped on purpose (not errors): the rule, and the scores the stage wrote as JSON.
FILTERED_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_ID, pa.string()),
        pa.field(ID, pa.string()),
        pa.field(CLASS_NAME, pa.string()),
        pa.field("stage", pa.string()),
        pa.field("rule", pa.string()),
        pa.field("scores", pa.string()),
    ]
)

ERRORS_SCHEMA = pa.schema(
    [
        pa.field(SOURCE_ID, pa.string()),
        pa.field(ID, pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
    ]
)


def with_soft_label(table: pa.Table) -> pa.Table:
    """`table` with a `soft_label` column: a version 1 table (none) gets an all-null one (one-hot rows)."""
    if SOFT_LABEL in table.schema.names:
        return table
    return table.append_column(pa.field(SOFT_LABEL, SOFT_LABEL_TYPE), pa.nulls(len(table), SOFT_LABEL_TYPE))


def with_part(table: pa.Table) -> pa.Table:
    """`table` with a `part` column: a table from before version 3 (none) gets an all-null one (whole images)."""
    if PART in table.schema.names:
        return table
    return table.append_column(pa.field(PART, pa.string()), pa.nulls(len(table), pa.string()))


def require_columns(batch: dict[str, np.ndarray], columns: tuple[str, ...] | list[str], stage: str) -> None:
    """Raise a ValueError naming the columns `stage` needs that `batch` lacks."""
    missing = [c for c in columns if c not in batch]
    if missing:
        raise ValueError(f"stage {stage!r} needs columns {missing}; the batch has {sorted(batch)}")


def row_id(source_id: str, recipe: str, variant: int, config_hash: str) -> str:
    """Deterministic row id: the same source, recipe, variant and config always give the same id."""
    key = f"{source_id}\x1f{recipe}\x1f{variant}\x1f{config_hash}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def row_seed(base_seed: int, source_id: str, variant: int) -> int:
    """Per-row seed derived from the run seed, so a row draws the same randomness wherever it runs."""
    digest = hashlib.sha1(f"{base_seed}\x1f{source_id}\x1f{variant}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
