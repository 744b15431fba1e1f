"""The diffusion generator's section (UniDiffDA's generation axis) and the scheduler override that every
diffusion stage takes (few-step checkpoints such as SDXL-Lightning need their own sampler settings)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from engine.config.adapters import AdapterConfig
from engine.config.base import ModelRef, StageSpec, Strict, scheduling_field

MODES = ("txt2img", "sdedit", "instruct_pix2pix", "ddim_interp", "diffmix", "gif")
# DiffuseMix's conditional prompts (Islam et al. 2024, "DiffuseMix"): its styles, in the wording its reference
# re-implementation sends to InstructPix2Pix (DiffDA-Eval augmentation/diffuse_mix.py get_prompt_candidates:
# "A transformed version of image into {style}"; the method's own main.py passes the bare style names).
DIFFUSEMIX_STYLES = tuple(
    f"A transformed version of image into {style}"
    for style in (
        "autumn",
        "snowy",
        "watercolor art",
        "sunset",
        "rainbow",
        "aurora",
        "mosaic",
        "ukiyo-e",
        "a sketch with crayon",
    )
)
INSTRUCTION_PRESETS = {"diffusemix": DIFFUSEMIX_STYLES}
# GIF's prompt axes for natural-image datasets, "<domain> <adjective> <class>" (DiffDA-Eval augmentation/gif.py
# get_prompt_template).
GIF_DOMAINS = (
    "an image of",
    "a real-world photo of",
    "a cartoon image of",
    "an oil painting of",
    "a sketch of",
)
GIF_ADJECTIVES = ("", "colorful", "stylized", "high-contrast", "low-contrast", "posterized", "solarized",
                  "sheared", "bright", "dark")  # fmt: skip


class SchedulerConfig(Strict):
    """A diffusers scheduler built from the checkpoint's scheduler config, with these settings changed."""

    name: str = Field(description="A diffusers scheduler class, e.g. EulerDiscreteScheduler, DDIMScheduler")
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="Scheduler config keys to override, e.g. {timestep_spacing: trailing} for SDXL-Lightning",
    )

    @field_validator("name")
    @classmethod
    def _a_scheduler_class(cls, value: str) -> str:
        if not value.endswith("Scheduler"):
            raise ValueError(f"{value!r} is not a diffusers scheduler class name (…Scheduler)")
        return value


class DiffuseMixBlend(Strict):
    """DiffuseMix's (Islam et al. 2024) mixing after the InstructPix2Pix edit: one half of the real image (top,
    bottom, left or right, drawn per row) beside the other half of the edited one, then a fractal image blended
    in at `fractal_weight`."""

    fractal_weight: float = Field(
        default=0.2, ge=0, le=1, description="The fractal's blend weight (paper: 0.2)"
    )
    fractals: str | None = Field(
        default=None,
        description="A folder of fractal images (the paper's fractal dataset), one drawn per row; None: "
        "procedural Julia sets drawn from the row's seed",
        json_schema_extra={"content_omit_if_none": True},
    )


class GifSpec(Strict):
    """GIF's guidance of SDEdit latents by a CLIP score (engine/methods/gif.py; defaults from the UniDiffDA
    reference, DiffDA-Eval augmentation/gif.py and configs/generation/gif)."""

    clip: ModelRef = Field(description="The CLIP model that scores the images (reference: ViT-B/32)")
    constraint: float = Field(
        default=4.0,
        gt=0,
        description="L-infinity bound of the perturbation in latent space (reference: 4.0 for general "
        "datasets, 0.8 for fine-grained ones)",
    )
    step_size: float = Field(default=0.1, gt=0, description="The signed-gradient step (reference: 0.1)")
    clip_prompt: str = Field(
        default="This is a photo of a {class_name}",
        description="CLIP's class prompts for the zero-shot probabilities (the reference's)",
    )
    domains: list[str] = Field(
        default_factory=lambda: list(GIF_DOMAINS),
        min_length=1,
        description="The generation prompt is '<domain> <adjective> <class prompt>', one of each drawn per "
        "row (the reference's lists for natural-image datasets; its medical sets use one fixed template); "
        "the GIF presets set generation.prompt to '{token}' as the reference's '<domain> <adjective> <class>'",
    )
    adjectives: list[str] = Field(default_factory=lambda: list(GIF_ADJECTIVES), min_length=1)


class GenerationConfig(Strict):
    """One diffusion generator, six modes (UniDiffDA's generation strategies):
    - txt2img: the class prompt alone (no real image);
    - sdedit: img2img of the real image at `strength` (a list: one value drawn per row, as DA-Fusion);
    - instruct_pix2pix: the real image edited by an instruction drawn per row;
    - ddim_interp: DDIM inversion of the real image and of a same-class partner from the class pool,
      a point drawn per row on the great circle through the two latents (or on the arc between them),
      DDIM denoising (Diff-II, "inversion circle interpolation");
    - diffmix: SDEdit toward another class's prompt; the row gets a soft label (Diff-Mix);
    - gif: SDEdit latents perturbed by one CLIP-guided step within a bound, then decoded (GIF, `gif`).
    """

    mode: Literal["txt2img", "sdedit", "instruct_pix2pix", "ddim_interp", "diffmix", "gif"]
    model: ModelRef = Field(description="A diffusers pipeline (SD1.5, SDXL; InstructPix2Pix for that mode)")
    unet: ModelRef | None = Field(
        default=None,
        description="A UNet to use instead of the checkpoint's: a diffusers UNet folder or a .safetensors "
        "state dict (e.g. SDXL-Lightning's 4-step UNet)",
        json_schema_extra={"content_omit_if_none": True},
    )
    scheduler: SchedulerConfig | None = Field(
        default=None,
        description="Scheduler override (None: the checkpoint's; ddim_interp always samples with DDIM)",
        json_schema_extra={"content_omit_if_none": True},
    )
    adapters: AdapterConfig | None = Field(
        default=None,
        description="Textual-inversion tokens / LoRA from `synthray finetune`; with textual inversion, "
        "{token} in the prompt is each class's learned token",
    )
    prompt: str = Field(
        default="a photo of a {token}",
        description="Class prompt: {token} = the class name or its textual-inversion token; {superclass}",
    )
    superclass: str | None = Field(
        default=None,
        description="The dataset's superclass for {superclass} in the prompt (e.g. 'bird' for CUB): the "
        "reference code of Diff-Aug, Diff-Mix and DA-Fusion prompts 'a photo of a <token> <superclass>' "
        "(DiffDA-Eval augmentation/*.py); `superclasses` overrides it per class. Neither: {superclass} is ''",
        json_schema_extra={"content_omit_if_none": True},
    )
    superclasses: dict[str, str] = Field(
        default_factory=dict, description="class name -> its superclass for {superclass} (over `superclass`)"
    )
    negative_prompt: str = ""
    height: int = Field(
        default=512, ge=8, description="Generated size; real images are fitted to it (see input_size)"
    )
    width: int = Field(default=512, ge=8)
    input_size: Literal["resize", "refuse", "pad"] = Field(
        default="resize",
        description="How a real image of another size meets height x width. resize: squashed to it (the "
        "aspect ratio is lost; the output is height x width); refuse: an error row (reason input_size); pad: "
        "scaled to fit inside it with its aspect ratio, centred, the rest filled by replicating its edges (a "
        "flat colour would pull SDEdit's colours towards it), and the output cropped back to the image and "
        "resized to the input's own size. pad is for subject crops of any shape (De-DA): a crop's shape is "
        "part of its class evidence, and the output keeps the input's size so its mask still fits",
    )
    keep_mask: bool | None = Field(
        default=None,
        description="true: output rows keep their input's mask and bbox (modes with a real image; needs "
        "input_size pad or refuse, so that the output has the input's size). None/false: cleared, since they "
        "described the real image. (None, not false, is the default so that configs without the key keep "
        "their hash)",
        json_schema_extra={"content_omit_if_none": True},
    )
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = Field(default=7.5, ge=0)
    strength: float | list[float] = Field(
        default=0.5, description="SDEdit/Diff-Mix noise strength in (0, 1]; a list: one drawn per row"
    )
    diffmix_gamma: float = Field(
        default=0.5, gt=0, description="Diff-Mix: the target class's label weight is strength ** gamma"
    )
    instructions: list[str] | Literal["diffusemix"] = Field(
        default="diffusemix", description="InstructPix2Pix edits, one drawn per row, or a preset's list"
    )
    image_guidance_scale: float = Field(default=1.5, ge=0, description="InstructPix2Pix image guidance")
    interpolation: Literal["circle"] | tuple[float, float] = Field(
        default="circle",
        description="ddim_interp: 'circle' draws the angle from the first latent uniformly on the great circle "
        "through both (Diff-II; DiffDA-Eval augmentation/diff_ii.py rand_slerp: alpha ~ U(0, 2 pi / theta)); "
        "[low, high]: a slerp weight drawn in that range, on the arc between them (0: the real image's)",
    )
    inversion_steps: int | None = Field(
        default=None,
        ge=1,
        description="ddim_interp: DDIM inversion steps (None: num_inference_steps); the Diff-II reference "
        "inverts in 200 and denoises in 25 (DiffDA-Eval augmentation/diff_ii.py)",
        json_schema_extra={"content_omit_if_none": True},
    )
    pool_size: int = Field(
        default=32, ge=1, description="ddim_interp: partners sampled per class (the class pool's bound)"
    )
    split_ratio: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="ddim_interp (Diff-II's two-stage denoising): the first round(split_ratio x steps) "
        "denoising steps, the high-noise ones, use the class prompt + a suffix drawn per row from `suffixes`, "
        "the rest the class prompt (reference: the suffixed prompt while t >= 1000 (1 - split_ratio), "
        "split_ratio 0.3; DiffDA-Eval augmentation/diff_ii.py). None: one prompt",
        json_schema_extra={"content_omit_if_none": True},
    )
    suffixes: list[str] | None = Field(
        default=None,
        description="ddim_interp: prompt suffixes for the first split_ratio of the steps, e.g. ', in the snow'",
        json_schema_extra={"content_omit_if_none": True},
    )
    diffusemix: DiffuseMixBlend | None = Field(
        default=None,
        description="instruct_pix2pix: DiffuseMix's hybrid (half real, half edited) blended with a fractal",
        json_schema_extra={"content_omit_if_none": True},
    )
    gif: GifSpec | None = Field(
        default=None,
        description="gif: the CLIP guidance (required for that mode)",
        json_schema_extra={"content_omit_if_none": True},
    )
    safety_checker: bool | None = Field(
        default=None,
        description="true: load the checkpoint's safety checker and drop the images it flags "
        "(filtered.parquet, rule nsfw_flagged). None/false: loaded without it, as in every reference codebase "
        "(safety_checker=None); a loaded checker would turn flagged images black. A checkpoint without one "
        "is a config error. (None, not false, is the default so that configs without the key keep their hash)",
        json_schema_extra={"content_omit_if_none": True},
    )
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    stage: StageSpec = scheduling_field(default_factory=StageSpec)

    @field_validator("strength")
    @classmethod
    def _strengths_in_range(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if not 0 < v <= 1]
        if bad or not values:
            raise ValueError(f"strength must be in (0, 1], got {bad or value}")
        return value

    @field_validator("interpolation")
    @classmethod
    def _weights_in_range(cls, value: str | tuple[float, float]) -> str | tuple[float, float]:
        if not isinstance(value, str) and not 0 <= value[0] <= value[1] <= 1:
            raise ValueError(f"interpolation must be 0 <= low <= high <= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _sizes_and_prompt(self) -> GenerationConfig:
        try:
            self.prompt.format(token="x", superclass="y")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"generation.prompt may only use {{token}} and {{superclass}}: {err!r}"
            ) from None
        if self.instructions != "diffusemix" and not self.instructions:
            raise ValueError("generation.instructions is empty")
        if (self.split_ratio is None) != (not self.suffixes):
            raise ValueError(
                "generation.split_ratio and generation.suffixes go together (Diff-II's prompt switch)"
            )
        if self.split_ratio is not None and self.mode != "ddim_interp":
            raise ValueError(f"generation.split_ratio is a ddim_interp setting, mode is {self.mode}")
        if (self.gif is None) != (self.mode != "gif"):
            raise ValueError(
                "generation.gif (its CLIP model) is required for mode gif and only for it; mode is "
                f"{self.mode}"
            )
        if self.mode in ("sdedit", "diffmix", "gif"):
            # diffusers' img2img denoises int(num_inference_steps x strength) steps: 0 is an exception per row.
            idle = [s for s in self.strengths() if int(self.num_inference_steps * s) < 1]
            if idle:
                raise ValueError(
                    f"generation.strength {min(idle)} x num_inference_steps {self.num_inference_steps} gives no "
                    f"denoising step (diffusers runs int(steps x strength)); raise num_inference_steps to at "
                    f"least {math.ceil(1 / min(idle))}"
                )
        if self.inversion_steps is not None and self.mode != "ddim_interp":
            raise ValueError(f"generation.inversion_steps is a ddim_interp setting, mode is {self.mode}")
        if self.diffusemix is not None and self.mode != "instruct_pix2pix":
            raise ValueError(f"generation.diffusemix is an instruct_pix2pix setting, mode is {self.mode}")
        if self.keep_mask and self.mode == "txt2img":
            raise ValueError(
                "generation.keep_mask needs a real input image; mode txt2img generates from the prompt alone"
            )
        if self.keep_mask and self.input_size == "resize":
            raise ValueError(
                "generation.keep_mask with input_size resize: a resized output no longer matches its input's "
                "mask and bbox; set generation.input_size to pad (the output keeps the input's size) or refuse"
            )
        return self

    def instruction_list(self) -> list[str]:
        if isinstance(self.instructions, str):
            return list(INSTRUCTION_PRESETS[self.instructions])
        return list(self.instructions)

    def strengths(self) -> list[float]:
        return self.strength if isinstance(self.strength, list) else [self.strength]
