"""The segments being segmented (targets): selection checks, their sessions, the volumes they share (no Qt).

One target per (segmentation, segment, volume) (:class:`~records._Target`). :class:`TargetsMixin` checks the
selection (with the message that says what to select), finds or creates targets, shares one read-only ``Volume`` per
volume node between them (``_volume``), keeps at most ``max_live_sessions`` sessions in memory (``_drop_idle_sessions``)
and says what a session's protected voxels depend on (``_overwrite_mode``, ``_protection_stamp``).
"""

from typing import Any

import slicer
import vtk
from slicer.i18n import tr as _

from .constants import (
    DEFAULT_TERMINOLOGY_ENTRY,
    OVERWRITE_MODES,
)
from .dependencies import add_library_path
from .errors import MAISSegmentError
from .records import _Target


class TargetsMixin:
    """The logic's targets, shared volumes and live sessions (see the module docstring)."""

    @staticmethod
    def _check_segment(segmentation_node: Any, segment_id: str) -> None:
        if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise MAISSegmentError(_("Select a segmentation."))
        if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MAISSegmentError(_("Select a segment of the segmentation (or add one)."))

    @classmethod
    def _check_selection(cls, segmentation_node: Any, segment_id: str, volume_node: Any) -> None:
        cls._check_segment(segmentation_node, segment_id)
        if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
            raise MAISSegmentError(_("Select the volume to segment."))

    @classmethod
    def missing_selection_message(cls, segmentation_node: Any, segment_id: str, volume_node: Any) -> str:
        """What the user must select before placing points ("" when the segment and the volume are selected)."""
        try:
            cls._check_selection(segmentation_node, segment_id, volume_node)
        except MAISSegmentError as exc:
            return str(exc)
        return ""

    def _target(self, segmentation_node: Any, segment_id: str, volume_node: Any, create: bool = True) -> _Target | None:
        self._check_selection(segmentation_node, segment_id, volume_node)
        key = (segmentation_node.GetID(), segment_id, volume_node.GetID())
        target = self._targets.get(key)
        if target is None and create:
            target = _Target(segmentation_node.GetScene(), *key)
            self._targets[key] = target
        return target

    def session(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> Any:
        """The InteractiveSession of a segment on a volume, or None if it has none (yet)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return None if target is None else target.session

    def unowned_voxels(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> int:
        """Voxels of the segment that no MAISSegment session made: non-zero only before a segment's first update,
        when it was drawn elsewhere (Segment Editor, a loaded file). That update replaces the segment inside the box
        it writes with the network's mask (Undo restores the exact labelmap), so the widget asks first. 0 when the
        segment has a session or a stored session state with clicks (its content is MAISSegment's own)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is not None and target.session is not None:
            return 0
        add_library_path()
        from MAISSegmentLib.mrml_state import load_state
        from MAISSegmentLib.mrml_volumes import BridgeError, count_segment_voxels

        try:
            state = load_state(segmentation_node, segment_id)
            if state is not None and state.get("clicks"):
                return 0
        except BridgeError:
            pass  # a damaged state is not a session: count the voxels
        return count_segment_voxels(segmentation_node, segment_id, volume_node)

    @staticmethod
    def ensure_terminology(segmentation_node: Any, segment_id: str) -> bool:
        """Give the segment Slicer's default terminology entry ("Tissue", SNOMED CT) when it has none, so that a DICOM
        SEG export of what MAISSegment made is coded. A terminology the user (or the Segment Editor) chose is kept.
        Returns whether the tag was set."""
        segmentation = None if segmentation_node is None else segmentation_node.GetSegmentation()
        segment = None if segmentation is None else segmentation.GetSegment(segment_id)
        if segment is None:
            return False
        tag = slicer.vtkSegment.GetTerminologyEntryTagName()
        value = vtk.reference("")
        if segment.GetTag(tag, value) and str(value).strip("~^| "):
            return False
        segment.SetTag(tag, DEFAULT_TERMINOLOGY_ENTRY)
        return True

    @staticmethod
    def create_segmentation(volume_node: Any) -> Any:
        """A new segmentation node on the volume's geometry, shown in the views (as the Segment Editor makes one)."""
        scene = volume_node.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(_("Segmentation")))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        return node

    @classmethod
    def create_segment(cls, segmentation_node: Any, name: str = "") -> str:
        """Add an empty segment (Slicer's next default name and colour, or ``name``) with the default terminology;
        returns its ID. What the panel does when Include is pressed with no segment selected."""
        segmentation = segmentation_node.GetSegmentation()
        segment_id = segmentation.AddEmptySegment("", name or "")
        if not segment_id:
            raise MAISSegmentError(_("Cannot add a segment to this segmentation."))
        cls.ensure_terminology(segmentation_node, segment_id)
        return segment_id

    def can_reset(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> bool:
        """Whether the segment has points that *Clear segment* would remove."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return bool(target is not None and target.session is not None and target.session.clicks)

    def can_undo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> bool:
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return bool(target and target.undo)

    def can_redo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> bool:
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return bool(target and target.redo)

    def clear(self) -> None:
        """Forget every session (scene closed). Their states stay in the segments' tags."""
        self._targets.clear()
        self._volumes.clear()

    def _volume(self, volume_node: Any) -> Any:
        """The node's voxels as one read-only ``Volume`` shared by every session on it (copied once per change of the
        node's image or geometry, not once per segment)."""
        image = volume_node.GetImageData()
        stamp = (
            volume_node.GetMTime(),
            0 if image is None else image.GetMTime(),
            0
            if image is None or image.GetPointData().GetScalars() is None
            else image.GetPointData().GetScalars().GetMTime(),
        )
        cached = self._volumes.get(volume_node.GetID())
        if cached is not None and cached[0] == stamp:
            return cached[1]
        add_library_path()
        from MAISSegmentLib.mrml_volumes import volume_from_node

        volume = volume_from_node(volume_node)
        volume.array.flags.writeable = False
        self._volumes[volume_node.GetID()] = (stamp, volume)
        return volume

    def _drop_idle_sessions(self, keep: _Target) -> int:
        """Keep at most ``max_live_sessions`` sessions in memory: the least recently used others are dropped (their
        clicks are in their segments' tags; the next point there replays them). Returns how many were dropped."""
        live = [t for t in self._targets.values() if t.session is not None and t is not keep and not t.busy]
        excess = len(live) + 1 - self.max_live_sessions
        dropped = 0
        for target in sorted(live, key=lambda t: t.used)[: max(0, excess)]:
            target.session, target.undo, target.redo = None, [], []
            dropped += 1
        return dropped

    def _node(self, target: _Target, node_id: str | None) -> Any:
        return target.scene.GetNodeByID(node_id) if node_id else None

    def _nodes(self, target: _Target) -> tuple[Any, Any]:
        segmentation = self._node(target, target.segmentation_node_id)
        volume = self._node(target, target.volume_node_id)
        if segmentation is None or volume is None:
            raise MAISSegmentError(_("The segmentation or the volume of this segment was removed from the scene."))
        return segmentation, volume

    def _overwrite_mode(self) -> str:
        if self.segment_editor_node is not None:
            add_library_path()
            from MAISSegmentLib.mrml_masking import overwrite_mode_from_editor_node

            return overwrite_mode_from_editor_node(self.segment_editor_node)
        if self.overwrite not in OVERWRITE_MODES:
            raise MAISSegmentError(_("Unknown overwrite mode '{mode}'.").format(mode=self.overwrite))
        return self.overwrite

    def _protection_stamp(self, target: _Target) -> tuple:
        """What the session's protected mask depends on: the overwrite mode and, for every other segment, its
        labelmap's and its own modification times (voxels, lock tag), plus visibility in "visible" mode. Cheap: no
        voxel is read. Recorded after each change this logic makes, so only changes made elsewhere differ."""
        segmentation_node, _volume = self._nodes(target)
        segmentation = segmentation_node.GetSegmentation()
        labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        others = []
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(n)
            if segment_id == target.segment_id:
                continue
            segment = segmentation.GetSegment(segment_id)
            layer = segment.GetRepresentation(labelmap)
            others.append((segment_id, segment.GetMTime(), 0 if layer is None else layer.GetMTime()))
        mode = self._overwrite_mode()
        display = segmentation_node.GetDisplayNode()
        visibility = display.GetMTime() if mode == "visible" and display is not None else 0
        return (mode, visibility, tuple(others))
