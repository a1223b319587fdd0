"""Writing into segments with an exact undo record, and the undo/redo history of every segment (no Qt).

:class:`HistoryMixin` writes a session's changed box into its segment (``_write``: masking, locked segments and the
user's edits honoured, through ``MAISSegmentLib.mrml_writing``), records each change (``_push``), keeps the history of
all segments within ``undo_budget_bytes`` (``_trim_undo``, oldest first) and undoes / redoes a change exactly:
labelmaps of every segment it touched, the session (memory included) and the points (``undo``, ``redo``, ``reset``).
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from .dependencies import add_library_path
from .edits import _copy_boxed
from .records import UpdateResult, _Operation, _Target


def _took_in_edits(operation: _Operation) -> bool:
    """Whether an operation found new user edits (a stroke made since the operation before it) when it wrote."""
    before, after = operation.edited_before, operation.edited_after
    if before is None or after is None:
        return False
    box = before.box.union(after.box)
    return not box.empty and not np.array_equal(before.read(box), after.read(box))


class HistoryMixin:
    """The logic's segment writes and their undo/redo history (see the module docstring)."""

    def _write(self, target: _Target, box: Any) -> Any:
        add_library_path()
        from MAISSegmentLib.mrml_masking import editable_mask, editing_restricted
        from MAISSegmentLib.mrml_writing import write_mask

        segmentation, volume = self._nodes(target)
        editable = None
        if editing_restricted(self.segment_editor_node):
            editable = editable_mask(segmentation, target.segment_id, volume, self.segment_editor_node)
        record = write_mask(
            segmentation,
            target.segment_id,
            volume,
            target.session.mask,
            box,
            editable=editable,
            overwrite=self._overwrite_mode(),
            edits=self._edits(target),
        )
        self._others_wrote(target, record)
        return record

    def _others_wrote(self, target: _Target, record: Any, side: str = "after") -> None:
        """Other segments a write changed hold the record's ``side`` now ("after" a write or redo, "before" after an
        undo): that content is MAISSegment's, not the user's edits."""
        for segment_id in record.segment_ids[1:]:
            content = (record.after if side == "after" else record.before)(segment_id)
            for other in self._targets.values():
                if (
                    other.segmentation_node_id == target.segmentation_node_id
                    and other.segment_id == segment_id
                    and other.edits is not None
                    and other.edits.known
                ):
                    other.edits.wrote(record.box, content)

    def _push(self, target: _Target, operation: _Operation) -> None:
        """Record an operation; keep no more session steps than the session itself can undo."""
        self._serial += 1
        operation.serial = self._serial
        target.stroke_first = False
        target.undo.append(operation)
        target.redo.clear()
        limit = target.session.options.undo_limit
        while target.undo and sum(op.steps for op in target.undo) > limit:
            target.undo.pop(0)

    def undo_nbytes(self) -> int:
        """Bytes held by the undo/redo history of every segment (segment patches and sessions' records)."""
        return sum(self._target_undo_nbytes(t) for t in self._targets.values())

    @staticmethod
    def _target_undo_nbytes(target: _Target) -> int:
        ops = sum(op.nbytes for op in target.undo) + sum(op.nbytes for op in target.redo)
        return ops + (target.session.undo_nbytes if target.session is not None else 0)

    def _trim_undo(self) -> int:
        """Keep the undo history of all segments within ``undo_budget_bytes``: the oldest operations (of any segment)
        are dropped first, never the newest one. Also drops operations whose session steps the session itself no
        longer holds (its own byte budget). Returns the number of operations dropped."""
        dropped = 0
        for target in self._targets.values():
            depth = target.session.undo_depth if target.session is not None else 0
            while target.undo and sum(op.steps for op in target.undo) > depth:
                target.undo.pop(0)
                dropped += 1
        total = self.undo_nbytes()
        while total > self.undo_budget_bytes:
            candidates = [t for t in self._targets.values() if t.undo]
            if sum(len(t.undo) for t in candidates) <= 1:
                break
            target = min(candidates, key=lambda t: t.undo[0].serial)
            before = self._target_undo_nbytes(target)
            operation = target.undo.pop(0)
            if target.session is not None:
                target.session.drop_oldest_undo(operation.steps)
            total -= before - self._target_undo_nbytes(target)
            dropped += 1
        return dropped

    def reset(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """Remove every point of the segment and what the network wrote for them (undoable)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is None or target.session is None or not target.session.clicks:
            return UpdateResult("none", model=self.model_label)
        box = target.session.reset()
        edits = self._edits(target)
        edited_before = _copy_boxed(edits.edited)
        try:
            record = self._write(target, box)
        except BaseException:
            target.session.undo()
            raise
        self._push(target, _Operation(1, record, "reset", edited_before, _copy_boxed(edits.edited)))
        self._sync_points(target)
        self._store_state(target)
        target.protection_stamp = self._protection_stamp(target)
        return self._result(target, "reset", record, 0.0, 0)

    def changed_since_written(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> bool:
        """Whether the segment differs from what MAISSegment last left in it (its last point, undo or redo): e.g. a
        Segment Editor stroke since. True when MAISSegment has no record of the segment. Reads the segment's extent."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is None or target.edits is None or target.edits.written is None:
            return True
        add_library_path()
        from MAISSegmentLib.mrml_volumes import read_segment_extent

        box, current = read_segment_extent(segmentation_node, segment_id, volume_node)
        written = target.edits.written
        if box.empty:
            return written.count() > 0
        return int(np.count_nonzero(current)) != written.count() or not np.array_equal(current, written.read(box))

    def undo_last_change(
        self,
        segmentation_node: Any,
        segment_id: str,
        volume_node: Any,
        editor_undo: Callable[[], bool] | None = None,
    ) -> UpdateResult:
        """Undo (Ctrl+Z) the segment's last change, whoever made it: one history for the points and the Segment
        Editor's strokes, in the order they were made.

        ``editor_undo`` (the Segment Editor's undo; returns whether it undid something) is called when the last change
        is a stroke: the segment changed since MAISSegment's last write, or the point just undone had taken in a
        stroke made before it, or MAISSegment has nothing to undo (or cannot: the stroke overlaps its change).
        Otherwise MAISSegment's last change (voxels, points and memory) is undone.
        """
        add_library_path()
        from MAISSegmentLib.mrml_writing import EditedSinceError

        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        tried_editor = False
        if editor_undo is not None and (
            not self.can_undo(segmentation_node, segment_id, volume_node)
            or target.stroke_first
            or self.changed_since_written(segmentation_node, segment_id, volume_node)
        ):
            tried_editor = True
            if editor_undo():
                if target is not None:
                    target.stroke_first = False
                return UpdateResult("editor-undo", model=self.model_label)
        try:
            result = self.undo(segmentation_node, segment_id, volume_node)
        except EditedSinceError:
            if editor_undo is None or tried_editor or not editor_undo():
                raise
            target.stroke_first = False
            return UpdateResult("editor-undo", model=self.model_label)
        if result.action == "undo" and target.redo:
            target.stroke_first = _took_in_edits(target.redo[-1])
        return result

    def redo_last_change(
        self,
        segmentation_node: Any,
        segment_id: str,
        volume_node: Any,
        editor_redo: Callable[[], bool] | None = None,
    ) -> UpdateResult:
        """Redo (Ctrl+Y) what :meth:`undo_last_change` undid: MAISSegment's change when the segment still holds what
        MAISSegment left, else the Segment Editor's (``editor_redo``; returns whether it redid something)."""
        if self.can_redo(segmentation_node, segment_id, volume_node) and not self.changed_since_written(
            segmentation_node, segment_id, volume_node
        ):
            return self.redo(segmentation_node, segment_id, volume_node)
        if editor_redo is not None and editor_redo():
            return UpdateResult("editor-redo", model=self.model_label)
        return self.redo(segmentation_node, segment_id, volume_node)

    def undo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """Undo the last change of this segment: exact labelmaps (other segments too), session memory and points."""
        return self._undo_redo(segmentation_node, segment_id, volume_node, redo=False)

    def redo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """Redo the last undone change of this segment."""
        return self._undo_redo(segmentation_node, segment_id, volume_node, redo=True)

    def _undo_redo(self, segmentation_node: Any, segment_id: str, volume_node: Any, redo: bool) -> UpdateResult:
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        stack = None if target is None else (target.redo if redo else target.undo)
        if not stack:
            return UpdateResult("none", model=self.model_label)
        add_library_path()
        from MAISSegmentLib.mrml_writing import redo_write, undo_write

        operation = stack[-1]
        if operation.record is not None:  # MRML first: if the segment cannot be restored, nothing changes
            record = operation.record
            (redo_write if redo else undo_write)(segmentation_node, record)
            if target.edits is not None:  # the segment holds the record's content again, edits as they were then
                target.edits.wrote(record.box, (record.after if redo else record.before)(target.segment_id))
                edited = operation.edited_after if redo else operation.edited_before
                if edited is not None:
                    target.edits.edited = _copy_boxed(edited)
            self._others_wrote(target, record, "after" if redo else "before")
        stack.pop()
        target.stroke_first = False
        for _step in range(operation.steps):
            target.session.redo() if redo else target.session.undo()
        (target.undo if redo else target.redo).append(operation)
        self._sync_points(target)
        self._store_state(target)
        target.protection_stamp = self._protection_stamp(target)
        return self._result(target, "redo" if redo else "undo", operation.record, 0.0, 0)
