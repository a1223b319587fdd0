"""ROI geometry: the model's 128^3 RAS-aligned window at 1.5 mm, and resampling into it and back.

Conventions
-----------
* A ROI voxel index ``a = (a0, a1, a2)`` runs along **R, A, S** (tensor dims 2, 3, 4 of the model
  input), and its centre is at ``RAS = center + spacing * (a - size / 2)``: the voxel ``(64, 64, 64)``
  sits exactly on ``center`` (the first click). SAM-Med3D's click coordinates are these indices.
* Image arrays are KJI (``Volume.array``); boxes on the image grid are :class:`Box` in IJK with
  exclusive upper bounds; ``Box.slices`` indexes a KJI array.

Into the ROI (:func:`sample_roi`): trilinear resampling of the image at the ROI voxel centres (zero
outside the image), then SAM-Med3D's z-normalisation (mean/std of ROI voxels > 0). This is the
reference's "resample to 1.5 mm, reorient to RAS+, crop/pad to 128^3" done in one step, so any
orientation (oblique, LPS/RAS, permuted/flipped axes) and any spacing is handled by the affine alone.

Back onto the image (:func:`roi_logits_on_grid`): the reference upsamples the 32^3 logits trilinearly to
128^3 (``align_corners=False``) and resamples nearest back onto the original grid. We evaluate the same
trilinear upsampling at each original voxel centre's *continuous* ROI position ``a``, i.e. sample the
low-res logits at ``(a + 0.5) / 4 - 0.5`` (edge-clamped; ``grid_sample(align_corners=False,
padding_mode="border")`` at ``(2 a + 1) / 128 - 1``). At ROI voxel centres this equals the reference's
128^3 logits exactly; in between it avoids the 1.5 mm staircase of nearest resampling, which on oblique
or finer grids would make the mask depend on how the image is stored. Only the voxels of a requested
box are computed (the changed region).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .volume import Volume

MAX_CHUNK_VOXELS = 2_000_000  # voxels resampled per chunk when mapping logits back (bounds memory)


@dataclass(frozen=True)
class Box:
    """Axis-aligned box of image voxels in IJK: ``lo`` inclusive, ``hi`` exclusive (both ``(i, j, k)``)."""

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]

    @property
    def empty(self) -> bool:
        return any(h <= lo for lo, h in zip(self.lo, self.hi))

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(max(0, self.hi[d] - self.lo[d]) for d in (2, 1, 0))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index for a KJI array."""
        return tuple(slice(self.lo[d], self.hi[d]) for d in (2, 1, 0))

    def union(self, other: Box | None) -> Box:
        if other is None or other.empty:
            return self
        if self.empty:
            return other
        return Box(
            tuple(min(a, b) for a, b in zip(self.lo, other.lo)), tuple(max(a, b) for a, b in zip(self.hi, other.hi))
        )

    def intersect(self, other: Box) -> Box:
        return Box(
            tuple(max(a, b) for a, b in zip(self.lo, other.lo)), tuple(min(a, b) for a, b in zip(self.hi, other.hi))
        )

    @staticmethod
    def nothing() -> Box:
        return Box((0, 0, 0), (0, 0, 0))

    def to_json(self) -> dict[str, list[int]]:
        return {"lo_ijk": list(self.lo), "hi_ijk": list(self.hi)}


def image_box(volume: Volume) -> Box:
    """The whole image as a box."""
    return Box((0, 0, 0), tuple(int(n) for n in volume.shape_ijk))


def box_around_ijk(points_ijk: np.ndarray, volume: Volume, pad: int = 1) -> Box:
    """Smallest box containing continuous IJK points (``(N, 3)``), padded by ``pad`` voxels, clipped to the image."""
    lo = np.floor(points_ijk.min(0)).astype(int) - pad
    hi = np.ceil(points_ijk.max(0)).astype(int) + 1 + pad
    return Box(tuple(int(x) for x in lo), tuple(int(x) for x in hi)).intersect(image_box(volume))


@dataclass(frozen=True)
class Roi:
    """A cubic RAS-aligned window of ``size``^3 voxels of ``spacing`` mm centred at ``center`` (RAS mm)."""

    center: tuple[float, float, float]
    size: int = 128
    spacing: float = 1.5

    def roi_to_ras(self, a: np.ndarray) -> np.ndarray:
        """ROI voxel indices ``(..., 3)`` (R, A, S order) -> RAS mm ``(..., 3)``."""
        return np.asarray(self.center) + self.spacing * (np.asarray(a, dtype=np.float64) - self.size / 2)

    def ras_to_roi(self, ras: np.ndarray) -> np.ndarray:
        """RAS mm ``(..., 3)`` -> continuous ROI voxel indices ``(..., 3)``."""
        return (np.asarray(ras, dtype=np.float64) - np.asarray(self.center)) / self.spacing + self.size / 2

    def contains(self, ras: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether RAS points lie inside the ROI, at least ``margin`` ROI voxels from its faces."""
        a = self.ras_to_roi(ras)
        return np.all((a >= -0.5 + margin) & (a <= self.size - 0.5 - margin), axis=-1)

    def corners_ras(self, lo: float = -0.5, hi: float | None = None) -> np.ndarray:
        """The 8 corners ``(8, 3)`` RAS of the index cube ``[lo, hi]^3`` (default: the whole ROI)."""
        hi = self.size - 0.5 if hi is None else hi
        c = np.array([[x, y, z] for x in (lo, hi) for y in (lo, hi) for z in (lo, hi)], dtype=np.float64)
        return self.roi_to_ras(c)

    def box_on(self, volume: Volume, lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> Box:
        """Image box covering the ROI index range ``[lo, hi]`` (per axis; default: the whole ROI)."""
        lo = np.full(3, -0.5) if lo is None else np.asarray(lo, dtype=np.float64)
        hi = np.full(3, self.size - 0.5) if hi is None else np.asarray(hi, dtype=np.float64)
        a = np.array([[x[0], y[1], z[2]] for x in (lo, hi) for y in (lo, hi) for z in (lo, hi)])
        return box_around_ijk(volume.ras_to_ijk_points(self.roi_to_ras(a)), volume)

    def voxel_to_roi_affine(self, volume: Volume) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` with ``a = A @ (i, j, k) + b``: image voxel index -> continuous ROI index."""
        m = volume.ijk_to_ras
        return m[:3, :3] / self.spacing, (m[:3, 3] - np.asarray(self.center)) / self.spacing + self.size / 2


def normalise_roi(x: torch.Tensor) -> torch.Tensor:
    """SAM-Med3D's z-normalisation: mean/std of voxels > 0 (all voxels if fewer than 1% are > 0)."""
    fg = x > 0
    vals = x[fg] if fg.sum() >= 0.01 * x.numel() else x.flatten()
    mean, std = vals.mean(), vals.std()
    return (x - mean) / torch.clamp(std, min=1e-6)


def resample_to_ras_grid(
    volume: Volume,
    origin_ras: np.ndarray,
    shape: tuple[int, int, int],
    spacing: float,
    mode: str = "bilinear",
    array: np.ndarray | None = None,
) -> torch.Tensor:
    """Resample an image onto a RAS-aligned grid (zero outside the image).

    Args:
        volume: the image (its geometry; its voxels unless ``array`` is given).
        origin_ras: RAS mm of grid voxel ``(0, 0, 0)``.
        shape: grid size along (R, A, S).
        spacing: grid spacing in mm.
        mode: ``"bilinear"`` (trilinear, images) or ``"nearest"`` (label maps).
        array: voxels to resample instead of ``volume.array`` (same KJI shape, e.g. a label map).

    Returns:
        ``(1, 1, nR, nA, nS)`` float32 tensor in (R, A, S) order.
    """
    data = volume.array if array is None else array
    hi_ras = np.asarray(origin_ras, dtype=np.float64) + spacing * (np.asarray(shape) - 1)
    corners = np.array(
        [
            [x, y, z]
            for x in (origin_ras[0], hi_ras[0])
            for y in (origin_ras[1], hi_ras[1])
            for z in (origin_ras[2], hi_ras[2])
        ]
    )
    box = box_around_ijk(volume.ras_to_ijk_points(corners), volume)
    if box.empty:
        return torch.zeros(1, 1, *shape)
    block = torch.from_numpy(np.ascontiguousarray(data[box.slices], dtype=np.float32))[None, None]
    inv = volume.ras_to_ijk
    axes = [origin_ras[d] + spacing * torch.arange(shape[d], dtype=torch.float64) for d in range(3)]
    rot = torch.from_numpy(inv[:3, :3])
    off = torch.from_numpy(inv[:3, 3]) - torch.tensor(box.lo, dtype=torch.float64)
    ijk = (
        rot[:, 0].view(1, 1, 1, 3) * axes[0].view(-1, 1, 1, 1)
        + rot[:, 1].view(1, 1, 1, 3) * axes[1].view(1, -1, 1, 1)
        + rot[:, 2].view(1, 1, 1, 3) * axes[2].view(1, 1, -1, 1)
        + off
    )  # (nR, nA, nS, 3) continuous (i, j, k) inside the block
    extent = torch.tensor(block.shape[2:][::-1], dtype=torch.float64)  # (I, J, K) of the block
    grid = torch.where(extent > 1, 2 * ijk / (extent - 1).clamp(min=1) - 1, torch.zeros_like(ijk))
    return F.grid_sample(block, grid.float()[None], mode=mode, padding_mode="zeros", align_corners=True)


def sample_roi(volume: Volume, roi: Roi) -> torch.Tensor:
    """Resample the image into the ROI and normalise it.

    Returns:
        ``(1, 1, size, size, size)`` float32 in ROI order (R, A, S), z-normalised.
    """
    origin = roi.roi_to_ras(np.zeros(3))
    return normalise_roi(resample_to_ras_grid(volume, origin, (roi.size,) * 3, roi.spacing))


def roi_logits_on_grid(
    logits: torch.Tensor, roi: Roi, volume: Volume, box: Box, blend_margin: float = 16.0
) -> tuple[np.ndarray, np.ndarray]:
    """The ROI's logits at the centres of the image voxels in ``box``, as the reference computes them.

    Args:
        logits: ``(1, 1, s, s, s)`` low-res logits (s = 32) in ROI order.
        roi: the ROI they belong to.
        volume: the image (for its geometry).
        box: image voxels to compute.
        blend_margin: ROI voxels over which the weight falls to the ROI faces (for cross-fading
            overlapping ROIs; a voxel covered by one ROI only is unaffected).

    Returns:
        ``(values, weights)``: float32 logits and blending weights (0 outside the ROI, 1 deeper than
        ``blend_margin`` inside), both ``box.shape_kji``.
    """
    kk, jj, ii = box.shape_kji
    if box.empty:
        return np.zeros((kk, jj, ii), dtype=np.float32), np.zeros((kk, jj, ii), dtype=np.float32)
    a_mat, b_vec = roi.voxel_to_roi_affine(volume)
    perm = _axis_permutation(a_mat)
    if perm is not None:
        return _separable_logits(logits, roi, a_mat, b_vec, perm, box, blend_margin)
    values = np.zeros((kk, jj, ii), dtype=np.float32)
    weights = np.zeros((kk, jj, ii), dtype=np.float32)
    i = torch.arange(box.lo[0], box.hi[0], dtype=torch.float64)
    j = torch.arange(box.lo[1], box.hi[1], dtype=torch.float64)
    am, bv = torch.from_numpy(a_mat), torch.from_numpy(b_vec)
    low = logits.detach().float().cpu()
    for sl in _slabs(box, MAX_CHUNK_VOXELS):
        k = torch.arange(box.lo[2] + sl.start, box.lo[2] + sl.stop, dtype=torch.float64)
        a = (
            am[:, 2].view(1, 1, 1, 3) * k.view(-1, 1, 1, 1)
            + am[:, 1].view(1, 1, 1, 3) * j.view(1, -1, 1, 1)
            + am[:, 0].view(1, 1, 1, 3) * i.view(1, 1, -1, 1)
            + bv
        )  # (k, j, i, 3) continuous ROI index (R, A, S)
        depth = torch.minimum(a + 0.5, roi.size - 0.5 - a)  # distance (ROI voxels) to the nearest face
        w = torch.clamp(depth / blend_margin, 0, 1).prod(-1)  # 0 outside the ROI
        norm = (2 * a + 1) / roi.size - 1  # align_corners=False coordinate of position a in any grid
        grid = norm.flip(-1).float()[None]  # grid_sample wants (x, y, z) = (dim4, dim3, dim2)
        v = F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
        values[sl] = v.numpy()
        weights[sl] = w.numpy()
    return values, weights


def _axis_permutation(a_mat: np.ndarray, tol: float = 1e-9) -> list[int] | None:
    """For an axis-aligned image (each IJK axis along one RAS axis, in any order and sign), the ROI
    axis of each image axis ``[r(i), r(j), r(k)]``; None for an oblique image."""
    nz = np.abs(a_mat) > tol * np.abs(a_mat).max()
    if not (nz.sum(0) == 1).all() or not (nz.sum(1) == 1).all():
        return None
    return [int(np.argmax(nz[:, d])) for d in range(3)]


def _interp_taps(a: torch.Tensor, n_low: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-D linear interpolation of a low-res grid at ROI positions ``a``: ``(i0, i1, f)`` with value
    ``(1 - f) * v[i0] + f * v[i1]``.

    Same arithmetic as ``grid_sample(align_corners=False, padding_mode="border")``: position ``a`` of the
    ``size`` grid is ``u = (a + 0.5) * n_low / size - 0.5`` in the low-res grid, clamped to its range.
    """
    u = ((a + 0.5) * n_low / size - 0.5).clamp(0, n_low - 1)
    i0 = u.floor().long().clamp(max=n_low - 1)
    i1 = (i0 + 1).clamp(max=n_low - 1)
    return i0, i1, (u - i0).float()


_MATMUL_MAX_LOW = 48  # logits grids up to this edge are interpolated by matrix products, finer ones by gathers


def _taps_matrix(taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor], n_low: int) -> torch.Tensor:
    """The taps of :func:`_interp_taps` as rows of a ``(len(a), n_low)`` matrix (two non-zeros per row)."""
    i0, i1, f = taps
    w = torch.zeros(len(i0), n_low)
    w.scatter_add_(1, i0[:, None], (1 - f)[:, None])
    w.scatter_add_(1, i1[:, None], f[:, None])
    return w


def _interp_axis(t: torch.Tensor, axis: int, taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``axis`` at the positions of :func:`_interp_taps` (two gathers)."""
    i0, i1, f = taps
    shape = [1] * t.dim()
    shape[axis] = -1
    f = f.view(shape)
    return torch.lerp(t.index_select(axis, i0), t.index_select(axis, i1), f)


_SLAB_VOXELS = 2**20  # output voxels per slab of the separable interpolation (cache-sized: ~4x faster than one pass)


def _separable_setup(
    logits: torch.Tensor, roi: Roi, a_mat: np.ndarray, b_vec: np.ndarray, perm: list[int], box: Box, margin: float
) -> tuple[torch.Tensor, list, list[torch.Tensor]]:
    """What :func:`_separable_slab` needs: the logits with ROI axes in output order (k, j, i), the 1-D taps (or
    matrices, for grids up to ``_MATMUL_MAX_LOW``) of each output axis, and the 1-D blending weights of each axis."""
    low = logits.detach().float().cpu()[0, 0]  # (R, A, S)
    n_low = low.shape[0]
    taps, wts = [], []
    for d in (2, 1, 0):  # output axes k, j, i
        r = perm[d]
        idx = torch.arange(box.lo[d], box.hi[d], dtype=torch.float64)
        a = a_mat[r, d] * idx + b_vec[r]  # ROI position along ROI axis r
        tp = _interp_taps(a, n_low, roi.size)
        taps.append(_taps_matrix(tp, n_low) if n_low <= _MATMUL_MAX_LOW else tp)
        wts.append(torch.clamp(torch.minimum(a + 0.5, roi.size - 0.5 - a) / margin, 0, 1).float())
    t = low.permute(perm[2], perm[1], perm[0]).contiguous()  # ROI axes in output order (k, j, i)
    return t, taps, wts


def _separable_slab(t: torch.Tensor, taps: list, rows: slice) -> torch.Tensor:
    """Interpolated logits of output rows ``rows`` (first axis) of the box: ``(len(rows), J, I)``."""
    if isinstance(taps[0], torch.Tensor):  # matrices
        s = torch.tensordot(taps[0][rows], t, dims=([1], [0]))  # (k, n, n)
        s = torch.matmul(taps[1], s)  # (k, J, n)
        return torch.matmul(s, taps[2].T)  # (k, J, I)
    s = _interp_axis(t, 0, tuple(x[rows] for x in taps[0]))  # (k, n, n)
    s = _interp_axis(s, 1, taps[1])  # (k, J, n)
    return _interp_axis(s, 2, taps[2])  # (k, J, I)


def _slabs(box: Box, voxels: int = _SLAB_VOXELS) -> list[slice]:
    """The box's first axis (k) cut into slabs of about ``voxels`` output voxels."""
    kk, jj, ii = box.shape_kji
    rows = max(1, voxels // max(1, jj * ii))
    return [slice(k0, min(kk, k0 + rows)) for k0 in range(0, kk, rows)]


def _separable_logits(
    logits: torch.Tensor, roi: Roi, a_mat: np.ndarray, b_vec: np.ndarray, perm: list[int], box: Box, margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`roi_logits_on_grid` for axis-aligned images: trilinear interpolation is separable, so the
    box is filled by three 1-D interpolations instead of per-voxel sampling (~50x faster). For the 32^3 logits these
    are small matrix products; for finer logits (128^3, the full-resolution head) whose matrices would cost ~128
    multiply-adds per output voxel, two gathers per axis. Both run slab by slab (``_SLAB_VOXELS`` output voxels), which
    keeps the intermediate arrays in cache: 4x faster than whole-box passes for a 12 M-voxel box.
    """
    t, taps, wts = _separable_setup(logits, roi, a_mat, b_vec, perm, box, margin)
    values = torch.empty(box.shape_kji)
    for rows in _slabs(box):
        values[rows] = _separable_slab(t, taps, rows)
    w = wts[0][:, None, None] * wts[1][None, :, None] * wts[2][None, None, :]
    return values.numpy(), w.numpy()


def roi_mask_on_grid(logits: torch.Tensor, roi: Roi, volume: Volume, box: Box) -> np.ndarray:
    """The mask one ROI gives the image voxels in ``box`` on its own: inside the ROI and logit > 0 (bool,
    ``box.shape_kji``). The same voxels as thresholding :func:`roi_logits_on_grid`, without materialising the float
    logits and weights: for axis-aligned images each slab is thresholded as soon as it is interpolated."""
    if box.empty:
        return np.zeros(box.shape_kji, dtype=bool)
    a_mat, b_vec = roi.voxel_to_roi_affine(volume)
    perm = _axis_permutation(a_mat)
    if perm is None:
        values, weights = roi_logits_on_grid(logits, roi, volume, box)
        return (values > 0) & (weights > 0)
    t, taps, wts = _separable_setup(logits, roi, a_mat, b_vec, perm, box, 1.0)
    inside_ji = (wts[1] > 0)[:, None] & (wts[2] > 0)[None, :]
    inside_k = wts[0] > 0
    mask = torch.empty(box.shape_kji, dtype=torch.bool)
    for rows in _slabs(box):
        torch.gt(_separable_slab(t, taps, rows), 0, out=mask[rows])
        mask[rows] &= inside_k[rows, None, None] & inside_ji
    return mask.numpy()


def positive_roi_range(logits: torch.Tensor, roi: Roi) -> tuple[np.ndarray, np.ndarray] | None:
    """ROI index range ``(lo, hi)`` (per axis, continuous) that can hold positive voxels, or None.

    Derived from the voxels of the logits' grid (32^3 low-res or 128^3 full-resolution) with logit > 0, dilated by
    one voxel of that grid (trilinear interpolation reaches that far).
    """
    pos = (logits[0, 0] > 0).nonzero()
    if pos.numel() == 0:
        return None
    scale = roi.size / logits.shape[-1]
    lo = (pos.min(0).values.cpu().numpy() - 1) * scale - 0.5
    hi = (pos.max(0).values.cpu().numpy() + 2) * scale - 0.5
    return np.clip(lo, -0.5, roi.size - 0.5), np.clip(hi, -0.5, roi.size - 0.5)
