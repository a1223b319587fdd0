"""Synthetic training targets grown from the images, and the random CT window (issue 12, item 3)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MAISSegmentLib.synthetic_targets import MAX_FRACTION, MIN_VOXELS, random_ct_window, synthetic_target
from MAISSegmentLib.train import synthetic_sample


def phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 96^3 "CT" (HU): air, soft tissue, a bright bone bar and a dark (fat-like) lump; returns (image, lump)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((96, 96, 96)).astype(np.float32)
    body = ((grid[0] - 48) / 44) ** 2 + ((grid[1] - 48) / 40) ** 2 <= 1
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    bone = body & (np.abs(grid[0] - 30) < 4) & (np.abs(grid[1] - 48) < 4)
    cyst = ((grid - np.array([62, 50, 48])[:, None, None, None]) ** 2).sum(0) <= 10**2
    image[bone] = 700
    image[cyst] = -150  # fat-like: 190 HU below the tissue, far more than the noise (8 HU)
    return image + rng.normal(0, 8, image.shape).astype(np.float32), cyst


def test_a_synthetic_target_is_one_coherent_region_of_a_usable_size():
    image, _ = phantom()
    rng = np.random.default_rng(3)
    found = [synthetic_target(image, rng, centre=np.array([48, 48, 48])) for _ in range(5)]
    found = [m for m in found if m is not None]
    assert found, "no region found in five tries"
    for mask in found:
        assert MIN_VOXELS <= mask.sum() <= MAX_FRACTION * mask.size
        assert ndimage.label(mask)[1] == 1  # connected
        assert np.ptp(image[mask]) < np.ptp(image)  # not everything: an intensity-coherent part


def test_a_seed_in_a_distinct_structure_finds_that_structure():
    """Seeded inside the cyst (darker than the tissue around it), the region is (mostly) the cyst: what a click on an
    unlabelled structure should segment."""
    image, cyst = phantom()
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(8):
        mask = synthetic_target(image, rng, centre=np.array([62, 50, 48]))
        if mask is not None:
            hits.append(float((mask & cyst).sum() / mask.sum()))
    assert hits and np.median(hits) > 0.8


def test_nothing_is_drawn_in_the_background():
    image = np.full((64, 64, 64), -1000.0, np.float32)
    image[:, :, :4] = 50  # a thin band of tissue far from the seed
    assert synthetic_target(image, np.random.default_rng(0), centre=np.array([32, 32, 40])) is None


def test_random_ct_window_clips_to_a_soft_tissue_window():
    rng = np.random.default_rng(0)
    image = np.linspace(-1024, 1500, 1000, dtype=np.float32)
    for _ in range(20):
        clipped = random_ct_window(image, rng)
        assert -250 <= clipped.min() <= -50 and 150 <= clipped.max() <= 450
        inside = (image > clipped.min()) & (image < clipped.max())
        assert np.array_equal(clipped[inside], image[inside])


def test_synthetic_samples_are_deterministic_per_seed():
    image, _ = phantom()
    label = np.zeros(image.shape, np.uint8)
    label[40:56, 40:56, 40:56] = 1
    a = synthetic_sample(image, label, 1, np.random.default_rng(11), size=64)
    b = synthetic_sample(image, label, 1, np.random.default_rng(11), size=64)
    if a is None:
        assert b is None
        pytest.skip("no region for this seed")
    assert a.image.shape == (1, 1, 64, 64, 64) and a.target.shape == (64, 64, 64)
    assert np.array_equal(a.target.numpy(), b.target.numpy())
