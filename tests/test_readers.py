"""Readers without Ray: Parquet as Hugging Face `datasets` writes it, splits, source ids, duplicates,
`max_images` sampling, and image folders with missing splits (`engine.readers.inspect_source`)."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine import schema
from engine.config import DataConfig
from engine.readers import (
    IMAGE_SUFFIXES,
    folder_slices,
    hub_split,
    inspect_source,
    parquet_pieces,
    read_parquet_rows,
    sample_rows,
    source_rows,
)

NAMES = ["spring_rolls", "winter melon", "crème brûlée"]


def png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def hf_dataset(image_column, labels: list[int], names: list[str] | None = NAMES, **columns):
    """A `datasets` Dataset with an Image column (paths, bytes or PIL images) and a ClassLabel label."""
    import datasets

    features = {"image": datasets.Image()}
    features["label"] = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    for name, values in columns.items():
        features[name] = datasets.Value("string") if isinstance(values[0], str) else datasets.Value("int64")
    data = {"image": image_column, "label": labels, **columns}
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def write_images(root: Path, count: int, start: int = 0) -> list[str]:
    """PNG files under root/images; returns their paths relative to root."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        (root / "images" / f"{i:03d}.png").write_bytes(png(10 * i % 250))
        paths.append(f"images/{i:03d}.png")
    return paths


def read_rows(info, data: DataConfig) -> list[dict]:
    """What the Ray read tasks yield, called directly on each piece."""
    from engine.readers import dataset_root

    rows = []
    for piece in parquet_pieces(info).to_pylist():
        batch = {k: np.array([v], dtype=object) for k, v in piece.items()}
        for block in read_parquet_rows(
            batch, data.image_column, dataset_root(data.path), 4, info.class_names
        ):
            n = len(block[schema.SOURCE_ID])
            rows += [{k: block[k][i] for k in block} for i in range(n)]
    return rows


# --------------------------------------------------------------------------- Hugging Face Parquet


def test_hub_layout_with_relative_paths(tmp_path, monkeypatch):
    """`to_parquet` of images loaded from files stores {bytes: None, path}; the Hub's file names give
    the splits; ClassLabel metadata gives the class names; ids are the paths."""
    paths = write_images(tmp_path, 9)
    monkeypatch.chdir(tmp_path)  # the paths are stored as given: relative to the dataset root
    (tmp_path / "data").mkdir()
    hf_dataset(paths[:6], [0, 1, 2, 0, 1, 2]).to_parquet(tmp_path / "data" / "train-00000-of-00001.parquet")
    hf_dataset(paths[6:], [0, 1, 2]).to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    stored = pq.read_table(tmp_path / "data" / "train-00000-of-00001.parquet").column("image").to_pylist()
    assert stored[0] == {"bytes": None, "path": "images/000.png"}

    data = DataConfig(format="parquet", path=str(tmp_path), splits=["train", "test"])
    info = inspect_source(data)
    assert info.class_names == NAMES  # no data.class_names needed
    assert info.counts == {"test": 3, "train": 6} and info.num_duplicates == 0
    rows = read_rows(info, data)
    by_id = {r[schema.SOURCE_ID]: r for r in rows}
    assert sorted(by_id) == paths
    assert {by_id[p][schema.SPLIT] for p in paths[6:]} == {"test"}
    assert {by_id[p][schema.SPLIT] for p in paths[:6]} == {"train"}
    for path in paths:
        assert by_id[path][schema.IMAGE_BYTES] == (tmp_path / path).read_bytes()
    assert by_id["images/001.png"][schema.CLASS_NAME] == "winter melon"

    # The default splits ([train]) never read test files; the note says what was skipped.
    train_only = inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    assert train_only.counts == {"train": 6}
    assert any("split 'test'" in note for note in train_only.notes)


def test_embedded_bytes_ids_are_content_hashes_and_duplicates_are_counted(tmp_path):
    """Images given as bytes (no path): ids hash the bytes; identical images are reported and read
    once; an image with no bytes at all gets an id of its own (and fails decode later), never the hash
    of empty bytes."""
    images = [{"bytes": png(v), "path": None} for v in (10, 20, 30, 20)] + [None]
    hf_dataset(images, [0, 1, 2, 1, 0]).to_parquet(tmp_path / "train.parquet")
    data = DataConfig(format="parquet", path=str(tmp_path / "train.parquet"))
    info = inspect_source(data)
    assert info.num_duplicates == 1 and any("duplicate" in note for note in info.notes)
    rows = read_rows(info, data)
    ids = [r[schema.SOURCE_ID] for r in rows]
    assert len(ids) == len(set(ids)) == 4
    assert hashlib.sha1(b"").hexdigest()[:16] not in ids
    assert ids[:3] == [hashlib.sha1(png(v)).hexdigest()[:16] for v in (10, 20, 30)]
    assert rows[3][schema.IMAGE_BYTES] is None  # the empty row: decode reports it as missing


def test_repeated_paths_with_different_bytes_stay_distinct(tmp_path):
    """Embedded images whose stored path (a bare file name) repeats are told apart by content."""
    images = [{"bytes": png(v), "path": "image.jpg"} for v in (10, 20)]
    hf_dataset(images, [0, 1]).to_parquet(tmp_path / "train.parquet")
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    ids = info.index[schema.SOURCE_ID].to_pylist()
    assert len(set(ids)) == 2 and all(i.startswith("image.jpg#") for i in ids)
    assert info.num_duplicates == 0


def test_id_column_and_split_column(tmp_path):
    paths = write_images(tmp_path, 4)
    images = [str(tmp_path / p) for p in paths]  # absolute paths: ids still relative to the root
    ds = hf_dataset(images, [0, 1, 0, 1], split=["train", "validation", "test", "train"])
    ds.to_parquet(tmp_path / "all.parquet")
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path), splits=["train", "val"]))
    assert info.counts == {"train": 2, "val": 1}  # "validation" is the val split
    assert sorted(info.index[schema.SOURCE_ID].to_pylist()) == [
        "images/000.png",
        "images/001.png",
        "images/003.png",
    ]

    ds = hf_dataset(images, [0, 1, 0, 1], image_id=["a", "b", "c", "a"])
    ds.to_parquet(tmp_path / "all.parquet")
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path), id_column="image_id"))
    assert info.index[schema.SOURCE_ID].to_pylist() == ["a", "b", "c"]
    assert info.num_duplicates == 1


def test_split_files_from_config(tmp_path):
    (tmp_path / "shards").mkdir()
    for name, value in (("part-a", 10), ("part-b", 20), ("holdout", 30)):
        hf_dataset([{"bytes": png(value), "path": None}], [0]).to_parquet(
            tmp_path / "shards" / f"{name}.parquet"
        )
    data = DataConfig(
        format="parquet",
        path=str(tmp_path),
        splits=["train", "test"],
        split_files={"train": "shards/part-*", "test": "shards/holdout.parquet"},
    )
    assert inspect_source(data).counts == {"test": 1, "train": 2}
    # No split column, no split in the names, no patterns: everything is the first split, with a note.
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    assert info.counts == {"train": 3} and any("no split" in n for n in info.notes)


@pytest.mark.parametrize(
    ("path", "split"),
    [
        ("data/train-00000-of-00002.parquet", "train"),
        ("data/test-00000-of-00001.parquet", "test"),
        ("data/validation-00000-of-00001.parquet", "val"),
        ("train.parquet", "train"),
        ("test.parquet", "test"),
        ("valid/0000.parquet", "val"),
        ("plain_text/dev-00001.parquet", "val"),
        ("my_dataset-train.parquet", "train"),
        ("default/training/part.parquet", "train"),
        ("data.parquet", None),
        ("trainer.parquet", None),
        ("train_test.parquet", None),
    ],
)
def test_hub_split_names(path, split):
    assert hub_split(path) == split


def test_class_names_needed_only_without_metadata(tmp_path):
    hf_dataset([{"bytes": png(1), "path": None}], [0], names=None).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="data.class_names"):
        inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path), class_names=["only"]))
    assert info.class_names == ["only"]
    # A label column of class names: sorted names, labels by that order.
    table = pa.table({"image": [png(1), png(2)], "label": ["zebra", "ant"]})
    pq.write_table(table, tmp_path / "train.parquet")
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    assert info.class_names == ["ant", "zebra"] and info.index[schema.LABEL].to_pylist() == [1, 0]


def test_parquet_errors_before_ray(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        inspect_source(DataConfig(format="parquet", path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="no .parquet files"):
        inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    pq.write_table(pa.table({"img": [png(1)], "label": [0]}), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match="needs columns 'image' and 'label'"):
        inspect_source(DataConfig(format="parquet", path=str(tmp_path), class_names=["a"]))


def test_other_parquet_files_are_skipped_with_a_note(tmp_path):
    hf_dataset([{"bytes": png(1), "path": None}], [0]).to_parquet(tmp_path / "train.parquet")
    pq.write_table(pa.table({"source_id": ["x"], "reason": ["decode"]}), tmp_path / "errors.parquet")
    info = inspect_source(DataConfig(format="parquet", path=str(tmp_path)))
    assert info.counts == {"train": 1} and any("without the image and label" in n for n in info.notes)


def test_split_column_string_labels_groups_and_max_images(tmp_path):
    """The columnar index: split values looked up once (null and unknown splits counted in a note), string
    labels (a name outside data.class_names gets -1), groups, and max_images taking the same sample as
    `sample_rows` over the index's rows."""
    n = 40
    split = ["train" if i % 4 else "validation" for i in range(n)]
    split[9], split[19] = None, "extra"
    labels = ["ant", "bee", "cat"]
    label = [labels[i % 3] for i in range(n)]
    label[7] = "yak"
    table = pa.table(
        {
            "image": [{"bytes": png(i), "path": f"img/{i:03d}.png"} for i in range(n)],
            "label": label,
            "split": split,
            "group": [i % 2 for i in range(n)],
        }
    )
    pq.write_table(table, tmp_path / "all.parquet", row_group_size=16)
    data = DataConfig(format="parquet", path=str(tmp_path), splits=["train", "val"], class_names=labels)
    info = inspect_source(data)
    kept = [i for i in range(n) if i not in (9, 19)]
    expected = [
        {
            schema.SOURCE_ID: f"img/{i:03d}.png",
            schema.LABEL: labels.index(label[i]) if label[i] in labels else -1,
            schema.SPLIT: "train" if i % 4 else "val",
            schema.GROUP: i % 2,
            schema.CLASS_NAME: label[i] if label[i] in labels else "",
        }
        for i in kept
    ]
    assert source_rows(info) == expected
    assert info.counts == {"train": 28, "val": 10}
    assert "1 rows of split 'None' skipped (not in data.splits ['train', 'val'])" in info.notes
    assert "1 rows of split 'extra' skipped (not in data.splits ['train', 'val'])" in info.notes
    # Read tasks: one per row group, each row's bytes found at its position.
    rows = read_rows(info, data)
    assert [r[schema.SOURCE_ID] for r in rows] == [e[schema.SOURCE_ID] for e in expected]
    assert [r[schema.IMAGE_BYTES] for r in rows] == [png(i) for i in kept]
    assert [r[schema.CLASS_NAME] for r in rows] == [e[schema.CLASS_NAME] for e in expected]
    assert len(parquet_pieces(info)) == 3  # row groups of 16, 16 and 8
    for seed in (0, 1):
        sampled = inspect_source(data.model_copy(update={"max_images": 12, "sample_seed": seed}))
        assert source_rows(sampled) == sample_rows(expected, 12, seed=seed)
        assert sampled.num_available == 38 and sampled.num_images == 12


# --------------------------------------------------------------------------- sampling


def grid_rows(per_stratum: dict[tuple[str, int], int]) -> list[dict]:
    return [
        {schema.SOURCE_ID: f"{split}/{label}/{i}", schema.SPLIT: split, schema.LABEL: label}
        for (split, label), n in sorted(per_stratum.items())
        for i in range(n)
    ]


def sample_rows_before_issue_18(rows: list[dict], max_images: int, seed: int) -> list[dict]:
    """`sample_rows` as it was, one Python dict per row, before the columnar `sample_indices`."""
    from engine.readers.source import stable_hash

    if not max_images or len(rows) <= max_images:
        return rows
    strata: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        strata.setdefault((str(row[schema.SPLIT]), int(row[schema.LABEL])), []).append(i)
    keys = {}
    for members in strata.values():
        ranked = sorted(members, key=lambda i: stable_hash(seed, rows[i][schema.SOURCE_ID]))
        for rank, i in enumerate(ranked):
            keys[i] = (rank / len(ranked), stable_hash(seed, "tie", rows[i][schema.SOURCE_ID]))
    return [rows[i] for i in sorted(sorted(keys, key=keys.__getitem__)[:max_images])]


@pytest.mark.parametrize("seed", [0, 3])
def test_sample_is_the_row_by_row_sample_it_replaced(seed):
    rng = np.random.default_rng(seed)
    strata = {
        (split, label): int(rng.integers(1, 40)) for split in ("train", "val", "test") for label in range(5)
    }
    rows = grid_rows(strata)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    for budget in (1, 7, 15, 16, 100, len(rows) - 1):
        assert sample_rows(rows, budget, seed=seed) == sample_rows_before_issue_18(rows, budget, seed)


def test_max_images_is_a_stratified_deterministic_sample():
    strata = {
        (split, label): n for split, n in (("test", 20), ("train", 60), ("val", 20)) for label in range(4)
    }
    rows = grid_rows(strata)
    sample = sample_rows(rows, 16, seed=0)
    assert len(sample) == 16
    taken = Counter((r[schema.SPLIT], r[schema.LABEL]) for r in sample)
    assert set(taken) == set(strata)  # every class of every split
    assert sum(n for (split, _), n in taken.items() if split == "train") >= 4
    # The same rows in another order give the same sample (in that order).
    reordered = sample_rows(list(reversed(rows)), 16, seed=0)
    assert [r[schema.SOURCE_ID] for r in reordered] == [r[schema.SOURCE_ID] for r in reversed(sample)]
    assert sample_rows(rows, 16, seed=0) == sample
    assert sample_rows(rows, 16, seed=1) != sample
    # Larger budgets keep each stratum's share.
    big = Counter(r[schema.SPLIT] for r in sample_rows(rows, 200, seed=0))
    assert big == {"train": 120, "val": 40, "test": 40}
    assert sample_rows(rows, None) == rows and sample_rows(rows, 10_000) == rows


# --------------------------------------------------------------------------- image folders


def test_image_folder_missing_splits_and_path(toy, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        inspect_source(DataConfig(path=str(tmp_path / "nope")))
    info = inspect_source(DataConfig(path=str(toy), splits=["train", "validation", "test"]))
    assert info.counts == {"test": 6, "train": 12}
    assert info.notes == [f"split 'validation' has no folder {toy}/validation: skipped"]
    with pytest.raises(ValueError, match="none of the splits"):
        inspect_source(DataConfig(path=str(toy), splits=["validation"]))
    # max_images over an image folder: every class of every split first.
    sample = inspect_source(DataConfig(path=str(toy), splits=["train", "val", "test"], max_images=9))
    assert sample.counts == {"test": 3, "train": 3, "val": 3}
    assert {(r[schema.SPLIT], r[schema.LABEL]) for r in source_rows(sample)} == {
        (s, c) for s in ("train", "val", "test") for c in range(3)
    }


def test_groups_file_from_config_or_default(toy, tmp_path):
    """`<path>/groups.csv` by default; a configured `data.groups_file` (anywhere) instead; a configured one
    that is missing or lacks the columns is an error before Ray, not a run with every group -1."""
    default = {
        r[schema.SOURCE_ID]: r[schema.GROUP] for r in source_rows(inspect_source(DataConfig(path=str(toy))))
    }
    assert set(default.values()) != {-1}  # the toy dataset ships groups.csv
    ids = sorted(default)
    groups_file = tmp_path / "elsewhere" / "my_groups.csv"
    groups_file.parent.mkdir()
    groups_file.write_text("source_id,group\n" + "".join(f"{s},{100 + i}\n" for i, s in enumerate(ids)))
    configured = source_rows(inspect_source(DataConfig(path=str(toy), groups_file=str(groups_file))))
    assert {r[schema.SOURCE_ID]: r[schema.GROUP] for r in configured} == {
        s: 100 + i for i, s in enumerate(ids)
    }

    with pytest.raises(ValueError, match=r"data.groups_file .*no-such.csv does not exist"):
        inspect_source(DataConfig(path=str(toy), groups_file=str(tmp_path / "no-such.csv")))
    (tmp_path / "bad.csv").write_text("source_id,cluster\na,1\n")
    with pytest.raises(ValueError, match=r"no column \['group'\]"):
        inspect_source(DataConfig(path=str(toy), groups_file=str(tmp_path / "bad.csv")))


# --------------------------------------------------------------------------- image folders at scale


def listing_before_issue_18(root: Path, splits: list[str], masks: Path | None = None) -> list[dict]:
    """The driver-side listing the parallel one replaced (every file, then one dict per image): the
    reference for source ids, labels, paths and groups, so existing outputs still resume."""
    files = []
    for split in splits:
        for path in (root / split).rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and len(rel.split("/")) == 3:
                files.append((split, rel.split("/")[1], rel))
    label_of = {name: i for i, name in enumerate(sorted({c for _, c, _ in files}))}
    groups = {}
    if (root / "groups.csv").exists():
        lines = (root / "groups.csv").read_text().splitlines()[1:]
        groups = {line.split(",")[0]: int(line.split(",")[1]) for line in lines}
    return [
        {
            schema.SOURCE_ID: rel,
            "path": str(root / rel),
            "mask_path": str((masks / rel).with_suffix(".png")) if masks else "",
            schema.LABEL: label_of[class_name],
            schema.CLASS_NAME: class_name,
            schema.SPLIT: split,
            schema.GROUP: groups.get(rel, -1),
        }
        for split, class_name, rel in sorted(files)
    ]


def folder_tree(root: Path, sizes: dict[str, dict[str, int]]) -> Path:
    """Empty `.png` files (listing never opens them): {split: {class: count}}."""
    for split, classes in sizes.items():
        for class_name, count in classes.items():
            (root / split / class_name).mkdir(parents=True)
            for i in range(count):
                (root / split / class_name / f"img_{i:04d}.png").touch()
    return root


def test_parallel_listing_gives_the_old_rows(toy):
    splits = ["train", "val", "test"]
    data = DataConfig(path=str(toy), splits=splits, masks_path=str(toy / "masks"))
    info = inspect_source(data)
    assert source_rows(info) == listing_before_issue_18(toy, splits, toy / "masks")
    assert info.counts == {"test": 6, "train": 12, "val": 6} and info.num_available == 24
    assert len(info.folders) == 9 and sum(f["num_images"] for f in info.folders) == 24


@pytest.mark.parametrize("seed", [0, 3])
def test_max_images_from_folder_sizes_is_sample_rows_exactly(tmp_path, seed):
    """Each folder is a stratum: the per-folder shares `inspect_source` computes from the sizes (and, at
    the budget's edge, a few tie hashes) give exactly the rows `sample_rows` picks from the full list,
    including where equal-sized folders tie."""
    sizes = {
        "train": {"a": 7, "b": 7, "c": 3, "d": 12},
        "val": {"a": 2, "b": 2, "c": 2},
        "test": {"a": 1, "d": 4},
    }
    root = folder_tree(tmp_path / "tree", sizes)
    every = listing_before_issue_18(root, list(sizes))
    for budget in (1, 5, 9, 10, 17, 25, 39, 40, 41, 100):
        data = DataConfig(path=str(root), splits=list(sizes), max_images=budget, sample_seed=seed)
        info = inspect_source(data)
        expected = sample_rows(every, budget, seed)
        assert sorted(r[schema.SOURCE_ID] for r in source_rows(info)) == sorted(
            r[schema.SOURCE_ID] for r in expected
        )
        assert info.num_images == len(expected) and info.num_available == len(every)


def test_entries_outside_split_class_and_unlistable_folders_are_counted(tmp_path, monkeypatch):
    import engine.readers.image_folder as readers

    root = folder_tree(tmp_path / "tree", {"train": {"a": 3, "b": 2, "locked": 4}, "test": {"a": 1}})
    (root / "train" / "stray.png").touch()  # no class folder
    (root / "train" / "a" / "deeper").mkdir()  # a folder inside a class folder
    (root / "train" / "a" / "deeper" / "x.png").touch()
    (root / "train" / "b" / "notes.txt").touch()  # not an image
    listed = readers._folder_entries

    def refuse_locked(fs, path):
        if path.endswith("locked") or path.endswith("locked/"):
            raise PermissionError(f"[Errno 13] Permission denied: '{path}'")
        return listed(fs, path)

    monkeypatch.setattr(readers, "_folder_entries", refuse_locked)
    info = inspect_source(DataConfig(path=str(root), splits=["train", "test"]))
    assert info.class_names == ["a", "b"]  # "locked" has no images the run can read
    assert info.counts == {"test": 1, "train": 5}
    assert sorted(r[schema.SOURCE_ID] for r in source_rows(info)) == [
        "test/a/img_0000.png",
        "train/a/img_0000.png",
        "train/a/img_0001.png",
        "train/a/img_0002.png",
        "train/b/img_0000.png",
        "train/b/img_0001.png",
    ]
    skipped = next(n for n in info.notes if "not images at <split>/<class>/<image>" in n)
    assert skipped.startswith("3 entries") and "train/stray.png" in skipped
    unlisted = next(n for n in info.notes if "could not be listed" in n)
    assert unlisted.startswith("1 folders") and "train/locked" in unlisted and "Permission denied" in unlisted
    # A folder that becomes unlistable after inspection costs its rows and a warning, not the run.
    monkeypatch.setattr(readers, "_folder_entries", lambda fs, path: refuse_locked(fs, path + "locked"))
    assert source_rows(info) == []


def test_read_tasks_list_the_folders_and_stream_small_blocks(toy, ray_local):
    import ray.data

    from engine.readers import read_source

    data = DataConfig(path=str(toy), splits=["train", "test"], rows_per_block=4)
    info = inspect_source(data)
    ds, class_names = read_source(data, ray.data, 0.5, info)
    assert class_names == info.class_names
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    # One block per slice of rows_per_block images (across folders: only the last is short), listed in
    # the task that reads the slice's files (one fused operator: no queue of listed paths between them).
    assert len(blocks) == len(folder_slices(info.folders, 4)) == -(-len(source_rows(info)) // 4)
    assert sorted(len(b[schema.SOURCE_ID]) for b in blocks)[1:] == [4] * (len(blocks) - 1)
    assert "MapBatches(list_folder_rows)->MapBatches(read_file_bytes)" in ds.stats()
    rows = {sid: b for b in blocks for sid in b[schema.SOURCE_ID]}
    assert sorted(rows) == [r[schema.SOURCE_ID] for r in listing_before_issue_18(toy, ["train", "test"])]
    for block in blocks:
        for sid, image in zip(block[schema.SOURCE_ID], block[schema.IMAGE_BYTES], strict=True):
            assert image == (toy / sid).read_bytes()


def test_a_relative_data_path_reaches_the_read_tasks_resolved(toy, monkeypatch):
    """Read tasks may run on other nodes, in other folders: the folders they list carry absolute paths."""
    monkeypatch.chdir(toy.parent)
    info = inspect_source(DataConfig(path=toy.name, masks_path=f"{toy.name}/masks"))
    assert {f["data_path"] for f in info.folders} == {str(toy)}
    monkeypatch.chdir("/")
    assert source_rows(info) == listing_before_issue_18(toy, ["train"], toy / "masks")
