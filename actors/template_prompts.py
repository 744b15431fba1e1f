"""AGA background prompts without an LLM (`prompt.backend: template`): each row's prompt is its composed scene,
time and style, the same text the LLM backends fall back on.

Reads:  seed (int64).
Writes: prompt (str), prompt_source ("template"), instruction (str, the composed question an LLM would get).

What a user of a new domain runs when no instruction model knows its words, or when a generator trained on
the domain's own captions (`scenes: [grass, water, ...]`) would not understand an LLM's prose.
"""

from __future__ import annotations

import numpy as np

from actors.prompt_writer import INSTRUCTION, PROMPT_SOURCE, SOURCE_TEMPLATE
from engine import schema
from engine.config import PromptConfig
from engine.methods.background_prompts import BackgroundPromptEngine


class TemplatePromptWriter:
    """Callable class for `map_batches`: no model, one template prompt per row, from the row's seed."""

    def __init__(
        self, config: PromptConfig, class_names: list[str], superclasses: dict[str, str] | None = None
    ) -> None:
        self.prompts = BackgroundPromptEngine.from_config(config, class_names, superclasses)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.require_columns(batch, [schema.SEED], "template_prompts")
        seeds = [int(s) for s in batch[schema.SEED]]
        out = dict(batch)
        out[schema.PROMPT] = np.array([self.prompts.fallback(s) for s in seeds], dtype=object)
        out[PROMPT_SOURCE] = np.array([SOURCE_TEMPLATE] * len(seeds), dtype=object)
        out[INSTRUCTION] = np.array([self.prompts.compose(s).text for s in seeds], dtype=object)
        return out
