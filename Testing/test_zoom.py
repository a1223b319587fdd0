"""Zoom (issue 12, ``SessionOptions(zoom=True)``, off by default until the built-in model is trained at several voxel
sizes): the ROI's voxel size follows the object. After an object's first include click, a small object is
segmented again in a ROI of finer voxels centred on the click; a large one keeps the 1.5 mm grid and grows into
neighbouring ROIs. Geometry is tested with a stand-in network that thresholds the ROI image (so what it predicts
depends only on the anatomy, at any voxel size); the real network runs the same session code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from MAISSegmentLib import build_model
from MAISSegmentLib.errors import ConfigError
from MAISSegmentLib.model.mais import StepOutput
from MAISSegmentLib.session import InteractiveSession, SessionOptions
from MAISSegmentLib.volume import Volume
from test_session import affine, mask_in_physical_space, reorient

CENTRE = np.array([4.0, -7.0, 12.0])  # RAS mm


def ball_volume(diameter_mm: float, spacing=(0.8, 0.8, 1.0), shape_kji=(120, 160, 160)) -> tuple[Volume, np.ndarray]:
    """A CT-like image (HU) of a bright ball of ``diameter_mm`` at CENTRE, and its true mask (KJI)."""
    origin = CENTRE - np.asarray(spacing) * np.asarray(shape_kji[::-1]) / 2
    m = affine(spacing, origin)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ras = np.stack([i, j, k, np.ones_like(i)], -1).astype(np.float64) @ m.T
    inside = np.linalg.norm(ras[..., :3] - CENTRE, axis=-1) <= diameter_mm / 2
    image = np.where(inside, 200.0, 0.0) + np.random.default_rng(0).normal(0, 5, inside.shape)
    return Volume(image.astype(np.float32), m), inside


def threshold_network():
    """The tiny SAM-Med3D network whose encoder and decoder are replaced by a threshold of the ROI image: low-res
    logits are +1 where most of a 4^3 block is bright, -1 elsewhere. The ROI sampling, the session, the ROIs and the
    composition onto the image grid are the real ones."""
    model = build_model("sam-med3d-tiny")
    images: dict[int, torch.Tensor] = {}

    def encode_image(image):
        emb = torch.zeros(1)  # stands for the embedding: the decoder below reads the ROI image it came from
        images[id(emb)] = image
        return emb

    def step(embedding, points, labels, prev_low_res=None, bank=None, image_pe=None, features=None, prev_full=None):
        bright = (images[id(embedding)] > 1.0).float()
        low = F.avg_pool3d(bright, kernel_size=4) * 2 - 1
        return StepOutput(low, torch.zeros(1, 1), False)

    model.encode_image, model.step = encode_image, step
    return model


@pytest.fixture(scope="module")
def network():
    return threshold_network()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def segment(network, volume, clicks=((CENTRE, True),), **options) -> InteractiveSession:
    options.setdefault("zoom", True)  # off by default (see SessionOptions.zoom)
    s = InteractiveSession(network, SessionOptions(**options))
    s.set_image(volume)
    for point, include in clicks:
        s.add_click(point, include)
    return s


def test_a_small_structure_is_segmented_again_on_a_finer_grid(network):
    volume, truth = ball_volume(20.0)
    zoomed = segment(network, volume)
    plain = segment(network, volume, zoom=False)
    assert [r.spacing for r in zoomed.rois] == [0.75] and [r.spacing for r in plain.rois] == [1.5]
    assert zoomed.rois[0].center == tuple(CENTRE)  # centred on the click
    assert zoomed.encoder_runs == 2  # the 1.5 mm look that measured the object, then the finer ROI
    d_zoom, d_plain = dice(zoomed.mask > 0, truth), dice(plain.mask > 0, truth)
    print(f"20 mm ball: Dice {d_plain:.3f} at 1.5 mm, {d_zoom:.3f} zoomed to 0.75 mm")
    assert d_zoom > d_plain + 0.05 and d_zoom > 0.9
    later = zoomed.add_click(CENTRE + np.array([3.0, 0.0, 0.0]), True)  # later clicks stay in the zoomed ROI
    assert not later.empty and [r.spacing for r in zoomed.rois] == [0.75] and zoomed.encoder_runs == 2


@pytest.mark.parametrize(("diameter", "spacing"), [(8.0, 0.75), (40.0, 0.75), (60.0, 1.0), (90.0, 1.5)])
def test_the_voxel_size_follows_the_object(network, diameter, spacing):
    """The finest allowed level at which the object spans at most half the ROI edge (zoom_fill): a 60 mm ball
    (about 66 mm on the 6 mm low-res grid) fits half of a 128 mm window (1.0 mm) but not of a 96 mm one."""
    volume, _ = ball_volume(diameter, spacing=(1.0, 1.0, 1.0), shape_kji=(130, 130, 130))
    assert [r.spacing for r in segment(network, volume, grow_rois=False).rois] == [spacing]


def test_finer_levels_only_when_allowed_and_only_for_an_include_click(network):
    volume, _ = ball_volume(8.0)
    assert segment(network, volume, zoom_min_spacing=0.375).rois[0].spacing == 0.375
    assert segment(network, volume, zoom_min_spacing=1.5).rois[0].spacing == 1.5  # zoom off in effect
    assert segment(network, volume, clicks=((CENTRE, False),)).rois[0].spacing == 1.5
    for bad in ({"zoom_min_spacing": 0.1}, {"zoom_min_spacing": 2.0}, {"zoom_fill": 0.0}, {"zoom_fill": 1.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SessionOptions(**bad)


def test_a_structure_larger_than_the_window_keeps_the_base_grid_and_grows(network):
    volume, _ = ball_volume(150.0, spacing=(1.5, 1.5, 1.5), shape_kji=(140, 150, 150))
    s = segment(network, volume, clicks=((CENTRE + np.array([40.0, 0.0, 0.0]), True),))
    assert {r.spacing for r in s.rois} == {1.5} and len(s.rois) > 1  # neighbouring ROIs at the object's grid


@pytest.mark.parametrize(
    "variant", [{"perm": (2, 0, 1)}, {"flips": (True, True, False)}, {"perm": (1, 2, 0), "flips": (False, True, True)}]
)
def test_zoom_does_not_depend_on_how_the_image_is_stored(network, variant):
    volume, _ = ball_volume(20.0, spacing=(0.8, 0.9, 1.1), shape_kji=(90, 110, 120))
    ref = segment(network, volume)
    other = segment(network, reorient(volume, **variant))
    assert [(r.center, r.spacing) for r in other.rois] == [(r.center, r.spacing) for r in ref.rois]
    assert dice(mask_in_physical_space(other, volume), ref.mask > 0) > 0.99


def test_zoomed_sessions_replay_undo_and_states_saved_before_zoom_replay_without_it(network):
    volume, _ = ball_volume(20.0)
    s = segment(network, volume)
    state = json.loads(json.dumps(s.state()))
    again = InteractiveSession.from_state(network, volume, state, check_model=False)
    assert np.array_equal(again.mask, s.mask) and again.rois == s.rois
    s.undo()
    assert not s.rois and not s.mask.any()
    s.redo()
    assert s.rois == again.rois and np.array_equal(again.mask, s.mask)
    del state["options"]["zoom"]  # written before zoom existed: every ROI at 1.5 mm, as it was made
    old = InteractiveSession.from_state(network, volume, state, check_model=False)
    assert not old.options.zoom and [r.spacing for r in old.rois] == [1.5]


def test_the_coarse_look_is_not_kept(network):
    """Zooming drops the 1.5 mm ROI's cached embedding (and head features): only the ROIs in use stay in memory."""
    volume, _ = ball_volume(20.0)
    s = segment(network, volume)
    assert set(s._embeddings) == {r for r in s.rois} and len(s._embeddings) == 1
