import json

import cv2
import numpy as np
import pytest

from actors.compositor import COMPOSITE_PARAMS, Compositor
from engine.config import CompositeConfig
from engine.methods.paste import composite_one, cover_resize
from engine.schema import BACKGROUND, BBOX, ERROR, ERROR_MESSAGE, IMAGE, MASK, SEED

SUBJECT = (255, 0, 0)  # red subject on a blue source, pasted onto a green background
SOURCE_BG = (0, 0, 255)
NEW_BG = (0, 255, 0)


def make_row(height=96, width=128, centre=(50, 45), axes=(22, 14), bg_shape=(160, 90)):
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = SOURCE_BG
    image[mask > 0] = SUBJECT
    background = np.empty((*bg_shape, 3), np.uint8)
    background[:] = NEW_BG
    return image, mask, background


def config(**kwargs) -> CompositeConfig:
    return CompositeConfig(**kwargs)


def objects(arrays: list[np.ndarray]) -> np.ndarray:
    """An object column as Ray Data hands over variable-shaped images."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


def colour_error(pixels: np.ndarray, colour) -> int:
    return int(np.abs(pixels.astype(int) - colour).max()) if len(pixels) else 0


def test_shapes_binary_mask_and_alignment():
    image, mask, background = make_row()
    cfg = config(feather_px=1.5)
    for seed in range(20):
        out, out_mask, bbox, _ = composite_one(image, mask, background, seed, cfg)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert out_mask.shape == mask.shape and set(np.unique(out_mask)) == {0, 255}
        # Feathering reaches 3 sigma: away from the edge, inside is subject and outside is background.
        edge = 2 * 6 + 1
        inside = cv2.erode(out_mask, np.ones((edge, edge), np.uint8))
        outside = cv2.dilate(out_mask, np.ones((edge, edge), np.uint8)) == 0
        assert inside.any() and outside.any()
        assert colour_error(out[inside > 0], SUBJECT) <= 1
        assert colour_error(out[outside], NEW_BG) == 0
        x0, y0, x1, y1 = bbox.astype(int)
        ys, xs = np.nonzero(out_mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_hard_edges_without_feather():
    image, mask, background = make_row()
    out, out_mask, _, _ = composite_one(image, mask, background, 3, config(feather_px=0))
    inside = cv2.erode(out_mask, np.ones((3, 3), np.uint8))
    outside = cv2.dilate(out_mask, np.ones((3, 3), np.uint8)) == 0
    assert colour_error(out[inside > 0], SUBJECT) == 0
    assert colour_error(out[outside], NEW_BG) == 0


def test_identity_transform_preserves_area():
    image, mask, background = make_row()
    cfg = config(flip_prob=0, rotation_deg=(0, 0), scale=(1, 1))
    for seed in range(5):
        _, out_mask, _, params = composite_one(image, mask, background, seed, cfg)
        assert params["flip"] is False and params["angle"] == 0 and params["scale"] == 1
        assert abs((out_mask > 0).sum() / (mask > 0).sum() - 1) < 0.03


def test_half_scale_quarters_area():
    image, mask, background = make_row(axes=(40, 30))
    cfg = config(rotation_deg=(-15, 15), scale=(0.5, 0.5))
    for seed in range(5):
        _, out_mask, _, params = composite_one(image, mask, background, seed, cfg)
        assert params["scale"] == 0.5
        assert abs((out_mask > 0).sum() / (mask > 0).sum() - 0.25) < 0.02


def test_params_within_configured_ranges():
    image, mask, background = make_row()
    cfg = config(flip_prob=0.5, rotation_deg=(-20, 10), scale=(0.7, 1.1))
    flips = []
    for seed in range(200):
        params = composite_one(image, mask, background, seed, cfg)[3]
        assert -20 <= params["angle"] <= 10
        assert 0.7 <= params["scale"] == params["scale_drawn"] <= 1.1
        flips.append(params["flip"])
    assert 60 < sum(flips) < 140
    cfg0 = config(flip_prob=0)
    assert not any(composite_one(image, mask, background, s, cfg0)[3]["flip"] for s in range(50))
    cfg1 = config(flip_prob=1)
    assert all(composite_one(image, mask, background, s, cfg1)[3]["flip"] for s in range(50))


def test_flip_mirrors_the_subject():
    image, mask, background = make_row()
    left_half = (mask > 0) & (np.arange(mask.shape[1]) < 50)
    image[left_half] = (255, 255, 0)  # yellow left half: after a flip it is on the right
    cfg = config(flip_prob=1, rotation_deg=(0, 0), scale=(1, 1), feather_px=0)
    out, out_mask, bbox, _ = composite_one(image, mask, background, 0, cfg)
    x0, _, x1, _ = bbox.astype(int)
    columns = np.arange(out.shape[1])
    subject = out_mask > 0
    yellow = np.all(out == (255, 255, 0), axis=2) & subject
    red = np.all(out == SUBJECT, axis=2) & subject
    assert columns[np.nonzero(yellow)[1]].mean() > (x0 + x1) / 2 > columns[np.nonzero(red)[1]].mean()


def test_rotation_turns_the_subject():
    image, mask, background = make_row(axes=(30, 6))  # wide, flat subject
    _, out_mask, bbox, _ = composite_one(
        image, mask, background, 0, config(rotation_deg=(90, 90), scale=(1, 1))
    )
    x0, y0, x1, y1 = bbox
    assert y1 - y0 > 3 * (x1 - x0)


@pytest.mark.parametrize("scale", [(1.0, 1.5), (2.0, 3.0)])
def test_subject_stays_in_frame(scale):
    # A subject filling most of the frame, scaled up: it is placed, or shrunk, to stay whole.
    image, mask, background = make_row(height=96, width=128, centre=(64, 48), axes=(55, 40))
    cfg = config(rotation_deg=(-30, 30), scale=scale)
    area = (mask > 0).sum()
    for seed in range(40):
        _, out_mask, bbox, params = composite_one(image, mask, background, seed, cfg)
        x0, y0, x1, y1 = bbox
        assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 96
        assert params["scale"] <= params["scale_drawn"]
        # Not clipped: the area matches the effective scale.
        assert abs((out_mask > 0).sum() / area / params["scale"] ** 2 - 1) < 0.05


def test_deterministic_per_seed():
    image, mask, background = make_row()
    image = image.copy()
    image[mask > 0] = np.random.default_rng(0).integers(0, 256, (int((mask > 0).sum()), 3))
    a = composite_one(image, mask, background, 7, config())
    b = composite_one(image, mask, background, 7, config())
    c = composite_one(image, mask, background, 8, config())
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a[3] == b[3]
    assert not np.array_equal(a[0], c[0]) and a[3] != c[3]


def test_cover_resize_crops_the_centre_without_distortion():
    # A 200x100 background with a 100x100 centre square of a distinct colour.
    background = np.zeros((100, 200, 3), np.uint8)
    background[:, 50:150] = (9, 99, 199)
    out = cover_resize(background, 64, 64)
    assert out.shape == (64, 64, 3)
    assert colour_error(out.reshape(-1, 3), (9, 99, 199)) == 0
    wide = cover_resize(background, 30, 120)  # upscale to cover the width, crop the height
    assert wide.shape == (30, 120, 3)
    assert colour_error(wide[:, 32:88].reshape(-1, 3), (9, 99, 199)) == 0
    assert colour_error(wide[:, :28].reshape(-1, 3), (0, 0, 0)) == 0


def test_background_of_another_size_and_aspect():
    image, mask, background = make_row(height=96, width=128, bg_shape=(300, 80))
    out, out_mask, _, _ = composite_one(image, mask, background, 0, config())
    assert out.shape == image.shape and out_mask.shape == mask.shape


def test_read_only_inputs_are_not_modified():
    image, mask, background = make_row()
    for array in (image, mask, background):
        array.setflags(write=False)
    before = background.copy()
    composite_one(image, mask, background, 0, config())
    assert np.array_equal(background, before)


def test_batch_with_an_empty_mask_row():
    rows = [make_row(), make_row(height=64, width=80, centre=(40, 30), axes=(10, 8)), make_row()]
    rows[1][1][:] = 0
    batch = {
        IMAGE: objects([r[0] for r in rows]),
        MASK: objects([r[1] for r in rows]),
        BACKGROUND: objects([r[2] for r in rows]),
        SEED: np.array([1, 2, 3], np.int64),
        "label": np.array([0, 1, 2]),
    }
    out = Compositor(config())(batch)
    assert list(out[ERROR]) == ["", "empty_mask", ""]
    assert out[ERROR_MESSAGE][0] == "" and out[ERROR_MESSAGE][1]
    assert out[IMAGE][1] is rows[1][0] and out[MASK][1] is rows[1][1]
    assert np.isnan(out[BBOX][1]).all() and out[COMPOSITE_PARAMS][1] == ""
    for i in (0, 2):
        assert out[IMAGE][i].shape == rows[i][0].shape and not np.array_equal(out[IMAGE][i], rows[i][0])
        assert set(json.loads(out[COMPOSITE_PARAMS][i])) >= {"flip", "angle", "scale", "dx", "dy"}
    assert out[BBOX].dtype == np.float32 and out[BBOX].shape == (3, 4)
    assert out[BACKGROUND] is batch[BACKGROUND] and list(out["label"]) == [0, 1, 2]


def test_batch_as_fixed_shape_tensors_and_earlier_errors_pass_through():
    image, mask, background = make_row()
    batch = {
        IMAGE: np.stack([image, image]),
        MASK: np.stack([mask, mask]),
        BACKGROUND: np.stack([background, background]),
        SEED: np.array([1, 2], np.int64),
        BBOX: np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32),
        ERROR: np.array(["no_detection", ""]),
        ERROR_MESSAGE: np.array(["nothing found", ""]),
    }
    out = Compositor(config())(batch)
    assert list(out[ERROR]) == ["no_detection", ""] and out[ERROR_MESSAGE][0] == "nothing found"
    assert np.array_equal(out[IMAGE][0], image) and out[COMPOSITE_PARAMS][0] == ""
    assert out[BBOX][0].tolist() == [1, 2, 3, 4] and out[BBOX][1].tolist() != [5, 6, 7, 8]


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="background"):
        Compositor(config())({IMAGE: np.empty(0, object), MASK: np.empty(0, object), SEED: np.empty(0)})
