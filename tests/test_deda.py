"""De-DA without Ray: the decouple stages (CDP crop, CIP fill, mask bounds), the recombination plan
(engine.train.mixing.select_deda) and the composites (engine.methods.recombine)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.decoupler import Decoupler, check_mask_area, crop_to_mask, deda_part
from engine import schema
from engine.config import DecoupleConfig, PasteConfig
from engine.methods.recombine import CipBank, compose
from engine.stages.batch import object_array
from engine.tiny.toy_dataset import render_example
from engine.train.mixing import RowIndex, check_deda_index, parts_notes, select_deda

SHAPES = ["circle", "cross", "diamond", "hexagon"]


def toy_rows(n: int = 4, size: int = 48) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    examples = [render_example(rng, SHAPES[i % 4], "sand", size) for i in range(n)]
    return {
        schema.IMAGE: object_array([image for image, _ in examples]),
        schema.MASK: object_array([(mask > 0).astype(np.uint8) * 255 for _, mask in examples]),
    }


# ---------------------------------------------------------------- decouple


def test_cdp_is_the_crop_to_the_mask_box_and_cip_fills_only_the_mask():
    rows = toy_rows(1)
    image, mask = rows[schema.IMAGE][0], rows[schema.MASK][0]
    batch = {
        schema.IMAGE: object_array([image] * 4),
        schema.MASK: object_array([mask] * 4),
        schema.VARIANT: np.array([0, 1, 2, 3]),
        schema.ERROR: np.array([""] * 4, dtype=object),
    }
    out = Decoupler(DecoupleConfig(dilate_px=2))(batch)
    assert list(out[schema.PART]) == ["whole", "cdp", "cip", "cdp_edited"]
    assert out[schema.IMAGE][0] is image  # the real row is untouched
    ys, xs = np.nonzero(mask > 127)
    box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    for i in (1, 3):  # the CDP and the CDP to edit: the crop to the mask's box, its mask beside it
        assert json.loads(out["source_box"][i]) == box
        assert np.array_equal(out[schema.IMAGE][i], image[box[1] : box[3], box[0] : box[2]])
        assert np.array_equal(out[schema.MASK][i], mask[box[1] : box[3], box[0] : box[2]])
        assert out[schema.BBOX][i].tolist() == [0, 0, box[2] - box[0], box[3] - box[1]]
    cip = out[schema.IMAGE][2]
    region = cv2.dilate((mask > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.array_equal(cip[~region], image[~region]), "outside the (dilated) mask the CIP is the image"
    assert (cip[mask > 0] != image[mask > 0]).any(axis=-1).mean() > 0.5, "the subject is filled"
    assert np.array_equal(out[schema.MASK][2], mask)  # the CIP's mask says where the fill is
    assert [deda_part(v) for v in (0, 1, 2, 3, 7)] == ["whole", "cdp", "cip", "cdp_edited", "cdp_edited"]


def test_mask_bounds_fail_the_image_with_their_reason():
    rows = toy_rows(1, size=48)
    image = rows[schema.IMAGE][0]
    tiny = np.zeros((48, 48), np.uint8)
    tiny[10, 10] = 255
    huge = np.full((48, 48), 255, np.uint8)
    batch = {
        schema.IMAGE: object_array([image] * 5),
        schema.MASK: object_array([rows[schema.MASK][0], tiny, huge, None, rows[schema.MASK][0]]),
        schema.ERROR: np.array(["", "", "", "", "decode"], dtype=object),
    }
    out = check_mask_area(batch, min_area=0.01, max_area=0.9)
    assert list(out[schema.ERROR]) == ["", "mask_too_small", "mask_too_large", "no_mask", "decode"]
    assert "below decouple.min_area=0.01" in out[schema.ERROR_MESSAGE][1]
    with pytest.raises(ValueError, match="min_area"):
        DecoupleConfig(min_area=0.5, max_area=0.4)


# ---------------------------------------------------------------- the plan


def deda_index(num_classes: int = 4, per_class: int = 50, edits: int = 2, cip_classes=None) -> RowIndex:
    """Per real image: its real row, a CDP, a CIP and `edits` edited CDPs (cip_classes: classes with CIPs)."""
    ids, labels, sources, synthetic, parts = [], [], [], [], []
    cip_classes = range(num_classes) if cip_classes is None else cip_classes
    for label in range(num_classes):
        for k in range(per_class):
            source = f"s{label}-{k}"
            row_parts = ["whole", "cdp"] + (["cip"] if label in cip_classes else []) + ["cdp_edited"] * edits
            for j, part in enumerate(row_parts):
                ids.append(f"{source}-{j}")
                labels.append(label)
                sources.append(source)
                synthetic.append(part != "whole")
                parts.append(part)
    return RowIndex(
        ids=np.array(ids, object),
        labels=np.array(labels),
        source_ids=np.array(sources, object),
        synthetic=np.array(synthetic),
        parts=np.array(parts, object),
    )


def test_deda_replaces_with_probability_p_by_a_cdp_of_the_same_class():
    index = deda_index()
    real = index.real_positions
    p, share = 0.3, 0.25
    positions, counts = select_deda(index, np.random.default_rng(0), p, share)
    assert len(positions) == len(real) and counts["stayed_real"] == 0
    replaced = positions != real
    n = len(real)
    assert abs(replaced.sum() - p * n) <= 3 * np.sqrt(n * p * (1 - p)), replaced.sum()
    assert (index.labels[positions] == index.labels[real]).all(), "a slot keeps its label"
    assert set(index.parts[positions[replaced]]) <= {"cdp", "cdp_edited"}
    edited = (index.parts[positions[replaced]] == "cdp_edited").sum()
    k = replaced.sum()
    assert abs(edited - share * k) <= 3 * np.sqrt(k * share * (1 - share)), (edited, k)
    # Redrawn per epoch (another generator), the same for the same generator state.
    again, _ = select_deda(index, np.random.default_rng(0), p, share)
    other, _ = select_deda(index, np.random.default_rng(1), p, share)
    assert np.array_equal(positions, again) and not np.array_equal(positions, other)


def test_deda_keeps_samples_real_where_no_other_class_has_a_cip():
    index = deda_index(num_classes=2, cip_classes=[0])  # class 1 has CIPs of class 0; class 0 has none else
    positions, counts = select_deda(index, np.random.default_rng(0), 1.0, 0.5)
    real = index.real_positions
    class0 = index.labels[real] == 0
    assert np.array_equal(positions[class0], real[class0]) and counts["stayed_real"] == class0.sum()
    assert (positions[~class0] != real[~class0]).all()
    notes = parts_notes(index, "deda", ["circle", "cross"])
    assert notes == ["mix.strategy deda: class 'circle' keeps its samples real: no other class has a CIP"]
    assert "only mix.strategy deda uses them" in parts_notes(index, "concat", ["circle", "cross"])[0]
    # Other strategies never take a part as a sample of its own.
    assert len(index.synthetic_positions) == 0


def test_deda_needs_parts_and_two_classes():
    with pytest.raises(ValueError, match=r"no train rows with part \['cdp', 'cip'\]"):
        check_deda_index(
            RowIndex(np.array(["a"], object), np.array([0]), np.array(["a"], object), np.array([False]))
        )
    with pytest.raises(ValueError, match="another class's background: the train split has 1 class"):
        check_deda_index(deda_index(num_classes=1))


# ---------------------------------------------------------------- composites


def cip_bank(tmp_path, labels=(0, 1, 2, 3), size=40) -> CipBank:
    """A bank read from a shard file, as training builds it."""
    rng = np.random.default_rng(1)
    images = []
    for label in labels:
        image, _ = render_example(rng, SHAPES[label], ["grass", "water", "sand", "brick"][label], size)
        images.append(cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes())
    table = pa.table(
        {
            schema.ID: [f"cip{i}" for i in range(len(labels))],
            schema.LABEL: pa.array(labels, pa.int64()),
            schema.IMAGE: images,
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    return CipBank.read([str(tmp_path / "part-0.parquet")], np.array([f"cip{i}" for i in range(len(labels))]))


def test_a_composite_never_takes_a_cip_of_its_own_class_and_is_a_function_of_its_seed(tmp_path):
    bank = cip_bank(tmp_path)
    rows = toy_rows(1, size=48)
    cdp, mask, _ = crop_to_mask(rows[schema.IMAGE][0], rows[schema.MASK][0])
    paste = PasteConfig(rotation_deg=(0.0, 0.0))
    drawn = set()
    for seed in range(200):
        image, position = compose(cdp, mask, 2, bank, np.random.default_rng(seed), paste)
        assert int(bank.table[schema.LABEL][position].as_py()) != 2
        assert image.shape == (40, 40, 3)  # the CIP's size
        drawn.add(position)
    assert drawn == {0, 1, 3}, "every other class's CIP is drawn"
    first, _ = compose(cdp, mask, 2, bank, np.random.default_rng(7), paste)
    second, _ = compose(cdp, mask, 2, bank, np.random.default_rng(7), paste)
    assert np.array_equal(first, second)
    # The subject's pixels are in the composite: some composite pixel holds the CDP's subject colour.
    subject_colour = cdp[mask > 127].mean(0)
    assert (np.abs(first.astype(float) - subject_colour).sum(-1) < 30).any()
    # A bank with only the sample's own class: nothing to draw.
    alone = CipBank(bank.table.filter(pa.array([False, False, True, False])))
    unchanged, position = compose(cdp, mask, 2, alone, np.random.default_rng(0), paste)
    assert position == -1 and unchanged is cdp
