"""The De-DA recipe's own section: how an image is split into its CDP and CIP (`decouple`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import StageSpec, Strict, scheduling_field


class DecoupleConfig(Strict):
    """De-DA's split of an image into its CDP (the subject cropped to its box) and its CIP (the background
    with the subject's region filled). De-DA gives no values for these: each default is our choice."""

    fill: Literal["telea", "navier_stokes"] = Field(
        default="telea",
        description="OpenCV inpainting of the CIP's subject region (Telea 2004: the CPU default De-DA's "
        "issue names; navier_stokes: OpenCV's other method)",
    )
    dilate_px: int = Field(
        default=2, ge=0, description="Grow the mask before filling, so the subject's soft edge is filled too"
    )
    inpaint_radius: int = Field(default=3, ge=1, description="cv2.inpaint's neighbourhood radius, px")
    min_area: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="A subject mask covering less of the image drops the image (error mask_too_small): a "
        "speck is no class evidence to recombine",
    )
    max_area: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="A subject mask covering more drops the image (error mask_too_large): nothing of the "
        "background is left to make a CIP of",
    )
    stage: StageSpec = scheduling_field(default_factory=lambda: StageSpec(batch_size=16))

    @model_validator(mode="after")
    def _bounds(self) -> DecoupleConfig:
        if self.min_area >= self.max_area:
            raise ValueError(f"decouple.min_area ({self.min_area}) must be below max_area ({self.max_area})")
        return self
