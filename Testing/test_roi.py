"""ROI geometry and resampling back onto the image grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import MAISSegmentLib.roi as roi_mod
from MAISSegmentLib.roi import Box, Roi, image_box, roi_logits_on_grid, roi_mask_on_grid
from MAISSegmentLib.volume import Volume
from test_session import affine, reorient, rotation


def general_path(monkeypatch, *args):
    monkeypatch.setattr(roi_mod, "_axis_permutation", lambda a: None)
    return roi_logits_on_grid(*args)


@pytest.mark.parametrize(
    ("perm", "flips"),
    [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)), ((1, 2, 0), (False, True, False))],
)
def test_separable_path_equals_per_voxel_sampling(monkeypatch, perm, flips):
    logits = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    vol = reorient(
        Volume(np.zeros((50, 60, 70), np.float32), affine((0.7, 3.0, 1.3), (-40.0, -80.0, -50.0))), perm, flips
    )
    roi = Roi((1.0, 2.0, -3.0))
    box = Box((3, 5, 7), (60, 44, 33)).intersect(image_box(vol))
    fast = roi_logits_on_grid(logits, roi, vol, box)
    slow = general_path(monkeypatch, logits, roi, vol, box)
    assert np.abs(fast[0] - slow[0]).max() < 1e-4 and np.array_equal(fast[1], slow[1])


@pytest.mark.parametrize("n_low", [32, 128])
@pytest.mark.parametrize(
    ("perm", "flips"),
    [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))],
)
def test_the_slab_by_slab_mask_is_the_thresholded_logits(monkeypatch, n_low, perm, flips):
    """``roi_mask_on_grid`` (the session's one-ROI path, thresholded slab by slab) marks exactly the voxels where
    the interpolated logits are > 0 inside the ROI, whatever the slab size, axis order and flips, and oblique too."""
    g = torch.Generator().manual_seed(n_low)
    logits = torch.randn(1, 1, n_low, n_low, n_low, generator=g)
    vol = reorient(
        Volume(np.zeros((90, 100, 110), np.float32), affine((0.7, 2.0, 1.3), (-40.0, -80.0, -50.0))), perm, flips
    )
    roi = Roi((1.0, 2.0, -3.0), size=64, spacing=1.5)  # smaller than the image: the ROI faces cut the box
    box = image_box(vol)
    values, weights = roi_logits_on_grid(logits, roi, vol, box)
    expected = (values > 0) & (weights > 0)
    assert 0 < expected.sum() < expected.size
    monkeypatch.setattr(roi_mod, "_SLAB_VOXELS", 3000)  # many slabs, the last one partial
    assert np.array_equal(roi_mask_on_grid(logits, roi, vol, box), expected)
    monkeypatch.setattr(roi_mod, "_SLAB_VOXELS", 2**30)  # one slab
    assert np.array_equal(roi_mask_on_grid(logits, roi, vol, box), expected)
    assert roi_mask_on_grid(logits, roi, vol, Box((0, 0, 0), (0, 5, 5))).shape == (5, 5, 0)
    m = vol.ijk_to_ras.copy()
    m[:3, :3] = rotation((1, 2, 3), 20) @ m[:3, :3]
    oblique = Volume(vol.array, m)
    values, weights = roi_logits_on_grid(logits, roi, oblique, box)
    assert np.array_equal(roi_mask_on_grid(logits, roi, oblique, box), (values > 0) & (weights > 0))


def test_logits_at_roi_voxel_centres_equal_reference_upsampling():
    """At ROI voxel centres the mapping is exactly F.interpolate(32 -> 128, trilinear, align_corners=False)."""
    logits = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    roi = Roi((0.0, 0.0, 0.0))
    # an image whose voxels are the ROI's voxels (1.5 mm, RAS-aligned, same origin), oblique-path too
    m = affine((1.5, 1.5, 1.5), roi.roi_to_ras(np.zeros(3)))
    vol = Volume(np.zeros((128, 128, 128), np.float32), m)
    ref = torch.nn.functional.interpolate(logits, size=(128,) * 3, mode="trilinear", align_corners=False)[0, 0]
    values, weights = roi_logits_on_grid(logits, roi, vol, image_box(vol))
    assert np.abs(values - ref.permute(2, 1, 0).numpy()).max() < 1e-5  # KJI = (S, A, R)
    assert weights.min() > 0


def test_oblique_roi_box_and_containment():
    m = affine((1.0, 1.0, 1.0), (-50.0, -50.0, -50.0), rotation((1, 1, 0), 30))
    vol = Volume(np.zeros((100, 100, 100), np.float32), m)
    roi = Roi((0.0, 0.0, 0.0), size=16, spacing=1.5)
    box = roi.box_on(vol)
    corners = vol.ras_to_ijk_points(roi.corners_ras())
    assert all(box.lo[d] <= corners[:, d].min() + 1 and box.hi[d] >= corners[:, d].max() for d in range(3))
    # voxel size/2 sits on the centre: the ROI spans [-8.5, 7.5] voxels = [-12.75, 11.25] mm per axis
    inside = np.array([[0.0, 0.0, 11.2], [-12.7, 0.0, 0.0]])
    outside = np.array([[0.0, 0.0, 11.3], [-12.8, 0.0, 0.0]])
    assert roi.contains(inside).all() and not roi.contains(outside).any()
    assert Box((0, 0, 0), (2, 2, 2)).union(Box((5, 5, 5), (6, 7, 8))) == Box((0, 0, 0), (6, 7, 8))
