"""Typed configs: pydantic models loaded from YAML, `--set a.b=c` overrides, unknown keys are errors.

Every model is a `ModelRef` (hub id or local path, plus a pinned revision). Every model stage carries a
`StageSpec` saying how Ray schedules it; what the stage computes lives in the actor. By concern:
`base` (ModelRef, StageSpec, scheduling_field), `run` (data, output, Ray), `stages` (one section per model
stage), `filter` (the label-fidelity filter), `generation` (the diffusion generator, scheduler overrides), `generate` (the generation job), `loading` (YAML, overrides, job arguments, the content hash).
The names below are the package's interface: `from engine.config import GenerateConfig, load_config`.
"""

from engine.config.adapters import AdapterConfig
from engine.config.base import TINY_MODELS_HINT, ModelRef, StageSpec, Strict, scheduling_field
from engine.config.filter import FilterConfig
from engine.config.generate import GenerateConfig
from engine.config.generation import GenerationConfig, SchedulerConfig
from engine.config.loading import (
    apply_overrides,
    config_hash,
    content_changes,
    content_hash,
    content_of,
    format_validation_error,
    load_config,
    parse_job_args,
    parse_override,
    save_resolved,
)
from engine.config.run import SECRET_MARKERS, DataConfig, OutputConfig, RayConfig
from engine.config.stages import (
    BackgroundConfig,
    CaptionConfig,
    CompositeConfig,
    PromptConfig,
    SegmentConfig,
    VLLMConfig,
)

__all__ = [
    "SECRET_MARKERS",
    "TINY_MODELS_HINT",
    "AdapterConfig",
    "BackgroundConfig",
    "CaptionConfig",
    "CompositeConfig",
    "DataConfig",
    "FilterConfig",
    "GenerateConfig",
    "GenerationConfig",
    "ModelRef",
    "OutputConfig",
    "PromptConfig",
    "RayConfig",
    "SchedulerConfig",
    "SegmentConfig",
    "StageSpec",
    "Strict",
    "VLLMConfig",
    "apply_overrides",
    "config_hash",
    "content_changes",
    "content_hash",
    "content_of",
    "format_validation_error",
    "load_config",
    "parse_job_args",
    "parse_override",
    "save_resolved",
    "scheduling_field",
]
