"""The label-fidelity filter as a stage any recipe gets from config (see engine.methods.fidelity for the rules)."""

from __future__ import annotations

from actors.fidelity_filter import FidelityFilter
from engine import schema
from engine.config import FilterConfig
from engine.methods.fidelity import FIDELITY_PROB, FIDELITY_TOP, class_prompts
from engine.stages.loop import Stage


def filter_stage(config: FilterConfig, class_names: list[str]) -> Stage:
    class_prompts(config, class_names)  # a config error here, on the driver, before any actor starts
    return Stage(
        "filter",
        FidelityFilter,
        config.stage,
        {"config": config, "class_names": list(class_names)},
        reads=(schema.IMAGE, schema.LABEL),
        writes=(FIDELITY_PROB, FIDELITY_TOP),
        only_synthetic=True,
    )
