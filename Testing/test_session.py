"""InteractiveSession: clicks in physical space, ROI handling, undo/redo/forget, state, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.errors import ConfigError, ImageError, PromptError
from MAISSegmentLib.roi import Roi, image_box, roi_logits_on_grid, sample_roi
from MAISSegmentLib.session import InteractiveSession, SessionOptions
from MAISSegmentLib.volume import Volume


def rotation(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def affine(spacing, origin, direction=None) -> np.ndarray:
    m = np.eye(4)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    m[:3, :3] = d * np.asarray(spacing, dtype=float)
    m[:3, 3] = origin
    return m


def phantom(ijk_to_ras: np.ndarray, shape_kji) -> np.ndarray:
    """An analytic image sampled on the grid: two blobs and a gradient, as a function of RAS."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk = np.stack([i, j, k, np.ones_like(i)], -1).astype(np.float64)
    ras = ijk @ ijk_to_ras.T
    r1 = np.linalg.norm(ras[..., :3] - np.array([10.0, -5.0, 20.0]), axis=-1)
    r2 = np.linalg.norm(ras[..., :3] - np.array([-30.0, 15.0, 0.0]), axis=-1)
    img = 1000 * np.exp(-((r1 / 18) ** 2)) + 600 * np.exp(-((r2 / 10) ** 2)) + 2 * ras[..., 0] + 300
    return img.astype(np.float32)


def make_volume(spacing=(1.5, 1.5, 2.0), shape_kji=(60, 70, 80), origin=(-60.0, -52.0, -40.0), direction=None):
    m = affine(spacing, origin, direction)
    return Volume(phantom(m, shape_kji), m)


@pytest.fixture(scope="module")
def model():
    return build_model("sam-med3d-tiny", checkpoint=TINY / "ref_tiny.pth")


@pytest.fixture()
def volume():
    return make_volume()


def new_session(model, volume, **options) -> InteractiveSession:
    s = InteractiveSession(model, SessionOptions(**options))
    s.set_image(volume)
    return s


CLICKS = [
    ((10.0, -5.0, 20.0), True),
    ((-30.0, 15.0, 0.0), False),
    ((12.0, 0.0, 14.0), True),
    ((0.0, -20.0, 30.0), False),
]


def test_click_updates_only_the_returned_box_and_encoder_runs_once(model, volume):
    s = new_session(model, volume, grow_rois=False)
    box = s.add_click(*CLICKS[0])
    assert not box.empty and s.mask[box.slices].any()
    assert s.encoder_runs == 1 and len(s.rois) == 1
    before = s.mask.copy()
    box2 = s.add_click(*CLICKS[2])
    assert s.encoder_runs == 1  # same ROI: the cached embedding is reused
    outside = np.ones(before.shape, dtype=bool)
    outside[box2.slices] = False
    assert np.array_equal(before[outside], s.mask[outside])
    assert set(s.last_timings) >= {"encoder", "decoder", "resample", "total"}


def test_first_click_roi_is_centred_on_the_click_in_physical_space(model, volume):
    s = new_session(model, volume, grow_rois=False)
    s.add_click((10.0, -5.0, 20.0), True)
    assert s.rois[0].center == (10.0, -5.0, 20.0)
    roi = s.rois[0]
    assert np.allclose(roi.roi_to_ras(np.array([64, 64, 64])), [10.0, -5.0, 20.0])


def test_click_in_ijk_equals_click_in_ras(model, volume):
    ijk = np.array([40.3, 30.0, 25.0])
    ras = volume.ijk_to_ras_points(ijk[None])[0]
    a, b = new_session(model, volume), new_session(model, volume)
    a.add_click(ijk, True, space="ijk")
    b.add_click(ras, True, space="ras")
    assert np.array_equal(a.mask, b.mask) and a.clicks == b.clicks


def test_undo_redo_restore_exact_masks_and_memory(model, volume):
    s = new_session(model, volume)
    masks = [s.mask.copy()]
    for p, inc in CLICKS:
        s.add_click(p, inc)
        masks.append(s.mask.copy())
    for n in range(len(CLICKS), 0, -1):
        s.undo()
        assert np.array_equal(s.mask, masks[n - 1]) and len(s.clicks) == n - 1
    assert s.undo().empty  # nothing more to undo
    for n in range(1, len(CLICKS) + 1):
        s.redo()
        assert np.array_equal(s.mask, masks[n])
    # undo two, click again: the memory state is the one before those clicks
    s.undo()
    s.undo()
    s.add_click(*CLICKS[3])
    fresh = new_session(model, volume)
    for p, inc in [*CLICKS[:2], CLICKS[3]]:
        fresh.add_click(p, inc)
    assert np.array_equal(s.mask, fresh.mask)
    assert not s.can_redo


def test_forget_equals_session_without_that_click(model, volume):
    s = new_session(model, volume)
    for p, inc in CLICKS:
        s.add_click(p, inc)
    s.forget(1)
    ref = new_session(model, volume)
    for p, inc in [CLICKS[0], *CLICKS[2:]]:
        ref.add_click(p, inc)
    assert np.array_equal(s.mask, ref.mask) and s.clicks == ref.clicks
    s.undo()  # forget is undoable
    assert len(s.clicks) == 4
    with pytest.raises(PromptError, match="no click 9"):
        s.forget(9)


def test_reset_and_memory_switch(model, volume):
    s = new_session(model, volume)
    for p, inc in CLICKS:
        s.add_click(p, inc)
    with_memory = s.mask.copy()
    s.configure(use_memory=False)
    ref = new_session(model, volume, use_memory=False)
    for p, inc in CLICKS:
        ref.add_click(p, inc)
    assert np.array_equal(s.mask, ref.mask)
    s.undo()
    assert np.array_equal(s.mask, with_memory)
    s.reset()
    assert not s.mask.any() and s.clicks == []
    s.undo()
    assert np.array_equal(s.mask, with_memory)


def test_state_round_trip_replays_to_identical_mask(model, volume):
    s = new_session(model, volume)
    for p, inc in CLICKS[:3]:
        s.add_click(p, inc)
    state = json.loads(json.dumps(s.state()))
    restored = InteractiveSession.from_state(model, volume, state)
    assert np.array_equal(restored.mask, s.mask)
    s.add_click(*CLICKS[3])  # continuing gives the same result as continuing the original
    restored.add_click(*CLICKS[3])
    assert np.array_equal(restored.mask, s.mask)
    with pytest.raises(ConfigError, match="another image"):
        InteractiveSession.from_state(model, make_volume(shape_kji=(61, 70, 80)), state)
    with pytest.raises(ConfigError, match="session state"):
        InteractiveSession.from_state(model, volume, {"clicks": []})


def test_states_saved_before_grow_connected_replay_as_they_were_made(model, volume):
    """A state without ``grow_connected`` (written before the option existed) replays with growth from the whole
    mask, as it was made; new sessions default to growth from the include-connected part."""
    assert SessionOptions().grow_connected
    s = new_session(model, volume)
    s.add_click(*CLICKS[0])
    old = json.loads(json.dumps(s.state()))
    del old["options"]["grow_connected"]
    assert not InteractiveSession.from_state(model, volume, old).options.grow_connected
    assert InteractiveSession.from_state(model, volume, s.state()).options.grow_connected


def test_protected_voxels_never_included(model, volume):
    s = new_session(model, volume)
    s.add_click(*CLICKS[0])
    free = s.mask.copy()
    protected = np.zeros(volume.array.shape, dtype=bool)
    protected[:, :, :40] = True
    s.set_protected(protected)
    assert not (s.mask & protected).any()
    assert np.array_equal(s.mask[~protected], free[~protected])
    # an include click on a protected voxel is refused and nothing changes
    ijk_protected = np.array([10.0, 30.0, 30.0])
    before = (s.mask.copy(), s.clicks, s.can_redo)
    with pytest.raises(PromptError, match="protected"):
        s.add_click(ijk_protected, True, space="ijk")
    assert np.array_equal(s.mask, before[0]) and s.clicks == before[1]
    s.add_click(ijk_protected, False, space="ijk")  # an exclude click there is fine
    s.undo()
    s.undo()
    assert np.array_equal(s.mask, free)


def test_click_outside_another_roi_opens_a_new_roi(model):
    vol = make_volume(spacing=(2.0, 2.0, 2.0), shape_kji=(60, 60, 200), origin=(-200.0, -60.0, -60.0))
    s = new_session(model, vol, grow_rois=False)
    s.add_click((-150.0, 0.0, 0.0), True)
    s.add_click((150.0, 0.0, 0.0), True)  # 300 mm away: outside the first 192 mm window
    assert len(s.rois) == 2 and s.encoder_runs == 2
    assert s.mask[:, :, :60].any() and s.mask[:, :, -60:].any()


def test_rois_grow_when_the_mask_reaches_a_face(model):
    vol = make_volume(spacing=(2.0, 2.0, 2.0), shape_kji=(100, 100, 250), origin=(-250.0, -100.0, -100.0))
    s = new_session(model, vol, grow_rois=True, max_rois=4, max_new_rois_per_click=4)
    s.add_click((0.0, 0.0, 0.0), True)
    grown = len(s.rois)
    capped = new_session(model, vol, grow_rois=True, max_rois=4, max_new_rois_per_click=1)
    capped.add_click((0.0, 0.0, 0.0), True)
    assert len(capped.rois) == min(2, grown)  # growth per click is capped ...
    capped.add_click((0.0, 0.0, 0.0), True)
    assert len(capped.rois) >= min(3, grown)  # ... and goes on with the next click
    no_grow = new_session(model, vol, grow_rois=False)
    no_grow.add_click((0.0, 0.0, 0.0), True)
    assert len(no_grow.rois) == 1
    assert 1 < grown <= 4  # these weights predict a large blob that touches the window's faces
    assert s.mask.sum() > no_grow.mask.sum()
    grow_all = new_session(model, vol, grow_rois=True, max_rois=4, max_new_rois_per_click=4, grow_connected=False)
    grow_all.add_click((0.0, 0.0, 0.0), True)
    assert len(grow_all.rois) == grown  # the blob holds the click: growing only from it changes nothing here
    s2 = InteractiveSession.from_state(model, vol, s.state())  # replay grows the same ROIs
    assert s2.rois == s.rois and np.array_equal(s2.mask, s.mask)
    s.undo()
    assert len(s.rois) == 0 and not s.mask.any()


# ----------------------------------------------------------------------------------- orientation
def reorient(vol: Volume, perm=(0, 1, 2), flips=(False, False, False)) -> Volume:
    """The same image stored with permuted/flipped voxel axes (physically identical)."""
    arr, m = vol.array, vol.ijk_to_ras.copy()
    for axis_ijk, flip in enumerate(flips):
        if flip:
            n = vol.array.shape[2 - axis_ijk]
            arr = np.flip(arr, axis=2 - axis_ijk)
            m[:3, 3] = m[:3, 3] + m[:3, axis_ijk] * (n - 1)
            m[:3, axis_ijk] = -m[:3, axis_ijk]
    # perm[new_axis] = old_axis (IJK); arrays are KJI
    arr = np.transpose(arr, [2 - perm[2 - a] for a in range(3)])
    m2 = m.copy()
    m2[:3, :3] = m[:3, list(perm)]
    return Volume(np.ascontiguousarray(arr), m2)


def mask_in_physical_space(session: InteractiveSession, reference: Volume) -> np.ndarray:
    """The session's mask sampled (nearest) at the reference grid's voxel centres."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in reference.array.shape], indexing="ij")
    ras = reference.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3).astype(float))
    ijk = np.floor(session.image.ras_to_ijk_points(ras) + 0.5).astype(int)
    n = np.asarray(session.image.shape_ijk)
    ok = np.all((ijk >= 0) & (ijk < n), axis=1)
    out = np.zeros(len(ras), dtype=bool)
    out[ok] = session.mask[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]] > 0
    return out.reshape(reference.array.shape)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.mark.parametrize(
    "variant",
    [
        {"perm": (2, 0, 1)},
        {"flips": (True, False, True)},
        {"flips": (True, True, False)},
        {"perm": (1, 2, 0), "flips": (False, True, False)},
    ],
    ids=["permuted", "flipped", "LPS-ordered", "permuted+flipped"],
)
def test_same_physical_mask_for_permuted_and_flipped_storage(model, volume, variant):
    ref = new_session(model, volume)
    other = new_session(model, reorient(volume, **variant))
    for p, inc in CLICKS[:3]:
        ref.add_click(p, inc)
        other.add_click(p, inc)
    d = dice(mask_in_physical_space(other, volume), ref.mask > 0)
    print(f"Dice in physical space: {d:.5f}")
    assert d >= 0.99


def test_same_physical_mask_for_oblique_grid(model):
    """An oblique grid (rotated 25 degrees about an oblique axis) holding the same physical image.

    Both grids cover the whole ROI, so the model sees the same physical content; what differs is only
    where the voxel centres fall (interpolation of the image, nearest resampling of the mask).
    """
    n, sp = 160, 2.5  # 400 mm cubes centred at the origin: cover the 192 mm ROI at any rotation
    base = make_volume(spacing=(sp, sp, sp), shape_kji=(n, n, n), origin=(-(n - 1) * sp / 2,) * 3)
    rot = rotation((1, 2, 3), 25)
    m = affine((sp, sp, sp), -rot @ np.full(3, (n - 1) * sp / 2), rot)
    oblique = Volume(phantom(m, (n, n, n)), m)
    ref, other = new_session(model, base, grow_rois=False), new_session(model, oblique, grow_rois=False)
    for p, inc in CLICKS[:2]:
        ref.add_click(p, inc)
        other.add_click(p, inc)
    # Same network input in physical space -> same logits (up to interpolation of the image) ...
    la, lb = ref._rois[0].prev, other._rois[0].prev
    assert ref.rois == other.rois and ((la > 0) == (lb > 0)).float().mean() > 0.999
    # ... and the oblique mask is the reference result evaluated on the oblique grid. (Nearest
    # resampling between two rotated 2.5 mm grids is not a fair yardstick here: with these random
    # weights the mask is speckled, 40% of its voxels lie on its boundary.)
    values, weights = roi_logits_on_grid(la, ref.rois[0], oblique, image_box(oblique))
    expected = (values > 0) & (weights > 0)
    d = dice(other.mask > 0, expected)
    print(f"oblique: Dice in physical space {d:.4f} ({int(expected.sum())} voxels)")
    assert d >= 0.99


def test_roi_sampling_is_storage_independent(volume):
    roi = Roi((10.0, -5.0, 20.0))
    a = sample_roi(volume, roi)
    b = sample_roi(reorient(volume, perm=(2, 0, 1), flips=(True, True, False)), roi)
    assert torch.allclose(a, b, atol=1e-4)


# ----------------------------------------------------------------------------------- bad input
def assert_unchanged(s: InteractiveSession, mask: np.ndarray, clicks) -> None:
    assert np.array_equal(s.mask, mask) and s.clicks == clicks


@pytest.mark.parametrize(
    ("point", "space", "include", "message"),
    [
        ((500.0, 0.0, 0.0), "ras", True, "outside the image"),
        ((-1.0, 10.0, 10.0), "ijk", False, "outside the image"),
        ((1.0, 2.0), "ras", True, "3 coordinates"),
        ((float("nan"), 0.0, 0.0), "ras", True, "finite"),
        ((0.0, 0.0, 0.0), "lps", True, "space"),
        ((0.0, 0.0, 0.0), "ras", "yes", "True or False"),
    ],
)
def test_bad_clicks_leave_session_unchanged(model, volume, point, space, include, message):
    s = new_session(model, volume)
    s.add_click(*CLICKS[0])
    mask, clicks = s.mask.copy(), s.clicks
    with pytest.raises(PromptError, match=message):
        s.add_click(point, include, space=space)
    assert_unchanged(s, mask, clicks)
    assert s.can_undo and not s.can_redo


def test_bad_images_are_refused_and_keep_the_previous_image(model, volume):
    s = new_session(model, volume)
    s.add_click(*CLICKS[0])
    mask = s.mask.copy()
    nan = volume.array.copy()
    nan[3, 4, 5] = np.nan
    nan[6, 7, 8] = np.inf
    with pytest.raises(ImageError, match="2 NaN/Inf"):
        s.set_image(volume.with_array(nan))
    with pytest.raises(ImageError, match="constant"):
        s.set_image(volume.with_array(np.full(volume.array.shape, 7, dtype=np.int16)))
    with pytest.raises(ImageError, match="protected mask"):
        s.set_image(volume, protected=np.zeros((2, 2, 2), dtype=bool))
    small = InteractiveSession(model, SessionOptions(max_image_voxels=1000))
    with pytest.raises(ImageError, match="crop or downsample"):
        small.set_image(volume)
    assert s.image is volume and np.array_equal(s.mask, mask)
    with pytest.raises(ImageError):
        Volume(np.zeros((4, 4), dtype=np.float32), np.eye(4))
    with pytest.raises(ImageError):
        Volume(np.zeros((2, 4, 4, 4), dtype=np.float32), np.eye(4))


def test_no_image_and_bad_options(model):
    s = InteractiveSession(model)
    with pytest.raises(PromptError, match="set_image"):
        s.add_click((0.0, 0.0, 0.0))
    for bad, msg in [
        ({"memory_size": 0}, "memory_size"),
        ({"max_rois": 0}, "max_rois"),
        ({"blend_margin": -1}, "blend_margin"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            SessionOptions(**bad)
    no_mem = build_model(model.cfg.replace(memory=None))
    with pytest.raises(ConfigError, match="no memory attention"):
        InteractiveSession(no_mem)
    InteractiveSession(no_mem, SessionOptions(use_memory=False))


def test_image_larger_than_available_memory_is_refused(model, volume, monkeypatch):
    import MAISSegmentLib.sysinfo as sysinfo

    s = new_session(model, volume)
    s.add_click(*CLICKS[0])
    mask = s.mask.copy()
    monkeypatch.setattr(sysinfo, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ImageError, match="GiB of memory is available"):
        s.set_image(make_volume())
    assert np.array_equal(s.mask, mask)


def test_replace_clicks_equals_a_fresh_session_and_is_undoable(model, volume):
    s = new_session(model, volume)
    for p, inc in CLICKS[:3]:
        s.add_click(p, inc)
    before = s.mask.copy()
    moved = [CLICKS[0], ((-28.0, 14.0, 2.0), False), CLICKS[2]]  # the second point was moved
    s.replace_clicks(moved)
    ref = new_session(model, volume)
    for p, inc in moved:
        ref.add_click(p, inc)
    assert np.array_equal(s.mask, ref.mask) and s.clicks == ref.clicks
    with pytest.raises(PromptError, match="outside the image"):
        s.replace_clicks([((900.0, 0.0, 0.0), True)])
    assert np.array_equal(s.mask, ref.mask)
    s.undo()
    assert np.array_equal(s.mask, before)


def test_growth_can_be_limited_to_the_parts_connected_to_include_points():
    """``grow_connected``: a leak that is not connected to any include point opens no neighbouring ROI."""
    from MAISSegmentLib.session import connected_to_includes

    mask = np.zeros((32, 32, 32), bool)
    mask[10:20, 10:20, 10:20] = True  # the object, around the include point
    mask[0:3, 25:30, 25:30] = True  # a leak touching the R- face, not connected to it
    kept = connected_to_includes(mask, [(60.0, 60.0, 60.0)], [1], 128)  # ROI voxel 60 -> low-res 15
    assert kept[15, 15, 15] and not kept[0:3, 25:30, 25:30].any() and kept.sum() == 1000
    # an include point in a hole of the mask uses the component next to it; exclude points select nothing
    assert connected_to_includes(mask, [(38.0, 60.0, 60.0)], [1], 128).sum() == 1000  # low-res 9, next to 10
    assert np.array_equal(connected_to_includes(mask, [(60.0, 60.0, 60.0)], [0], 128), mask)
    # nothing to anchor to (only automatic seeds far away) or a single component: unchanged
    assert np.array_equal(connected_to_includes(mask, [(120.0, 4.0, 4.0)], [1], 128), mask)
    single = mask.copy()
    single[0:3] = False
    assert connected_to_includes(single, [], [], 128) is single
