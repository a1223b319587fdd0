"""The user's work is never overwritten without a way back (issue 11, items 1, 4 and 5), on real MRML (slicer-core):
touch-ups painted between points survive the next point, a model switch or a scene reloaded with other weights asks
before the whole segment is rewritten, and the undo history stays within its byte budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slicer_headless import mrml_fixture  # noqa: F401  (provides the "mrml" fixture)
from slicer_module_stubs import module_fixture  # noqa: F401  (provides the "module" fixture)

from test_slicer_module import arrays, scene_fixture, started_fixture  # noqa: F401  (the module tests' fixtures)


def paint(s, array: np.ndarray) -> None:
    """What a Segment Editor paint/erase does: the target segment becomes ``array`` (bool KJI on the volume)."""
    import slicer

    slicer.util.updateSegmentBinaryLabelmapFromArray(array.astype(np.uint8), s.seg, s.ids["target"], s.volume)


def touch_up(s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Erase the lower half (in k) of the target's mask and paint 30 voxels beside the first point. Returns (segment
    after the touch-up, erased voxels, painted voxels)."""
    mask = arrays(s)["target"].astype(bool)
    k = np.nonzero(mask)[0]
    erased = mask.copy()
    erased[int(np.median(k)) :] = False
    erased = mask & ~erased
    outside = np.argwhere(~mask)  # the 30 unsegmented voxels nearest to the first point (KJI 20, 25, 30)
    nearest = outside[np.argsort(np.linalg.norm(outside - np.array([20, 25, 30]), axis=1))[:30]]
    painted = np.zeros_like(mask)
    painted[tuple(nearest.T)] = True
    touched = (mask & ~erased) | painted
    paint(s, touched)
    assert erased.any() and painted.any()
    return touched, erased, painted


def place_and_update(s, ijk=(31, 25, 20)):
    s.T.place(s.include, s.T.ras(ijk))
    return s.logic.on_points_changed(*s.target, s.include, s.exclude)


def test_touch_ups_between_points_survive_the_next_point(started):
    """Painted voxels stay painted and erased ones stay erased at the next point (and the ones after); the status
    line says how many were kept; 'Overwrite my edits' lets the model replace them, and Undo brings them back."""
    s = started
    _touched, erased, painted = touch_up(s)
    result = place_and_update(s)
    now = arrays(s)["target"].astype(bool)
    assert result.action == "add" and result.changed
    assert now[painted].all() and not now[erased].any()
    model_mask = s.logic.session(*s.target).mask > 0
    assert result.kept_edits == int(np.count_nonzero((model_mask != now) & (erased | painted)))
    assert result.kept_edits > 0 and "touch-ups kept" in s.logic.describe(result)
    assert s.logic.edited_voxels(*s.target) == int(np.count_nonzero(erased | painted))
    assert np.array_equal(arrays(s)["other"], s.before["other"])
    place_and_update(s, (29, 24, 21))  # and at the point after
    now = arrays(s)["target"].astype(bool)
    assert now[painted].all() and not now[erased].any()
    kept = now.copy()
    result = s.logic.overwrite_edits(*s.target)
    assert result.action == "overwrite" and s.logic.edited_voxels(*s.target) == 0
    model_mask = s.logic.session(*s.target).mask > 0
    assert np.array_equal(arrays(s)["target"].astype(bool), model_mask)
    assert s.logic.undo(*s.target).action == "undo"  # the edits are back, and protected again
    assert np.array_equal(arrays(s)["target"].astype(bool), kept)
    assert s.logic.edited_voxels(*s.target) == int(np.count_nonzero(erased | painted))


def test_a_segment_drawn_elsewhere_is_kept_unless_the_user_agrees_to_replace_it(scene):
    """Without the user's agreement the first point keeps every voxel already there (they are the user's); with it
    (the widget's question), MAISSegment replaces them around the point."""
    s = scene
    s.target = (s.seg, s.ids["target"], s.volume)
    s.include, s.exclude = s.logic.get_point_lists(*s.target[:2])
    drawn = np.zeros_like(arrays(s)["target"], dtype=bool)
    drawn[18:22, 20:30, 25:35] = True
    paint(s, drawn)
    place_and_update(s, (30, 25, 20))
    assert arrays(s)["target"].astype(bool)[drawn].all()
    s.logic.undo(*s.target)
    s.logic.clear()
    s.logic.allow_replacing(*s.target)
    place_and_update(s, (30, 25, 20))
    mask = s.logic.session(*s.target).mask > 0
    assert np.array_equal(arrays(s)["target"].astype(bool), mask)


def test_a_model_switch_asks_before_rewriting_the_whole_segment_and_keeps_touch_ups(started, module):
    """The next point after a model switch raises RewriteNeeded and changes nothing; once the user agrees the clicks
    are replayed with the new network, which replaces the segment everywhere except the user's touch-ups; Undo
    restores the old model's segment exactly."""
    from MAISSegmentLib import build_model

    s = started
    touched, erased, painted = touch_up(s)
    torch.manual_seed(1)
    s.logic.use_model(build_model("sam-med3d-tiny"), "another tiny network")
    with pytest.raises(module.RewriteNeeded, match="other weights"):
        place_and_update(s)
    assert np.array_equal(arrays(s)["target"].astype(bool), touched)
    assert len(s.logic.session(*s.target).clicks) == 1
    s.logic.allow_rewrite(*s.target)
    result = s.logic.on_points_changed(*s.target, s.include, s.exclude)
    assert result.action == "add" and len(s.logic.session(*s.target).clicks) == 2
    now = arrays(s)["target"].astype(bool)
    mask = s.logic.session(*s.target).mask > 0
    assert now[painted].all() and not now[erased].any()
    assert np.array_equal(now[~(painted | erased)], mask[~(painted | erased)])  # the new model's, everywhere else
    assert np.array_equal(arrays(s)["other"], s.before["other"])
    assert s.logic.undo(*s.target).action == "undo"
    assert np.array_equal(arrays(s)["target"].astype(bool), touched)


def test_a_scene_reloaded_with_other_weights_asks_first_and_with_the_same_keeps_touch_ups(started, module):
    """After a reload (sessions gone, state in the segment tag): with the weights the segment was made with, the
    replayed mask is MAISSegment's and a touch-up saved with the scene survives the next point; with other weights
    (same model id: the SHA-256 tells) the next point asks first."""
    from MAISSegmentLib import build_model

    s = started
    _touched, erased, painted = touch_up(s)
    s.logic.clear()  # as after reopening the scene
    place_and_update(s)
    now = arrays(s)["target"].astype(bool)
    assert now[painted].all() and not now[erased].any()
    assert s.logic.session(*s.target).clicks and len(s.logic.session(*s.target).clicks) == 2
    s.logic.clear()
    other = build_model(None, checkpoint=s.logic._model_choice["checkpoint"])
    with torch.no_grad():
        next(other.parameters()).mul_(1.01)
    s.logic.use_model(other, "the same file, fine-tuned")
    before = arrays(s)["target"]
    with pytest.raises(module.RewriteNeeded):
        place_and_update(s, (29, 24, 21))
    assert np.array_equal(arrays(s)["target"], before)


def test_undo_history_stays_within_the_scene_budget(started):
    """Operations of all segments share one byte budget: the oldest are dropped first, the result and the status
    line say so, and what is left still undoes exactly."""
    s = started
    s.logic.undo_budget_bytes = 1  # everything but the newest operation must go
    result = place_and_update(s)
    assert result.undo_dropped >= 1 and "Undo history full" in s.logic.describe(result)
    assert "can no longer be undone" in s.logic.describe_details(result)
    assert (
        s.logic.can_undo(*s.target)
        and len(s.logic._targets[tuple(x.GetID() if hasattr(x, "GetID") else x for x in s.target)].undo) == 1
    )
    after_first = s.before["target"]
    s.logic.undo(*s.target)
    assert np.array_equal(arrays(s)["target"], after_first)
    assert not s.logic.can_undo(*s.target)


def test_sessions_share_one_read_only_volume_and_idle_ones_are_dropped(started):
    """Every segment's session on a volume uses the same read-only copy of its voxels; beyond max_live_sessions the
    least recently used session is dropped and its next point replays its clicks from the segment's tag (same
    mask)."""
    s = started
    first = s.logic.session(*s.target)
    assert not first.image.array.flags.writeable
    other = (s.seg, s.ids["other"], s.volume)
    include, exclude = s.logic.get_point_lists(*other[:2])
    s.T.place(include, s.T.ras((12, 12, 8)))
    s.logic.max_live_sessions = 1
    s.logic.on_points_changed(*other, include, exclude)
    assert s.logic.session(*other).image is first.image  # one copy for both segments
    assert s.logic.session(*s.target) is None  # dropped (least recently used)
    s.include, s.exclude = s.logic.get_point_lists(*s.target[:2])
    s.T.place(s.include, s.T.ras((31, 25, 20)))
    result = s.logic.on_points_changed(*s.target, s.include, s.exclude)
    assert result.action == "add" and result.clicks == 2  # the stored click was replayed, then the new one added
    assert np.array_equal(arrays(s)["target"].astype(bool), s.logic.session(*s.target).mask > 0)


def test_protection_reads_segments_sharing_a_layer_in_one_pass(mrml):
    """protected_mask / write_mask with many segments in one shared labelmap layer (a TotalSegmentator result): the
    union is exactly the segments' voxels."""
    import slicer

    from MAISSegmentLib import mrml_masking, mrml_volumes

    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    slicer.util.updateVolumeFromArray(volume, np.zeros((12, 14, 16), np.int16))
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    labels = np.zeros((12, 14, 16), np.uint8)
    labels[:, :, :] = (np.arange(16) % 8)[None, None, :]
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(labelmap, labels)
    slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, seg)
    ids = [seg.GetSegmentation().GetNthSegmentID(n) for n in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert len(ids) == 7 and len({seg.GetSegmentation().GetLayerIndex(i) for i in ids}) == 1  # one shared layer
    protected = mrml_masking.protected_mask(seg, ids[0], volume, "none")
    expected = labels > 0
    expected[labels == seg.GetSegmentation().GetSegment(ids[0]).GetLabelValue()] = False
    assert np.array_equal(protected, expected)
    assert mrml_volumes.count_segment_voxels(seg, ids[1], volume) == int(
        np.count_nonzero(mrml_volumes.read_segment(seg, ids[1], volume))
    )
