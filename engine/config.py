"""Typed configs: pydantic models loaded from YAML, `--set a.b=c` overrides, unknown keys are errors.

Every model is a `ModelRef` (hub id or local path, plus a pinned revision). Every model stage carries a
`StageSpec` saying how Ray schedules it; what the stage computes lives in the actor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticUndefined

ConfigT = TypeVar("ConfigT", bound=BaseModel)

TINY_MODELS_HINT = "build the offline tiny models with `synthray tiny-models --out .cache/tiny-models`"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def scheduling_field(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A field that says how a run is scheduled, stored or reported, not what it computes (batch sizes,
    concurrency, resources, devices, GPU tunings, Ray and output settings). `content_of` leaves these out of
    the content hash that row ids and the resume guard use, so a resumed run may change them (say, on
    another cluster)."""
    return Field(default, json_schema_extra={"scheduling": True}, **kwargs)


class ModelRef(Strict):
    id: str = Field(description="Hugging Face hub id, or a local directory/file path")
    revision: str | None = Field(
        default=None, description="Pinned hub revision (commit sha or tag); ignored for local paths"
    )
    allow_pickle: bool = Field(
        default=False, description="Also load pickled weights (.bin/.pth); default safetensors only"
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the checkpoint")

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


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None: start/attach a local Ray; else a cluster")
    num_cpus: int | None = Field(
        default=None, description="Logical CPUs for a local Ray (None: the machine's)"
    )
    progress_bars: bool = True
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


class SegmentConfig(Strict):
    backend: Literal["transformers", "segment_anything"] = Field(
        default="transformers",
        description="SAM through transformers (SamModel) or the segment-anything package",
    )
    detector: ModelRef = Field(description="GroundingDINO checkpoint")
    sam: ModelRef = Field(description="SAM: a transformers directory, or a segment-anything .pth file")
    sam_model_type: str = Field(default="vit_h", description="segment-anything registry key (vit_h/l/b)")
    box_threshold: float = Field(default=0.35, ge=0, le=1)
    text_threshold: float = Field(default=0.25, ge=0, le=1)
    superclasses: dict[str, str] = Field(
        default_factory=dict, description="class name -> detection prompt; default the class name"
    )
    use_dataset_masks: bool = Field(
        default=False, description="Use the dataset's masks instead of the models"
    )
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    stage: StageSpec = scheduling_field(default_factory=StageSpec)


class VLLMConfig(Strict):
    """vLLM engine settings for a stage whose `backend` is `vllm` (it runs through `ray.data.llm`).

    The stage's `stage:` spec keeps its meaning: batch_size = rows per engine call, concurrency = engine
    replicas (data parallel), num_gpus / num_cpus = per engine worker (one per tensor-parallel rank).
    """

    tensor_parallel_size: int = scheduling_field(
        default=1, ge=1, description="GPUs one engine shards the model over"
    )
    max_num_seqs: int | None = scheduling_field(
        default=None, ge=1, description="Sequences one engine decodes at once (None: vLLM's default)"
    )
    max_model_len: int | None = Field(default=None, ge=1, description="Context length (None: the model's)")
    gpu_memory_utilization: float = scheduling_field(
        default=0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory for weights and KV cache; on vLLM's CPU backend a fraction of "
        "host memory (keep it small there)",
    )
    enforce_eager: bool = scheduling_field(
        default=False, description="No CUDA graphs / compilation: faster start-up"
    )
    template_num_cpus: float = scheduling_field(
        default=0.25, ge=0, description="CPUs per ray.data.llm chat-template (and image-prep) actor"
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed through as they are"
    )


class PromptConfig(Strict):
    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers: an actor pool running `generate`; vllm: vLLM through ray.data.llm",
    )
    model: ModelRef = Field(description="Instruction LLM")
    num_instructions: int = Field(default=3, ge=1, description="Instruction templates used")
    num_scenes: int = Field(default=18, ge=1, description="Scene templates used")
    num_times: int = Field(default=13, ge=1, description="Time-of-day/season templates used")
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    extra_forbidden_words: list[str] = Field(default_factory=list)
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Engine settings for backend vllm")
    stage: StageSpec = scheduling_field(default_factory=StageSpec)


class CaptionConfig(Strict):
    """Image captions from a VLM, with a class prefix (MVC: "This is an image of <class>. <caption>")."""

    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers: an actor pool running `generate`; vllm: vLLM through ray.data.llm",
    )
    model: ModelRef = Field(description="Vision-language chat model (image + text in, text out)")
    instruction: str = Field(
        default="Describe this image in one sentence.", description="The user message sent with the image"
    )
    prefix: str = Field(
        default="This is an image of {class_name}. ",
        description="Put before every caption; {class_name} is replaced by the row's class ('' for none)",
    )
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.0, ge=0, description="0: greedy; else sampled with the row's seed")
    top_p: float = Field(default=1.0, gt=0, le=1)
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Engine settings for backend vllm")
    stage: StageSpec = scheduling_field(default_factory=StageSpec)

    @model_validator(mode="after")
    def _prefix_names_only_the_class(self) -> CaptionConfig:
        try:
            self.prefix.format(class_name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"caption.prefix may only use {{class_name}}: {err!r}") from None
        return self


class BackgroundConfig(Strict):
    model: ModelRef = Field(description="SDXL text-to-image pipeline")
    height: int = Field(default=1024, ge=8)
    width: int = Field(default=1024, ge=8)
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = Field(default=5.0, ge=0)
    negative_prompt: str = "people, person, animal, text, watermark, blurry"
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    # GPU tunings (see benchmarks/gpu_stages.py). Off by default: each changes numerics or start-up time a
    # little, and none pays on CPU.
    channels_last: bool = scheduling_field(
        default=False, description="UNet and VAE in channels-last memory format (faster convolutions on GPU)"
    )
    fuse_qkv: bool = scheduling_field(
        default=False, description="Fuse the attention q/k/v projections into one matmul (UNet and VAE)"
    )
    compile_mode: (
        Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None
    ) = scheduling_field(
        default=None,
        description="torch.compile the UNet with this mode ('reduce-overhead' adds CUDA graphs); "
        "None runs eagerly. The first batch of each new shape pays the compile time",
    )
    stage: StageSpec = scheduling_field(default_factory=StageSpec)


class CompositeConfig(Strict):
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of a horizontal flip")
    rotation_deg: tuple[float, float] = Field(default=(-15.0, 15.0), description="Rotation range, degrees")
    scale: tuple[float, float] = Field(default=(0.8, 1.2), description="Subject scale range")
    feather_px: float = Field(default=1.5, ge=0, description="Gaussian edge feathering of the mask, px")
    stage: StageSpec = scheduling_field(default_factory=lambda: StageSpec(batch_size=8))


class GenerateConfig(Strict):
    recipe: str = Field(default="aga", description="Recipe name (see engine.recipes.RECIPES)")
    seed: int = 0
    num_variants: int = Field(default=2, ge=1, description="K: synthetic rows per real image")
    max_error_fraction: float = scheduling_field(1.0, ge=0, le=1, description="Fail the job above this")
    data: DataConfig
    output: OutputConfig = scheduling_field()
    ray: RayConfig = scheduling_field(default_factory=RayConfig)
    segment: SegmentConfig | None = None
    prompt: PromptConfig | None = None
    caption: CaptionConfig | None = None
    background: BackgroundConfig | None = None
    composite: CompositeConfig | None = None


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def parse_job_args(
    argv: list[str] | None, prog: str, description: str, default_config: str | None, example: str
) -> argparse.Namespace:
    """The arguments every job takes: `--config PATH` and repeatable `--set key.path=value`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if default_config is None:
        parser.add_argument("--config", required=True, help="YAML config")
    else:
        parser.add_argument(
            "--config", default=default_config, help=f"YAML config (default {default_config})"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )
    return parser.parse_args(argv)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key {key!r}")
        else:
            lines.append(f"  {key}: {item['msg']}")
    return "\n".join(lines)


def load_config(
    cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None
) -> ConfigT:
    """Load `cls` from YAML (or `base` when no path), apply overrides; errors name the bad keys."""
    raw: dict = dict(base or {})
    if path is not None:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, str(path or "<embedded>"))) from None


def content_of(config: BaseModel) -> dict:
    """What determines the rows: the config as JSON without its scheduling fields (see `scheduling_field`)."""
    out = {}
    for name, field in type(config).model_fields.items():
        if (field.json_schema_extra or {}).get("scheduling"):
            continue
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            out[name] = content_of(value)
        else:
            out[name] = config.model_dump(mode="json", include={name})[name]
    return out


def config_hash(config: BaseModel) -> str:
    """Hash of what determines the rows (not where they go or how they are scheduled): part of every row id."""
    return content_hash(content_of(config))


def content_hash(content: dict) -> str:
    return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def content_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two `content_of` dicts, e.g. ["num_variants: 2 -> 3"]."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += content_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return changes


def save_resolved(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config (a local path or a URI, see engine.storage)."""
    from engine.storage import write_text

    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
