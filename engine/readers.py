"""Readers: a dataset on disk or object storage -> a Ray Dataset of source rows.

Source rows carry: source_id, image_bytes, mask_bytes (or None), label, class_name, split, group.
Paths are anything pyarrow's filesystem layer takes (local path, s3://, gs://, ...).

- image_folder: `<root>/<split>/<class>/<file>` (torchvision ImageFolder per split); labels are the sorted
  class folder names; optional masks at `<masks_path>/<split>/<class>/<stem>.png`; optional
  `<root>/groups.csv` (`source_id,group,...`).
- parquet: rows with encoded image bytes (plain binary or a Hugging Face `Image` struct) and an int label.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath

import numpy as np
import pyarrow.fs as pafs

from engine import schema
from engine.batch import Batch
from engine.config import DataConfig
from engine.storage import filesystem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_source(data: DataConfig, ray_data, num_cpus: float = 0.5):
    """Build the source dataset. Returns (dataset, class_names). `num_cpus`: per read task, counted in the
    pipeline's CPU budget (Ray's default of 1 can leave a small cluster waiting forever)."""
    if data.format == "image_folder":
        rows, class_names = list_image_folder(data)
        if not rows:
            raise ValueError(f"no images found under {data.path} for splits {data.splits}")
        # Small blocks stream through the stages (and land as shards) as they finish; one big block
        # would hold every row until the last one is done.
        num_blocks = -(-len(rows) // data.rows_per_block)
        ds = ray_data.from_items(rows, override_num_blocks=num_blocks).map_batches(
            read_file_bytes, batch_format="numpy", batch_size=data.rows_per_block, num_cpus=num_cpus
        )
        return ds, class_names
    if data.format == "parquet":
        return read_parquet_source(data, ray_data, num_cpus)
    raise ValueError(f"unknown data.format {data.format!r}")


def list_image_folder(data: DataConfig) -> tuple[list[dict], list[str]]:
    fs, root = filesystem(data.path)
    classes: set[str] = set()
    files: list[tuple[str, str, str]] = []  # (split, class, relative path)
    for split in data.splits:
        infos = fs.get_file_info(pafs.FileSelector(posixpath.join(root, split), recursive=True))
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.lower().endswith(IMAGE_SUFFIXES):
                continue
            rel = posixpath.relpath(info.path, root)
            parts = rel.split("/")
            if len(parts) != 3:  # not <split>/<class>/<file>
                continue
            classes.add(parts[1])
            files.append((split, parts[1], rel))
    class_names = sorted(classes)
    label_of = {name: i for i, name in enumerate(class_names)}
    groups = _read_groups(fs, data.groups_file or posixpath.join(root, "groups.csv"))
    masks_root = filesystem(data.masks_path)[1] if data.masks_path else None
    files.sort()
    if data.max_images:
        files = files[: data.max_images]
    rows = []
    for split, class_name, rel in files:
        mask_path = posixpath.splitext(posixpath.join(masks_root, rel))[0] + ".png" if masks_root else ""
        rows.append(
            {
                schema.SOURCE_ID: rel,
                "path": _with_scheme(data.path, posixpath.join(root, rel)),
                "mask_path": _with_scheme(data.masks_path, mask_path) if mask_path else "",
                schema.LABEL: label_of[class_name],
                schema.CLASS_NAME: class_name,
                schema.SPLIT: split,
                schema.GROUP: groups.get(rel, -1),
            }
        )
    return rows, class_names


def read_file_bytes(batch: Batch) -> Batch:
    """Fetch image (and mask) bytes; a missing file is recorded as None and becomes a decode error."""
    images, masks = [], []
    for path, mask_path in zip(batch["path"], batch["mask_path"], strict=True):
        images.append(_read_bytes(str(path)))
        masks.append(_read_bytes(str(mask_path)) if mask_path else None)
    out = {k: v for k, v in batch.items() if k not in ("path", "mask_path")}
    out[schema.IMAGE_BYTES] = np.array(images, dtype=object)
    out[schema.MASK_BYTES] = np.array(masks, dtype=object)
    return out


def read_parquet_source(data: DataConfig, ray_data, num_cpus: float):
    if not data.class_names:
        raise ValueError("data.class_names is required for parquet datasets (class name by label)")
    class_names = list(data.class_names)
    ds = ray_data.read_parquet(data.path)
    if data.max_images:
        ds = ds.limit(data.max_images)

    def to_source(batch: Batch) -> Batch:
        if data.image_column not in batch or data.label_column not in batch:
            raise ValueError(
                f"parquet dataset needs columns {data.image_column!r} and {data.label_column!r}; "
                f"it has {sorted(batch)}"
            )
        images = [_image_bytes(v) for v in batch[data.image_column]]
        labels = batch[data.label_column].astype(np.int64)
        n = len(images)
        # Content-addressed ids when the data has none: stable across runs and shard layouts.
        ids = batch.get(schema.SOURCE_ID)
        if ids is None:
            ids = np.array([hashlib.sha1(b or b"").hexdigest()[:16] for b in images], dtype=object)
        split = batch.get(schema.SPLIT, np.full(n, data.splits[0], dtype=object))
        return {
            schema.SOURCE_ID: ids,
            schema.IMAGE_BYTES: np.array(images, dtype=object),
            schema.MASK_BYTES: np.array([_image_bytes(m) for m in batch["mask"]], dtype=object)
            if "mask" in batch
            else np.full(n, None, dtype=object),
            schema.LABEL: labels,
            schema.CLASS_NAME: np.array(
                [class_names[i] if 0 <= i < len(class_names) else "" for i in labels], dtype=object
            ),
            schema.SPLIT: split,
            schema.GROUP: batch.get(schema.GROUP, np.full(n, -1, dtype=np.int64)),
        }

    return ds.map_batches(to_source, batch_format="numpy", batch_size=64, num_cpus=num_cpus), class_names


def _image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        return value.get("bytes")
    return bytes(value)


def _read_bytes(path: str) -> bytes | None:
    try:
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        return None


def _read_groups(fs, path: str) -> dict[str, int]:
    try:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return {}
    return {row["source_id"]: int(row["group"]) for row in csv.DictReader(io.StringIO(text))}


def _with_scheme(original: str | None, inner_path: str) -> str:
    """Re-attach the URI scheme (and query) that `FileSystem.from_uri` strips, so workers can open the path."""
    if original and "://" in original:
        query = original.partition("?")[2]
        return f"{original.split('://', 1)[0]}://{inner_path}" + (f"?{query}" if query else "")
    return inner_path
