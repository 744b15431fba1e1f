"""The run's own sections: the data it reads, the output it writes, the Ray cluster it runs on."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import Strict, scheduling_field


class DataConfig(Strict):
    format: Literal["image_folder", "parquet"] = Field(
        default="image_folder", description="image_folder: <path>/<split>/<class>/<file>; parquet: rows"
    )
    path: str = Field(description="Dataset root (local path or pyarrow/fsspec URI)")
    splits: list[str] = Field(default=["train"], description="Splits to read (all are written as real rows)")
    expand_splits: list[str] | None = Field(
        default=None, description="Splits that get synthetic variants (None: all read splits)"
    )
    masks_path: str | None = Field(
        default=None, description="Parallel folder of PNG masks with the same relative names"
    )
    groups_file: str | None = Field(
        default=None, description="Optional CSV `source_id,group` (image folders); default <path>/groups.csv"
    )
    max_images: int | None = Field(
        default=None,
        ge=1,
        description="Read at most this many images: a deterministic sample stratified by split and class",
    )
    sample_seed: int = Field(default=0, description="Seed of the max_images sample (hash of source id)")
    rows_per_block: int = scheduling_field(
        default=16, ge=1, description="Source rows per Ray Data block: the unit of streaming and of resume"
    )
    max_pixels: int = Field(default=40_000_000, ge=1, description="Decompression-bomb guard per image")
    min_side: int = Field(default=8, ge=1, description="Images smaller than this on a side are errors")
    image_column: str = Field(default="image", description="parquet: column of encoded image bytes")
    label_column: str = Field(default="label", description="parquet: column of int labels")
    class_names: list[str] | None = Field(
        default=None,
        description="parquet: class names by label; default the ClassLabel names in the files' Hugging Face "
        "metadata (image folders take folder names)",
    )
    id_column: str | None = Field(
        default=None,
        description="parquet: column of unique row ids used as source_id (default: a `source_id` column, "
        "else the image path, else a hash of the image bytes)",
    )
    split_files: dict[str, str] = Field(
        default_factory=dict,
        description="parquet: split -> glob of files relative to data.path, e.g. {test: 'data/test-*'} "
        "(default: a `split` column, else the Hub's file naming: train-*.parquet, data/test-*, ...)",
    )


class OutputConfig(Strict):
    path: str = Field(description="Output root: data/, errors.parquet, run.json, gallery/ go here")
    image_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(default=95, ge=1, le=100, description="JPEG/WebP quality")
    include_real: bool = Field(default=True, description="Write the real rows too (recipe 'real')")
    gallery_classes: int = Field(default=8, ge=0, description="Classes shown in the gallery")
    overwrite: bool = Field(
        default=False, description="Replace existing shards; otherwise a re-run resumes (same config only)"
    )
    rows_per_shard: int = Field(default=64, ge=1, description="Rows per Parquet shard (one batch each)")


SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
# Set in every Ray worker unless `ray.verbose`: diffusers', transformers' and the Hub's loading bars off and
# their loggers at warning level, read by each library when a worker imports it. A job log then holds what
# went wrong, not a "Loading pipeline components" bar per actor interleaved with the other processes' output.
QUIET_LIBRARIES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "warning",
    "DIFFUSERS_VERBOSITY": "warning",
}


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None: start/attach a local Ray; else a cluster")
    num_cpus: int | None = Field(
        default=None, description="Logical CPUs for a local Ray (None: the machine's)"
    )
    progress_bars: bool = True
    verbose: bool = Field(
        default=False,
        description="Model libraries' loading bars and info logs inside actors and Ray Train workers (the "
        "jobs' --verbose); off, they log warnings and errors only",
    )
    preserve_order: bool = Field(
        default=True,
        description="Rows reach the writer in input order, so shards are byte-identical across runs; "
        "false lets fast rows overtake slow ones (more throughput, same rows, other shard grouping)",
    )
    task_num_cpus: float = Field(default=0.5, gt=0, description="CPUs per CPU task (read/decode/encode)")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Set on every Ray worker (no secrets: configs are saved in outputs)"
    )
    max_run_attempts: int = Field(
        default=3,
        ge=1,
        description="Times the run starts over, resuming from its shards, after Ray loses a node, actor or "
        "object that task retries could not cover (1: never)",
    )
    no_progress_timeout_s: float = Field(
        default=1800,
        description="Fail (naming the stalled stages) when no stage makes progress for this long, e.g. an "
        "actor pool waiting for a resource no node has any more; -1 waits forever",
    )
    check_resources: bool = Field(
        default=True,
        description="Fail fast when actor pools exceed the cluster's current resources; false for "
        "autoscaling clusters (e.g. KubeRay GPU groups from 0 replicas) that add nodes on demand",
    )

    def worker_env_vars(self) -> dict[str, str]:
        """The environment of the job's Ray workers: quiet model libraries unless verbose, then `env_vars`."""
        return ({} if self.verbose else dict(QUIET_LIBRARIES)) | self.env_vars

    def local_num_cpus(self) -> int | None:
        """`num_cpus` for `ray.init`, only when it starts a local Ray: a submitted job (RAY_ADDRESS set by
        `ray job submit`) or a configured address joins an existing cluster, which refuses the argument."""
        import os

        return self.num_cpus if self.address is None and not os.environ.get("RAY_ADDRESS") else None

    @model_validator(mode="after")
    def _no_secrets_in_config(self) -> RayConfig:
        secret = [k for k in self.env_vars if any(m in k.upper() for m in SECRET_MARKERS)]
        if secret:
            raise ValueError(
                f"ray.env_vars {secret} look like secrets; the resolved config is saved beside the outputs, so "
                "pass tokens through the environment (e.g. HF_TOKEN, a Kubernetes Secret), never the config"
            )
        return self
