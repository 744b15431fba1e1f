"""What every source format shares: `SourceInfo` (what inspection found), the seeded stratified sample
that `max_images` takes, and reading one file's bytes from storage."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

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
    pieces: list[dict] = field(default_factory=list, repr=False)  # parquet: one per file row group

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())


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
        ranked = sorted(members, key=lambda i: stable_hash(seed, rows[i][schema.SOURCE_ID]))
        for rank, i in enumerate(ranked):
            keys[i] = (rank / len(ranked), stable_hash(seed, "tie", rows[i][schema.SOURCE_ID]))
    chosen = sorted(sorted(keys, key=keys.__getitem__)[:max_images])
    return [rows[i] for i in chosen]


def stable_hash(*parts: object) -> int:
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def split_counts(rows: list[dict]) -> dict[str, int]:
    return dict(sorted(Counter(str(row[schema.SPLIT]) for row in rows).items()))


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
