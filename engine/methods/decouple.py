"""Splitting an image into its class-dependent part (the subject under its mask) and its class-independent part
(the background with the subject's region filled): De-DA's CDP / CIP, and the background-only images a domain
generator learns backgrounds from.

The fill is OpenCV's inpainting (Telea 2004), the CPU default De-DA's issue names; a generative inpainting
pipeline is the GPU alternative. The mask is dilated first so that the subject's soft, anti-aliased edge is
filled too rather than smeared into the background.
"""

from __future__ import annotations

import cv2
import numpy as np

FILL_METHODS = {"telea": cv2.INPAINT_TELEA, "navier_stokes": cv2.INPAINT_NS}


def fill_subject(
    image: np.ndarray, mask: np.ndarray, *, method: str = "telea", dilate: int = 2, radius: int = 3
) -> np.ndarray:
    """`image` (H x W x 3 uint8) with the pixels under `mask` (H x W, nonzero = subject), dilated by `dilate`
    px, inpainted from their surroundings; every pixel outside the dilated mask is returned unchanged."""
    if method not in FILL_METHODS:
        raise ValueError(f"fill method {method!r} is not one of {sorted(FILL_METHODS)}")
    region = (np.asarray(mask) > 0).astype(np.uint8)
    if dilate:
        region = cv2.dilate(region, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8))
    if not region.any():
        return image.copy()
    filled = cv2.inpaint(np.ascontiguousarray(image), region * 255, radius, FILL_METHODS[method])
    return np.where(region[..., None] > 0, filled, image)
