"""The pieces every config section is made of: strict models, model references, stage scheduling specs,
and `scheduling_field` (what the content hash leaves out, see engine.config.loading.content_of)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticUndefined

TINY_MODELS_HINT = "build the offline tiny models with `synthray tiny-models --out .cache/tiny-models`"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def scheduling_field(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A field that says how a run is scheduled, stored or reported, not what it computes (batch sizes,
    concurrency, resources, devices, GPU tunings, Ray and output settings). `content_of` leaves these out of
    the content hash that row ids and the resume guard use, so a resumed run may change them (say, on
    another cluster)."""
    return Field(default, json_schema_extra={"scheduling": True}, **kwargs)


def check_class_keys(mapping: dict, class_names: list[str], key: str) -> None:
    """A per-class setting that names a class the dataset does not have is a typo, not a no-op: refuse it.
    Checked where the dataset's classes are known (a recipe's or a stage's build), not in the model."""
    unknown = sorted(set(mapping) - set(class_names))
    if unknown:
        raise ValueError(f"{key} names classes the dataset does not have: {unknown}; classes: {class_names}")


class ModelRef(Strict):
    id: str = Field(description="Hugging Face hub id, or a local directory/file path")
    revision: str | None = Field(
        default=None, description="Pinned hub revision (commit sha or tag); ignored for local paths"
    )
    allow_pickle: bool = Field(
        default=False, description="Also load pickled weights (.bin/.pth); default safetensors only"
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the checkpoint")
    file: str | None = Field(
        default=None,
        description="One weights file inside the repository or folder (e.g. a distilled UNet's "
        "sdxl_lightning_4step_unet.safetensors); None: the whole checkpoint",
        json_schema_extra={"content_omit_if_none": True},
    )

    def is_local(self) -> bool:
        return self.id.startswith((".", "/", "~")) or Path(self.id).expanduser().exists()

    def is_uri(self) -> bool:
        """A checkpoint on shared storage (s3://, gs://, ...): fetched once per node, see engine.storage."""
        return "://" in self.id

    @model_validator(mode="after")
    def _hub_ids_are_pinned(self) -> ModelRef:
        if not self.is_local() and not self.is_uri() and not self.revision:
            raise ValueError(f"model {self.id!r} is a hub id: pin it with `revision:`")
        return self

    def tag(self) -> str:
        """`id@revision` for provenance: what was loaded. A local path or a URI is loaded as it is (its
        `revision` is never used), so it is tagged `@local` / `@uri`, not with a revision it did not load."""
        if self.is_uri():
            return f"{self.id}@uri"
        if self.is_local():
            return f"{self.id}@local"
        return f"{self.id}@{self.revision}"


class StageSpec(Strict):
    """How Ray schedules one stage (from config, never from probing the driver's hardware)."""

    batch_size: int = Field(default=4, ge=1, description="Rows per map_batches call")
    concurrency: int = Field(default=1, ge=1, description="Actors in the pool")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per actor")
    num_cpus: float = Field(default=0.25, ge=0, description="CPUs reserved per actor")
    max_restarts: int = Field(default=2, ge=0, description="Times Ray restarts a dead actor of this pool")
    max_task_retries: int = Field(default=2, ge=0, description="Times a batch on a dead actor is retried")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {sdxl_node: 1} to pin nodes"
    )
