"""The user's own edits of a segment (Segment Editor touch-ups) kept against the network's mask (no Qt).

MAISSegment knows what it last wrote into each segment (``MAISSegmentLib.segment_edits.SegmentEdits``); voxels that
differ there are the user's and are kept by later writes. :class:`EditsMixin` creates that record, takes a segment's
current content as MAISSegment's own when the user agreed (``allow_replacing``, ``allow_rewrite``), counts the kept
voxels (``edited_voxels``) and lets the model overwrite them on request (``overwrite_edits``, undoable).
"""

from typing import Any

from .dependencies import add_library_path
from .records import UpdateResult, _Operation, _Target


def _copy_boxed(mask: Any) -> Any:
    """A copy of a ``segment_edits.BoxedMask`` (for undo)."""
    from MAISSegmentLib.segment_edits import BoxedMask

    return BoxedMask(mask.shape_kji, mask.box, mask.data.copy())


class EditsMixin:
    """The logic's handling of the user's own edits of a segment (see the module docstring)."""

    def _edits(self, target: _Target) -> Any:
        """The target's :class:`~MAISSegmentLib.segment_edits.SegmentEdits` (created on first use)."""
        if target.edits is None:
            from MAISSegmentLib.segment_edits import SegmentEdits

            target.edits = SegmentEdits(tuple(target.session.mask.shape))
        return target.edits

    def _adopt_segment(self, target: _Target) -> None:
        """Take the segment's current content as MAISSegment's own (the user agreed to replace it)."""
        add_library_path()
        from MAISSegmentLib.mrml_volumes import read_segment_extent
        from MAISSegmentLib.segment_edits import BoxedMask

        segmentation, volume = self._nodes(target)
        box, current = read_segment_extent(segmentation, target.segment_id, volume)  # its extent only, not the volume
        baseline = BoxedMask(tuple(target.session.mask.shape))
        baseline.write(box, current)
        self._edits(target).set_baseline(baseline)

    def allow_rewrite(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> None:
        """The user agreed (after :class:`RewriteNeeded`): the next update replays the segment's points with the model
        in use and rewrites the whole segment (their edits since the last point kept when known; undoable)."""
        self._target(segmentation_node, segment_id, volume_node).rewrite_allowed = True

    def allow_replacing(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> None:
        """The user agreed that the first update replaces the voxels drawn elsewhere (:meth:`unowned_voxels`) around
        the points. Without it they are kept as the user's own edits."""
        self._target(segmentation_node, segment_id, volume_node).replace_allowed = True

    def edited_voxels(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> int:
        """Voxels of the segment kept as the user's edits (changed since MAISSegment wrote them)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return 0 if target is None or target.edits is None else target.edits.edited_count()

    def overwrite_edits(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """ "Let the model overwrite my edits": write the session's mask over the voxels kept as the user's edits
        (undoable: Undo brings the edits back, protected again)."""
        from MAISSegmentLib.segment_edits import BoxedMask

        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is None or target.session is None or target.edits is None or not target.edits.edited_count():
            return UpdateResult("none", model=self.model_label)
        add_library_path()
        from MAISSegmentLib.mrml_volumes import read_segment_box

        edits = target.edits
        edited_before = _copy_boxed(edits.edited)
        box = edits.forget_edits()
        current = read_segment_box(segmentation_node, segment_id, volume_node, box)
        edits.wrote(box, current)  # what is there now is MAISSegment's to replace
        try:
            record = self._write(target, box)
        except BaseException:
            edits.edited = edited_before
            raise
        self._push(target, _Operation(0, record, "overwrite", edited_before, BoxedMask(edits.shape_kji)))
        self._store_state(target)
        return self._result(target, "overwrite", record, 0.0, 0)
