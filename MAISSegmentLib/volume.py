"""The one volume type of MAISSegmentLib: voxels in Slicer's KJI order plus an IJK→RAS matrix.

Coordinate conventions (the same as 3D Slicer's):

- ``array`` is indexed ``array[k, j, i]`` = (slice, row, column), exactly what ``slicer.util.arrayFromVolume``
  returns and what SimpleITK's ``GetArrayFromImage`` returns.
- ``ijk_to_ras`` maps homogeneous voxel indices ``(i, j, k, 1)`` (column, row, slice; voxel centres at integers)
  to RAS millimetres (x to the patient's Right, y Anterior, z Superior). Its upper 3×3 block is
  ``direction @ diag(spacing)``, so it carries the direction cosines (oblique scans) and the spacing.

Point arrays handed to the ``*_points`` helpers are ``(N, 3)`` in (i, j, k) or (R, A, S) order, never KJI.
Files on disk use LPS (DICOM, ITK); ``MAISSegmentLib.io`` converts at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ImageError

__all__ = ["Volume"]

# Smallest accepted ratio of the smallest to the largest singular value of the 3×3 block: below this the
# grid is degenerate (a zero spacing or two parallel axes), and RAS→IJK would amplify rounding into nonsense.
_MIN_CONDITION = 1e-9


@dataclass(eq=False, repr=False)
class Volume:
    """A 3-D scalar image on an oriented voxel grid.

    Args:
        array: voxel values, shape ``(K, J, I)`` = (slices, rows, columns), Slicer's KJI order; any real numeric
            or bool dtype. Kept as given (not copied).
        ijk_to_ras: ``(4, 4)`` matrix mapping homogeneous ``(i, j, k, 1)`` to RAS millimetres, direction cosines
            included. Stored as a float64 copy.

    Raises:
        ImageError: the array is not 3-D (2-D slice, 4-D time series or multi-channel), is empty or not numeric,
            or the matrix is not a finite, invertible affine with last row ``0 0 0 1``.

    Examples:
        >>> vol = Volume.from_geometry(np.zeros((10, 20, 30), np.int16), spacing=(0.5, 0.5, 2.0), origin=(0, 0, 0))
        >>> vol.shape_ijk
        (30, 20, 10)
        >>> vol.ijk_to_ras_points(np.array([[2.0, 0.0, 1.0]]))
        array([[1., 0., 2.]])
    """

    array: np.ndarray  # (K, J, I) voxel values, KJI order
    ijk_to_ras: np.ndarray  # (4, 4) float64, (i, j, k, 1) -> RAS mm

    def __post_init__(self) -> None:
        self.array = _check_array(self.array)
        self.ijk_to_ras = _check_affine(self.ijk_to_ras)

    # ------------------------------------------------------------------ geometry
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k (columns, rows, slices): ``array.shape`` reversed."""
        k, j, i = self.array.shape
        return (int(i), int(j), int(k))

    @property
    def spacing(self) -> np.ndarray:
        """``(3,)`` voxel size in mm along i, j, k (the column norms of the 3×3 block of ``ijk_to_ras``)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """``(3, 3)`` unit columns: the RAS direction of the i, j and k axes (identity for an axial RAS grid)."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """``(3,)`` RAS position (mm) of the centre of voxel ``(i, j, k) = (0, 0, 0)``."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def ras_to_ijk(self) -> np.ndarray:
        """``(4, 4)`` inverse of ``ijk_to_ras``: RAS mm to continuous (i, j, k)."""
        return np.linalg.inv(self.ijk_to_ras)

    # ------------------------------------------------------------------ points
    def ijk_to_ras_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` continuous (i, j, k) indices to ``(N, 3)`` RAS mm (a single ``(3,)`` point works too)."""
        return _apply_affine(self.ijk_to_ras, points)

    def ras_to_ijk_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` RAS mm to ``(N, 3)`` continuous (i, j, k) indices (not rounded; a ``(3,)`` point works)."""
        return _apply_affine(self.ras_to_ijk, points)

    def contains_ijk(self, points: np.ndarray) -> np.ndarray | bool:
        """Whether continuous (i, j, k) points fall inside the image.

        A point is inside when its nearest voxel exists: ``-0.5 <= i < I - 0.5`` (same for j, k), i.e. it lies
        within the voxels' outer boundary.

        Args:
            points: ``(N, 3)`` or ``(3,)`` (i, j, k) indices.

        Returns:
            ``(N,)`` bool array, or a bool for a single ``(3,)`` point.
        """
        p = np.asarray(points, dtype=np.float64)
        if p.shape[-1:] != (3,):
            raise ValueError(f"points must have shape (N, 3) or (3,) in (i, j, k) order, got {p.shape}")
        size = np.asarray(self.shape_ijk, dtype=np.float64)
        inside = np.all((p >= -0.5) & (p < size - 0.5), axis=-1)
        return bool(inside) if p.ndim == 1 else inside

    # ------------------------------------------------------------------ construction
    def with_array(self, array: np.ndarray) -> Volume:
        """A new volume on the same grid holding ``array`` (same KJI shape required; the matrix is copied)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ImageError(
                f"array shape {array.shape} does not match this volume's grid {self.array.shape} (K, J, I); "
                "resample it onto the grid first"
            )
        return Volume(array, self.ijk_to_ras.copy())

    @classmethod
    def from_geometry(
        cls,
        array: np.ndarray,
        spacing: tuple[float, float, float] | np.ndarray,
        origin: tuple[float, float, float] | np.ndarray,
        direction: np.ndarray | None = None,
    ) -> Volume:
        """Build a volume from spacing, origin and direction cosines.

        Args:
            array: ``(K, J, I)`` voxel values.
            spacing: ``(3,)`` voxel size in mm along i, j, k; all > 0.
            origin: ``(3,)`` RAS mm of voxel (0, 0, 0).
            direction: ``(3, 3)`` whose columns are the RAS directions of i, j, k (normalised here); identity
                (axial, i→R, j→A, k→S) when omitted.
        """
        spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
        origin = np.asarray(origin, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ImageError(f"spacing must be three positive numbers (mm along i, j, k), got {spacing.tolist()}")
        if origin.shape != (3,):
            raise ImageError(f"origin must be three numbers (RAS mm of voxel 0,0,0), got shape {origin.shape}")
        if direction is None:
            direction = np.eye(3)
        direction = np.asarray(direction, dtype=np.float64)
        if direction.shape != (3, 3):
            raise ImageError(
                f"direction must be a 3x3 matrix (columns = RAS direction of i, j, k), got {direction.shape}"
            )
        norms = np.linalg.norm(direction, axis=0)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ImageError("direction has a zero or non-finite column; each column must be a direction vector")
        affine = np.eye(4)
        affine[:3, :3] = (direction / norms) * spacing
        affine[:3, 3] = origin
        return cls(array, affine)

    def __repr__(self) -> str:
        with np.printoptions(precision=4, suppress=True):
            return (
                f"Volume(shape_kji={self.array.shape}, dtype={self.array.dtype}, spacing={self.spacing}, "
                f"origin={self.origin})"
            )


def _check_array(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        raise ImageError(
            f"image is 2-D (shape {array.shape}); a Volume needs a 3-D array in (K, J, I) order. "
            "For a single slice add an axis (array[np.newaxis]); for DICOM, load the whole series folder"
        )
    if array.ndim == 4:
        raise ImageError(
            f"image is 4-D (shape {array.shape}): several frames or channels; a Volume needs a single 3-D scalar "
            "volume, so pick one frame/channel first (e.g. array[0] or array[..., 0])"
        )
    if array.ndim != 3:
        raise ImageError(
            f"image has {array.ndim} dimensions (shape {array.shape}); a Volume needs a 3-D (K, J, I) array"
        )
    if 0 in array.shape:
        raise ImageError(f"image is empty (shape {array.shape}); every axis needs at least one voxel")
    if not (
        array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ImageError(f"image has dtype {array.dtype}; a Volume needs real numbers (integer, float or bool)")
    return array


def _check_affine(matrix: np.ndarray) -> np.ndarray:
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"ijk_to_ras must be a 4x4 numeric matrix: {exc}") from None
    if m.shape != (4, 4):
        raise ImageError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ImageError("ijk_to_ras contains NaN or infinite values; the image header is broken")
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
        raise ImageError(f"ijk_to_ras last row must be 0 0 0 1 (an affine map), got {m[3].tolist()}")
    m[3] = [0.0, 0.0, 0.0, 1.0]
    sv = np.linalg.svd(m[:3, :3], compute_uv=False)
    if sv[0] == 0 or sv[-1] / sv[0] < _MIN_CONDITION:
        raise ImageError(
            "ijk_to_ras is not invertible (a zero spacing or two parallel axes); the image header is broken"
        )
    return m


def _apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.shape[-1:] != (3,):
        raise ValueError(f"points must have shape (N, 3) or (3,), got {p.shape}")
    return p @ matrix[:3, :3].T + matrix[:3, 3]


def as_point3(value: object, error: type[Exception], what: str = "a click") -> np.ndarray:
    """``value`` as a finite ``(3,)`` float64 point, else ``error`` with a message naming ``what``."""
    try:
        point = np.asarray(value, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise error(f"{what} needs 3 coordinates, got {value!r}") from None
    if not np.all(np.isfinite(point)):
        raise error(f"{what} coordinates must be finite numbers, got {point.tolist()}")
    return point
