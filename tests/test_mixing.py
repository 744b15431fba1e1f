"""Sampling rules of the utilization strategies, the row index and the metrics: no Ray, no torch.

The data is honest: toy-dataset images written as shards in OUTPUT_SCHEMA, with "synthetic" rows made the
way AGA makes them (the real subject, cut out with the dataset's mask, on another background).
`write_toy_shards` is also what tests/test_train.py trains on.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from engine import schema
from engine.config import load_config
from engine.stages.batch import object_array
from engine.tiny.toy_dataset import BACKGROUND_DRAWERS, make_toy_dataset
from engine.train.config import MixConfig, ShardsConfig, SweepConfig, TrainConfig
from engine.train.data import (
    check_soft_labels,
    load_training_data,
    number_rows,
    soft_targets,
    take_planned,
)
from engine.train.evaluation import classification_metrics
from engine.train.mixing import (
    RowIndex,
    count_rows,
    deal_to_ranks,
    select_concat,
    select_epoch,
    select_real,
    select_replace,
    select_rsp,
)

ROOT = Path(__file__).resolve().parents[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_toy_shards(
    out: Path,
    *,
    num_variants: int = 2,
    synthetic_splits: tuple[str, ...] = ("train",),
    run_tag: str = "run",
    seed: int = 0,
    num_files: int = 2,
    **toy_kwargs,
) -> Path:
    """Toy dataset -> `<out>/data/part-<n>.parquet` (`num_files` of them) in OUTPUT_SCHEMA; returns the data
    folder.

    Real rows keep the toy image and group; each synthetic row (recipe "aga", `num_variants` per real row of
    `synthetic_splits`) pastes the real subject, through its mask, onto a random background type, with
    source_id = the real row's source_id and group = class * num_backgrounds + new background. Ids carry
    `run_tag`, as two generation runs give the same real image different ids.
    """
    toy_dir = out / "toy"
    toy = make_toy_dataset(toy_dir, seed=seed, **toy_kwargs)
    classes, backgrounds, size = toy["classes"], toy["backgrounds"], toy["size"]
    with open(toy_dir / "groups.csv") as f:
        groups = {row["source_id"]: int(row["group"]) for row in csv.DictReader(f)}
    rng = np.random.default_rng(seed)
    rows = []

    def add(row_id: str, image: np.ndarray, label: int, split: str, source_id: str, recipe: str, group: int):
        rows.append(
            {
                schema.ID: row_id,
                schema.IMAGE: _png(image),
                schema.WIDTH: size,
                schema.HEIGHT: size,
                schema.LABEL: label,
                schema.CLASS_NAME: classes[label],
                schema.SPLIT: split,
                schema.SOURCE_ID: source_id,
                schema.RECIPE: recipe,
                schema.GROUP: group,
                schema.SCHEMA_VERSION_COLUMN: schema.SCHEMA_VERSION,
            }
        )

    for source_id, group in groups.items():
        split, class_name, _ = source_id.split("/")
        label = classes.index(class_name)
        image = np.asarray(Image.open(toy_dir / source_id).convert("RGB"))
        add(f"{run_tag}-real-{source_id}", image, label, split, source_id, schema.RECIPE_REAL, group)
        if split not in synthetic_splits:
            continue
        mask = np.asarray(Image.open(toy_dir / "masks" / source_id))[..., None] > 127
        for variant in range(num_variants):
            background = int(rng.integers(len(backgrounds)))
            canvas = np.clip(BACKGROUND_DRAWERS[backgrounds[background]](rng, size), 0, 255).astype(np.uint8)
            add(
                f"{run_tag}-aga{variant}-{source_id}",
                np.where(mask, image, canvas),
                label,
                split,
                source_id,
                "aga",
                label * len(backgrounds) + background,
            )
    table = pa.Table.from_pylist(rows, schema=schema.OUTPUT_SCHEMA)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(table), num_files + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        pq.write_table(table.slice(start, stop - start), data / f"part-{number}.parquet")
    return data


# Schema version 1, as shards written before the soft_label column: the same columns but that one.
V1_SCHEMA = pa.schema(
    [f for f in schema.OUTPUT_SCHEMA if f.name != schema.SOFT_LABEL],
    metadata={"synthray.schema_version": "1"},
)


def write_v1_shard(table: pa.Table, path: Path) -> None:
    """`table` (OUTPUT_SCHEMA rows) written as a schema version 1 shard."""
    version = table.schema.get_field_index(schema.SCHEMA_VERSION_COLUMN)
    table = table.set_column(version, schema.SCHEMA_VERSION_COLUMN, pa.array(np.ones(len(table), np.int32)))
    pq.write_table(table.drop_columns([schema.SOFT_LABEL]).cast(V1_SCHEMA), path)


def soft_label_of(label: int, num_classes: int) -> list[dict]:
    """The mix the soft rows of `with_soft_rows` get: 3/4 their own class, 1/4 the next one (as Diff-Mix)."""
    return [{"label": label, "weight": 0.75}, {"label": (label + 1) % num_classes, "weight": 0.25}]


def with_soft_rows(data: Path, out: Path, num_classes: int, *, v1_files: int = 0) -> Path:
    """A copy of `data`'s shards where every synthetic variant 0 (`-aga0-` ids) has a soft label
    (`soft_label_of`) and the first `v1_files` files are schema version 1 (no soft_label column, so their
    rows are one-hot)."""
    out.mkdir(parents=True)
    for number, file in enumerate(sorted(data.glob("*.parquet"))):
        table = pq.read_table(file)
        soft = [
            soft_label_of(label, num_classes) if "-aga0-" in row_id else None
            for row_id, label in zip(
                table[schema.ID].to_pylist(), table[schema.LABEL].to_pylist(), strict=True
            )
        ]
        column = table.schema.get_field_index(schema.SOFT_LABEL)
        table = table.set_column(column, schema.SOFT_LABEL, pa.array(soft, schema.SOFT_LABEL_TYPE))
        if number < v1_files:
            write_v1_shard(table, out / file.name)
        else:
            pq.write_table(table, out / file.name)
    return out


SMALL = {"num_classes": 4, "train_per_class": 12, "val_per_class": 4, "test_per_class": 4, "size": 32}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # Synthetic val rows too: a generation run may expand val, and training must still never see them.
    return write_toy_shards(
        tmp_path_factory.mktemp("shards"), num_variants=3, synthetic_splits=("train", "val"), **SMALL
    )


@pytest.fixture(scope="module")
def data(shards):
    return load_training_data(ShardsConfig(paths=[str(shards)]))


@pytest.fixture(scope="module")
def index(data) -> RowIndex:
    return data.index


# ---------------------------------------------------------------- the row index


def test_index_has_train_candidates_and_only_real_eval_rows(data, index):
    assert len(index.real_positions) == 48 and len(index.synthetic_positions) == 144
    assert data.class_names == ["circle", "cross", "diamond", "hexagon"]
    for split in ("val", "test"):
        assert len(data.eval[split]) == 16
        assert set(data.eval[split][schema.RECIPE].to_pylist()) == {schema.RECIPE_REAL}
    assert data.excluded["synthetic_in_val_test"] == 16 * 3


def test_several_runs_share_their_real_rows(tmp_path, shards):
    other = write_toy_shards(tmp_path / "k1", num_variants=1, run_tag="other", **SMALL)
    both = load_training_data(ShardsConfig(paths=[str(shards), str(other)]))
    assert len(both.index.real_positions) == 48, "the second run's copies of the real rows are dropped"
    assert len(both.index.synthetic_positions) == 144 + 48
    assert both.excluded["duplicate_real_rows"] == 48 + 16 + 16
    only_other = load_training_data(ShardsConfig(paths=[str(shards), str(other)], recipes=["none"]))
    assert len(only_other.index.synthetic_positions) == 0
    with pytest.raises(ValueError, match="listed twice"):
        load_training_data(ShardsConfig(paths=[str(shards), str(shards)]))


def as_generation_run(data: Path, dataset_path: str, config_hash: str) -> Path:
    """Make `data`'s parent look like a generation run's output: manifest.json and the saved config."""
    run = data.parent
    (run / "manifest.json").write_text(json.dumps({"config_hash": config_hash, "complete": True}))
    (run / "config.yaml").write_text(
        yaml.safe_dump({"data": {"format": "image_folder", "path": dataset_path}})
    )
    return run


def test_runs_of_two_datasets_are_refused_naming_both(tmp_path, shards):
    # A 4-class and a 6-class toy set: the same relative paths (train/circle/0000.png, ...) name other images.
    four = write_toy_shards(tmp_path / "four", num_variants=1, **SMALL)
    six = write_toy_shards(tmp_path / "six", num_variants=1, run_tag="six", **{**SMALL, "num_classes": 6})
    for paths in ([four, six], [six, four]):
        with pytest.raises(ValueError, match="mixes two datasets") as refused:
            load_training_data(ShardsConfig(paths=[str(p) for p in paths]))
        assert str(four) in str(refused.value) and str(six) in str(refused.value)
        assert "classes differ" in str(refused.value)
    # The same classes drawn with another seed: shared source_ids whose rows disagree.
    reseeded = write_toy_shards(tmp_path / "seed1", num_variants=1, run_tag="s1", seed=1, **SMALL)
    with pytest.raises(ValueError, match=r"mixes two datasets.*their image '.+' has") as refused:
        load_training_data(ShardsConfig(paths=[str(shards), str(reseeded)]))
    assert str(reseeded) in str(refused.value)
    # Generation runs: their saved configs say which dataset each read.
    run_a = as_generation_run(four, "/datasets/toy-a", "a" * 64)
    other_k = write_toy_shards(tmp_path / "four-k2", num_variants=2, run_tag="k2", **SMALL)
    as_generation_run(other_k, "/datasets/toy-a", "b" * 64)
    same = load_training_data(ShardsConfig(paths=[str(four), str(other_k)]))
    assert same.excluded["duplicate_real_rows"] == 48 + 16 + 16, "one dataset: real rows kept once"
    assert [s["config_hash"] for s in same.sources] == ["a" * 64, "b" * 64]
    run_b = as_generation_run(other_k, "/datasets/toy-b", "b" * 64)
    with pytest.raises(ValueError, match="mixes two datasets") as refused:
        load_training_data(ShardsConfig(paths=[str(four), str(other_k)]))
    assert f"{run_a} (generation run aaaaaaaaaaaa)" in str(refused.value)
    assert f"{run_b} (generation run bbbbbbbbbbbb)" in str(refused.value)
    assert "/datasets/toy-b" in str(refused.value)


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_training_data(ShardsConfig(paths=[str(tmp_path / "nope")]))
    with pytest.raises(ValueError, match="no .parquet shards"):
        load_training_data(ShardsConfig(paths=[str(tmp_path)]))


# ---------------------------------------------------------------- the strategies


def test_real_is_the_real_rows(index):
    positions = select_real(index)
    assert count_rows(index, positions) == {"real": 48, "synthetic": 0}


def test_concat_uses_all_rows_or_caps_synthetic_per_class(index):
    rng = np.random.default_rng(0)
    assert sorted(select_concat(index, rng)) == list(range(len(index)))
    for ratio, per_class in ((1.0, 12), (0.5, 6), (10.0, 36)):
        positions = select_concat(index, np.random.default_rng(0), ratio)
        synthetic = positions[index.synthetic[positions]]
        assert len(set(synthetic.tolist())) == len(synthetic), "drawn without replacement"
        assert np.bincount(index.labels[synthetic], minlength=4).tolist() == [per_class] * 4
        assert count_rows(index, positions)["real"] == 48
    mix = MixConfig(strategy="concat", synthetic_ratio=0.5)
    epochs = [select_epoch(index, mix, seed=3, epoch=e, num_epochs=4) for e in range(4)]
    assert all(np.array_equal(epochs[0], e) for e in epochs), "the combined set is static"


def test_replace_local_swaps_about_p_with_own_variants_only(index):
    real = index.real_positions
    swapped = 0
    num_epochs = 40
    for epoch in range(num_epochs):
        positions = select_replace(index, np.random.default_rng([0, epoch]), p=0.3, scope="local")
        assert len(positions) == len(real)
        kept = positions == real
        assert not index.synthetic[positions[kept]].any()
        replaced = positions[~kept]
        assert index.synthetic[replaced].all()
        assert (index.source_ids[replaced] == index.source_ids[real[~kept]]).all(), (
            "a row's own variants only"
        )
        assert (index.labels[replaced] == index.labels[real[~kept]]).all()
        swapped += int((~kept).sum())
    fraction = swapped / (num_epochs * len(real))
    assert abs(fraction - 0.3) < 0.05, fraction  # 1920 draws: 4 standard deviations


def test_replace_class_stays_in_class_but_crosses_sources(index):
    real = index.real_positions
    positions = select_replace(index, np.random.default_rng(1), p=1.0, scope="class")
    assert index.synthetic[positions].all()
    assert (index.labels[positions] == index.labels[real]).all()
    assert (index.source_ids[positions] != index.source_ids[real]).mean() > 0.5
    assert np.array_equal(select_replace(index, np.random.default_rng(1), p=0.0, scope="class"), real)


def test_replace_global_draws_across_labels_and_the_slot_takes_the_drawn_label(index):
    """GRR: the whole synthetic pool; a slot is the drawn row, so its label (and soft label) is what trains."""
    real = index.real_positions
    positions = select_replace(index, np.random.default_rng(1), p=1.0, scope="global")
    assert index.synthetic[positions].all()
    crossed = index.labels[positions] != index.labels[real]
    num_classes = len(np.unique(index.labels))
    # Uniform over the pool: about (1 - 1/num_classes) of the slots change label.
    assert crossed.mean() > 0.5 * (1 - 1 / num_classes), crossed.mean()
    assert np.array_equal(select_replace(index, np.random.default_rng(1), p=0.0, scope="global"), real)


def test_replace_and_rsp_redraw_each_epoch_deterministically(index):
    for mix in (MixConfig(strategy="replace", replace_prob=0.5), MixConfig(strategy="rsp", rsp_prob=0.5)):
        first = select_epoch(index, mix, seed=0, epoch=0, num_epochs=3)
        assert np.array_equal(first, select_epoch(index, mix, seed=0, epoch=0, num_epochs=3))
        assert not np.array_equal(first, select_epoch(index, mix, seed=0, epoch=1, num_epochs=3))
        assert not np.array_equal(first, select_epoch(index, mix, seed=1, epoch=0, num_epochs=3))


def test_rsp_keeps_every_real_row_and_draws_synthetic_with_p(index):
    drawn = 0
    for epoch in range(30):
        positions = select_rsp(index, np.random.default_rng([0, epoch]), p=0.25)
        real = positions[~index.synthetic[positions]]
        assert sorted(real.tolist()) == index.real_positions.tolist(), "each real row exactly once"
        synthetic = positions[index.synthetic[positions]]
        assert len(set(synthetic.tolist())) == len(synthetic)
        drawn += len(synthetic)
    fraction = drawn / (30 * len(index.synthetic_positions))
    assert abs(fraction - 0.25) < 0.04, fraction  # 4320 draws: 5 standard deviations


def test_two_phase_second_phase_is_real_only(index):
    mix = MixConfig(strategy="two_phase", phase2_epochs=2)
    counts = [count_rows(index, select_epoch(index, mix, seed=0, epoch=e, num_epochs=5)) for e in range(5)]
    assert [c["synthetic"] for c in counts] == [144, 144, 144, 0, 0]
    assert all(c["real"] == 48 for c in counts)
    with pytest.raises(ValueError, match="phase2_epochs"):
        TrainConfig(data={"paths": ["x"]}, epochs=2, mix={"strategy": "two_phase", "phase2_epochs": 2})


def test_deal_to_ranks_gives_equal_disjoint_shuffled_parts():
    positions = np.arange(11)
    parts = deal_to_ranks(positions, rng=np.random.default_rng(0), world_size=3)
    assert [len(p) for p in parts] == [3, 3, 3]
    dealt = np.concatenate(parts)
    assert len(set(dealt.tolist())) == 9 and set(dealt.tolist()) <= set(range(11))
    assert not np.array_equal(dealt, np.sort(dealt))
    repeated = deal_to_ranks(np.array([5, 5, 7, 7]), rng=np.random.default_rng(0), world_size=2)
    assert sorted(np.concatenate(repeated).tolist()) == [5, 5, 7, 7], "repeats survive dealing"
    with pytest.raises(ValueError, match="cannot feed"):
        deal_to_ranks(np.arange(1), rng=np.random.default_rng(0), world_size=2)


def test_pool_rows_are_numbered_and_plans_take_them_with_repeats():
    batch = pa.table({schema.ID: ["a", "b", "c", "d"], schema.GROUP: pa.array([1, None, 2, 3], pa.int64())})
    numbered = number_rows(batch, np.array(["a", "b", "d"], object))
    assert numbered[schema.ID].to_pylist() == ["a", "b", "d"]
    assert numbered["row"].to_pylist() == [0, 1, 2] and numbered[schema.GROUP].to_pylist() == [1, -1, 3]
    taken = take_planned(numbered, (np.array([0, 2, 7]), np.array([2, 1, 5])))
    assert taken[schema.ID].to_pylist() == ["a", "a", "d"]
    assert len(take_planned(numbered, (np.array([], np.int64), np.array([], np.int64)))) == 0


# ---------------------------------------------------------------- metrics and schedule


def test_metrics_on_a_hand_computed_example():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 2])
    groups = np.array([0, 1, 3, 3, 4, -1])
    metrics = classification_metrics(labels, predictions, groups, ["a", "b", "c"])
    assert metrics["top1"] == pytest.approx(4 / 6)
    assert metrics["per_class"] == {"a": 0.5, "b": pytest.approx(2 / 3), "c": 1.0}
    assert metrics["group_accuracy"] == {"0": 1.0, "1": 0.0, "3": 1.0, "4": 0.0}
    assert metrics["worst_group"] == 0.0 and metrics["worst_group_id"] == 1
    assert metrics["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    unknown = classification_metrics(labels, predictions, np.full(6, -1), ["a", "b", "c"])
    assert unknown["worst_group"] is None


def test_learning_rate_warms_up_decays_and_drops_in_phase_two():
    from engine.train.loop import learning_rate

    optim = {"lr": 1.0, "warmup_epochs": 1.0}
    plain = [
        learning_rate(p, optim, epochs=10, phase1_epochs=10, phase2_lr_scale=0.1)
        for p in np.arange(0, 10, 0.5)
    ]
    assert plain[0] < plain[1] <= 1.0 and plain[-1] < 0.05
    two = [
        learning_rate(p, optim, epochs=10, phase1_epochs=8, phase2_lr_scale=0.1)
        for p in np.arange(8, 10, 0.25)
    ]
    assert two[0] == pytest.approx(0.1) and max(two) <= 0.1 and two[-1] < two[0]


# ---------------------------------------------------------------- configs and budget


def test_shipped_train_configs_validate():
    train = load_config(TrainConfig, ROOT / "configs" / "train_toy_cpu.yaml")
    assert train.scaling.num_workers == 2 and not train.scaling.use_gpu
    sweep = load_config(SweepConfig, ROOT / "configs" / "sweep_toy_cpu.yaml")
    from jobs.sweep import run_config

    for variant in sweep.variants:
        run = run_config(sweep, variant, seed=1)
        assert run.seed == 1 and run.run_name() == f"{variant.name}-seed1"
    with pytest.raises(ValueError, match="unknown key 'mix.stratgy'"):
        load_config(TrainConfig, ROOT / "configs" / "train_toy_cpu.yaml", ["mix.stratgy=concat"])
    with pytest.raises(ValueError, match="mix.strategy"):
        load_config(TrainConfig, ROOT / "configs" / "train_toy_cpu.yaml", ["mix.strategy=mixup"])


def test_budget_fails_clearly_when_workers_cannot_be_scheduled():
    from engine.train.runner import check_budget

    config = TrainConfig(
        data={"paths": ["x"]}, scaling={"num_workers": 2, "resources_per_worker": {"CPU": 1}}
    )
    check_budget(config, {"CPU": 4.0})
    with pytest.raises(ValueError, match=r"need \{'CPU': 2.5\}, the cluster has \{'CPU': 2.0\}"):
        check_budget(config, {"CPU": 2.0})
    gpu = config.model_copy(update={"scaling": config.scaling.model_copy(update={"use_gpu": True})})
    with pytest.raises(ValueError, match="GPU"):
        check_budget(gpu, {"CPU": 8.0})
    autoscaling = config.model_copy(update={"ray": config.ray.model_copy(update={"check_resources": False})})
    check_budget(autoscaling, {"CPU": 2.0})


# ---------------------------------------------------------------- soft labels and schema versions


def test_version_1_shards_read_as_one_hot_rows_beside_soft_ones(tmp_path, shards):
    mixed = with_soft_rows(shards, tmp_path / "mixed", num_classes=4, v1_files=1)
    files = sorted(mixed.glob("*.parquet"))
    assert schema.SOFT_LABEL not in pq.read_schema(files[0]).names
    assert pq.read_schema(files[0]).metadata[b"synthray.schema_version"] == b"1"
    data = load_training_data(ShardsConfig(paths=[str(mixed)]))
    train = data.train.to_pylist()
    assert len(train) == 48 + 144, "every row of both versions is read"
    v1_ids = set(pq.read_table(files[0], columns=[schema.ID])[schema.ID].to_pylist())
    for row in train:
        if "-aga0-" in row[schema.ID] and row[schema.ID] not in v1_ids:
            assert row[schema.SOFT_LABEL] == soft_label_of(row[schema.LABEL], 4), row[schema.ID]
        else:
            assert row[schema.SOFT_LABEL] is None, row[schema.ID]
    soft_in_v1 = sum("-aga0-" in i for i in v1_ids)
    assert 0 < soft_in_v1 < 48 and data.num_soft_rows == 48 - soft_in_v1
    # A directory of version 1 shards only: no soft row, every target one-hot.
    only_v1 = tmp_path / "v1"
    only_v1.mkdir()
    for file in sorted(shards.glob("*.parquet")):
        write_v1_shard(pq.read_table(file), only_v1 / file.name)
    old = load_training_data(ShardsConfig(paths=[str(only_v1)]))
    assert old.num_soft_rows == 0 and len(old.train) == 48 + 144
    assert (
        old.train[schema.ID].to_pylist()
        == load_training_data(ShardsConfig(paths=[str(shards)])).train[schema.ID].to_pylist()
    )
    # The pool's reader: a version 1 block gets an all-null soft_label column.
    block = pq.read_table(files[0], columns=[schema.ID, schema.GROUP])
    numbered = number_rows(block, np.sort(np.asarray(block[schema.ID].to_pylist(), object)))
    assert numbered.schema.field(schema.SOFT_LABEL).type == schema.SOFT_LABEL_TYPE
    assert numbered[schema.SOFT_LABEL].null_count == len(block)


def test_soft_targets_are_distributions_and_one_hot_where_null():
    soft = [None, soft_label_of(2, 4), np.array([{"label": 1, "weight": 1.0}], dtype=object), float("nan")]
    targets = soft_targets(np.array([3, 2, 0, 1]), object_array(soft), 4)
    assert targets.dtype == np.float32 and targets.shape == (4, 4)
    assert np.allclose(targets.sum(1), 1.0)
    assert targets[0].tolist() == [0, 0, 0, 1] and targets[3].tolist() == [0, 1, 0, 0], "null: one-hot"
    assert targets[1].tolist() == [0, 0, 0.75, 0.25] and targets[2].tolist() == [0, 1, 0, 0]
    assert soft_targets(np.array([1, 0]), None, 3).tolist() == [[0, 1, 0], [1, 0, 0]], "no column at all"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ([{"label": 0, "weight": 0.5}, {"label": 4, "weight": 0.5}], "label 4 of 4 classes"),
        ([{"label": 0, "weight": 0.5}, {"label": 1, "weight": 0.4}], "weights sum to 0.9"),
        ([{"label": 0, "weight": 1.5}, {"label": 1, "weight": -0.5}], "a negative weight"),
        ([], "no entry"),
    ],
)
def test_soft_labels_that_are_no_distribution_are_refused(bad, why):
    train = pa.table(
        {
            schema.ID: ["ok", "bad"],
            schema.SOFT_LABEL: pa.array([soft_label_of(0, 4), bad], schema.SOFT_LABEL_TYPE),
        }
    )
    with pytest.raises(ValueError, match="1 train rows have a soft_label.*'bad'"):
        check_soft_labels(train, num_classes=4)
    check_soft_labels(train.slice(0, 1), num_classes=4)  # the good row alone passes


def test_every_strategy_selects_soft_rows_like_any_synthetic_row(tmp_path, shards):
    """Soft rows are synthetic rows of their source class (`label`): every strategy draws them."""
    data = load_training_data(ShardsConfig(paths=[str(with_soft_rows(shards, tmp_path / "soft", 4))]))
    soft = data.train[schema.SOFT_LABEL].is_valid().to_numpy(zero_copy_only=False)
    assert soft.sum() == 48
    for strategy in ("concat", "replace", "rsp", "two_phase"):
        mix = MixConfig(strategy=strategy, replace_prob=1.0, phase2_epochs=1)
        positions = select_epoch(data.index, mix, seed=0, epoch=0, num_epochs=2)
        assert soft[positions].sum() > 0, strategy
    assert (
        soft[select_epoch(data.index, MixConfig(strategy="real"), seed=0, epoch=0, num_epochs=1)].sum() == 0
    )


# ---------------------------------------------------------------- the low-data protocol


def shots_of(data) -> tuple[dict[int, list[str]], set[str]]:
    """Real train source_ids per label, and the source_ids of the synthetic train rows."""
    rows = data.train.select([schema.LABEL, schema.SOURCE_ID, schema.RECIPE]).to_pylist()
    real: dict[int, list[str]] = {}
    for row in rows:
        if row[schema.RECIPE] == schema.RECIPE_REAL:
            real.setdefault(row[schema.LABEL], []).append(row[schema.SOURCE_ID])
    return real, {r[schema.SOURCE_ID] for r in rows if r[schema.RECIPE] != schema.RECIPE_REAL}


def test_shots_per_class_keeps_k_real_rows_per_class_and_their_synthetic_rows(tmp_path, shards, data):
    config = ShardsConfig(paths=[str(shards)], shots_per_class=3)
    few = load_training_data(config, seed=7)
    real, synthetic_sources = shots_of(few)
    assert {label: len(ids) for label, ids in real.items()} == {0: 3, 1: 3, 2: 3, 3: 3}
    kept = {s for ids in real.values() for s in ids}
    assert synthetic_sources == kept, "the synthetic rows of exactly the kept sources"
    # Each kept source keeps all 3 of its variants; the rest is counted as left out.
    assert len(few.index.synthetic_positions) == 12 * 3
    assert few.excluded["few_shot_real_rows"] == 48 - 12
    assert few.excluded["few_shot_synthetic_rows"] == 144 - 36
    assert few.notes == []
    for split in ("val", "test"):
        assert few.eval[split].equals(data.eval[split]), "val/test untouched"

    again = load_training_data(config, seed=7)
    assert again.train.equals(few.train), "same seed, same draw"
    other = shots_of(load_training_data(config, seed=8))[0]
    assert other != real, "another seed draws other images"
    # The draw is by image, not by file or row order: the same rows in other files and order draw the same.
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    table = pq.read_table(shards)
    reversed_rows = table.take(pa.array(np.arange(len(table))[::-1]))
    for number, part in enumerate(np.array_split(np.arange(len(table)), 5)):
        pq.write_table(reversed_rows.take(pa.array(part)), reordered / f"part-{number}.parquet")
    moved = shots_of(load_training_data(ShardsConfig(paths=[str(reordered)], shots_per_class=3), seed=7))
    assert {k: sorted(v) for k, v in moved[0].items()} == {k: sorted(v) for k, v in real.items()}
    assert moved[1] == synthetic_sources


def test_shots_per_class_above_a_class_size_keeps_all_and_says_so(shards):
    few = load_training_data(ShardsConfig(paths=[str(shards)], shots_per_class=20), seed=0)
    assert len(few.index.real_positions) == 48 and len(few.index.synthetic_positions) == 144
    assert len(few.notes) == 4
    assert "class 'circle' (label 0) has 12 real train rows, all kept" in few.notes[0]
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ShardsConfig(paths=[str(shards)], shots_per_class=0)
    with pytest.raises(ValueError, match="training seed"):
        load_training_data(ShardsConfig(paths=[str(shards)], shots_per_class=2))


def test_the_sweeps_budget_counts_two_phases_rows(shards):
    """`train_rows` buys the same number of samples whatever the strategy: two_phase's last epochs train on real
    rows only, its first ones on real + synthetic (a one-epoch probe once saw only the real phase and gave
    two_phase 4x the budget)."""
    from jobs.sweep import budget_epochs

    real, synthetic = 48, 48 * 3

    def epochs(strategy: str) -> int:
        config = TrainConfig(
            data={"paths": [str(shards)]},
            mix={"strategy": strategy, "phase2_epochs": 2},
            scaling={"num_workers": 1},
        )
        return budget_epochs(config, 1920)

    assert epochs("real") == 1920 // real
    assert epochs("concat") == round(1920 / (real + synthetic))
    assert epochs("two_phase") == 2 + round((1920 - 2 * real) / (real + synthetic))
