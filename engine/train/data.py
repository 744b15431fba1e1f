"""Training data: the shards' row index (pyarrow, no images) and the Ray Datasets each worker iterates.

How epochs reach the workers. Strategies such as `replace` and `rsp` redraw the rows every epoch, and DDP
needs every rank to take the same number of steps. So the driver computes the whole sampling plan up front
(engine.train.mixing: positions per epoch, shuffled and dealt to ranks in equal parts, a pure function of the
seed) and hands Ray Train one lazy Dataset per (epoch, rank), named `train_e<epoch>_r<rank>`, plus
`val_r<rank>` / `test_r<rank>`; none is split by Ray Train (DataConfig(datasets_to_split=[])). Each is the
encoded row pool filtered to that part of the plan (row numbers and counts, held once in the object store),
then decoded and augmented in `map_batches`, so no row is decoded twice within an epoch and nothing runs
until a worker iterates it. A resumed run simply starts at
a later epoch's datasets, and the plan of every epoch is the same as in an uninterrupted run.

Scale: the pool (encoded bytes) is materialized once in the object store by default; every (epoch, rank)
dataset scans it and keeps its rows, so a scan costs O(pool) but decode costs O(selected rows). With
`data.cache_in_object_store: false` each epoch re-reads the Parquet shards instead.

Determinism. What a rank sees in an epoch is a function of the config and the shard files alone, not of the
cluster's size or of which task finished first: the pool is read one block per file, every dataset runs
with `preserve_order` (`ray.preserve_order`, on by default; without it Ray Data emits blocks in completion
order), the block order and the
workers' local shuffle are seeded by (seed, epoch, rank), and each row's augmentation draws from a torch
generator seeded by (seed, epoch, row id, draw), so it does not depend on which rows share its batch.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import schema
from engine.config import PasteConfig
from engine.methods.recombine import COMPOSITE_PARTS, CipBank, compose
from engine.stages.batch import is_missing
from engine.train.config import AugmentConfig, ShardsConfig, TrainConfig
from engine.train.mixing import (
    RowIndex,
    check_deda_index,
    count_rows,
    deal_to_ranks,
    parts_notes,
    phase1_epochs,
    select_epoch,
)
from engine.train.sources import Source, check_one_dataset, different_datasets, find_sources, merge_sources

INDEX_COLUMNS = (
    schema.ID,
    schema.LABEL,
    schema.CLASS_NAME,
    schema.SPLIT,
    schema.SOURCE_ID,
    schema.RECIPE,
    schema.GROUP,
    schema.SOFT_LABEL,
    schema.PART,
)
# What decode_and_transform needs; the pool also carries `soft_label` (optional there: null = one-hot).
POOL_COLUMNS = (schema.ID, schema.IMAGE, schema.LABEL, schema.GROUP, schema.RECIPE)
EVAL_SPLITS = ("val", "test")
SYNTHETIC = "synthetic"  # working column: 1 for a synthetic row, so workers can count what they saw
TARGET = (
    "target"  # working column: the row's class probabilities (N x num_classes float32), what the loss uses
)
ROW = "row"  # working column: the row's number in the pool, which the epoch plans refer to
DRAW = "draw"  # working column: 0 for a row's first copy in an epoch, 1 for its second (repeats), ...


@dataclass
class TrainingData:
    """Everything the driver knows about the rows before any image is read."""

    files: list[str]
    train: pa.Table  # real + synthetic candidate rows of the train split (INDEX_COLUMNS)
    eval: dict[str, pa.Table]  # val/test: real rows only
    class_names: list[str]
    excluded: dict[str, int] = field(default_factory=dict)  # rows left out, by reason
    sources: list[dict] = field(default_factory=list)  # per data.paths entry: its generation run and rows
    notes: list[str] = field(
        default_factory=list
    )  # what the run report should tell (e.g. a class short of k)

    @cached_property
    def index(self) -> RowIndex:
        return RowIndex.from_table(self.train)

    @property
    def num_soft_rows(self) -> int:
        """Train rows with a soft label (the others train on one-hot targets)."""
        return len(self.train) - self.train[schema.SOFT_LABEL].null_count


def _read_index_file(path: str, source: int) -> pa.Table:
    """The index columns of one (validated) shard, `group` -1 where absent, `soft_label` null where absent
    (schema version 1), plus `_source`: its path's number."""
    names = pq.read_schema(path).names
    table = schema.with_part(
        with_soft_label(pq.read_table(path, columns=[c for c in INDEX_COLUMNS if c in names]))
    )
    if schema.GROUP not in names:
        table = table.append_column(schema.GROUP, pa.array(np.full(len(table), -1, np.int64)))
    table = table.set_column(
        table.schema.get_field_index(schema.GROUP), schema.GROUP, pc.fill_null(table[schema.GROUP], -1)
    )
    table = table.set_column(
        table.schema.get_field_index(schema.LABEL), schema.LABEL, table[schema.LABEL].cast(pa.int64())
    )
    return table.select(list(INDEX_COLUMNS)).append_column("_source", pa.array(np.full(len(table), source)))


def load_training_data(config: ShardsConfig, *, seed: int | None = None) -> TrainingData:
    """Read the index columns of every shard and sort rows into train candidates and real val/test rows.

    Every shard is validated first (engine.train.sources: one error naming each bad file). Several paths
    must come from one dataset (e.g. two generation runs over the same real images, K=2 and K=5); they
    share their real rows, kept from the first path holding each source_id (counted in `excluded` as
    `duplicate_real_rows`). Paths of different datasets are refused, naming the two runs. Synthetic rows
    of a recipe outside `config.recipes` and synthetic rows of val/test (and of `config.extra_test_splits`,
    evaluated like test) are left out (counted too).
    With `config.shots_per_class` (the low-data protocol) the train split keeps k real rows per class drawn
    by `seed` (the training seed; required then) and the synthetic rows of those sources only (`draw_shots`).
    Shards of schema version 1 (no soft_label column) read as one-hot rows.
    """
    if config.shots_per_class is not None and seed is None:
        raise ValueError(
            "data.shots_per_class draws its rows by the training seed: pass load_training_data seed="
        )
    paths = find_sources(config.paths)
    check_one_dataset(paths)
    files = [file for path in paths for file in path.files]
    # Paths in one folder or generation run (e.g. its files listed one by one) are one source of rows.
    units = list(dict.fromkeys(path.unit for path in paths))
    sources = [merge_sources([p for p in paths if p.unit == unit]) for unit in units]
    table = pa.concat_tables(
        _read_index_file(file, units.index(path.unit)) for path in paths for file in path.files
    )
    ids = table[schema.ID]
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        repeated = [c["values"] for c in counts.to_pylist() if c["counts"] > 1][:3]
        holders = sorted(set(table.filter(pc.is_in(ids, pa.array(repeated)))["_source"].to_pylist()))
        raise ValueError(
            f"row ids repeat across the shards (e.g. {repeated}, in {[sources[h].describe() for h in holders]}): "
            "is a path listed twice?"
        )
    check_rows_agree(table, sources)

    recipe = np.asarray(table[schema.RECIPE].to_pylist(), dtype=object)
    split = np.asarray(table[schema.SPLIT].to_pylist(), dtype=object)
    is_real = recipe == schema.RECIPE_REAL
    excluded: dict[str, int] = {}
    # Real rows: first path wins per source_id.
    keep = np.ones(len(table), bool)
    first_source = {}
    for position, (source_id, source) in enumerate(
        zip(table[schema.SOURCE_ID].to_pylist(), table["_source"].to_pylist(), strict=True)
    ):
        if is_real[position]:
            owner = first_source.setdefault(source_id, source)
            keep[position] = owner == source
    excluded["duplicate_real_rows"] = int((~keep).sum())
    if config.recipes is not None:
        unwanted = ~is_real & ~np.isin(recipe, list(config.recipes))
        excluded["recipe_not_selected"] = int((unwanted & keep).sum())
        keep &= ~unwanted
    eval_splits = [*EVAL_SPLITS, *config.extra_test_splits]
    missing = [name for name in config.extra_test_splits if not (split == name).any()]
    if missing:
        raise ValueError(
            f"data.extra_test_splits names {missing}, but no shard row has that split (splits present: "
            f"{sorted(set(split.tolist()))}); the generation run reads the splits in its data.splits"
        )
    eval_synthetic = ~is_real & np.isin(split, eval_splits)
    excluded["synthetic_in_val_test"] = int((eval_synthetic & keep).sum())
    keep &= ~eval_synthetic

    notes: list[str] = []
    if config.shots_per_class is not None:
        shots, notes = draw_shots(table, keep & (split == "train"), config.shots_per_class, seed)
        excluded["few_shot_real_rows"] = int((keep & is_real & ~shots & (split == "train")).sum())
        excluded["few_shot_synthetic_rows"] = int((keep & ~is_real & ~shots & (split == "train")).sum())
        keep &= shots | (split != "train")

    sources_of_kept = table["_source"].to_numpy()[keep]
    table = table.filter(pa.array(keep)).drop_columns(["_source"])
    split = split[keep]
    train = table.filter(pa.array(split == "train"))
    if (
        len(train) == 0
        or (train[schema.RECIPE].to_numpy(zero_copy_only=False) == schema.RECIPE_REAL).sum() == 0
    ):
        raise ValueError(f"no real train rows in {config.paths}")
    per_source = np.bincount(sources_of_kept, minlength=len(sources)) if len(sources_of_kept) else None
    class_names = class_names_of(table)
    check_soft_labels(train, len(class_names))
    return TrainingData(
        files=files,
        train=train,
        eval={name: table.filter(pa.array(split == name)) for name in eval_splits},
        class_names=class_names,
        excluded=excluded,
        sources=[
            {**source.summary(), "rows_used": 0 if per_source is None else int(per_source[number])}
            for number, source in enumerate(sources)
        ],
        notes=notes,
    )


def with_soft_label(table: pa.Table) -> pa.Table:
    """`table` with `soft_label` as schema.SOFT_LABEL_TYPE: all null when the shard has none (version 1)."""
    table = schema.with_soft_label(table)
    column = table.schema.get_field_index(schema.SOFT_LABEL)
    if table.schema.field(column).type == schema.SOFT_LABEL_TYPE:
        return table
    return table.set_column(column, schema.SOFT_LABEL, table[schema.SOFT_LABEL].cast(schema.SOFT_LABEL_TYPE))


def draw_shots(table: pa.Table, candidates: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """The low-data protocol's rows among `candidates` (a mask over `table`'s rows: the train split): per
    label the k real rows whose hash of (seed, source_id) is smallest, so the draw depends on the seed and
    the images, never on file or row order; then every synthetic candidate whose source_id is a kept real
    row's. Returns the mask of kept rows and a note per class with fewer than k real rows (all kept)."""
    real = candidates & (np.asarray(table[schema.RECIPE].to_pylist(), object) == schema.RECIPE_REAL)
    source_ids = np.asarray(table[schema.SOURCE_ID].to_pylist(), object)
    labels = table[schema.LABEL].to_numpy()
    kept_sources: set[str] = set()
    notes = []
    for label, name in enumerate(class_names_of(table)):
        of_class = sorted(source_ids[real & (labels == label)], key=lambda s: (shot_key(seed, s), s))
        if len(of_class) < k:
            notes.append(
                f"data.shots_per_class={k}: class {name!r} (label {label}) has {len(of_class)} real train "
                "rows, all kept"
            )
        kept_sources.update(of_class[:k])
    shots = candidates & np.isin(source_ids, list(kept_sources))
    return shots, notes


def shot_key(seed: int, source_id: str) -> int:
    """A real image's place in the few-shot draw of `seed` (smallest first)."""
    return int.from_bytes(hashlib.sha1(f"{seed}\x1f{source_id}".encode()).digest()[:8], "little")


def check_soft_labels(train: pa.Table, num_classes: int) -> None:
    """Refuse soft labels that are not a distribution over the run's classes, naming a row."""
    soft = train.filter(train[schema.SOFT_LABEL].is_valid())
    if len(soft) == 0:
        return
    entries = pc.list_flatten(soft[schema.SOFT_LABEL])
    rows = pc.list_parent_indices(soft[schema.SOFT_LABEL]).to_numpy()
    labels = pc.struct_field(entries, "label").to_numpy(zero_copy_only=False)
    weights = pc.struct_field(entries, "weight").to_numpy(zero_copy_only=False).astype(np.float64)
    sums = np.bincount(rows, weights=np.nan_to_num(weights, nan=-1.0), minlength=len(soft))
    bad_entries = (labels < 0) | (labels >= num_classes) | ~(weights >= 0)
    bad = (np.abs(sums - 1.0) > 1e-3) | np.isin(np.arange(len(soft)), rows[bad_entries])
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{int(bad.sum())} train rows have a soft_label that is not a distribution over the "
            f"{num_classes} classes (labels 0..{num_classes - 1}, weights >= 0 summing to 1), e.g. row "
            f"{soft[schema.ID][first].as_py()!r}: {soft[schema.SOFT_LABEL][first].as_py()}"
        )


def soft_targets(labels: np.ndarray, soft_labels: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Class-probability targets (N x num_classes float32): one-hot on `label` for a row whose soft label
    is missing (None or NaN), the soft label's weights otherwise. `soft_labels` values are as Ray hands
    them over: None, or a list/array of {"label", "weight"} dicts."""
    labels = np.asarray(labels, np.int64)
    targets = np.zeros((len(labels), num_classes), np.float32)
    targets[np.arange(len(labels)), labels] = 1.0
    for row, value in enumerate([] if soft_labels is None else soft_labels):
        if is_missing(value):
            continue
        targets[row] = 0.0
        for entry in value:
            targets[row, int(entry["label"])] += float(entry["weight"])
    return targets


def check_rows_agree(table: pa.Table, sources: list[Source]) -> None:
    """Refuse two paths whose rows show different datasets: a label or class named differently, another
    set of classes, or one real image (source_id) with another split, label, class or group."""
    columns = (schema.SPLIT, schema.LABEL, schema.CLASS_NAME, schema.GROUP)
    pairs = table.group_by(["_source", schema.LABEL, schema.CLASS_NAME]).aggregate([]).to_pylist()
    classes: dict[int, list] = {}
    for pair in sorted(pairs, key=lambda p: (p["_source"], p[schema.LABEL], p[schema.CLASS_NAME])):
        classes.setdefault(pair["_source"], []).append((pair[schema.LABEL], pair[schema.CLASS_NAME]))
    numbers = sorted(classes)
    for number in numbers[1:]:
        if classes[number] != classes[numbers[0]]:
            first, other = classes[numbers[0]], classes[number]
            raise ValueError(
                different_datasets(
                    sources[numbers[0]],
                    sources[number],
                    f"their classes differ: {[n for _, n in first]} vs {[n for _, n in other]}"
                    if [n for _, n in first] != [n for _, n in other]
                    else f"their labels differ: {first} vs {other}",
                )
            )
    real = table.filter(pc.equal(table[schema.RECIPE], schema.RECIPE_REAL))
    seen: dict[str, tuple[int, tuple]] = {}
    for row in real.select([schema.SOURCE_ID, "_source", *columns]).to_pylist():
        facts = tuple(row[c] for c in columns)
        owner, known = seen.setdefault(row[schema.SOURCE_ID], (row["_source"], facts))
        if owner != row["_source"] and known != facts:
            described = ", ".join(
                f"{c} {a!r} vs {b!r}" for c, a, b in zip(columns, known, facts, strict=True) if a != b
            )
            raise ValueError(
                different_datasets(
                    sources[owner],
                    sources[row["_source"]],
                    f"their image {row[schema.SOURCE_ID]!r} has {described}",
                )
            )


def class_names_of(table: pa.Table) -> list[str]:
    """Names by label, from the rows (a label without rows is named class_<n>); conflicting names fail."""
    pairs = (
        table.select([schema.LABEL, schema.CLASS_NAME])
        .group_by([schema.LABEL, schema.CLASS_NAME])
        .aggregate([])
    )
    names: dict[int, str] = {}
    for pair in pairs.to_pylist():
        label, name = pair[schema.LABEL], pair[schema.CLASS_NAME]
        if label < 0:
            raise ValueError(f"labels must be non-negative, got {label}")
        if names.setdefault(label, name) != name:
            raise ValueError(f"label {label} has two class names: {names[label]!r} and {name!r}")
    return [names.get(label, f"class_{label}") for label in range(max(names) + 1)]


# ---------------------------------------------------------------- the plan


def plan_epochs(data: TrainingData, config: TrainConfig) -> list[list[np.ndarray]]:
    """Positions into `data.index` per epoch and rank: the strategy's selection, shuffled and dealt. Notes on
    De-DA's parts go to `data.notes`."""
    index = data.index
    if config.mix.strategy == "deda":
        check_deda_index(index)
    data.notes += parts_notes(index, config.mix.strategy, data.class_names)
    world_size = config.scaling.num_workers
    plan = []
    for epoch in range(config.epochs):
        positions = select_epoch(index, config.mix, seed=config.seed, epoch=epoch, num_epochs=config.epochs)
        plan.append(
            deal_to_ranks(
                positions, rng=np.random.default_rng([config.seed, 2, epoch]), world_size=world_size
            )
        )
    return plan


def summarize_plan(data: TrainingData, plan: list[list[np.ndarray]], config: TrainConfig) -> list[dict]:
    index = data.index
    boundary = phase1_epochs(config.mix, config.epochs)
    return [
        {
            "epoch": epoch,
            "phase": 1 if epoch < boundary else 2,
            "rows_per_rank": len(ranks[0]),
            **count_rows(index, np.concatenate(ranks)),
        }
        for epoch, ranks in enumerate(plan)
    ]


# ---------------------------------------------------------------- Ray Data


def _resolve(value):
    """Plans travel as object refs (one copy in the object store, not one per dataset and worker)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def number_rows(batch: pa.Table, ids) -> pa.Table:
    """Keep the rows whose id is in `ids` (sorted, unique; or a ref to it) and add `row`, the id's position
    in `ids`, which plans refer to; a null group becomes -1 and a missing soft_label column (schema version 1)
    an all-null one."""
    ids = _resolve(ids)
    found = pc.index_in(batch[schema.ID], value_set=pa.array(ids, pa.string()))
    found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(found >= 0)
    out = with_soft_label(batch.take(pa.array(keep)))
    group = out.schema.get_field_index(schema.GROUP)
    out = out.set_column(group, schema.GROUP, pc.fill_null(out[schema.GROUP], -1).cast(pa.int64()))
    return out.append_column(ROW, pa.array(found[keep].astype(np.int64)))


def take_planned(batch: pa.Table, plan) -> pa.Table:
    """The rows whose `row` is in the plan `(rows, counts)` (rows sorted, unique; or a ref to the pair),
    each repeated counts[i] times."""
    rows, counts = _resolve(plan)
    if len(rows) == 0:
        return batch.slice(0, 0).append_column(DRAW, pa.array([], pa.int64()))
    numbers = batch[ROW].to_numpy()
    at = np.minimum(np.searchsorted(rows, numbers), len(rows) - 1)
    repeats = np.where(rows[at] == numbers, counts[at], 0)
    # Copies of a row are adjacent: draw = position within its run of copies (own augmentation seed each).
    starts = np.repeat(np.cumsum(repeats) - repeats, repeats)
    draw = np.arange(int(repeats.sum())) - starts
    taken = batch.take(pa.array(np.repeat(np.arange(len(batch)), repeats)))
    return taken.append_column(DRAW, pa.array(draw.astype(np.int64)))


def row_seed(seed: int, epoch: int, row_id: str, draw: int = 0) -> int:
    """The augmentation seed of one copy of a row in an epoch: a pure function of its arguments."""
    digest = hashlib.sha1(f"{seed}\x1f{epoch}\x1f{row_id}\x1f{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def decode_and_transform(
    batch: dict[str, np.ndarray],
    *,
    train: bool,
    image_size: int,
    augment: dict,
    seed: int,
    epoch: int,
    num_classes: int | None = None,
    recombine: dict | None = None,
) -> dict[str, np.ndarray]:
    """Encoded rows -> model inputs: decode, then RandomResizedCrop + flip (+ RandAugment) for training or
    resize + center crop for evaluation, then normalize.

    Reads `image`, `label`, `group`, `recipe`, `id` and `draw` (0 when absent); writes `image`
    (N x 3 x S x S float32), `label`, `group` and `synthetic` (int8), and with `num_classes` also `target`
    (N x num_classes float32, `soft_targets` of `label` and `soft_label`, one-hot where that is null or
    absent), which the training loss uses. Each row's augmentation draws from
    torch's generator seeded by `row_seed(seed, epoch, id, draw)`, so a rerun draws the same crops whatever
    the batching.

    With `recombine` ({"bank": a CipBank or its ref, "paste": PasteConfig fields}: mix.strategy deda), a row
    whose `part` is a CDP is first pasted onto a CIP of another class (engine.methods.recombine), drawn from a
    generator seeded by the same row seed.
    """
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    schema.require_columns(batch, POOL_COLUMNS, "decode_and_transform")
    options = AugmentConfig(**augment)
    if train:
        steps = [
            v2.RandomResizedCrop(
                image_size, scale=options.crop_scale, ratio=options.crop_ratio, antialias=True
            )
        ]
        if options.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if options.auto_augment:
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(options.auto_augment)))
        if options.rand_augment:
            steps.append(
                v2.RandAugment(num_ops=options.rand_augment_num_ops, magnitude=options.rand_augment_magnitude)
            )
    else:
        steps = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    transform = v2.Compose(
        [*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(options.mean), list(options.std))]
    )
    draws = batch[DRAW] if DRAW in batch else np.zeros(len(batch[schema.ID]), np.int64)
    bank = _resolve(recombine["bank"]) if recombine else None
    paste = PasteConfig(**recombine["paste"]) if recombine else None
    parts = batch.get(schema.PART) if recombine else None
    images = []
    for i, (data, row_id, draw) in enumerate(zip(batch[schema.IMAGE], batch[schema.ID], draws, strict=True)):
        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB"))
        this_seed = row_seed(seed, epoch, str(row_id), int(draw))
        if bank is not None and parts is not None and parts[i] in COMPOSITE_PARTS:
            mask = cv2.imdecode(np.frombuffer(batch[schema.MASK][i], np.uint8), cv2.IMREAD_GRAYSCALE)
            label = int(batch[schema.LABEL][i])
            array, _ = compose(array, mask, label, bank, np.random.default_rng(this_seed), paste)
        if train:
            torch.manual_seed(this_seed)
        images.append(transform(torch.from_numpy(array).permute(2, 0, 1)))
    out = {
        "image": torch.stack(images).numpy()
        if images
        else np.zeros((0, 3, image_size, image_size), np.float32),
        "label": np.asarray(batch[schema.LABEL], np.int64),
        "group": np.asarray(batch[schema.GROUP], np.int64),
        SYNTHETIC: (np.asarray(batch[schema.RECIPE]) != schema.RECIPE_REAL).astype(np.int8),
    }
    if num_classes is not None:
        out[TARGET] = soft_targets(batch[schema.LABEL], batch.get(schema.SOFT_LABEL), num_classes)
    return out


def read_pool(pool_ids: np.ndarray, data: TrainingData, config: TrainConfig):
    """The encoded rows any epoch or eval split may use, numbered by `pool_ids`, as one Ray Dataset
    (materialized if configured)."""
    import ray
    import ray.data

    task_cpus = config.ray.task_num_cpus
    # One read task per file: the pool's blocks are the same on any cluster, so are the seeded block orders.
    pool = ray.data.read_parquet(data.files, num_cpus=task_cpus, override_num_blocks=len(data.files))
    pool.context.execution_options.preserve_order = config.ray.preserve_order  # this dataset's own context
    # Only runs with soft rows read the column; files without it (schema version 1) then read as null.
    columns = [*POOL_COLUMNS, *([schema.SOFT_LABEL] if data.num_soft_rows else [])]
    if config.mix.strategy == "deda":  # the CDPs' masks and parts, for the composites
        columns += [schema.MASK, schema.PART]
    pool = pool.select_columns(columns).map_batches(
        number_rows,
        fn_kwargs={"ids": ray.put(pool_ids)},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=task_cpus,
    )
    return pool.materialize() if config.data.cache_in_object_store else pool


def rows_dataset(
    pool,
    rows: np.ndarray,
    *,
    config: TrainConfig,
    train: bool,
    epoch: int,
    num_classes: int | None = None,
    recombine: dict | None = None,
):
    """`pool` restricted to the row numbers `rows` (repeats kept), decoded and transformed for training or
    evaluation; with `num_classes` each row also gets its class-probability `target`."""
    import ray

    plan = ray.put(np.unique(rows, return_counts=True))
    task_cpus = config.ray.task_num_cpus
    ds = pool.randomize_block_order(seed=config.seed * 100_003 + epoch) if train else pool
    ds = ds.map_batches(
        take_planned, fn_kwargs={"plan": plan}, batch_format="pyarrow", batch_size=None, num_cpus=task_cpus
    ).map_batches(
        decode_and_transform,
        fn_kwargs={
            "train": train,
            "image_size": config.data.image_size,
            "augment": config.augment.model_dump(),
            "seed": config.seed,
            "epoch": epoch,
            "num_classes": num_classes,
            "recombine": recombine,
        },
        batch_format="numpy",
        batch_size=config.data.decode_batch_size,
        num_cpus=task_cpus,
    )
    # Ray Train replaces this with its own options: engine.train.runner.fit sets it there too.
    ds.context.execution_options.preserve_order = config.ray.preserve_order
    return ds


def build_datasets(data: TrainingData, plan: list[list[np.ndarray]], config: TrainConfig) -> dict:
    """The `datasets` dict for the TorchTrainer (names in the module docstring)."""
    eval_ids = {split: np.asarray(t[schema.ID].to_pylist(), object) for split, t in data.eval.items()}
    train_ids = np.asarray(data.train[schema.ID].to_pylist(), object)
    pool_ids = np.unique(np.concatenate([train_ids, *eval_ids.values()]))
    pool = read_pool(pool_ids, data, config)
    train_rows = np.searchsorted(pool_ids, train_ids)
    recombine = None
    if config.mix.strategy == "deda":
        import ray

        cips = data.index.ids[data.index.part_positions(schema.PART_CIP)]
        bank = ray.put(CipBank.read(data.files, cips))  # once per run: every decode task reads this copy
        recombine = {"bank": bank, "paste": config.mix.deda_paste.model_dump()}
    datasets = {}
    for epoch, ranks in enumerate(plan):
        for rank, positions in enumerate(ranks):
            datasets[train_key(epoch, rank)] = rows_dataset(
                pool,
                train_rows[positions],
                config=config,
                train=True,
                epoch=epoch,
                num_classes=len(data.class_names),
                recombine=recombine,
            )
    world_size = config.scaling.num_workers
    for split, ids in eval_ids.items():
        rows = np.searchsorted(pool_ids, ids)
        for rank in range(world_size):
            # Eval rows are dealt without dropping any: ranks may differ by one row, eval has no DDP step.
            datasets[eval_key(split, rank)] = rows_dataset(
                pool, rows[rank::world_size], config=config, train=False, epoch=0
            )
    return datasets


def train_key(epoch: int, rank: int) -> str:
    return f"train_e{epoch}_r{rank}"


def eval_key(split: str, rank: int) -> str:
    return f"{split}_r{rank}"
