"""Exactly-once shards: atomic writes named by content, completed ids read back for resume.

Why not `Dataset.write_parquet`: it names files by write uuid and writes them in place, so a crash leaves
partial files and a re-run cannot tell what is done. Here each batch becomes one shard whose name is a
hash of its row ids, written to a hidden temporary name and renamed (local) or uploaded in one put (object
stores), so a shard is either complete or absent, and a retried batch rewrites the same file.

The manifest (`<out>/manifest.json`) is the run's identity, not its index: the config hash and content,
`complete`, and the number of shards; it is written twice per run (open, then complete), never per shard.
The shards themselves are found by listing `data/part-*.parquet`. Layout 1 (before `manifest_version`)
also listed every shard's name, a list that grows with the dataset (50 K names at ImageNet x 10): it is
read as layout 2 without that list (`read_manifest`), and rewritten as layout 2 when the run ends.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engine import schema
from engine.storage import filesystem

SHARD_GLOB_PREFIX = "part-"
MANIFEST_VERSION = 2


def shard_name(ids: list[str]) -> str:
    return f"{SHARD_GLOB_PREFIX}{hashlib.sha1(chr(31).join(sorted(ids)).encode()).hexdigest()[:20]}.parquet"


def write_shard(table: pa.Table, data_uri: str) -> dict:
    """Write `table` as one shard under `data_uri`; returns its manifest entry."""
    fs, root = filesystem(data_uri)
    ids = table.column(schema.ID).to_pylist()
    name = shard_name(ids)
    final = posixpath.join(root, name)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = posixpath.join(root, f".tmp-{uuid.uuid4().hex}-{name}")
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, final)  # rename(2): atomic on one filesystem
    else:
        pq.write_table(table, final, filesystem=fs)  # an object appears only when its upload completes
    return {"shard": name, "rows": len(ids)}


def shard_files(data_uri: str) -> list[str]:
    fs, root = filesystem(data_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except FileNotFoundError:
        return []
    names = [posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File]
    return sorted(
        posixpath.join(root, n) for n in names if n.startswith(SHARD_GLOB_PREFIX) and n.endswith(".parquet")
    )


def read_column(data_uri: str, columns: list[str]) -> pa.Table:
    files = shard_files(data_uri)
    if not files:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    fs, _ = filesystem(data_uri)
    return pads.dataset(files, format="parquet", filesystem=fs).to_table(columns=columns)


def count_rows(data_dir: str) -> tuple[dict[str, int], int]:
    """Rows in the shards per recipe, and how many ids appear more than once (must be 0)."""
    table = read_column(str(data_dir), [schema.ID, schema.RECIPE])
    counts = pc.value_counts(table[schema.RECIPE]).to_pylist() if table.num_rows else []
    duplicates = table.num_rows - len(pc.unique(table[schema.ID])) if table.num_rows else 0
    return {item["values"]: item["counts"] for item in counts}, duplicates


def remove_temporaries(data_uri: str) -> int:
    """Delete leftovers of writes a crash interrupted (never visible as shards)."""
    fs, root = filesystem(data_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    stale = [i.path for i in infos if posixpath.basename(i.path).startswith(".tmp-")]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def write_manifest(out_uri: str, manifest: dict) -> None:
    fs, root = filesystem(out_uri)
    manifest = {**manifest, "manifest_version": MANIFEST_VERSION}
    with fs.open_output_stream(posixpath.join(root, "manifest.json")) as stream:
        stream.write(json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(out_uri: str) -> dict | None:
    """The manifest in the current layout (an older one migrated), None when there is none. A manifest
    from a newer layout is a ValueError: this version cannot tell what it promises."""
    fs, root = filesystem(out_uri)
    path = posixpath.join(root, "manifest.json")
    try:
        with fs.open_input_stream(path) as stream:
            manifest = json.loads(stream.read())
    except (FileNotFoundError, OSError):
        return None
    version = manifest.get("manifest_version", 1)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ValueError(
            f"{out_uri}/manifest.json has manifest_version {version!r}, newer than this synthray's "
            f"({MANIFEST_VERSION}): resume it with the synthray version that wrote it, or choose another "
            "output.path (or output.overwrite=true to replace it)"
        )
    if version == 1:  # the shard list is dropped: shards are found by listing data/
        shards = manifest.pop("shards", None)
        if shards is not None:
            manifest["num_shards"] = len(shards)
    manifest["manifest_version"] = MANIFEST_VERSION
    return manifest
