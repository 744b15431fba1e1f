"""The label-fidelity filter's section: CLIP zero-shot checks appended after any recipe's last stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config.base import ModelRef, StageSpec, Strict, scheduling_field

# ALIA's semantic filter uses prompts like these: a synthetic image closer to "a photo" than to any class has
# lost its subject.
DEFAULT_NEGATIVE_PROMPTS = [
    "a photo of an object",
    "a photo",
    "an image",
    "a blurry photo",
    "a photo of a texture",
    "a photo of a background",
]


class FilterConfig(Strict):
    """Each synthetic image is scored by CLIP against one prompt per class and the negative prompts; rules
    that fire drop the row into `filtered.parquet` (real rows are never filtered)."""

    model: ModelRef = Field(
        description="CLIP (CLIPModel + CLIPProcessor), e.g. openai/clip-vit-large-patch14"
    )
    class_prompt: str = Field(
        default="a photo of a {class_name}", description="Prompt per class; {class_name} is replaced"
    )
    class_prompts: dict[str, str] = Field(
        default_factory=dict,
        description="class name -> its own prompt (overrides class_prompt); dataset classes only",
    )
    negative_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NEGATIVE_PROMPTS),
        description="Prompts that describe no class; [] turns the negative rule off",
    )
    min_prob: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Keep a row only if its class's zero-shot probability (softmax over the class prompts) is "
        "above this; None: 1/num_classes (He et al.); 0: off",
    )
    drop_negative: bool = Field(default=True, description="Drop a row when a negative prompt scores highest")
    drop_other_class: bool = Field(default=False, description="Drop a row when another class scores highest")
    max_filtered_fraction: float = scheduling_field(
        0.5,
        ge=0,
        le=1,
        description="Fail the job when the filter drops more than this share of synthetic rows",
    )
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    stage: StageSpec = scheduling_field(default_factory=lambda: StageSpec(batch_size=32))
