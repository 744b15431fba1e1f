"""AGA compositor: paste the real subject back onto its generated background with a random flip/rotate/scale
(the paste itself: engine.methods.paste.composite_one).

Stage `composite` (CPU, Ray Data `map_batches`, batch_format="numpy").

Reads:
- `image`: HxWx3 uint8, the real source image
- `mask`: HxW uint8 0/255, the subject
- `background`: hxwx3 uint8 of any size (SDXL output); cover-resized to HxW
- `seed`: int64; the row's flip, angle, scale and position are drawn from `np.random.default_rng(seed)`
- `error`, `error_message` (optional): rows an earlier stage failed pass through untouched

Writes:
- `image`: the composite, HxWx3 uint8 (the source's size)
- `mask`: the transformed subject mask, HxW uint8 0/255, aligned with the pasted subject
- `bbox`: float32 [x0, y0, x1, y1] of the new mask (x1, y1 exclusive); NaN where no row was composited
  and no earlier bbox existed
- `composite_params`: JSON {flip, angle (deg, counter-clockwise), scale (effective), scale_drawn,
  dx, dy (subject-centre shift, px)}; "" for rows not composited
- `error`, `error_message`: "empty_mask" (or "subject_too_small") for rows that cannot be composited; those
  rows keep their image and mask
Keeps every other column, `background` included (the engine drops it later).
"""

from __future__ import annotations

import json

import numpy as np

from engine.config import CompositeConfig
from engine.methods.paste import CompositeRowError, composite_one
from engine.schema import BACKGROUND, BBOX, ERROR, ERROR_MESSAGE, IMAGE, MASK, SEED, require_columns
from engine.stages.batch import error_columns

COMPOSITE_PARAMS = "composite_params"
READS = (IMAGE, MASK, BACKGROUND, SEED)


def _object_column(values, n: int) -> np.ndarray:
    """Copy a column into a 1-D object array (a fixed-shape tensor column arrives as one N-d array)."""
    out = np.empty(n, dtype=object)
    for i in range(n):
        out[i] = values[i]
    return out


def _bbox_column(batch: dict[str, np.ndarray], n: int) -> np.ndarray:
    """An earlier stage's bbox stays valid for rows whose image this stage leaves unchanged."""
    out = np.full((n, 4), np.nan, np.float32)
    for i, box in enumerate(batch.get(BBOX, [None] * n)):
        if box is not None:
            out[i] = box
    return out


class Compositor:
    """Callable for `map_batches`: composites every row an earlier stage did not fail (see module doc)."""

    def __init__(self, config: CompositeConfig):
        self.config = config

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_columns(batch, READS, "composite")
        n = len(batch[IMAGE])
        images, masks = _object_column(batch[IMAGE], n), _object_column(batch[MASK], n)
        bboxes = _bbox_column(batch, n)
        params = np.full(n, "", dtype=object)
        errors, messages = error_columns(batch, n)
        for i in range(n):
            if errors[i]:
                continue
            try:
                image, mask, bbox, row_params = composite_one(
                    images[i], masks[i], batch[BACKGROUND][i], int(batch[SEED][i]), self.config
                )
            except CompositeRowError as err:
                errors[i], messages[i] = err.reason, str(err)
                continue
            images[i], masks[i], bboxes[i], params[i] = image, mask, bbox, json.dumps(row_params)
        return {
            **batch,
            IMAGE: images,
            MASK: masks,
            BBOX: bboxes,
            COMPOSITE_PARAMS: params,
            ERROR: errors,
            ERROR_MESSAGE: messages,
        }
