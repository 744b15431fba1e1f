"""Helpers for numpy batches (dict of column -> array) as Ray Data passes them to stages.

Written by hand because Ray Data's numpy batches hold image columns either as an N-d array (all images the
same size) or as an object array of arrays (ragged), and stages need one way to slice and reassemble both.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from engine import schema

Batch = dict[str, np.ndarray]

# Image-like working columns. Between stages they travel as `.npy` bytes (see `pack`).
ARRAY_COLUMNS = (schema.IMAGE, schema.MASK, schema.BACKGROUND)


def num_rows(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def object_array(values: Sequence) -> np.ndarray:
    """1-D object array; element-wise so equal-shaped arrays are not stacked into one N-d array."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def error_columns(batch: Batch, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Writable copies of the batch's `error` and `error_message` ("" where absent or None), for a stage that
    marks rows failed."""
    return tuple(
        np.array([str(v or "") for v in batch.get(name, [""] * n)], dtype=object)
        for name in (schema.ERROR, schema.ERROR_MESSAGE)
    )


def take(batch: Batch, index: np.ndarray) -> Batch:
    return {name: column[index] for name, column in batch.items()}


def concat(parts: list[Batch]) -> Batch:
    """Concatenate batches row-wise; columns missing from a part are filled with None."""
    parts = [p for p in parts if num_rows(p)]
    if not parts:
        return {}
    names: list[str] = []
    for part in parts:
        names += [n for n in part if n not in names]
    out = {}
    for name in names:
        columns = [p.get(name) for p in parts]
        present = [c for c in columns if c is not None]
        same_kind = len(present) == len(columns) and len({(c.dtype.kind, c.shape[1:]) for c in present}) == 1
        if same_kind and present[0].dtype != object:
            out[name] = np.concatenate(present)
        else:
            values: list = []
            for part, column in zip(parts, columns, strict=True):
                values += list(column) if column is not None else [None] * num_rows(part)
            out[name] = object_array(values)
    return out


def reorder(batch: Batch, order: np.ndarray) -> Batch:
    return {name: column[order] for name, column in batch.items()}


def pack(batch: Batch) -> Batch:
    """Arrays -> `.npy` bytes for the image-like columns, and bbox as an (N, 4) float32 array (NaN: none).

    Why by hand: Ray Data stores an object column of arrays as a fixed-shape tensor in one block and a
    variable-shaped one in another (or fails on None), and concatenating such blocks fails inside Ray
    (seen with ray 2.60: "Use () not None as shape arguments"). Bytes with nulls are plain Arrow binary,
    and the copy costs a memcpy per image.
    """
    for name in ARRAY_COLUMNS:
        if name in batch:
            # b"" for "none": a column of only None would reach Arrow as floats, not binary.
            batch[name] = object_array([b"" if v is None else _to_npy(v) for v in batch[name]])
    if schema.BBOX in batch and (batch[schema.BBOX].dtype == object or batch[schema.BBOX].ndim != 2):
        boxes = np.full((num_rows(batch), 4), np.nan, dtype=np.float32)
        for i, box in enumerate(batch[schema.BBOX]):
            if box is not None and np.size(box) == 4:
                boxes[i] = np.asarray(box, dtype=np.float32).reshape(4)
        batch[schema.BBOX] = boxes
    all_none = [n for n, c in batch.items() if c.dtype == object and len(c) and all(v is None for v in c)]
    for name in all_none:
        # All-None: drop it; Ray fills the nulls with the type the other blocks give the column.
        del batch[name]
    return batch


def unpack(batch: Batch) -> Batch:
    """Inverse of `pack`: image-like columns become object arrays of ndarrays (None where missing), and
    object columns that arrive as floats get their None values back.

    Why: a numpy object column whose values are all None reaches Arrow as a null-typed column, and Ray Data
    hands that back as a float array of NaN (seen with ray 2.60, also within one fused operator). Every
    stage's input passes through here, so stages only ever see None for a missing value.
    """
    for name in schema.OBJECT_COLUMNS:
        column = batch.get(name)
        if column is not None and column.dtype.kind == "f":
            batch[name] = object_array([None if is_missing(v) else v for v in column])
    for name in ARRAY_COLUMNS:
        column = batch.get(name)
        if column is not None and len(column) and _is_packed(column):
            batch[name] = object_array([None if not v else np.load(io.BytesIO(v)) for v in column])
    return batch


def _to_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _is_packed(column: np.ndarray) -> bool:
    return column.dtype == object and all(isinstance(v, bytes) for v in column)


def is_missing(value) -> bool:
    """None, or the float NaN an all-None column comes back as from Arrow (see `unpack`)."""
    return value is None or (isinstance(value, float | np.floating) and bool(np.isnan(value)))
