"""Where an object's ROIs overlap, the ROI the user has been correcting outweighs one just grown from a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.roi import Roi, image_box
from MAISSegmentLib.session import InteractiveSession, SessionOptions, _RoiState
from MAISSegmentLib.volume import Volume


@pytest.fixture(scope="module")
def session():
    s = InteractiveSession(build_model("sam-med3d-tiny", checkpoint=TINY / "ref_tiny.pth"), SessionOptions())
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image = np.random.default_rng(0).normal(0, 1, (80, 80, 80)).astype(np.float32)
    s.set_image(Volume(image, affine))  # 120 mm cube, RAS origin at voxel 0
    return s


def _state(center_mm: float, logit: float, sources: list[int]) -> _RoiState:
    """A 192 mm ROI at x = ``center_mm`` whose last prediction is ``logit`` everywhere, with these click sources."""
    st = _RoiState(Roi((center_mm, 60.0, 60.0), size=128, spacing=1.5))
    st.prev = torch.full((1, 1, 32, 32, 32), float(logit))
    st.points = [(64.0, 64.0, 64.0)] * len(sources)
    st.labels = [1] * len(sources)
    st.sources = list(sources)
    return st


@pytest.mark.parametrize(
    ("clicked", "grown", "expect"),
    [
        ((2.0, [0, 1, 2, 3]), (-4.0, [-1]), True),  # 5 x 2 - 1 x 4 > 0: the corrected ROI's "object" holds
        ((-2.0, [0, 1, 2, 3]), (4.0, [-1]), False),  # and so does its "background"
        ((2.0, [0]), (-4.0, [-1, 1]), False),  # 2 x 2 - 2 x 4 < 0: clicks count, not the order of growth
    ],
)
def test_overlap_follows_the_roi_with_the_users_clicks(session, clicked, grown, expect):
    session._rois = [_state(40.0, *clicked), _state(80.0, *grown)]  # overlap at x = 60 mm, both weights 1 there
    session._mask[...] = False
    session._compose(image_box(session.image))
    assert bool(session.mask[40, 40, 40]) is expect  # voxel (40, 40, 40) = RAS (60, 60, 60) mm


def test_roi_trust_counts_user_clicks_not_automatic_seeds():
    assert InteractiveSession._roi_trust(_state(0.0, 0.0, [-1])) == 1.0
    assert InteractiveSession._roi_trust(_state(0.0, 0.0, [-1, 3, 4])) == 3.0
