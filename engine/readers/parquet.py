"""Parquet: what Hugging Face `datasets` writes (`to_parquet`, `push_to_hub`) or any Parquet with an image
column and a label column.

The image column: a `datasets` Image struct `{bytes, path}`, plain binary, or a string path; paths without
bytes are read from storage, relative ones against the dataset root. The label column: int, with class
names from the `ClassLabel` metadata or `data.class_names`; or the class name as a string.
The split of a row: `data.split_files` patterns, else a `split` column, else the Hub's file naming
(`data/train-00000-of-00002.parquet`, `test.parquet`, `validation/0000.parquet`, ...).
Source ids: the `data.id_column` (or a `source_id` column), else the image path, else a hash of the image
bytes; rows whose id repeats an earlier row's are duplicates: skipped and counted in the notes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
import re
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine import schema, storage
from engine.batch import Batch
from engine.config import DataConfig
from engine.readers.source import SourceInfo, read_bytes, sample_rows, split_counts
from engine.storage import filesystem

MASK_COLUMN = "mask"
SPLIT_COLUMN = "split"

# The Hub's split keywords (as `datasets` resolves data files): a file or folder name holding one of these
# words, delimited by `-._ `, digits or the ends, belongs to that split. Canonical names are this
# project's (train / val / test); a configured split matches any of its aliases.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_CANONICAL_SPLIT = {alias: name for name, aliases in SPLIT_ALIASES.items() for alias in aliases}
_NAME_DELIMITERS = re.compile(r"[-._ 0-9]+")


def hub_split(relative_path: str) -> str | None:
    """The split the Hub's file naming gives a file (`data/train-00000-of-00001.parquet` -> "train",
    `validation/0.parquet` -> "val"), from its name first, then its folders; None when none or several."""
    for part in reversed(relative_path.split("/")):
        if part.endswith(".parquet"):
            part = part[: -len(".parquet")]
        found = {_CANONICAL_SPLIT[w] for w in _NAME_DELIMITERS.split(part.lower()) if w in _CANONICAL_SPLIT}
        if len(found) == 1:
            return found.pop()
        if found:
            return None  # "train_test.parquet": ambiguous
    return None


def canonical_split(name: str) -> str:
    """ "validation" -> "val", "training" -> "train"; other names unchanged."""
    return _CANONICAL_SPLIT.get(str(name).lower(), str(name))


def huggingface_features(arrow_schema: pa.Schema) -> dict:
    """The `datasets` features stored in a Parquet file's Arrow schema metadata ({} when none)."""
    raw = (arrow_schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("info", {}).get("features") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def parquet_files(path: str) -> list[str]:
    """The Parquet files at `path` (a file, or every *.parquet under a folder), as locations, sorted."""
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        return [storage.resolve(path)]
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    rels = sorted(
        posixpath.relpath(i.path, inner)
        for i in infos
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not any(p.startswith((".", "_")) for p in posixpath.relpath(i.path, inner).split("/"))
    )
    return [storage.join(path, rel) for rel in rels]


def dataset_root(path: str) -> str:
    """The folder relative paths are resolved against: data.path, or the folder of a single file."""
    fs, inner = filesystem(path)
    return (
        storage.parent(path) if fs.get_file_info(inner).type == pafs.FileType.File else storage.resolve(path)
    )


def inspect_parquet(data: DataConfig) -> SourceInfo:
    files = parquet_files(data.path)
    if not files:
        raise ValueError(f"no .parquet files under {data.path}")
    root = dataset_root(data.path)
    notes: list[str] = []
    wanted = {canonical_split(s): s for s in data.splits}  # canonical -> the configured spelling

    # 1. Schema and class names (config, else ClassLabel metadata, else string labels). Other Parquet files
    #    beside the dataset's (e.g. an errors table) are skipped with a note.
    schemas = [_open_parquet(f).schema_arrow for f in files]
    usable = [data.image_column in s.names and data.label_column in s.names for s in schemas]
    if any(usable) and not all(usable):
        others = [f for f, ok in zip(files, usable, strict=True) if not ok]
        notes.append(f"{len(others)} parquet files without the image and label columns skipped: {others[:3]}")
        files = [f for f, ok in zip(files, usable, strict=True) if ok]
        schemas = [s for s, ok in zip(schemas, usable, strict=True) if ok]
    first_schema = schemas[0]
    for column in (data.image_column, data.label_column):
        if column not in first_schema.names:
            raise ValueError(
                f"parquet dataset needs columns {data.image_column!r} and {data.label_column!r} "
                f"(data.image_column / data.label_column); {files[0]} has {first_schema.names}"
            )
    if data.id_column and data.id_column not in first_schema.names:
        raise ValueError(f"data.id_column {data.id_column!r} is not a column of {files[0]}")
    id_column = data.id_column or (schema.SOURCE_ID if schema.SOURCE_ID in first_schema.names else None)
    features = huggingface_features(first_schema)
    string_labels = pa.types.is_string(
        first_schema.field(data.label_column).type
    ) or pa.types.is_large_string(first_schema.field(data.label_column).type)
    class_names = _class_names(data, features, string_labels, files)

    # 2. The split of each file (None: per row, from the split column).
    file_splits = _file_splits(data, files, root, first_schema, notes)

    # 3. One light row per image (no image bytes read unless ids need content hashes).
    rows: list[dict] = []
    skipped_splits: Counter = Counter()
    for location, file_split in zip(files, file_splits, strict=True):
        if file_split == "":
            continue  # not a file of any split (noted)
        rows += _index_file(
            data, location, root, file_split, id_column, class_names, string_labels, wanted, skipped_splits
        )
    for split, n in sorted(skipped_splits.items()):
        notes.append(f"{n} rows of split {split!r} skipped (not in data.splits {data.splits})")
    if not rows:
        raise ValueError(f"no rows of splits {data.splits} in {data.path} ({len(files)} parquet files)")

    # 4. Unique source ids: content hashes where there is no id or path, or where paths repeat.
    _assign_source_ids(rows, data.image_column)
    rows, duplicates = _drop_duplicates(rows, notes)
    available = len(rows)
    rows = sample_rows(rows, data.max_images, data.sample_seed)
    if len(rows) < available:
        notes.append(f"max_images={data.max_images}: read {len(rows)} of {available} images")
    return SourceInfo(
        format=data.format,
        path=data.path,
        class_names=class_names,
        counts=split_counts(rows),
        num_available=available,
        num_duplicates=duplicates,
        notes=notes,
        pieces=_pieces(rows),
    )


def _open_parquet(location: str) -> pq.ParquetFile:
    fs, inner = filesystem(location)
    return pq.ParquetFile(fs.open_input_file(inner))


def _class_names(data: DataConfig, features: dict, string_labels: bool, files: list[str]) -> list[str]:
    if data.class_names:
        return list(data.class_names)
    label_feature = features.get(data.label_column) or {}
    if label_feature.get("_type") == "ClassLabel" and label_feature.get("names"):
        return [str(n) for n in label_feature["names"]]
    if string_labels:  # the label column holds class names: sorted, as image folders sort theirs
        names: set[str] = set()
        for location in files:
            column = _open_parquet(location).read(columns=[data.label_column]).column(0)
            names.update(str(v) for v in column.to_pylist() if v is not None)
        return sorted(names)
    raise ValueError(
        f"no class names for the int labels of {data.path}: its files have no ClassLabel metadata for "
        f"column {data.label_column!r}; set data.class_names (names in label order)"
    )


def _file_splits(data: DataConfig, files: list[str], root: str, first_schema, notes: list[str]):
    """Per file: its split's canonical name, None (from the split column), or "" (skip the file)."""
    rels = [posixpath.relpath(f.partition("?")[0], root.partition("?")[0]) for f in files]
    if data.split_files:
        splits = []
        for rel in rels:
            matched = [s for s, pattern in data.split_files.items() if fnmatch.fnmatch(rel, pattern)]
            if len(matched) > 1:
                raise ValueError(
                    f"{rel} matches the patterns of several splits in data.split_files: {matched}"
                )
            splits.append(canonical_split(matched[0]) if matched else "")
        unmatched = [rel for rel, s in zip(rels, splits, strict=True) if s == ""]
        if unmatched:
            notes.append(
                f"{len(unmatched)} files match no data.split_files pattern: skipped ({unmatched[:3]})"
            )
        return splits
    if SPLIT_COLUMN in first_schema.names:
        return [None] * len(files)
    named = [hub_split(rel) for rel in rels]
    if any(named):
        unnamed = [rel for rel, s in zip(rels, named, strict=True) if s is None]
        if unnamed:
            notes.append(
                f"{len(unnamed)} files have no split in their name while others do: skipped ({unnamed[:3]}); "
                "set data.split_files to read them"
            )
        return [s or "" for s in named]
    first = canonical_split(data.splits[0])
    notes.append(
        f"no split column and no split in the file names: all rows are read as split {data.splits[0]!r} "
        "(set data.split_files to say which files hold which split)"
    )
    return [first] * len(files)


def _index_file(
    data: DataConfig,
    location: str,
    root: str,
    file_split: str | None,
    id_column: str | None,
    class_names: list[str],
    string_labels: bool,
    wanted: dict[str, str],
    skipped_splits: Counter,
) -> list[dict]:
    parquet = _open_parquet(location)
    arrow_schema = parquet.schema_arrow
    if data.image_column not in arrow_schema.names or data.label_column not in arrow_schema.names:
        raise ValueError(f"{location} lacks column {data.image_column!r} or {data.label_column!r}")
    image_type = arrow_schema.field(data.image_column).type
    columns = [data.label_column]
    if pa.types.is_struct(image_type) and image_type.get_field_index("path") >= 0:
        columns.append(f"{data.image_column}.path")
    elif pa.types.is_string(image_type) or pa.types.is_large_string(image_type):
        columns.append(data.image_column)
    for extra in (id_column, SPLIT_COLUMN if file_split is None else None, schema.GROUP):
        if extra and extra in arrow_schema.names and extra not in columns:
            columns.append(extra)
    table = parquet.read(columns=columns)
    labels = table.column(data.label_column).to_pylist()
    paths = _image_paths(table, data.image_column, image_type)
    ids = table.column(id_column).to_pylist() if id_column and id_column in table.column_names else None
    splits = table.column(SPLIT_COLUMN).to_pylist() if file_split is None else None
    groups = table.column(schema.GROUP).to_pylist() if schema.GROUP in table.column_names else None
    label_of = {name: i for i, name in enumerate(class_names)}
    starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
    rel_file = posixpath.relpath(location.partition("?")[0], root.partition("?")[0])

    rows = []
    for i in range(table.num_rows):
        split = canonical_split(splits[i]) if splits is not None else file_split
        if split not in wanted:
            skipped_splits[str(splits[i] if splits is not None else split)] += 1
            continue
        if string_labels:
            label = label_of.get(str(labels[i]), -1) if labels[i] is not None else -1
        else:
            label = int(labels[i]) if labels[i] is not None else -1
        row_group = int(np.searchsorted(starts, i, side="right") - 1)
        rows.append(
            {
                "file": location,
                "rel_file": rel_file,
                "row_group": row_group,
                "row": i - int(starts[row_group]),
                "id": None if ids is None or ids[i] is None else str(ids[i]),
                "image_path": _relative_to_root(paths[i], root) if paths and paths[i] else None,
                schema.LABEL: label,
                schema.CLASS_NAME: class_names[label] if 0 <= label < len(class_names) else "",
                schema.SPLIT: wanted[split],
                schema.GROUP: int(groups[i]) if groups and groups[i] is not None else -1,
            }
        )
    return rows


def _image_paths(table: pa.Table, image_column: str, image_type) -> list[str | None] | None:
    if image_column not in table.column_names:
        return None
    column = table.column(image_column)
    if pa.types.is_struct(image_type):
        return [v.get("path") if v else None for v in column.to_pylist()]
    return column.to_pylist()


def _relative_to_root(path: str, root: str) -> str:
    """A path as a source id: relative to the dataset root when it lies under it."""
    root_path = root.partition("?")[0].rstrip("/") + "/"
    if "://" in root_path:
        root_path = root_path.split("://", 1)[1]
    plain = path.split("://", 1)[1] if "://" in path else path
    return plain[len(root_path) :] if plain.startswith(root_path) else path


def _assign_source_ids(rows: list[dict], image_column: str) -> None:
    """source_id per row: the id column, else the image path (with a content hash where paths repeat),
    else a hash of the image bytes; rows with neither a path nor bytes get their file position (they
    fail as missing images, each on its own)."""
    path_uses = Counter(row["image_path"] for row in rows if row["id"] is None and row["image_path"])
    needs_hash = [
        row
        for row in rows
        if row["id"] is None and (not row["image_path"] or path_uses[row["image_path"]] > 1)
    ]
    hashes = _content_hashes(needs_hash, image_column)
    for row in rows:
        key = (row["file"], row["row_group"], row["row"])
        if row["id"] is not None:
            row[schema.SOURCE_ID] = row["id"]
        elif row["image_path"] and path_uses[row["image_path"]] == 1:
            row[schema.SOURCE_ID] = row["image_path"]
        elif hashes.get(key):
            digest = hashes[key]
            row[schema.SOURCE_ID] = f"{row['image_path']}#{digest}" if row["image_path"] else digest
        elif row["image_path"]:  # repeated path, no bytes: the same file named twice
            row[schema.SOURCE_ID] = row["image_path"]
        else:
            row[schema.SOURCE_ID] = f"{row['rel_file']}#{row['row_group']}:{row['row']}"


def _content_hashes(rows: list[dict], image_column: str) -> dict[tuple, str]:
    """sha1 (16 hex) of the embedded image bytes of `rows`, by (file, row group, row); none for empty or
    missing bytes. One streaming pass over the image column of the row groups concerned."""
    wanted: dict[tuple[str, int], set[int]] = defaultdict(set)
    for row in rows:
        wanted[(row["file"], row["row_group"])].add(row["row"])
    out = {}
    for (location, row_group), positions in sorted(wanted.items()):
        parquet = _open_parquet(location)
        image_type = parquet.schema_arrow.field(image_column).type
        column = f"{image_column}.bytes" if pa.types.is_struct(image_type) else image_column
        offset = 0
        for batch in parquet.iter_batches(batch_size=256, row_groups=[row_group], columns=[column]):
            values = batch.column(0)
            if pa.types.is_struct(values.type):
                values = values.field("bytes")
            for j, value in enumerate(values.to_pylist()):
                if offset + j in positions and isinstance(value, bytes) and value:
                    out[(location, row_group, offset + j)] = hashlib.sha1(value).hexdigest()[:16]
            offset += batch.num_rows
    return out


def _drop_duplicates(rows: list[dict], notes: list[str]) -> tuple[list[dict], int]:
    """Keep one row of each source id; count and note the others (never merged silently: two rows with
    one id would have the same output ids, and a resume would count them as one). An image in both a test
    (or val) split and train is kept in the evaluation split: its synthetic variants must not train."""
    priority = {"test": 0, "val": 1}
    order = sorted(
        range(len(rows)), key=lambda i: (priority.get(canonical_split(rows[i][schema.SPLIT]), 2), i)
    )
    seen: set[str] = set()
    keep, dropped = set(), []
    for i in order:
        if rows[i][schema.SOURCE_ID] in seen:
            dropped.append(rows[i])
        else:
            seen.add(rows[i][schema.SOURCE_ID])
            keep.add(i)
    kept = [row for i, row in enumerate(rows) if i in keep]
    if dropped:
        examples = sorted({row[schema.SOURCE_ID] for row in dropped})[:3]
        notes.append(
            f"{len(dropped)} duplicate rows skipped: their source id (id column, image path + bytes, or "
            f"identical image bytes) repeats an earlier row's, e.g. {examples}"
        )
    return kept, len(dropped)


def _pieces(rows: list[dict]) -> list[dict]:
    """One read task per (file, row group), its rows in file order."""
    grouped: dict[tuple[str, int], list[dict]] = defaultdict(list)
    order: list[tuple[str, int]] = []
    for row in rows:
        key = (row["file"], row["row_group"])
        if key not in grouped:
            order.append(key)
        grouped[key].append(row)
    pieces = []
    for location, row_group in order:
        members = sorted(grouped[(location, row_group)], key=lambda r: r["row"])
        pieces.append(
            {
                "file": location,
                "row_group": row_group,
                "rows": [r["row"] for r in members],
                schema.SOURCE_ID: [r[schema.SOURCE_ID] for r in members],
                schema.LABEL: [r[schema.LABEL] for r in members],
                schema.CLASS_NAME: [r[schema.CLASS_NAME] for r in members],
                schema.SPLIT: [r[schema.SPLIT] for r in members],
                schema.GROUP: [r[schema.GROUP] for r in members],
            }
        )
    return pieces


def read_parquet(info: SourceInfo, data: DataConfig, ray_data, num_cpus: float):
    """One block per file row group: each is read once, and its rows leave in blocks of rows_per_block."""
    return ray_data.from_items(info.pieces, override_num_blocks=len(info.pieces)).map_batches(
        read_parquet_rows,
        fn_kwargs={
            "image_column": data.image_column,
            "root": dataset_root(data.path),
            "rows_per_block": data.rows_per_block,
        },
        batch_format="numpy",
        batch_size=1,
        num_cpus=num_cpus,
    )


def read_parquet_rows(batch: Batch, image_column: str, root: str, rows_per_block: int):
    """Read task: the image (and mask) bytes of one piece's rows, yielded in blocks of rows_per_block.

    Image values: bytes, a `datasets` Image struct (bytes, or None and a path), or a path string; paths
    are read from storage (relative ones against `root`); an unreadable one gives None (a decode error).
    """
    for p in range(len(batch["file"])):
        location, row_group = str(batch["file"][p]), int(batch["row_group"][p])
        positions = [int(r) for r in batch["rows"][p]]
        wanted = {r: k for k, r in enumerate(positions)}
        parquet = _open_parquet(location)
        columns = [c for c in (image_column, MASK_COLUMN) if c in parquet.schema_arrow.names]
        images: list = [None] * len(positions)
        masks: list = [None] * len(positions)
        offset = 0
        for record_batch in parquet.iter_batches(batch_size=256, row_groups=[row_group], columns=columns):
            image_values = record_batch.column(image_column).to_pylist()
            mask_values = (
                record_batch.column(MASK_COLUMN).to_pylist()
                if MASK_COLUMN in columns
                else [None] * len(image_values)
            )
            for j, (image, mask) in enumerate(zip(image_values, mask_values, strict=True)):
                k = wanted.get(offset + j)
                if k is not None:
                    images[k] = _image_bytes(image, root)
                    masks[k] = _image_bytes(mask, root)
            offset += record_batch.num_rows
        meta = {
            name: list(batch[name][p])
            for name in (schema.SOURCE_ID, schema.LABEL, schema.CLASS_NAME, schema.SPLIT, schema.GROUP)
        }
        for start in range(0, len(positions), rows_per_block):
            part = slice(start, start + rows_per_block)
            yield {
                schema.SOURCE_ID: np.array(meta[schema.SOURCE_ID][part], dtype=object),
                schema.IMAGE_BYTES: _objects(images[part]),
                schema.MASK_BYTES: _objects(masks[part]),
                schema.LABEL: np.array(meta[schema.LABEL][part], dtype=np.int64),
                schema.CLASS_NAME: np.array(meta[schema.CLASS_NAME][part], dtype=object),
                schema.SPLIT: np.array(meta[schema.SPLIT][part], dtype=object),
                schema.GROUP: np.array(meta[schema.GROUP][part], dtype=np.int64),
            }


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _image_bytes(value, root: str) -> bytes | None:
    """Bytes of an image cell: binary as is; an Image struct's bytes, else its path read; a path read."""
    if value is None:
        return None
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    if isinstance(value, str):
        location = value if storage.is_uri(value) or posixpath.isabs(value) else storage.join(root, value)
        return read_bytes(location)
    return bytes(value)
