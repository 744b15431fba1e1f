"""Encode (the last CPU stage): working rows -> an Arrow table in the output schema.

Images are encoded (PNG default; JPEG/WebP with a quality), masks as PNG. Working columns that are not in
the contract and hold scalars (variant, prompt_source, composite_params, ...) are gathered into `params`
so every recipe's per-row settings are kept without widening the schema.
"""

from __future__ import annotations

import functools
import json
import math

import cv2
import numpy as np
import pyarrow as pa

from engine import schema
from engine.stages.batch import Batch, is_missing, num_rows, unpack

# Working columns that never go into params (arrays, or already output columns).
_NOT_PARAMS = {
    schema.IMAGE,
    schema.MASK,
    schema.BACKGROUND,
    schema.ERROR,
    schema.ERROR_MESSAGE,
    schema.IMAGE_BYTES,
    schema.MASK_BYTES,
}


def encode_rows(
    batch: Batch,
    image_format: str,
    quality: int,
    models_json: str,
    class_names: tuple[str, ...] | list[str] | None = None,
) -> pa.Table:
    """`class_names` (by label) go into the schema's Hugging Face metadata as a ClassLabel."""
    batch = unpack(dict(batch))
    n = num_rows(batch)
    output_names = set(schema.OUTPUT_SCHEMA.names)
    extra = [c for c in batch if c not in output_names and c not in _NOT_PARAMS]
    images = [encode_image(batch[schema.IMAGE][i], image_format, quality) for i in range(n)]
    masks = [encode_mask(batch[schema.MASK][i]) if schema.MASK in batch else None for i in range(n)]
    bboxes = [_bbox(batch[schema.BBOX][i]) if schema.BBOX in batch else None for i in range(n)]
    columns = {
        schema.ID: [str(v) for v in batch[schema.ID]],
        schema.IMAGE: images,
        schema.WIDTH: [int(batch[schema.IMAGE][i].shape[1]) for i in range(n)],
        schema.HEIGHT: [int(batch[schema.IMAGE][i].shape[0]) for i in range(n)],
        schema.LABEL: [int(v) for v in batch[schema.LABEL]],
        schema.CLASS_NAME: [str(v) for v in batch[schema.CLASS_NAME]],
        schema.SPLIT: [str(v) for v in batch[schema.SPLIT]],
        schema.SOURCE_ID: [str(v) for v in batch[schema.SOURCE_ID]],
        schema.RECIPE: [str(v) for v in batch[schema.RECIPE]],
        schema.MASK: masks,
        schema.BBOX: bboxes,
        schema.PROMPT: _optional_str(batch, schema.PROMPT, n),
        schema.SEED: [int(v) for v in batch[schema.SEED]],
        schema.MODELS: [models_json] * n,
        schema.PARAMS: [
            # Strict JSON: NaN (a missing score after Arrow's round trip) is null, never the bare token NaN.
            json.dumps({c: _jsonable(batch[c][i]) for c in extra}, sort_keys=True, allow_nan=False)
            for i in range(n)
        ],
        schema.GROUP: [int(v) for v in batch[schema.GROUP]] if schema.GROUP in batch else [-1] * n,
        schema.SOFT_LABEL: [soft_label(v) for v in batch[schema.SOFT_LABEL]]
        if schema.SOFT_LABEL in batch
        else [None] * n,
        schema.PART: _optional_str(batch, schema.PART, n),
        schema.CAPTION: _optional_str(batch, schema.CAPTION, n),
        schema.SCHEMA_VERSION_COLUMN: [schema.SCHEMA_VERSION] * n,
    }
    return pa.table(columns, schema=_output_schema(tuple(class_names) if class_names else None))


@functools.lru_cache(maxsize=8)
def _output_schema(class_names: tuple[str, ...] | None) -> pa.Schema:
    return schema.output_schema(class_names)


def encode_image(image: np.ndarray, image_format: str, quality: int) -> bytes:
    # cv2 rather than PIL: several times faster PNG/JPEG encoding, and the bytes are still standard files.
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    elif image_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    elif image_format == "webp":
        ok, buf = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, quality])
    else:
        raise ValueError(f"unknown image format {image_format!r}")
    assert ok, "cv2.imencode failed on a valid uint8 image"
    return buf.tobytes()


def encode_mask(mask: np.ndarray | None) -> bytes | None:
    if is_missing(mask):
        return None
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _bbox(value) -> list[float] | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    return arr.tolist() if arr.size == 4 and np.isfinite(arr).all() else None


def soft_label(value) -> list[dict] | None:
    """A row's working `soft_label` as output values: None stays None (one-hot on `label`); otherwise a
    non-empty list of {"label", "weight"} with non-negative labels and weights that sum to 1.

    After Ray's Arrow round trip the list may arrive as a numpy array of dicts, and an all-None column as
    NaN (see `engine.stages.batch.unpack`); both are accepted.
    """
    if is_missing(value):
        return None
    entries = [{"label": int(e["label"]), "weight": float(e["weight"])} for e in value]
    weights = [e["weight"] for e in entries]
    if (
        not entries
        or any(e["label"] < 0 for e in entries)
        or not all(math.isfinite(w) and w >= 0 for w in weights)
        or abs(sum(weights) - 1.0) > 1e-4
    ):
        raise ValueError(
            f"soft_label {entries} is not a distribution over labels (non-negative labels and weights that "
            "sum to 1)"
        )
    return entries


def _optional_str(batch: Batch, name: str, n: int) -> list[str | None]:
    if name not in batch:
        return [None] * n
    return [None if v is None else str(v) for v in batch[name]]


def _jsonable(value):
    """A params value as strict JSON data: numpy scalars and small arrays as Python values, JSON strings
    parsed, and every non-finite float (NaN: a value missing for this row) as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.size <= 16 else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
