"""The bridge between Slicer's MRML nodes and MAISSegmentLib, the only module of the package importing ``slicer``.

Runs inside the Slicer application and headless (the ``slicer-core`` wheel); it touches no Qt. It is never imported
by ``MAISSegmentLib/__init__.py``: import it explicitly (``from MAISSegmentLib import mrml_bridge``).

Coordinates
-----------
- Arrays are KJI (``array[k, j, i]``), as everywhere in MAISSegmentLib and in ``slicer.util``.
- Volumes and clicks are in **world** RAS millimetres: a linear parent transform of the volume is applied to its
  IJK→RAS matrix (:func:`volume_from_node`), markups positions are read with ``GetNthControlPointPositionWorld``.
  A non-linear parent transform is refused (:class:`BridgeError`): harden it first.
- A segmentation's labelmaps live in the segmentation node's own (local) coordinates. The *reference grid* is the
  reference volume's voxel grid expressed there (the volume's and the segmentation's parent transforms both
  accounted for). Masks handed to / returned by this module are ``uint8``/``bool`` KJI arrays on that grid.

Writing segments
----------------
:func:`write_mask` edits the segment's binary labelmap in place, inside one box only (Slicer's documented way of
modifying a labelmap array, see ``slicer.util.arrayFromSegmentInternalBinaryLabelmap``), honouring Slicer's masking:

- only voxels of ``editable`` (e.g. Segment Editor's editable area, :func:`editable_mask`) change;
- other segments are never modified unless ``overwrite`` allows it (``"none"``: they are protected, the target
  segment does not grow into them; ``"visible"``: visible ones lose the voxels the target takes; ``"all"``: all of
  them do); locked segments (tag ``MAISSegment.Locked``, :func:`set_segment_locked`) are never modified;
- shared labelmap layers (several segments in one image, distinguished by label value) are handled voxel by voxel;
- the labelmap must lie on the reference grid's lattice (same spacing/axes, integer offset), which is what Slicer
  does when the segmentation's geometry comes from that volume; otherwise :class:`BridgeError` says how to fix it.

Each write returns an :class:`UndoRecord` with the exact previous (and new) content of every segment it changed,
inside the box, bit-packed; :func:`undo_write` / :func:`redo_write` restore it exactly and re-check the result.

Session state
-------------
:func:`save_state` stores the session's JSON state in the segment tag ``MAISSegment.State`` (saved in ``.seg.nrrd``
and hence in ``.mrb``/``.mrml`` scenes); clicks are also markups control points whose description holds
``mais:order=N`` (:func:`add_click_point`, :func:`clicks_from_markups`).

Exporting finished cases
------------------------
:func:`export_cases` writes volumes with finished segmentations as image/label-map NIfTI pairs plus a
``manifest.json`` in the schema of :func:`MAISSegmentLib.data.load_cases` ("Learn from my cases"). The user's nodes
are only read.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import MAISError
from .roi import Box
from .segment_edits import SegmentEdits
from .volume import Volume, as_point3

__all__ = [
    "LOCKED_TAG",
    "ORDER_PREFIX",
    "OVERWRITE_MODES",
    "STATE_TAG",
    "BridgeError",
    "EditedSinceError",
    "ExportedCase",
    "UndoRecord",
    "add_click_point",
    "clear_state",
    "click_order",
    "clicks_from_markups",
    "editable_mask",
    "export_case",
    "export_cases",
    "is_segment_locked",
    "load_state",
    "next_click_order",
    "overwrite_mode_from_editor_node",
    "protected_mask",
    "read_segment",
    "redo_write",
    "reference_volume_of",
    "save_state",
    "set_click_order",
    "set_segment_locked",
    "undo_write",
    "volume_from_node",
    "write_mask",
]

STATE_TAG = "MAISSegment.State"  # segment tag holding the session state (JSON)
LOCKED_TAG = "MAISSegment.Locked"  # segment tag: "1" = never modified by MAISSegment
ORDER_PREFIX = "mais:order="  # control point description: click order
OVERWRITE_MODES = ("none", "visible", "all")

_ORDER_RE = re.compile(r"mais:order=(\d+)")
_LATTICE_TOLERANCE = 0.01  # voxels: how far a labelmap's lattice may be from the reference grid's
_NEAREST_CHUNK_VOXELS = 4_000_000  # voxels per chunk when resampling a labelmap on another lattice


class BridgeError(MAISError, ValueError):
    """A Slicer node that cannot be used as asked (non-linear transform, wrong node, incompatible geometry...)."""


class EditedSinceError(BridgeError):
    """An undo/redo refused because a segment was edited elsewhere after the change it would revert."""


# ---------------------------------------------------------------------------------------------------- helpers
def _labelmap_name() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


def _closed_surface_name() -> str:
    return slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()


def _from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _to_vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _name(node: Any) -> str:
    return f"'{node.GetName()}'" if node is not None and node.GetName() else "(unnamed node)"


def _transform_between(source: Any, target: Any, what: str) -> np.ndarray:
    """4x4 matrix from the coordinates of transform node ``source`` to ``target`` (None = world)."""
    if source is target:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, matrix):
        culprit = source if source is not None and not source.IsTransformToWorldLinear() else target
        raise BridgeError(
            f"{what} is under the non-linear (warping) transform {_name(culprit)}; MAISSegment needs a plain voxel "
            "grid: harden the transform first (Data or Transforms module → Harden transform), which resamples it"
        )
    return _from_vtk_matrix(matrix)


def _volume_image(volume_node: Any) -> Any:
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if volume_node is None else volume_node.GetClassName()
        raise BridgeError(f"a scalar volume node is needed, got {kind}")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise BridgeError(f"volume {_name(volume_node)} has no voxels loaded")
    if image.GetNumberOfScalarComponents() != 1:
        raise BridgeError(
            f"volume {_name(volume_node)} has {image.GetNumberOfScalarComponents()} components per voxel (colour or "
            "vector image); MAISSegment needs a scalar volume: extract one component first (Vector to Scalar Volume)"
        )
    return image


def _shape_kji(image: Any) -> tuple[int, int, int]:
    i, j, k = image.GetDimensions()
    return (int(k), int(j), int(i))


def _extent_empty(extent: Sequence[int]) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _image_array(image: Any) -> np.ndarray:
    """A writable KJI numpy view of a single-component vtkImageData's scalars (indices relative to its extent)."""
    scalars = image.GetPointData().GetScalars()
    return numpy_support.vtk_to_numpy(scalars).reshape(_shape_kji(image))


# ---------------------------------------------------------------------------------------------------- volumes
def volume_from_node(volume_node: Any) -> Volume:
    """A :class:`Volume` (copy of the voxels, KJI) with the node's IJK→**world** RAS matrix.

    A linear parent transform (also a chain of them) is applied to the matrix, so RAS positions of world-coordinate
    markups map to the right voxels; direction cosines (oblique scans) are included.

    Raises:
        BridgeError: not a scalar volume, no voxels, several components, or under a non-linear transform
            (harden it first). ImageError: the voxel grid is unusable (e.g. a 2-D image).
    """
    image = _volume_image(volume_node)
    array = _image_array(image).copy()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    to_world = _transform_between(volume_node.GetParentTransformNode(), None, f"volume {_name(volume_node)}")
    return Volume(array, to_world @ _from_vtk_matrix(ijk_to_ras))


# ---------------------------------------------------------------------------------------------------- markups
def click_order(markups_node: Any, index: int) -> int | None:
    """The click order stored on control point ``index`` (``mais:order=N`` in its description), or None."""
    match = _ORDER_RE.search(markups_node.GetNthControlPointDescription(index) or "")
    return int(match.group(1)) if match else None


def set_click_order(markups_node: Any, index: int, order: int) -> None:
    """Store ``order`` on control point ``index`` (replacing an earlier order, keeping the rest of the description)."""
    if int(order) < 0:
        raise BridgeError(f"a click order must be >= 0, got {order}")
    description = _ORDER_RE.sub("", markups_node.GetNthControlPointDescription(index) or "").strip()
    tag = f"{ORDER_PREFIX}{int(order)}"
    markups_node.SetNthControlPointDescription(index, f"{tag} {description}" if description else tag)


def next_click_order(*markups_nodes: Any) -> int:
    """One more than the largest click order stored on the points of these nodes (0 if none); None nodes are skipped."""
    orders = [
        order
        for node in markups_nodes
        if node is not None
        for index in range(node.GetNumberOfControlPoints())
        if (order := click_order(node, index)) is not None
    ]
    return max(orders) + 1 if orders else 0


def add_click_point(markups_node: Any, ras: Sequence[float], order: int, label: str | None = None) -> int:
    """Place a control point at world RAS ``ras`` (mm) carrying click ``order``. Returns its index.

    Raises:
        BridgeError: ``ras`` is not three finite numbers, or Slicer refused the point (e.g. a full point list).
    """
    point = as_point3(ras, BridgeError, "a click (RAS mm)")
    index = markups_node.AddControlPointWorld(vtk.vtkVector3d(*point), label or "")
    if index < 0:
        raise BridgeError(
            f"could not add a point to {_name(markups_node)} (is it locked or at its maximum number of points?)"
        )
    set_click_order(markups_node, index, order)
    return index


def clicks_from_markups(include_node: Any, exclude_node: Any) -> list[tuple[np.ndarray, bool]]:
    """The clicks of an include (+) and an exclude (−) point list, in click order, as ``(ras (3,), include)``.

    Positions are world RAS mm (parent transforms applied; the file's LPS/RAS convention plays no role). Points are
    ordered by their stored ``mais:order=N``; points without one follow, include list first, each in list order.
    Points whose position is not defined (being placed, skipped, missing) are left out. Either node may be None.
    """
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    items: list[tuple[tuple[int, int, int], np.ndarray, bool]] = []
    sequence = 0
    for node, include in ((include_node, True), (exclude_node, False)):
        if node is None:
            continue
        for index in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(index) != defined:
                continue
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            ras = np.asarray(position, dtype=np.float64)
            if not np.all(np.isfinite(ras)):
                continue
            order = click_order(node, index)
            key = (0, order, sequence) if order is not None else (1, 0, sequence)
            items.append((key, ras, include))
            sequence += 1
    items.sort(key=lambda item: item[0])
    return [(ras, include) for _, ras, include in items]


# ---------------------------------------------------------------------------------------------------- grids
@dataclass(frozen=True)
class _Grid:
    """The reference volume's voxel grid in the segmentation node's coordinates."""

    shape_kji: tuple[int, int, int]
    ijk_to_seg: np.ndarray  # (4, 4): reference (i, j, k, 1) -> segmentation-local RAS mm

    @property
    def box(self) -> Box:
        k, j, i = self.shape_kji
        return Box((0, 0, 0), (i, j, k))

    def oriented_image(self, box: Box | None = None) -> Any:
        """An empty vtkOrientedImageData with this geometry and ``box`` (default: the whole grid) as extent."""
        b = box or self.box
        image = slicer.vtkOrientedImageData()
        image.SetExtent(b.lo[0], b.hi[0] - 1, b.lo[1], b.hi[1] - 1, b.lo[2], b.hi[2] - 1)
        image.SetImageToWorldMatrix(_to_vtk_matrix(self.ijk_to_seg))
        return image


def _reference_grid(segmentation_node: Any, reference_volume_node: Any) -> _Grid:
    image = _volume_image(reference_volume_node)
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASMatrix(ijk_to_ras)
    vol_to_seg = _transform_between(
        reference_volume_node.GetParentTransformNode(),
        segmentation_node.GetParentTransformNode(),
        f"volume {_name(reference_volume_node)} or segmentation {_name(segmentation_node)}",
    )
    return _Grid(_shape_kji(image), vol_to_seg @ _from_vtk_matrix(ijk_to_ras))


def _segmentation(segmentation_node: Any) -> Any:
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        kind = "nothing" if segmentation_node is None else segmentation_node.GetClassName()
        raise BridgeError(f"a segmentation node is needed, got {kind}")
    segmentation = segmentation_node.GetSegmentation()
    getter = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
    if getter() != _labelmap_name():
        raise BridgeError(
            f"segmentation {_name(segmentation_node)} is stored as '{getter()}', not as a binary labelmap; switch its "
            "source representation to Binary labelmap (Segmentations module → Representations) first"
        )
    return segmentation


def _segment(segmentation: Any, segment_id: str, segmentation_node: Any) -> Any:
    segment = segmentation.GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise BridgeError(f"segmentation {_name(segmentation_node)} has no segment with ID {segment_id!r}")
    return segment


def _layer_matrix(layer: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(matrix)
    return _from_vtk_matrix(matrix)


def _lattice_offset(layer: Any, grid: _Grid) -> np.ndarray | None:
    """Integer ``t`` with reference index = layer index + ``t`` when the layer lies on the grid's lattice, else None."""
    t = np.linalg.solve(grid.ijk_to_seg, _layer_matrix(layer))  # layer (i, j, k, 1) -> reference (i, j, k, 1)
    extent = np.abs(np.asarray(layer.GetExtent(), dtype=np.float64))
    scale = max(float(max(grid.shape_kji)), float(extent.max()) if extent.size else 0.0) + 1.0
    offset = t[:3, 3]
    error = np.abs(t[:3, :3] - np.eye(3)).sum(axis=1).max() * scale + np.abs(offset - np.round(offset)).max()
    return np.round(offset).astype(int) if error < _LATTICE_TOLERANCE else None


def _region(layer: Any, offset: np.ndarray, box: Box) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(index into the layer's KJI array, index into a ``box.shape_kji`` array) of their overlap, or None."""
    ext = layer.GetExtent()
    ext_lo = np.array([ext[0], ext[2], ext[4]])
    ext_hi = np.array([ext[1], ext[3], ext[5]]) + 1
    lo = np.maximum(np.asarray(box.lo) - offset, ext_lo)  # in layer indices
    hi = np.minimum(np.asarray(box.hi) - offset, ext_hi)
    if np.any(hi <= lo):
        return None
    layer_index = tuple(slice(int(lo[d] - ext_lo[d]), int(hi[d] - ext_lo[d])) for d in (2, 1, 0))
    box_lo = lo + offset - np.asarray(box.lo)
    box_index = tuple(slice(int(box_lo[d]), int(box_lo[d] + hi[d] - lo[d])) for d in (2, 1, 0))
    return layer_index, box_index


def _read_layer(layer: Any, label: int, grid: _Grid, box: Box) -> np.ndarray:
    """Voxels of ``box`` (reference grid) where ``layer`` holds ``label``, as bool ``box.shape_kji``."""
    out = np.zeros(box.shape_kji, dtype=bool)
    if layer is None or box.empty or _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None:
        return out
    offset = _lattice_offset(layer, grid)
    if offset is not None:
        region = _region(layer, offset, box)
        if region is not None:
            out[region[1]] = _image_array(layer)[region[0]] == label
        return out
    # Another lattice (read-only use, e.g. protecting a segment stored on another grid): nearest neighbour.
    to_layer = np.linalg.solve(_layer_matrix(layer), grid.ijk_to_seg)  # reference (i, j, k, 1) -> layer
    ext = layer.GetExtent()
    ext_lo = np.array([ext[0], ext[2], ext[4]])
    ext_hi = np.array([ext[1], ext[3], ext[5]])
    data = _image_array(layer)
    kk, jj, ii = box.shape_kji
    j, i = np.meshgrid(np.arange(box.lo[1], box.hi[1]), np.arange(box.lo[0], box.hi[0]), indexing="ij")
    plane = np.stack([i.ravel(), j.ravel()], axis=1).astype(np.float64)  # (J*I, 2) of (i, j)
    rows = max(1, _NEAREST_CHUNK_VOXELS // max(1, jj * ii))
    for k0 in range(0, kk, rows):
        for dk in range(min(rows, kk - k0)):
            k = box.lo[2] + k0 + dk
            ijk = plane @ to_layer[:3, :2].T + to_layer[:3, 2] * k + to_layer[:3, 3]
            idx = np.floor(ijk + 0.5).astype(np.int64)
            inside = np.all((idx >= ext_lo) & (idx <= ext_hi), axis=1)
            values = np.zeros(len(idx), dtype=bool)
            rel = idx[inside] - ext_lo
            values[inside] = data[rel[:, 2], rel[:, 1], rel[:, 0]] == label
            out[k0 + dk] = values.reshape(jj, ii)
    return out


def _read(segmentation: Any, segment_id: str, grid: _Grid, box: Box) -> np.ndarray:
    segment = segmentation.GetSegment(segment_id)
    return _read_layer(segment.GetRepresentation(_labelmap_name()), segment.GetLabelValue(), grid, box)


def _labels_in(data: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Bool: where ``data`` (a layer's voxels) holds one of ``labels``; one pass (a lookup table for 8-bit layers)."""
    if data.dtype == np.uint8:
        table = np.zeros(256, dtype=bool)
        table[[v for v in labels if 0 <= v < 256]] = True
        return table[data]
    if len(labels) == 1:
        return data == labels[0]
    return np.isin(data, labels)


def _read_union(segmentation: Any, segment_ids: Sequence[str], grid: _Grid, box: Box) -> np.ndarray:
    """Bool ``box.shape_kji``: voxels of ``box`` in any of the segments. Segments sharing a layer (a labelmap with
    many labels, as TotalSegmentator's results are) are read in one pass over that layer, not one per segment."""
    out = np.zeros(box.shape_kji, dtype=bool)
    if box.empty:
        return out
    layers: dict[int, tuple[Any, list[int]]] = {}
    for segment_id in segment_ids:
        segment = segmentation.GetSegment(segment_id)
        layer = segment.GetRepresentation(_labelmap_name())
        if layer is None:
            continue
        layers.setdefault(id(layer), (layer, []))[1].append(int(segment.GetLabelValue()))
    for layer, labels in layers.values():
        if _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None:
            continue
        offset = _lattice_offset(layer, grid)
        if offset is None:  # another lattice: resampled per label (rare; read-only use)
            for label in labels:
                out |= _read_layer(layer, label, grid, box)
            continue
        region = _region(layer, offset, box)
        if region is not None:
            out[region[1]] |= _labels_in(_image_array(layer)[region[0]], labels)
    return out


def count_segment_voxels(segmentation_node: Any, segment_id: str, reference_volume_node: Any) -> int:
    """Voxels of the segment on the reference grid, counted over its layer's extent only (no full-grid array)."""
    segmentation = _segmentation(segmentation_node)
    segment = _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    layer = segment.GetRepresentation(_labelmap_name())
    if layer is None or _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None:
        return 0
    offset = _lattice_offset(layer, grid)
    if offset is None:
        return int(np.count_nonzero(_read(segmentation, segment_id, grid, grid.box)))
    region = _region(layer, offset, grid.box)
    if region is None:
        return 0
    return int(np.count_nonzero(_image_array(layer)[region[0]] == segment.GetLabelValue()))


def read_segment(segmentation_node: Any, segment_id: str, reference_volume_node: Any) -> np.ndarray:
    """The segment's binary labelmap on the reference volume's grid, ``uint8`` KJI (1 inside).

    A labelmap stored on another lattice is resampled (nearest neighbour); on the same lattice the copy is exact.
    """
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    return _read(segmentation, segment_id, grid, grid.box).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- masking
def read_segment_box(segmentation_node: Any, segment_id: str, reference_volume_node: Any, box: Box) -> np.ndarray:
    """The segment's voxels inside ``box`` (IJK, clipped to the grid): bool ``box.shape_kji`` on the reference grid."""
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    return _read(segmentation, segment_id, grid, box.intersect(grid.box))


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


# ---------------------------------------------------------------------------------------------------- writing
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


# ---------------------------------------------------------------------------------------------------- state
def _state_text(state: dict[str, Any]) -> str:
    try:
        text = json.dumps(state, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BridgeError(f"the session state is not JSON-serialisable: {exc}") from None
    # Slicer's .seg.nrrd header separates tags with '|': escape it (only possible inside JSON strings).
    return text.replace("|", "\\u007c")


def save_state(segmentation_node: Any, segment_id: str, state: dict[str, Any]) -> None:
    """Store ``state`` (e.g. ``InteractiveSession.state()``) as JSON in the segment tag ``MAISSegment.State``.

    The tag is saved with the segmentation (``.seg.nrrd``, scenes), so a reloaded scene can replay the session.
    """
    if not isinstance(state, dict):
        raise BridgeError(f"the session state must be a dict, got {type(state).__name__}")
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    segment.SetTag(STATE_TAG, _state_text(state))


def load_state(segmentation_node: Any, segment_id: str) -> dict[str, Any] | None:
    """The state stored by :func:`save_state`, or None when the segment has none.

    Raises:
        BridgeError: unknown segment, or a tag that is not a JSON object (damaged).
    """
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    value = vtk.reference("")
    if not segment.GetTag(STATE_TAG, value) or not str(value):
        return None
    try:
        state = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise BridgeError(
            f"the MAISSegment state of segment {segment.GetName()!r} is damaged ({exc}); clear it to start over"
        ) from None
    if not isinstance(state, dict):
        raise BridgeError(f"the MAISSegment state of segment {segment.GetName()!r} is not a JSON object")
    return state


def clear_state(segmentation_node: Any, segment_id: str) -> None:
    """Remove the stored session state of a segment (no error if there is none)."""
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    segment.RemoveTag(STATE_TAG)


# ---------------------------------------------------------------------------------------------------- export
_CASE_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")
MANIFEST_FILE = "manifest.json"


@dataclass
class ExportedCase:
    """One volume with its segmentation written as an image/label-map pair by :func:`export_case`.

    id: the case id (unique within the export). image, label: the written files (NIfTI, the volume's voxel grid and
    world IJK→RAS geometry; the label map is ``uint8``/``uint16`` KJI). labels: label value -> segment name.
    voxels: label value -> voxel count. notes: what the user should know (skipped empty segments, overlaps).
    """

    id: str
    image: Path
    label: Path
    labels: dict[int, str]
    voxels: dict[int, int]
    notes: list[str] = field(default_factory=list)

    def manifest_entry(self, root: Path, split: str) -> dict[str, Any]:
        """This case as an entry of a ``data.load_cases`` manifest whose folder is ``root``."""
        return {
            "id": self.id,
            "image": self.image.relative_to(root).as_posix(),
            "label": self.label.relative_to(root).as_posix(),
            "labels": {str(v): name for v, name in self.labels.items()},
            "split": split,
            "source": "slicer-scene",
        }


def reference_volume_of(segmentation_node: Any) -> Any:
    """The volume a segmentation was drawn on (its reference-geometry node reference), or None."""
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        return None
    node = segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())
    return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None


def _case_id(name: str) -> str:
    text = _CASE_ID_RE.sub("_", name or "").strip("._-")
    return text[:64] or "case"


def _voxels_outside(segmentation: Any, segment_id: str, grid: _Grid) -> tuple[int, int]:
    """``(outside, total)``: voxels of the segment's own labelmap whose centres lie outside the reference grid."""
    segment = segmentation.GetSegment(segment_id)
    layer = segment.GetRepresentation(_labelmap_name())
    if layer is None or _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None:
        return 0, 0
    inside_label = _image_array(layer) == segment.GetLabelValue()
    total = int(np.count_nonzero(inside_label))
    if total == 0:
        return 0, 0
    ext = layer.GetExtent()
    to_grid = np.linalg.solve(grid.ijk_to_seg, _layer_matrix(layer))  # layer (i, j, k, 1) -> reference (i, j, k, 1)
    limit = np.array(grid.shape_kji[::-1], dtype=np.float64) - 0.5
    # the bounding box of the labelled voxels first: an affine map keeps a box inside a box when its corners are
    nz = [np.flatnonzero(inside_label.any(axis=axes)) for axes in ((0, 1), (0, 2), (1, 2))]  # i, j, k in the layer
    lo = np.array([nz[0][0] + ext[0], nz[1][0] + ext[2], nz[2][0] + ext[4]], dtype=np.float64)
    hi = np.array([nz[0][-1] + ext[0], nz[1][-1] + ext[2], nz[2][-1] + ext[4]], dtype=np.float64)
    corners = np.array([[(lo, hi)[c >> d & 1][d] for d in range(3)] + [1.0] for c in range(8)])
    mapped = corners @ to_grid.T
    if np.all(mapped[:, :3] >= -0.5) and np.all(mapped[:, :3] <= limit):
        return 0, total
    outside = 0
    for k in range(inside_label.shape[0]):  # slice by slice: bounded memory on big segments
        jj, ii = np.nonzero(inside_label[k])
        if len(ii) == 0:
            continue
        points = np.stack([ii + ext[0], jj + ext[2], np.full(len(ii), k + ext[4]), np.ones(len(ii))], axis=1)
        ijk = (points @ to_grid.T)[:, :3]
        outside += int(np.count_nonzero(np.any((ijk < -0.5) | (ijk > limit), axis=1)))
    return outside, total


def export_case(
    volume_node: Any,
    segmentation_node: Any,
    folder: str | Path,
    case_id: str | None = None,
    segment_ids: Sequence[str] | None = None,
) -> ExportedCase:
    """Write a volume and its finished segmentation as ``<id>_img.nii.gz`` + ``<id>_lab.nii.gz`` into ``folder``.

    Every chosen segment becomes one label value (1, 2, ... in segment order) of a label map on the volume's voxel
    grid; segment names become the label names. Segments stored on another voxel grid are resampled (nearest
    neighbour); where segments overlap, the later one wins (reported in ``notes``). Nothing in the scene changes.

    Args:
        volume_node: the scalar volume the segmentation was drawn on.
        segmentation_node: its segmentation (binary labelmap source representation).
        folder: where to write (created if missing).
        case_id: the case id and file prefix (default: the volume's name, made file-safe).
        segment_ids: the segments to export (default: every segment with voxels); empty ones are skipped.

    Raises:
        BridgeError: no volume, no segmentation, unknown segment, a segmentation without segments or without any
            painted voxel, a segment lying (partly) outside the volume (wrong volume chosen), or a non-linear
            transform. ImageError: the files cannot be written. Nothing is written when it raises before writing.
    """
    from .io import write_labelmap, write_volume

    if volume_node is None:
        raise BridgeError(
            f"segmentation {_name(segmentation_node)} has no volume to learn from: choose the volume it was drawn on"
        )
    segmentation = _segmentation(segmentation_node)
    what = f"segmentation {_name(segmentation_node)} on volume {_name(volume_node)}"
    all_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    if not all_ids:
        raise BridgeError(f"{what} has no segments; segment the structures first (or leave it out)")
    chosen = list(all_ids if segment_ids is None else segment_ids)
    for segment_id in chosen:
        _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, volume_node)
    volume = volume_from_node(volume_node)
    label = np.zeros(grid.shape_kji, dtype=np.uint8 if len(chosen) < 256 else np.uint16)
    labels: dict[int, str] = {}
    voxels: dict[int, int] = {}
    notes: list[str] = []
    skipped: list[str] = []
    for segment_id in chosen:
        name = segmentation.GetSegment(segment_id).GetName() or segment_id
        outside, total = _voxels_outside(segmentation, segment_id, grid)
        if outside:
            raise BridgeError(
                f"{outside} of the {total} voxels of segment {name!r} ({what}) lie outside the volume: is it the "
                "volume the segmentation was drawn on? Choose that volume, or remove the part outside it"
            )
        mask = _read(segmentation, segment_id, grid, grid.box)
        count = int(np.count_nonzero(mask))
        if count == 0:
            skipped.append(name)
            continue
        value = len(labels) + 1
        overlap = int(np.count_nonzero(label[mask]))
        if overlap:
            notes.append(f"segment {name!r} overlaps earlier segments on {overlap} voxel(s); they were given to it")
        label[mask] = value
        labels[value] = name
        voxels[value] = count
    if not labels:
        raise BridgeError(
            f"{what} has no painted voxels"
            + (f" (empty segment(s): {', '.join(repr(n) for n in skipped)})" if skipped else "")
            + "; finish the segmentation first, or leave it out"
        )
    if skipped:
        notes.append(f"empty segment(s) left out: {', '.join(repr(n) for n in skipped)}")
    for value in list(voxels):  # the overlaps reported above moved voxels between values: count what was written
        voxels[value] = int(np.count_nonzero(label == value))
    out = Path(folder)
    cid = _case_id(case_id if case_id is not None else volume_node.GetName())
    image_path, label_path = out / f"{cid}_img.nii.gz", out / f"{cid}_lab.nii.gz"
    write_volume(volume, image_path)
    write_labelmap(volume.with_array(label), label_path)
    return ExportedCase(cid, image_path, label_path, labels, voxels, notes)


def export_cases(
    cases: Sequence[Sequence[Any]], folder: str | Path, split: str = "train"
) -> tuple[Path, list[ExportedCase]]:
    """Write several cases (:func:`export_case`) and a ``manifest.json`` listing them.

    Args:
        cases: ``(volume_node, segmentation_node)`` or ``(volume_node, segmentation_node, segment_ids)`` items.
        folder: the export folder (created; files are named after the volumes, made unique).
        split: the split written for every case (``data.load_cases`` needs one).

    Returns:
        ``(manifest path, exported cases)``.

    Raises:
        BridgeError: no cases, or a case that cannot be exported (the message names it). ImageError: disk errors.
    """
    from .fileutil import atomic_write_text

    if not cases:
        raise BridgeError("no cases to export: choose at least one volume with a finished segmentation")
    out = Path(folder)
    used: set[str] = set()
    exported: list[ExportedCase] = []
    for item in cases:
        volume_node, segmentation_node, *rest = item
        base = _case_id(volume_node.GetName() if volume_node is not None else "case")
        cid, n = base, 1
        while cid.lower() in used:
            n += 1
            cid = f"{base}_{n}"
        used.add(cid.lower())
        exported.append(export_case(volume_node, segmentation_node, out, cid, rest[0] if rest else None))
    doc = {
        "version": 1,
        "description": "cases exported from a 3D Slicer scene by MAISSegment (Learn from my cases)",
        "cases": [case.manifest_entry(out, split) for case in exported],
    }
    path = out / MANIFEST_FILE
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path, exported
