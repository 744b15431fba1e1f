"""DiffuseMix's mixing (Islam et al. 2024, "DiffuseMix: Label-Preserving Data Augmentation with Diffusion
Models"): after the InstructPix2Pix edit, one half of the real image is kept beside the other half of the
edited one, joined by a band where one fades into the other, and a fractal image is blended over the hybrid
at a small weight. The paper draws fractals from a
dataset of fractal images; without one (offline tests, a first run) they are procedural Julia sets.

Pure numpy on uint8 HxWx3 images; every choice comes from the caller's generator (the row's seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Which half of the real image the hybrid keeps (the other half is the edited image's). The method's code
# keeps the real image on top (a vertical split) or on the left (a horizontal one), drawn per image, and
# fades across a 20-pixel band (khawar-islam/diffuseMix augment/utils.py combine_images, blend_width=20; the
# same in DiffDA-Eval augmentation/diffuse_mix.py).
HALVES = ("top", "left")
BAND = 20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
_COLORMAPS = ("twilight", "magma", "viridis", "plasma", "inferno", "cubehelix", "turbo", "ocean")


def hybrid(real: np.ndarray, edited: np.ndarray, half: str, band: int = BAND) -> np.ndarray:
    """`half` of the real image, the rest from the edited image (same shape), the seam a linear fade over
    `band` pixels centred on the middle (0: a hard cut)."""
    if real.shape != edited.shape:
        raise ValueError(f"hybrid needs images of one shape, got {real.shape} and {edited.shape}")
    if half not in ("top", "bottom", "left", "right"):
        raise ValueError(f"half must be one of top, bottom, left, right, got {half!r}")
    height, width = real.shape[:2]
    length = height if half in ("top", "bottom") else width
    # Weight of the edited image along the split axis: 0 on the real half, a ramp across the band, then 1.
    band = min(band, length)
    start = length // 2 - band // 2
    edited_weight = np.zeros(length, dtype=np.float32)
    edited_weight[start : start + band] = np.linspace(0.0, 1.0, band, dtype=np.float32)
    edited_weight[start + band :] = 1.0
    if half in ("bottom", "right"):
        edited_weight = edited_weight[::-1]
    mask = edited_weight[:, None, None] if half in ("top", "bottom") else edited_weight[None, :, None]
    mixed = (1.0 - mask) * real.astype(np.float32) + mask * edited.astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


def blend(image: np.ndarray, fractal: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) * image + weight * fractal, rounded back to uint8."""
    mixed = (1.0 - weight) * image.astype(np.float32) + weight * fractal.astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


def julia(height: int, width: int, rng: np.random.Generator, iterations: int = 48) -> np.ndarray:
    """A coloured Julia set z -> z^2 + c with c on the circle |c| = 0.7885 (connected, detailed sets), a
    random zoom and rotation, and one of a few matplotlib colormaps."""
    from matplotlib import colormaps

    c = 0.7885 * np.exp(1j * rng.uniform(0, 2 * np.pi))
    scale = rng.uniform(0.6, 1.6)
    turn = np.exp(1j * rng.uniform(0, 2 * np.pi))
    ys, xs = np.mgrid[-1 : 1 : height * 1j, -1 : 1 : width * 1j]
    z = (xs + 1j * ys) * scale * turn
    escaped = np.full(z.shape, float(iterations))
    alive = np.ones(z.shape, dtype=bool)
    for step in range(iterations):
        z[alive] = z[alive] ** 2 + c
        out = alive & (np.abs(z) > 2)
        # Smooth escape count: no banding between iteration levels.
        escaped[out] = step + 1 - np.log2(np.log(np.abs(z[out])))
        alive &= ~out
    level = escaped / iterations
    colormap = colormaps[_COLORMAPS[int(rng.integers(len(_COLORMAPS)))]]
    return (colormap(level.clip(0, 1))[..., :3] * 255).round().astype(np.uint8)


def load_fractals(folder: str, height: int, width: int) -> dict[str, np.ndarray]:
    """Every image in `folder` by its path below it, resized; in name order, so a draw by index is the same
    on every worker."""
    import cv2
    from PIL import Image

    root = Path(folder)
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
    if not paths:
        raise ValueError(
            f"generation.diffusemix.fractals: no images ({sorted(IMAGE_SUFFIXES)}) under {folder}"
        )
    fractals = {}
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        fractals[str(path.relative_to(root))] = cv2.resize(
            pixels, (width, height), interpolation=cv2.INTER_AREA
        )
    return fractals
