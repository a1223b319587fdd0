"""Read and write image volumes (NIfTI, NRRD, MetaImage, DICOM series) with SimpleITK.

Everything in memory is a :class:`~MAISSegmentLib.volume.Volume` (array in KJI order, ``ijk_to_ras`` 4×4).
Files and ITK use LPS (x to the patient's Left, y Posterior); RAS and LPS differ by the sign of x and y, so the
conversion at this boundary flips the first two rows of the affine (``diag(-1, -1, 1, 1) @ ijk_to_lps``).
SimpleITK's ``GetArrayFromImage`` already returns (k, j, i) arrays, so voxel data needs no transposing.

Formats:

- read: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``), any other
  single file ITK can read, and a folder holding a DICOM series. NIfTI files are also checked where ITK's reader
  hides a problem (:mod:`MAISSegmentLib.nifti_checks`: NaN/Inf voxels, zero voxel size, truncation).
- write: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha`` (single-file formats, so the write can be atomic: a temporary
  file in the same folder is renamed over the target, and a failed write leaves any existing file untouched).
- segmentations (``.seg.nrrd``) are :mod:`MAISSegmentLib.seg_nrrd`'s; it shares the geometry conversion and the
  atomic write below (:func:`set_lps_geometry`, :func:`ijk_to_ras_from_sitk`, :func:`atomic_write_image`, ...).

Every failure is an :class:`~MAISSegmentLib.errors.ImageError` with a one-line message saying what is wrong and
what to do.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError
from .fileutil import atomic_write
from .nifti_checks import check_nifti_complete, check_nifti_finite, check_nifti_spacing, read_nifti_header
from .sysinfo import check_fits_in_memory
from .volume import Volume

__all__ = [
    "read_geometry",
    "read_volume",
    "resample_label_map",
    "volume_from_sitk",
    "volume_to_sitk",
    "write_labelmap",
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
        raise ImageError(f"cannot hand a {array.dtype} array to ITK ({itk_reason(exc)}); cast it first") from None
    set_lps_geometry(image, volume.ijk_to_ras)
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
    return Volume(array, ijk_to_ras_from_sitk(image))


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
    set_lps_geometry(grid, reference.ijk_to_ras)
    moving = volume_to_sitk(label)
    out = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out).astype(label.array.dtype, copy=False)


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK->RAS matrix of an ITK image or reader (LPS origin, spacing and direction)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.asarray(image.GetSpacing()[:3], dtype=np.float64)
    ijk_to_lps[:3, 3] = image.GetOrigin()[:3]
    return _RAS_LPS @ ijk_to_lps


def set_lps_geometry(image: sitk.Image, ijk_to_ras: np.ndarray) -> None:
    """Set an ITK image's origin, spacing and direction (LPS) from a 4x4 IJK->RAS matrix."""
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
    if image_io == "NiftiImageIO" and (header := read_nifti_header(path)) is not None:
        check_nifti_spacing(path, header)
    size_i, size_j, size_k = reader.GetSize()[:3]
    return Volume(np.broadcast_to(np.uint8(0), (size_k, size_j, size_i)), ijk_to_ras_from_sitk(reader))


def _read_image_information(path: Path) -> tuple[sitk.ImageFileReader, str | None]:
    """A reader of ``path`` with its header read and checked (3-D scalar); ``(reader, ITK ImageIO name or None)``."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image_io = image_io_for(path)
    if image_io:
        # Name the reader so a damaged file fails in the right one (and ITK does not probe every format).
        reader.SetImageIO(image_io)
    kind = f"{_FORMAT_NAMES[image_io]} " if image_io else ""
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read {path}: not a readable {kind}image ({itk_reason(exc)}); {_unreadable_hint(path, image_io)}"
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
    header = read_nifti_header(path) if image_io == "NiftiImageIO" else None
    if header is not None:
        # ITK silently turns a zero spacing into 1 mm and fills a file that ends early with zeros: catch both here.
        check_nifti_spacing(path, header)
        check_nifti_complete(path, header)
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
        with quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read the voxels of {path}: the file is damaged or truncated ({itk_reason(exc)}); copy it again"
        ) from None
    if header is not None:
        check_nifti_finite(path, header, image)
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
    with quiet_itk():
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
        with quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise ImageError(
            f"cannot read DICOM series {chosen} in {folder}: {itk_reason(exc)}; check the files are complete"
        ) from None


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
    extension = output_extension(path, allowed=(".nii.gz", ".nii", ".nrrd", ".mha"), what="a volume")
    image = volume_to_sitk(volume)
    atomic_write_image(path, extension, lambda tmp: write_sitk(image, tmp, compress=extension != ".nii"))


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


def write_sitk(image: sitk.Image, path: Path, compress: bool) -> None:
    """Write ``image`` to ``path`` with ITK (not atomic: wrap it in :func:`atomic_write_image`)."""
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(compress)
    try:
        with quiet_itk():
            writer.Execute(image)
    except RuntimeError as exc:
        raise ImageError(f"cannot write {path}: {itk_reason(exc)}") from None


def atomic_write_image(path: Path, extension: str, write: Callable[[Path], None]) -> None:
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


def output_extension(path: Path, allowed: Sequence[str], what: str) -> str:
    """The extension of ``path`` among ``allowed`` (``.seg.nrrd`` counts as ``.nrrd`` when only that is allowed).

    Raises:
        ImageError: any other extension, naming ``what`` is being written.
    """
    extension = _extension(path, _WRITE_EXTENSIONS)
    if extension == ".seg.nrrd" and ".seg.nrrd" not in allowed:
        extension = ".nrrd"
    if extension not in allowed:
        raise ImageError(
            f"cannot write {what} to {path.name}: use one of {', '.join(allowed)} "
            "(two-file formats such as .nhdr/.mhd cannot be written atomically)"
        )
    return extension


def image_io_for(path: Path) -> str | None:
    """The ITK ImageIO that reads ``path`` by its extension (``"NiftiImageIO"``, ...), or None to let ITK probe."""
    return _IMAGE_IO_BY_EXTENSION.get(_extension(path, _IMAGE_IO_BY_EXTENSION))


def _extension(path: Path, known: Sequence[str] | dict) -> str:
    name = path.name.lower()
    for extension in sorted(known, key=len, reverse=True):
        if name.endswith(extension):
            return extension
    return path.suffix.lower()


# ============================================================================ helpers
def itk_reason(exc: BaseException) -> str:
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
def quiet_itk():
    """Silence ITK's own warnings on stderr (we raise or warn with clearer messages instead)."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
