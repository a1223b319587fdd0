"""Writing a session's mask into a segment, inside one box, with an exact undo record (MRML side; no Qt).

:func:`write_mask` edits the segment's binary labelmap in place, inside one box only (Slicer's documented way of
modifying a labelmap array, see ``slicer.util.arrayFromSegmentInternalBinaryLabelmap``), honouring Slicer's masking
(:mod:`MAISSegmentLib.mrml_masking`):

- only voxels of ``editable`` (e.g. Segment Editor's editable area, ``mrml_masking.editable_mask``) change;
- other segments are never modified unless ``overwrite`` allows it; locked segments never are;
- voxels the user edited since MAISSegment last wrote the segment (``edits``) keep their content;
- shared labelmap layers (several segments in one image, distinguished by label value) are handled voxel by voxel;
- the labelmap must lie on the reference grid's lattice (same spacing/axes, integer offset), which is what Slicer
  does when the segmentation's geometry comes from that volume; otherwise :class:`BridgeError` says how to fix it.

Each write returns an :class:`UndoRecord` with the exact previous (and new) content of every segment it changed,
inside the box, bit-packed; :func:`undo_write` / :func:`redo_write` restore it exactly and re-check the result
(:class:`EditedSinceError` when a segment was edited elsewhere since).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from .mrml_masking import _check_overwrite, _split_others, is_segment_locked
from .mrml_volumes import (
    BridgeError,
    _closed_surface_name,
    _extent_empty,
    _Grid,
    _image_array,
    _labelmap_name,
    _lattice_offset,
    _layer_matrix,
    _name,
    _read,
    _read_union,
    _reference_grid,
    _segment,
    _segmentation,
    _to_vtk_matrix,
)
from .roi import Box
from .segment_edits import SegmentEdits

__all__ = [
    "EditedSinceError",
    "UndoRecord",
    "redo_write",
    "undo_write",
    "write_mask",
]


class EditedSinceError(BridgeError):
    """An undo/redo refused because a segment was edited elsewhere after the change it would revert."""


def _pack(mask: np.ndarray) -> bytes:
    """Bit-packed and compressed (masks are mostly runs: a box of a click's change compresses ~20-100x)."""
    return zlib.compress(np.packbits(mask.astype(bool), axis=None).tobytes(), 1)


def _unpack(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    n = int(np.prod(shape))
    bits = np.frombuffer(zlib.decompress(data), dtype=np.uint8)
    return np.unpackbits(bits, count=n).astype(bool).reshape(shape)


@dataclass
class UndoRecord:
    """What one :func:`write_mask` changed: every modified segment's content inside ``box``, before and after.

    Contents are exact (bit-packed bool KJI arrays of ``box.shape_kji``) on the reference grid ``ijk_to_seg`` (in the
    segmentation node's coordinates, fixed at write time). ``segment_ids[0]`` is the target segment.
    """

    segmentation_node_id: str
    segment_id: str
    box: Box
    ijk_to_seg: np.ndarray
    shape_kji: tuple[int, int, int]
    segment_ids: list[str] = field(default_factory=list)
    kept_edits: int = 0  # voxels of the user's edits the network's mask would have changed: they were kept
    _before: dict[str, bytes] = field(default_factory=dict, repr=False)
    _after: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def changed(self) -> bool:
        """Whether the write changed any voxel."""
        return any(self._before[s] != self._after[s] for s in self.segment_ids)

    def before(self, segment_id: str) -> np.ndarray:
        """Bool ``box.shape_kji``: the segment's content in the box before the write."""
        return _unpack(self._before[segment_id], self.box.shape_kji)

    def after(self, segment_id: str) -> np.ndarray:
        """Bool ``box.shape_kji``: the segment's content in the box after the write."""
        return _unpack(self._after[segment_id], self.box.shape_kji)

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self._before.values()) + sum(len(v) for v in self._after.values())

    def _grid(self) -> _Grid:
        return _Grid(self.shape_kji, self.ijk_to_seg)


def _scalar_type_for(label: int) -> int:
    if label <= 255:
        return vtk.VTK_UNSIGNED_CHAR
    if label <= 65535:
        return vtk.VTK_UNSIGNED_SHORT
    return vtk.VTK_INT


def _max_label_in_layer(segmentation: Any, segment_id: str) -> int:
    layer = segmentation.GetLayerIndex(segment_id)
    ids = segmentation.GetSegmentIDsForLayer(layer) or (segment_id,)
    return max(segmentation.GetSegment(s).GetLabelValue() for s in ids)


def _writable_layer(segmentation: Any, segment_id: str, grid: _Grid, box: Box, node: Any) -> tuple[Any, np.ndarray]:
    """The segment's layer, ready for in-place writing of ``box``: on the grid's lattice and covering the box.

    An empty layer is given the grid's geometry; a layer on another lattice holding no voxel of this segment is
    swapped for a new one of the segment; a layer that must grow is reallocated (same object, other segments
    sharing it keep their voxels). Returns ``(layer, offset)`` (reference index = layer index + offset).
    """
    segment = segmentation.GetSegment(segment_id)
    layer = segment.GetRepresentation(_labelmap_name())
    empty = layer is None or _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None
    offset = None if empty else _lattice_offset(layer, grid)
    if not empty and offset is None:
        if _layer_has_label(layer, segment):
            raise BridgeError(
                f"segment {segment.GetName()!r} of {_name(node)} is stored on another voxel grid than the reference "
                "volume; make the volume the segmentation's geometry (Segment Editor → Specify geometry → Source "
                "geometry: the volume) or segment on the volume the segmentation was made on"
            )
        segmentation.SeparateSegmentLabelmap(segment_id)  # the segment has no voxel there: give it its own layer
        layer = segment.GetRepresentation(_labelmap_name())
        empty = True
    if layer is None:
        raise BridgeError(f"segment {segment.GetName()!r} of {_name(node)} has no binary labelmap")
    if empty:
        scalar_type = _scalar_type_for(_max_label_in_layer(segmentation, segment_id))
        new = grid.oriented_image(box)
        new.AllocateScalars(scalar_type, 1)
        _image_array(new)[:] = 0
        layer.DeepCopy(new)
        return layer, np.zeros(3, dtype=int)
    ext = np.asarray(layer.GetExtent()).reshape(3, 2)
    want_lo = np.minimum(ext[:, 0], np.asarray(box.lo) - offset)
    want_hi = np.maximum(ext[:, 1], np.asarray(box.hi) - offset - 1)
    if np.any(want_lo < ext[:, 0]) or np.any(want_hi > ext[:, 1]):
        old = _image_array(layer)
        grown = slicer.vtkOrientedImageData()
        grown.SetExtent(
            int(want_lo[0]), int(want_hi[0]), int(want_lo[1]), int(want_hi[1]), int(want_lo[2]), int(want_hi[2])
        )
        grown.AllocateScalars(layer.GetScalarType(), 1)
        new = _image_array(grown)
        new[:] = 0
        s = ext[:, 0] - want_lo
        new[s[2] : s[2] + old.shape[0], s[1] : s[1] + old.shape[1], s[0] : s[0] + old.shape[2]] = old
        grown.SetImageToWorldMatrix(_to_vtk_matrix(_layer_matrix(layer)))
        layer.DeepCopy(grown)
    return layer, offset


def _layer_has_label(layer: Any, segment: Any) -> bool:
    return bool(np.any(_image_array(layer) == segment.GetLabelValue()))


def _box_view(layer: Any, offset: np.ndarray, box: Box) -> np.ndarray:
    """Writable view of the layer over ``box`` (the layer covers it)."""
    ext = layer.GetExtent()
    lo = np.asarray(box.lo) - offset - np.array([ext[0], ext[2], ext[4]])
    return _image_array(layer)[tuple(slice(int(lo[d]), int(lo[d] + box.shape_kji[2 - d])) for d in (2, 1, 0))]


def _surfaces_present(segmentation: Any, segment_ids: Iterable[str]) -> bool:
    name = _closed_surface_name()
    return any(segmentation.GetSegment(s).GetRepresentation(name) is not None for s in segment_ids)


def _set_contents(
    segmentation_node: Any, grid: _Grid, box: Box, contents: list[tuple[str, np.ndarray, np.ndarray | None]]
) -> None:
    """Write ``(segment_id, content, where)`` items into the box, in order: each segment becomes ``content`` (bool
    ``box.shape_kji``) at ``where`` (None: everywhere in the box).

    A segment sharing a layer with the written one loses the voxels written with the other's label. Slicer is
    notified afterwards (displays update; closed surfaces that existed are re-created).
    """
    if not contents:
        return
    segmentation = segmentation_node.GetSegmentation()
    surfaces = _surfaces_present(segmentation, [s for s, _, _ in contents])
    layers: dict[int, Any] = {}
    for segment_id, content, where in contents:
        label = segmentation.GetSegment(segment_id).GetLabelValue()
        layer, offset = _writable_layer(segmentation, segment_id, grid, box, segmentation_node)
        view = _box_view(layer, offset, box)
        allowed = np.ones(box.shape_kji, dtype=bool) if where is None else where
        clear = allowed & ~content & (view == label)
        view[allowed & content] = label
        view[clear] = 0
        layers[id(layer)] = layer
    for layer in layers.values():
        layer.GetPointData().GetScalars().Modified()
        layer.Modified()  # Slicer: source representation modified -> displays update, derived surfaces invalidated
    if surfaces:
        segmentation.CreateRepresentation(_closed_surface_name())
    segmentation_node.Modified()


def _prepare_write(segmentation_node: Any, segment_id: str, reference_volume_node: Any) -> tuple[Any, _Grid]:
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    if is_segment_locked(segmentation_node, segment_id):
        raise BridgeError(
            f"segment {segmentation.GetSegment(segment_id).GetName()!r} is locked; unlock it to segment it"
        )
    grid = _reference_grid(segmentation_node, reference_volume_node)
    return segmentation, grid


def _check_mask(array: Any, grid: _Grid, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.shape != grid.shape_kji:
        raise BridgeError(f"{what} has shape {a.shape} but the reference volume is {grid.shape_kji} (K, J, I)")
    return a


def _ensure_reference_geometry(segmentation: Any, grid: _Grid) -> None:
    """Give a segmentation without a geometry the reference grid (as Slicer's Segment Editor does)."""
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if not segmentation.GetConversionParameter(name):
        k, j, i = grid.shape_kji
        geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
            _to_vtk_matrix(grid.ijk_to_seg), [0, i - 1, 0, j - 1, 0, k - 1]
        )
        segmentation.SetConversionParameter(name, geometry)


def write_mask(
    segmentation_node: Any,
    segment_id: str,
    reference_volume_node: Any,
    mask_kji: np.ndarray,
    box: Box,
    editable: np.ndarray | None = None,
    overwrite: str = "none",
    edits: SegmentEdits | None = None,
) -> UndoRecord:
    """Write a session's mask into a segment, inside ``box`` only, honouring Slicer's masking and the user's edits.

    Args:
        segmentation_node: the vtkMRMLSegmentationNode (binary labelmap source representation).
        segment_id: the target segment (not locked).
        reference_volume_node: the volume the mask was computed on (defines the grid).
        mask_kji: ``(K, J, I)`` uint8/bool on the reference grid (e.g. ``session.mask``); only ``box`` is read.
        box: IJK box to write (``lo`` inclusive, ``hi`` exclusive), e.g. the box ``add_click`` returned; clipped to
            the grid. Nothing outside it changes.
        editable: ``(K, J, I)`` bool, True where the segment may change (e.g. :func:`editable_mask`); None: anywhere.
        overwrite: ``"none"`` (other segments protected), ``"visible"`` or ``"all"``: which other segments give up
            the voxels the target takes. Locked segments are always protected.
        edits: the target's :class:`~MAISSegmentLib.segment_edits.SegmentEdits`: voxels where the segment differs
            from what MAISSegment last wrote (the user's touch-ups, now or earlier) keep their content, and the
            record counts those the mask would have changed (``kept_edits``). None: the mask overwrites them.

    In the box, the target becomes the mask at editable, unprotected voxels the user did not edit, and keeps its
    content elsewhere; overwritable segments lose the voxels the target gets.

    Returns:
        :class:`UndoRecord` for :func:`undo_write` / :func:`redo_write`.

    Raises:
        BridgeError: wrong nodes, unknown segment, locked target, non-linear transform, shapes that do not match
            the reference grid, or a segment to modify stored on another lattice. Nothing is modified then; if
            Slicer does not hold the expected content afterwards, the previous content is restored and it raises.
    """
    _check_overwrite(overwrite)
    segmentation, grid = _prepare_write(segmentation_node, segment_id, reference_volume_node)
    mask = _check_mask(mask_kji, grid, "the mask")
    if editable is not None:
        editable = _check_mask(editable, grid, "the editable mask")
    if not isinstance(box, Box):
        raise BridgeError(f"box must be a MAISSegmentLib.roi.Box, got {type(box).__name__}")
    box = box.intersect(grid.box)
    record = UndoRecord(segmentation_node.GetID(), segment_id, box, grid.ijk_to_seg.copy(), grid.shape_kji)
    if box.empty:
        record.segment_ids = [segment_id]
        record._before[segment_id] = record._after[segment_id] = _pack(np.zeros(box.shape_kji, dtype=bool))
        return record
    protected_ids, overwritable = _split_others(segmentation_node, segment_id, overwrite)
    allowed = np.ones(box.shape_kji, dtype=bool) if editable is None else editable[box.slices].astype(bool)
    allowed &= ~_read_union(segmentation, protected_ids, grid, box)
    new = mask[box.slices] > 0
    old = _read(segmentation, segment_id, grid, box)
    if edits is not None:
        keep = edits.observe(box, old)
        record.kept_edits = int(np.count_nonzero(keep & allowed & (new != old)))
        allowed &= ~keep
    target_after = np.where(allowed, new, old)
    taken = allowed & new
    touched: list[tuple[str, np.ndarray, np.ndarray]] = [(segment_id, old, target_after)]
    for other in overwritable:
        before = _read(segmentation, other, grid, box)
        if (before & taken).any():
            touched.append((other, before, before & ~taken))
    for other, _, _ in touched[1:]:  # refuse before modifying anything
        layer = segmentation.GetSegment(other).GetRepresentation(_labelmap_name())
        if _lattice_offset(layer, grid) is None:
            raise BridgeError(
                f"segment {segmentation.GetSegment(other).GetName()!r} would lose voxels but is stored on another "
                "voxel grid than the reference volume; set the overwrite mode to 'none' or give the segmentation "
                "the volume's geometry (Segment Editor → Specify geometry)"
            )
    record.segment_ids = [s for s, _, _ in touched]
    for s, before, after in touched:
        record._before[s], record._after[s] = _pack(before), _pack(after)
    if not record.changed:
        if edits is not None:
            edits.wrote(box, target_after)
        return record
    _ensure_reference_geometry(segmentation, grid)
    # target first (takes voxels from overwritable segments sharing its layer), then the others lose theirs
    contents = [(segment_id, target_after, allowed)] + [(s, after, None) for s, _, after in touched[1:]]
    try:
        _set_contents(segmentation_node, grid, box, contents)
        _verify(segmentation, grid, box, [(s, after) for s, _, after in touched])
    except BaseException as exc:
        try:
            _restore(segmentation_node, record, "before")
        except Exception as restore_exc:
            raise BridgeError(
                f"writing the mask failed ({exc}) and restoring the previous content failed too ({restore_exc})"
            ) from exc
        raise
    if edits is not None:
        edits.wrote(box, target_after)
    return record


def _verify(segmentation: Any, grid: _Grid, box: Box, contents: list[tuple[str, np.ndarray]]) -> None:
    for segment_id, expected in contents:
        if not np.array_equal(_read(segmentation, segment_id, grid, box), expected):
            raise BridgeError(
                f"segment {segmentation.GetSegment(segment_id).GetName()!r} does not hold the expected voxels after "
                "writing; the previous content was restored"
            )


def _restore(segmentation_node: Any, record: UndoRecord, which: str) -> None:
    """Write the record's ``which`` ("before"/"after") contents back, checking everything first."""
    if segmentation_node is None or segmentation_node.GetID() != record.segmentation_node_id:
        raise BridgeError("this undo record belongs to another segmentation node")
    segmentation = _segmentation(segmentation_node)
    grid = record._grid()
    missing = [s for s in record.segment_ids if segmentation.GetSegment(s) is None]
    if missing:
        raise BridgeError(f"segment(s) {', '.join(missing)} were removed; the write cannot be undone/redone")
    if record.box.empty or not record.changed:
        return
    getter = record.before if which == "before" else record.after
    contents = [(s, getter(s)) for s in record.segment_ids]
    if which == "after":
        contents = contents[1:] + contents[:1]  # others give up voxels first, then the target takes them
    for s, content in contents:
        layer = segmentation.GetSegment(s).GetRepresentation(_labelmap_name())
        empty = layer is None or _extent_empty(layer.GetExtent())
        if (
            not empty
            and _lattice_offset(layer, grid) is None
            and (content.any() or _layer_has_label(layer, segmentation.GetSegment(s)))
        ):
            raise BridgeError(
                f"segment {segmentation.GetSegment(s).GetName()!r} is now stored on another voxel grid; "
                "the write cannot be undone/redone exactly"
            )
    # the segments must still hold what this record left there: an edit made since (Segment Editor, another
    # module) would be overwritten without a trace by restoring the record's other side
    current = record.after if which == "before" else record.before
    edited = [s for s in record.segment_ids if not np.array_equal(_read(segmentation, s, grid, record.box), current(s))]
    if edited:
        names = ", ".join(repr(segmentation.GetSegment(s).GetName()) for s in edited)
        raise EditedSinceError(
            f"segment {names} was edited since this change (e.g. in the Segment Editor), so it cannot be "
            f"{'undone' if which == 'before' else 'redone'} without losing that edit. Undo that edit where it was "
            "made first (Segment Editor: Undo), or keep the segment as it is (Reset segment starts over)."
        )
    _set_contents(segmentation_node, grid, record.box, [(s, content, None) for s, content in contents])
    _verify(segmentation, grid, record.box, contents)


def undo_write(segmentation_node: Any, record: UndoRecord) -> Box:
    """Restore the exact content the segments had in ``record.box`` before :func:`write_mask`. Returns the box.

    Raises:
        BridgeError: another segmentation node, a recorded segment was removed, or moved to another lattice.
        EditedSinceError: a recorded segment no longer holds the record's result in the box (edited since);
            nothing is written.
    """
    _restore(segmentation_node, record, "before")
    return record.box


def redo_write(segmentation_node: Any, record: UndoRecord) -> Box:
    """Write ``record``'s result again (after :func:`undo_write`). Returns the box.

    Raises:
        BridgeError, EditedSinceError: as :func:`undo_write` (the segments must hold the record's "before").
    """
    _restore(segmentation_node, record, "after")
    return record.box
