"""What recipes build before any model loads: the AGA superclass warning (driver side, no Ray)."""

from __future__ import annotations

import logging

from engine.config import GenerateConfig, load_config
from engine.recipes import build_stages
from engine.recipes.aga import warn_fine_grained_prompts
from tests.conftest import ROOT

CLASSES = ["circle", "cross", "diamond"]


def aga_config(tmp_path, *overrides: str) -> GenerateConfig:
    base = [f"data.path={tmp_path}", f"output.path={tmp_path / 'out'}", "prompt.model.id=/tmp"]
    base += [f"{key}=/tmp" for key in ("segment.detector.id", "segment.sam.id", "background.model.id")]
    return load_config(GenerateConfig, ROOT / "configs" / "aga_tiny_cpu.yaml", base + list(overrides))


def superclass_warnings(caplog, config: GenerateConfig) -> list[str]:
    warn_fine_grained_prompts.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.recipes.aga"):
        for _ in range(2):  # the checks' build and a run attempt's: one warning
            build_stages(config, CLASSES, "hash")
    return [r.getMessage() for r in caplog.records if "segment.superclasses" in r.getMessage()]


def test_classes_without_a_superclass_are_named_once(tmp_path, caplog):
    detect = "segment.use_dataset_masks=false"
    (message,) = superclass_warnings(caplog, aga_config(tmp_path, detect))
    assert "3 classes (circle, cross, diamond)" in message
    partly = aga_config(tmp_path, detect, "segment.superclasses={circle: shape, cross: shape}")
    (message,) = superclass_warnings(caplog, partly)
    assert "1 classes (diamond)" in message
    full = aga_config(tmp_path, detect, "segment.superclasses={circle: s, cross: s, diamond: s}")
    assert superclass_warnings(caplog, full) == []
    assert superclass_warnings(caplog, aga_config(tmp_path)) == [], "dataset masks: no detection, no warning"


def test_a_superclass_map_naming_a_class_the_dataset_lacks_is_a_config_error(tmp_path):
    import pytest

    config = aga_config(tmp_path, "segment.superclasses={circle: shape, triangle: shape}")
    with pytest.raises(
        ValueError, match=r"segment.superclasses names classes the dataset does not have: \['triangle'\]"
    ):
        build_stages(config, CLASSES, "hash")
    unidiffda = load_config(
        GenerateConfig,
        ROOT / "configs" / "unidiffda_diff_aug_tiny_cpu.yaml",
        [f"data.path={tmp_path}", "generation.superclasses={squares: shape}"],
    )
    with pytest.raises(
        ValueError, match=r"generation.superclasses names classes the dataset does not have: \['squares'\]"
    ):
        build_stages(unidiffda, CLASSES, "hash")
