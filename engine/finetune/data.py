"""The driver's side of fine-tuning data: real rows through the project's readers (a dataset, or a generation
run's shards), decoded and cropped to the training resolution, with every class checked to have usable images
before any worker starts.

The check reads and decodes every row once. The usable rows are then dealt to the workers round-robin in
source-id order, and each worker gets a dataset of its own rows (`rank_key(rank)`) that it streams through its
sample buffer (engine.finetune.stream). A source that fits the workers' buffers (at most `buffer_rows` x
workers rows: few-shot sets) keeps its decoded rows from the check in the object store, one copy, and each
worker reads its share from there once. A larger one keeps only each row's id, label, caption and why it is
not usable; a worker's dataset then reads and decodes its rows again each time it streams an epoch of them,
and no image is held anywhere between epochs.

Rows of a worker's dataset: `pixels` (resolution x resolution x 3 uint8), `label` (int64), `caption` (str:
the row's caption from `full.captions_file`, or for `method: mvc` the `caption` column of a caption run's
shards; "" for none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import schema
from engine.readers.captions import read_captions_file
from engine.stages.batch import Batch

PIXELS = "pixels"
CAPTION = schema.CAPTION
SKIP = "skip"  # working column: "" for a usable row, else why it is not used (counted in finetune.json)

# The 27 prompt templates of the textual-inversion paper's code (diffusers' textual_inversion example).
IMAGENET_TEMPLATES_SMALL = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


SUBJECT_FILL = 127  # the background of a subject-only crop: mid gray


def decode_for_training(
    batch: Batch,
    resolution: int,
    max_pixels: int,
    min_side: int,
    subject_only: bool = False,
    captions: dict[str, str] | None = None,
) -> Batch:
    """image_bytes -> `pixels` (shorter side resized to `resolution`, center crop), `label`; a row that is
    not usable keeps a black image and says why in `skip` (counted by the driver, then dropped): "no_label",
    a decode failure's reason ("decode", "too_large", "mask_size", ...), "no_mask" or "empty_mask".

    `subject_only` (De-DA's isolated subjects): the image is cut to its mask's bounding box, everything off
    the mask is mid gray, and the crop is padded to a square (the subject is never cropped away); a row
    without a mask, or with an empty one, is not usable."""
    from PIL import Image

    from engine.stages.batch import is_missing
    from engine.stages.decode import RowError, decode_image, decode_mask

    n = len(batch[schema.IMAGE_BYTES])
    masks = batch.get(schema.MASK_BYTES, np.full(n, None, dtype=object))
    pixels = np.zeros((n, resolution, resolution, 3), dtype=np.uint8)
    skip = np.full(n, "", dtype=object)
    for i in range(n):
        if batch[schema.LABEL][i] < 0:
            skip[i] = "no_label"
            continue
        try:
            rgb = decode_image(batch[schema.IMAGE_BYTES][i], max_pixels, min_side)
            if subject_only:
                if is_missing(masks[i]):
                    skip[i] = "no_mask"
                    continue
                rgb = subject_square(rgb, decode_mask(masks[i], rgb.shape[:2], max_pixels))
                if rgb is None:
                    skip[i] = "empty_mask"
                    continue
        except RowError as err:
            skip[i] = err.reason
            continue
        image = Image.fromarray(rgb)
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        pixels[i] = np.asarray(image.crop((left, top, left + resolution, top + resolution)))
    ids = batch.get(schema.SOURCE_ID, np.full(n, "", dtype=object))
    if CAPTION in batch:  # a caption run's shards: the row's own caption (null: none)
        row_captions = ["" if is_missing(c) else str(c).strip() for c in batch[CAPTION]]
    else:
        row_captions = [(captions or {}).get(str(i), "") for i in ids]
    return {
        PIXELS: pixels,
        schema.LABEL: np.asarray(batch[schema.LABEL], dtype=np.int64),
        CAPTION: np.array(row_captions, dtype=object),
        schema.SOURCE_ID: np.asarray(ids, dtype=object),
        SKIP: skip,
    }


def subject_square(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The mask's bounding box of `rgb`, off-mask pixels SUBJECT_FILL, padded to a square; None: empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    crop = np.where(mask[top:bottom, left:right, None] > 0, rgb[top:bottom, left:right], SUBJECT_FILL)
    side = max(crop.shape[:2])
    square = np.full((side, side, 3), SUBJECT_FILL, dtype=np.uint8)
    y, x = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
    return square


@dataclass
class TrainingRows:
    # The decoded rows from the check, materialized (`decoded`: a source that fits the buffers), else the
    # source rows, lazy; an image folder's carry paths, not bytes (`deferred`).
    source: object
    decoded: bool
    deferred: bool
    decode: dict  # decode_for_training's keyword arguments
    class_names: list[str]
    images_per_class: dict[str, int]  # usable rows per class
    skipped: dict[str, int]  # rows not used, by reason (see decode_for_training)
    rank_ids: list[np.ndarray]  # the usable source ids each worker trains on, sorted
    uncaptioned: int | None = None  # usable rows the captions file had no caption for (None: no file)


def rank_key(rank: int) -> str:
    return f"train_r{rank}"


def require_caption_column(data) -> None:
    """Raise a ValueError naming the shard files of `data` (a `format: shards` section) that have no `caption`
    column: MVC trains on a caption run's rows, and a run without the caption stage (or one written before
    schema 3) has none to mix."""
    import pyarrow.parquet as pq

    from engine.train.sources import find_sources

    (source,) = find_sources([data.path])
    missing = [f for f in source.files if schema.CAPTION not in pq.read_schema(f).names]
    if missing:
        raise ValueError(
            f"method mvc needs a caption run's shards, but {len(missing)} of {len(source.files)} shard files in "
            f"{data.path} have no `{schema.CAPTION}` column (e.g. {missing[0]}): point data.path at the "
            "<out>/data of a run with the caption stage"
        )


def read_run_shards(data, ray_data, num_cpus: float, with_captions: bool = False):
    """A generation run's real rows (`recipe: real`) of `data.splits` as source rows (image_bytes, mask_bytes,
    label, and with `with_captions` the caption), and its class names. The shards are validated as training
    validates them (engine.train.sources: one error naming every unusable file); synthetic rows are not read
    (Parquet filter)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.readers import huggingface_features
    from engine.train.sources import find_sources

    (source,) = find_sources([data.path])
    features = huggingface_features(pq.read_schema(source.files[0]))
    class_names = (features.get(schema.LABEL) or {}).get("names")
    if not class_names:  # shards without the ClassLabel metadata: the names their rows pair with labels
        index = pa.concat_tables(
            pq.read_table(f, columns=[schema.LABEL, schema.CLASS_NAME]) for f in source.files
        )
        pairs = dict(zip(index[schema.LABEL].to_pylist(), index[schema.CLASS_NAME].to_pylist(), strict=True))
        class_names = [pairs.get(label, "") for label in range(max(pairs, default=-1) + 1)]
    from ray.data.expressions import col

    # Only the columns decode reads, and only real rows of the splits (Ray pushes the filter into the read).
    real = (col(schema.RECIPE) == schema.RECIPE_REAL) & col(schema.SPLIT).is_in(list(data.splits))
    columns = [schema.IMAGE, schema.MASK, schema.LABEL, schema.RECIPE, schema.SPLIT, schema.SOURCE_ID]
    if with_captions:
        columns.append(schema.CAPTION)
    rows = ray_data.read_parquet(source.files, columns=columns, num_cpus=num_cpus).filter(expr=real)
    return rows.map_batches(_as_source_rows, batch_format="numpy", num_cpus=num_cpus), list(class_names)


def _as_source_rows(batch: Batch) -> Batch:
    """Output columns -> the readers' source columns that decode_for_training reads."""
    from engine.stages.batch import is_missing

    masks = np.empty(len(batch[schema.MASK]), dtype=object)
    masks[:] = [None if is_missing(m) else bytes(m) for m in batch[schema.MASK]]
    rows = {
        schema.IMAGE_BYTES: batch[schema.IMAGE],
        schema.MASK_BYTES: masks,
        schema.LABEL: np.asarray(batch[schema.LABEL], dtype=np.int64),
        schema.SOURCE_ID: batch[schema.SOURCE_ID],
    }
    if schema.CAPTION in batch:
        rows[CAPTION] = np.array(
            ["" if is_missing(c) else str(c) for c in batch[schema.CAPTION]], dtype=object
        )
    return rows


def load_training_rows(config, ray_data) -> TrainingRows:
    """The usable rows (checked by decoding each once), class names, images per class, skipped rows by
    reason, and each worker's share. Raises ValueError naming every class without a usable image (its token
    or LoRA prompt would never be trained)."""
    from engine.readers import defers_bytes, inspect_source, read_source

    mvc = config.method == "mvc"
    if config.data.format == "shards":
        source, class_names = read_run_shards(
            config.data, ray_data, config.ray.task_num_cpus, with_captions=mvc
        )
        deferred = False
    else:
        info = inspect_source(config.data)
        deferred = defers_bytes(config.data)
        source, class_names = read_source(
            config.data, ray_data, num_cpus=config.ray.task_num_cpus, info=info, with_bytes=not deferred
        )
    captions = None
    if config.method == "full" and config.full.captions_file:
        captions = read_captions_file(config.full.captions_file, "full.captions_file")
    decode = {
        "resolution": config.resolution,
        "max_pixels": config.data.max_pixels,
        "min_side": config.data.min_side,
        "subject_only": config.subject_only,
        "captions": captions,
    }
    # A source that fits the workers' buffers keeps its pixels from this pass (one decode in all).
    held = source_rows_at_most(config, source) <= config.buffer_rows * config.scaling.num_workers
    checked = _decoded(
        source, deferred, decode, config.ray.task_num_cpus, _decoded_rows if held else _row_facts
    ).materialize()
    labels = checked.select_columns([schema.SOURCE_ID, schema.LABEL, CAPTION, SKIP]).to_pandas()
    usable = labels[SKIP] == ""
    # Rows without a caption of their own train on the class prompt: counted, as a captioner's misses are.
    uncaptioned = int((labels[usable][CAPTION] == "").sum()) if captions is not None or mvc else None
    if mvc and uncaptioned == int(usable.sum()):
        raise ValueError(
            f"method mvc: no usable real row of {config.data.path} (splits {config.data.splits}) has a caption: "
            "its `caption` column is empty (was the caption stage on in that run?)"
        )
    counts = labels[usable][schema.LABEL].value_counts().to_dict()
    per_class = {name: int(counts.get(label, 0)) for label, name in enumerate(class_names)}
    skipped = {str(reason): int(n) for reason, n in sorted(labels[~usable][SKIP].value_counts().items())}
    empty = [name for name, count in per_class.items() if count == 0]
    if empty:
        raise ValueError(
            f"classes {empty} have no usable images in {config.data.path} (splits {config.data.splits}"
            + (", real rows" if config.data.format == "shards" else "")
            + "): every class needs at least one image that decodes"
            + (" and has a non-empty mask (subject_only)" if config.subject_only else "")
            + (f"; rows not used: {skipped}" if skipped else "")
        )
    ids = np.array(sorted(labels[usable][schema.SOURCE_ID].astype(str)), dtype=object)
    workers = config.scaling.num_workers
    if len(ids) < workers:
        raise ValueError(
            f"{len(ids)} usable rows for scaling.num_workers={workers}: every worker needs at least one row"
        )
    rank_ids = [ids[rank::workers] for rank in range(workers)]
    return TrainingRows(
        checked if held else source,
        held,
        deferred,
        decode,
        class_names,
        per_class,
        skipped,
        rank_ids,
        uncaptioned,
    )


def source_rows_at_most(config, source) -> int:
    """An upper bound of the rows the source reads, without reading them: the dataset's listed images, or
    the rows of a run's shard files (synthetic rows and other splits included)."""
    import pyarrow.parquet as pq

    from engine.readers import inspect_source
    from engine.train.sources import find_sources

    if config.data.format == "shards":
        (found,) = find_sources([config.data.path])
        return sum(pq.ParquetFile(f).metadata.num_rows for f in found.files)
    return inspect_source(config.data).num_images


def rank_datasets(rows: TrainingRows, num_cpus: float) -> dict:
    """One lazy dataset per worker (`rank_key`): its rows, read and decoded each time it is iterated."""
    import ray

    datasets = {}
    for rank, ids in enumerate(rows.rank_ids):
        mine = rows.source.map_batches(
            _keep_ids, fn_kwargs={"ids": ray.put(ids)}, batch_format="pyarrow", num_cpus=num_cpus
        )
        if rows.decoded:  # made here, before the workers start: they then only read blocks
            datasets[rank_key(rank)] = mine.map_batches(
                _usable_rows, batch_format="numpy", num_cpus=num_cpus
            ).materialize()
        else:
            datasets[rank_key(rank)] = _decoded(mine, rows.deferred, rows.decode, num_cpus, _usable_rows)
    return datasets


def _decoded(source, deferred: bool, decode: dict, num_cpus: float, then):
    """`source` decoded for training (its bytes read first when `deferred`), then `then` on each batch."""
    from engine.readers import read_file_bytes

    if deferred:
        source = source.map_batches(read_file_bytes, batch_format="numpy", num_cpus=num_cpus)
    return source.map_batches(
        _decode_then, fn_kwargs={"decode": decode, "then": then}, batch_format="numpy", num_cpus=num_cpus
    )


def _decode_then(batch: Batch, decode: dict, then) -> Batch:
    return then(decode_for_training(batch, **decode))


def _row_facts(batch: Batch) -> Batch:
    """What the driver's check keeps of a decoded row of a source too large to hold: not its pixels."""
    return {name: batch[name] for name in (schema.SOURCE_ID, schema.LABEL, CAPTION, SKIP)}


def _decoded_rows(batch: Batch) -> Batch:
    """A decoded row of a source the buffers hold, as it is."""
    return batch


def _keep_ids(batch, ids):
    """The rows of a pyarrow batch whose source id is in `ids` (a ref to a sorted array)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray

    ids = ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids
    return batch.filter(pc.is_in(batch[schema.SOURCE_ID], value_set=pa.array(ids, pa.string())))


def _usable_rows(batch: Batch) -> Batch:
    keep = np.asarray(batch[SKIP]) == ""
    return {
        PIXELS: batch[PIXELS][keep],
        schema.LABEL: batch[schema.LABEL][keep],
        CAPTION: batch[CAPTION][keep],
    }
