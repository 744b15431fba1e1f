"""AGA (Automated Generative Data Augmentation): keep the subject, replace the background.

opening (skip done, read, decode) -> detect+segment (GroundingDINO + SAM, or dataset masks) -> expand x K -> background prompt (LLM)
-> background (SDXL) -> composite (subject pasted back with flip/rotate/scale).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection

from actors.background import PROMPT_TRIMMED, BackgroundGenerator
from actors.compositor import COMPOSITE_PARAMS, Compositor
from actors.prompt_writer import INSTRUCTION, PROMPT_SOURCE, PromptWriter
from actors.template_prompts import TemplatePromptWriter
from engine import schema
from engine.config import GenerateConfig, check_class_keys
from engine.recipes.aga_vllm_prompts import vllm_prompt_stage
from engine.recipes.opening import expand_stage, opening_stages, segment_stage
from engine.stages.expand import Expansion
from engine.stages.loop import Stage

logger = logging.getLogger(__name__)


@functools.cache  # once per run: the stages are built for the checks and again for each attempt
def warn_fine_grained_prompts(classes: tuple[str, ...]) -> None:
    """AGA prompts GroundingDINO with superclasses because fine-grained names fail to detect (the AGA
    paper): classes without one in `segment.superclasses` are detected by their own names."""
    logger.warning(
        "segment.superclasses names no superclass for %d classes (%s); GroundingDINO is prompted with their "
        "own names, which AGA reports fail for fine-grained classes: map them, e.g. {%s: bird}",
        len(classes),
        ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else ""),
        classes[0],
    )


def aga_stages(
    config: GenerateConfig,
    class_names: list[str],
    config_hash: str,
    done_ids: Collection[str],
    pool: None = None,  # AGA reads no class pool
) -> list[Stage]:
    missing = [
        name for name in ("segment", "prompt", "background", "composite") if getattr(config, name) is None
    ]
    if missing:
        raise ValueError(f"recipe 'aga' needs config sections {missing}")
    seg = config.segment
    check_class_keys(seg.superclasses, class_names, "segment.superclasses")
    expansion = Expansion.from_config(config, config_hash)
    stages = opening_stages(config, expansion, done_ids, require_masks=seg.use_dataset_masks)
    # 1. The subject mask: from the dataset when it ships masks (and the config says so), else the models.
    if not seg.use_dataset_masks:
        unmapped = tuple(name for name in class_names if name not in seg.superclasses)
        if unmapped:
            warn_fine_grained_prompts(unmapped)
        stages.append(segment_stage(seg, expansion))
    # 2. K synthetic rows per real image, each with its own seed.
    stages.append(expand_stage(expansion, done_ids))
    # 3. A background description per synthetic row, free of class words: the same columns from either
    #    backend (transformers actors, or vLLM through ray.data.llm).
    if config.prompt.backend == "vllm":
        stages.append(vllm_prompt_stage(config.prompt, class_names, seg.superclasses))
    else:
        stages.append(
            Stage(
                "prompt",
                TemplatePromptWriter if config.prompt.backend == "template" else PromptWriter,
                config.prompt.stage,
                {"config": config.prompt, "class_names": class_names, "superclasses": seg.superclasses},
                reads=(schema.SEED, schema.CLASS_NAME),
                writes=(schema.PROMPT, PROMPT_SOURCE, INSTRUCTION),
                only_synthetic=True,
            )
        )
    # 4. The background image, 5. the subject pasted onto it.
    stages.append(
        Stage(
            "background",
            BackgroundGenerator,
            config.background.stage,
            {"config": config.background},
            reads=(schema.PROMPT, schema.SEED),
            writes=(schema.BACKGROUND, PROMPT_TRIMMED),
            only_synthetic=True,
            counts=(PROMPT_TRIMMED,),
        )
    )
    stages.append(
        Stage(
            "composite",
            Compositor,
            config.composite.stage,
            {"config": config.composite},
            reads=(schema.IMAGE, schema.MASK, schema.BACKGROUND, schema.SEED),
            writes=(schema.BBOX, COMPOSITE_PARAMS),
            only_synthetic=True,
        )
    )
    return stages
