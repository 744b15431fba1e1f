"""One section per model stage of the generation recipes (what the stage computes; `stage:` says how Ray
schedules it). A new recipe's stages add their sections in a module of their own."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from engine.config.adapters import AdapterConfig
from engine.config.base import ModelRef, StageSpec, Strict, scheduling_field
from engine.config.generator import SchedulerConfig


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
    # None, not "top", is the default so that configs without the key keep their content hash (resume).
    boxes: Literal["top", "all"] | None = Field(
        default=None,
        description="top (or unset): the subject is the most confident box's mask (AGA pastes one subject); "
        "all: the union of the masks of every box above box_threshold (De-DA's CDP, as Lang-SAM returns "
        "several boxes)",
        json_schema_extra={"content_omit_if_none": True},
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
    backend: Literal["transformers", "vllm", "template"] = Field(
        default="transformers",
        description="transformers: an actor pool running `generate`; vllm: vLLM through ray.data.llm; "
        "template: no LLM, the composed scene + time + style itself (a new domain's own words in `scenes`)",
    )
    model: ModelRef | None = Field(default=None, description="Instruction LLM (backends transformers, vllm)")
    num_instructions: int = Field(default=3, ge=1, description="Instruction templates used")
    num_scenes: int = Field(default=18, ge=1, description="Built-in scene templates used (not with `scenes`)")
    num_times: int = Field(
        default=13, ge=1, description="Built-in time/season templates used (not with `times`)"
    )
    scenes: list[str] | None = Field(
        default=None,
        description="The domain's scene words, used whole instead of the built-in AGA scenes (e.g. a toy's "
        "[grass, water, sand, brick]); a scene holding a class word is still dropped",
    )
    times: list[str] | None = Field(
        default=None, description="Time/season words instead of the built-in ones; [] for none"
    )
    styles: list[str] | None = Field(
        default=None,
        description="Style endings of a template prompt instead of the built-in photo styles; [] for none",
    )
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.8, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    extra_forbidden_words: list[str] = Field(default_factory=list)
    device: str = scheduling_field("auto", description="auto, cpu or cuda[:n]")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Engine settings for backend vllm")
    stage: StageSpec = scheduling_field(default_factory=StageSpec)

    @model_validator(mode="after")
    def _model_and_pools(self) -> PromptConfig:
        if self.backend != "template" and self.model is None:
            raise ValueError(f"prompt.model is required for backend {self.backend!r} (the instruction LLM)")
        for pool in ("scenes", "times"):
            if getattr(self, pool) is not None and f"num_{pool}" in self.model_fields_set:
                raise ValueError(
                    f"give prompt.{pool} or prompt.num_{pool}, not both: a given list is used whole"
                )
        if self.scenes == []:
            raise ValueError("prompt.scenes is empty: name the domain's scenes, or leave it out for AGA's")
        return self


class CaptionConfig(Strict):
    """Image captions from a VLM, with a class prefix (MVC: "This is an image of <class>. <caption>")."""

    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers: an actor pool running `generate`; vllm: vLLM through ray.data.llm",
    )
    model: ModelRef | None = Field(
        default=None,
        description="Vision-language model: a chat VLM (image + text in, text out), or a BLIP-2 checkpoint "
        "with model_type blip2; None with captions_file",
    )
    captions_file: str | None = Field(
        default=None,
        description="Captions a dataset already has instead of a model: a CSV with source_id and caption "
        "columns (the toy dataset's captions.csv, COCO-style annotations); an image without one gets the "
        "prefix alone",
        json_schema_extra={"content_omit_if_none": True},
    )
    model_type: Literal["chat", "blip2"] | None = Field(
        default=None,
        description="Model family for the transformers backend. None or chat: a chat VLM prompted with "
        "`instruction` through its chat template (AutoModelForImageTextToText). blip2: BLIP-2 "
        "(Blip2ForConditionalGeneration, e.g. Salesforce/blip2-opt-2.7b, as MVC captions), which has no chat "
        "template and captions the image with no text prompt; backend transformers only",
        json_schema_extra={"content_omit_if_none": True},
    )
    instruction: str = Field(
        default="Describe this image in one sentence.",
        description="The user message sent with the image (chat VLMs; model_type blip2 sends no text)",
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

    @model_validator(mode="before")
    @classmethod
    def _chat_is_the_default(cls, data: Any) -> Any:
        # The default under its own name is stored as None, so the config keeps the content hash (and row
        # ids) of configs that do not name it.
        if isinstance(data, dict) and data.get("model_type") == "chat":
            return {**data, "model_type": None}
        return data

    @model_validator(mode="after")
    def _a_model_or_a_file(self) -> CaptionConfig:
        if (self.model is None) == (self.captions_file is None):
            raise ValueError("caption needs exactly one of caption.model and caption.captions_file")
        return self

    @model_validator(mode="after")
    def _blip2_runs_unprompted_on_transformers(self) -> CaptionConfig:
        if self.model_type != "blip2":
            return self
        if self.backend != "transformers":
            raise ValueError(
                f"caption.model_type 'blip2' runs on caption.backend 'transformers' only, not {self.backend!r}"
            )
        # BLIP-2 captions unconditionally (as MVC does): an instruction would be silently dropped, so a
        # changed one is refused. The default is accepted, so a saved resolved config loads again.
        if self.instruction != type(self).model_fields["instruction"].default:
            raise ValueError(
                "caption.instruction is not used with caption.model_type 'blip2' (BLIP-2 captions the image "
                "with no text prompt): remove caption.instruction, or use a chat VLM"
            )
        return self


class BackgroundConfig(Strict):
    model: ModelRef = Field(description="SDXL text-to-image pipeline")
    unet: ModelRef | None = Field(
        default=None,
        description="A UNet instead of the checkpoint's (a diffusers folder or a .safetensors state dict), "
        "e.g. SDXL-Lightning's few-step UNet",
        json_schema_extra={"content_omit_if_none": True},
    )
    scheduler: SchedulerConfig | None = Field(
        default=None,
        description="Scheduler override, e.g. {name: EulerDiscreteScheduler, settings: {timestep_spacing: "
        "trailing}} for SDXL-Lightning (None: the checkpoint's)",
        json_schema_extra={"content_omit_if_none": True},
    )
    height: int = Field(default=1024, ge=8)
    width: int = Field(default=1024, ge=8)
    num_inference_steps: int = Field(default=30, ge=1)
    guidance_scale: float = Field(default=5.0, ge=0)
    negative_prompt: str = "people, person, animal, text, watermark, blurry"
    adapters: AdapterConfig | None = Field(
        default=None,
        description="Textual-inversion tokens / LoRA from `synthray finetune` (None: the base pipeline)",
        json_schema_extra={"content_omit_if_none": True},
    )
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


class PasteConfig(Strict):
    """How a subject is pasted onto a background (engine.methods.paste.composite_one): AGA's composite stage and
    De-DA's recombination in training (mix.deda_paste) share it."""

    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of a horizontal flip")
    rotation_deg: tuple[float, float] = Field(default=(-15.0, 15.0), description="Rotation range, degrees")
    scale: tuple[float, float] = Field(default=(0.8, 1.2), description="Subject scale range")
    feather_px: float = Field(default=1.5, ge=0, description="Gaussian edge feathering of the mask, px")


class CompositeConfig(PasteConfig):
    stage: StageSpec = scheduling_field(default_factory=lambda: StageSpec(batch_size=8))
