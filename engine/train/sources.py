"""Where training rows come from: the shard files of each `data.paths` entry, checked up front, and the
generation run and dataset each path belongs to.

Checks before anything else runs (no Ray, no run folder): every file's Parquet footer is readable and its
schema has the columns training reads with usable types; each problem names its file.

Row identity. A real row is identified by its `source_id`, the image's path relative to its dataset's root,
so two generation runs over the same dataset (e.g. K=2 and K=5) hold the same real rows and training keeps
them once. Across datasets a `source_id` means nothing ("train/circle/0003.png" of two toy sets are
different images), so every path gets a dataset fingerprint: from its generation run's saved config
(`<out>/config.yaml`: the `data` section's source fields) when the path is a run's `<out>/data`, and from
its rows otherwise (the label -> class name pairs). Paths of different datasets are refused, naming the two
runs; so are two paths of one dataset that disagree about a shared real image (split, label, class or
group): rows are never dropped or merged across datasets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from engine import schema

# Columns training reads, with the types it can use.
REQUIRED_COLUMNS: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    schema.ID: ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    schema.IMAGE: ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    schema.LABEL: ("integer", pa.types.is_integer),
    schema.CLASS_NAME: ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    schema.SPLIT: ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    schema.SOURCE_ID: ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    schema.RECIPE: ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
}


def _is_soft_label(t: pa.DataType) -> bool:
    """A list of structs with an integer `label` and a floating `weight` (schema.SOFT_LABEL_TYPE or wider)."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_struct(t.value_type):
        return False
    fields = {f.name: f.type for f in t.value_type}
    return pa.types.is_integer(fields.get("label", pa.null())) and pa.types.is_floating(
        fields.get("weight", pa.null())
    )


# `group` reads as -1 and `soft_label` as null (one-hot) when absent: schema version 1 shards have no soft_label.
OPTIONAL_COLUMNS = {
    schema.GROUP: ("integer", pa.types.is_integer),
    schema.SOFT_LABEL: ("list<struct<label: integer, weight: floating>>", _is_soft_label),
    schema.PART: ("string", pa.types.is_string),
    schema.CAPTION: ("string", pa.types.is_string),
}
# The generation config's `data` fields that say which images a source_id names (absent ones read as None).
DATASET_FIELDS = (
    "format",
    "path",
    "image_column",
    "label_column",
    "id_column",
    "split_files",
    "class_names",
    "groups_file",
)
MAX_LISTED_ERRORS = 20


def _files_of(raw: str) -> list[str]:
    path = Path(raw).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.parquet"))
        if not found:
            raise ValueError(f"no .parquet shards in {path} (expected a generation run's <out>/data)")
        return found
    if path.is_file():
        return [str(path)]
    raise ValueError(f"data path {raw!r} does not exist")


def shard_problem(file: str) -> str | None:
    """What makes `file` unusable for training (unreadable footer, missing column, wrong type), or None."""
    try:
        file_schema = pq.read_schema(file)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...: all mean unreadable
        return f"not a readable Parquet file ({type(err).__name__}: {err})"
    problems = []
    for columns, required in ((REQUIRED_COLUMNS, True), (OPTIONAL_COLUMNS, False)):
        for name, (kind, accepts) in columns.items():
            if name not in file_schema.names:
                if required:
                    problems.append(f"no {name!r} column")
                continue
            found = file_schema.field(name).type
            if not accepts(found):
                problems.append(f"column {name!r} is {found}, expected {kind}")
    return "; ".join(problems) or None


def validate_shards(files: list[str]) -> None:
    """Raise one ValueError listing every unusable file and why (see `shard_problem`)."""
    problems = [(file, problem) for file in files if (problem := shard_problem(file))]
    if not problems:
        return
    listed = "\n".join(f"  {file}: {problem}" for file, problem in problems[:MAX_LISTED_ERRORS])
    more = len(problems) - MAX_LISTED_ERRORS
    raise ValueError(
        f"{len(problems)} of {len(files)} shard files cannot be used for training "
        f"(schema in engine/schema.py OUTPUT_SCHEMA):\n{listed}"
        + (f"\n  ... and {more} more" if more > 0 else "")
    )


@dataclass
class Source:
    """One `data.paths` entry: its files and the generation run and dataset they belong to."""

    path: str
    files: list[str]
    run_dir: str | None  # the generation run's output folder (holds manifest.json), if found
    config_hash: str | None  # the generation run's config hash (manifest.json)
    dataset: dict | None  # the generation config's DATASET_FIELDS, if the run saved its config

    @property
    def unit(self) -> str:
        """Paths with one unit are one source of rows: the generation run, else the folder."""
        if self.run_dir is not None:
            return self.run_dir
        path = Path(self.path).expanduser().resolve()
        return str(path if path.is_dir() else path.parent)

    def describe(self) -> str:
        """The path as a person would recognise it: the run folder and its config hash when known."""
        if self.run_dir is None:
            return self.path
        return f"{self.run_dir} (generation run {(self.config_hash or '?')[:12]})"

    def dataset_key(self) -> str | None:
        if self.dataset is None:
            return None
        return hashlib.sha256(json.dumps(self.dataset, sort_keys=True).encode()).hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "path": self.path,
            "files": len(self.files),
            "generation_run": self.run_dir,
            "config_hash": self.config_hash,
            "dataset": self.dataset,
            "dataset_key": self.dataset_key(),
        }


def find_source(raw: str) -> Source:
    """The files of one `data.paths` entry and, when it is (a file in) a run's `<out>/data`, that run."""
    files = _files_of(raw)
    path = Path(raw).expanduser().resolve()
    folder = path if path.is_dir() else path.parent
    run_dir = next((d for d in (folder, folder.parent) if (d / "manifest.json").is_file()), None)
    config_hash = dataset = None
    if run_dir is not None:
        try:
            config_hash = json.loads((run_dir / "manifest.json").read_text()).get("config_hash")
        except (OSError, ValueError):
            config_hash = None
        saved = run_dir / "config.yaml"
        if saved.is_file():
            data = (yaml.safe_load(saved.read_text()) or {}).get("data") or {}
            dataset = {key: data.get(key) for key in DATASET_FIELDS}
    return Source(
        path=raw,
        files=files,
        run_dir=None if run_dir is None else str(run_dir),
        config_hash=config_hash,
        dataset=dataset,
    )


def find_sources(paths: list[str]) -> list[Source]:
    """Every path's Source, with all its files validated (one error listing every bad file)."""
    sources = [find_source(raw) for raw in paths]
    validate_shards([f for s in sources for f in s.files])
    return sources


def merge_sources(paths: list[Source]) -> Source:
    """The paths of one unit (e.g. a run's files listed one by one) as one Source."""
    first = paths[0]
    if len(paths) == 1:
        return first
    path = first.run_dir or first.unit
    return Source(path, [f for p in paths for f in p.files], first.run_dir, first.config_hash, first.dataset)


def check_one_dataset(sources: list[Source]) -> None:
    """Refuse paths whose generation runs read different datasets (by their saved configs)."""
    known = [s for s in sources if s.dataset is not None]
    for other in known[1:]:
        if other.dataset_key() != known[0].dataset_key():
            first = known[0]
            differs = {
                k: (first.dataset[k], other.dataset[k])
                for k in DATASET_FIELDS
                if first.dataset[k] != other.dataset[k]
            }
            raise ValueError(different_datasets(first, other, f"their data sections differ: {differs}"))


def different_datasets(first: Source, second: Source, why: str) -> str:
    return (
        f"data.paths mixes two datasets: {first.describe()} and {second.describe()} ({why}). A source_id "
        "names an image only within its dataset, so their real rows cannot be matched or deduplicated: "
        "train on runs of one dataset"
    )
