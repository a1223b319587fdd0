"""The growcut peer method: Slicer's real vtkImageGrowCutSegment (slicer-core) seeded with robot clicks."""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np
import pytest

from MAISSegmentLib.baselines import GrowCutUnavailableError, _seed_labels, growcut_segment
from MAISSegmentLib.clicks import RobotClick, RobotUser
from MAISSegmentLib.errors import ConfigError, ImageError, MAISError, PromptError

HAVE_SLICER_CORE = importlib.util.find_spec("slicer_core") is not None
needs_slicer_core = pytest.mark.skipif(
    not HAVE_SLICER_CORE, reason="slicer-core is not installed (pip install slicer-core; Linux, Python 3.11)"
)


def ball(shape, centre_kji, radius) -> np.ndarray:
    kk, jj, ii = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (kk - centre_kji[0]) ** 2 + (jj - centre_kji[1]) ** 2 + (ii - centre_kji[2]) ** 2 <= radius**2


def noisy(labels_to_values: list[tuple[np.ndarray, float]], shape, seed=0, background=50.0, sigma=10.0):
    image = np.full(shape, background, np.float32)
    for mask, value in labels_to_values:
        image[mask] = value
    return image + np.random.default_rng(seed).normal(0, sigma, shape).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@needs_slicer_core
def test_one_include_click_on_a_bright_sphere_in_noise():
    shape = (40, 48, 56)  # K, J, I all different: a wrong axis order would misplace the sphere
    sphere = ball(shape, (18, 22, 30), 10)
    image = noisy([(sphere, 200.0)], shape)
    click = RobotUser("center").click(sphere)
    mask = growcut_segment(image, [click], spacing_ijk=(1.0, 1.0, 1.0))
    assert mask.dtype == bool and mask.shape == shape
    assert dice(mask, sphere) > 0.8


@needs_slicer_core
def test_anisotropic_spacing_and_int16_image():
    shape = (20, 60, 60)
    kk, jj, ii = np.ogrid[:20, :60, :60]
    ellipsoid = ((kk - 10) * 3.0) ** 2 + ((jj - 30) * 0.8) ** 2 + ((ii - 28) * 0.8) ** 2 <= 18**2
    image = noisy([(ellipsoid, 300.0)], shape, seed=1).astype(np.int16)
    click = RobotUser("center", spacing=(0.8, 0.8, 3.0)).click(ellipsoid)
    mask = growcut_segment(image, [click], spacing_ijk=(0.8, 0.8, 3.0))
    assert dice(mask, ellipsoid) > 0.8


@needs_slicer_core
def test_an_exclude_click_removes_a_touching_second_blob():
    shape = (40, 40, 64)
    target = ball(shape, (20, 20, 20), 9)
    other = ball(shape, (20, 20, 38), 9) & ~target  # touches the target along i
    image = noisy([(target, 200.0), (other, 160.0)], shape, seed=2)
    include = RobotClick((20, 20, 20), True)
    leaked = growcut_segment(image, [include], spacing_ijk=(1, 1, 1))
    assert np.count_nonzero(leaked & other) > 0.5 * np.count_nonzero(other)  # grows into the brighter neighbour
    fixed = growcut_segment(image, [include, RobotClick((20, 20, 40), False)], spacing_ijk=(1, 1, 1))
    assert np.count_nonzero(fixed & other) < 0.1 * np.count_nonzero(other)
    assert dice(fixed, target) > 0.8


@needs_slicer_core
def test_result_is_restricted_to_the_region():
    shape = (40, 40, 48)
    target = ball(shape, (20, 20, 18), 8)
    other = ball(shape, (20, 20, 36), 8)  # as bright, reached through the dark gap, half outside the region
    image = noisy([(target, 200.0), (other, 200.0)], shape, seed=3)
    region = (slice(8, 32), slice(6, 34), slice(4, 38))
    click = RobotClick((20, 20, 18), True)
    mask = growcut_segment(image, [click], spacing_ijk=(1, 1, 1), region=region)
    outside = np.ones(shape, bool)
    outside[region] = False
    assert not mask[outside].any()
    assert dice(mask, target) > 0.8
    # the same as segmenting the cropped image
    shifted = RobotClick((12, 14, 14), True)
    assert np.array_equal(mask[region], growcut_segment(image[region], [shifted], spacing_ijk=(1, 1, 1)))
    # a click on the region's own border still grows (the filter never propagates from its outermost layer,
    # which the implementation pads away)
    region = (slice(12, 32), slice(6, 34), slice(4, 38))
    edge = growcut_segment(image, [RobotClick((12, 20, 18), True)], (1, 1, 1), region=region, seed_radius_mm=0)
    outside[region] = False
    outside[:12] = True
    assert np.count_nonzero(edge) > 100 and not edge[outside].any()


@needs_slicer_core
def test_exclude_only_or_no_clicks_give_nothing():
    shape = (16, 16, 16)
    image = noisy([(ball(shape, (8, 8, 8), 5), 200.0)], shape)
    assert not growcut_segment(image, [], spacing_ijk=(1, 1, 1)).any()
    assert not growcut_segment(image, [RobotClick((8, 8, 8), False)], spacing_ijk=(1, 1, 1)).any()


@needs_slicer_core
@pytest.mark.slow
def test_timing_128_cubed_region():
    shape = (128, 128, 128)
    sphere = ball(shape, (64, 60, 70), 30)
    image = noisy([(sphere, 200.0)], shape, seed=4)
    growcut_segment(image[:8, :8, :8], [RobotClick((4, 4, 4), True)], spacing_ijk=(1, 1, 1))  # import outside timing
    t0 = time.perf_counter()
    mask = growcut_segment(image, [RobotClick((64, 60, 70), True)], spacing_ijk=(1, 1, 1))
    seconds = time.perf_counter() - t0
    print(f"\ngrowcut on a 128^3 region: {seconds:.2f} s, Dice {dice(mask, sphere):.3f}")
    assert dice(mask, sphere) > 0.8


def test_seed_spheres_are_physical_and_border_is_background_until_an_exclude_click():
    box = (slice(0, 20), slice(0, 20), slice(0, 20))
    sampling_kji = np.array([3.0, 1.0, 1.0])  # 3 mm slices
    seeds = _seed_labels([RobotClick((10, 10, 10), True)], box, sampling_kji, 3.0)
    fg = np.argwhere(seeds == 1)
    assert fg[:, 0].min() == 9 and fg[:, 0].max() == 11  # ±1 slice of 3 mm
    assert fg[:, 2].min() == 7 and fg[:, 2].max() == 13  # ±3 columns of 1 mm
    border = np.ones((20, 20, 20), bool)
    border[1:-1, 1:-1, 1:-1] = False
    assert np.all(seeds[border] == 2) and not np.any(seeds[~border] == 2)
    seeds = _seed_labels([RobotClick((10, 10, 10), True), RobotClick((5, 8, 8), False)], box, sampling_kji, 3.0)
    assert not np.any(seeds[border] == 2) and seeds[5, 8, 8] == 2
    # a click smaller than a voxel still seeds its own voxel; an exclude sphere outside the region does not count
    box = (slice(0, 20), slice(0, 20), slice(5, 20))
    seeds = _seed_labels([RobotClick((10, 10, 10), True), RobotClick((10, 10, 0), False)], box, sampling_kji, 0.1)
    assert seeds[10, 10, 5] == 1 and np.count_nonzero(seeds == 1) == 1 and seeds[0, 0, 0] == 2


def test_missing_slicer_core_raises_an_actionable_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer_core.vtkSlicerSegmentationsModuleLogic", None)
    monkeypatch.setitem(sys.modules, "vtkSlicerSegmentationsModuleLogicPython", None)
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(GrowCutUnavailableError, match="pip install slicer-core") as info:
        growcut_segment(image, [RobotClick((4, 4, 4), True)], spacing_ijk=(1, 1, 1))
    assert isinstance(info.value, MAISError)


def test_bad_inputs_raise_clear_errors():
    image = np.zeros((8, 8, 8), np.float32)
    ok = [RobotClick((4, 4, 4), True)]
    with pytest.raises(PromptError, match="outside the image"):
        growcut_segment(image, [RobotClick((8, 0, 0), True)], spacing_ijk=(1, 1, 1))
    with pytest.raises(PromptError, match="RobotClick"):
        growcut_segment(image, [((4, 4, 4), True)], spacing_ijk=(1, 1, 1))
    with pytest.raises(PromptError, match="three slices"):
        growcut_segment(image, ok, spacing_ijk=(1, 1, 1), region=(slice(0, 4), slice(0, 4)))
    with pytest.raises(PromptError, match="empty"):
        growcut_segment(image, ok, spacing_ijk=(1, 1, 1), region=(slice(4, 4), slice(0, 4), slice(0, 4)))
    with pytest.raises(PromptError, match="step"):
        growcut_segment(image, ok, spacing_ijk=(1, 1, 1), region=(slice(0, 8, 2), slice(0, 4), slice(0, 4)))
    with pytest.raises(ImageError, match="3-D"):
        growcut_segment(image[0], ok, spacing_ijk=(1, 1, 1))
    with pytest.raises(ConfigError, match="spacing"):
        growcut_segment(image, ok, spacing_ijk=(1, 0, 1))
    with pytest.raises(ConfigError, match="seed_radius_mm"):
        growcut_segment(image, ok, spacing_ijk=(1, 1, 1), seed_radius_mm=-1)
