"""Zoom-aware training (``--zoom-prob``): crops at a finer ROI voxel size, made from the 1.5 mm cache, so a model can
learn what ``SessionOptions(zoom=True)`` shows it (small objects on a 1.0 or 0.75 mm grid)."""

from __future__ import annotations

import numpy as np
import pytest

from MAISSegmentLib.errors import ConfigError
from MAISSegmentLib.train import ZOOM_TRAIN_SPACINGS, TrainConfig, crop_arrays


def ball_case(shape=(60, 60, 60), radius=6.0, value=3):
    """A 1.5 mm case: image = 100 inside a ball of ``radius`` voxels (plus a ramp), label ``value`` there."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    inside = (k - 30) ** 2 + (j - 28) ** 2 + (i - 31) ** 2 <= radius**2
    image = np.where(inside, 100.0, 0.0).astype(np.float32) + i.astype(np.float32) * 0.1
    label = np.where(inside, value, 0).astype(np.uint8)
    label[0:5, 0:5, 0:5] = 7  # another structure, far away
    return image, label


@pytest.mark.parametrize("scale", [1.0, 1.0 / 1.5, 0.5])
def test_a_zoomed_crop_shows_the_object_larger_on_the_same_grid(scale):
    image, label = ball_case()
    img, lab = crop_arrays(image, label, 3, np.random.default_rng(0), size=32, scale=scale)
    assert img.shape == lab.shape == (32, 32, 32) and img.dtype == np.float32 and lab.dtype == label.dtype
    assert set(np.unique(lab)) <= {0, 3, 7}  # label values are never blended
    volume = (lab == 3).sum()
    expected = (label == 3).sum() / scale**3  # each 1.5 mm voxel covers 1/scale^3 zoomed voxels
    assert abs(volume - expected) / expected < 0.15, (volume, expected)
    assert np.abs(img[lab == 3].mean() - 100) < 15  # the image is resampled with the label
    assert lab[16, 16, 16] == 3 or (lab == 3)[12:21, 12:21, 12:21].any()  # centred on a voxel of the object


def test_the_zoom_levels_and_bounds():
    assert all(s < 1.5 for s in ZOOM_TRAIN_SPACINGS)
    assert TrainConfig(zoom_prob=0.3).zoom_prob == 0.3
    for bad in (-0.1, 1.5, "0.3"):
        with pytest.raises(ConfigError, match="zoom_prob"):
            TrainConfig(zoom_prob=bad)
