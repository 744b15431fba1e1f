"""Decode + validate: bad inputs become row errors with a reason; good ones decode upright RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from engine import schema
from engine.stages.decode import decode_images


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def batch_of(images, masks=None, labels=None):
    n = len(images)
    return {
        schema.SOURCE_ID: np.array([f"s{i}" for i in range(n)], dtype=object),
        schema.IMAGE_BYTES: _objects(images),
        schema.MASK_BYTES: _objects(masks or [None] * n),
        schema.LABEL: np.array(labels or [0] * n, dtype=np.int64),
        schema.CLASS_NAME: np.array(
            ["circle" if (labels or [0] * n)[i] >= 0 else "" for i in range(n)], dtype=object
        ),
    }


def _objects(values):
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def run(images, **kwargs):
    args = {"max_pixels": 10_000, "min_side": 4, "require_masks": False} | kwargs
    return decode_images(batch_of(images), **args)


def test_good_and_bad_rows_side_by_side():
    good = encode(Image.new("RGB", (20, 10), (10, 200, 30)))
    truncated = good[: len(good) // 2]
    out = run([good, truncated, b"", None, b"not an image at all"])
    assert list(out[schema.ERROR]) == ["", "decode", "decode", "missing_file", "decode"]
    assert out[schema.IMAGE][0].shape == (10, 20, 3)
    assert out[schema.IMAGE][0].dtype == np.uint8
    assert (out[schema.WIDTH][0], out[schema.HEIGHT][0]) == (20, 10)
    assert all(out[schema.IMAGE][i] is None for i in range(1, 5))


def test_size_guards():
    bomb = encode(Image.new("L", (200, 200)))  # 40k pixels > max_pixels=10k
    tiny = encode(Image.new("RGB", (1, 1)))
    out = run([bomb, tiny])
    assert list(out[schema.ERROR]) == ["too_large", "too_small"]


@pytest.mark.parametrize(
    "img",
    [
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        Image.new("L", (8, 8), 128),
        Image.new("RGBA", (8, 8), (255, 0, 0, 0)),
        Image.new("I;16", (8, 8), 40000),
        Image.new("P", (8, 8), 1),
    ],
    ids=["cmyk", "gray", "rgba", "16bit", "palette"],
)
def test_odd_modes_decode_to_rgb(img):
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    out = run([encode(img, fmt)])
    assert out[schema.ERROR][0] == ""
    assert out[schema.IMAGE][0].shape == (8, 8, 3)


def test_transparent_pixels_flatten_to_white():
    out = run([encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))])
    assert (out[schema.IMAGE][0] == 255).all()


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = run([encode(img, "JPEG", exif=exif)])
    assert out[schema.IMAGE][0].shape == (30, 10, 3)  # upright: tall, not wide


def test_masks_checked_against_image():
    img = encode(Image.new("RGB", (10, 10)))
    good_mask = encode(Image.new("L", (10, 10), 200))
    wrong_size = encode(Image.new("L", (5, 5), 200))
    batch = batch_of([img, img, img], masks=[good_mask, wrong_size, None])
    out = decode_images(batch, max_pixels=10_000, min_side=4, require_masks=True)
    assert list(out[schema.ERROR]) == ["", "mask_size", "missing_mask"]
    assert set(np.unique(out[schema.MASK][0])) == {255}


def test_unknown_label_is_an_error():
    img = encode(Image.new("RGB", (10, 10)))
    batch = batch_of([img, img], labels=[0, -1])
    out = decode_images(batch, max_pixels=10_000, min_side=4, require_masks=False)
    assert list(out[schema.ERROR]) == ["", "unknown_label"]


def test_mask_column_that_came_back_from_arrow_as_nan_means_no_masks():
    """A source without masks has an all-None mask column, which Ray's Arrow round trip returns as float NaN;
    every stage's input goes through `unpack`, after which the rows decode with no mask."""
    from engine.stages.batch import unpack

    image = encode(Image.new("RGB", (8, 6), (10, 200, 30)))
    batch = batch_of([image, image])
    batch[schema.MASK_BYTES] = np.full(2, np.nan, dtype=np.float32)  # what Ray Data hands the next stage
    assert list(unpack(dict(batch))[schema.MASK_BYTES]) == [None, None]
    out = decode_images(unpack(batch), max_pixels=10_000, min_side=4, require_masks=False)
    assert list(out[schema.ERROR]) == ["", ""]
    assert out[schema.IMAGE][0].shape == (6, 8, 3) and out[schema.MASK][0] is None
    # With masks required, the same rows are missing_mask errors, not exceptions.
    out = decode_images(unpack(batch_of([image])), max_pixels=10_000, min_side=4, require_masks=True)
    assert list(out[schema.ERROR]) == ["missing_mask"]


def test_mask_column_absent_means_no_masks():
    image = encode(Image.new("RGB", (8, 6)))
    batch = batch_of([image])
    del batch[schema.MASK_BYTES]
    out = decode_images(batch, max_pixels=10_000, min_side=4, require_masks=False)
    assert list(out[schema.ERROR]) == [""] and out[schema.MASK][0] is None
