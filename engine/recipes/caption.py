"""Caption: each real image of the expanded splits gets a caption from a vision-language model (BLIP-2 or a chat
VLM; transformers or vLLM), written in the shards' `caption` column; no synthetic row.

opening (skip done, read, decode) -> caption -> expand (the real row only).

MVC's first run: its captions feed the MVC generation run's caption pools (`mvc.captions`: this run's
data folder) and MVC's fine-tuning (`synthray finetune`, method mvc). Two runs rather than one because a
caption pool must hold the class's captions before the first image is generated, while one run streams;
each run resumes on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from actors.captioner import caption_stage
from engine.config import GenerateConfig
from engine.recipes.opening import expand_stage, opening_stages
from engine.stages.expand import Expansion
from engine.stages.loop import Stage


def caption_stages(
    config: GenerateConfig,
    class_names: list[str],
    config_hash: str,
    done_ids: Collection[str],
    pool: None = None,  # captions read no class pool
) -> list[Stage]:
    if config.caption is None:
        raise ValueError("recipe 'caption' needs the config section ['caption']")
    # Real rows only: num_variants is unused here.
    expansion = dataclasses.replace(Expansion.from_config(config, config_hash), num_variants=0)
    return [
        *opening_stages(config, expansion, done_ids),
        caption_stage(config.caption, only_splits=expansion.expand_splits),
        expand_stage(expansion, done_ids),
    ]
