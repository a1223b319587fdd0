"""3D Slicer segmentation files (``.seg.nrrd``): write and read them, one :class:`Segment` per segment.

A ``.seg.nrrd`` is an NRRD labelmap on the reference volume's grid plus Slicer's header fields: per segment
``Segment{n}_ID/_Name/_Color/_LabelValue/_Layer/_Extent/_Tags/...``, and ``Segmentation_*`` fields for the whole
file. Overlapping segments go to separate layers (a leading "list" axis). Files written here open in 3D Slicer
with their names and colours and are read by ``slicerio``; :func:`read_segmentation` reads them, files Slicer saved
(cropped extents, several layers) and plain label maps. Masks are ``(K, J, I)`` arrays on the reference grid; the
geometry conversion (RAS in memory, LPS in the file) and the atomic write are :mod:`MAISSegmentLib.io`'s.

Every failure is an :class:`~MAISSegmentLib.errors.ImageError` with a one-line message saying what is wrong and
what to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError
from .io import (
    PathLike,
    atomic_write_image,
    ijk_to_ras_from_sitk,
    image_io_for,
    itk_reason,
    output_extension,
    quiet_itk,
    set_lps_geometry,
    write_sitk,
)
from .volume import Volume

__all__ = ["DEFAULT_SEGMENT_COLORS", "Segment", "read_segmentation", "write_segmentation"]

# Distinct default segment colours (RGB 0..1). The first nine are entries 1-9 of 3D Slicer's GenericAnatomyColors
# table (tissue, bone, skin, ...), which Slicer hands out to new segments, so our files look familiar there.
DEFAULT_SEGMENT_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    (r / 255.0, g / 255.0, b / 255.0)
    for r, g, b in (
        (128, 174, 128),
        (241, 214, 145),
        (177, 122, 101),
        (111, 184, 210),
        (216, 101, 79),
        (221, 130, 101),
        (144, 238, 144),
        (192, 104, 88),
        (220, 245, 20),
        (78, 63, 0),
        (255, 250, 220),
        (230, 220, 70),
        (200, 200, 235),
        (250, 250, 210),
        (244, 214, 49),
        (0, 151, 206),
    )
)

# Slicer's default conversion parameters (name, value, description), exactly as Slicer 5 writes them into
# ``Segmentation_ConversionParameters``; "Reference image geometry" is filled in from the reference volume.
_REFERENCE_GEOMETRY = "Reference image geometry"
_CONVERSION_PARAMETERS: tuple[tuple[str, str, str], ...] = (
    (
        "Collapse labelmaps",
        "1",
        "Merge the labelmaps into as few shared labelmaps as possible 1 = created labelmaps will be shared if "
        "possible without overwriting each other.",
    ),
    (
        "Compute surface normals",
        "1",
        "Compute surface normals. 1 (default) = surface normals are computed. 0 = surface normals are not computed "
        "(slightly faster but produces less smooth surface display).",
    ),
    (
        "Crop to reference image geometry",
        "0",
        "Crop the model to the extent of reference geometry. 0 (default) = created labelmap will contain the entire "
        "model. 1 = created labelmap extent will be within reference image extent.",
    ),
    (
        "Decimation factor",
        "0.0",
        "Desired reduction in the total number of polygons. Range: 0.0 (no decimation) to 1.0 (as much "
        "simplification as possible). Value of 0.8 typically reduces data set size by 80% without losing too much "
        "details.",
    ),
    ("Default slice thickness", "0.0", "Default thickness for contours if slice spacing cannot be calculated."),
    (
        "End capping",
        "1",
        "Create end cap to close surface inside contours on the top and bottom of the structure.\n"
        "0 = leave contours open on surface exterior.\n"
        "1 (default) = close surface by generating smooth end caps.\n"
        "2 = close surface by generating straight end caps.",
    ),
    (
        "Fractional labelmap oversampling factor",
        "1",
        "Determines the oversampling of the reference image geometry. All segments are oversampled with the same "
        "value (value of 1 means no oversampling).",
    ),
    ("Joint smoothing", "0", "Perform joint smoothing."),
    (
        "Oversampling factor",
        "1",
        "Determines the oversampling of the reference image geometry. If it's a number, then all segments are "
        'oversampled with the same value (value of 1 means no oversampling). If it has the value "A", then '
        "automatic oversampling is calculated.",
    ),
    (
        _REFERENCE_GEOMETRY,
        "",
        "Image geometry description string determining the geometry of the labelmap that is created in course of "
        "conversion. Can be copied from a volume, using the button.",
    ),
    ("Smoothing factor", "-0.5", "Smoothing factor. Range: 0.0 (no smoothing) to 1.0 (strong smoothing)."),
    (
        "Threshold fraction",
        "0.5",
        "Determines the threshold that the closed surface is created at as a fractional value between 0 and 1.",
    ),
)
_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(.+)$")


@dataclass(eq=False, repr=False)
class Segment:
    """One segment of a segmentation: a binary mask on the reference grid plus Slicer's segment metadata.

    Args:
        name: shown in Slicer's segment list; non-empty.
        mask: ``(K, J, I)`` bool (or integer, nonzero = inside) array on the reference volume's grid, KJI order.
        color: RGB in 0..1; None = ``DEFAULT_SEGMENT_COLORS[position in the list]`` when written.
        label_value: voxel value of this segment in the labelmap (1..255 when written); None = position + 1.
        segment_id: Slicer's segment ID (unique within the file); None = ``"Segment_<label_value>"``.
        tags: Slicer segment tags (``vtkSegment::SetTag``), e.g. ``TerminologyEntry`` or our own metadata;
            keys without ``:`` or ``|``, values without ``|``.
    """

    name: str
    mask: np.ndarray
    color: tuple[float, float, float] | None = None
    label_value: int | None = None
    segment_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ImageError(f"a segment needs a non-empty name, got {self.name!r}")
        self.mask = np.asarray(self.mask)
        if self.mask.ndim != 3:
            raise ImageError(
                f"segment {self.name!r}: mask must be a 3-D (K, J, I) array on the reference grid, got shape "
                f"{self.mask.shape}"
            )
        if self.color is not None:
            try:
                color = np.asarray(self.color, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                color = np.full(1, np.nan)
            if color.shape != (3,) or not np.all(np.isfinite(color)) or np.any((color < 0) | (color > 1)):
                raise ImageError(
                    f"segment {self.name!r}: color must be three numbers in 0..1 (RGB), got {self.color!r}"
                )
            self.color = (float(color[0]), float(color[1]), float(color[2]))
        if self.label_value is not None:
            if isinstance(self.label_value, bool | np.bool_) or not isinstance(self.label_value, int | np.integer):
                raise ImageError(f"segment {self.name!r}: label_value must be an integer, got {self.label_value!r}")
            self.label_value = int(self.label_value)
            if self.label_value < 1:
                raise ImageError(
                    f"segment {self.name!r}: label_value must be >= 1 (0 is background), got {self.label_value}"
                )
        if self.segment_id is not None and (not isinstance(self.segment_id, str) or not self.segment_id.strip()):
            raise ImageError(f"segment {self.name!r}: segment_id must be a non-empty string, got {self.segment_id!r}")
        self.tags = dict(self.tags)
        for key, value in self.tags.items():
            if not isinstance(key, str) or not key or ":" in key or "|" in key:
                raise ImageError(
                    f"segment {self.name!r}: tag name {key!r} must be a non-empty string without ':' or '|'"
                )
            if not isinstance(value, str) or "|" in value:
                raise ImageError(f"segment {self.name!r}: tag {key!r} must have a string value without '|'")

    def __repr__(self) -> str:
        return (
            f"Segment(name={self.name!r}, voxels={int(np.count_nonzero(self.mask))}, color={self.color}, "
            f"label_value={self.label_value}, segment_id={self.segment_id!r}, tags={sorted(self.tags)})"
        )


def write_segmentation(path: PathLike, reference: Volume, segments: Sequence[Segment]) -> None:
    """Write segments as a 3D Slicer segmentation (``.seg.nrrd``) on the reference volume's grid.

    The file is a labelmap with Slicer's header fields (``Segment{n}_ID/_Name/_Color/_ColorAutoGenerated/
    _LabelValue/_Layer/_Extent/_Tags/_NameAutoGenerated`` and ``Segmentation_MasterRepresentation``,
    ``_ContainedRepresentationNames``, ``_ReferenceImageExtentOffset``, ``_ConversionParameters``), so Slicer
    opens it with the segment names, colours and label values. Segments that overlap go to separate layers:
    the file then has a leading "list" axis (``sizes: L I J K``), as Slicer writes overlapping segments. Each
    segment goes into the first layer where it overlaps nothing. The write is atomic (see :func:`write_volume`).

    Args:
        path: target file, ``.seg.nrrd`` (or ``.nrrd``).
        reference: the volume the segments were drawn on; its grid and geometry are written.
        segments: the segments; masks ``(K, J, I)`` like ``reference.array``. May be empty.

    Raises:
        ImageError: wrong extension; a mask of another shape or a float mask; empty or duplicate names;
            label values outside 1..255 or used twice; duplicate segment IDs; write failures.
    """
    path = Path(path)
    extension = output_extension(path, allowed=(".seg.nrrd", ".nrrd"), what="a segmentation")
    if not isinstance(reference, Volume):
        raise ImageError(f"reference must be a Volume, got {type(reference).__name__}")
    resolved = _resolve_segments(reference, segments)

    # Greedy layer packing: a segment shares a layer with the ones before it unless they overlap.
    layers: list[np.ndarray] = []
    layer_of: list[int] = []
    for seg, _color, label, _sid in resolved:
        inside = seg.mask != 0
        index = next((n for n, layer in enumerate(layers) if not np.any(layer[inside])), None)
        if index is None:
            layers.append(np.zeros(reference.array.shape, np.uint8))
            index = len(layers) - 1
        layers[index][inside] = label
        layer_of.append(index)
    if not layers:
        layers.append(np.zeros(reference.array.shape, np.uint8))

    if len(layers) == 1:
        image = sitk.GetImageFromArray(layers[0], isVector=False)
    else:
        image = sitk.GetImageFromArray(np.stack(layers, axis=-1), isVector=True)  # (K, J, I, L)
    set_lps_geometry(image, reference.ijk_to_ras)

    size_i, size_j, size_k = reference.shape_ijk
    full_extent = f"0 {size_i - 1} 0 {size_j - 1} 0 {size_k - 1}"
    for n, ((seg, color, label, sid), layer) in enumerate(zip(resolved, layer_of)):
        fields = {
            "ID": sid,
            "Name": seg.name,
            "Color": " ".join(_format_number(c) for c in color),
            "ColorAutoGenerated": "1" if seg.color is None else "0",
            "LabelValue": str(label),
            "Layer": str(layer),
            # Always the full grid: Slicer reads a whole layer with the extent of its first segment, so a
            # tight (or empty) extent there would crop the other segments of that layer.
            "Extent": full_extent,
            "Tags": "".join(f"{key}:{value}|" for key, value in sorted(seg.tags.items())),
            "NameAutoGenerated": "0",
        }
        for key, value in fields.items():
            image.SetMetaData(f"Segment{n}_{key}", value)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    image.SetMetaData("Segmentation_ConversionParameters", _conversion_parameters(reference))

    def write(tmp: Path) -> None:
        write_sitk(image, tmp, compress=True)
        if len(layers) > 1:
            _set_layer_axis_kind_list(tmp)

    atomic_write_image(path, extension, write)


def read_segmentation(path: PathLike) -> tuple[Volume, list[Segment]]:
    """Read a ``.seg.nrrd`` (ours or one saved by 3D Slicer) into a volume and its segments.

    A plain label map (any format, no ``Segment{n}_*`` fields) is read too: each nonzero value becomes a segment
    named ``Segment_<value>``, as Slicer does when it imports a labelmap as a segmentation.

    Returns:
        ``(volume, segments)``: ``volume`` carries the file's grid (the reference grid for files we write;
        smaller when Slicer saved it cropped to the segments) and, as its array, the labelmap: the file's voxels
        for a single layer, or all segments painted in file order with their label values when they overlap
        (several layers). ``segments`` hold boolean ``(K, J, I)`` masks on that grid, names, colours, label
        values, IDs and tags; the masks are exact, also for overlapping segments.

    Raises:
        ImageError: missing or unreadable file, a 2-D or 4-D image, inconsistent segment fields.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ImageError(f"{path} is a folder; give a .seg.nrrd file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image_io = image_io_for(path)
    if image_io:
        reader.SetImageIO(image_io)
    try:
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read segmentation {path}: not a readable image, or damaged/truncated ({itk_reason(exc)})"
        ) from None
    if image.GetDimension() != 3:
        hint = " (if it is an old Slicer 4.x segmentation, re-save it in a recent 3D Slicer)"
        hint = hint if image.GetDimension() == 4 else ""
        raise ImageError(f"{path} is a {image.GetDimension()}-D image, not a 3-D segmentation{hint}")
    voxels = sitk.GetArrayFromImage(image)  # (K, J, I) or (K, J, I, L)
    if not np.issubdtype(voxels.dtype, np.integer):
        # Some tools save label maps as float; accept them when every value is a whole number, as Slicer does.
        if not np.issubdtype(voxels.dtype, np.floating) or not np.all(voxels == np.rint(voxels)):
            raise ImageError(
                f"{path} has {voxels.dtype} voxels that are not whole numbers; a segmentation needs labels"
            )
        voxels = voxels.astype(np.int32)
    layers = voxels[..., np.newaxis] if voxels.ndim == 3 else voxels
    ijk_to_ras = ijk_to_ras_from_sitk(image)

    fields: dict[int, dict[str, str]] = {}
    for key in image.GetMetaDataKeys():
        match = _SEGMENT_KEY.match(key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = image.GetMetaData(key)

    segments: list[Segment] = []
    if not fields:
        values = np.unique(layers[..., 0])
        for n, value in enumerate(int(v) for v in values if v > 0):
            segments.append(
                Segment(
                    name=f"Segment_{value}",
                    mask=layers[..., 0] == value,
                    color=DEFAULT_SEGMENT_COLORS[n % len(DEFAULT_SEGMENT_COLORS)],
                    label_value=value,
                    segment_id=f"Segment_{value}",
                )
            )
    for n in sorted(fields):
        f = fields[n]
        sid = f.get("ID") or f"Segment_{n}"
        name = f.get("Name") or sid
        try:
            label = int(f.get("LabelValue", "1"))
            layer = int(f.get("Layer", "0"))
            color = _parse_color(f.get("Color") or f.get("DefaultColor"), n)
            extent = [int(v) for v in f["Extent"].split()] if "Extent" in f else None
        except ValueError as exc:
            raise ImageError(
                f"{path}: segment {name!r} has a malformed header field ({exc}); the file is damaged"
            ) from None
        if not 0 <= layer < layers.shape[-1]:
            raise ImageError(
                f"{path}: segment {name!r} is in layer {layer} but the file has {layers.shape[-1]} layer(s); "
                "the file is damaged"
            )
        mask = layers[..., layer] == label
        if extent is not None and len(extent) == 6:
            mask = _crop_to_extent(mask, extent)
        segments.append(
            Segment(
                name=name,
                mask=mask,
                color=color,
                label_value=label,
                segment_id=sid,
                tags=_parse_tags(f.get("Tags", "")),
            )
        )

    if layers.shape[-1] == 1:
        labelmap = layers[..., 0]
    else:
        labelmap = np.zeros(layers.shape[:3], dtype=layers.dtype)
        for seg in segments:
            labelmap[seg.mask] = seg.label_value
    return Volume(labelmap, ijk_to_ras), segments


def _resolve_segments(
    reference: Volume, segments: Sequence[Segment]
) -> list[tuple[Segment, tuple[float, float, float], int, str]]:
    """Validate segments against the reference and fill in defaults: (segment, color, label, id) per segment."""
    if isinstance(segments, Segment) or not isinstance(segments, Sequence):
        raise ImageError("segments must be a list of Segment objects")
    resolved = []
    names: dict[str, int] = {}
    labels: dict[int, str] = {}
    ids: dict[str, str] = {}
    for n, seg in enumerate(segments):
        if not isinstance(seg, Segment):
            raise ImageError(f"segments[{n}] is a {type(seg).__name__}, not a Segment")
        if seg.mask.shape != reference.array.shape:
            raise ImageError(
                f"segment {seg.name!r}: mask shape {seg.mask.shape} does not match the reference volume "
                f"{reference.array.shape} (K, J, I); resample the mask onto the reference grid first"
            )
        if not (seg.mask.dtype == np.bool_ or np.issubdtype(seg.mask.dtype, np.integer)):
            raise ImageError(
                f"segment {seg.name!r}: mask is {seg.mask.dtype}; give a bool or integer mask "
                "(e.g. probabilities > 0.5)"
            )
        if seg.name in names:
            raise ImageError(f"two segments are named {seg.name!r}; segment names must be unique")
        names[seg.name] = n
        label = seg.label_value if seg.label_value is not None else n + 1
        if not 1 <= label <= 255:
            raise ImageError(f"segment {seg.name!r}: label value {label} is outside 1..255 (the file stores uint8)")
        if label in labels:
            raise ImageError(
                f"segments {labels[label]!r} and {seg.name!r} both have label value {label}; give each a distinct "
                "label_value"
            )
        labels[label] = seg.name
        sid = seg.segment_id if seg.segment_id is not None else f"Segment_{label}"
        if sid in ids:
            raise ImageError(f"segments {ids[sid]!r} and {seg.name!r} both have segment ID {sid!r}; IDs must be unique")
        ids[sid] = seg.name
        color = seg.color if seg.color is not None else DEFAULT_SEGMENT_COLORS[n % len(DEFAULT_SEGMENT_COLORS)]
        resolved.append((seg, color, label, sid))
    return resolved


def _conversion_parameters(reference: Volume) -> str:
    """``Segmentation_ConversionParameters`` as Slicer serialises it: ``name|value|description&`` per parameter."""
    size_i, size_j, size_k = reference.shape_ijk
    # Slicer's vtkSegmentationConverter::SerializeImageGeometry: the IJK->RAS matrix row by row, then the extent.
    geometry = "".join(f"{_format_number(v)};" for v in reference.ijk_to_ras.ravel())
    geometry += f"0;{size_i - 1};0;{size_j - 1};0;{size_k - 1};"
    parts = []
    for name, value, description in _CONVERSION_PARAMETERS:
        parts.append(f"{name}|{geometry if name == _REFERENCE_GEOMETRY else value}|{description}&")
    return "".join(parts)


def _set_layer_axis_kind_list(path: Path) -> None:
    """Mark the layer axis of a multi-layer ``.seg.nrrd`` as "list", as Slicer writes it.

    ITK writes a multi-component image with ``kinds: vector domain domain domain``; Slicer (and slicerio) expect
    ``list`` for segmentation layers. The header is plain text ending at the first empty line, so one field can
    be rewritten without touching the compressed voxel data.
    """
    data = path.read_bytes()
    end = data.find(b"\n\n")
    header = data[: end + 1]
    old, new = b"\nkinds: vector domain domain domain\n", b"\nkinds: list domain domain domain\n"
    if end < 0 or header.count(old) != 1:
        raise ImageError(f"cannot mark the segment layers in {path.name}: unexpected NRRD header from ITK")
    path.write_bytes(header.replace(old, new) + data[end + 1 :])


def _crop_to_extent(mask: np.ndarray, extent: Sequence[int]) -> np.ndarray:
    """Zero ``mask`` (K, J, I) outside a Slicer extent ``i0 i1 j0 j1 k0 k1`` (inclusive; empty if i0 > i1)."""
    i0, i1, j0, j1, k0, k1 = extent
    if i0 > i1 or j0 > j1 or k0 > k1:
        return np.zeros_like(mask)
    size_k, size_j, size_i = mask.shape
    if (i0, j0, k0) == (0, 0, 0) and (i1, j1, k1) == (size_i - 1, size_j - 1, size_k - 1):
        return mask
    cropped = np.zeros_like(mask)
    ks = slice(max(k0, 0), min(k1, size_k - 1) + 1)
    js = slice(max(j0, 0), min(j1, size_j - 1) + 1)
    is_ = slice(max(i0, 0), min(i1, size_i - 1) + 1)
    cropped[ks, js, is_] = mask[ks, js, is_]
    return cropped


def _parse_color(text: str | None, index: int) -> tuple[float, float, float]:
    if not text:
        return DEFAULT_SEGMENT_COLORS[index % len(DEFAULT_SEGMENT_COLORS)]
    values = [float(v) for v in text.split()]
    if len(values) != 3:
        raise ValueError(f"color {text!r} is not three numbers")
    r, g, b = (min(max(v, 0.0), 1.0) for v in values)
    return (r, g, b)


def _parse_tags(text: str) -> dict[str, str]:
    """Slicer's ``key:value|key:value|`` tag string (entries without ':' are skipped, as Slicer does)."""
    tags = {}
    for item in text.split("|"):
        key, sep, value = item.partition(":")
        if sep and key:
            tags[key] = value
    return tags


def _format_number(value: float) -> str:
    """Shortest text that reads back to the same float, without a trailing ``.0`` (Slicer writes ``0``, ``1``)."""
    value = float(value)
    if value == 0:
        return "0"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text
