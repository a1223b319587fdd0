"""The bridge to Slicer (MAISSegmentLib/mrml_*.py) against real MRML nodes (slicer-core, headless): volumes, transforms,
markups, masked segment writes with undo, session state in segment tags, .seg.nrrd read back by slicerio, and one
end-to-end click."""

from __future__ import annotations

import json

import numpy as np
import pytest
from slicer_headless import HAVE_SLICER, SKIP_REASON, mrml_fixture  # noqa: F401  (provides the "mrml" fixture)

from conftest import TINY

if not HAVE_SLICER:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import slicer
import vtk

from MAISSegmentLib import mrml_export, mrml_markups, mrml_masking, mrml_state, mrml_volumes, mrml_writing
from MAISSegmentLib.errors import MAISError
from MAISSegmentLib.roi import Box

SHAPE = (40, 50, 60)  # K, J, I


def rotation(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    a = np.deg2rad(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def oblique_affine() -> np.ndarray:
    """Oblique, anisotropic, with an LPS-like flip of the first two axes."""
    m = np.eye(4)
    m[:3, :3] = rotation([1.0, 2.0, 3.0], 27.0) @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([0.7, 0.9, 2.0])
    m[:3, 3] = [18.0, -12.5, -35.0]
    return m


def rigid(angle: float, shift) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation([0.3, -1.0, 0.4], angle)
    m[:3, 3] = shift
    return m


def image() -> np.ndarray:
    k, j, i = np.indices(SHAPE)
    ball = (i - 30) ** 2 + (j - 25) ** 2 + (4 * (k - 20)) ** 2 < 12**2
    rng = np.random.default_rng(0)
    return (np.where(ball, 400, 40) + rng.integers(0, 20, SHAPE)).astype(np.int16)


def block(lo, hi) -> np.ndarray:
    """uint8 KJI mask with ones in the IJK box [lo, hi)."""
    m = np.zeros(SHAPE, np.uint8)
    m[Box(tuple(lo), tuple(hi)).slices] = 1
    return m


def vtk_matrix_array(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_ras_to_ijk(volume_node, ras) -> np.ndarray:
    """Slicer's own mapping of a world RAS point to continuous IJK (parent transforms included)."""
    world_to_local = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, volume_node.GetParentTransformNode(), world_to_local)
    m = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(m)
    local = [*world_to_local.TransformPoint([float(x) for x in ras]), 1.0]
    return np.array(m.MultiplyPoint(local)[:3])


def slicer_segment_array(seg, segment_id, volume_node) -> np.ndarray:
    """A segment exported by Slicer's own logic onto the volume's grid (independent of our reader)."""
    return (slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume_node) > 0).astype(np.uint8)


@pytest.fixture()
def scene(mrml):
    volume = mrml.add_volume(image(), oblique_affine(), "oblique")
    seg = mrml.add_segmentation(volume)
    ids = {name: seg.GetSegmentation().AddEmptySegment(name, name) for name in ("target", "other", "locked")}
    assert all(ids.values())
    return mrml, volume, seg, ids


def fill(seg, volume, ids, target=True):
    """Give the segments some content (written through Slicer's own helper, not through the bridge)."""
    if target:
        slicer.util.updateSegmentBinaryLabelmapFromArray(block((2, 2, 2), (12, 10, 8)), seg, ids["target"], volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(block((36, 20, 15), (50, 32, 25)), seg, ids["other"], volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(block((28, 15, 10), (40, 25, 30)), seg, ids["locked"], volume)
    mrml_masking.set_segment_locked(seg, ids["locked"])


def all_arrays(seg, volume, ids) -> dict[str, np.ndarray]:
    return {name: slicer_segment_array(seg, sid, volume) for name, sid in ids.items()}


# ------------------------------------------------------------------------------------------------ volumes
def test_volume_round_trip_on_an_oblique_anisotropic_volume(mrml):
    arr = image()
    node = mrml.add_volume(arr, oblique_affine())
    vol = mrml_volumes.volume_from_node(node)
    assert vol.array.shape == SHAPE and np.array_equal(vol.array, arr)
    assert np.allclose(vol.ijk_to_ras, oblique_affine(), atol=1e-9)
    assert np.allclose(vol.spacing, [0.7, 0.9, 2.0])
    vol.array[0, 0, 0] += 1  # a copy, not a view of the node's voxels
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == arr[0, 0, 0]
    rng = np.random.default_rng(1)
    for ijk in rng.uniform([0, 0, 0], [59, 49, 39], size=(20, 3)):
        ras = vol.ijk_to_ras_points(ijk)
        ours = np.floor(vol.ras_to_ijk_points(ras) + 0.5).astype(int)
        theirs = np.floor(node_ras_to_ijk(node, ras) + 0.5).astype(int)
        assert np.array_equal(ours, theirs)
        i, j, k = ours
        assert vol.array[k, j, i] == slicer.util.arrayFromVolume(node)[k, j, i]


def test_linear_parent_transforms_are_applied(mrml):
    node = mrml.add_volume(image(), oblique_affine())
    inner = mrml.add_linear_transform(rigid(20.0, [5.0, -3.0, 12.0]), "inner")
    outer = mrml.add_linear_transform(rigid(-35.0, [-7.0, 2.0, 1.5]), "outer")
    inner.SetAndObserveTransformNodeID(outer.GetID())
    node.SetAndObserveTransformNodeID(inner.GetID())
    vol = mrml_volumes.volume_from_node(node)
    assert np.allclose(
        vol.ijk_to_ras, rigid(-35.0, [-7.0, 2.0, 1.5]) @ rigid(20.0, [5.0, -3.0, 12.0]) @ oblique_affine()
    )
    rng = np.random.default_rng(2)
    for ijk in rng.uniform([0, 0, 0], [59, 49, 39], size=(10, 3)):
        world = vol.ijk_to_ras_points(ijk)
        assert np.allclose(node_ras_to_ijk(node, world), ijk, atol=1e-6)


def test_a_non_linear_transform_is_refused(mrml):
    node = mrml.add_volume(image(), oblique_affine())
    node.SetAndObserveTransformNodeID(mrml.add_warp_transform().GetID())
    with pytest.raises(mrml_volumes.BridgeError, match=r"[Hh]arden"):
        mrml_volumes.volume_from_node(node)
    assert issubclass(mrml_volumes.BridgeError, MAISError)


def test_non_scalar_or_empty_volumes_are_refused(mrml):
    empty = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(mrml_volumes.BridgeError, match="no voxels"):
        mrml_volumes.volume_from_node(empty)
    with pytest.raises(mrml_volumes.BridgeError, match="scalar volume"):
        mrml_volumes.volume_from_node(mrml.add_points())


# ------------------------------------------------------------------------------------------------ markups
def test_markups_are_ordered_by_stored_order_and_read_in_world_coordinates(mrml):
    inc, exc = mrml.add_points("include"), mrml.add_points("exclude")
    mrml_markups.add_click_point(inc, (1.0, 2.0, 3.0), order=2)
    mrml_markups.add_click_point(exc, (4.0, 5.0, 6.0), order=1)
    mrml_markups.add_click_point(inc, (7.0, 8.0, 9.0), order=0)
    inc.AddControlPoint(vtk.vtkVector3d(10.0, 11.0, 12.0), "no order")  # no order: after the ordered ones
    exc.AddControlPoint(vtk.vtkVector3d(13.0, 14.0, 15.0), "no order either")
    being_placed = inc.AddControlPoint(vtk.vtkVector3d(99.0, 99.0, 99.0), "undefined")
    inc.UnsetNthControlPointPosition(being_placed)
    assert mrml_markups.next_click_order(inc, exc, None) == 3
    clicks = mrml_markups.clicks_from_markups(inc, exc)
    assert [tuple(p) for p, _ in clicks] == [(7, 8, 9), (4, 5, 6), (1, 2, 3), (10, 11, 12), (13, 14, 15)]
    assert [inc_ for _, inc_ in clicks] == [True, False, True, True, False]
    assert inc.GetNthControlPointDescription(0) == "mais:order=2"
    # a parent transform moves the points in the world: clicks follow (world coordinates)
    shift = np.eye(4)
    shift[:3, 3] = [10.0, -20.0, 5.0]
    inc.SetAndObserveTransformNodeID(mrml.add_linear_transform(shift).GetID())
    moved = mrml_markups.clicks_from_markups(inc, None)
    assert np.allclose(moved[0][0], [17.0, -12.0, 14.0]) and np.allclose(moved[1][0], [11.0, -18.0, 8.0])
    # a point placed in world coordinates under that transform lands where asked
    idx = mrml_markups.add_click_point(inc, (0.0, 0.0, 0.0), order=7)
    world = [0.0, 0.0, 0.0]
    inc.GetNthControlPointPositionWorld(idx, world)
    assert np.allclose(world, 0.0) and mrml_markups.click_order(inc, idx) == 7
    assert mrml_markups.clicks_from_markups(None, None) == []


def test_markups_clicks_do_not_depend_on_the_files_lps_or_ras_convention(mrml, tmp_path):
    inc = mrml.add_points("include")
    points = [(12.5, -40.25, 88.0), (-3.0, 7.5, -1.25)]
    for n, p in enumerate(points):
        mrml_markups.add_click_point(inc, p, order=n)
    for system, code in (("LPS", slicer.vtkMRMLStorageNode.CoordinateSystemLPS), ("RAS", 0)):
        path = tmp_path / f"points_{system}.mrk.json"
        writer = slicer.vtkMRMLMarkupsJsonStorageNode()
        writer.SetFileName(str(path))
        writer.SetCoordinateSystem(code)
        assert writer.WriteData(inc)
        assert json.loads(path.read_text())["markups"][0]["coordinateSystem"] == system
        again = mrml.add_points(f"reloaded {system}")
        reader = slicer.vtkMRMLMarkupsJsonStorageNode()
        reader.SetFileName(str(path))
        assert reader.ReadData(again)
        clicks = mrml_markups.clicks_from_markups(again, None)
        assert np.allclose([p for p, _ in clicks], points, atol=1e-6)


# ------------------------------------------------------------------------------------------------ writing
def test_write_mask_writes_only_the_box_and_never_touches_other_segments(scene):
    _, volume, seg, ids = scene
    fill(seg, volume, ids)
    before = all_arrays(seg, volume, ids)
    mask = block((5, 5, 5), (45, 40, 30))  # overlaps the target, "other" and "locked"; reaches beyond the box
    box = Box((8, 6, 4), (40, 36, 28))
    record = mrml_writing.write_mask(seg, ids["target"], volume, mask, box, overwrite="none")
    after = all_arrays(seg, volume, ids)
    inside = np.zeros(SHAPE, bool)
    inside[box.slices] = True
    assert np.array_equal(after["target"][~inside], before["target"][~inside])  # nothing outside the box
    others = (before["other"] | before["locked"]).astype(bool)
    expected = np.where(inside & ~others, mask, before["target"])
    assert np.array_equal(after["target"], expected)
    assert np.array_equal(after["other"], before["other"]) and np.array_equal(after["locked"], before["locked"])
    assert record.changed and record.segment_ids == [ids["target"]]
    # our reader agrees with Slicer's export
    assert np.array_equal(mrml_volumes.read_segment(seg, ids["target"], volume), after["target"])
    # undo restores exactly, redo re-applies
    assert mrml_writing.undo_write(seg, record) == box
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(seg, volume, ids).values(), before.values()))
    mrml_writing.redo_write(seg, record)
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(seg, volume, ids).values(), after.values()))


def test_write_mask_respects_the_editable_area(scene):
    _, volume, seg, ids = scene
    fill(seg, volume, ids)
    before = all_arrays(seg, volume, ids)
    editable = np.zeros(SHAPE, bool)
    editable[:, :, :20] = True  # i < 20 only
    mask = block((0, 0, 0), (60, 50, 40))
    mask[block((4, 4, 4), (8, 8, 6)).astype(bool)] = 0  # a hole inside the existing target: erasing is masked too
    record = mrml_writing.write_mask(seg, ids["target"], volume, mask, Box((0, 0, 0), (60, 50, 40)), editable=editable)
    after = all_arrays(seg, volume, ids)
    others = (before["other"] | before["locked"]).astype(bool)
    assert np.array_equal(after["target"], np.where(editable & ~others, mask, before["target"]))
    assert not after["target"][:, :, 20:].any() and after["target"][:, :, :20].sum() > 0
    mrml_writing.undo_write(seg, record)
    assert np.array_equal(slicer_segment_array(seg, ids["target"], volume), before["target"])
    # closed surfaces that existed are re-created from the new labelmap
    seg.CreateClosedSurfaceRepresentation()
    mrml_writing.redo_write(seg, record)
    surface = seg.GetSegmentation().GetSegment(ids["target"]).GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 0
    bounds = np.array(surface.GetBounds()).reshape(3, 2)
    corners = oblique_affine() @ np.array([[i, j, k, 1.0] for i in (0, 19) for j in (0, 49) for k in (0, 39)]).T
    assert np.all(bounds[:, 0] >= corners[:3].min(1) - 2.0) and np.all(bounds[:, 1] <= corners[:3].max(1) + 2.0)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-layer", "separate-layers"])
def test_overwrite_all_takes_voxels_from_other_segments_except_locked_ones(scene, shared):
    _, volume, seg, ids = scene
    segmentation = seg.GetSegmentation()
    box = Box((0, 0, 0), (60, 50, 40))
    # write the other segments through the bridge too: they stay in the target's (shared) layer
    mrml_writing.write_mask(seg, ids["other"], volume, block((20, 20, 15), (35, 32, 25)), box, overwrite="all")
    mrml_writing.write_mask(seg, ids["locked"], volume, block((36, 15, 10), (40, 25, 30)), box, overwrite="all")
    mrml_masking.set_segment_locked(seg, ids["locked"])
    if not shared:
        segmentation.SeparateSegmentLabelmap(ids["other"])
        segmentation.SeparateSegmentLabelmap(ids["locked"])
    same_layer = segmentation.GetLayerIndex(ids["other"]) == segmentation.GetLayerIndex(ids["target"])
    assert same_layer == shared and (segmentation.GetNumberOfLayers() == 1) == shared
    before = all_arrays(seg, volume, ids)
    mask = block((10, 10, 10), (45, 40, 30))
    record = mrml_writing.write_mask(seg, ids["target"], volume, mask, box, overwrite="all")
    after = all_arrays(seg, volume, ids)
    locked = before["locked"].astype(bool)
    assert np.array_equal(after["target"], np.where(locked, 0, mask))
    assert np.array_equal(after["other"], before["other"] & (1 - mask))  # gave up what the target took
    assert np.array_equal(after["locked"], before["locked"])
    assert not (after["target"] & after["other"]).any()
    assert set(record.segment_ids) == {ids["target"], ids["other"]}
    mrml_writing.undo_write(seg, record)
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(seg, volume, ids).values(), before.values()))
    mrml_writing.redo_write(seg, record)
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(seg, volume, ids).values(), after.values()))


def test_overwrite_visible_spares_hidden_segments(scene):
    _, volume, seg, ids = scene
    fill(seg, volume, ids)
    mrml_masking.set_segment_locked(seg, ids["locked"], False)
    assert not mrml_masking.is_segment_locked(seg, ids["locked"])
    seg.GetDisplayNode().SetSegmentVisibility(ids["locked"], False)
    before = all_arrays(seg, volume, ids)
    mask = block((10, 10, 10), (45, 40, 30))
    mrml_writing.write_mask(seg, ids["target"], volume, mask, Box((0, 0, 0), (60, 50, 40)), overwrite="visible")
    after = all_arrays(seg, volume, ids)
    assert np.array_equal(after["locked"], before["locked"])  # hidden: protected
    taken = mask & (1 - before["locked"])  # the target takes the mask except where protected (hidden) segments are
    assert np.array_equal(after["target"], np.where(before["locked"] > 0, before["target"], mask))
    assert np.array_equal(after["other"], before["other"] & (1 - taken))  # visible: gives up what the target took


def test_protected_mask_per_overwrite_setting(scene):
    _, volume, seg, ids = scene
    fill(seg, volume, ids)
    arrays = {k: v.astype(bool) for k, v in all_arrays(seg, volume, ids).items()}
    none = mrml_masking.protected_mask(seg, ids["target"], volume, "none")
    assert np.array_equal(none, arrays["other"] | arrays["locked"])
    assert np.array_equal(mrml_masking.protected_mask(seg, ids["target"], volume, "all"), arrays["locked"])
    assert np.array_equal(mrml_masking.protected_mask(seg, ids["target"], volume, "visible"), arrays["locked"])
    seg.GetDisplayNode().SetSegmentVisibility(ids["other"], False)
    assert np.array_equal(
        mrml_masking.protected_mask(seg, ids["target"], volume, "visible"), arrays["other"] | arrays["locked"]
    )
    assert none.dtype == bool and none.shape == SHAPE
    with pytest.raises(mrml_volumes.BridgeError, match="overwrite"):
        mrml_masking.protected_mask(seg, ids["target"], volume, "some")


def test_editable_mask_and_overwrite_mode_from_the_segment_editor_node(scene):
    mrml, volume, seg, ids = scene
    fill(seg, volume, ids)
    arrays = {k: v.astype(bool) for k, v in all_arrays(seg, volume, ids).items()}
    editor = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
    editable = mrml_masking.editable_mask(seg, ids["target"], volume, editor)
    assert np.array_equal(editable, ~(arrays["other"] | arrays["locked"]))  # the target itself stays editable
    assert mrml_masking.overwrite_mode_from_editor_node(editor) == "visible"
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(300.0, 1000.0)
    assert np.array_equal(mrml_masking.editable_mask(seg, ids["target"], volume, editor), image() >= 300)


def test_write_mask_refuses_bad_input_without_modifying_anything(scene):
    mrml, volume, seg, ids = scene
    fill(seg, volume, ids)
    before = all_arrays(seg, volume, ids)
    box = Box((0, 0, 0), (60, 50, 40))
    with pytest.raises(mrml_volumes.BridgeError, match="locked"):
        mrml_writing.write_mask(seg, ids["locked"], volume, block((0, 0, 0), (9, 9, 9)), box)
    with pytest.raises(mrml_volumes.BridgeError, match="shape"):
        mrml_writing.write_mask(seg, ids["target"], volume, np.ones((10, 10, 10), np.uint8), box)
    with pytest.raises(mrml_volumes.BridgeError, match="no segment"):
        mrml_writing.write_mask(seg, "nope", volume, block((0, 0, 0), (9, 9, 9)), box)
    with pytest.raises(mrml_volumes.BridgeError, match="overwrite"):
        mrml_writing.write_mask(seg, ids["target"], volume, block((0, 0, 0), (9, 9, 9)), box, overwrite="everything")
    assert all(np.array_equal(a, b) for a, b in zip(all_arrays(seg, volume, ids).values(), before.values()))
    record = mrml_writing.write_mask(seg, ids["target"], volume, block((0, 0, 0), (9, 9, 9)), box)
    with pytest.raises(mrml_volumes.BridgeError, match="another segmentation"):
        mrml_writing.undo_write(mrml.add_segmentation(volume), record)
    empty = mrml_writing.write_mask(
        seg, ids["target"], volume, block((0, 0, 0), (9, 9, 9)), Box((70, 0, 0), (80, 5, 5))
    )
    assert not empty.changed and empty.box.empty


def test_segmentation_under_its_own_transform_gets_the_voxels_at_the_right_place(scene):
    mrml, volume, seg, ids = scene
    shift = rigid(15.0, [4.0, -6.0, 9.0])
    seg.SetAndObserveTransformNodeID(mrml.add_linear_transform(shift).GetID())
    mask = block((20, 20, 10), (30, 28, 16))
    mrml_writing.write_mask(seg, ids["target"], volume, mask, Box((0, 0, 0), (60, 50, 40)))
    assert np.array_equal(mrml_volumes.read_segment(seg, ids["target"], volume), mask)
    # the labelmap voxel holding the block's corner sits, in the world, on the volume's voxel
    layer = seg.GetSegmentation().GetSegment(ids["target"]).GetRepresentation("Binary labelmap")
    m = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(m)
    world = shift @ vtk_matrix_array(m) @ np.array([20.0, 20.0, 10.0, 1.0])
    assert np.allclose(world, oblique_affine() @ np.array([20.0, 20.0, 10.0, 1.0]), atol=1e-6)


def test_segments_stored_on_another_grid(mrml):
    volume = mrml.add_volume(image(), oblique_affine())
    coarse_affine = oblique_affine() @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse_affine[:3, 3] += oblique_affine()[:3, :3] @ np.array([0.25, 0.25, 0.25])  # no ties when resampling
    coarse = mrml.add_volume(np.zeros((20, 25, 30), np.int16), coarse_affine, "coarse")
    seg = mrml.add_segmentation(coarse)  # the segmentation's geometry is another (coarser) grid
    segmentation = seg.GetSegmentation()
    other, target = segmentation.AddEmptySegment("other"), segmentation.AddEmptySegment("target")
    coarse_block = np.zeros((20, 25, 30), np.uint8)
    coarse_block[5:12, 8:16, 10:20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(coarse_block, seg, other, coarse)
    # reading resamples (nearest neighbour), like Slicer's own export
    protected = mrml_masking.protected_mask(seg, target, volume, "none")
    assert protected.sum() == 8 * coarse_block.sum()
    assert np.array_equal(protected, slicer_segment_array(seg, other, volume).astype(bool))
    # an empty target shares the other's layer on the coarse grid: it gets its own layer on the volume's grid
    mask = block((10, 10, 5), (50, 40, 30))
    box = Box((0, 0, 0), (60, 50, 40))
    mrml_writing.write_mask(seg, target, volume, mask, box, overwrite="none")
    assert np.array_equal(mrml_volumes.read_segment(seg, target, volume), mask & ~protected)
    assert np.array_equal(mrml_masking.protected_mask(seg, target, volume, "none"), protected)
    # taking voxels from the coarse segment cannot be exact: refused, nothing modified
    with pytest.raises(mrml_volumes.BridgeError, match="another voxel grid"):
        mrml_writing.write_mask(seg, target, volume, mask, box, overwrite="all")
    assert np.array_equal(mrml_volumes.read_segment(seg, target, volume), mask & ~protected)
    # a target holding voxels on another grid cannot be written exactly either
    with pytest.raises(mrml_volumes.BridgeError, match="another voxel grid"):
        mrml_writing.write_mask(seg, other, volume, block((0, 0, 0), (8, 8, 8)), box, overwrite="none")


# ------------------------------------------------------------------------------------------------ state and files
def test_state_tag_round_trip_in_the_scene_and_through_seg_nrrd(scene, tmp_path):
    mrml, volume, seg, ids = scene
    assert mrml_state.load_state(seg, ids["target"]) is None
    state = {
        "format": "maissegment-session",
        "clicks": [{"ras": [1.5, -2.25, 3.0], "include": True}, {"ras": [0.1, 0.2, 0.3], "include": False}],
        "note": 'a|b:c\nd=e;f"g ümlaut',
        "ijk_to_ras": oblique_affine().tolist(),
    }
    mrml_state.save_state(seg, ids["target"], state)
    assert mrml_state.load_state(seg, ids["target"]) == state
    mrml_writing.write_mask(seg, ids["target"], volume, block((2, 2, 2), (9, 9, 9)), Box((0, 0, 0), (60, 50, 40)))
    path = tmp_path / "state.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(seg)
    again = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(again)
    rid = again.GetSegmentation().GetSegmentIdBySegmentName("target")
    assert mrml_state.load_state(again, rid) == state
    mrml_state.clear_state(again, rid)
    assert mrml_state.load_state(again, rid) is None
    with pytest.raises(mrml_volumes.BridgeError, match="JSON"):
        mrml_state.save_state(seg, ids["target"], {"bad": float("nan")})
    seg.GetSegmentation().GetSegment(ids["other"]).SetTag(mrml_state.STATE_TAG, "{not json")
    with pytest.raises(mrml_volumes.BridgeError, match="damaged"):
        mrml_state.load_state(seg, ids["other"])


def test_seg_nrrd_read_by_slicerio_has_names_values_and_our_mask(scene, tmp_path):
    slicerio = pytest.importorskip("slicerio")
    _, volume, seg, ids = scene
    box = Box((0, 0, 0), (60, 50, 40))
    target = block((5, 6, 7), (25, 30, 20))
    target[10:12, 12:20, 8:14] = 0
    other = block((30, 10, 5), (50, 40, 15))
    mrml_writing.write_mask(seg, ids["target"], volume, target, box)
    mrml_writing.write_mask(seg, ids["other"], volume, other, box)
    path = tmp_path / "result.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(seg)
    data = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(data) == ["target", "other", "locked"]
    values = [(s["layer"], s["labelValue"]) for s in data["segments"]]
    assert len(set(values)) == len(values), f"two segments share a layer and label value: {values}"
    ras_to_ijk = np.linalg.inv(oblique_affine())
    lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    for name, expected in (("target", target), ("other", other)):
        info = next(s for s in data["segments"] if s["name"] == name)
        segment = seg.GetSegmentation().GetSegment(ids[name])  # the values the file must carry: the node's
        assert info["labelValue"] == segment.GetLabelValue() >= 1
        assert info["layer"] == seg.GetSegmentation().GetLayerIndex(ids[name])
        assert info["id"] == ids[name]
        voxels = slicerio.segment_mask(data, name)  # IJK order, LPS geometry, maybe cropped
        ijk = np.argwhere(voxels)
        mapped = (ras_to_ijk @ lps_to_ras @ np.asarray(data["ijkToLPS"]) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
        assert np.allclose(mapped, np.rint(mapped), atol=1e-3)
        full = np.zeros(SHAPE, np.uint8)
        idx = np.rint(mapped).astype(int)
        full[idx[:, 2], idx[:, 1], idx[:, 0]] = 1
        assert np.array_equal(full, expected)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_points_on_an_oblique_volume_through_a_session_into_the_segment(scene):
    from MAISSegmentLib import build_model
    from MAISSegmentLib.session import InteractiveSession

    mrml, volume, seg, ids = scene
    fill(seg, volume, ids, target=False)
    vol = mrml_volumes.volume_from_node(volume)
    inc, exc = mrml.add_points("include"), mrml.add_points("exclude")
    mrml_markups.add_click_point(inc, vol.ijk_to_ras_points(np.array([30.0, 25.0, 20.0])), order=0)
    mrml_markups.add_click_point(exc, vol.ijk_to_ras_points(np.array([5.0, 5.0, 5.0])), order=1)
    model = build_model(None, checkpoint=TINY / "ref_tiny.pth")
    session = InteractiveSession(model)
    session.set_image(vol, protected=mrml_masking.protected_mask(seg, ids["target"], volume, "none"))
    before = all_arrays(seg, volume, ids)
    records = []
    for ras, include in mrml_markups.clicks_from_markups(inc, exc):
        box = session.add_click(ras, include)
        records.append(mrml_writing.write_mask(seg, ids["target"], volume, session.mask, box, overwrite="none"))
        assert np.array_equal(mrml_volumes.read_segment(seg, ids["target"], volume), session.mask)
    assert np.array_equal(slicer_segment_array(seg, ids["target"], volume), session.mask)
    assert session.mask.any()
    after = all_arrays(seg, volume, ids)
    assert np.array_equal(after["other"], before["other"]) and np.array_equal(after["locked"], before["locked"])
    mrml_state.save_state(seg, ids["target"], session.state())
    assert mrml_state.load_state(seg, ids["target"])["clicks"] == session.state()["clicks"]
    for record in reversed(records):
        mrml_writing.undo_write(seg, record)
    assert not slicer_segment_array(seg, ids["target"], volume).any()


# ------------------------------------------------------------------------------------------------ export of cases
def test_export_cases_writes_image_label_pairs_and_a_manifest_load_cases_reads(scene, tmp_path):
    """The files carry the volume's voxels and world geometry (a parent transform included), one label value per
    painted segment named after it; data.load_cases/list_targets read the manifest; the scene is not modified."""
    from MAISSegmentLib.data import list_targets, load_cases
    from MAISSegmentLib.io import read_volume

    mrml, volume, seg, ids = scene
    fill(seg, volume, ids)
    moved = mrml.add_linear_transform(rigid(12.0, (4.0, -3.0, 2.0)), "moved")
    volume.SetAndObserveTransformNodeID(moved.GetID())
    seg.SetAndObserveTransformNodeID(moved.GetID())
    second = mrml.add_volume(image()[:, :, ::-1].copy(), oblique_affine(), "oblique")  # same name: unique ids
    seg2 = mrml.add_segmentation(second, "second")
    only = seg2.GetSegmentation().AddEmptySegment("ball", "ball")
    seg2.GetSegmentation().AddEmptySegment("empty", "empty")
    slicer.util.updateSegmentBinaryLabelmapFromArray(block((5, 5, 5), (20, 20, 20)), seg2, only, second)
    before = all_arrays(seg, volume, ids)

    manifest, exported = mrml_export.export_cases([(volume, seg), (second, seg2)], tmp_path / "cases")
    assert [c.id for c in exported] == ["oblique", "oblique_2"]
    assert exported[0].labels == {1: "target", 2: "other", 3: "locked"}
    assert exported[1].labels == {1: "ball"} and any("'empty'" in n for n in exported[1].notes)
    assert any("overlaps" in n for n in exported[0].notes)  # "locked" overlaps "other" in fill()
    image_file, label_file = read_volume(exported[0].image), read_volume(exported[0].label)
    assert np.array_equal(image_file.array, image())
    assert np.allclose(
        image_file.ijk_to_ras, mrml_volumes.volume_from_node(volume).ijk_to_ras, atol=1e-4
    )  # world geometry
    assert np.allclose(label_file.ijk_to_ras, image_file.ijk_to_ras, atol=1e-4)
    expected = np.zeros(SHAPE, np.uint8)
    for value, name in ((1, "target"), (2, "other"), (3, "locked")):
        expected[before[name] > 0] = value
    assert np.array_equal(label_file.array, expected)
    assert exported[0].voxels == {v: int((expected == v).sum()) for v in (1, 2, 3)}

    cases = load_cases(manifest)
    assert [(c.id, c.labels, c.split) for c in cases] == [
        ("oblique", {1: "target", 2: "other", 3: "locked"}, "train"),
        ("oblique_2", {1: "ball"}, "train"),
    ]
    targets, skipped = list_targets(cases)
    assert [(t.case.id, t.name) for t in targets][-1] == ("oblique_2", "ball") and not skipped
    after = all_arrays(seg, volume, ids)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_export_refuses_cases_it_cannot_use_with_actionable_messages(scene, tmp_path):
    mrml, volume, seg, _ = scene
    out = tmp_path / "cases"
    with pytest.raises(mrml_volumes.BridgeError, match=r"no painted voxels.*finish the segmentation"):
        mrml_export.export_case(volume, seg, out)  # three empty segments
    with pytest.raises(mrml_volumes.BridgeError, match="choose the volume it was drawn on"):
        mrml_export.export_case(None, seg, out)
    bare = mrml.add_segmentation(volume, "bare")
    with pytest.raises(mrml_volumes.BridgeError, match="has no segments"):
        mrml_export.export_case(volume, bare, out)
    with pytest.raises(mrml_volumes.BridgeError, match="no segment with ID 'nope'"):
        mrml_export.export_case(volume, seg, out, segment_ids=["nope"])
    with pytest.raises(mrml_volumes.BridgeError, match="no cases to export"):
        mrml_export.export_cases([], out)
    # a segmentation drawn on a bigger volume whose segment lies partly outside this one: the wrong volume
    big_affine = oblique_affine()
    big = mrml.add_volume(np.zeros((40, 50, 120), np.int16), big_affine, "big")
    seg_big = mrml.add_segmentation(big, "on big")
    sid = seg_big.GetSegmentation().AddEmptySegment("long", "long")
    long_block = np.zeros((40, 50, 120), np.uint8)
    long_block[10:20, 10:20, 50:70] = 1  # i 50..69: beyond this volume's 60 columns
    slicer.util.updateSegmentBinaryLabelmapFromArray(long_block, seg_big, sid, big)
    with pytest.raises(
        mrml_volumes.BridgeError, match=r"1000 of the 2000 voxels of segment 'long'.*outside the volume"
    ):
        mrml_export.export_case(volume, seg_big, out)
    assert mrml_export.export_case(big, seg_big, out).voxels == {1: 2000}  # on its own volume it is fine
    assert mrml_export.reference_volume_of(seg_big) is big and mrml_export.reference_volume_of(None) is None
    assert sorted(p.name for p in out.iterdir()) == ["big_img.nii.gz", "big_lab.nii.gz"]  # nothing else was written
