"""Readers: a dataset on disk or object storage -> a Ray Dataset of source rows.

Source rows carry: source_id, image_bytes, mask_bytes (or None), label, class_name, split, group.
Paths are anything the storage layer opens (local path, s3://, gs://, ...).

Two steps, so that a wrong dataset fails before Ray starts and nothing is written:
- `inspect_source(data)` (driver, no Ray): finds splits and class names, counts the rows per split, reports
  duplicates and applies `max_images`. Returns a `SourceInfo` (class names, rows per split, notes for the
  run report, and what the read tasks need).
- `read_source(data, ray_data, num_cpus, info)`: the Ray Dataset that reads the image bytes of those rows.

Formats:
- image_folder: `<root>/<split>/<class>/<file>` (torchvision ImageFolder per split); labels are the sorted
  names of the class folders that hold images; source ids are the paths `<split>/<class>/<file>`; optional
  masks at `<masks_path>/<split>/<class>/<stem>.png`; optional `<root>/groups.csv` (`source_id,group,...`).
  A split without a folder is skipped with a note; so are entries that are not `<split>/<class>/<image>`
  (counted) and folders that cannot be listed (named).
  Scale (ImageNet: 1.28 M files in 2 x 1000 folders): the driver lists only the `<split>/<class>` folders
  and counts each one's images in threads (`LISTING_THREADS` at once, holding one folder's names each); the
  run lists each folder again in its own read task, which emits the rows. No process ever holds a list of
  every file. `max_images` keeps `sample_rows`' exact sample without one: a folder is one (split, label)
  stratum, so each folder's share follows from the folders' sizes (`_stratified_takes`) and each read task
  takes its share by the same seeded hash. Only a groups file is read whole on the driver (split per folder
  for the tasks): it is for group-annotated datasets, which are small; ImageNet has none.
- parquet: what Hugging Face `datasets` writes (`to_parquet`, `push_to_hub`) or any Parquet with an image
  column (a `datasets` Image struct `{bytes, path}`, plain binary, or a string path) and a label column
  (int, with class names from the `ClassLabel` metadata or `data.class_names`; or the class name as a
  string). Image paths without bytes are read from storage, relative paths against the dataset root.
  The split of a row: `data.split_files` patterns, else a `split` column, else the Hub's file naming
  (`data/train-00000-of-00002.parquet`, `test.parquet`, `validation/0000.parquet`, ...).
  Source ids: the `data.id_column` (or a `source_id` column), else the image path, else a hash of the
  image bytes; rows whose id repeats an earlier row's are duplicates: skipped and counted in the notes.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import heapq
import io
import json
import logging
import posixpath
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine import schema, storage
from engine.batch import Batch
from engine.config import DataConfig
from engine.storage import filesystem

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LISTING_THREADS = 16  # folders listed at once by `inspect_source` (each waits on storage, not on a CPU)
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


@dataclass
class SourceInfo:
    """What `inspect_source` found: enough to check a run before Ray starts and to report on it."""

    format: str
    path: str
    class_names: list[str]
    counts: dict[str, int]  # rows to read per split (after duplicates and max_images)
    num_available: int  # rows of the read splits before max_images
    num_duplicates: int = 0  # rows skipped because their source id repeats an earlier row's
    notes: list[str] = field(default_factory=list)  # for the run report / summary
    folders: list[dict] = field(default_factory=list, repr=False)  # image_folder: one per <split>/<class>
    pieces: list[dict] = field(default_factory=list, repr=False)  # parquet: one per file row group

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())

    @property
    def rows(self) -> list[dict]:
        """image_folder: every source row, listed here on the driver (tests, small datasets; a run lists
        them in its read tasks instead)."""
        return [row for folder in self.folders for row in folder_rows(folder)]


def inspect_source(data: DataConfig) -> SourceInfo:
    """Driver side, no Ray: find the rows a run reads. Raises ValueError for a dataset that cannot run
    (no such path, no split present, no images, no class names); what is skipped is listed in `notes`."""
    if not storage.exists(data.path):
        raise ValueError(f"data.path {data.path} does not exist")
    if data.format == "image_folder":
        info = _inspect_image_folder(data)
    elif data.format == "parquet":
        info = _inspect_parquet(data)
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
        # One listing task per <split>/<class> folder; its rows are cut into blocks of rows_per_block
        # (a streaming repartition, which Ray Data never fuses with the operators after it), so small
        # blocks stream through the stages and land as shards as they finish, as from a list of files.
        ds = (
            ray_data.from_items(info.folders, override_num_blocks=len(info.folders))
            .map_batches(list_folder_rows, batch_format="numpy", batch_size=1, num_cpus=num_cpus)
            .repartition(target_num_rows_per_block=data.rows_per_block, strict=True)
        )
        if with_bytes:
            ds = ds.map_batches(
                read_file_bytes, batch_format="numpy", batch_size=data.rows_per_block, num_cpus=num_cpus
            )
        return ds, info.class_names
    # One block per file row group: each is read once, and its rows leave in blocks of rows_per_block.
    ds = ray_data.from_items(info.pieces, override_num_blocks=len(info.pieces)).map_batches(
        read_parquet_rows,
        fn_kwargs={
            "image_column": data.image_column,
            "root": _dataset_root(data.path),
            "rows_per_block": data.rows_per_block,
        },
        batch_format="numpy",
        batch_size=1,
        num_cpus=num_cpus,
    )
    return ds, info.class_names


# --------------------------------------------------------------------------- sampling


def sample_rows(rows: list[dict], max_images: int | None, seed: int = 0) -> list[dict]:
    """A deterministic sample of `max_images` rows, stratified by (split, label), in the input order.

    Rows are ranked within their stratum by a seeded hash of their source id; a row's key is its rank
    divided by the stratum's size, and the smallest keys win. So every stratum gets a row before any gets a
    second (when max_images allows), then each keeps about its share: a 16-image sample of a dataset with
    train/val/test and 4 classes holds every class of every split. The same rows, seed and budget always
    give the same sample, whatever the file order.
    """
    if not max_images or len(rows) <= max_images:
        return rows
    strata: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        strata[(str(row[schema.SPLIT]), int(row[schema.LABEL]))].append(i)
    keys = {}
    for members in strata.values():
        ranked = sorted(members, key=lambda i: _stable_hash(seed, rows[i][schema.SOURCE_ID]))
        for rank, i in enumerate(ranked):
            keys[i] = (rank / len(ranked), _stable_hash(seed, "tie", rows[i][schema.SOURCE_ID]))
    chosen = sorted(sorted(keys, key=keys.__getitem__)[:max_images])
    return [rows[i] for i in chosen]


def _stable_hash(*parts: object) -> int:
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(str(row[schema.SPLIT]) for row in rows).items()))


# --------------------------------------------------------------------------- image folders


def _inspect_image_folder(data: DataConfig) -> SourceInfo:
    fs, root = filesystem(data.path)
    notes: list[str] = []
    present = []
    for split in data.splits:
        kind = fs.get_file_info(posixpath.join(root, split)).type
        if kind == pafs.FileType.Directory:
            present.append(split)
        else:
            notes.append(f"split {split!r} has no folder {posixpath.join(data.path, split)}: skipped")
    if not present:
        raise ValueError(
            f"none of the splits {data.splits} has a folder under {data.path} "
            "(an image folder is <path>/<split>/<class>/<image>; set data.splits to the folders it has)"
        )
    # 1. The <split>/<class> folders (driver: splits x classes of them), then their images counted in
    #    parallel; nothing keeps a file name beyond the folder being counted.
    found, skipped, unreadable = [], Counter(), []
    for split in present:
        try:
            entries = fs.get_file_info(pafs.FileSelector(posixpath.join(root, split)))
        except OSError as err:
            unreadable.append(f"{split}: {err}")
            continue
        for entry in sorted(entries, key=lambda e: e.path):
            if entry.type == pafs.FileType.Directory:
                found.append((split, posixpath.basename(entry.path)))
            else:
                skipped[posixpath.relpath(entry.path, root)] += 1
    found.sort()  # the rows' order: by split name, class name, file name
    scans = _in_threads(lambda f: _scan_folder(fs, posixpath.join(root, *f)), found)
    sizes = []
    for (split, class_name), (num_images, others, error) in zip(found, scans, strict=True):
        if error:
            unreadable.append(f"{split}/{class_name}: {error}")
        skipped.update({f"{split}/{class_name}/{name}": 1 for name in others[:3]})
        skipped["..."] += max(0, len(others) - 3)
        sizes.append(num_images)
    num_skipped = sum(skipped.values())
    if num_skipped:
        examples = [name for name in skipped if name != "..."][:3]
        notes.append(
            f"{num_skipped} entries are not images at <split>/<class>/<image> (files outside a class folder, "
            f"folders inside one, other suffixes): skipped, e.g. {examples}"
        )
    if unreadable:
        notes.append(f"{len(unreadable)} folders could not be listed: skipped, e.g. {unreadable[:3]}")
    if not sum(sizes):
        raise ValueError(f"no images found under {data.path} for splits {present}")

    # 2. Labels: the sorted names of the class folders that hold images, in any split.
    class_names = sorted({c for (_, c), n in zip(found, sizes, strict=True) if n})
    label_of = {name: i for i, name in enumerate(class_names)}
    groups = (
        _read_groups(*filesystem(data.groups_file), required=True)
        if data.groups_file
        else _read_groups(fs, posixpath.join(root, "groups.csv"))
    )
    groups_of: dict[str, dict[str, int]] = defaultdict(dict)  # "<split>/<class>" -> its images' groups
    for source_id, group in groups.items():
        groups_of[posixpath.dirname(source_id)][source_id] = group
    folders = []
    for (split, class_name), num_images in zip(found, sizes, strict=True):
        if num_images:
            folders.append(
                {
                    # Resolved here: a relative path means nothing in a worker on another node.
                    "data_path": storage.resolve(data.path),
                    "masks_path": storage.resolve(data.masks_path) if data.masks_path else "",
                    schema.SPLIT: split,
                    schema.CLASS_NAME: class_name,
                    schema.LABEL: label_of[class_name],
                    "num_images": num_images,
                    "take": num_images,
                    "sampled": False,
                    "seed": data.sample_seed,
                    "groups": json.dumps(groups_of.get(f"{split}/{class_name}", {})),
                }
            )

    # 3. max_images: each folder is one (split, label) stratum of `sample_rows`, so its share follows
    #    from the folders' sizes; only where the budget ends inside a tie are some names hashed again.
    num_available = sum(f["num_images"] for f in folders)
    if data.max_images and num_available > data.max_images:
        takes = _stratified_takes(
            [f["num_images"] for f in folders],
            data.max_images,
            lambda at: _in_threads(lambda item: _tie_key(fs, root, folders[item[0]], item[1]), at),
        )
        for folder, take in zip(folders, takes, strict=True):
            folder["take"], folder["sampled"] = take, True
        folders = [f for f in folders if f["take"]]
        notes.append(f"max_images={data.max_images}: read {data.max_images} of {num_available} images")
    counts = Counter()
    for folder in folders:
        counts[folder[schema.SPLIT]] += folder["take"]
    return SourceInfo(
        format=data.format,
        path=data.path,
        class_names=class_names,
        counts=dict(sorted(counts.items())),
        num_available=num_available,
        notes=notes,
        folders=folders,
    )


def _in_threads(fn, items: list) -> list:
    """`fn` over `items` in threads: listing is waiting on storage (a LIST per 1000 keys on S3)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(LISTING_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def _scan_folder(fs, path: str) -> tuple[int, list[str], str]:
    """(images, names of the other entries, listing error or "") of one <split>/<class> folder."""
    try:
        images, others = _folder_entries(fs, path)
    except OSError as err:
        return 0, [], str(err)
    return len(images), others, ""


def _folder_entries(fs, path: str) -> tuple[list[str], list[str]]:
    """Image file names (sorted) and the other entries' names in one folder; OSError if unlistable."""
    images, others = [], []
    for entry in fs.get_file_info(pafs.FileSelector(path)):
        name = posixpath.basename(entry.path)
        if entry.type == pafs.FileType.File and name.lower().endswith(IMAGE_SUFFIXES):
            images.append(name)
        else:
            others.append(name)
    return sorted(images), others


def _stratified_takes(sizes: list[int], max_images: int, tie_keys) -> list[int]:
    """How many images `sample_rows` takes from each stratum, from the strata's sizes alone.

    `sample_rows` keys a stratum's rank-r row `r / size` and takes the `max_images` smallest keys; ties
    (equal keys in several strata, common when classes are equal in size) go to the smaller tie hash. So
    the keys are walked in order here, stratum by stratum, and only the last tie group asks `tie_keys` for
    the tie hashes of its rows, given as (stratum, rank) pairs.
    """
    taken = [0] * len(sizes)
    heap = [(0.0, s) for s, size in enumerate(sizes) if size]
    heapq.heapify(heap)
    left = max_images
    while left and heap:
        key = heap[0][0]
        group = []
        while heap and heap[0][0] == key:
            group.append(heapq.heappop(heap)[1])
        if len(group) > left:
            ties = tie_keys([(s, taken[s]) for s in group])
            group = [s for _, s in sorted(zip(ties, group, strict=True))][:left]
        for s in group:
            taken[s] += 1
            if taken[s] < sizes[s]:
                heapq.heappush(heap, (taken[s] / sizes[s], s))
        left -= len(group)
    return taken


def _tie_key(fs, root: str, folder: dict, rank: int) -> int:
    """The tie hash of the rank-th image of a folder in `sample_rows`' order."""
    ids = _ranked_ids(fs, root, folder, by_hash=True)
    return _stable_hash(folder["seed"], "tie", ids[rank])


def _ranked_ids(fs, root: str, folder: dict, by_hash: bool) -> list[str]:
    """A folder's source ids by name, or (`by_hash`) in `sample_rows`' order within a stratum: by seeded
    hash, then by name."""
    prefix = f"{folder[schema.SPLIT]}/{folder[schema.CLASS_NAME]}/"
    names, _ = _folder_entries(fs, posixpath.join(root, prefix))
    ids = [prefix + name for name in names]
    return sorted(ids, key=lambda sid: _stable_hash(folder["seed"], sid)) if by_hash else ids


def folder_rows(folder: dict) -> list[dict]:
    """The source rows of one <split>/<class> folder (its `take` of them, as `sample_rows` picks them).

    A folder that cannot be listed any more (it could at inspection) gives no rows and a warning: the run
    goes on with the others."""
    fs, root = filesystem(folder["data_path"])
    prefix = f"{folder[schema.SPLIT]}/{folder[schema.CLASS_NAME]}/"
    try:
        ids = _ranked_ids(fs, root, folder, by_hash=bool(folder["sampled"]))
    except OSError as err:
        logger.warning("data: folder %s could not be listed, its images are skipped: %s", prefix, err)
        return []
    chosen = sorted(ids[: folder["take"]]) if folder["sampled"] else sorted(ids)
    masks_root = filesystem(folder["masks_path"])[1] if folder["masks_path"] else None
    groups = json.loads(folder["groups"])
    rows = []
    for rel in chosen:
        mask_path = posixpath.splitext(posixpath.join(masks_root, rel))[0] + ".png" if masks_root else ""
        rows.append(
            {
                schema.SOURCE_ID: rel,
                "path": _with_scheme(folder["data_path"], posixpath.join(root, rel)),
                "mask_path": _with_scheme(folder["masks_path"], mask_path) if mask_path else "",
                schema.LABEL: int(folder[schema.LABEL]),
                schema.CLASS_NAME: str(folder[schema.CLASS_NAME]),
                schema.SPLIT: str(folder[schema.SPLIT]),
                schema.GROUP: int(groups.get(rel, -1)),
            }
        )
    return rows


_ROW_TYPES = {
    schema.SOURCE_ID: object,
    "path": object,
    "mask_path": object,
    schema.LABEL: np.int64,
    schema.CLASS_NAME: object,
    schema.SPLIT: object,
    schema.GROUP: np.int64,
}


def list_folder_rows(batch: Batch) -> Batch:
    """Read task: the folders of a batch -> their source rows (paths, not bytes yet)."""
    rows = []
    for i in range(len(batch["data_path"])):
        rows += folder_rows({name: column[i] for name, column in batch.items()})
    return {name: np.array([row[name] for row in rows], dtype=kind) for name, kind in _ROW_TYPES.items()}


def defers_bytes(data: DataConfig) -> bool:
    """Whether `read_source(..., with_bytes=False)` leaves this source's image bytes to `read_file_bytes`."""
    return data.format == "image_folder"


FILE_COLUMNS = ("path", "mask_path")  # what read_file_bytes reads, and drops


def read_file_bytes(batch: Batch) -> Batch:
    """Fetch image (and mask) bytes; a missing file is recorded as None and becomes a decode error."""
    images, masks = [], []
    for path, mask_path in zip(batch["path"], batch["mask_path"], strict=True):
        images.append(_read_bytes(str(path)))
        masks.append(_read_bytes(str(mask_path)) if mask_path else None)
    out = {k: v for k, v in batch.items() if k not in FILE_COLUMNS}
    out[schema.IMAGE_BYTES] = np.array(images, dtype=object)
    out[schema.MASK_BYTES] = np.array(masks, dtype=object)
    return out


# --------------------------------------------------------------------------- parquet


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


def _dataset_root(path: str) -> str:
    """The folder relative paths are resolved against: data.path, or the folder of a single file."""
    fs, inner = filesystem(path)
    return (
        storage.parent(path) if fs.get_file_info(inner).type == pafs.FileType.File else storage.resolve(path)
    )


def _inspect_parquet(data: DataConfig) -> SourceInfo:
    files = parquet_files(data.path)
    if not files:
        raise ValueError(f"no .parquet files under {data.path}")
    root = _dataset_root(data.path)
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
        counts=_counts(rows),
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
        return _read_bytes(location)
    return bytes(value)


def _read_bytes(path: str) -> bytes | None:
    try:
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        return None


def _read_groups(fs, path: str, required: bool = False) -> dict[str, int]:
    """`source_id -> group` from a CSV. The default `<path>/groups.csv` is optional; a configured
    `data.groups_file` (`required`) that is missing or lacks the columns is an error, not groups of -1."""
    try:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        if required:
            raise ValueError(f"data.groups_file {path} does not exist") from None
        return {}
    reader = csv.DictReader(io.StringIO(text))
    missing = sorted({"source_id", "group"} - set(reader.fieldnames or ()))
    if missing:
        raise ValueError(f"groups file {path} has no column {missing} (it needs `source_id,group`)")
    return {row["source_id"]: int(row["group"]) for row in reader}


def _with_scheme(original: str | None, inner_path: str) -> str:
    """Re-attach the URI scheme (and query) that `FileSystem.from_uri` strips, so workers can open the path."""
    if original and "://" in original:
        query = original.partition("?")[2]
        return f"{original.split('://', 1)[0]}://{inner_path}" + (f"?{query}" if query else "")
    return inner_path
