"""AGA background prompts served by vLLM (the `prompt.backend: vllm` path), through `ray.data.llm`.

Reads and writes exactly what `actors.prompt_writer.PromptWriter` (the transformers backend) does:
Reads:  seed (int64); class_name (optional, checked against the known classes).
Writes: prompt (the cleaned description), prompt_source ("llm", or "template" when the answer was unusable
        and the template fallback was used), instruction (the message sent to the LLM).

The question, the cleaning and the fallback come from `engine.methods.background_prompts`, as in PromptWriter, so for
a row seed both backends ask the same question and accept the same answers. Sampling is per row: vLLM's
`SamplingParams(seed=row seed)` gives each request its own generator, so a row's text depends on its seed and
its prompt only, not on what else is in the engine's batch. Scheduling, the engine and the ledger are the
engine's (`engine.stages.llm`); this class only turns rows into requests and answers into columns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.prompt_writer import INSTRUCTION, PROMPT_SOURCE, SOURCE_LLM, SOURCE_TEMPLATE
from engine import schema
from engine.config import PromptConfig
from engine.methods.background_prompts import BackgroundPromptEngine
from engine.stages.batch import Batch
from engine.stages.llm import sampling_params, vllm_stage
from engine.stages.loop import Stage

READS = (schema.SEED, schema.CLASS_NAME)
WRITES = (schema.PROMPT, PROMPT_SOURCE, INSTRUCTION)


class BackgroundPromptRequests:
    """The vLLM stage's task (`engine.stages.llm.LLMTask`) for AGA background prompts."""

    multimodal = False

    def __init__(
        self, config: PromptConfig, class_names: list[str], superclasses: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.class_names = set(class_names)
        self.prompts = BackgroundPromptEngine.from_config(config, class_names, superclasses)

    def requests(self, live: Batch) -> list[dict[str, Any]]:
        schema.require_columns(live, [schema.SEED], "prompt")
        if schema.CLASS_NAME in live:
            unknown = sorted({str(c) for c in live[schema.CLASS_NAME]} - self.class_names)
            if unknown:
                raise ValueError(f"classes {unknown} are not among the class_names the prompt stage knows")
        return [
            {
                "messages": self.prompts.compose(int(seed)).messages,
                "sampling_params": sampling_params(
                    self.config.max_new_tokens, self.config.temperature, self.config.top_p, int(seed)
                ),
            }
            for seed in live[schema.SEED]
        ]

    def results(self, live: Batch, texts: list[str]) -> dict[str, np.ndarray]:
        prompts, sources, instructions = [], [], []
        for seed, text in zip(live[schema.SEED], texts, strict=True):
            composed = self.prompts.compose(int(seed))
            cleaned = self.prompts.clean(text)
            prompts.append(cleaned if cleaned is not None else self.prompts.fallback(composed.seed))
            sources.append(SOURCE_LLM if cleaned is not None else SOURCE_TEMPLATE)
            instructions.append(composed.text)
        return {
            schema.PROMPT: np.array(prompts, dtype=object),
            PROMPT_SOURCE: np.array(sources, dtype=object),
            INSTRUCTION: np.array(instructions, dtype=object),
        }


def vllm_prompt_stage(
    config: PromptConfig, class_names: list[str], superclasses: dict[str, str] | None = None
) -> Stage:
    """The AGA prompt stage on vLLM: synthetic rows get a prompt, real rows pass through untouched."""
    if config.backend != "vllm":
        raise ValueError(f"vllm_prompt_stage serves backend 'vllm', not {config.backend!r}")
    return vllm_stage(
        "prompt",
        BackgroundPromptRequests(config, class_names, superclasses),
        config,
        reads=READS,
        writes=WRITES,
        only_synthetic=True,
    )
