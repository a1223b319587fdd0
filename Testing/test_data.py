"""Cases, targets and the preprocessing cache (MAISSegmentLib.data) on small synthetic oblique volumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from MAISSegmentLib.data import (
    CACHE_VERSION,
    Case,
    DataError,
    PreprocessCache,
    Target,
    label_on_image_grid,
    list_targets,
    load_cases,
    preprocess_case,
)
from MAISSegmentLib.errors import MAISError
from MAISSegmentLib.io import read_volume, resample_label_map, write_volume
from MAISSegmentLib.volume import Volume

SHARED_MANIFEST = Path(__file__).resolve().parents[2] / "shared/data/manifest.json"

SPACING = (0.9, 1.3, 2.2)  # mm along i, j, k (anisotropic)
SHAPE_KJI = (16, 30, 28)
ORIGIN = (-30.0, 12.0, 40.0)
BLOB_1 = np.array([-14.0, 28.0, 54.0])  # RAS mm centre of label 1 (radius 7 mm)
BLOB_2 = np.array([-8.0, 20.0, 50.0])  # RAS mm centre of label 2 (radius 5 mm)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [d for d in range(3) if d != axis]
    m = np.eye(3)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


DIRECTION = _rotation(2, 20.0) @ _rotation(0, 12.0)  # oblique in two planes


def intensity(ras: np.ndarray) -> np.ndarray:
    """A linear function of RAS position: trilinear resampling reproduces it exactly inside the image."""
    return 2.0 * ras[..., 0] - ras[..., 1] + 0.5 * ras[..., 2] + 100.0


def make_pair(
    image_path: Path, label_path: Path, offset: float = 0.0, tiny_label: bool = True
) -> tuple[Volume, Volume]:
    """Write an oblique, anisotropic image/label pair: labels 1 and 2 are balls, label 3 a single voxel."""
    geometry = Volume.from_geometry(np.zeros(SHAPE_KJI, np.float32), SPACING, ORIGIN, DIRECTION)
    k, j, i = np.indices(SHAPE_KJI)
    ras = geometry.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*SHAPE_KJI, 3)
    image = geometry.with_array((intensity(ras) + offset).astype(np.float32))
    label = np.zeros(SHAPE_KJI, np.uint8)
    label[np.linalg.norm(ras - BLOB_1, axis=-1) <= 7.0] = 1
    label[np.linalg.norm(ras - BLOB_2, axis=-1) <= 5.0] = 2
    if tiny_label:
        label[2, 3, 4] = 3  # 0.9 * 1.3 * 2.2 = 2.6 mm^3, below the 10 mm^3 target threshold
    labels = geometry.with_array(label)
    write_volume(image, image_path)
    write_volume(labels, label_path)
    return image, labels


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    image, label = tmp_path / "data" / "a_img.nii.gz", tmp_path / "data" / "a_lab.nii.gz"
    make_pair(image, label)
    return image, label


def write_manifest(path: Path, cases: list[dict], extra: dict | None = None) -> Path:
    """Write a manifest JSON; ``extra`` overrides or adds top-level keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "description": "test", "cases": cases, **(extra or {})}))
    return path


def manifest_entry(case_id: str, image: str, label: str, split: str = "train", **extra) -> dict:
    return {
        "id": case_id,
        "image": image,
        "label": label,
        "labels": {"1": "Liver", "2": "Kidney", "3": "Dot"},
        "split": split,
        "source": "synthetic",
        "modality": "CT",
        "license": "CC0",
        "body_region": "abdomen",
        **extra,
    }


# ---------------------------------------------------------------------------------------------------- manifests
def test_manifest_loads_cases_relative_to_its_folder(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    manifest = write_manifest(
        tmp_path / "data" / "manifest.json",
        [
            manifest_entry("a", "a_img.nii.gz", "a_lab.nii.gz", "train", patient="p1"),
            manifest_entry("b", "a_img.nii.gz", "a_lab.nii.gz", "test"),
        ],
    )
    cases = load_cases(manifest)
    assert [c.id for c in cases] == ["a", "b"]
    a = cases[0]
    assert a.image == pair[0].resolve() and a.label == pair[1].resolve() and a.image.is_absolute()
    assert a.labels == {1: "Liver", 2: "Kidney", 3: "Dot"}
    assert (a.split, a.source, a.modality, a.license, a.body_region, a.patient) == (
        "train",
        "synthetic",
        "CT",
        "CC0",
        "abdomen",
        "p1",
    )
    assert cases[1].patient == ""  # optional metadata defaults to ""
    assert [c.id for c in load_cases(manifest, split="test")] == ["b"]
    assert [c.id for c in load_cases(manifest.parent)] == ["a", "b"]  # a folder holding manifest.json
    hash(Target(a, 1, "Liver"))  # frozen and hashable although Case holds a dict


def test_manifest_optional_fields_default_to_empty(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    entry = {"id": "a", "image": "a_img.nii.gz", "label": "a_lab.nii.gz", "labels": {}, "split": "train"}
    (case,) = load_cases(write_manifest(tmp_path / "data" / "m.json", [entry]))
    assert (case.source, case.modality, case.license, case.body_region, case.labels) == ("", "", "", "", {})


def _bad_manifests(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = manifest_entry("a", "a_img.nii.gz", "a_lab.nii.gz")
    missing = [manifest_entry(f"m{n}", f"gone{n}_img.nii.gz", "a_lab.nii.gz") for n in range(7)]
    bad_json = tmp / "data" / "bad.json"
    bad_json.write_text('{"version": 1, "cases": [')
    return {
        "missing manifest": (tmp / "data" / "nope.json", "no such manifest or folder"),
        "bad json": (bad_json, r"not valid JSON \(line 1"),
        "empty": (write_manifest(tmp / "data" / "empty.json", []), "holds no cases"),
        "no cases list": (write_manifest(tmp / "data" / "nocases.json", [], {"cases": {"a": 1}}), '"cases" list'),
        "missing fields": (
            write_manifest(tmp / "data" / "fields.json", [{"id": "x", "image": "a_img.nii.gz"}]),
            r"case 0 \('x'\) lacks label, labels, split",
        ),
        "bad labels": (
            write_manifest(tmp / "data" / "labels.json", [{**good, "labels": {"one": "Liver"}}]),
            "'one' is not an integer label value",
        ),
        "missing files": (
            write_manifest(tmp / "data" / "files.json", [good, *missing]),
            r"7 listed file\(s\) missing: .*gone0_img.nii.gz.*gone4_img.nii.gz.*and 2 more",
        ),
        "duplicate ids": (write_manifest(tmp / "data" / "dup.json", [good, good]), "repeated: a"),
        "newer version": (write_manifest(tmp / "data" / "v2.json", [good], {"version": 2}), "version 2 is newer"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "missing manifest",
        "bad json",
        "empty",
        "no cases list",
        "missing fields",
        "bad labels",
        "missing files",
        "duplicate ids",
        "newer version",
    ],
)
def test_manifest_errors(tmp_path: Path, pair: tuple[Path, Path], name: str) -> None:
    path, message = _bad_manifests(tmp_path)[name]
    with pytest.raises(DataError, match=message) as info:
        load_cases(path)
    assert isinstance(info.value, MAISError) and isinstance(info.value, ValueError)


def test_unknown_split_lists_the_available_ones(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    manifest = write_manifest(tmp_path / "data" / "m.json", [manifest_entry("a", "a_img.nii.gz", "a_lab.nii.gz")])
    with pytest.raises(DataError, match=r"no case has split 'val'; the splits there are 'train'"):
        load_cases(manifest, split="val")


def test_manifest_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match='"cases" list'):
        load_cases(path)


# ---------------------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize(
    ("image_name", "label_name", "case_id"),
    [
        ("imagesTr/liver_007_0000.nii.gz", "labelsTr/liver_007.nii.gz", "liver_007"),
        ("images/liver_007.nii.gz", "labels/liver_007.nrrd", "liver_007"),
        ("liver_007_img.nii.gz", "liver_007_lab.nii.gz", "liver_007"),
        ("liver_007_image.mha", "liver_007_label.nii.gz", "liver_007"),
    ],
)
def test_folder_layouts(tmp_path: Path, image_name: str, label_name: str, case_id: str) -> None:
    make_pair(tmp_path / image_name, tmp_path / label_name)
    (case,) = load_cases(tmp_path)
    assert case.id == case_id
    assert case.image == (tmp_path / image_name).resolve() and case.label == (tmp_path / label_name).resolve()
    assert case.labels == {1: "label_1", 2: "label_2", 3: "label_3"}  # values read from the label map
    assert case.split == ("train" if "imagesTr" in image_name else "")
    assert case.source == tmp_path.name


def test_nnunet_folder_with_dataset_json_and_test_split(tmp_path: Path) -> None:
    make_pair(tmp_path / "imagesTr/a_0000.nii.gz", tmp_path / "labelsTr/a.nii.gz")
    shutil.copy(tmp_path / "imagesTr/a_0000.nii.gz", tmp_path / "imagesTr/a_0001.nii.gz")  # 2nd channel: ignored
    (tmp_path / "imagesTr/.a_0000.nii.gz.tmp.nii.gz").write_bytes(b"")  # hidden leftovers: ignored
    make_pair(tmp_path / "imagesTs/b_0000.nii.gz", tmp_path / "labelsTs/b.nii.gz", tiny_label=False)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "kidney": 2}}))
    cases = load_cases(tmp_path)
    assert [(c.id, c.split) for c in cases] == [("a", "train"), ("b", "test")]
    assert cases[0].labels == {1: "liver", 2: "kidney", 3: "label_3"}
    assert cases[1].labels == {1: "liver", 2: "kidney"}
    assert [c.id for c in load_cases(tmp_path, split="test")] == ["b"]


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no image/label pairs found"):
        load_cases(tmp_path)
    make_pair(tmp_path / "x_img.nii.gz", tmp_path / "x_lab.nii.gz")
    with pytest.raises(DataError, match="no case has split 'test'; its cases carry no split"):
        load_cases(tmp_path, split="test")  # plain folders carry no split
    make_pair(tmp_path / "y_img.nii.gz", tmp_path / "z_lab.nii.gz")
    with pytest.raises(DataError, match=r"2 image\(s\) or label map\(s\) without a partner: .*y_img.*z_lab"):
        load_cases(tmp_path)


# ---------------------------------------------------------------------------------------------------- targets
def test_targets_skip_small_and_absent_labels(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    entry = manifest_entry("a", "a_img.nii.gz", "a_lab.nii.gz")
    entry["labels"]["4"] = "Ghost"  # named but not in the label map
    cases = load_cases(write_manifest(tmp_path / "data" / "m.json", [entry]))
    targets, skipped = list_targets(cases)
    assert [(t.case.id, t.label, t.name) for t in targets] == [("a", 1, "Liver"), ("a", 2, "Kidney")]
    assert 4 / 3 * np.pi * 7**3 * 0.8 < targets[0].volume_mm3 < 4 / 3 * np.pi * 7**3 * 1.2
    assert [(s["case"], s["label"], s["name"]) for s in skipped] == [("a", 3, "Dot"), ("a", 4, "Ghost")]
    assert "2.57 mm^3 < 10 mm^3 (1 voxels)" in skipped[0]["reason"]
    assert "absent" in skipped[1]["reason"]
    targets, skipped = list_targets(cases, min_volume_mm3=0.0)
    assert [t.label for t in targets] == [1, 2, 3] and len(skipped) == 1


# ---------------------------------------------------------------------------------------------------- preprocessing
@pytest.fixture()
def case(pair: tuple[Path, Path]) -> Case:
    return Case("a", pair[0], pair[1], {1: "Liver", 2: "Kidney", 3: "Dot"}, split="train")


def test_preprocessed_grid_is_ras_aligned_and_in_register(case: Case) -> None:
    item = preprocess_case(case, spacing=1.5, margin_mm=6.0)
    assert item.spacing == 1.5 and item.case_id == "a"
    assert item.image.dtype == np.float32 and item.label.dtype == np.uint8 and item.image.shape == item.label.shape
    # A voxel in the middle of each ball: its RAS position lands on a cached voxel holding its label.
    image, label = read_volume(case.image), read_volume(case.label)
    for centre, value in ((BLOB_1, 1), (BLOB_2, 2)):
        ijk = np.rint(label.ras_to_ijk_points(centre)).astype(int)
        assert label.array[ijk[2], ijk[1], ijk[0]] == value
        ras = label.ijk_to_ras_points(ijk.astype(float))
        r, a, s = np.rint(item.ras_to_voxel(ras)).astype(int)
        assert item.label[r, a, s] == value
        np.testing.assert_allclose(item.voxel_to_ras(np.array([r, a, s])), ras, atol=0.75 * np.sqrt(3))
    # The grid is RAS-aligned: voxel (r, a, s) sits at origin + 1.5 * (r, a, s), so the linear intensity is
    # reproduced exactly (trilinear) wherever the voxel lies inside the image.
    grid = item.voxel_to_ras(np.stack(np.indices(item.shape), -1).astype(float))
    ijk = image.ras_to_ijk_points(grid.reshape(-1, 3)).reshape(*item.shape, 3)
    inside = np.all((ijk >= 0) & (ijk <= np.asarray(image.shape_ijk) - 1), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(item.image[inside], intensity(grid)[inside], atol=2e-3)
    size = np.asarray(image.shape_ijk) - 1
    outside = np.any((ijk < -0.01) | (ijk > size + 0.01), axis=-1)
    assert outside.any() and np.all(item.image[outside] == image.array.min())  # oblique corners: image minimum
    # The grid holds all labelled voxels plus the 6 mm margin, clipped to the image (within half a voxel).
    assert set(np.unique(item.label)) == {0, 1, 2, 3}
    fg_ras = label.ijk_to_ras_points(np.argwhere(label.array > 0)[:, ::-1].astype(float))
    img_ras = image.ijk_to_ras_points(np.argwhere(np.ones(SHAPE_KJI, bool))[:, ::-1].astype(float))
    lo, hi = item.origin_ras, item.voxel_to_ras(np.asarray(item.shape) - 1.0)
    assert np.all(lo <= np.maximum(fg_ras.min(0) - 6.0, img_ras.min(0)) + 0.75)
    assert np.all(hi >= np.minimum(fg_ras.max(0) + 6.0, img_ras.max(0)) - 0.75)
    assert np.all(lo >= img_ras.min(0) - 1e-6) and np.all(hi <= img_ras.max(0) + 1e-6)


def test_grid_is_clipped_to_the_image(case: Case) -> None:
    image = read_volume(case.image)
    item = preprocess_case(case, spacing=1.5, margin_mm=500.0)
    corners = image.ijk_to_ras_points(
        np.array([[x, y, z] for x in (0, 27) for y in (0, 29) for z in (0, 15)], dtype=float)
    )
    lo, hi = item.origin_ras, item.voxel_to_ras(np.asarray(item.shape) - 1.0)
    assert np.all(lo >= corners.min(0) - 1e-6) and np.all(hi <= corners.max(0) + 1e-6)
    assert np.all(hi - lo > corners.max(0) - corners.min(0) - 1.5)


def test_cache_hit_across_instances(tmp_path: Path, case: Case) -> None:
    cache = PreprocessCache(tmp_path / "cache", spacing=1.5, margin_mm=8.0)
    first = cache.get(case)
    entry = cache.path(case)
    assert (cache.hits, cache.misses) == (0, 1) and entry.is_file() and entry.suffix == ".npz"
    assert entry.name.startswith("a-")
    mtime = entry.stat().st_mtime_ns
    other = PreprocessCache(tmp_path / "cache", spacing=1.5, margin_mm=8.0)  # another run or process
    second = other.get(case)
    assert (other.hits, other.misses) == (1, 0) and entry.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(second.label, first.label)
    np.testing.assert_array_equal(second.origin_ras, first.origin_ras)
    assert second.spacing == first.spacing and second.case_id == "a"
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no leftover temporary file
    # Another spacing or margin is another entry; a damaged entry is recomputed.
    PreprocessCache(tmp_path / "cache", spacing=2.0, margin_mm=8.0).get(case)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    entry.write_bytes(b"not a zip")
    again = PreprocessCache(tmp_path / "cache", spacing=1.5, margin_mm=8.0)
    np.testing.assert_array_equal(again.get(case).label, first.label)
    assert again.misses == 1


def test_cache_invalidated_when_image_changes(tmp_path: Path, case: Case) -> None:
    cache = PreprocessCache(tmp_path / "cache", margin_mm=8.0)
    old = cache.get(case)
    old_entry = cache.path(case)
    make_pair(case.image, tmp_path / "unused_lab.nii.gz", offset=50.0)  # rewrite the image in place
    st = case.image.stat()
    os.utime(case.image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # coarse clocks: force a new mtime
    new_entry = cache.path(case)
    assert new_entry != old_entry
    new = cache.get(case)
    assert cache.misses == 2 and new_entry.is_file() and not old_entry.exists()  # stale entry removed
    inside = old.image > old.image.min()
    np.testing.assert_allclose(new.image[inside], old.image[inside] + 50.0, atol=2e-3)
    assert cache.clear() == 1 and not list((tmp_path / "cache").iterdir())


def test_cache_dir_from_environment(tmp_path: Path, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIS_CACHE_DIR", str(tmp_path / "env"))
    cache = PreprocessCache()
    assert cache.cache_dir == tmp_path / "env" / "preprocessed"
    cache.get(case)
    assert cache.path(case).parent == tmp_path / "env" / "preprocessed" and cache.path(case).is_file()
    monkeypatch.delenv("MAIS_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert PreprocessCache().cache_dir == tmp_path / "home" / ".cache" / "maissegment" / "preprocessed"
    assert isinstance(CACHE_VERSION, int)


def test_cache_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spacing"):
        PreprocessCache(tmp_path, spacing=0.0)
    with pytest.raises(ValueError, match="margin_mm"):
        PreprocessCache(tmp_path, margin_mm=-1.0)


def test_label_map_must_match_its_image(tmp_path: Path, case: Case) -> None:
    far = Volume.from_geometry(np.ones((4, 4, 4), np.uint8), (1.0, 1.0, 1.0), (500.0, 500.0, 500.0))
    write_volume(far, tmp_path / "far_lab.nii.gz")
    with pytest.raises(DataError, match="lie outside the image"):
        preprocess_case(Case("far", case.image, tmp_path / "far_lab.nii.gz"))


def _label_on_grid(tmp_path: Path, case: Case, ijk_to_ras: np.ndarray, shape_kji: tuple[int, int, int]) -> Case:
    """``case`` with its label map resampled (nearest) onto another grid and saved: the same labels in RAS."""
    original = read_volume(case.label)
    grid = Volume(np.zeros(shape_kji, np.uint8), ijk_to_ras)
    moved = grid.with_array(resample_label_map(original, grid))
    write_volume(moved, tmp_path / "moved_lab.nii.gz")
    return Case("moved", case.image, tmp_path / "moved_lab.nii.gz", case.labels)


def test_label_map_on_another_grid_is_resampled_onto_the_image(tmp_path: Path, case: Case) -> None:
    # the image's grid grown by 2 voxels on every side: nearest-neighbour resampling there and back is exact
    image = read_volume(case.image)
    grown = image.ijk_to_ras.copy()
    grown[:3, 3] = image.ijk_to_ras_points(np.array([[-2.0, -2.0, -2.0]]))[0]
    moved = _label_on_grid(tmp_path, case, grown, tuple(n + 4 for n in SHAPE_KJI))
    assert read_volume(moved.label).array.shape != image.array.shape
    labels = label_on_image_grid(moved, image, read_volume(moved.label))
    np.testing.assert_array_equal(labels, read_volume(case.label).array)
    assert {t.label for t in list_targets([moved])[0]} == {1, 2}


@pytest.mark.parametrize("shift_mm", [10_000.0, 25.0])
def test_label_map_outside_its_image_is_refused_by_every_reader(tmp_path: Path, case: Case, shift_mm: float) -> None:
    # 10 m away on the same grid shape (evaluate used to score it as if aligned), or 25 mm off (partly outside)
    image = read_volume(case.image)
    moved_grid = image.ijk_to_ras.copy()
    moved_grid[:3, 3] += shift_mm
    write_volume(Volume(read_volume(case.label).array, moved_grid), tmp_path / "moved_lab.nii.gz")
    moved = Case("moved", case.image, tmp_path / "moved_lab.nii.gz", case.labels)
    with pytest.raises(DataError, match=r"labelled voxels of .* lie outside the image"):
        label_on_image_grid(moved, image, read_volume(moved.label))
    with pytest.raises(DataError, match="lie outside the image"):
        list_targets([moved])  # (mais train, evaluate and fewshot list their targets before any work)
    with pytest.raises(DataError, match="lie outside the image"):
        preprocess_case(moved)


# ---------------------------------------------------------------------------------------------------- shared data
@pytest.mark.skipif(not SHARED_MANIFEST.is_file(), reason=f"no shared data at {SHARED_MANIFEST}")
def test_shared_manifest(tmp_path: Path) -> None:
    doc = json.loads(SHARED_MANIFEST.read_text())
    cases = load_cases(SHARED_MANIFEST)
    assert [c.id for c in cases] == [c["id"] for c in doc["cases"]] and cases  # every case, in manifest order
    test_cases = load_cases(SHARED_MANIFEST, split="test")
    assert len(test_cases) == sum(c["split"] == "test" for c in doc["cases"])
    by_id = {c["id"]: c for c in doc["cases"]}
    smallest = min(test_cases, key=lambda c: int(np.prod(by_id[c.id]["shape"])))
    targets, _ = list_targets([smallest])
    assert {t.label for t in targets} <= set(smallest.labels) and targets
    item = PreprocessCache(tmp_path).get(smallest)
    assert item.image.ndim == 3 and item.label.dtype == np.uint8 and item.spacing == 1.5
    assert {t.label for t in targets} <= set(np.unique(item.label).tolist())
