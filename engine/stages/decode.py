"""Decode + validate (a stateless CPU stage): encoded bytes -> upright RGB arrays, bad rows -> errors.

Reads: image_bytes, mask_bytes (may be None), label, class_name. Writes: image (HxWx3 uint8), mask (HxW
uint8 0/255 or None), width, height; drops image_bytes/mask_bytes. Error reasons: missing_file, decode,
too_large, too_small, unknown_label, missing_mask, mask_size.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from engine import schema
from engine.stages.batch import Batch, is_missing, object_array


class RowError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_images(batch: Batch, max_pixels: int, min_side: int, require_masks: bool) -> Batch:
    n = len(batch[schema.IMAGE_BYTES])
    # A source without masks may drop the column altogether (see engine.stages.batch.pack).
    mask_column = batch.get(schema.MASK_BYTES, np.full(n, None, dtype=object))
    images, masks, errors, messages = [None] * n, [None] * n, [""] * n, [""] * n
    for i in range(n):
        try:
            if batch[schema.CLASS_NAME][i] == "" or batch[schema.LABEL][i] < 0:
                raise RowError("unknown_label", f"label {batch[schema.LABEL][i]} has no class name")
            images[i] = decode_image(batch[schema.IMAGE_BYTES][i], max_pixels, min_side)
            mask_bytes = mask_column[i]
            if is_missing(mask_bytes) and require_masks:
                raise RowError("missing_mask", "segment.use_dataset_masks is on but this image has no mask")
            if not is_missing(mask_bytes):
                masks[i] = decode_mask(mask_bytes, images[i].shape[:2], max_pixels)
        except RowError as err:
            images[i], masks[i] = None, None
            errors[i], messages[i] = err.reason, str(err)
    out = {k: v for k, v in batch.items() if k not in (schema.IMAGE_BYTES, schema.MASK_BYTES)}
    out[schema.IMAGE] = object_array(images)
    out[schema.MASK] = object_array(masks)
    out[schema.HEIGHT] = np.array([im.shape[0] if im is not None else 0 for im in images], dtype=np.int32)
    out[schema.WIDTH] = np.array([im.shape[1] if im is not None else 0 for im in images], dtype=np.int32)
    out[schema.ERROR] = np.array(errors, dtype=object)
    out[schema.ERROR_MESSAGE] = np.array(messages, dtype=object)
    return out


def decode_image(data: bytes | None, max_pixels: int, min_side: int) -> np.ndarray:
    with _open(data, max_pixels) as img:
        img = ImageOps.exif_transpose(img)  # camera photos are stored sideways with an EXIF rotation
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # Flatten transparency onto white rather than letting convert("RGB") expose hidden colours.
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(canvas, rgba)
        elif img.mode.startswith("I;16") or img.mode == "I":
            # 16-bit: scale to 8 bits (convert("L") would clip everything above 255 to white).
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr / max(arr.max(), 1.0) * 255).astype(np.uint8))
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if min(rgb.shape[:2]) < min_side:
        raise RowError("too_small", f"image is {rgb.shape[1]}x{rgb.shape[0]}, below min_side={min_side}")
    return rgb


def decode_mask(data: bytes, shape: tuple[int, int], max_pixels: int) -> np.ndarray:
    with _open(data, max_pixels) as img:
        mask = np.asarray(img.convert("L"), dtype=np.uint8)
    if mask.shape != shape:
        raise RowError("mask_size", f"mask is {mask.shape[::-1]}, image is {shape[::-1]}")
    return np.where(mask >= 128, 255, 0).astype(np.uint8)


class _open:
    """Open + fully load an image with the decompression-bomb guard; every failure is a RowError."""

    def __init__(self, data: bytes | None, max_pixels: int) -> None:
        self.data, self.max_pixels = data, max_pixels

    def __enter__(self) -> Image.Image:
        if is_missing(self.data):
            raise RowError("missing_file", "the file could not be read")
        if len(self.data) == 0:
            raise RowError("decode", "empty file")
        try:
            img = Image.open(io.BytesIO(self.data))
            # Check the header's size before decoding a single pixel: a bomb never gets allocated.
            if img.width * img.height > self.max_pixels:
                raise RowError("too_large", f"{img.width}x{img.height} exceeds max_pixels={self.max_pixels}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
        except RowError:
            raise
        except Image.DecompressionBombError as exc:
            raise RowError("too_large", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise RowError("decode", f"{type(exc).__name__}: {exc}") from None
        self.img = img
        return img

    def __exit__(self, *exc) -> None:
        if hasattr(self, "img"):
            self.img.close()
