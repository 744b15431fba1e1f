"""Typed config of `synthray finetune`, in the style of engine.config (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from engine.config import DataConfig, ModelRef, RayConfig, Strict
from engine.config.mvc import DEFAULT_COARSE_STEPS, DEFAULT_FINE_STEPS
from engine.train.config import ScalingSpec

METHODS = ("textual_inversion", "dreambooth_lora", "full", "mvc")


class TextualInversionSpec(Strict):
    placeholder: str = Field(
        default="<{class_name}>",
        description="The new token of each class; {class_name} is the class (spaces become '_')",
    )
    initializer: str = Field(
        default="the",
        description="Word whose embedding (mean over its tokens) starts every placeholder: 'the', or a "
        "superclass such as 'bird'",
    )
    initializers: dict[str, str] = Field(
        default_factory=dict, description="class name -> initializer word, for classes that differ"
    )
    learning_rate: float = Field(
        default=5e-4,
        gt=0,
        description="Before scale_lr (diffusers example and the UniDiffDA reference, DiffDA-Eval "
        "finetuning/text_inversion.sh: 5e-4; its --scale_lr is never applied there, so its lr is 5e-4)",
    )


class LoraSpec(Strict):
    # Defaults: the UniDiffDA reference's DreamBooth-LoRA (DiffDA-Eval finetuning/dreambooth.sh: --rank=8, alpha =
    # rank, lr 5e-6 with --scale_lr, which at its 16 x 2 GPUs x 2 accumulation is 3.2e-4). Diff-Mix's own code
    # uses rank 10 (configs/finetune_lora_sd15_gpu.yaml follows it).
    rank: int = Field(default=8, ge=1, description="LoRA rank r (reference: 8)")
    alpha: float = Field(
        default=8.0, gt=0, description="LoRA alpha, the update scaled by alpha / r (reference: alpha = r)"
    )
    target_modules: list[str] = Field(
        default=["to_k", "to_q", "to_v", "to_out.0"],
        description="UNet attention projections to adapt; add_k_proj/add_v_proj are added where the UNet "
        "has them",
    )
    textual_inversion: ModelRef | None = Field(
        default=None,
        description="A textual-inversion run's output (folder or textual_inversion.safetensors), loaded "
        "first; the prompt's {token} is then each class's token",
    )
    prompt: str = Field(
        default="a photo of a {token}",
        description="Instance prompt; {token}: the class's TI token (else its name), {class_name}: its name",
    )
    learning_rate: float = Field(
        default=5e-6, gt=0, description="Before scale_lr (reference: 5e-6, scaled by the effective batch)"
    )

    @field_validator("textual_inversion", mode="before")
    @classmethod
    def _path_shorthand(cls, value):
        return {"id": value} if isinstance(value, str) else value


class FullSpec(Strict):
    """`method: full` (engine.finetune.full): whole modules trained, saved as a diffusers pipeline folder."""

    train_text_encoder: bool = Field(
        default=False,
        description="Also train the text encoder(s): a random or out-of-domain encoder has to learn the "
        "domain's words (diffusers' train_text_to_image keeps it frozen, the default)",
    )
    vae_steps: int = Field(
        default=0,
        ge=0,
        description="First train the VAE alone for this many steps as an autoencoder (a random tiny VAE "
        "cannot reconstruct anything); 0: the VAE stays frozen, as in diffusers' example",
    )
    kl_weight: float = Field(
        default=1e-6, ge=0, description="KL weight of the autoencoder loss (LDM's KL-f8 autoencoder: 1e-6)"
    )
    prompt: str = Field(
        default="a photo of a {class_name}",
        description="A row's prompt when it has no caption ({class_name}: its class)",
    )
    empty_prompt_prob: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of rows trained on the empty prompt, so that classifier-free guidance has an "
        "unconditional model to push against (diffusers' --proportion_empty_prompts, default 0; Stable "
        "Diffusion's own training dropped 10% of its captions)",
    )
    captions_file: str | None = Field(
        default=None,
        description="CSV with columns source_id,caption (image folders: the path under data.path, e.g. "
        "train/circle/circle_0000.png); a row missing or empty there takes `prompt` (counted)",
    )
    learning_rate: float = Field(
        default=1e-4,
        gt=0,
        description="Before scale_lr (diffusers' train_text_to_image example: 1e-4, without --scale_lr)",
    )


class MvcSpec(Strict):
    """`method: mvc` (engine.finetune.mvc): the whole UNet, widened to read a real image of the class as 4 more
    input channels (InstructPix2Pix-style), trained on mixed caption embeddings (MVC's Algorithm 1)."""

    coarse_steps: int = Field(
        default=DEFAULT_COARSE_STEPS,
        ge=0,
        description="P of Algorithm 1: token-row spans copied from another caption of the class (the paper "
        "gives no value; engine.methods.mvc_mix's default, our choice)",
    )
    fine_steps: int = Field(
        default=DEFAULT_FINE_STEPS,
        ge=0,
        description="Q of Algorithm 1: feature spans of one token copied from another caption (the paper "
        "gives no value; engine.methods.mvc_mix's default, our choice)",
    )
    conditioning_dropout_prob: float = Field(
        default=0.05,
        ge=0,
        le=1 / 3,
        description="p: of the samples, p train without the text, p without the image, p without both, so "
        "that both guidance scales have something to push against (diffusers' train_instruct_pix2pix "
        "--conditioning_dropout_prob, 0.05 in its README; InstructPix2Pix section 3.2.1: 5% each); at most "
        "1/3, as the three shares come from one uniform draw",
    )
    prefix: str = Field(
        default="This is an image of {class_name}. ",
        description="The text of a row without a caption ({class_name}: its class): MVC's caption prefix "
        "alone (engine.config CaptionConfig.prefix, the caption run's default)",
    )
    learning_rate: float = Field(
        default=5e-5,
        gt=0,
        description="Before scale_lr (diffusers' train_instruct_pix2pix README: 5e-5, without --scale_lr)",
    )
    max_grad_norm: float | None = Field(
        default=1.0,
        gt=0,
        description="Clip the averaged gradients' global norm to this (diffusers' train_instruct_pix2pix "
        "--max_grad_norm, default 1.0); None: no clipping",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_names_only_the_class(cls, value: str) -> str:
        try:
            value.format(class_name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"mvc.prefix may only use {{class_name}}: {err!r}") from None
        return value


class FinetuneCheckpointSpec(Strict):
    every_steps: int = Field(
        default=100, ge=1, description="Checkpoint every N optimizer steps (and the last)"
    )
    num_to_keep: int = Field(default=2, ge=1)


class FinetuneOutputConfig(Strict):
    path: str = Field(default="outputs/finetune", description="Runs live in <path>/<name>")
    name: str | None = Field(
        default=None, description="Run name (None: <method>-seed<seed>); same name resumes"
    )
    overwrite: bool = Field(
        default=False, description="Delete an existing run of that name instead of resuming"
    )


class RunShardsData(Strict):
    """A synthray generation run's output as the fine-tuning data: its real rows (`recipe: real`), whose
    `mask` column the run's segmentation stage wrote, so `subject_only` needs no mask folder."""

    format: Literal["shards"] = Field(description="shards: a generation run's output shards")
    path: str = Field(description="The run's <out>/data folder (or one of its .parquet shards), local")
    splits: list[str] = Field(default=["train"], description="Splits whose real rows are read")
    max_pixels: int = Field(default=40_000_000, ge=1, description="Decompression-bomb guard per image")
    min_side: int = Field(default=8, ge=1, description="Images smaller than this on a side are not used")


DATA_FORMATS = ("image_folder", "parquet", "shards")


def _data_kind(value) -> str | None:
    fmt = value.get("format", "image_folder") if isinstance(value, dict) else getattr(value, "format", None)
    if fmt not in DATA_FORMATS:
        return None  # the Discriminator's error below
    return "shards" if fmt == "shards" else "dataset"


# `format: shards` reads a generation run's shards; image_folder and parquet are datasets for engine.readers.
FinetuneData = Annotated[
    Annotated[DataConfig, Tag("dataset")] | Annotated[RunShardsData, Tag("shards")],
    Discriminator(
        _data_kind,
        custom_error_type="data_format",
        custom_error_message=f"data.format must be one of {', '.join(DATA_FORMATS)}",
    ),
]


class FinetuneConfig(Strict):
    method: Literal["textual_inversion", "dreambooth_lora", "full", "mvc"] = Field(
        description="What to train"
    )
    model: ModelRef = Field(description="Base pipeline (SD1.5 or SDXL, diffusers format)")
    data: FinetuneData = Field(
        description="Real training images: a dataset read by engine.readers (image_folder, parquet), or "
        "`format: shards`, a generation run's real rows with their segmentation masks"
    )
    seed: int = Field(default=0, ge=0)
    resolution: int = Field(default=512, ge=8, description="Training side, px (resize + center crop)")
    hflip: bool = Field(default=True, description="Random horizontal flips")
    subject_only: bool = Field(
        default=False,
        description="Train on the subjects only (De-DA): each image cut to its mask's box, the rest mid "
        "gray, padded square. Masks: data.masks_path, or the `mask` column of `format: shards`; images "
        "without a mask are not used (counted in finetune.json `skipped_rows`)",
    )
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps")
    buffer_rows: int = Field(
        default=256,
        ge=1,
        description="Decoded images each worker holds to draw micro-batches from, streamed from its share of "
        "the rows (engine.finetune.stream); a share that fits is read once. Memory per worker: buffer_rows x "
        "resolution^2 x 3 bytes (256 at 512 px: 200 MB)",
    )
    batch_size: int = Field(default=4, ge=1, description="Images per worker per micro-batch")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    scale_lr: bool = Field(
        default=True,
        description="Multiply the learning rate by batch_size x gradient_accumulation_steps x num_workers "
        "(the diffusers examples' --scale_lr)",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    timestep_range: tuple[int, int] | None = Field(
        default=None,
        description="[t_min, t_max] (inclusive) to sample timesteps from; None: all of them. De-DA's "
        "truncated-timestep inversion matches it to the SDEdit strength that will use the tokens",
    )
    textual_inversion: TextualInversionSpec = Field(default_factory=TextualInversionSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    full: FullSpec = Field(default_factory=FullSpec)
    mvc: MvcSpec = Field(default_factory=MvcSpec)
    log_every: int = Field(default=10, ge=1, description="Progress line every N steps (rank 0)")
    scaling: ScalingSpec = Field(default_factory=lambda: ScalingSpec(num_workers=1))
    checkpoint: FinetuneCheckpointSpec = Field(default_factory=FinetuneCheckpointSpec)
    output: FinetuneOutputConfig = Field(default_factory=FinetuneOutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> FinetuneConfig:
        # fp16 runs with loss scaling (GradScaler) on CUDA; CPU autocast in fp16 is not something to train in.
        if self.scaling.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError(
                "scaling.precision fp16 needs GPU workers (scaling.use_gpu: true): fp16 autocast is CUDA only "
                "here; on CPU use fp32 (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _subjects_need_masks(self) -> FinetuneConfig:
        if self.subject_only and isinstance(self.data, DataConfig) and not self.data.masks_path:
            raise ValueError(
                "subject_only needs masks: set data.masks_path, or read a segmentation run's shards "
                "(data.format: shards)"
            )
        return self

    @model_validator(mode="after")
    def _timesteps_ordered(self) -> FinetuneConfig:
        if self.timestep_range is not None:
            low, high = self.timestep_range
            if not 0 <= low <= high:
                raise ValueError(f"timestep_range {list(self.timestep_range)} must be 0 <= t_min <= t_max")
        return self

    @model_validator(mode="after")
    def _phases_fit(self) -> FinetuneConfig:
        if self.method == "full" and self.full.vae_steps >= self.max_steps:
            raise ValueError(
                f"full.vae_steps ({self.full.vae_steps}) must be below max_steps ({self.max_steps}): the "
                "UNet trains after the VAE"
            )
        return self

    @model_validator(mode="after")
    def _mvc_reads_a_caption_run(self) -> FinetuneConfig:
        # MVC mixes the captions of each class: only a caption run's shards carry them per row.
        if self.method == "mvc" and self.data.format != "shards":
            raise ValueError(
                "method mvc trains on a caption run's rows: set data.format: shards and data.path to its "
                f"<out>/data (data.format is {self.data.format})"
            )
        if self.method == "mvc" and self.subject_only:
            raise ValueError(
                "method mvc trains on whole images and their captions: subject_only must be false"
            )
        return self

    def run_name(self) -> str:
        return self.output.name or f"{self.method}-seed{self.seed}"

    def run_dir(self) -> Path:
        return Path(self.output.path).expanduser().resolve() / self.run_name()


# Changing these between a run and its resumption keeps the run meaningful (engine.train.runner.prepare_run_dir).
RESUMABLE_KEYS = ("max_steps", "log_every", "output", "ray", "scaling", "checkpoint")
