"""De-DA (Decoupled Data Augmentation): split each image into its class-dependent part (CDP, the subject) and
its class-independent part (CIP, the background); edit only CDPs; recombine CDPs with other classes' CIPs
online in training (engine.train.mixing `deda`), so composites are never stored.

opening (skip done, read, decode) -> segment (GroundingDINO + SAM, every box above threshold: the CDP mask is
their union; or dataset masks) -> mask area bounds -> expand (real, CDP, CIP, K CDPs to edit) -> decouple
(crop the CDP to its box, inpaint the CIP) -> edit (SDEdit of the isolated CDP, `generation`, optional).

Rows per real image of an expanded split: the real one (`part` whole), one CDP, one CIP and `num_variants`
edited CDPs (`cdp_edited`, De-DA's expansion multiplier) when a `generation` section edits them.
The edit keeps the crop's aspect ratio (`generation.input_size: pad`) and its mask (`generation.keep_mask`):
without LayerDiffuse's transparent decoder (engine.models.layerdiffuse) the edited CDP is re-masked with its
source mask, the fallback this recipe always takes today; run.json's `edit` stage counts those rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

from actors.decoupler import NUM_PARTS, SOURCE_BOX, Decoupler, check_mask_area
from actors.generator import PARAMS, DiffusionGenerator
from engine import schema
from engine.config import GenerateConfig, check_class_keys
from engine.recipes.opening import expand_stage, opening_stages, segment_stage
from engine.stages.expand import Expansion
from engine.stages.loop import Stage


def check_deda_config(config: GenerateConfig, class_names: list[str]) -> None:
    """What a De-DA run needs before any image is read; each error names its key."""
    missing = [name for name in ("segment", "decouple") if getattr(config, name) is None]
    if missing:
        raise ValueError(f"recipe 'deda' needs config sections {missing}")
    if len(class_names) < 2:
        raise ValueError(
            f"recipe 'deda' recombines a subject with another class's background: the dataset has "
            f"{len(class_names)} class ({class_names})"
        )
    generation = config.generation
    if generation is None:  # decoupling only: num_variants (edited CDPs per image) is unused
        return
    if generation.mode != "sdedit":
        raise ValueError(f"recipe 'deda' edits CDPs with generation.mode sdedit, not {generation.mode!r}")
    if not generation.keep_mask or generation.input_size != "pad":
        raise ValueError(
            "recipe 'deda' keeps an edited CDP's shape and mask: set generation.input_size: pad and "
            f"generation.keep_mask: true (got {generation.input_size!r}, {generation.keep_mask})"
        )
    check_class_keys(generation.superclasses, class_names, "generation.superclasses")


def deda_expansion(config: GenerateConfig, config_hash: str) -> Expansion:
    """Variants 1 (CDP) and 2 (CIP), then one per edited CDP."""
    edits = config.num_variants if config.generation is not None else 0
    return dataclasses.replace(Expansion.from_config(config, config_hash), num_variants=NUM_PARTS + edits)


def deda_stages(
    config: GenerateConfig,
    class_names: list[str],
    config_hash: str,
    done_ids: Collection[str],
    pool: None = None,  # De-DA reads no class pool
) -> list[Stage]:
    check_deda_config(config, class_names)
    seg, decouple = config.segment, config.decouple
    check_class_keys(seg.superclasses, class_names, "segment.superclasses")
    expansion = deda_expansion(config, config_hash)
    stages = opening_stages(config, expansion, done_ids, require_masks=seg.use_dataset_masks)
    if not seg.use_dataset_masks:
        stages.append(segment_stage(seg, expansion))
    stages += [
        Stage(
            "mask_area",
            check_mask_area,
            kwargs={"min_area": decouple.min_area, "max_area": decouple.max_area},
            reads=(schema.IMAGE,),
            only_splits=expansion.expand_splits,
        ),
        expand_stage(expansion, done_ids),
        Stage(
            "decouple",
            Decoupler,
            decouple.stage,
            {"config": decouple},
            reads=(schema.IMAGE, schema.MASK, schema.VARIANT),
            writes=(schema.PART, SOURCE_BOX),
        ),
    ]
    if config.generation is not None:
        stages.append(
            Stage(
                "edit",
                DiffusionGenerator,
                config.generation.stage,
                {"config": config.generation, "class_names": class_names, "pool": None},
                reads=(schema.CLASS_NAME, schema.LABEL, schema.SOURCE_ID, schema.SEED, schema.IMAGE),
                writes=(schema.PROMPT, schema.SOFT_LABEL, PARAMS),
                only_parts=(schema.PART_CDP_EDITED,),
            )
        )
    return stages
