import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.tiny.toy_dataset import BACKGROUNDS, CLASSES, SPLITS, main, make_toy_dataset

SMALL = dict(num_classes=3, train_per_class=6, val_per_class=3, test_per_class=3, size=32, seed=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy") / "data"
    return out, make_toy_dataset(out, **SMALL)


def _read_groups(out: Path) -> list[dict[str, str]]:
    with open(out / "groups.csv", newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(small):
    out, summary = small
    classes = list(CLASSES[:3])
    assert summary["classes"] == classes == sorted(classes)  # ImageFolder label == class index
    assert summary["backgrounds"] == list(BACKGROUNDS[:3])
    per_class = {"train": 6, "val": 3, "test": 3}
    for split in SPLITS:
        assert sorted(p.name for p in (out / split).iterdir()) == classes
        for name in classes:
            images = sorted(p.name for p in (out / split / name).iterdir())
            assert images == [f"{name}_{i:04d}.png" for i in range(per_class[split])]
            masks = sorted(p.name for p in (out / "masks" / split / name).iterdir())
            assert masks == images
        assert summary["counts"][split] == {name: per_class[split] for name in classes}
        assert sum(summary["groups"][split].values()) == 3 * per_class[split]

    image = Image.open(out / "train" / "circle" / "circle_0000.png")
    mask = Image.open(out / "masks" / "train" / "circle" / "circle_0000.png")
    assert (image.mode, image.size) == ("RGB", (32, 32))
    assert (mask.mode, mask.size) == ("L", (32, 32))

    written = json.loads((out / "dataset.json").read_text())
    assert written["classes"] == classes and written["spurious"] == 0.9 and written["seed"] == 7
    assert written["counts"] == summary["counts"]
    assert Path(summary["paths"]["groups_csv"]) == out / "groups.csv"


def test_masks_cover_the_object(small):
    out, _ = small
    for image_path in sorted(out.glob("*/*/*.png")):
        if image_path.parts[-3] == "masks":
            continue
        relative = image_path.relative_to(out)
        image = np.asarray(Image.open(image_path), np.float32)
        mask = np.asarray(Image.open(out / "masks" / relative))
        assert set(np.unique(mask)) == {0, 255}, relative
        inside = mask == 255
        assert 0.02 < inside.mean() < 0.5, relative
        # The object is one colour (plus shading and noise) that contrasts with the background.
        colour_gap = np.linalg.norm(image[inside].mean(axis=0) - image[~inside].mean(axis=0))
        assert colour_gap > 25, relative
        # Away from the soft edge, the object's pixels are its colour: the mask is not offset from it.
        core = cv2.erode(mask, np.ones((3, 3), np.uint8)) == 255
        assert core.any(), relative
        assert image[core].std(axis=0).max() < 20, relative


def test_same_arguments_give_identical_bytes(small, tmp_path):
    out, _ = small
    make_toy_dataset(tmp_path / "again", **SMALL)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert first == second
    make_toy_dataset(tmp_path / "other", **{**SMALL, "seed": 8})
    assert _files(tmp_path / "other") != first


def test_groups_csv_matches_files(small):
    out, summary = small
    rows = _read_groups(out)
    assert list(rows[0]) == ["source_id", "group", "background"]
    images = sorted(p.relative_to(out).as_posix() for split in SPLITS for p in (out / split).rglob("*.png"))
    assert sorted(row["source_id"] for row in rows) == images
    backgrounds = summary["backgrounds"]
    for row in rows:
        split, name, _ = row["source_id"].split("/")
        expected = summary["classes"].index(name) * len(backgrounds) + backgrounds.index(row["background"])
        assert int(row["group"]) == expected


@pytest.mark.parametrize("spurious", [0.9, 0.6])
def test_spurious_rate_in_train_and_broken_in_test(tmp_path, spurious):
    num = 4
    summary = make_toy_dataset(
        tmp_path / "data",
        num_classes=num,
        train_per_class=40,
        val_per_class=4,
        test_per_class=40,
        size=16,
        spurious=spurious,
    )
    own = {split: [] for split in SPLITS}
    test_backgrounds = {name: [] for name in summary["classes"]}
    for row in _read_groups(tmp_path / "data"):
        split, name, _ = row["source_id"].split("/")
        own[split].append(summary["classes"].index(name) == summary["backgrounds"].index(row["background"]))
        if split == "test":
            test_backgrounds[name].append(row["background"])
    assert abs(np.mean(own["train"]) - spurious) < 0.05
    assert abs(np.mean(own["test"]) - 1 / num) < 0.05
    assert summary["own_background_fraction"]["train"] == pytest.approx(np.mean(own["train"]))
    # In test every class sees every background about equally often.
    for name, seen in test_backgrounds.items():
        assert sorted(set(seen)) == sorted(summary["backgrounds"]), name
        assert max(seen.count(b) for b in set(seen)) - min(seen.count(b) for b in set(seen)) <= 1


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_toy_dataset(tmp_path / "a", num_classes=len(CLASSES) + 1)
    with pytest.raises(ValueError, match="num_classes"):
        make_toy_dataset(tmp_path / "b", num_classes=1)
    with pytest.raises(ValueError, match="spurious"):
        make_toy_dataset(tmp_path / "c", spurious=1.5)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a toy dataset")
    with pytest.raises(ValueError, match="not empty"):
        make_toy_dataset(foreign, **SMALL)
    assert (foreign / "keep.txt").exists()


def test_rebuild_drops_stale_files(tmp_path):
    out = tmp_path / "data"
    make_toy_dataset(out, **{**SMALL, "train_per_class": 8})
    make_toy_dataset(out, **SMALL)
    assert len(list((out / "train" / "circle").iterdir())) == 6
    assert len(list((out / "masks" / "train" / "circle").iterdir())) == 6


def test_main_prints_a_summary(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-classes", "2", "--train-per-class", "2", "--size", "16"])
    line = capsys.readouterr().out.strip()
    assert "2 classes" in line and "train 4" in line
    assert (tmp_path / "cli" / "train" / "cross" / "cross_0001.png").is_file()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--num-classes", "9"])


def test_eval_per_group_fills_every_val_and_test_group(tmp_path):
    # The benchmark's scale in miniature: every class x background group of val/test gets exactly this many
    # images, while train keeps the class/background correlation.
    summary = make_toy_dataset(
        tmp_path / "data", num_classes=3, train_per_class=20, eval_per_group=5, size=16, spurious=0.9
    )
    for split in ("val", "test"):
        assert summary["counts"][split] == {name: 15 for name in summary["classes"]}
        assert sorted(summary["groups"][split].values()) == [5] * 9
    assert summary["own_background_fraction"]["train"] == pytest.approx(0.9)
    written = json.loads((tmp_path / "data" / "dataset.json").read_text())
    assert written["arguments"]["eval_per_group"] == 5 and written["arguments"]["val_per_class"] is None
    with pytest.raises(ValueError, match="eval_per_group"):
        make_toy_dataset(tmp_path / "both", eval_per_group=5, test_per_class=8)
    with pytest.raises(ValueError, match="eval_per_group"):
        make_toy_dataset(tmp_path / "zero", eval_per_group=0)
    main(["--out", str(tmp_path / "cli"), "--num-classes", "2", "--train-per-class", "2", "--size", "16",
          "--eval-per-group", "3"])  # fmt: skip
    assert len(list((tmp_path / "cli" / "test" / "cross").iterdir())) == 6


def test_ood_split_puts_every_class_on_backgrounds_no_other_split_uses(tmp_path):
    summary = make_toy_dataset(tmp_path / "data", num_classes=3, train_per_class=4, eval_per_group=1, size=16,
                               ood_per_group=2)  # fmt: skip
    rows = _read_groups(tmp_path / "data")
    seen = {r["background"] for r in rows if not r["source_id"].startswith("test_ood/")}
    ood = [r for r in rows if r["source_id"].startswith("test_ood/")]
    assert seen == set(BACKGROUNDS[:3]) and summary["ood_backgrounds"] == list(BACKGROUNDS[3:])
    assert {r["background"] for r in ood} == set(BACKGROUNDS[3:])
    # Every (class, unseen background) group gets ood_per_group images; its ids follow the 9 others'.
    assert summary["counts"]["test_ood"] == {name: 10 for name in summary["classes"]}
    assert summary["groups"]["test_ood"] == {str(g): 2 for g in range(9, 24)}
    for row in ood:
        class_index = summary["classes"].index(row["source_id"].split("/")[1])
        expected = 9 + class_index * 5 + BACKGROUNDS[3:].index(row["background"])
        assert int(row["group"]) == expected
        assert summary["group_names"][expected] == f"{CLASSES[class_index]} on {row['background']}"
    assert (tmp_path / "data" / "masks" / ood[0]["source_id"]).is_file()
    # Without the argument nothing changes: no split, no key in the arguments a caller compares.
    plain = make_toy_dataset(tmp_path / "plain", num_classes=3, train_per_class=4, eval_per_group=1, size=16)
    assert "test_ood" not in plain["counts"] and "ood_per_group" not in plain["arguments"]
    with pytest.raises(ValueError, match="no background type is left"):
        make_toy_dataset(tmp_path / "full", num_classes=8, ood_per_group=1)
