"""Checks on a NIfTI file's raw header and voxels that ITK's reader hides.

ITK reads three kinds of broken NIfTI files without a word, so :mod:`MAISSegmentLib.io` runs these checks on the
file itself before (or right after) handing it to ITK:

- a zero, negative or non-numeric voxel size (``pixdim``) silently becomes 1 mm: :func:`check_nifti_spacing`;
- a file that ends before its last voxel is filled with zeros: :func:`check_nifti_complete`;
- NaN/Inf voxels of float data are replaced by 0: :func:`check_nifti_finite`.

Only single-file NIfTI-1/2 (``.nii``, ``.nii.gz``) headers are read (:func:`read_nifti_header`); anything else is
left to ITK. Every failure is an :class:`~MAISSegmentLib.errors.ImageError` saying what is wrong and what to do.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

__all__ = ["NiftiHeader", "check_nifti_complete", "check_nifti_finite", "check_nifti_spacing", "read_nifti_header"]


@dataclass(frozen=True)
class NiftiHeader:
    """The fields of a single-file NIfTI-1/2 header that ITK does not let us check (read by :func:`read_nifti_header`).

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


def read_nifti_header(path: Path) -> NiftiHeader | None:
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
    return NiftiHeader(
        compressed,
        endian,
        tuple(int(d) for d in dims[1 : ndim + 1]),
        int(datatype),
        int(bitpix),
        tuple(float(p) for p in pixdim[1 : ndim + 1]),
        int(vox_offset),
    )


def check_nifti_spacing(path: Path, header: NiftiHeader) -> None:
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


def check_nifti_complete(path: Path, header: NiftiHeader) -> None:
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


def check_nifti_finite(path: Path, header: NiftiHeader, image: sitk.Image) -> None:
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
