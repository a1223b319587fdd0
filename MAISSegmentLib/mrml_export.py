"""Finished cases of a Slicer scene exported as image/label-map files for fine-tuning (MRML side; no Qt).

:func:`export_cases` writes volumes with finished segmentations as image/label-map NIfTI pairs plus a
``manifest.json`` in the schema of :func:`MAISSegmentLib.data.load_cases` ("Learn from my cases"). The user's nodes
are only read. :func:`reference_volume_of` finds the volume a segmentation was drawn on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .mrml_volumes import (
    BridgeError,
    _extent_empty,
    _Grid,
    _image_array,
    _labelmap_name,
    _layer_matrix,
    _name,
    _read,
    _reference_grid,
    _segment,
    _segmentation,
    volume_from_node,
)

__all__ = [
    "MANIFEST_FILE",
    "ExportedCase",
    "export_case",
    "export_cases",
    "reference_volume_of",
]

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
