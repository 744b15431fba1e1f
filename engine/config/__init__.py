"""Typed configs: pydantic models loaded from YAML, `--set a.b=c` overrides, unknown keys are errors.

Every model is a `ModelRef` (hub id or local path, plus a pinned revision). Every model stage carries a
`StageSpec` saying how Ray schedules it; what the stage computes lives in the actor. By concern:
`base` (ModelRef, StageSpec, scheduling_field), `run` (data, output, Ray), `stage_sections` (one section
per model stage), `filter` (the label-fidelity filter), `generator` (the diffusion generator's `generation`
section, scheduler overrides), `adapters` (TI/LoRA adapters), `generate_job` (the generation job's whole
config), `loading` (YAML, overrides, job arguments, the content hash).
The names below are the package's interface: `from engine.config import GenerateConfig, load_config`.
"""

from engine.config.adapters import AdapterConfig
from engine.config.base import (
    TINY_MODELS_HINT,
    ModelRef,
    StageSpec,
    Strict,
    check_class_keys,
    scheduling_field,
)
from engine.config.deda import DecoupleConfig
from engine.config.filter import FilterConfig
from engine.config.generate_job import GenerateConfig
from engine.config.generator import GenerationConfig, GifSpec, SchedulerConfig
from engine.config.loading import (
    apply_overrides,
    config_hash,
    content_changes,
    content_hash,
    content_of,
    format_validation_error,
    load_config,
    parse_override,
    save_resolved,
    with_defaults,
)
from engine.config.mvc import MvcConfig
from engine.config.run import SECRET_MARKERS, DataConfig, OutputConfig, RayConfig
from engine.config.stage_sections import (
    BackgroundConfig,
    CaptionConfig,
    CompositeConfig,
    PasteConfig,
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
    "GifSpec",
    "ModelRef",
    "OutputConfig",
    "PromptConfig",
    "RayConfig",
    "SchedulerConfig",
    "SegmentConfig",
    "PasteConfig",
    "DecoupleConfig",
    "MvcConfig",
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
    "parse_override",
    "save_resolved",
    "with_defaults",
    "scheduling_field",
    "check_class_keys",
]
