"""Read and write volumes and 3D Slicer segmentations with SimpleITK.

Everything in memory is a :class:`~MAISSegmentLib.volume.Volume` (array in KJI order, ``ijk_to_ras`` 4×4).
Files and ITK use LPS (x to the patient's Left, y Posterior); RAS and LPS differ by the sign of x and y, so the
conversion at this boundary flips the first two rows of the affine (``diag(-1, -1, 1, 1) @ ijk_to_lps``).
SimpleITK's ``GetArrayFromImage`` already returns (k, j, i) arrays, so voxel data needs no transposing.

Formats:

- read: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``), any other
  single file ITK can read, and a folder holding a DICOM series.
- write: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` (single-file formats, so the write can be atomic: a temporary
  file in the same folder is renamed over the target, and a failed write leaves any existing file untouched).
- segmentations: ``.seg.nrrd`` as 3D Slicer writes them (labelmap layers + ``Segment{n}_*`` header fields), read by
  Slicer, by ``slicerio`` and by :func:`read_segmentation`.

Every failure is an :class:`~MAISSegmentLib.errors.ImageError` with a one-line message saying what is wrong and
what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError
from .fileutil import atomic_write
from .sysinfo import check_fits_in_memory
from .volume import Volume

__all__ = [
    "DEFAULT_SEGMENT_COLORS",
    "Segment",
    "read_geometry",
    "read_segmentation",
    "read_volume",
    "resample_label_map",
    "volume_from_sitk",
    "volume_to_sitk",
    "write_labelmap",
    "write_segmentation",
    "write_volume",
]

PathLike = str | os.PathLike

# RAS <-> LPS: negate x and y. The matrix is its own inverse.
_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Extensions we write, longest first so ".seg.nrrd" wins over ".nrrd". Two-file formats (.nhdr, .mhd, .hdr/.img)
# are left out on purpose: they cannot be replaced atomically in one rename.
_WRITE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_IMAGE_IO_BY_EXTENSION = {
    ".nii.gz": "NiftiImageIO",
    ".nii": "NiftiImageIO",
    ".nrrd": "NrrdImageIO",
    ".nhdr": "NrrdImageIO",
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
}
_FORMAT_NAMES = {"NiftiImageIO": "NIfTI", "NrrdImageIO": "NRRD", "MetaImageIO": "MetaImage"}

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


# ============================================================================ SimpleITK <-> Volume
def volume_to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image (LPS geometry) holding ``volume``'s voxels.

    bool arrays become uint8 and float16 becomes float32 (ITK has neither); other dtypes are kept.
    """
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    try:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ImageError(f"cannot hand a {array.dtype} array to ITK ({_itk_reason(exc)}); cast it first") from None
    _set_lps_geometry(image, volume.ijk_to_ras)
    return image


def volume_from_sitk(image: sitk.Image, source: PathLike | None = None) -> Volume:
    """A :class:`Volume` from a 3-D scalar SimpleITK image (LPS geometry converted to RAS).

    Args:
        image: a 3-D scalar image; a 4-D image whose 4th axis has length 1 is accepted and squeezed.
        source: where the image came from, only used in error messages.

    Raises:
        ImageError: 2-D, 4-D (more than one frame) or multi-component images.
    """
    what = str(source) if source is not None else "image"
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    _check_scalar_3d(
        image.GetDimension(),
        image.GetSize(),
        image.GetNumberOfComponentsPerPixel(),
        image.GetPixelIDTypeAsString(),
        what,
    )
    array = sitk.GetArrayFromImage(image)  # (K, J, I)
    return Volume(array, _ijk_to_ras_from_sitk(image))


def resample_label_map(label: Volume, reference: Volume) -> np.ndarray:
    """``label``'s voxels on ``reference``'s grid, nearest neighbour through both geometries (RAS mm).

    Args:
        label: an integer (or bool) label map on any grid.
        reference: the grid to resample onto (its voxels are not used).

    Returns:
        ``(K, J, I)`` array shaped like ``reference.array`` with ``label``'s dtype; 0 where ``reference`` lies
        outside ``label``'s grid.
    """
    grid = sitk.Image([int(n) for n in reference.shape_ijk], sitk.sitkUInt8)
    _set_lps_geometry(grid, reference.ijk_to_ras)
    moving = volume_to_sitk(label)
    out = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(label.array.dtype, copy=False)


def _ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.asarray(image.GetSpacing()[:3], dtype=np.float64)
    ijk_to_lps[:3, 3] = image.GetOrigin()[:3]
    return _RAS_LPS @ ijk_to_lps


def _set_lps_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    ijk_to_lps = _RAS_LPS @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in ijk_to_lps[:3, 3]])
    image.SetDirection([float(d) for d in (ijk_to_lps[:3, :3] / spacing).ravel()])


def _check_scalar_3d(dimension: int, size: Sequence[int], components: int, pixel_type: str, what: str) -> None:
    size_text = " x ".join(str(s) for s in size)
    if dimension == 2:
        raise ImageError(
            f"{what} is a 2-D image ({size_text} pixels); MAISSegment needs a single 3-D scalar volume. "
            "If it is one slice of a DICOM series, open the series folder instead"
        )
    if dimension == 4:
        raise ImageError(
            f"{what} is a 4-D image ({size_text}: {size[3]} frames or channels along the 4th axis); MAISSegment needs "
            "a single 3-D scalar volume, so extract one frame first (e.g. SimpleITK image[:, :, :, 0]) and save it"
        )
    if dimension != 3:
        raise ImageError(
            f"{what} has {dimension} dimensions ({size_text}); MAISSegment needs a single 3-D scalar volume"
        )
    if components != 1 and what.lower().endswith(".seg.nrrd"):
        raise ImageError(
            f"{what} is a segmentation with {components} layers (overlapping segments); read it with "
            "read_segmentation, or export one segment as a label map"
        )
    if components != 1:
        raise ImageError(
            f"{what} has {components} components per voxel ({pixel_type}: RGB colour, several channels or a vector "
            "field); MAISSegment needs a single 3-D scalar volume, so extract one component or convert to greyscale "
            "first (e.g. SimpleITK VectorIndexSelectionCast)"
        )
    if "complex" in pixel_type:
        raise ImageError(f"{what} has complex voxels ({pixel_type}); save the magnitude image instead")


# ============================================================================ reading
def read_volume(path: PathLike) -> Volume:
    """Read a 3-D scalar image into a :class:`Volume` (KJI array, RAS geometry).

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``, ``.mhd``) file,
            any other single file ITK reads, or a folder holding a DICOM series. With several series in one
            folder the one with the most files is read and a ``UserWarning`` names the others.

    Returns:
        The volume with the on-disk voxel type (NIfTI files with a scaling slope come back as float, as ITK
        applies the scaling).

    Raises:
        ImageError: the path is missing; the file is unreadable, truncated or not an image; the image is 2-D,
            4-D or has several components per voxel; the folder holds no DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file or folder; check the path (and the drive or share it is on)")
    image = _read_dicom_folder(path) if path.is_dir() else _read_image_file(path)
    return volume_from_sitk(image, source=path)


def read_geometry(path: PathLike) -> Volume:
    """An image's voxel grid without its voxels: cheap (the header only) for files, a full read for DICOM folders.

    Returns:
        A :class:`Volume` with the file's ``ijk_to_ras`` whose ``array`` is a read-only zero array of the right
        shape that takes no memory (``np.broadcast_to``); use it for geometry only.

    Raises:
        ImageError: as :func:`read_volume` for a missing or unreadable file, a 2-D/4-D or multi-component image, or a
            NIfTI header with a zero, negative or non-numeric voxel size.
    """
    path = Path(path)
    if not path.is_file():
        return read_volume(path)
    reader, image_io = _read_image_information(path)
    if image_io == "NiftiImageIO" and (header := _read_nifti_header(path)) is not None:
        _check_nifti_spacing(path, header)
    size_i, size_j, size_k = reader.GetSize()[:3]
    return Volume(np.broadcast_to(np.uint8(0), (size_k, size_j, size_i)), _ijk_to_ras_from_sitk(reader))


def _read_image_information(path: Path) -> tuple[sitk.ImageFileReader, str | None]:
    """A reader of ``path`` with its header read and checked (3-D scalar); ``(reader, ITK ImageIO name or None)``."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image_io = _IMAGE_IO_BY_EXTENSION.get(_extension(path, _IMAGE_IO_BY_EXTENSION))
    if image_io:
        # Name the reader so a damaged file fails in the right one (and ITK does not probe every format).
        reader.SetImageIO(image_io)
    kind = f"{_FORMAT_NAMES[image_io]} " if image_io else ""
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read {path}: not a readable {kind}image ({_itk_reason(exc)}); {_unreadable_hint(path, image_io)}"
        ) from None
    size = reader.GetSize()
    dimension = reader.GetDimension()
    if not (dimension == 4 and size[3] == 1):
        _check_scalar_3d(
            dimension,
            size,
            reader.GetNumberOfComponents(),
            sitk.GetPixelIDValueAsString(reader.GetPixelID()),
            str(path),
        )
    return reader, image_io


def _read_image_file(path: Path) -> sitk.Image:
    reader, image_io = _read_image_information(path)
    size = reader.GetSize()
    header = _read_nifti_header(path) if image_io == "NiftiImageIO" else None
    if header is not None:
        # ITK silently turns a zero spacing into 1 mm and fills a file that ends early with zeros: catch both here.
        _check_nifti_spacing(path, header)
        _check_nifti_complete(path, header)
    n_bytes = int(np.prod(size)) * reader.GetNumberOfComponents() * _bytes_per_pixel(reader.GetPixelID())
    try:  # ITK's buffer and the NumPy copy exist together for a moment
        check_fits_in_memory(
            2 * n_bytes,
            f"reading {path} ({'x'.join(map(str, size))} voxels)",
            "crop or downsample the image first, or use a machine with more memory",
        )
    except MemoryError as exc:
        raise ImageError(str(exc)) from None
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read the voxels of {path}: the file is damaged or truncated ({_itk_reason(exc)}); copy it again"
        ) from None
    if header is not None:
        _check_nifti_finite(path, header, image)
    return image


# Leading bytes of image formats (offset, signature, format name, extension to use), to say what a file really is.
_SIGNATURES = (
    (344, b"n+1\0", "NIfTI", ".nii"),
    (4, b"n+2\0", "NIfTI", ".nii"),
    (0, b"NRRD000", "NRRD", ".nrrd"),
    (128, b"DICM", "DICOM", "(a DICOM series folder)"),
    (0, b"\x1f\x8b", "gzip-compressed", ".nii.gz (if it is a NIfTI image)"),
)


def _unreadable_hint(path: Path, image_io: str | None) -> str:
    """What to do about a file ITK cannot read as ``image_io``: guessed from its size and first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError as exc:
        return f"the file cannot be opened ({exc.strerror or exc})"
    if not head:
        return "the file is empty (0 bytes): copy it again from its source"
    wanted = _FORMAT_NAMES.get(image_io or "", "")
    for offset, signature, name, extension in _SIGNATURES:
        if head[offset : offset + len(signature)] == signature and name != wanted:
            if name == "gzip-compressed" and path.name.lower().endswith(".gz"):
                break  # a .gz that is not a NIfTI inside: handled below
            return f"its content is a {name} file, not {wanted or 'an image ITK knows'}: rename it to {extension}"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if printable >= 0.95 * len(head):
        return "it holds text, not an image: give the image file itself"
    return (
        "if it opens in 3D Slicer, save it from there as .nii.gz or .nrrd; otherwise the file is damaged "
        "(an interrupted copy or download?): copy it again from its source"
    )


def _bytes_per_pixel(pixel_id: int) -> int:
    """Bytes of one voxel component of an ITK pixel type (8 when unknown: errs on the safe side)."""
    name = sitk.GetPixelIDValueAsString(pixel_id)
    for key, n in (("8-bit", 1), ("16-bit", 2), ("32-bit", 4), ("64-bit", 8)):
        if key in name:
            return n * (2 if "complex" in name else 1)
    return 8


def _read_dicom_folder(folder: Path) -> sitk.Image:
    with _quiet_itk():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        has_subfolders = any(p.is_dir() for p in folder.iterdir())
        hint = " (the files may be in a sub-folder: open that one)" if has_subfolders else ""
        raise ImageError(
            f"{folder} is a folder without a DICOM series{hint}; give a DICOM series folder or an image file "
            "(.nii.gz, .nrrd, .mha)"
        )
    series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(series[sid]))
    if len(series_ids) > 1:
        others = ", ".join(f"{sid} ({len(series[sid])} files)" for sid in series_ids if sid != chosen)
        warnings.warn(
            f"{folder} holds {len(series_ids)} DICOM series; reading {chosen} ({len(series[chosen])} files), "
            f"ignoring {others}. Put each series in its own folder to choose another",
            UserWarning,
            stacklevel=3,
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[chosen])
    try:
        with _quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read DICOM series {chosen} in {folder}: {_itk_reason(exc)}; check the files are complete"
        ) from None


@dataclass(frozen=True)
class _NiftiHeader:
    """The fields of a single-file NIfTI-1/2 header that ITK does not let us check (read by :func:`_read_nifti_header`).

    Args:
        compressed: the file is gzip-compressed (``.nii.gz``).
        endian: ``"<"`` or ``">"``, the byte order of the header and of the voxels.
        dims: ``dim[1..ndim]``, the grid size (voxels along i, j, k, ...).
        datatype: the NIfTI datatype code (16: float32, 64: float64, ...).
        bitpix: bits per voxel.
        pixdim: ``pixdim[1..ndim]``, the voxel size along each axis (mm along i, j, k).
        vox_offset: byte offset of the first voxel in the (uncompressed) file.
    """

    compressed: bool
    endian: str
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    pixdim: tuple[float, ...]
    vox_offset: int

    @property
    def n_voxels(self) -> int:
        return int(np.prod([max(int(d), 1) for d in self.dims], dtype=np.int64))

    @property
    def expected_size(self) -> int:
        """Header + voxel bytes the (uncompressed) file must hold."""
        return self.vox_offset + self.n_voxels * self.bitpix // 8


# NIfTI datatype codes of real floating-point voxels, which can hold NaN/Inf -> NumPy dtype character
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _read_nifti_header(path: Path) -> _NiftiHeader | None:
    """The header of a single-file NIfTI-1/2, or None when ``path`` holds something else (e.g. a .hdr/.img pair)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageError(f"{path} is damaged or truncated ({exc}); copy it again") from None
    if len(head) < 348:
        return None
    for endian in "<>":
        (sizeof_hdr,) = struct.unpack(endian + "i", head[:4])
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            pixdim = struct.unpack(endian + "8f", head[76:108])
            (vox_offset,) = struct.unpack(endian + "f", head[108:112])
            break
        if sizeof_hdr == 540 and len(head) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            (vox_offset,) = struct.unpack(endian + "q", head[168:176])
            break
    else:
        return None
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or not vox_offset >= 348:
        return None  # a header/image pair (.hdr/.img) or a malformed header: nothing to check here
    return _NiftiHeader(
        compressed,
        endian,
        tuple(int(d) for d in dims[1 : ndim + 1]),
        int(datatype),
        int(bitpix),
        tuple(float(p) for p in pixdim[1 : ndim + 1]),
        int(vox_offset),
    )


def _check_nifti_spacing(path: Path, header: _NiftiHeader) -> None:
    """Refuse a voxel size (``pixdim[1..3]``) that is zero, negative or not a number: ITK reads it as 1 mm."""
    spacing = header.pixdim[:3]
    if all(np.isfinite(s) and s > 0 for s in spacing):
        return
    text = ", ".join(f"{s:g}" for s in spacing)
    raise ImageError(
        f"{path}: the NIfTI header gives a voxel size of ({text}) mm (pixdim); each must be a positive number of mm "
        "(ITK would silently read 1 mm and every distance would be wrong). The tool that wrote the file left the "
        "voxel size out: write it again with the right voxel size, or set it (e.g. nibabel header.set_zooms)"
    )


def _check_nifti_complete(path: Path, header: _NiftiHeader) -> None:
    """Raise if a NIfTI file holds fewer voxel bytes than its header promises (truncated copy or download)."""
    expected = header.expected_size
    if not header.compressed:
        actual = path.stat().st_size
        if actual < expected:
            raise ImageError(_truncated_message(path, expected, actual))
        return
    # A gzip stream ends with its uncompressed size mod 2**32: a cheap check that passes for every intact
    # single-member file. Only when it does not match (truncated, or multi-member/trailing data) decompress it all.
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected % 2**32:
            return
    actual = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                actual += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise ImageError(_truncated_message(path, expected, actual)) from None
    if actual < expected:
        raise ImageError(_truncated_message(path, expected, actual))


def _check_nifti_finite(path: Path, header: _NiftiHeader, image: sitk.Image) -> None:
    """Refuse a float NIfTI with NaN/Inf voxels.

    ITK's NIfTI reader (niftilib's ``nifti_read_buffer``) replaces every NaN and Inf of float data by 0 without a
    word, so the image it returns looks valid and our own NaN check never sees them. Only voxels that came back as
    exactly 0 can have been such values, so the raw voxels are read again (streamed) only for float files that
    have zeros.
    """
    dtype = _NIFTI_FLOAT_TYPES.get(header.datatype)
    if dtype is None or not np.any(sitk.GetArrayViewFromImage(image) == 0):
        return
    itemsize = header.bitpix // 8
    remaining = header.n_voxels * itemsize
    bad = 0
    with gzip.open(path, "rb") if header.compressed else open(path, "rb") as f:
        f.seek(header.vox_offset)
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                break
            chunk = chunk[: len(chunk) - len(chunk) % itemsize]
            remaining -= len(chunk)
            values = np.frombuffer(chunk, dtype=header.endian + dtype)
            bad += int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ImageError(
            f"{path} has {bad:,} NaN/Inf voxels (ITK's NIfTI reader would silently read them as 0); replace them "
            "(e.g. with the image's minimum) and save the file again"
        )


def _truncated_message(path: Path, expected: int, actual: int) -> str:
    return (
        f"{path} is truncated: its header promises {expected} bytes (header and voxels) but there are only "
        f"{actual} (an interrupted download or copy?); copy the file again"
    )


# ============================================================================ writing
def write_volume(volume: Volume, path: PathLike) -> None:
    """Write ``volume`` to ``.nii``, ``.nii.gz``, ``.nrrd`` or ``.mha`` (chosen by the extension).

    The write is atomic: a temporary file is written in the target folder (created if missing) and renamed
    over ``path``, so readers never see a partial file and a failed write leaves an existing file untouched.
    The dtype is kept (bool is written as uint8, float16 as float32). NRRD, MetaImage and ``.nii.gz`` are
    compressed.

    Raises:
        ImageError: unsupported extension, an ITK write failure or an OS error (disk full, no permission).
    """
    path = Path(path)
    extension = _write_extension(path, allowed=(".nii.gz", ".nii", ".nrrd", ".mha"), what="a volume")
    image = volume_to_sitk(volume)
    _atomic_write(path, extension, lambda tmp: _write_sitk(image, tmp, compress=extension != ".nii"))


def write_labelmap(volume: Volume, path: PathLike) -> None:
    """Like :func:`write_volume`, for label maps: the voxels must be integers (or bool).

    Raises:
        ImageError: a float (or other non-integer) array, plus everything :func:`write_volume` raises.
    """
    dtype = volume.array.dtype
    if not (dtype == np.bool_ or np.issubdtype(dtype, np.integer)):
        raise ImageError(
            f"a label map needs integer voxels, this one is {dtype}; round and cast it first, e.g. "
            "volume.with_array(np.rint(volume.array).astype(np.uint8))"
        )
    write_volume(volume, path)


def _write_sitk(image: sitk.Image, path: Path, compress: bool) -> None:
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(compress)
    try:
        with _quiet_itk():
            writer.Execute(image)
    except RuntimeError as exc:
        raise ImageError(f"cannot write {path}: {_itk_reason(exc)}") from None


def _atomic_write(path: Path, extension: str, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary name keeps ``extension`` so ITK picks the right writer. Whatever goes wrong, the temporary
    file is removed and an existing ``path`` is left as it was.
    """
    if path.is_dir():
        raise ImageError(f"{path} is a folder; give a file name ending in {extension}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the folder {path.parent}: {exc.strerror or exc}") from None
    try:
        atomic_write(path, write, suffix=extension)
    except OSError as exc:
        raise ImageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_extension(path: Path, allowed: Sequence[str], what: str) -> str:
    extension = _extension(path, _WRITE_EXTENSIONS)
    if extension == ".seg.nrrd" and ".seg.nrrd" not in allowed:
        extension = ".nrrd"
    if extension not in allowed:
        raise ImageError(
            f"cannot write {what} to {path.name}: use one of {', '.join(allowed)} "
            "(two-file formats such as .nhdr/.mhd cannot be written atomically)"
        )
    return extension


def _extension(path: Path, known: Sequence[str] | dict) -> str:
    name = path.name.lower()
    for extension in sorted(known, key=len, reverse=True):
        if name.endswith(extension):
            return extension
    return path.suffix.lower()


# ============================================================================ segmentations
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
    extension = _write_extension(path, allowed=(".seg.nrrd", ".nrrd"), what="a segmentation")
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
    _set_lps_geometry(image, reference.ijk_to_ras)

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
        _write_sitk(image, tmp, compress=True)
        if len(layers) > 1:
            _set_layer_axis_kind_list(tmp)

    _atomic_write(path, extension, write)


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
    image_io = _IMAGE_IO_BY_EXTENSION.get(_extension(path, _IMAGE_IO_BY_EXTENSION))
    if image_io:
        reader.SetImageIO(image_io)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read segmentation {path}: not a readable image, or damaged/truncated ({_itk_reason(exc)})"
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
    ijk_to_ras = _ijk_to_ras_from_sitk(image)

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


# ============================================================================ helpers
def _format_number(value: float) -> str:
    """Shortest text that reads back to the same float, without a trailing ``.0`` (Slicer writes ``0``, ``1``)."""
    value = float(value)
    if value == 0:
        return "0"
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _itk_reason(exc: BaseException) -> str:
    """The useful part of a SimpleITK exception, on one line (no C++ file names or object addresses)."""
    lines = []
    for line in str(exc).splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown in SimpleITK") or re.match(r"^/\S+:\d+:?$", line):
            continue
        line = re.sub(r"^(sitk::|itk::|ITK )?ERROR:\s*", "", line)
        line = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        lines.append(line)
    teem = [line for line in lines if line.startswith("[nrrd]")]
    if teem:  # teem reports a chain of "trouble" lines: the last one says what is wrong
        lines = [teem[-1].removeprefix("[nrrd] ")]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _quiet_itk():
    """Silence ITK's own warnings on stderr (we raise or warn with clearer messages instead)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
