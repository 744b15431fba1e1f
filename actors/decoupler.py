"""De-DA's decoupling: each real image becomes its whole row, its CDP and its CIP (plus CDPs to edit).

Two CPU stages of the `deda` recipe (engine.recipes.deda):

`check_mask_area` (before expansion, on the expanded splits): a subject mask covering less than
`decouple.min_area` or more than `max_area` of the image fails the image (errors `mask_too_small`,
`mask_too_large`), so nothing is written for it; a row without a mask fails as `no_mask` (an image with no
subject never becomes a whole-image CDP).

`Decoupler` (after expansion) turns each row into its part, by variant (`deda_part`):
- 0, the real row: `part` whole, unchanged;
- 1, the CDP: the image and mask cropped to the mask's box (x1, y1 exclusive); `bbox` the whole crop in its
  own pixels; `source_box` (params) where the crop sat in the source image;
- 2, the CIP: the image with the mask's region (dilated) inpainted (engine.methods.decouple.fill_subject),
  every other pixel unchanged; `mask` stays the source mask, which says where the fill is;
- 3 and up, a CDP to edit (`cdp_edited`): the CDP's crop, which the recipe's edit stage regenerates.
Every row keeps its label, class and source_id (its provenance).
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from engine import schema
from engine.config import DecoupleConfig
from engine.methods.decouple import fill_subject
from engine.stages.batch import Batch, error_columns, object_array

SOURCE_BOX = "source_box"  # working column (lands in params): the CDP's box in its source image, JSON
PART_OF_VARIANT = {0: schema.PART_WHOLE, 1: schema.PART_CDP, 2: schema.PART_CIP}
NUM_PARTS = 2  # synthetic rows every image owes before its edited CDPs: the CDP and the CIP


def deda_part(variant: int) -> str:
    return PART_OF_VARIANT.get(variant, schema.PART_CDP_EDITED)


def check_mask_area(batch: Batch, min_area: float, max_area: float) -> Batch:
    """Fail rows whose subject mask is missing or covers a share of the image outside [min_area, max_area]."""
    n = len(batch[schema.IMAGE])
    errors, messages = error_columns(batch, n)
    masks = batch.get(schema.MASK, [None] * n)
    for i in range(n):
        if errors[i]:
            continue
        mask = masks[i]
        if not isinstance(mask, np.ndarray):  # None, or NaN after Ray's round trip
            errors[i], messages[i] = "no_mask", "no subject mask: an image without a subject has no CDP"
            continue
        area = float(np.count_nonzero(mask > 127)) / mask.size
        if area < min_area:
            errors[i] = "mask_too_small"
            messages[i] = f"the subject covers {area:.4f} of the image, below decouple.min_area={min_area}"
        elif area > max_area:
            errors[i] = "mask_too_large"
            messages[i] = f"the subject covers {area:.4f} of the image, above decouple.max_area={max_area}"
    return {**batch, schema.ERROR: errors, schema.ERROR_MESSAGE: messages}


def crop_to_mask(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The image and mask cropped to the mask's bounding box [x0, y0, x1, y1] (x1, y1 exclusive)."""
    x, y, w, h = cv2.boundingRect((mask > 127).astype(np.uint8))
    box = [x, y, x + w, y + h]
    return image[y : y + h, x : x + w].copy(), mask[y : y + h, x : x + w].copy(), box


class Decoupler:
    """Callable for `map_batches`: each row to its part (see the module docstring)."""

    def __init__(self, config: DecoupleConfig):
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        schema.require_columns(batch, (schema.IMAGE, schema.MASK, schema.VARIANT), "decouple")
        n = len(batch[schema.IMAGE])
        images, masks = object_array(list(batch[schema.IMAGE])), object_array(list(batch[schema.MASK]))
        bboxes = object_array(list(batch.get(schema.BBOX, [None] * n)))
        parts = np.array([deda_part(int(v)) for v in batch[schema.VARIANT]], dtype=object)
        source_boxes = np.full(n, "", dtype=object)
        errors, _ = error_columns(batch, n)
        for i in range(n):
            if errors[i] or parts[i] == schema.PART_WHOLE:
                continue
            if parts[i] == schema.PART_CIP:
                images[i] = fill_subject(
                    images[i],
                    masks[i],
                    method=self.config.fill,
                    dilate=self.config.dilate_px,
                    radius=self.config.inpaint_radius,
                )
                bboxes[i] = None
                continue
            images[i], masks[i], box = crop_to_mask(images[i], masks[i])
            bboxes[i] = np.array([0, 0, box[2] - box[0], box[3] - box[1]], np.float32)
            source_boxes[i] = json.dumps(box)
        return {
            **batch,
            schema.IMAGE: images,
            schema.MASK: masks,
            schema.BBOX: bboxes,
            schema.PART: parts,
            SOURCE_BOX: source_boxes,
        }
