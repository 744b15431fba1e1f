"""UniDiffDA (Diffusion-Based Data Augmentation for Image Recognition: a Systematic Analysis): a method is
fine-tuning x generation x utilization. Fine-tuning is `synthray finetune` (its adapters load by config);
generation is this recipe, one diffusion generator in one of six modes (actors.generator); utilization is
the training job's strategy (concat, replace, ...).

opening (skip done, read, decode) -> expand x K -> generate (txt2img | sdedit | instruct_pix2pix | ddim_interp | diffmix | gif).
ddim_interp draws a same-class partner from a class pool (engine.stages.class_pools) sampled before the stages run.
"""

from __future__ import annotations

from collections.abc import Collection

from actors.generator import PARAMS, DiffusionGenerator
from engine import schema
from engine.config import GenerateConfig, check_class_keys
from engine.recipes.opening import expand_stage, opening_stages
from engine.stages.class_pools import ClassPool, PoolSpec
from engine.stages.expand import Expansion
from engine.stages.loop import Stage


def unidiffda_pool(config: GenerateConfig) -> PoolSpec | None:
    """Interpolation needs a second image of the class; the other modes read their own row only."""
    if config.generation is None or config.generation.mode != "ddim_interp":
        return None
    splits = tuple(config.data.expand_splits) if config.data.expand_splits is not None else ("train",)
    return PoolSpec(max_per_class=config.generation.pool_size, splits=splits)


def unidiffda_stages(
    config: GenerateConfig,
    class_names: list[str],
    config_hash: str,
    done_ids: Collection[str],
    pool: ClassPool | None = None,
) -> list[Stage]:
    if config.generation is None:
        raise ValueError("recipe 'unidiffda' needs the config section ['generation']")
    generation = config.generation
    check_class_keys(generation.superclasses, class_names, "generation.superclasses")
    expansion = Expansion.from_config(config, config_hash)
    reads = (schema.CLASS_NAME, schema.LABEL, schema.SOURCE_ID, schema.SEED)
    return [
        *opening_stages(config, expansion, done_ids),
        expand_stage(expansion, done_ids),
        Stage(
            "generate",
            DiffusionGenerator,
            generation.stage,
            {"config": generation, "class_names": class_names, "pool": pool},
            reads=reads if generation.mode == "txt2img" else (*reads, schema.IMAGE),
            writes=(schema.PROMPT, schema.SOFT_LABEL, PARAMS),
            only_synthetic=True,
        ),
    ]
