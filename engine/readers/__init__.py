"""Readers: a dataset on disk or object storage -> a Ray Dataset of source rows.

Source rows carry: source_id, image_bytes, mask_bytes (or None), label, class_name, split, group.
Paths are anything the storage layer opens (local path, s3://, gs://, ...).

Two steps, so that a wrong dataset fails before Ray starts and nothing is written:
- `inspect_source(data)` (driver, no Ray): finds splits and class names, counts the rows per split, reports
  duplicates and applies `max_images`. Returns a `SourceInfo` (class names, rows per split, notes for the
  run report, and what the read tasks need).
- `read_source(data, ray_data, num_cpus, info)`: the Ray Dataset that reads the image bytes of those rows.

Formats, one module each: `image_folder` (`<root>/<split>/<class>/<file>`) and `parquet` (Hugging Face
`datasets` Parquet or any Parquet with an image and a label column).
"""

from __future__ import annotations

import logging

from engine import storage
from engine.config import DataConfig
from engine.readers.image_folder import (
    FILE_COLUMNS,
    IMAGE_SUFFIXES,
    folder_rows,
    folder_slices,
    inspect_image_folder,
    list_folder_rows,
    read_file_bytes,
    read_image_folder,
)
from engine.readers.parquet import (
    canonical_split,
    dataset_root,
    hub_split,
    huggingface_features,
    index_rows,
    inspect_parquet,
    parquet_pieces,
    read_parquet,
    read_parquet_rows,
)
from engine.readers.source import SourceInfo, sample_rows

logger = logging.getLogger(__name__)

__all__ = [
    "FILE_COLUMNS",
    "IMAGE_SUFFIXES",
    "SourceInfo",
    "canonical_split",
    "dataset_root",
    "defers_bytes",
    "folder_rows",
    "folder_slices",
    "hub_split",
    "huggingface_features",
    "inspect_source",
    "list_folder_rows",
    "parquet_pieces",
    "read_file_bytes",
    "read_parquet_rows",
    "read_source",
    "sample_rows",
    "source_rows",
]


def inspect_source(data: DataConfig) -> SourceInfo:
    """Driver side, no Ray: find the rows a run reads. Raises ValueError for a dataset that cannot run
    (no such path, no split present, no images, no class names); what is skipped is listed in `notes`."""
    if not storage.exists(data.path):
        raise ValueError(f"data.path {data.path} does not exist")
    if data.format == "image_folder":
        info = inspect_image_folder(data)
    elif data.format == "parquet":
        info = inspect_parquet(data)
    else:
        raise ValueError(f"unknown data.format {data.format!r}")
    for note in info.notes:
        logger.warning("data: %s", note)
    return info


def read_source(
    data: DataConfig,
    ray_data,
    num_cpus: float = 0.5,
    info: SourceInfo | None = None,
    with_bytes: bool = True,
):
    """Build the source dataset. Returns (dataset, class_names). `num_cpus`: per read task, counted in the
    pipeline's CPU budget (Ray's default of 1 can leave a small cluster waiting forever). `info`: from
    `inspect_source` (called here when not given).

    `with_bytes=False` leaves an image folder's files unread: its rows carry `path` and `mask_path`, and
    the caller reads the rows it keeps with `read_file_bytes` (the generation job drops a resumed run's
    done sources first, a class pool its non-members). Parquet rows always come with their bytes
    (`defers_bytes`)."""
    info = info or inspect_source(data)
    if data.format == "image_folder":
        return read_image_folder(info, data, ray_data, num_cpus, with_bytes), info.class_names
    return read_parquet(info, data, ray_data, num_cpus), info.class_names


def defers_bytes(data: DataConfig) -> bool:
    """Whether `read_source(..., with_bytes=False)` leaves this source's image bytes to `read_file_bytes`."""
    return data.format == "image_folder"


def source_rows(info: SourceInfo) -> list[dict]:
    """Every source row (without bytes), listed here on the driver: for tests and small datasets; a run
    lists them in its read tasks instead."""
    if info.index is not None:
        return index_rows(info)
    return [row for folder in info.folders for row in folder_rows(folder)]
