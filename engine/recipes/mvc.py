"""MVC (Dataset Augmentation by Mixing Visual Concepts): new images from mixed caption embeddings.

opening (skip done, read, decode) -> expand x K -> mvc (actors.mvc_generator: Algorithm 1 on the class's
caption embeddings -> the fine-tuned image-conditioned pipeline, a real image of the class as condition; or a
caption -> the pre-trained text-to-image pipeline).

Its inputs come from two earlier jobs: a caption run (recipe `caption`), whose captions of the train split are
read here on the driver into per-class caption pools (`mvc.captions`), and `synthray finetune` with method
`mvc` (the image-conditioned pipeline, `mvc.model`). The condition images come from a class pool sampled from
the source before the stages run (engine.stages.class_pools).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads

from actors.mvc_generator import PARAMS, UNMIXED, MvcGenerator
from engine import schema, storage
from engine.config import GenerateConfig
from engine.output.shards import shard_files
from engine.recipes.opening import expand_stage, opening_stages
from engine.stages.class_pools import ClassPool, PoolSpec
from engine.stages.expand import Expansion
from engine.stages.loop import Stage


def mvc_pool(config: GenerateConfig) -> PoolSpec | None:
    """The fine-tuned generator's condition images: real images of each class."""
    if config.mvc is None or config.mvc.pretrained_share >= 1:
        return None
    splits = tuple(config.data.expand_splits) if config.data.expand_splits is not None else ("train",)
    return PoolSpec(max_per_class=config.mvc.pool_size, splits=splits)


@functools.cache  # the stages are built for the checks and again for each attempt: read once
def read_caption_pools(data_dir: str, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """class name -> the captions of its rows in `splits`, by row id (a fixed order for the row seeds)."""
    files = shard_files(data_dir)
    if not files:
        raise ValueError(f"mvc.captions: no shards in {data_dir} (the data folder of a caption run)")
    fs, _ = storage.filesystem(data_dir)
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    if schema.CAPTION not in dataset.schema.names:
        raise ValueError(
            f"mvc.captions: the shards in {data_dir} have no caption column (run recipe caption)"
        )
    table = dataset.to_table(
        columns=[schema.ID, schema.CLASS_NAME, schema.CAPTION],
        filter=pc.field(schema.SPLIT).isin(list(splits)) & pc.field(schema.CAPTION).is_valid(),
    ).sort_by(schema.ID)
    pools: dict[str, list[str]] = {}
    for name, caption in zip(
        table[schema.CLASS_NAME].to_pylist(), table[schema.CAPTION].to_pylist(), strict=True
    ):
        pools.setdefault(name, []).append(caption)
    return pools


def check_caption_classes(pools: dict[str, list[str]], class_names: list[str], data_dir: str) -> None:
    missing = sorted(set(class_names) - set(pools))
    extra = sorted(set(pools) - set(class_names))
    if missing or extra:
        raise ValueError(
            f"mvc.captions ({data_dir}) is not a caption run of this dataset: classes without captions "
            f"{missing[:8]}, captioned classes not in the dataset {extra[:8]}"
        )


def check_image_conditioned(config: GenerateConfig) -> None:
    """A local fine-tuned pipeline whose UNet takes 4 channels is a config error before Ray starts (a hub id
    is checked when the actor loads it)."""
    ref = config.mvc.model
    if ref is None or not ref.is_local():
        return
    unet_config = Path(ref.id).expanduser() / "unet" / "config.json"
    if unet_config.is_file():
        channels = json.loads(unet_config.read_text()).get("in_channels")
        if channels != 8:
            raise ValueError(
                f"mvc.model {ref.id}: its UNet takes {channels} input channels; the image-conditioned "
                "generator needs 8 (fine-tune it with synthray finetune, method mvc)"
            )


def mvc_stages(
    config: GenerateConfig,
    class_names: list[str],
    config_hash: str,
    done_ids: Collection[str],
    pool: ClassPool | None = None,
) -> list[Stage]:
    if config.mvc is None:
        raise ValueError("recipe 'mvc' needs the config section ['mvc']")
    check_image_conditioned(config)
    expansion = Expansion.from_config(config, config_hash)
    splits = expansion.expand_splits or ("train",)
    captions = read_caption_pools(config.mvc.captions, tuple(splits))
    check_caption_classes(captions, class_names, config.mvc.captions)
    return [
        *opening_stages(config, expansion, done_ids),
        expand_stage(expansion, done_ids),
        Stage(
            "mvc",
            MvcGenerator,
            config.mvc.stage,
            {"config": config.mvc, "class_names": class_names, "pool": pool, "captions": captions},
            reads=(schema.CLASS_NAME, schema.SOURCE_ID, schema.SEED),
            writes=(schema.PROMPT, PARAMS, UNMIXED),
            only_synthetic=True,
            counts=(UNMIXED,),
        ),
    ]
