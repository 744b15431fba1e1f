"""The generation job's config: recipe, seeds, K, and the sections its stages read."""

from __future__ import annotations

from pydantic import Field

from engine.config.base import Strict, scheduling_field
from engine.config.deda import DecoupleConfig
from engine.config.filter import FilterConfig
from engine.config.generator import GenerationConfig
from engine.config.mvc import MvcConfig
from engine.config.run import DataConfig, OutputConfig, RayConfig
from engine.config.stage_sections import (
    BackgroundConfig,
    CaptionConfig,
    CompositeConfig,
    PromptConfig,
    SegmentConfig,
)


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
    decouple: DecoupleConfig | None = Field(
        default=None,
        description="De-DA: the CDP / CIP split (recipe deda)",
        json_schema_extra={"content_omit_if_none": True},
    )
    mvc: MvcConfig | None = Field(
        default=None,
        description="MVC: caption pools, Algorithm 1 and its two generators (recipe mvc)",
        json_schema_extra={"content_omit_if_none": True},
    )
    generation: GenerationConfig | None = Field(
        default=None,
        description="The diffusion generator of the UniDiffDA recipe (txt2img, sdedit, ...) and De-DA's CDP edit",
        json_schema_extra={"content_omit_if_none": True},
    )
    filter: FilterConfig | None = Field(
        default=None, description="Label-fidelity filter after the recipe's last stage (None: no filter)"
    )
