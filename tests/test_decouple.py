"""Subject / background split (engine.methods.decouple): the filled region is where the mask was, and
nothing else changes."""

import numpy as np
import pytest

from engine.methods.decouple import fill_subject
from engine.tiny.toy_dataset import render_example


@pytest.mark.parametrize("method", ["telea", "navier_stokes"])
def test_fill_changes_only_the_dilated_mask_and_removes_the_subject(method):
    image, mask = render_example(np.random.default_rng(3), "star", "sand", 48)
    filled = fill_subject(image, mask, method=method, dilate=2)
    import cv2

    region = cv2.dilate((mask > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert np.array_equal(filled[~region], image[~region]), "pixels outside the dilated mask are untouched"
    assert not np.array_equal(filled[region], image[region])
    # The filled subject looks like its surroundings: its colour is near the background's, far from the star's.
    ring = cv2.dilate(region.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~region
    inside = filled[mask > 0].astype(float).mean(0)
    assert (
        np.abs(inside - filled[ring].astype(float).mean(0)).max()
        < np.abs(image[mask > 0].astype(float).mean(0) - filled[ring].astype(float).mean(0)).max()
    )


def test_fill_without_a_subject_is_the_image_and_a_bad_method_is_named():
    image, _ = render_example(np.random.default_rng(0), "circle", "grass", 32)
    empty = np.zeros(image.shape[:2], np.uint8)
    assert np.array_equal(fill_subject(image, empty), image)
    with pytest.raises(ValueError, match="fill method 'blur'"):
        fill_subject(image, empty, method="blur")
