"""The MVC recipe's own section (`mvc`): where its captions come from, its two generators and Algorithm 1's
steps. MVC ("Dataset Augmentation by Mixing Visual Concepts") gives Eq. 6's guidance scale; the rest is our
choice where a comment says so."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import ModelRef, StageSpec, Strict, scheduling_field

# The paper gives no P or Q; these are our choice. One coarse step brings in a contiguous span of token
# rows (on average a third of them) from another caption, a phrase-sized concept, while most of e stays;
# two fine steps add small feature-level changes within single tokens, for variety at little risk.
DEFAULT_COARSE_STEPS = 1
DEFAULT_FINE_STEPS = 2


class MvcConfig(Strict):
    captions: str = Field(
        description="A caption run's data folder (recipe caption, e.g. outputs/mvc-captions/data): its "
        "captions of the train split are the class's caption pool"
    )
    model: ModelRef | None = Field(
        default=None,
        description="The image-conditioned pipeline MVC fine-tunes (synthray finetune, method mvc: "
        "<run>/pipeline; an InstructPix2Pix folder with an 8-channel UNet); None when pretrained_share is 1",
    )
    pretrained: ModelRef | None = Field(
        default=None,
        description="The pre-trained text-to-image pipeline prompted with captions (MVC's 'pre-trained' "
        "images for general datasets); None when pretrained_share is 0 (MVC's medical setting)",
    )
    pretrained_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Share of rows drawn by the pre-trained pipeline (the rest by the fine-tuned one); MVC "
        "uses both on general datasets without giving the split (0.5 is our choice) and only the fine-tuned "
        "one on medical data (0)",
    )
    coarse_steps: int = Field(
        default=DEFAULT_COARSE_STEPS,
        ge=0,
        description="Algorithm 1's P (our choice, see DEFAULT_COARSE_STEPS)",
    )
    fine_steps: int = Field(
        default=DEFAULT_FINE_STEPS, ge=0, description="Algorithm 1's Q (our choice, see DEFAULT_FINE_STEPS)"
    )
    guidance_scale: float = Field(
        default=7.5,
        ge=0,
        description="MVC Eq. 6: one scale w against a null that drops text and image together (the "
        "InstructPix2Pix pipeline runs it as guidance_scale = image_guidance_scale = w)",
    )
    num_inference_steps: int = Field(default=50, ge=1, description="Stable Diffusion's default")
    height: int = Field(default=512, ge=8)
    width: int = Field(default=512, ge=8)
    pool_size: int = Field(
        default=32,
        ge=1,
        description="Real images per class kept as image conditions (the class pool's bound)",
    )
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    stage: StageSpec = scheduling_field(default_factory=StageSpec)

    @model_validator(mode="after")
    def _models_for_the_shares(self) -> MvcConfig:
        if self.pretrained_share > 0 and self.pretrained is None:
            raise ValueError(f"mvc.pretrained_share is {self.pretrained_share}: set mvc.pretrained")
        if self.pretrained_share < 1 and self.model is None:
            raise ValueError(f"mvc.pretrained_share is {self.pretrained_share}: set mvc.model")
        if self.height % 8 or self.width % 8:
            raise ValueError(
                f"mvc.height and mvc.width must be multiples of 8, got {self.height}x{self.width}"
            )
        return self
