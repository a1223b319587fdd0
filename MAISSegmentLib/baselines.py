"""Peer methods scored beside the model: Slicer's own "Grow from seeds" (``growcut``).

``growcut_segment`` runs the real ``vtkImageGrowCutSegment`` filter that Slicer's Segment Editor effect "Grow from
seeds" runs, seeded with the robot user's clicks as ``docs/EVALUATION.md`` prescribes:

- each click paints a small sphere (``seed_radius_mm``): include → foreground seed label, exclude → background;
- the border of the region is a background seed until the user has given an exclude click (without any
  background seed, grow-cut would label the whole region foreground);
- everything happens inside ``region``, the same box the model sees, so the comparison is fair and fast; outside
  it the result is False.

The filter comes from the ``slicer-core`` wheel (a test/evaluation dependency, never imported at module import:
inside the Slicer application its ``slicer`` package would shadow the real one). Inside Slicer the same class is
found in ``vtkSlicerSegmentationsModuleLogicPython``.

How the filter behaves (from its C++ source, ``Modules/Loadable/Segmentations/Logic/vtkImageGrowCutSegment.cxx``):
label 0 is "unlabelled", any other value is a label grown by a shortest-path (Dijkstra) competition where a step
between 26-neighbours costs the absolute intensity difference (plus ``distance_penalty`` × step length in mm,
Slicer's "Seed locality", 0 by default). Voxels on the outermost layer of the image it is given never propagate
labels, so the region is padded by one voxel here, letting the seeds on the region's border grow inwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .clicks import RobotClick
from .errors import ConfigError, ImageError, MAISError, PromptError

__all__ = ["GrowCutUnavailableError", "growcut_segment"]

_FOREGROUND = 1  # seed / result label of the target
_BACKGROUND = 2  # seed / result label of everything else


class GrowCutUnavailableError(MAISError, ImportError):
    """The growcut baseline needs Slicer's grow-cut filter, which is not importable here."""


def growcut_segment(
    image: np.ndarray,
    clicks: Sequence[RobotClick],
    spacing_ijk: Sequence[float],
    region: tuple[slice, slice, slice] | None = None,
    seed_radius_mm: float = 3.0,
    distance_penalty: float = 0.0,
) -> np.ndarray:
    """Segment one target with Slicer's Grow from seeds, seeded by clicks.

    Args:
        image: ``(K, J, I)`` intensities (KJI order), any real dtype; used as float32.
        clicks: the clicks so far, in order (KJI voxel indices on ``image``'s grid). Later clicks overwrite
            earlier ones where their spheres overlap. Clicks outside ``region`` only seed the part of their sphere
            that lies inside it. The region's border is a background seed while no exclude sphere reaches into
            the region. No click: an all-False result.
        spacing_ijk: voxel size in mm along ``(i, j, k)``: sphere radii and the distance penalty are in mm.
        region: ``(k, j, i)`` slices of the box to segment (e.g. ``Box.slices``), steps of 1; ``None`` = the
            whole image. Negative or out-of-range bounds are clipped like numpy slicing.
        seed_radius_mm: radius of the seed sphere painted at each click, in mm. The clicked voxel is always
            seeded, even when the radius is smaller than a voxel.
        distance_penalty: Slicer's "Seed locality" (intensity units per mm added to each step), 0 = Slicer's
            default.

    Returns:
        ``(K, J, I)`` bool mask, True where grow-cut labels the target; False everywhere outside ``region``.

    Raises:
        GrowCutUnavailableError: slicer-core is not installed (``pip install slicer-core``).
        ImageError: ``image`` is not a non-empty 3-D real array.
        PromptError: a click outside the image, or a malformed region.
        ConfigError: bad spacing, radius or penalty.
        MAISError: the filter failed.
    """
    image = _check_image(image)
    spacing = _check_spacing(spacing_ijk)
    if not (np.isfinite(seed_radius_mm) and seed_radius_mm >= 0):
        raise ConfigError(f"seed_radius_mm must be a finite number >= 0, got {seed_radius_mm}")
    if not (np.isfinite(distance_penalty) and distance_penalty >= 0):
        raise ConfigError(f"distance_penalty must be a finite number >= 0, got {distance_penalty}")
    box = _check_region(region, image.shape)
    for c in clicks:
        if not isinstance(c, RobotClick):
            raise PromptError(f"clicks must be RobotClick objects, got {type(c).__name__}")
        if len(c.kji) != 3 or any(not 0 <= v < n for v, n in zip(c.kji, image.shape)):
            raise PromptError(f"click at KJI {c.kji} is outside the image (K, J, I) = {image.shape}")

    result = np.zeros(image.shape, dtype=bool)
    if not clicks:
        return result
    seeds = _seed_labels(clicks, box, spacing[::-1], seed_radius_mm)
    if not (seeds == _FOREGROUND).any():  # nothing to grow: the whole region is background
        return result
    labels = _run_growcut(image[box], seeds, spacing, distance_penalty)
    result[box] = labels == _FOREGROUND
    return result


def _seed_labels(
    clicks: Sequence[RobotClick], box: tuple[slice, slice, slice], sampling_kji: np.ndarray, radius_mm: float
) -> np.ndarray:
    """``uint8`` seed labels on the region box (0 unlabelled, 1 foreground, 2 background)."""
    shape = tuple(s.stop - s.start for s in box)
    seeds = np.zeros(shape, dtype=np.uint8)
    half = np.floor(radius_mm / sampling_kji).astype(int)  # sphere half-extent in voxels along k, j, i
    for c in clicks:
        centre = np.array(c.kji) - [s.start for s in box]  # in region coordinates, may be outside it
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, shape)
        if np.any(lo >= hi):
            continue  # the sphere misses the region
        axes = [(np.arange(lo[d], hi[d]) - centre[d]) * sampling_kji[d] for d in range(3)]
        ball = (axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2) <= (
            radius_mm**2
        )
        seeds[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][ball] = _FOREGROUND if c.include else _BACKGROUND
    if not (seeds == _BACKGROUND).any():
        # Until an exclude click lands in the region, its border stands for "outside the object" (without any
        # background seed grow-cut would label the whole region foreground). Click spheres keep their labels.
        border = np.ones(shape, dtype=bool)
        border[1:-1, 1:-1, 1:-1] = False
        seeds[border & (seeds == 0)] = _BACKGROUND
    return seeds


def _run_growcut(intensity: np.ndarray, seeds: np.ndarray, spacing_ijk: np.ndarray, penalty: float) -> np.ndarray:
    """Run ``vtkImageGrowCutSegment`` on a region; returns its ``uint8`` labels (same KJI shape)."""
    grow_cut_cls = _grow_cut_class()
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    # One voxel of padding: the filter never propagates from the image's outermost layer (see module docstring).
    # The padding voxels only ever receive labels, so their values do not matter.
    padded_intensity = np.pad(intensity.astype(np.float32, copy=False), 1, mode="edge")
    padded_seeds = np.pad(seeds, 1)

    def to_vtk(a: np.ndarray) -> vtkImageData:
        img = vtkImageData()
        k, j, i = a.shape
        img.SetDimensions(i, j, k)  # VTK x = i (fastest), y = j, z = k: the memory order of a C-order KJI array
        img.SetSpacing(*(float(s) for s in spacing_ijk))
        img.SetOrigin(0.0, 0.0, 0.0)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(a).ravel(), deep=True)
        img.GetPointData().SetScalars(scalars)
        return img

    grow_cut = grow_cut_cls()
    grow_cut.SetIntensityVolume(to_vtk(padded_intensity))
    grow_cut.SetSeedLabelVolume(to_vtk(padded_seeds))
    grow_cut.SetDistancePenalty(float(penalty))
    grow_cut.Update()
    out = grow_cut.GetOutput()
    scalars = out.GetPointData().GetScalars() if out is not None else None
    if scalars is None or tuple(out.GetDimensions()) != padded_seeds.shape[::-1]:
        raise MAISError(
            f"Slicer's grow-cut filter returned no result for a region of {seeds.shape[::-1]} (I, J, K) voxels"
        )
    labels = numpy_support.vtk_to_numpy(scalars).reshape(padded_seeds.shape)
    return labels[1:-1, 1:-1, 1:-1].copy()


def _grow_cut_class() -> type:
    """``vtkImageGrowCutSegment``: from the slicer-core wheel, or from Slicer's own Python modules."""
    try:
        from slicer_core.vtkSlicerSegmentationsModuleLogic import vtkImageGrowCutSegment
    except ImportError:
        try:
            from vtkSlicerSegmentationsModuleLogicPython import vtkImageGrowCutSegment
        except ImportError:
            raise GrowCutUnavailableError(
                "the growcut baseline runs Slicer's vtkImageGrowCutSegment, which was not found: "
                "install it with `pip install slicer-core` (Linux, Python 3.11)"
            ) from None
    return vtkImageGrowCutSegment


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.size == 0:
        raise ImageError(f"image must be a non-empty 3-D (K, J, I) array, got shape {image.shape}")
    if not (
        image.dtype == np.bool_ or np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ImageError(f"image has dtype {image.dtype}; grow-cut needs real intensities")
    return image


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    try:
        sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError(f"spacing_ijk must be three numbers (mm along i, j, k), got {spacing!r}") from None
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ConfigError(f"spacing_ijk must be three positive numbers (mm along i, j, k), got {sp.tolist()}")
    return sp


def _check_region(region: tuple[slice, slice, slice] | None, shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Normalise ``region`` to three in-range ``slice(start, stop)`` with start < stop."""
    if region is None:
        return tuple(slice(0, n) for n in shape)
    if not isinstance(region, (tuple, list)) or len(region) != 3 or not all(isinstance(s, slice) for s in region):
        raise PromptError(f"region must be a tuple of three slices in (k, j, i) order, got {region!r}")
    out = []
    for s, n, axis in zip(region, shape, "kji"):
        start, stop, step = s.indices(n)
        if step != 1:
            raise PromptError(f"region slice along {axis} must have step 1, got {s}")
        if stop <= start:
            raise PromptError(f"region is empty along {axis} ({s} on an axis of {n} voxels)")
        out.append(slice(start, stop))
    return tuple(out)
