"""Recipe registry: name -> how the recipe builds its stage list from the config, and the class pool it
needs sampled first (if any).

A recipe adds a file here and one line to `RECIPES`; it starts with the shared opening (`opening`: skip
done sources, read bytes, decode) and strings its actors (`actors/`) after it. The engine (read, class pools,
stage loop, encode, write, report) is shared. `filter` is the fidelity-filter stage any recipe gets from
config; `aga_vllm_prompts` is AGA's prompt stage on vLLM. `deda` is De-DA's decoupling (its recombination is a
training strategy, engine.train.mixing). `caption` writes captions only (MVC's first run); `mvc` generates from them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from engine.config import GenerateConfig
from engine.recipes.aga import aga_stages
from engine.recipes.caption import caption_stages
from engine.recipes.deda import deda_stages
from engine.recipes.mvc import mvc_pool, mvc_stages
from engine.recipes.unidiffda import unidiffda_pool, unidiffda_stages
from engine.stages.class_pools import ClassPool, PoolSpec
from engine.stages.loop import Stage

# (config, class names, config hash, ids already written: engine.output.written_ids.WrittenIds, class pool) -> stages
RecipeBuilder = Callable[[GenerateConfig, list[str], str, Collection[str], ClassPool | None], list[Stage]]


def _no_pool(config: GenerateConfig) -> PoolSpec | None:
    return None


@dataclass(frozen=True)
class Recipe:
    stages: RecipeBuilder
    # The class pool the stages read (engine.stages.class_pools), sampled from the source before they run; None: none.
    pool: Callable[[GenerateConfig], PoolSpec | None] = _no_pool


RECIPES: dict[str, Recipe] = {
    "aga": Recipe(aga_stages),
    "unidiffda": Recipe(unidiffda_stages, unidiffda_pool),
    "deda": Recipe(deda_stages),
    "caption": Recipe(caption_stages),
    "mvc": Recipe(mvc_stages, mvc_pool),
}


def recipe_of(config: GenerateConfig) -> Recipe:
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[config.recipe]


def build_stages(
    config: GenerateConfig,
    class_names: list[str],
    config_hash: str,
    done_ids: Collection[str] = frozenset(),
    pool: ClassPool | None = None,
) -> list[Stage]:
    return recipe_of(config).stages(config, class_names, config_hash, done_ids, pool)


def pool_spec(config: GenerateConfig) -> PoolSpec | None:
    return recipe_of(config).pool(config)


def model_tags(config: GenerateConfig) -> dict[str, str]:
    """role -> id@revision of every model the config uses, for each row's provenance."""
    tags = {}
    if config.segment and not config.segment.use_dataset_masks:
        tags["detector"] = config.segment.detector.tag()
        tags["sam"] = config.segment.sam.tag()
    if config.prompt and config.prompt.backend != "template":
        tags["prompt_llm"] = config.prompt.model.tag()
    if config.background:
        tags["background"] = config.background.model.tag()
        if config.background.unet:
            tags["background_unet"] = config.background.unet.tag()
    if config.generation:
        tags["generator"] = config.generation.model.tag()
        if config.generation.unet:
            tags["generator_unet"] = config.generation.unet.tag()
    if config.caption and config.caption.model is not None:
        tags["captioner"] = config.caption.model.tag()
    if config.mvc:
        for role, ref in (("mvc_finetuned", config.mvc.model), ("mvc_pretrained", config.mvc.pretrained)):
            if ref is not None:
                tags[role] = ref.tag()
    if config.filter:
        tags["filter"] = config.filter.model.tag()
    return tags
