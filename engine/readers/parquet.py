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
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine import schema, storage
from engine.config import DataConfig
from engine.readers.source import SourceInfo, read_bytes, sample_indices
from engine.stages.batch import Batch
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

    # 3. The index: one light row per image, as Arrow columns (no Python object per row: 10^6 rows are 59 MiB
    #    here); no image bytes are read unless ids need content hashes.
    tables, skipped_splits = [], Counter()
    for number, (location, file_split) in enumerate(zip(files, file_splits, strict=True)):
        if file_split != "":  # "": not a file of any split (noted)
            labels = (class_names, string_labels)
            tables.append(
                _index_file(
                    data, location, number, root, file_split, id_column, labels, wanted, skipped_splits
                )
            )
    for split, n in sorted(skipped_splits.items()):
        notes.append(f"{n} rows of split {split!r} skipped (not in data.splits {data.splits})")
    index = pa.concat_tables(tables) if tables else _FILE_INDEX.empty_table()
    if not index.num_rows:
        raise ValueError(f"no rows of splits {data.splits} in {data.path} ({len(files)} parquet files)")

    # 4. Unique source ids: content hashes where there is no id or path, or where paths repeat.
    index = _with_source_ids(index, data.image_column, files, root)
    index, duplicates = _drop_duplicates(index, notes)
    available = index.num_rows
    if data.max_images and available > data.max_images:
        splits, ids = index[schema.SPLIT].to_pylist(), index[schema.SOURCE_ID].to_pylist()
        label_values = index[schema.LABEL].to_numpy()
        index = index.take(sample_indices(splits, label_values, ids, data.max_images, data.sample_seed))
        notes.append(f"max_images={data.max_images}: read {index.num_rows} of {available} images")
    files_column = pa.DictionaryArray.from_arrays(index["file"].combine_chunks(), pa.array(files))
    index = index.set_column(index.schema.get_field_index("file"), "file", files_column)
    per_split = pc.value_counts(index[schema.SPLIT].combine_chunks())
    counts = zip(per_split.field("values").to_pylist(), per_split.field("counts").to_pylist(), strict=True)
    return SourceInfo(
        format=data.format,
        path=data.path,
        class_names=class_names,
        counts=dict(sorted(counts)),
        num_available=available,
        num_duplicates=duplicates,
        notes=notes,
        index=index.select(INDEX_COLUMNS),
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
            # Arrow's hash set per file: a Python value per class, not per row, on the driver.
            names.update(str(v) for v in pc.unique(column).to_pylist() if v is not None)
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


_FILE_INDEX = pa.schema(
    [
        ("file", pa.int32()),  # position in the dataset's file list
        ("row_group", pa.int32()),
        ("row", pa.int64()),  # within the row group
        ("id", pa.string()),  # the id column's value, if any
        ("image_path", pa.string()),  # relative to the dataset root where it lies under it
        (schema.LABEL, pa.int64()),
        (schema.SPLIT, pa.string()),  # as data.splits spells it
        (schema.GROUP, pa.int64()),
    ]
)
INDEX_COLUMNS = ["file", "row_group", "row", schema.SOURCE_ID, schema.LABEL, schema.SPLIT, schema.GROUP]


def _index_file(
    data: DataConfig,
    location: str,
    number: int,
    root: str,
    file_split: str | None,
    id_column: str | None,
    labels: tuple[list[str], bool],
    wanted: dict[str, str],
    skipped_splits: Counter,
) -> pa.Table:
    """One file's rows of the wanted splits as a `_FILE_INDEX` table; counts the others' split values in
    `skipped_splits`. `labels`: the class names, and whether the label column holds names (else ints)."""
    class_names, string_labels = labels
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
    n = table.num_rows
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.repeat(np.cumsum([0] + sizes)[:-1], sizes)

    # Splits: each distinct value is looked up once (a split column has a handful of them).
    if file_split is None:
        values = _strings(table.column(SPLIT_COLUMN)).dictionary_encode()
        names = [str(v) for v in values.dictionary.to_pylist()] + ["None"]  # the last one: null
        codes = values.indices.fill_null(len(names) - 1).to_numpy(zero_copy_only=False)
    else:
        names, codes = [file_split], np.zeros(n, np.int64)
    spelled = [wanted.get(canonical_split(name)) for name in names]
    keep = np.array([s is not None for s in spelled])[codes]
    for code, count in enumerate(np.bincount(codes[~keep], minlength=len(names))):
        if count:
            skipped_splits[names[code]] += int(count)
    split = pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(spelled, pa.string()))

    labels = table.column(data.label_column).combine_chunks()
    if string_labels:
        label_of = {name: i for i, name in enumerate(class_names)}
        values = labels.dictionary_encode()
        lookup = np.array([label_of.get(str(v), -1) for v in values.dictionary.to_pylist()] + [-1], np.int64)
        label = lookup[values.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)]
    else:
        label = labels.fill_null(-1).cast(pa.int64()).to_numpy(zero_copy_only=False)
    group = (
        table.column(schema.GROUP).combine_chunks().fill_null(-1).cast(pa.int64())
        if schema.GROUP in table.column_names
        else pa.array(np.full(n, -1, np.int64))
    )
    index = pa.table(
        {
            "file": pa.array(np.full(n, number, np.int32)),
            "row_group": pa.array(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)),
            "row": pa.array(np.arange(n, dtype=np.int64) - starts),
            "id": (
                _strings(table.column(id_column))
                if id_column and id_column in table.column_names
                else pa.nulls(n, pa.string())
            ),
            "image_path": _image_paths(table, data.image_column, image_type, root, n),
            schema.LABEL: pa.array(label),
            schema.SPLIT: split.dictionary_decode(),
            schema.GROUP: group,
        },
        schema=_FILE_INDEX,
    )
    return index.filter(pa.array(keep))


def _strings(column) -> pa.Array:
    """A column's values as strings (ids and split names may be stored as ints)."""
    return column.combine_chunks().cast(pa.string())


def _image_paths(table: pa.Table, image_column: str, image_type, root: str, n: int) -> pa.Array:
    """Each row's image path (null where none or empty), relative to `root` where it lies under it."""
    if image_column not in table.column_names:
        return pa.nulls(n, pa.string())
    column = table.column(image_column).combine_chunks()
    if pa.types.is_struct(image_type):
        column = column.field("path")
    paths = column.cast(pa.string())
    paths = pc.if_else(pc.equal(paths, ""), pa.scalar(None, pa.string()), paths)
    root_path = root.partition("?")[0].rstrip("/") + "/"
    if "://" in root_path:
        root_path = root_path.split("://", 1)[1]
    plain = pc.replace_substring_regex(paths, r"^.*?://", "", max_replacements=1)  # the scheme, if any
    relative = pc.utf8_slice_codeunits(plain, len(root_path))  # counts characters, as str slicing does
    return pc.if_else(pc.starts_with(plain, root_path), relative, paths)


def _with_source_ids(index: pa.Table, image_column: str, files: list[str], root: str) -> pa.Table:
    """Add `source_id`: the id column, else the image path (with a content hash where paths repeat), else
    a hash of the image bytes; rows with neither a path nor bytes get their file position (they fail as
    missing images, each on its own). Only rows that need a hash are handled one by one."""
    ids, paths = index["id"].combine_chunks(), index["image_path"].combine_chunks()
    no_id = pc.is_null(ids)
    counts = pc.value_counts(paths.filter(pc.and_(no_id, pc.is_valid(paths))))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    path_repeated = pc.is_in(paths, value_set=repeated)
    source_ids = pc.coalesce(ids, pc.if_else(path_repeated, pa.scalar(None, pa.string()), paths))
    needs_hash = pc.and_(no_id, pc.or_(pc.is_null(paths), path_repeated))
    if pc.any(needs_hash).as_py():
        pending = index.filter(needs_hash)
        hashes = _content_hashes(pending, image_column, files)
        rel_files = [posixpath.relpath(f.partition("?")[0], root.partition("?")[0]) for f in files]
        filled = []
        for digest, path, number, row_group, row in zip(
            hashes,
            pending["image_path"].to_pylist(),
            pending["file"].to_pylist(),
            pending["row_group"].to_pylist(),
            pending["row"].to_pylist(),
            strict=True,
        ):
            if digest:
                filled.append(f"{path}#{digest}" if path else digest)
            elif path:  # a repeated path without bytes: the same file named twice
                filled.append(path)
            else:
                filled.append(f"{rel_files[number]}#{row_group}:{row}")
        source_ids = pc.replace_with_mask(source_ids, needs_hash, pa.array(filled, pa.string()))
    return index.append_column(schema.SOURCE_ID, source_ids)


def _content_hashes(rows: pa.Table, image_column: str, files: list[str]) -> list[str | None]:
    """sha1 (16 hex) of the embedded image bytes of each of `rows`, in their order; None for empty or
    missing bytes. One streaming pass over the image column of the row groups concerned."""
    wanted: dict[tuple[int, int], dict[int, int]] = defaultdict(dict)
    for k, (number, row_group, row) in enumerate(
        zip(rows["file"].to_pylist(), rows["row_group"].to_pylist(), rows["row"].to_pylist(), strict=True)
    ):
        wanted[(number, row_group)][row] = k
    out: list[str | None] = [None] * rows.num_rows
    for (number, row_group), positions in sorted(wanted.items()):
        parquet = _open_parquet(files[number])
        image_type = parquet.schema_arrow.field(image_column).type
        column = f"{image_column}.bytes" if pa.types.is_struct(image_type) else image_column
        offset = 0
        for batch in parquet.iter_batches(batch_size=256, row_groups=[row_group], columns=[column]):
            values = batch.column(0)
            if pa.types.is_struct(values.type):
                values = values.field("bytes")
            for j, value in enumerate(values.to_pylist()):
                k = positions.get(offset + j)
                if k is not None and isinstance(value, bytes) and value:
                    out[k] = hashlib.sha1(value).hexdigest()[:16]
            offset += batch.num_rows
    return out


def _drop_duplicates(index: pa.Table, notes: list[str]) -> tuple[pa.Table, int]:
    """Keep one row of each source id; count and note the others (never merged silently: two rows with
    one id would have the same output ids, and a resume would count them as one). An image in both a test
    (or val) split and train is kept in the evaluation split: its synthetic variants must not train."""
    n = index.num_rows
    splits = index[schema.SPLIT].combine_chunks().dictionary_encode()
    priority = np.array(
        [{"test": 0, "val": 1}.get(canonical_split(s), 2) for s in splits.dictionary.to_pylist()], np.int64
    )[splits.indices.to_numpy(zero_copy_only=False)]
    order = np.lexsort((np.arange(n), priority))
    ids = index[schema.SOURCE_ID].combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(ids[order], return_index=True)
    keep = np.zeros(n, bool)
    keep[order[first]] = True
    if keep.all():
        return index, 0
    dropped = index[schema.SOURCE_ID].filter(pa.array(~keep))
    examples = sorted(pc.unique(dropped.combine_chunks()).to_pylist())[:3]
    notes.append(
        f"{len(dropped)} duplicate rows skipped: their source id (id column, image path + bytes, or "
        f"identical image bytes) repeats an earlier row's, e.g. {examples}"
    )
    return index.filter(pa.array(keep)), len(dropped)


def parquet_pieces(info: SourceInfo) -> pa.Table:
    """One row per (file, row group) of the index: what one read task reads, its rows as list columns.
    The index is in file order, so a piece is a run of equal (file, row group)."""
    index = info.index.combine_chunks()
    files = index["file"].chunk(0)  # one chunk after combine_chunks
    numbers = files.indices.to_numpy(zero_copy_only=False)
    row_groups = index["row_group"].to_numpy()
    change = (numbers[1:] != numbers[:-1]) | (row_groups[1:] != row_groups[:-1])
    starts = np.concatenate([[0], np.flatnonzero(change) + 1])
    offsets = pa.array(np.concatenate([starts, [index.num_rows]]), pa.int32())

    def listed(name: str) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, index[name].combine_chunks())

    return pa.table(
        {
            "file": files.dictionary.take(pa.array(numbers[starts])),
            "row_group": pa.array(row_groups[starts]),
            "rows": listed("row"),
            schema.SOURCE_ID: listed(schema.SOURCE_ID),
            schema.LABEL: listed(schema.LABEL),
            schema.SPLIT: listed(schema.SPLIT),
            schema.GROUP: listed(schema.GROUP),
        }
    )


def index_rows(info: SourceInfo) -> list[dict]:
    """The index as source rows (tests, small datasets)."""
    rows = info.index.select([schema.SOURCE_ID, schema.LABEL, schema.SPLIT, schema.GROUP]).to_pylist()
    for row in rows:
        row[schema.CLASS_NAME] = _class_name(info.class_names, row[schema.LABEL])
    return rows


def read_parquet(info: SourceInfo, data: DataConfig, ray_data, num_cpus: float):
    """One block per file row group: each is read once, and its rows leave in blocks of rows_per_block.
    The pieces go to Ray as Arrow (not `from_items` of dicts): no Python object per source row."""
    pieces = parquet_pieces(info)
    return ray_data.from_arrow(pieces, override_num_blocks=pieces.num_rows).map_batches(
        read_parquet_rows,
        fn_kwargs={
            "image_column": data.image_column,
            "root": dataset_root(data.path),
            "rows_per_block": data.rows_per_block,
            "class_names": info.class_names,
        },
        batch_format="numpy",
        batch_size=1,
        num_cpus=num_cpus,
    )


def read_parquet_rows(
    batch: Batch, image_column: str, root: str, rows_per_block: int, class_names: list[str]
):
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
            for name in (schema.SOURCE_ID, schema.LABEL, schema.SPLIT, schema.GROUP)
        }
        meta[schema.CLASS_NAME] = [_class_name(class_names, label) for label in meta[schema.LABEL]]
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


def _class_name(class_names: list[str], label: int) -> str:
    """A label's class name; "" for a label outside the names (-1: unknown), which decode reports."""
    return class_names[label] if 0 <= label < len(class_names) else ""


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
