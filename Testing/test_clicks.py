"""The robot user (docs/EVALUATION.md): click 1, correction clicks, strategies, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest

from MAISSegmentLib.clicks import RobotClick, RobotUser
from MAISSegmentLib.errors import ConfigError, MAISError, PromptError


def ball(shape, centre_kji, radius, sampling_kji=(1.0, 1.0, 1.0)) -> np.ndarray:
    kk, jj, ii = np.ogrid[: shape[0], : shape[1], : shape[2]]
    d = [(g - c) * s for g, c, s in zip((kk, jj, ii), centre_kji, sampling_kji)]
    return d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= radius**2


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.float32])
@pytest.mark.parametrize("centre", [(12, 15, 20), (7, 20, 9)])
def test_center_click_of_a_sphere_is_its_centre(dtype, centre):
    gt = ball((24, 32, 40), centre, 6).astype(dtype)
    click = RobotUser("center").click(gt)
    assert click == RobotClick(centre, True)
    assert click.ijk == centre[::-1]


def test_anisotropic_spacing_changes_the_centre_physically():
    """Blob A is 11 voxels thick in every direction; blob B 21 × 21 voxels in k, j but 7 voxels along i.
    In voxels A is the thicker one; with 3 mm columns (i) B is 21 mm thick along i and wins."""
    gt = np.zeros((30, 30, 50), bool)
    gt[2:13, 2:13, 2:13] = True  # A, centre (7, 7, 7)
    gt[5:26, 5:26, 30:37] = True  # B, centre (15, 15, 33)
    assert RobotUser("center", spacing=(1, 1, 1)).click(gt).kji == (7, 7, 7)
    assert RobotUser("center", spacing=(3, 1, 1)).click(gt).kji == (15, 15, 33)


def test_ties_go_to_the_centre_of_a_flat_object():
    gt = np.zeros((10, 40, 40), bool)
    gt[4:6, 5:36, 5:36] = True  # a 2-voxel slab: every voxel is 1 voxel from the boundary
    k, j, i = RobotUser("center").click(gt).kji
    assert k in (4, 5) and (j, i) == (20, 20)


def test_the_image_edge_counts_as_boundary():
    gt = np.ones((9, 11, 13), bool)  # the whole image is the object
    assert RobotUser("center").click(gt).kji == (4, 5, 6)


def test_first_call_ignores_pred_and_counts_clicks():
    gt = ball((20, 20, 20), (10, 10, 10), 5)
    user = RobotUser("center")
    assert user.click(gt, np.zeros_like(gt)) == RobotClick((10, 10, 10), True)
    assert user.n_clicks == 1
    user.reset()
    assert user.n_clicks == 0


def box_mask(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_largest_component_is_false_negative_gives_include_click_at_its_centre():
    shape = (40, 40, 40)
    gt = box_mask(shape, (5, 5, 5), (30, 30, 30))
    pred = gt.copy()
    pred[5:30, 5:30, 5:14] = False  # FN: 25 × 25 × 9 slab, centre i = 9
    pred |= box_mask(shape, (33, 33, 33), (37, 37, 37))  # FP: 4^3 blob
    user = RobotUser("center")
    user.click(gt)
    click = user.click(gt, pred)
    assert click.include
    assert click.kji == (17, 17, 9)


def test_largest_component_is_false_positive_gives_exclude_click_at_its_centre():
    shape = (40, 40, 40)
    gt = box_mask(shape, (5, 5, 5), (20, 20, 20))
    pred = gt.copy()
    pred[5:8, 5:8, 5:8] = False  # FN: 27 voxels
    pred |= box_mask(shape, (25, 22, 24), (36, 33, 35))  # FP: 11^3, centre (30, 27, 29)
    user = RobotUser("center")
    user.click(gt)
    assert user.click(gt, pred) == RobotClick((30, 27, 29), False)


def test_components_are_6_connected_and_a_size_tie_prefers_false_negatives():
    shape = (30, 30, 30)
    gt = box_mask(shape, (2, 2, 2), (5, 5, 5)) | box_mask(shape, (5, 5, 5), (8, 8, 8))  # two 3^3 cubes, corner contact
    pred = np.zeros(shape, bool)
    pred[20:24, 20:24, 20:23] = True  # FP: 48 voxels, beaten only if the two FN cubes were one 54-voxel component
    user = RobotUser("center")
    user.click(gt)
    assert user.click(gt, pred) == RobotClick((21, 21, 21), False)  # 4x4x3 block: tie -> nearest the centroid
    # equal sizes: FN (include) wins
    pred = box_mask(shape, (20, 20, 20), (23, 23, 23))  # FP 27 voxels = each FN cube
    click = user.click(gt, pred)
    assert click.include and click.kji in ((3, 3, 3), (6, 6, 6))


@pytest.mark.parametrize("strategy", ["center", "random"])
def test_no_error_falls_back_to_a_foreground_click(strategy):
    gt = ball((20, 22, 24), (9, 11, 12), 4)
    user = RobotUser(strategy, seed=3)
    user.click(gt)
    click = user.click(gt, gt.copy())
    assert click.include and gt[click.kji]
    if strategy == "center":
        assert click.kji == (9, 11, 12)


def test_random_first_click_is_uniform_over_the_foreground_and_seeded():
    gt = np.zeros((10, 10, 10), bool)
    cells = [(1, 1, 1), (2, 8, 3), (5, 5, 5), (9, 0, 7)]
    for c in cells:
        gt[c] = True
    user = RobotUser("random", seed=0)
    counts = dict.fromkeys(cells, 0)
    n = 4000
    for _ in range(n):
        user.reset(seed=user.seed + 1)  # a fresh target each time, different seeds
        counts[user.click(gt).kji] += 1
    assert sum(counts.values()) == n
    assert all(abs(v - n / 4) < 0.1 * n / 4 for v in counts.values()), counts


def test_random_correction_clicks_are_uniform_over_the_error_region():
    shape = (20, 20, 20)
    gt = box_mask(shape, (0, 0, 0), (10, 10, 10))
    pred = box_mask(shape, (0, 0, 0), (10, 10, 7))  # FN: 300 voxels
    pred |= box_mask(shape, (15, 15, 15), (16, 16, 16))  # FP: 1 voxel
    pred |= box_mask(shape, (12, 0, 0), (13, 10, 10))  # FP: 100 voxels -> P(include) = 300 / 401
    user = RobotUser("random", seed=7)
    user.click(gt)
    clicks = [user.click(gt, pred) for _ in range(2000)]
    for c in clicks:
        assert c.include == bool(gt[c.kji] and not pred[c.kji])
        assert gt[c.kji] != pred[c.kji]
    frac = np.mean([c.include for c in clicks])
    assert abs(frac - 300 / 401) < 0.04


@pytest.mark.parametrize("strategy", ["center", "random"])
def test_clicks_are_deterministic_for_a_seed(strategy):
    rng = np.random.default_rng(0)
    gt = ball((30, 30, 30), (15, 15, 15), 9)
    preds = [rng.random(gt.shape) < 0.3 for _ in range(4)]

    def run(seed):
        user = RobotUser(strategy, seed=seed, spacing=(0.8, 0.8, 2.5))
        return [user.click(gt)] + [user.click(gt, p) for p in preds]

    first = run(5)
    assert run(5) == first
    if strategy == "random":
        assert run(6) != first
    user = RobotUser(strategy, seed=5, spacing=(0.8, 0.8, 2.5))
    run_then_reset = [user.click(gt)] + [user.click(gt, p) for p in preds]
    user.reset()
    assert [user.click(gt)] + [user.click(gt, p) for p in preds] == run_then_reset == first


def test_bad_inputs_raise_clear_errors():
    gt = ball((10, 10, 10), (5, 5, 5), 3)
    user = RobotUser()
    with pytest.raises(PromptError, match="3-D"):
        user.click(gt[0])
    with pytest.raises(PromptError, match="no foreground"):
        user.click(np.zeros((5, 5, 5), bool))
    with pytest.raises(PromptError, match="empty"):
        user.click(np.zeros((0, 5, 5), bool))
    with pytest.raises(PromptError, match="numpy array"):
        user.click(gt.tolist())
    user.click(gt)
    with pytest.raises(PromptError, match="shape"):
        user.click(gt, gt[:, :, :9])
    with pytest.raises(ConfigError, match="strategy"):
        RobotUser("corner")
    for bad in [(1, 1), (1, 0, 1), (1, float("nan"), 1), "abc"]:
        with pytest.raises(ConfigError, match="spacing"):
            RobotUser(spacing=bad)
    assert issubclass(PromptError, ValueError) and issubclass(PromptError, MAISError)
