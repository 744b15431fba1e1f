"""Recipe registry: name -> function building the recipe's stage list from the config.

A recipe adds a file here and one line to `RECIPES`; the engine (read, stage loop, encode, write, report)
is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from engine.config import GenerateConfig
from engine.recipes.aga import aga_stages
from engine.stages import Stage

# (config, class names, config hash, ids already written: engine.written_ids.WrittenIds) -> stages
RecipeBuilder = Callable[[GenerateConfig, list[str], str, Collection[str]], list[Stage]]

RECIPES: dict[str, RecipeBuilder] = {
    "aga": aga_stages,
}


def build_stages(
    config: GenerateConfig, class_names: list[str], config_hash: str, done_ids: Collection[str] = frozenset()
) -> list[Stage]:
    if config.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {config.recipe!r}; available: {', '.join(sorted(RECIPES))}")
    return RECIPES[config.recipe](config, class_names, config_hash, done_ids)


def model_tags(config: GenerateConfig) -> dict[str, str]:
    """role -> id@revision of every model the config uses, for each row's provenance."""
    tags = {}
    if config.segment and not config.segment.use_dataset_masks:
        tags["detector"] = config.segment.detector.tag()
        tags["sam"] = config.segment.sam.tag()
    if config.prompt:
        tags["prompt_llm"] = config.prompt.model.tag()
    if config.background:
        tags["background"] = config.background.model.tag()
    if config.filter:
        tags["filter"] = config.filter.model.tag()
    return tags
