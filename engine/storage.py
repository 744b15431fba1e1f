"""Storage: the few file operations a run needs, on a local path or any pyarrow/fsspec URI.

A location is a plain string: a local path (relative paths are made absolute) or a URI such as
`s3://bucket/prefix`, `gs://bucket/prefix`, `hdfs://...`, or any scheme an installed fsspec backend knows.
pyarrow's own filesystems come first (S3, GCS, HDFS, Azure, local); fsspec is the fallback. Credentials and
endpoints come from the usual environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
...) or from URI query parameters (`s3://bucket/path?endpoint_override=host:9000&scheme=http`), so the same
config runs on a laptop and on a cluster whose workers share the storage.

Object stores have no directories: `make_dirs` is a no-op there and a "directory" exists once a file is in it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

OBJECT_STORES = tuple(
    getattr(pafs, name) for name in ("S3FileSystem", "GcsFileSystem") if hasattr(pafs, name)
)


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str | Path) -> str:
    """A URI unchanged; a local path made absolute (a relative path means nothing on another node)."""
    location = str(location)
    if is_uri(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a location; pyarrow's filesystems first, then fsspec's."""
    uri = resolve(location)
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as err:
        if "Unrecognized filesystem type" not in str(err):
            raise
    import fsspec  # only for schemes pyarrow lacks (e.g. az://, hf://, memory://)

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...`, keeping a URI's scheme and query string (`?endpoint_override=...`)."""
    location = resolve(location)
    base, sep, query = location.partition("?")
    return posixpath.join(base, *parts) + sep + query


def parent(location: str | Path) -> str:
    """The enclosing directory of a location (a URI keeps its scheme and query)."""
    base, sep, query = resolve(location).partition("?")
    return posixpath.dirname(base.rstrip("/")) + sep + query


def exists(location: str | Path) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def make_dirs(location: str | Path) -> None:
    """Create a directory tree; nothing on object stores (pyarrow would write empty marker objects)."""
    fs, path = filesystem(location)
    if not isinstance(fs, OBJECT_STORES):
        fs.create_dir(path, recursive=True)


def delete_dir(location: str | Path) -> None:
    """Delete a directory tree (every object under the prefix); absent is fine."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def list_files(location: str | Path, suffix: str = "") -> list[str]:
    """Locations of the files directly under `location` whose names end with `suffix`, sorted."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(
        posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [join(location, name) for name in names]


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file (parents created on local disks; one upload on object stores)."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def model_cache_dir() -> Path:
    """Where models fetched from URIs are kept on each node: $SYNTHRAY_MODEL_CACHE, else under HF_HOME."""
    if "SYNTHRAY_MODEL_CACHE" in os.environ:
        return Path(os.environ["SYNTHRAY_MODEL_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface"))
    return Path(hf_home).expanduser() / "synthray-models"


def fetch(location: str, cache_dir: Path | None = None) -> Path:
    """A local copy of a file or directory tree at `location` (a model checkpoint on object storage).

    Copied once per node into `<cache>/<hash of the URI>/<name>`; actors that start together on one node
    each copy into a private temporary name and the first rename wins, so a half-copied model is never
    seen. Local paths are returned as they are.
    """
    if not is_uri(location):
        return Path(resolve(location))
    cache_dir = cache_dir or model_cache_dir()
    base = location.partition("?")[0].rstrip("/")
    target = cache_dir / hashlib.sha1(base.encode()).hexdigest()[:16] / (posixpath.basename(base) or "root")
    if target.exists():
        return target
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {location}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
    if kind == pafs.FileType.Directory:
        partial.mkdir()  # copy_files creates the subdirectories, not the destination itself
    try:
        pafs.copy_files(
            path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        try:
            partial.rename(target)
        except OSError:  # another actor finished first (rename onto a non-empty directory fails)
            if not target.exists():
                raise
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial.exists():
            partial.unlink()
    return target
