"""Which voxels a segment may take: other segments protected or overwritable, locked segments, editable area.

Slicer's masking as MAISSegment honours it: the overwrite mode (``"none"``: other segments are protected, the target
does not grow into them; ``"visible"``: visible ones give up voxels the target takes; ``"all"``: all of them do, see
:data:`OVERWRITE_MODES` and :func:`overwrite_mode_from_editor_node`), segments locked with the tag
``MAISSegment.Locked`` (:func:`set_segment_locked`; never modified), and the Segment Editor's editable area and
intensity range (:func:`editable_mask`, computed by Slicer itself). :func:`protected_mask` is the session's
``protected`` voxels. MRML side; no Qt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import slicer
import vtk

from .mrml_volumes import (
    BridgeError,
    _extent_empty,
    _Grid,
    _image_array,
    _lattice_offset,
    _name,
    _read_union,
    _reference_grid,
    _region,
    _segment,
    _segmentation,
    _to_vtk_matrix,
    _volume_image,
)

__all__ = [
    "LOCKED_TAG",
    "OVERWRITE_MODES",
    "editable_mask",
    "editing_restricted",
    "is_segment_locked",
    "overwrite_mode_from_editor_node",
    "protected_mask",
    "set_segment_locked",
]

LOCKED_TAG = "MAISSegment.Locked"  # segment tag: "1" = never modified by MAISSegment
OVERWRITE_MODES = ("none", "visible", "all")


def is_segment_locked(segmentation_node: Any, segment_id: str) -> bool:
    """Whether the segment carries ``MAISSegment.Locked`` = 1/true/yes (MAISSegment then never modifies it)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return False
    value = vtk.reference("")
    return bool(segment.GetTag(LOCKED_TAG, value)) and str(value).strip().lower() in ("1", "true", "yes", "on")


def set_segment_locked(segmentation_node: Any, segment_id: str, locked: bool = True) -> None:
    """Lock (or unlock) a segment against modification by MAISSegment (stored as a segment tag, saved with it)."""
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    if locked:
        segment.SetTag(LOCKED_TAG, "1")
    else:
        segment.RemoveTag(LOCKED_TAG)


def _check_overwrite(overwrite: str) -> str:
    if overwrite not in OVERWRITE_MODES:
        raise BridgeError(f"overwrite must be one of {', '.join(OVERWRITE_MODES)}; got {overwrite!r}")
    return overwrite


def _segment_visible(segmentation_node: Any, segment_id: str) -> bool:
    display = segmentation_node.GetDisplayNode()
    if display is None:
        return True
    return bool(display.GetVisibility()) and bool(display.GetSegmentVisibility(segment_id))


def _other_segments(segmentation: Any, segment_id: str) -> list[str]:
    return [
        segmentation.GetNthSegmentID(n)
        for n in range(segmentation.GetNumberOfSegments())
        if segmentation.GetNthSegmentID(n) != segment_id
    ]


def _split_others(segmentation_node: Any, segment_id: str, overwrite: str) -> tuple[list[str], list[str]]:
    """(protected, overwritable) other segments under ``overwrite``; locked segments are always protected."""
    protected, overwritable = [], []
    for other in _other_segments(segmentation_node.GetSegmentation(), segment_id):
        hidden = overwrite == "visible" and not _segment_visible(segmentation_node, other)
        locked = is_segment_locked(segmentation_node, other)
        (protected if locked or hidden or overwrite == "none" else overwritable).append(other)
    return protected, overwritable


def protected_mask(
    segmentation_node: Any, segment_id: str, reference_volume_node: Any, overwrite: str = "none"
) -> np.ndarray:
    """Voxels the session must not include: bool KJI on the reference grid.

    The union of the other segments that must not be modified: all of them with ``overwrite="none"``, the hidden
    ones with ``"visible"``, none with ``"all"``; locked segments (:func:`set_segment_locked`) always.
    Pass it as ``InteractiveSession.set_image(volume, protected=...)``.
    """
    _check_overwrite(overwrite)
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    protected, _ = _split_others(segmentation_node, segment_id, overwrite)
    return _read_union(segmentation, protected, grid, grid.box)


def overwrite_mode_from_editor_node(segment_editor_node: Any) -> str:
    """The Segment Editor's "Modify other segments" setting as ``"all"``, ``"visible"`` or ``"none"``."""
    mode = segment_editor_node.GetOverwriteMode()
    node_class = slicer.vtkMRMLSegmentEditorNode
    return {
        node_class.OverwriteAllSegments: "all",
        node_class.OverwriteVisibleSegments: "visible",
        node_class.OverwriteNone: "none",
    }.get(mode, "none")


def editing_restricted(segment_editor_node: Any) -> bool:
    """Whether the Segment Editor node limits where a segment may change ("Editable area" other than everywhere, or
    an "Editable intensity range"). When it does not, :func:`editable_mask` is all True and need not be computed
    (that would be a full-grid array per write)."""
    if segment_editor_node is None:
        return False
    everywhere = segment_editor_node.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
    return not everywhere or bool(segment_editor_node.GetSourceVolumeIntensityMask())


def editable_mask(
    segmentation_node: Any,
    segment_id: str,
    reference_volume_node: Any,
    segment_editor_node: Any = None,
    edit_mode: int | None = None,
    mask_segment_id: str = "",
    intensity_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Slicer's editable area on the reference grid: bool KJI, True where the segment may change.

    Computed by Slicer itself (``vtkMRMLSegmentationNode.GenerateEditMask``) from the Segment Editor node's
    "Editable area" and "Editable intensity range" (intensities of the reference volume), or from the explicit
    arguments (``edit_mode``: ``vtkMRMLSegmentationNode.EditAllowed*``; they override the editor node's values).
    """
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    if segment_editor_node is not None:
        if edit_mode is None:
            edit_mode = segment_editor_node.GetMaskMode()
        mask_segment_id = mask_segment_id or (segment_editor_node.GetMaskSegmentID() or "")
        if intensity_range is None and segment_editor_node.GetSourceVolumeIntensityMask():
            intensity_range = tuple(segment_editor_node.GetSourceVolumeIntensityMaskRange())
    if edit_mode is None:
        edit_mode = slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere
    if edit_mode == slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere and intensity_range is None:
        return np.ones(grid.shape_kji, dtype=bool)
    reference = grid.oriented_image()
    source = None
    if intensity_range is not None:
        source = grid.oriented_image()
        source.DeepCopy(_volume_image(reference_volume_node))
        source.SetImageToWorldMatrix(_to_vtk_matrix(grid.ijk_to_seg))
    out = slicer.vtkOrientedImageData()
    args: list[Any] = [out, int(edit_mode), reference, segment_id, mask_segment_id or ""]
    if source is not None:
        args += [source, [float(intensity_range[0]), float(intensity_range[1])]]
    if not segmentation_node.GenerateEditMask(*args):
        raise BridgeError(f"Slicer could not compute the editable area of {_name(segmentation_node)}")
    return _zero_on_grid(out, grid)


def _zero_on_grid(image: Any, grid: _Grid) -> np.ndarray:
    """Editable = zero voxels of a GenerateEditMask output (non-zero marks where editing is NOT allowed)."""
    editable = np.ones(grid.shape_kji, dtype=bool)
    offset = _lattice_offset(image, grid)
    if offset is None or _extent_empty(image.GetExtent()):
        raise BridgeError("Slicer returned an editable-area mask on an unexpected grid")
    region = _region(image, offset, grid.box)
    if region is not None:
        editable[region[1]] = _image_array(image)[region[0]] == 0
    return editable
