"""Slicer volumes and segment labelmaps read as numpy arrays on a reference voxel grid (MRML side; no Qt).

The first layer of the bridge between Slicer's MRML nodes and MAISSegmentLib (the ``mrml_*`` modules, the only
modules of the package that import ``slicer``/``vtk``; ``MAISSegmentLib/__init__.py`` imports none of them). It runs
inside the Slicer application and headless (the ``slicer-core`` wheel).

Coordinates
-----------
- Arrays are KJI (``array[k, j, i]``), as everywhere in MAISSegmentLib and in ``slicer.util``.
- Volumes and clicks are in **world** RAS millimetres: a linear parent transform of the volume is applied to its
  IJK→RAS matrix (:func:`volume_from_node`). A non-linear parent transform is refused (:class:`BridgeError`): harden
  it first.
- A segmentation's labelmaps live in the segmentation node's own (local) coordinates. The *reference grid*
  (``_Grid``) is the reference volume's voxel grid expressed there (the volume's and the segmentation's parent
  transforms both accounted for). Masks handed to / returned by the ``mrml_*`` modules are ``uint8``/``bool`` KJI
  arrays on that grid.

What is here: :class:`BridgeError`; :func:`volume_from_node`; reading a segment on the reference grid
(:func:`read_segment`, :func:`read_segment_box`, :func:`count_segment_voxels`); and the underscore helpers (VTK
matrices, the reference grid, reading labelmap layers on it, also shared layers and other lattices) that the other
``mrml_*`` modules share (private to them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import MAISError
from .roi import Box
from .volume import Volume

__all__ = [
    "BridgeError",
    "count_segment_voxels",
    "read_segment",
    "read_segment_box",
    "volume_from_node",
]

_LATTICE_TOLERANCE = 0.01  # voxels: how far a labelmap's lattice may be from the reference grid's
_NEAREST_CHUNK_VOXELS = 4_000_000  # voxels per chunk when resampling a labelmap on another lattice


class BridgeError(MAISError, ValueError):
    """A Slicer node that cannot be used as asked (non-linear transform, wrong node, incompatible geometry...)."""


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


def read_segment_extent(segmentation_node: Any, segment_id: str, reference_volume_node: Any) -> tuple[Box, np.ndarray]:
    """``(box, mask)``: the segment's voxels on the reference grid, read over its layer's extent only (no full-grid
    array when the layer lies on the grid's lattice): ``mask`` is bool ``box.shape_kji``, False outside ``box``."""
    segmentation = _segmentation(segmentation_node)
    segment = _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    layer = segment.GetRepresentation(_labelmap_name())
    nothing = (Box.nothing(), np.zeros((0, 0, 0), dtype=bool))
    if layer is None or _extent_empty(layer.GetExtent()) or layer.GetPointData().GetScalars() is None:
        return nothing
    offset = _lattice_offset(layer, grid)
    if offset is None:
        return grid.box, _read(segmentation, segment_id, grid, grid.box)
    ext = np.asarray(layer.GetExtent()).reshape(3, 2)
    box = Box(tuple(int(x) for x in ext[:, 0] + offset), tuple(int(x) for x in ext[:, 1] + 1 + offset))
    box = box.intersect(grid.box)
    if box.empty:
        return nothing
    return box, _read(segmentation, segment_id, grid, box)


def count_segment_voxels(segmentation_node: Any, segment_id: str, reference_volume_node: Any) -> int:
    """Voxels of the segment on the reference grid, counted over its layer's extent only (no full-grid array)."""
    return int(np.count_nonzero(read_segment_extent(segmentation_node, segment_id, reference_volume_node)[1]))


def read_segment(segmentation_node: Any, segment_id: str, reference_volume_node: Any) -> np.ndarray:
    """The segment's binary labelmap on the reference volume's grid, ``uint8`` KJI (1 inside).

    A labelmap stored on another lattice is resampled (nearest neighbour); on the same lattice the copy is exact.
    """
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    return _read(segmentation, segment_id, grid, grid.box).astype(np.uint8)


def read_segment_box(segmentation_node: Any, segment_id: str, reference_volume_node: Any, box: Box) -> np.ndarray:
    """The segment's voxels inside ``box`` (IJK, clipped to the grid): bool ``box.shape_kji`` on the reference grid."""
    segmentation = _segmentation(segmentation_node)
    _segment(segmentation, segment_id, segmentation_node)
    grid = _reference_grid(segmentation_node, reference_volume_node)
    return _read(segmentation, segment_id, grid, box.intersect(grid.box))
