"""Training targets drawn from the images themselves, and intensity augmentation (issue 12, item 3).

Most anatomy a radiologist clicks on (ribs, vertebrae, muscles, bowel...) has no label in our training data. A model
trained only on labelled structures learns *those* structures; ScribblePrompt (Wong et al., ECCV 2024) showed that
mixing in synthetic targets — regions of random size and shape that are coherent in the image — teaches an
interactive model the general task "segment the coherent structure under the click", which carries to unseen
structures. :func:`synthetic_target` grows such a region from a random seed voxel of a crop: the connected set of
voxels whose smoothed intensity is within a random tolerance of the seed's, limited to a random ellipsoid around
the seed and smoothed morphologically.

:func:`random_ct_window` clips CT intensities to a random soft-tissue-like window: some training images (BTCV) are
stored clipped to [-125, 275] HU, and the model must not learn that CT ends there (nor that it never does).

Arrays are crops in ROI order (R, A, S), raw intensities (HU for CT), as :func:`MAISSegmentLib.train.crop_sample`
makes them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_VOXELS = 200  # a synthetic target smaller than this (0.7 cm^3 at 1.5 mm) is redrawn
MAX_FRACTION = 0.25  # ... and one larger than this fraction of the crop too


def synthetic_target(
    image: np.ndarray, rng: np.random.Generator, centre: np.ndarray | None = None, attempts: int = 6
) -> np.ndarray | None:
    """A random intensity-coherent region of ``image`` (bool, same shape), or None if none was found.

    Args:
        image: ``(S, S, S)`` raw intensities of a crop (any modality).
        rng: the sample's generator (deterministic samples).
        centre: ``(3,)`` voxel near which to seed (default: the crop's centre); the seed is drawn within a few
            voxels of it, on a voxel that is not background (above the crop's 10th intensity percentile).
        attempts: seeds tried before giving up.

    The region: voxels within ``tolerance`` of the seed's intensity after a Gaussian smoothing (sigma 1 voxel),
    ``tolerance`` a random multiple (1.5-8) of the crop's noise level (the robust spread of image minus smoothed
    image over the non-background voxels), so it stops at edges of any contrast the noise lets one see; inside a
    random ellipsoid of semi-axes 6-40 voxels (9-60 mm) around the seed; the connected component holding the
    seed; opened then closed (radius 1) so it has no one-voxel spurs.
    """
    image = image.astype(np.float32)
    smooth = ndimage.gaussian_filter(image, sigma=1.0)
    lo = float(np.percentile(smooth, 10))
    residual = (image - smooth)[smooth > lo]
    if residual.size == 0:
        return None
    noise = max(1.4826 * float(np.median(np.abs(residual - np.median(residual)))), 1e-3 * float(np.ptp(image)), 1e-6)
    size = np.asarray(image.shape)
    middle = size // 2 if centre is None else np.asarray(centre, dtype=int)
    grid = np.ogrid[tuple(slice(0, n) for n in image.shape)]
    for _ in range(attempts):
        seed = np.clip(middle + rng.integers(-8, 9, 3), 0, size - 1)
        value = smooth[tuple(seed)]
        if value <= lo:
            continue
        tolerance = rng.uniform(1.5, 8.0) * noise
        axes = rng.uniform(6, 40, 3)
        ellipsoid = sum(((g - s) / a) ** 2 for g, s, a in zip(grid, seed, axes)) <= 1
        region = ellipsoid & (np.abs(smooth - value) <= tolerance)
        region = ndimage.binary_closing(ndimage.binary_opening(region))
        labels, _count = ndimage.label(region)
        keep = labels[tuple(seed)]
        if keep == 0:
            continue
        mask = labels == keep
        voxels = int(mask.sum())
        if MIN_VOXELS <= voxels <= MAX_FRACTION * mask.size:
            return mask
    return None


def random_ct_window(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (HU) clipped to a random window: lower bound in [-250, -50] HU, upper bound in [150, 450] HU (a
    soft-tissue window like BTCV's stored [-125, 275], wider or narrower)."""
    low = rng.uniform(-250, -50)
    high = rng.uniform(150, 450)
    return np.clip(image, low, high)
