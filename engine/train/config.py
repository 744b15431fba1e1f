"""Typed configs of `synthray train` (one run) and `synthray sweep` (runs x seeds), in the style of engine.config."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from engine.config import ModelRef, PasteConfig, RayConfig, Strict

STRATEGIES = ("real", "concat", "replace", "rsp", "two_phase", "deda")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ShardsConfig(Strict):
    paths: list[str] = Field(
        min_length=1,
        description="Shard folders (a generation run's <out>/data) or .parquet files, all of one dataset "
        "(engine.train.sources); with several, real rows are kept once per source_id (from the first path "
        "that has them)",
    )
    recipes: list[str] | None = Field(
        default=None, description="Synthetic recipes to use (None: every recipe other than 'real')"
    )
    image_size: int = Field(default=64, ge=8, description="Side of the square training/eval input, px")
    cache_in_object_store: bool = Field(
        default=True,
        description="Materialize the encoded rows once (epochs then skip Parquet); off for data above object "
        "store memory, which re-reads the shards each epoch",
    )
    decode_batch_size: int = Field(default=64, ge=1, description="Rows per decode/augment map_batches call")
    shuffle_buffer_rows: int = Field(
        default=2048, ge=1, description="Decoded rows each worker shuffles over (on top of block order)"
    )
    extra_test_splits: list[str] = Field(
        default_factory=list,
        description="Splits of the shards evaluated after the last epoch beside `test`, each reported under "
        "its name (metrics.json `extra_tests`, the sweep's table): shifted or out-of-distribution test sets "
        "(AGA reports ImageNet-V2 and Sketch), e.g. the toy's test_ood (backgrounds never seen in training)",
    )
    shots_per_class: int | None = Field(
        default=None,
        ge=1,
        description="Low-data protocol: keep k real train rows per class, drawn by the training seed (a hash "
        "of seed and source_id), and only the synthetic rows of those sources; a class with fewer keeps all "
        "and the run's notes say so; val/test untouched (None: every row)",
    )

    @model_validator(mode="after")
    def _extra_tests_are_new_splits(self) -> ShardsConfig:
        taken = sorted(set(self.extra_test_splits) & {"train", "val", "test"})
        if taken:
            raise ValueError(
                f"data.extra_test_splits cannot name {taken}: train, val and test have their roles"
            )
        if len(set(self.extra_test_splits)) != len(self.extra_test_splits):
            raise ValueError(f"data.extra_test_splits repeats a split: {self.extra_test_splits}")
        return self


class AugmentConfig(Strict):
    crop_scale: tuple[float, float] = Field(default=(0.6, 1.0), description="RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = Field(
        default=(0.75, 4 / 3), description="RandomResizedCrop aspect range"
    )
    hflip: bool = Field(default=True, description="Random horizontal flip")
    rand_augment: bool = Field(default=False, description="Add RandAugment (Cubuk et al. 2020)")
    rand_augment_num_ops: int = Field(default=2, ge=1)
    rand_augment_magnitude: int = Field(default=9, ge=0, le=30)
    auto_augment: Literal["imagenet", "cifar10", "svhn"] | None = Field(
        default=None,
        description="Add AutoAugment (Cubuk et al. 2019) with the policy learned on that dataset (torchvision's "
        "v2.AutoAugment; timm's 'original' is the same published ImageNet policy): MVC's baseline, and what it "
        "combines with synthetic data",
    )
    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN, description="Normalization mean (timm's)")
    std: tuple[float, float, float] = Field(default=IMAGENET_STD, description="Normalization std (timm's)")


class MixConfig(Strict):
    strategy: Literal["real", "concat", "replace", "rsp", "two_phase", "deda"] = Field(
        default="real", description="How synthetic train rows are used (engine.train.mixing documents each)"
    )
    synthetic_ratio: float | None = Field(
        default=None,
        gt=0,
        description="concat / two_phase phase 1: at most this many synthetic rows per real row of each class "
        "(None: all)",
    )
    replace_prob: float = Field(
        default=0.5, ge=0, le=1, description="replace: per-sample replacement probability"
    )
    replace_scope: Literal["local", "class", "global"] = Field(
        default="local",
        description="replace: by one of the row's own variants (local, UniDiffDA's LRR), any synthetic row of "
        "its class (class), or any synthetic row at all, whose label the slot then takes (global, UniDiffDA's "
        "GRR as its reference code draws it)",
    )
    rsp_prob: float = Field(
        default=0.5, ge=0, le=1, description="rsp: probability each synthetic row joins an epoch"
    )
    # De-DA gives no value for p, the edited share or the paste: these defaults are our choice.
    deda_prob: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="deda: per-sample probability that a real sample is replaced by a composite of a CDP of "
        "its class on a CIP of another class, redrawn every epoch",
    )
    deda_edited_share: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="deda: share of composites whose CDP is an edited one (where the class has edited CDPs; "
        "else its real CDPs)",
    )
    deda_paste: PasteConfig = Field(
        default_factory=lambda: PasteConfig(rotation_deg=(0.0, 0.0)),
        description="deda: the paste's random flip / rotation / scale (position is uniform over the places "
        "that keep the subject whole); no rotation by default: De-DA names flip, scale and position",
    )
    phase2_epochs: int = Field(default=2, ge=1, description="two_phase: last epochs, real rows only")
    phase2_lr_scale: float = Field(default=0.1, gt=0, description="two_phase: phase-2 peak LR = lr * this")


class ModelConfig(Strict):
    name: str = Field(default="test_resnet", description="timm model name (timm.list_models())")
    pretrained: ModelRef | None = Field(
        default=None,
        description="Local weights file (.safetensors; pickled .pth/.bin need allow_pickle); None: random init",
    )
    drop_rate: float = Field(default=0.0, ge=0, lt=1, description="Dropout before the classifier")

    @model_validator(mode="after")
    def _weights_are_local(self) -> ModelConfig:
        # Downloads are the cluster operator's step; training never reaches a hub on its own.
        if self.pretrained is not None and not self.pretrained.is_local():
            raise ValueError(f"model.pretrained {self.pretrained.id!r} must be a local weights file")
        return self


class OptimConfig(Strict):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=3e-3, gt=0, description="Peak learning rate (linear warmup, then cosine)")
    weight_decay: float = Field(default=0.05, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only")
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)


class ScalingSpec(Strict):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.75}, description="Ray resources reserved by each worker"
    )
    controller_poll_s: float | None = Field(
        default=None,
        gt=0,
        description="Ray Train controller poll interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; None: Ray's 2 s); "
        "each report waits for a poll, so sub-second epochs want less",
    )
    deterministic: bool = Field(
        default=True,
        description="GPU: deterministic cuDNN/cuBLAS kernels (torch.use_deterministic_algorithms), often "
        "slower; CPU runs are deterministic either way",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16 autocast on GPUs that have it, else fp16 + GradScaler; CPU fp32",
    )


class CheckpointSpec(Strict):
    every_epochs: int = Field(default=1, ge=1, description="Checkpoint every N epochs (and always the last)")
    num_to_keep: int = Field(default=2, ge=1)


class TrainOutputConfig(Strict):
    path: str = Field(
        default="outputs/train", description="Ray Train storage root; runs live in <path>/<name>"
    )
    name: str | None = Field(
        default=None, description="Run name (None: <strategy>-seed<seed>); same name resumes"
    )
    overwrite: bool = Field(
        default=False, description="Delete an existing run of that name instead of resuming"
    )


class TrainConfig(Strict):
    seed: int = Field(default=0, ge=0, description="Model init, sampling plan and augmentation seed")
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=16, ge=1, description="Per worker")
    eval_batch_size: int = Field(default=64, ge=1, description="Per worker")
    data: ShardsConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    mix: MixConfig = Field(default_factory=MixConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    output: TrainOutputConfig = Field(default_factory=TrainOutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _two_phase_fits(self) -> TrainConfig:
        if self.mix.strategy == "two_phase" and self.mix.phase2_epochs >= self.epochs:
            raise ValueError(
                f"mix.phase2_epochs ({self.mix.phase2_epochs}) must be below epochs ({self.epochs}): "
                "phase 1 needs at least one epoch"
            )
        return self

    def run_name(self) -> str:
        return self.output.name or f"{self.mix.strategy}-seed{self.seed}"

    def run_dir(self) -> Path:
        return Path(self.output.path).expanduser().resolve() / self.run_name()


class GenerationSpec(Strict):
    config: str = Field(description="Generation config YAML (GenerateConfig), e.g. configs/aga_tiny_cpu.yaml")
    set: list[str] = Field(
        default_factory=list,
        description="Its overrides after the sweep's generate_overrides, e.g. num_variants=5",
    )


class ToyDatasetSpec(Strict):
    """engine.tiny.toy_dataset.make_toy_dataset's arguments; the sweep builds the dataset when `out` holds another."""

    out: str = Field(description="Folder of the toy dataset")
    num_classes: int = Field(default=4, ge=2)
    train_per_class: int = Field(default=24, ge=0)
    eval_per_group: int = Field(
        default=40, ge=1, description="val and test images per class x background group"
    )
    size: int = Field(default=32, ge=16, description="Image side, px")
    spurious: float = Field(
        default=0.9, ge=0, le=1, description="Train share of a class on its own background"
    )
    seed: int = Field(default=0, ge=0)
    ood_per_group: int | None = Field(
        default=None,
        ge=1,
        description="Also a test_ood split: this many images per class x background type no other split uses "
        "(an out-of-distribution test set; train with data.extra_test_splits=[test_ood])",
    )


class AttentionSpec(Strict):
    target_layer: str = Field(
        description="Module of the model whose activations Grad-CAM weighs (model.get_submodule), e.g. layer2 "
        "of a timm ResNet: its map must have more than one cell at data.image_size"
    )
    split: Literal["val", "test"] = "test"


class PrepareSpec(Strict):
    """A command that makes a variant's data from the sweep's generation runs (e.g. benchmarks.oracle)."""

    command: list[str] = Field(
        min_length=1,
        description="argv, run from the current folder after the generations; a leading 'python' is the "
        "sweep's own interpreter",
    )
    creates: str = Field(
        description="What the command writes: it runs when this path is missing or a generation ran in this "
        "sweep (its input may have changed)"
    )


class SweepVariant(Strict):
    name: str = Field(description="Row label in the table, e.g. concat-k5")
    set: list[str] = Field(
        default_factory=list, description="TrainConfig overrides, e.g. mix.strategy=concat"
    )
    generate: GenerationSpec | None = Field(
        default=None,
        description="The generation run this variant trains on (run first unless finished with the same "
        "config); data.paths defaults to its <output.path>/data",
    )
    prepare: PrepareSpec | None = Field(
        default=None,
        description="A command that makes this variant's data after the generations (its `set` then names "
        "the data, e.g. data.paths=[outputs/bench/oracle-k2/data])",
    )


class SweepConfig(Strict):
    train_config: str = Field(description="Base TrainConfig YAML (each run = base + overrides + variant.set)")
    overrides: list[str] = Field(default_factory=list, description="TrainConfig overrides for every run")
    variants: list[SweepVariant] = Field(min_length=1)
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    output: str = Field(default="outputs/sweep", description="sweep.json/sweep.md here, runs under runs/")
    overwrite: bool = Field(default=False, description="Retrain runs that exist (default: resume/reuse them)")
    toy_dataset: ToyDatasetSpec | None = Field(
        default=None, description="Build this toy dataset first (a benchmark's data, in its config)"
    )
    generate_overrides: list[str] = Field(
        default_factory=list, description="Overrides of every variant's generation, before its own `set`"
    )
    baseline: str | None = Field(
        default=None,
        description="Variant the others are compared with (delta and paired t-test over seeds); None: no deltas",
    )
    attention: AttentionSpec | None = Field(
        default=None, description="Measure subject attention (Grad-CAM mass inside the subject mask) per run"
    )
    results: str | None = Field(
        default=None,
        description="Path prefix of the benchmark report: <results>.md, .json and .png (None: sweep.md only)",
    )
    notes: list[str] = Field(default_factory=list, description="Lines the report lists under its table")
    train_rows: int | None = Field(
        default=None,
        ge=1,
        description="Training budget in train rows seen: each run's epochs = round(train_rows / its rows per "
        "epoch), overriding `epochs` (None: the configs' epochs)",
    )
    only: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Run these variants alone (e.g. --set 'only=[real, aga-k2]' for a costlier budget); "
        "None: every variant",
    )

    @model_validator(mode="after")
    def _names_unique(self) -> SweepConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        unknown = sorted(set(self.only or ()) - set(names))
        if unknown:
            raise ValueError(f"only names no variant {unknown} (available: {', '.join(names)})")
        if self.only is not None:
            names = [name for name in names if name in self.only]
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a variant (available: {', '.join(names)})")
        return self

    def selected(self) -> SweepConfig:
        """This sweep with `only`'s variants alone (the config itself when `only` is None)."""
        if self.only is None:
            return self
        return self.model_copy(update={"variants": [v for v in self.variants if v.name in self.only]})
