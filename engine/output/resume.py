"""A run's identity and the preparation of its output folder: what a rerun resumes and what it refuses.

`resume_identity` decides the content hash that goes into every row id (see the package docstring);
`prepare_output` empties the folder when asked to, clears temporaries of a killed run and returns the ids
already written; `run_manifest` is what `manifest.json` says about the run.
"""

from __future__ import annotations

from engine import storage
from engine.config import GenerateConfig, config_hash, content_changes, content_of
from engine.output.shards import read_manifest, remove_temporaries, shard_files
from engine.output.written_ids import WrittenIds, written_ids


def resume_identity(out: str, config: GenerateConfig) -> str:
    """The hash in this run's row ids. A new output (or `overwrite`): the config's content hash. An output
    that holds shards: the hash it was started with, as long as what determines the rows is unchanged
    (scheduling, resources, batch sizes and output settings may change, see `scheduling_field`); otherwise
    a ValueError naming the changed keys."""
    digest = config_hash(config)
    data_dir = storage.join(out, "data")
    if config.output.overwrite or not shard_files(data_dir):
        return digest
    previous = read_manifest(str(out)) or {}
    # Outputs written before the manifest kept the content: compare with their saved config instead.
    before = previous.get("content") or saved_content(out)
    now = content_of(config)
    if previous.get("config_hash") and (before == now or previous["config_hash"] == digest):
        return previous["config_hash"]
    changed = content_changes(before, now) if before is not None else ["(no readable config saved there)"]
    raise ValueError(
        f"{data_dir} holds shards of another config: {'; '.join(changed)}. Pass --set output.overwrite=true "
        "to replace them, choose another output.path, or undo the change to resume"
    )


def prepare_output(out: str, overwrite: bool) -> WrittenIds:
    """Returns the ids already written (`resume_identity` has checked that they are this config's).
    Ray must be up: the ids are sorted by a Ray task into the object store (`written_ids`)."""
    data_dir = storage.join(out, "data")
    if overwrite:
        storage.delete_dir(data_dir)
    storage.make_dirs(data_dir)
    remove_temporaries(str(data_dir))
    return written_ids(str(data_dir))


def run_manifest(config: GenerateConfig, digest: str, complete: bool) -> dict:
    return {"config_hash": digest, "content": content_of(config), "complete": complete}


def saved_content(out: str) -> dict | None:
    """The content of the config saved beside an output, or None when it is missing or unreadable."""
    import yaml

    try:
        saved = yaml.safe_load(storage.read_text(storage.join(out, "config.yaml")))
        return content_of(GenerateConfig.model_validate(saved))
    except Exception:  # noqa: BLE001 - an unreadable or older config: the caller says so
        return None
