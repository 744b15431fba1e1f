"""Adapters a generating stage loads on top of its base pipeline: textual-inversion tokens and a LoRA, as
`synthray finetune` writes them (engine.models.diffusion loads them; engine.finetune trains them)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from engine.config.base import ModelRef, Strict


class AdapterConfig(Strict):
    textual_inversion: ModelRef | None = Field(
        default=None,
        description="Textual-inversion embeddings: a `synthray finetune` output folder or its "
        "textual_inversion.safetensors (clip_l, + clip_g for SDXL); loaded before the LoRA",
    )
    lora: ModelRef | None = Field(
        default=None,
        description="UNet LoRA: a folder or .safetensors file that `pipe.load_lora_weights` reads",
    )
    lora_scale: float = Field(default=1.0, ge=0, description="LoRA strength; 0 gives the base pipeline")

    @field_validator("textual_inversion", "lora", mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        # `lora: outputs/finetune/x/lora` reads as `lora: {id: outputs/finetune/x/lora}`.
        return {"id": value} if isinstance(value, str) else value
