"""The recipe opening: the first stages of every recipe, before anything generates, and the stages several
recipes share (`segment_stage`, `expand_stage`).

skip_done (drop sources whose every output row is already written: a resumed run) -> read_bytes (an image
folder's files, read only for the sources still owed rows) -> decode (bytes -> validated RGB arrays and
masks; bad images become error rows). See `engine.output` for why this order makes resume cheap.
"""

from __future__ import annotations

from collections.abc import Collection

from actors.segmenter import DETECT_SCORE, Segmenter
from engine import schema
from engine.config import GenerateConfig, SegmentConfig
from engine.readers import FILE_COLUMNS, defers_bytes, read_file_bytes
from engine.stages.decode import decode_images
from engine.stages.expand import Expansion, expand_variants, skip_completed_sources
from engine.stages.loop import Stage


def opening_stages(
    config: GenerateConfig, expansion: Expansion, done_ids: Collection[str], require_masks: bool = False
) -> list[Stage]:
    """`require_masks`: a row without a dataset mask is an error (recipes that use the dataset's masks)."""
    stages = [
        Stage("skip_done", skip_completed_sources, kwargs={"expansion": expansion, "done_ids": done_ids})
    ]
    # An image folder's files are read right after `skip_done` (`read_source(with_bytes=False)`): a resumed
    # run reads only the sources it still owes rows for, not every done one (at ImageNet's 1.28 M images of
    # ~110 KB, half a run is about 70 GB read only to be dropped). Parquet rows carry their bytes.
    if defers_bytes(config.data):
        stages.append(Stage("read_bytes", read_file_bytes, reads=FILE_COLUMNS))
    decode_kwargs = {
        "max_pixels": config.data.max_pixels,
        "min_side": config.data.min_side,
        "require_masks": require_masks,
    }
    stages.append(Stage("decode", decode_images, kwargs=decode_kwargs))
    return stages


def segment_stage(config: SegmentConfig, expansion: Expansion) -> Stage:
    """GroundingDINO + SAM on the real rows of the expanded splits (their subjects are what gets reused)."""
    return Stage(
        "segment",
        Segmenter,
        config.stage,
        {"config": config},
        reads=(schema.IMAGE, schema.CLASS_NAME),
        writes=(schema.MASK, schema.BBOX, DETECT_SCORE),
        only_splits=expansion.expand_splits,
    )


def expand_stage(expansion: Expansion, done_ids: Collection[str]) -> Stage:
    """Each real row -> its real row and its synthetic rows (engine.stages.expand), minus those written."""
    return Stage(
        "expand",
        expand_variants,
        kwargs={"expansion": expansion, "done_ids": done_ids},
        reads=(schema.SOURCE_ID, schema.SPLIT),
    )
