"""The robot user of the evaluation protocol (``docs/EVALUATION.md``): simulated clicks from a ground truth.

Click 1 is a foreground voxel; every later click corrects the current prediction:

- ``center`` (default): click 1 is the foreground voxel farthest from the object's boundary; click k>1 is the
  voxel farthest from the boundary of the largest error component, an include click if that component is
  missed foreground (false negatives), an exclude click if it is extra foreground (false positives).
- ``random``: click 1 is uniform over the foreground; click k>1 is uniform over the whole error region
  (false negatives ∪ false positives), include iff it falls in the false negatives (the SAM-Med3D/MAIS protocol).
- No error left: a foreground voxel, chosen as for click 1.

Choices made here, so that every method is scored with the same clicks:

- Distances are physical (mm): the Euclidean distance transform gets the voxel spacing, so on an anisotropic
  grid (e.g. 0.7 × 0.7 × 5 mm) the "centre" is the centre a person would see, not the centre in voxel counts.
- Outside the image counts as outside the object (zero padding, as in RITM / SAM-Med3D click simulation), so an
  object cut by the image edge is not clicked on the edge.
- Error components use 6-connectivity (voxels sharing a face). Voxels touching only at an edge or corner are
  separate components: this is ITK's default (``FullyConnected`` off, what Slicer's Islands effect uses) and
  keeps thin diagonal chains of boundary errors from merging into one "largest" component. FN and FP are
  labelled separately; the largest by voxel count across both wins (a tie prefers FN, then scan order).
- Ties of the distance maximum (slabs, even-sized boxes) go to the tied voxel nearest (in mm) to the region's
  centroid, then to the smallest (k, j, i): deterministic, and central for a flat object.
- All work is done inside the bounding box of the region concerned (+1 voxel of zero padding), so a click on a
  512 × 512 × 300 mask costs a few passes over the full array plus work proportional to the object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, PromptError

__all__ = ["STRATEGIES", "RobotClick", "RobotUser"]

STRATEGIES = ("center", "random")

# 6-connectivity (face neighbours) for connected components; see the module docstring for why.
_STRUCTURE_6 = np.array(
    [
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
        [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
    ],
    dtype=bool,
)


@dataclass(frozen=True)
class RobotClick:
    """One simulated click.

    Attributes:
        kji: voxel index ``(k, j, i)`` into the KJI array the click was computed on.
        include: True for an include (positive) click, False for an exclude (negative) click.
    """

    kji: tuple[int, int, int]  # voxel index in the KJI array
    include: bool  # True: include (positive), False: exclude (negative)

    @property
    def ijk(self) -> tuple[int, int, int]:
        """The same voxel as ``(i, j, k)`` (column, row, slice), the order of ``add_click(..., space="ijk")``."""
        k, j, i = self.kji
        return (i, j, k)


class RobotUser:
    """A simulated user who clicks on a ground-truth mask, following ``docs/EVALUATION.md``.

    One ``RobotUser`` simulates one user segmenting one target: the first call to :meth:`click` (or any call
    with ``pred=None``) gives click 1, later calls correct ``pred``. Call :meth:`reset` (or make a new one) for
    the next target; with the same ``seed`` the clicks are then the same whatever was clicked before.

    Args:
        strategy: ``"center"`` (farthest from the boundary, deterministic) or ``"random"`` (uniform, seeded).
        seed: seed of the random generator used by ``"random"``.
        spacing: voxel size in mm along ``(i, j, k)`` (columns, rows, slices), used for physical distances.

    Raises:
        ConfigError: unknown strategy, or a spacing that is not three positive finite numbers.

    Examples:
        >>> gt = np.zeros((9, 9, 9), bool)
        >>> gt[2:7, 2:7, 2:7] = True
        >>> user = RobotUser("center")
        >>> user.click(gt)
        RobotClick(kji=(4, 4, 4), include=True)
    """

    def __init__(self, strategy: str = "center", seed: int = 0, spacing: Sequence[float] = (1, 1, 1)) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown click strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        try:
            sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ConfigError(f"spacing must be three numbers (mm along i, j, k), got {spacing!r}") from None
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ConfigError(f"spacing must be three positive numbers (mm along i, j, k), got {sp.tolist()}")
        self.strategy = strategy  # "center" or "random"
        self.seed = int(seed)  # seed of the "random" strategy's generator
        self.spacing = tuple(float(s) for s in sp)  # (i, j, k) mm
        self._sampling_kji = sp[::-1].copy()  # (k, j, i) mm, the order of the arrays' axes
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start a new target: the next click is click 1 and the random generator restarts from ``seed``.

        Args:
            seed: new seed; the constructor's seed when omitted.
        """
        if seed is not None:
            self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.n_clicks = 0  # clicks given since construction / the last reset

    def click(self, gt: np.ndarray, pred: np.ndarray | None = None) -> RobotClick:
        """The next click on ``gt`` given the current prediction ``pred``.

        Args:
            gt: ``(K, J, I)`` ground truth, any numeric or bool dtype; nonzero is foreground. Must contain
                foreground.
            pred: ``(K, J, I)`` current prediction (nonzero = foreground), same shape as ``gt``; ``None`` for
                click 1. On the first call after construction or :meth:`reset` it is ignored (click 1 rules).

        Returns:
            The click: a KJI voxel index and whether it is an include click.

        Raises:
            PromptError: ``gt`` is not a 3-D array, has no foreground, or ``pred`` has another shape.
        """
        gt_b = _as_mask(gt, "gt")
        if not gt_b.any():
            raise PromptError("gt has no foreground voxel; the robot user needs a non-empty target to click on")
        pred_b = None if pred is None else _as_mask(pred, "pred")
        if pred_b is not None and pred_b.shape != gt_b.shape:
            raise PromptError(f"pred has shape {pred_b.shape} but gt has shape {gt_b.shape}; both must be (K, J, I)")
        first = pred_b is None or self.n_clicks == 0
        self.n_clicks += 1
        if not first:
            error = gt_b ^ pred_b
            box = _bbox(error)
            if box is not None:
                if self.strategy == "random":
                    kji = _uniform_voxel(error, box, self._rng)
                else:
                    kji = self._largest_error_center(gt_b[box], pred_b[box], box)
                return RobotClick(kji, bool(gt_b[kji]))
        # click 1, or no error left: a foreground voxel
        box = _bbox(gt_b)
        if self.strategy == "random":
            kji = _uniform_voxel(gt_b, box, self._rng)
        else:
            kji = _offset(_center_voxel(gt_b[box], self._sampling_kji), box)
        return RobotClick(kji, True)

    def _largest_error_center(
        self, gt: np.ndarray, pred: np.ndarray, box: tuple[slice, slice, slice]
    ) -> tuple[int, int, int]:
        """Centre of the largest FN or FP component within the error bounding box ``box`` (crops given)."""
        from scipy import ndimage

        best = None  # ((size, is_fn), labels, label)
        for is_fn, region in ((True, gt & ~pred), (False, pred & ~gt)):
            labels, n = ndimage.label(region, structure=_STRUCTURE_6)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            sizes[0] = 0
            lab = int(np.argmax(sizes))  # first label (scan order) among equal sizes
            key = (int(sizes[lab]), is_fn)
            if best is None or key > best[0]:
                best = (key, labels, lab)
        assert best is not None  # the caller checked that there is an error
        _, labels, lab = best
        sl = ndimage.find_objects(labels, max_label=lab)[lab - 1]
        component = labels[sl] == lab
        inner = _center_voxel(component, self._sampling_kji)
        return tuple(int(b.start + s.start + c) for b, s, c in zip(box, sl, inner))


def _as_mask(a: np.ndarray, name: str) -> np.ndarray:
    """A 3-D bool view/copy of ``a`` (nonzero = foreground), with a clear error otherwise."""
    if not isinstance(a, np.ndarray):
        raise PromptError(f"{name} must be a numpy array (K, J, I), got {type(a).__name__}")
    if a.ndim != 3:
        raise PromptError(f"{name} must be a 3-D (K, J, I) mask, got {a.ndim} dimensions (shape {a.shape})")
    if a.size == 0:
        raise PromptError(f"{name} is empty (shape {a.shape}); every axis needs at least one voxel")
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise PromptError(f"{name} has dtype {a.dtype}; a mask must be bool or numeric (nonzero = foreground)")
    return a != 0


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Tight KJI bounding box of the True voxels (``None`` if there are none), in two passes over ``mask``."""
    k_any = mask.reshape(mask.shape[0], -1).any(axis=1)
    if not k_any.any():
        return None
    ji = mask.any(axis=0)
    out = []
    for profile in (k_any, ji.any(axis=1), ji.any(axis=0)):
        nz = np.flatnonzero(profile)
        out.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


def _offset(kji: tuple[int, int, int], box: tuple[slice, slice, slice]) -> tuple[int, int, int]:
    return tuple(int(b.start + c) for b, c in zip(box, kji))


def _uniform_voxel(mask: np.ndarray, box: tuple[slice, slice, slice], rng: np.random.Generator) -> tuple[int, ...]:
    """A voxel drawn uniformly from the True voxels of ``mask`` (all inside ``box``); one draw from ``rng``."""
    crop = mask[box]
    flat = np.flatnonzero(crop)
    index = flat[int(rng.integers(len(flat)))]
    return _offset(np.unravel_index(index, crop.shape), box)


def _center_voxel(region: np.ndarray, sampling_kji: np.ndarray) -> tuple[int, int, int]:
    """The voxel of ``region`` (bool, tightly cropped) farthest in mm from its boundary.

    Zero-pads by one voxel (outside = background) before the distance transform. Ties go to the voxel nearest
    the region's centroid, then to the smallest (k, j, i).
    """
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(region, 1), sampling=sampling_kji)[1:-1, 1:-1, 1:-1]
    ties = np.flatnonzero(dist == dist.max())
    if len(ties) == 1:
        return tuple(int(c) for c in np.unravel_index(ties[0], region.shape))
    coords = np.stack(np.unravel_index(ties, region.shape), axis=1)
    # centroid from the per-axis voxel counts (no coordinate arrays for big regions)
    centroid = np.array(
        [
            np.dot(region.sum(axis=tuple(a for a in range(3) if a != axis)), np.arange(n))
            for axis, n in enumerate(region.shape)
        ],
        dtype=np.float64,
    ) / np.count_nonzero(region)
    d2 = (((coords - centroid) * sampling_kji) ** 2).sum(axis=1)
    return tuple(int(c) for c in coords[int(np.argmin(d2))])  # argmin: first (smallest k, j, i) among equals
