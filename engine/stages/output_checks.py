"""Checks every generating stage applies to what it generated, so that a broken output never becomes a
labelled training image. A dropped row goes to `filtered.parquet` (through the stage loop's `drop` column)
with its rule, and run.json counts it:

- `blank_output`: one colour everywhere. A safety checker's black frame, a decoder that saturates, a
  scheduler misconfigured into noise-free grey: whatever produced it, it carries no class.
- `nsfw_flagged`: the pipeline's safety checker (loaded only when the config asks for it) flagged the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BLANK_OUTPUT = "blank_output"
NSFW_FLAGGED = "nsfw_flagged"


def is_blank(image: np.ndarray) -> bool:
    """One value in every pixel and channel (uint8 after conversion)."""
    return image.size == 0 or bool(image.min() == image.max())


def drop_rules(images: Sequence[np.ndarray | None], flagged: Sequence[bool] | None = None) -> np.ndarray:
    """One rule per row ("" keeps it) for the stage's `schema.DROP` column; None images (rows that failed
    before generating) are kept here: their error already takes them out of the stream."""
    rules = np.full(len(images), "", dtype=object)
    for i, image in enumerate(images):
        if image is None:
            continue
        if flagged is not None and flagged[i]:
            rules[i] = NSFW_FLAGGED
        elif is_blank(np.asarray(image)):
            rules[i] = BLANK_OUTPUT
    return rules
