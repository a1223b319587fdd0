"""The ``oracle-N`` methods (the ceiling of an output grid, from the truth) and Dice per source and family."""

from __future__ import annotations

import numpy as np
import pytest

from MAISSegmentLib.data import Case, Target
from MAISSegmentLib.evaluate import (
    OTHER_FAMILY,
    OracleMethod,
    dice,
    evaluate,
    format_tables,
    group_means,
    oracle_mask,
    oracle_methods,
    oracle_rois,
    structure_family,
)
from MAISSegmentLib.roi import Roi
from MAISSegmentLib.volume import Volume
from test_session import affine, rotation


def _volume(shape_kji, spacing, origin, direction=None) -> tuple[Volume, np.ndarray]:
    """An empty image and the RAS mm ``(K, J, I, 3)`` of its voxel centres."""
    m = affine(spacing, origin, direction)
    vol = Volume(np.zeros(shape_kji, dtype=np.int16), m)
    k, j, i = np.indices(shape_kji)
    ras = np.stack([i, j, k, np.ones_like(i)], -1) @ m.T
    return vol, ras[..., :3]


def _center_ras(vol: Volume, truth: np.ndarray) -> np.ndarray:
    """RAS of the truth's voxel nearest its centroid (a first click)."""
    kji = np.argwhere(truth)
    c = kji[np.argmin(np.linalg.norm(kji - kji.mean(0), axis=1))]
    return vol.ijk_to_ras_points(np.array([c[::-1]], dtype=float))[0]


def _oracle_dice(vol: Volume, truth: np.ndarray) -> list[float]:
    first = _center_ras(vol, truth)
    return [dice(oracle_mask(vol, truth, first, g), truth) for g in (32, 64, 128)]


@pytest.mark.parametrize("oblique", [False, True])
def test_large_sphere_oracles_are_high_and_ordered(oblique):
    """A 30 mm sphere on a 1 mm grid (axis-aligned: the separable mapping; oblique: the per-voxel one)."""
    direction = rotation((1, 2, 3), 25) if oblique else None
    vol, ras = _volume((72, 72, 72), (1.0, 1.0, 1.0), (-35.3, -35.1, -34.7), direction)
    centre = vol.ijk_to_ras_points(np.array([[36.0, 36.0, 36.0]]))[0]
    truth = np.linalg.norm(ras - centre, axis=-1) < 30
    d32, d64, d128 = _oracle_dice(vol, truth)
    assert 0.95 < d32 <= d64 <= d128 and d128 > 0.995, (d32, d64, d128)


def test_thin_slab_is_lost_on_the_coarse_grid():
    """A 3 mm slab (1 mm voxels) never fills half of a 6 mm cell: oracle-32 misses it, oracle-128 keeps it."""
    vol, ras = _volume((40, 70, 70), (1.0, 1.0, 1.0), (-35.0, -35.0, -20.0))
    truth = (np.abs(ras[..., 2] - 0.3) < 1.5) & (np.abs(ras[..., 0]) < 30) & (np.abs(ras[..., 1]) < 30)
    assert truth.sum() == 3 * 59 * 59
    d32, d64, d128 = _oracle_dice(vol, truth)
    assert d32 < 0.2 and d128 > 0.95 and d32 <= d64 <= d128, (d32, d64, d128)


def test_a_cell_cut_by_the_image_edge_is_averaged_over_its_part_inside_the_image():
    """The last 3 mm slice labelled: its 6 mm cells hang 3.75 mm out of the image, where there is no truth to
    average; over the part inside, the cell is all truth, so even oracle-32 keeps the slice."""
    vol, ras = _volume((20, 40, 40), (1.5, 1.5, 3.0), (-30.0, -30.0, -30.0))
    truth = np.zeros(ras.shape[:3], dtype=bool)
    truth[-1, 5:-5, 5:-5] = True
    assert dice(oracle_mask(vol, truth, _center_ras(vol, truth), 32), truth) > 0.85  # 0 if outside counted as 0


@pytest.mark.parametrize("direction", [None, np.diag([-1.0, -1.0, 1.0])])  # RAS and LPS storage
def test_oracle_128_is_exact_on_a_1p5mm_ras_aligned_image(direction):
    """The 128^3 grid of a ROI at 1.5 mm is the image's own grid: even a ragged mask comes back voxel for voxel."""
    origin = (-30.0, -33.0, -36.0) if direction is None else (30.0, 33.0, -36.0)
    vol, ras = _volume((40, 44, 48), (1.5, 1.5, 1.5), origin, direction)
    rng = np.random.default_rng(0)
    truth = (np.linalg.norm(ras, axis=-1) < 25) & (rng.random(ras.shape[:3]) < 0.8)
    assert dice(oracle_mask(vol, truth, _center_ras(vol, truth), 128), truth) == 1.0


def test_rois_tile_a_long_object_as_the_session_grows_them_and_a_separate_part_gets_its_own():
    """A 280 mm bar: ROI 0 at the click, neighbours half a window (96 mm) further along R on both sides; a blob
    outside those ROIs (disconnected) gets a ROI centred on it, as a click there would open one."""
    vol, ras = _volume((40, 60, 300), (2.0, 2.0, 3.0), (-300.0, -60.0, -40.0))
    bar = (np.abs(ras[..., 0] + 10) < 140) & (np.abs(ras[..., 1]) < 30) & (np.abs(ras[..., 2]) < 25)
    blob = np.linalg.norm(ras - [-250.0, 0.0, 30.0], axis=-1) < 10
    truth = bar | blob
    rois = oracle_rois(vol, truth, (0.0, 0.0, 0.0))
    centres = [r.center for r in rois]
    assert centres[:3] == [(0.0, 0.0, 0.0), (-96.0, 0.0, 0.0), (96.0, 0.0, 0.0)]
    assert len(rois) == 4 and Roi(centres[3]).contains(np.array([[-250.0, 0.0, 30.0]]), margin=50)[0]
    points = vol.ijk_to_ras_points(np.argwhere(truth)[:, ::-1].astype(float))
    assert np.any([r.contains(points) for r in rois], axis=0).all()  # every truth voxel is inside some ROI
    assert dice(oracle_mask(vol, truth, (0.0, 0.0, 0.0), 64), truth) > 0.97  # no seam where the ROIs cross-fade


@pytest.mark.parametrize(
    "name, family",
    [
        ("liver", "solid organ"),
        ("lung_right", "solid organ"),
        ("LungTumor", "tumour/lesion"),
        ("NonEnhancingTumor", "tumour/lesion"),
        ("Edema", "tumour/lesion"),
        ("GTV_Mass", "tumour/lesion"),
        ("Myo", "heart"),
        ("LV", "heart"),
        ("LeftAtrium", "heart"),
        ("Larynx", "GI tract/airway"),
        ("small_bowel", "GI tract/airway"),
        ("portal_vein_and_splenic_vein", "vessel"),
        ("inferior_vena_cava", "vessel"),
        ("SpinalCord", "brain/nerve"),
        ("spinal_cord", "brain/nerve"),
        ("Brainstem", "brain/nerve"),
        ("RightParotid", "gland"),
        ("adrenal_gland_left", "gland"),
        ("autochthon_right", "muscle"),
        ("rib_left_10", "bone/cartilage"),
        ("vertebrae_T12", "bone/cartilage"),
        ("intervertebral_discs", "bone/cartilage"),
        ("costal_cartilages", "bone/cartilage"),
        ("Mandible", "bone/cartilage"),
        ("Sphere", OTHER_FAMILY),
        ("label_3", OTHER_FAMILY),
    ],
)
def test_structure_family(name, family):
    assert structure_family(name) == family


def test_group_means_and_printed_tables_on_a_hand_made_result():
    targets = [
        {"source": "ts", "family": "vessel", "dice": {"1": 0.2, "5": 0.6}},
        {"source": "ts", "family": "solid organ", "dice": {"1": 0.4, "5": 0.8}},
        {"source": "brats", "family": "tumour/lesion", "dice": {"1": 0.5, "5": 0.5}},
    ]
    by_source = group_means(targets, [1, 5], "source")
    assert list(by_source) == ["brats", "ts"]
    assert by_source["ts"]["n_targets"] == 2 and by_source["ts"]["dice_mean"] == pytest.approx({"1": 0.3, "5": 0.7})
    assert by_source["brats"] == {"n_targets": 1, "dice_mean": {"1": 0.5, "5": 0.5}}
    assert group_means(targets, [1, 5], "family")["vessel"]["dice_mean"] == {"1": 0.2, "5": 0.6}
    res = {
        "dice_mean": {"1": 0.3667, "5": 0.6333},
        "seconds_per_click_median": 0.01,
        "by_source": by_source,
        "by_family": group_means(targets, [1, 5], "family"),
    }
    lines = format_tables({"oracle-32": res}, [1, 5]).splitlines()
    assert lines[0].split() == ["method", "Dice@1", "Dice@5", "s/click"]
    assert lines[1].split() == ["oracle-32", "0.367", "0.633", "0.010"]
    assert ["ts", "2", "oracle-32", "0.300", "0.700"] in [line.split() for line in lines]
    assert ["tumour/lesion", "1", "oracle-32", "0.500", "0.500"] in [line.split() for line in lines]


def test_evaluate_reports_the_oracle_at_every_click_count_with_sources_and_families(tmp_path):
    """Through :func:`evaluate`: the oracles read the truth, share one computation, score once per target."""
    vol, ras = _volume((30, 40, 40), (1.5, 1.5, 2.0), (-30.0, -30.0, -30.0))
    labels = np.where(np.linalg.norm(ras, axis=-1) < 15, 1, 0) + np.where(np.abs(ras[..., 2] - 22) < 1, 2, 0)
    labelled = {1: "liver", 2: "rib_left_1"}
    case = Case("ts__a", tmp_path / "a_img.nii.gz", tmp_path / "a_lab.nii.gz", labelled, source="totalsegmentator")
    images = {case.image: vol, case.label: vol.with_array(labels.astype(np.uint8))}
    targets = [Target(case, 1, "liver"), Target(case, 2, "rib_left_1")]
    methods = oracle_methods(["oracle-32", "growcut", "oracle-128"])
    assert list(methods) == ["oracle-32", "oracle-128"] and methods["oracle-32"].cache is methods["oracle-128"].cache
    out = evaluate(targets, methods, clicks=(1, 5, 20), read=images.__getitem__, progress=False)
    for name, res in out.items():
        assert res["model"]["id"] == name and res["model"]["output_grid"] == int(name[7:])
        for t in res["targets"]:
            assert t["source"] == "totalsegmentator" and len(set(t["dice"].values())) == 1  # same at 1, 5, 20
        assert [t["family"] for t in res["targets"]] == ["solid organ", "bone/cartilage"]
        assert res["by_source"]["totalsegmentator"]["n_targets"] == 2
        assert res["by_family"]["bone/cartilage"]["dice_mean"] == res["targets"][1]["dice"]
    assert out["oracle-32"]["targets"][0]["dice"]["1"] > 0.9  # the 15 mm sphere
    assert out["oracle-32"]["targets"][1]["dice"]["1"] < 0.5 < out["oracle-128"]["targets"][1]["dice"]["1"]  # 2 mm
    with pytest.raises(Exception, match="output grid"):
        OracleMethod(48)
