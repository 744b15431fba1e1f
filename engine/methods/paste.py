"""Pasting a subject onto a background with a random flip / rotation / scale / position, alpha-blended by its
mask: AGA's composite stage (actors.compositor) and De-DA's recombination (engine.methods.recombine) both call
`composite_one`. Pure numpy/OpenCV: no Ray, no model.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from engine.config import PasteConfig

# A pixel of the mask is subject when its (warped) value is at least half of 255.
_HALF = 127

# Offsets from a pixel centre to its four corners: the transformed subject's extent is that of its
# hull pixels' corners, so a subject that touches the frame edge is not clipped by half a pixel.
_PIXEL_CORNERS = np.array([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]], np.float32)


class CompositeRowError(ValueError):
    """A row that cannot be composited; `reason` goes to the `error` column."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def cover_resize(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale `background` to cover height x width, centre-crop, no distortion; always a new array."""
    bh, bw = background.shape[:2]
    if (bh, bw) == (height, width):
        return background.copy()
    s = max(width / bw, height / bh)
    # Cropping before resizing keeps the work at the output size; the crop rounds to whole source
    # pixels, a distortion below half a background pixel.
    cw, ch = min(bw, max(1, round(width / s))), min(bh, max(1, round(height / s)))
    x0, y0 = (bw - cw) // 2, (bh - ch) // 2
    interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(background[y0 : y0 + ch, x0 : x0 + cw], (width, height), interpolation=interpolation)


def _check_row(image: np.ndarray, mask: np.ndarray, background: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"composite: image must be HxWx3 uint8, got {image.shape} {image.dtype}")
    if mask.shape != image.shape[:2] or mask.dtype != np.uint8:
        raise ValueError(f"composite: mask must be {image.shape[:2]} uint8, got {mask.shape} {mask.dtype}")
    if background.ndim != 3 or background.shape[2] != 3 or background.dtype != np.uint8:
        raise ValueError(
            f"composite: background must be hxwx3 uint8, got {background.shape} {background.dtype}"
        )


def composite_one(
    image: np.ndarray, mask: np.ndarray, background: np.ndarray, seed: int, config: PasteConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One row: (composite HxWx3, mask HxW 0/255, bbox float32[4], params). Raises CompositeRowError."""
    _check_row(image, mask, background)
    height, width = image.shape[:2]
    subject = cv2.threshold(mask, _HALF, 255, cv2.THRESH_BINARY)[1]
    x, y, w, h = cv2.boundingRect(subject)
    if w == 0:
        raise CompositeRowError("empty_mask", "the subject mask is all zeros: nothing to paste")

    # 1. Draw the row's transform; always the same five draws, so a seed means one composite.
    rng = np.random.default_rng(seed)
    flip = bool(rng.random() < config.flip_prob)
    angle = float(rng.uniform(*config.rotation_deg))
    scale_drawn = float(rng.uniform(*config.scale))
    position = rng.random(2)

    # 2. Linear part at unit scale: flip in the subject's own frame, then rotate counter-clockwise
    #    on screen (cv2.getRotationMatrix2D's convention for y pointing down).
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    linear = np.array([[cos, sin], [-sin, cos]], np.float64)
    if flip:
        linear[:, 0] *= -1
    centre = np.array([x + (w - 1) / 2, y + (h - 1) / 2])

    # 3. Extent of the transformed subject around its centre, from its convex hull (tighter than the
    #    rotated bounding box, so large subjects keep more of their drawn scale).
    contours, _ = cv2.findContours(subject[y : y + h, x : x + w], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours)).reshape(-1, 1, 2) + np.array([x, y], np.float32)
    corners = (hull + _PIXEL_CORNERS).reshape(-1, 2) - centre
    rotated = corners @ linear.T
    lo, hi = rotated.min(axis=0), rotated.max(axis=0)
    frame = np.array([width, height], np.float64)
    scale = min(scale_drawn, float(np.min(frame / (hi - lo))))  # shrink only when it cannot fit
    lo, hi = lo * scale, hi * scale

    # 4. Place the subject uniformly among the positions that keep it whole inside the frame.
    t_lo, t_hi = -0.5 - lo, frame - 0.5 - hi
    target = t_lo + position * np.maximum(t_hi - t_lo, 0.0)
    matrix = np.hstack([linear * scale, (target - linear * scale @ centre)[:, None]])

    # 5. Work only on the subject's neighbourhood: the output box it lands in (plus the feather and
    #    bilinear reach) and the source box that maps there.
    reach = math.ceil(3 * config.feather_px) + 1
    ox0, oy0 = np.maximum(np.floor(target + lo - reach).astype(int), 0)
    ox1, oy1 = np.minimum(np.ceil(target + hi + reach).astype(int) + 1, frame.astype(int))
    src_reach = math.ceil(reach / scale) + 1
    sx0, sy0 = max(x - src_reach, 0), max(y - src_reach, 0)
    sx1, sy1 = min(x + w + src_reach, width), min(y + h + src_reach, height)
    to_roi = matrix.copy()
    to_roi[:, 2] += matrix[:, :2] @ np.array([sx0, sy0]) - np.array([ox0, oy0])
    size = (int(ox1 - ox0), int(oy1 - oy0))

    # Replicating the border keeps the feathered halo from blending in black.
    pasted = cv2.warpAffine(
        image[sy0:sy1, sx0:sx1], to_roi, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    alpha8 = cv2.warpAffine(
        subject[sy0:sy1, sx0:sx1], to_roi, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    roi_mask = cv2.threshold(alpha8, _HALF, 255, cv2.THRESH_BINARY)[1]
    bx, by, bw, bh = cv2.boundingRect(roi_mask)
    if bw == 0:
        raise CompositeRowError("subject_too_small", f"the subject vanished at scale {scale:.3f}")

    # 6. Blend on the box only; the feather softens the blend, the output mask stays binary.
    #    Blurring the uint8 alpha costs half the float32 blur for 1/255 steps nobody can see;
    #    cv2.blendLinear is out = a*subject + (1-a)*background in float32, 3x faster than numpy here.
    if config.feather_px > 0:
        k = 2 * math.ceil(3 * config.feather_px) + 1
        alpha8 = cv2.GaussianBlur(alpha8, (k, k), config.feather_px)
    alpha = alpha8.astype(np.float32) * np.float32(1 / 255)
    out = cover_resize(background, height, width)
    out[oy0:oy1, ox0:ox1] = cv2.blendLinear(pasted, out[oy0:oy1, ox0:ox1], alpha, 1 - alpha)

    out_mask = np.zeros((height, width), np.uint8)
    out_mask[oy0:oy1, ox0:ox1] = roi_mask
    bbox = np.array([ox0 + bx, oy0 + by, ox0 + bx + bw, oy0 + by + bh], np.float32)
    dx, dy = (target - centre).tolist()
    params = {"flip": flip, "angle": angle, "scale": scale, "scale_drawn": scale_drawn, "dx": dx, "dy": dy}
    return out, out_mask, bbox, params
