"""What every source format shares: `SourceInfo` (what inspection found), the seeded stratified sample
that `max_images` takes, and reading one file's bytes from storage."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from engine import schema
from engine.storage import filesystem


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
    # parquet: one row per source row (file, row_group, row, source_id, label, split, group), in file order
    index: pa.Table | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())


def sample_rows(rows: list[dict], max_images: int | None, seed: int = 0) -> list[dict]:
    """A deterministic sample of `max_images` rows, stratified by (split, label), in the input order
    (`sample_indices` of the rows' columns)."""
    if not max_images or len(rows) <= max_images:
        return rows
    chosen = sample_indices(
        [row[schema.SPLIT] for row in rows],
        [row[schema.LABEL] for row in rows],
        [row[schema.SOURCE_ID] for row in rows],
        max_images,
        seed,
    )
    return [rows[i] for i in chosen]


def sample_indices(
    splits: Sequence, labels: Sequence, source_ids: Sequence[str], max_images: int | None, seed: int = 0
) -> np.ndarray:
    """The positions (ascending) of a deterministic sample of `max_images` rows, stratified by (split, label).

    Rows are ranked within their stratum by a seeded hash of their source id; a row's key is its rank
    divided by the stratum's size, and the smallest keys win. So every stratum gets a row before any gets a
    second (when max_images allows), then each keeps about its share: a 16-image sample of a dataset with
    train/val/test and 4 classes holds every class of every split. The same rows, seed and budget always
    give the same sample, whatever the row order. Columns in, not row dicts: a million-row Parquet index
    is sampled without a Python object per row beyond its hashes.
    """
    n = len(source_ids)
    if not max_images or n <= max_images:
        return np.arange(n)
    strata: dict[tuple, int] = {}
    code = np.fromiter(
        (strata.setdefault((str(s), int(lab)), len(strata)) for s, lab in zip(splits, labels, strict=True)),
        np.int64,
        n,
    )
    position = np.arange(n)
    by_hash = np.fromiter((stable_hash(seed, sid) for sid in source_ids), np.uint64, n)
    order = np.lexsort((position, by_hash, code))  # by stratum, then hash, then position
    sizes = np.bincount(code)
    first = np.searchsorted(code[order], np.arange(len(sizes)))
    rank = np.empty(n, np.int64)
    rank[order] = position - first[code[order]]
    ties = np.fromiter((stable_hash(seed, "tie", sid) for sid in source_ids), np.uint64, n)
    return np.sort(np.lexsort((position, ties, rank / sizes[code]))[:max_images])


def stable_hash(*parts: object) -> int:
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def read_bytes(path: str) -> bytes | None:
    try:
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except (FileNotFoundError, OSError):
        return None


def with_scheme(original: str | None, inner_path: str) -> str:
    """Re-attach the URI scheme (and query) that `FileSystem.from_uri` strips, so workers can open the path."""
    if original and "://" in original:
        query = original.partition("?")[2]
        return f"{original.split('://', 1)[0]}://{inner_path}" + (f"?{query}" if query else "")
    return inner_path
