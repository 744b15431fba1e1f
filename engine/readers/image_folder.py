"""Image folders: `<root>/<split>/<class>/<file>` (torchvision ImageFolder per split).

Labels are the sorted names of the class folders that hold images; source ids are the paths
`<split>/<class>/<file>`; optional masks at `<masks_path>/<split>/<class>/<stem>.png`; optional
`<root>/groups.csv` (`source_id,group,...`). A split without a folder is skipped with a note; so are entries
that are not `<split>/<class>/<image>` (counted) and folders that cannot be listed (named).

Scale (ImageNet: 1.28 M files in 2 x 1000 folders): the driver lists only the `<split>/<class>` folders and
counts each one's images in threads (`LISTING_THREADS` at once, holding one folder's names each). From the
counts it cuts the images into slices of `rows_per_block` (by folder, then name), and the run's first task
for a slice lists its folders again and emits that slice's rows (`list_folder_rows`). The driver holds one
small row per slice; no process ever holds a list of every file, and rows exist only in the tasks that use
them: a listing operator of its own would run far ahead of the stages (Ray Data backpressures by bytes, and
blocks of paths are small), and its queued blocks, under Ray's inline size, live in the driver's heap
(issue 18: 130 MiB of driver RSS at 10^6 sources).

`max_images` keeps `sample_rows`' exact sample without a list of every file: a folder is one (split, label)
stratum, so each folder's share follows from the folders' sizes (`_stratified_takes`) and each read task
takes its share by the same seeded hash. Only a groups file is read whole on the driver (split per folder
for the tasks): it is for group-annotated datasets, which are small; ImageNet has none.

Rows travel as paths (`path`, `mask_path`) until `read_file_bytes`, so that a caller can drop rows first
(a resumed run its done sources, a class pool its non-members) and never read their files.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import logging
import posixpath
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.fs as pafs

from engine import schema, storage
from engine.config import DataConfig
from engine.readers.source import SourceInfo, read_bytes, stable_hash, with_scheme
from engine.stages.batch import Batch
from engine.storage import filesystem

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LISTING_THREADS = 16  # folders listed at once by `inspect_image_folder` (each waits on storage, not a CPU)


def inspect_image_folder(data: DataConfig) -> SourceInfo:
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


def read_image_folder(info: SourceInfo, data: DataConfig, ray_data, num_cpus: float, with_bytes: bool):
    """One item per slice of rows_per_block images (`folder_slices`); each becomes one block, so small
    blocks stream through the stages and land as shards as they finish, as from a list of files.

    The listing is a batch-of-one `map_batches`, so Ray Data fuses it into the CPU tasks after it: what
    follows it must take one block per call (`batch_size=None`), or each fused task would take that many
    slices (Ray Data sizes a fused task's input by the largest batch size among its operators, counted in
    its first operator's rows)."""
    slices = folder_slices(info.folders, data.rows_per_block)
    ds = ray_data.from_items(slices, override_num_blocks=len(slices)).map_batches(
        list_folder_rows, batch_format="numpy", batch_size=1, num_cpus=num_cpus
    )
    if with_bytes:
        ds = ds.map_batches(read_file_bytes, batch_format="numpy", batch_size=None, num_cpus=num_cpus)
    return ds


def folder_slices(folders: list[dict], rows_per_block: int) -> list[dict]:
    """The folders' chosen images, in folder order, cut into slices of `rows_per_block` (the last one
    shorter), as blocks of one flat list of files would be: a slice may span folders, so small class folders
    still make full blocks. Each slice is `{"segments": <JSON list of the folder dicts, each with the
    `start` and `stop` of its part of the slice>}`."""
    slices, segments, room = [], [], rows_per_block
    for folder in folders:
        start = 0
        while start < folder["take"]:
            stop = min(folder["take"], start + room)
            segments.append({**folder, "start": start, "stop": stop})
            room -= stop - start
            start = stop
            if room == 0:
                slices.append({"segments": json.dumps(segments)})
                segments, room = [], rows_per_block
    if segments:
        slices.append({"segments": json.dumps(segments)})
    return slices


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
    return stable_hash(folder["seed"], "tie", ids[rank])


def _ranked_ids(fs, root: str, folder: dict, by_hash: bool) -> list[str]:
    """A folder's source ids by name, or (`by_hash`) in `sample_rows`' order within a stratum: by seeded
    hash, then by name."""
    prefix = f"{folder[schema.SPLIT]}/{folder[schema.CLASS_NAME]}/"
    names, _ = _folder_entries(fs, posixpath.join(root, prefix))
    ids = [prefix + name for name in names]
    return sorted(ids, key=lambda sid: stable_hash(folder["seed"], sid)) if by_hash else ids


def folder_rows(folder: dict) -> list[dict]:
    """The source rows of one <split>/<class> folder (its `take` of them, as `sample_rows` picks them, by
    name), or of its slice `start:stop` of them when the folder dict has one (`folder_slices`). Each slice
    lists the folder again: a LIST per 1000 names on object storage, cheaper than shipping the names.

    A folder that cannot be listed any more (it could at inspection) gives no rows and a warning: the run
    goes on with the others. (A folder whose files change during a run may shift its slices: a rerun
    resumes with the sources missed.)"""
    fs, root = filesystem(folder["data_path"])
    prefix = f"{folder[schema.SPLIT]}/{folder[schema.CLASS_NAME]}/"
    try:
        ids = _ranked_ids(fs, root, folder, by_hash=bool(folder["sampled"]))
    except OSError as err:
        logger.warning("data: folder %s could not be listed, its images are skipped: %s", prefix, err)
        return []
    chosen = sorted(ids[: folder["take"]]) if folder["sampled"] else sorted(ids)
    if "start" in folder:
        chosen = chosen[int(folder["start"]) : int(folder["stop"])]
    masks_root = filesystem(folder["masks_path"])[1] if folder["masks_path"] else None
    groups = json.loads(folder["groups"])
    rows = []
    for rel in chosen:
        mask_path = posixpath.splitext(posixpath.join(masks_root, rel))[0] + ".png" if masks_root else ""
        rows.append(
            {
                schema.SOURCE_ID: rel,
                "path": with_scheme(folder["data_path"], posixpath.join(root, rel)),
                "mask_path": with_scheme(folder["masks_path"], mask_path) if mask_path else "",
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
    """Read task: the slices of a batch (`folder_slices`) -> their source rows (paths, not bytes yet)."""
    rows = []
    for segments in batch["segments"]:
        for folder in json.loads(segments):
            rows += folder_rows(folder)
    return {name: np.array([row[name] for row in rows], dtype=kind) for name, kind in _ROW_TYPES.items()}


FILE_COLUMNS = ("path", "mask_path")  # what read_file_bytes reads, and drops


def read_file_bytes(batch: Batch) -> Batch:
    """Fetch image (and mask) bytes; a missing file is recorded as None and becomes a decode error."""
    images, masks = [], []
    for path, mask_path in zip(batch["path"], batch["mask_path"], strict=True):
        images.append(read_bytes(str(path)))
        masks.append(read_bytes(str(mask_path)) if mask_path else None)
    out = {k: v for k, v in batch.items() if k not in FILE_COLUMNS}
    out[schema.IMAGE_BYTES] = np.array(images, dtype=object)
    out[schema.MASK_BYTES] = np.array(masks, dtype=object)
    return out


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
