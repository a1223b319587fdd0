"""Volume type and file IO: geometry (oblique, anisotropic, LPS vs RAS), round trips through real files,
DICOM series, bad inputs, atomic writes and Slicer ``.seg.nrrd`` files checked with independent readers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SHARED
from MAISSegmentLib import io as mio
from MAISSegmentLib import seg_nrrd
from MAISSegmentLib.errors import ImageError, MAISError
from MAISSegmentLib.io import read_volume, volume_to_sitk, write_labelmap, write_volume
from MAISSegmentLib.seg_nrrd import DEFAULT_SEGMENT_COLORS, Segment, read_segmentation, write_segmentation
from MAISSegmentLib.volume import Volume

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


# ============================================================================ helpers
def rotation(axis, angle: float) -> np.ndarray:
    """Rodrigues rotation about ``axis`` (any length) by ``angle`` radians: a proper rotation, det +1."""
    a = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = rotation((1.0, 2.0, 3.0), 0.7)  # rotation about an oblique axis: every matrix entry non-zero


def oblique_volume(shape_kji=(5, 7, 9), spacing=(0.3, 0.3, 10.0), dtype=np.int16, seed=0) -> Volume:
    """Distinct voxel values (so any axis mix-up shows), oblique direction, anisotropic spacing."""
    rng = np.random.default_rng(seed)
    array = rng.permutation(np.prod(shape_kji)).reshape(shape_kji).astype(dtype)
    return Volume.from_geometry(array, spacing=spacing, origin=(12.5, -40.25, 77.0), direction=OBLIQUE)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ============================================================================ Volume
def test_volume_geometry_properties():
    vol = oblique_volume()
    assert vol.shape_ijk == (9, 7, 5)
    np.testing.assert_allclose(vol.spacing, [0.3, 0.3, 10.0])
    np.testing.assert_allclose(vol.direction, OBLIQUE, atol=1e-12)
    np.testing.assert_allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(vol.origin, [12.5, -40.25, 77.0])
    np.testing.assert_allclose(vol.ras_to_ijk @ vol.ijk_to_ras, np.eye(4), atol=1e-12)
    assert vol.ijk_to_ras.dtype == np.float64

    ijk = np.array([[0, 0, 0], [8, 6, 4], [2.5, 1.25, 3.0]])
    ras = vol.ijk_to_ras_points(ijk)
    assert ras.shape == (3, 3)
    np.testing.assert_allclose(ras[0], vol.origin)
    # one step along k moves 10 mm along the RAS direction of k
    np.testing.assert_allclose(vol.ijk_to_ras_points([0, 0, 1]) - vol.origin, 10.0 * OBLIQUE[:, 2], atol=1e-12)
    np.testing.assert_allclose(vol.ras_to_ijk_points(ras), ijk, atol=1e-9)
    assert "shape_kji=(5, 7, 9)" in repr(vol)


def test_volume_contains_ijk_uses_voxel_boundaries():
    vol = Volume.from_geometry(np.zeros((2, 3, 4)), spacing=(1, 1, 1), origin=(0, 0, 0))
    inside = vol.contains_ijk(
        np.array([[0, 0, 0], [3, 2, 1], [-0.49, 2.4, 1.4], [-0.51, 0, 0], [3.5, 0, 0], [0, 0, 2]])
    )
    assert inside.tolist() == [True, True, True, False, False, False]
    assert vol.contains_ijk([1, 1, 1]) is True


def test_volume_from_geometry_default_direction_and_with_array():
    vol = Volume.from_geometry(np.zeros((2, 3, 4), np.uint8), spacing=(0.5, 0.6, 2.0), origin=(1, 2, 3))
    np.testing.assert_allclose(vol.ijk_to_ras, [[0.5, 0, 0, 1], [0, 0.6, 0, 2], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    other = vol.with_array(np.ones((2, 3, 4), np.float32))
    assert other.array.dtype == np.float32
    np.testing.assert_array_equal(other.ijk_to_ras, vol.ijk_to_ras)
    assert other.ijk_to_ras is not vol.ijk_to_ras
    with pytest.raises(ImageError, match=r"does not match this volume's grid"):
        vol.with_array(np.zeros((4, 3, 2)))
    with pytest.raises(ImageError, match="spacing"):
        Volume.from_geometry(np.zeros((2, 3, 4)), spacing=(1, 0, 1), origin=(0, 0, 0))


@pytest.mark.parametrize(
    ("array", "affine", "message"),
    [
        (np.zeros((3, 4)), np.eye(4), r"2-D.*np.newaxis"),
        (np.zeros((2, 3, 4, 5)), np.eye(4), r"4-D.*single 3-D scalar"),
        (np.zeros((0, 3, 4)), np.eye(4), "empty"),
        (np.zeros((2, 3, 4), complex), np.eye(4), "real numbers"),
        (np.zeros((2, 3, 4)), np.eye(3), "4x4"),
        (np.zeros((2, 3, 4)), np.diag([1.0, np.nan, 1.0, 1.0]), "NaN"),
        (np.zeros((2, 3, 4)), np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), "last row"),
        (np.zeros((2, 3, 4)), np.diag([1.0, 1.0, 0.0, 1.0]), "not invertible"),
    ],
)
def test_volume_rejects_bad_input(array, affine, message):
    with pytest.raises(ImageError, match=message) as info:
        Volume(array, affine)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, MAISError)


# ============================================================================ round trips
@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_oblique_anisotropic(tmp_path, extension):
    vol = oblique_volume()
    path = tmp_path / f"image{extension}"
    write_volume(vol, path)
    back = read_volume(path)

    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, vol.array)
    # NIfTI stores the matrix as float32
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    np.testing.assert_allclose(back.spacing, [0.3, 0.3, 10.0], rtol=1e-6)

    # a point keeps its RAS position: the voxel that was at some RAS point is still there after the round trip
    ijk = np.array([6, 4, 3])
    ras = vol.ijk_to_ras_points(ijk)
    np.testing.assert_allclose(back.ras_to_ijk_points(ras), ijk, atol=1e-4)
    i, j, k = np.rint(back.ras_to_ijk_points(ras)).astype(int)
    assert back.array[k, j, i] == vol.array[3, 4, 6]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
def test_round_trip_keeps_dtype(tmp_path, dtype):
    vol = oblique_volume(dtype=dtype)
    write_volume(vol, tmp_path / "x.nrrd")
    back = read_volume(tmp_path / "x.nrrd")
    assert back.array.dtype == dtype
    np.testing.assert_array_equal(back.array, vol.array)


def test_bool_volume_is_written_as_uint8(tmp_path):
    vol = Volume.from_geometry(np.eye(4, dtype=bool)[None].repeat(2, 0), spacing=(1, 1, 1), origin=(0, 0, 0))
    write_volume(vol, tmp_path / "mask.nii.gz")
    back = read_volume(tmp_path / "mask.nii.gz")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, vol.array)


def test_files_are_lps_and_volumes_are_ras(tmp_path):
    # Written by SimpleITK alone (LPS): origin (10, 20, 30) LPS, identity LPS direction.
    image = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16), isVector=False)
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetSpacing((0.5, 0.7, 2.0))
    sitk.WriteImage(image, str(tmp_path / "lps.nrrd"))
    vol = read_volume(tmp_path / "lps.nrrd")
    np.testing.assert_allclose(vol.origin, [-10.0, -20.0, 30.0])
    np.testing.assert_allclose(vol.direction, np.diag([-1.0, -1.0, 1.0]))

    # And the other way: ITK's physical point of a voxel is our RAS point with x and y negated.
    vol = oblique_volume()
    write_volume(vol, tmp_path / "ras.nii.gz")
    itk_image = sitk.ReadImage(str(tmp_path / "ras.nii.gz"))
    for ijk in [(0, 0, 0), (8, 6, 4), (3, 1, 2)]:
        lps = np.array(itk_image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose(lps * [-1, -1, 1], vol.ijk_to_ras_points(np.array(ijk, float)), atol=1e-4)
    # volume_to_sitk gives the same geometry without a file
    in_memory = volume_to_sitk(vol)
    np.testing.assert_allclose(
        in_memory.TransformIndexToPhysicalPoint((8, 6, 4)),
        itk_image.TransformIndexToPhysicalPoint((8, 6, 4)),
        atol=1e-4,
    )


# ============================================================================ DICOM
def write_dicom_series(folder: Path, vol: Volume, series_uid: str, prefix: str = "IM") -> None:
    """One CT slice per file with the geometry tags a scanner writes (slicing an ITK image keeps its LPS geometry)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = volume_to_sitk(vol)
    d = np.array(image.GetDirection()).reshape(3, 3)  # columns: LPS direction of i, j, k
    si, sj, sk = image.GetSpacing()

    def ds(values) -> str:  # DICOM decimal strings are at most 16 characters
        return "\\".join(f"{v:.10g}" for v in values)

    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our SeriesInstanceUID/SOPInstanceUID
    for k in range(image.GetSize()[2]):
        slice_k = image[:, :, k]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # SOP Class: CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",  # SOPInstanceUID
            "0008|0060": "CT",
            "0010|0010": "Test^Phantom",
            "0010|0020": "PHANTOM1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",  # StudyInstanceUID
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),  # InstanceNumber
            "0020|0032": ds(image.TransformIndexToPhysicalPoint((0, 0, k))),  # ImagePositionPatient (LPS mm)
            "0020|0037": ds([*d[:, 0], *d[:, 1]]),  # ImageOrientationPatient: row (i) then column (j) direction
            "0028|0030": ds([sj, si]),  # PixelSpacing: between rows, then between columns
            "0018|0050": ds([sk]),  # SliceThickness
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_folder(tmp_path):
    vol = oblique_volume(shape_kji=(4, 6, 8), spacing=(0.3, 0.3, 10.0))
    write_dicom_series(tmp_path / "series", vol, series_uid="1.2.826.0.1.3680043.2.1125.2")
    back = read_volume(tmp_path / "series")
    assert back.array.shape == (4, 6, 8)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, [0.3, 0.3, 10.0], rtol=1e-6)
    np.testing.assert_allclose(back.ijk_to_ras, vol.ijk_to_ras, atol=1e-6)


def test_dicom_folder_with_two_series_reads_the_larger_and_warns(tmp_path):
    write_dicom_series(tmp_path, oblique_volume(shape_kji=(3, 4, 5), seed=1), series_uid="1.2.3.1", prefix="A")
    write_dicom_series(tmp_path, oblique_volume(shape_kji=(5, 4, 5), seed=2), series_uid="1.2.3.2", prefix="B")
    with pytest.warns(UserWarning, match=r"2 DICOM series; reading 1\.2\.3\.2 \(5 files\), ignoring 1\.2\.3\.1"):
        back = read_volume(tmp_path)
    np.testing.assert_array_equal(back.array, oblique_volume(shape_kji=(5, 4, 5), seed=2).array)


# ============================================================================ bad inputs
def _write_2d(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 7), np.int16)), str(path))


def _write_4d(path: Path) -> None:
    frame = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16), isVector=False)
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(path))


def _write_vector(path: Path) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.float32), isVector=True), str(path))


def _write_truncated(path: Path) -> None:
    sitk.WriteImage(volume_to_sitk(oblique_volume(shape_kji=(10, 20, 30))), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_text(path: Path) -> None:
    path.write_text("this is not an image\n")


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("slice.nii.gz", _write_2d, r"is a 2-D image \(7 x 6 pixels\).*single 3-D scalar volume"),
        ("slice.nrrd", _write_2d, r"is a 2-D image"),
        ("series.nii.gz", _write_4d, r"is a 4-D image \(5 x 4 x 3 x 2: 2 frames.*extract one frame"),
        ("series.nrrd", _write_4d, r"is a 4-D image"),
        ("field.nrrd", _write_vector, r"has 3 components per voxel.*single 3-D scalar volume"),
        ("field.nii.gz", _write_vector, r"has 3 components per voxel"),
        ("cut.nii.gz", _write_truncated, r"truncated"),
        ("cut.nii", _write_truncated, r"truncated"),
        ("cut.nrrd", _write_truncated, r"damaged or truncated"),
        ("text.nii.gz", _write_text, r"cannot read .*text\.nii\.gz: not a readable NIfTI image.*not recognized"),
        ("text.nrrd", _write_text, r"not a readable NRRD image.*couldn't parse"),
    ],
)
def test_bad_files_raise_image_error(tmp_path, name, make, message):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError, match=message) as info:
        read_volume(path)
    assert "\n" not in str(info.value)


def test_short_nifti_inside_a_complete_gzip_is_caught(tmp_path):
    # a well-formed gzip stream whose NIfTI payload ends early: ITK alone would fill the rest with zeros
    path = tmp_path / "short.nii.gz"
    write_volume(oblique_volume(shape_kji=(10, 20, 30)), path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-1000]))
    with pytest.raises(
        ImageError, match=rf"truncated: its header promises {len(raw)} bytes .* only {len(raw) - 1000} "
    ):
        read_volume(path)
    # the same bytes in a complete stream read fine (the slow path accepts multi-member gzip files)
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_volume(path).array, oblique_volume(shape_kji=(10, 20, 30)).array)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(ImageError, match=r"no such file or folder"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=r"folder without a DICOM series"):
        read_volume(tmp_path / "empty")
    (tmp_path / "empty" / "sub").mkdir()
    with pytest.raises(ImageError, match=r"sub-folder"):
        read_volume(tmp_path / "empty")


# ============================================================================ atomic writes
def test_write_creates_folders_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "b" / "image.nii.gz"
    write_volume(oblique_volume(), target)
    assert files_in(target.parent) == ["image.nii.gz"]
    write_volume(oblique_volume(seed=3), target)  # overwrite in place
    assert files_in(target.parent) == ["image.nii.gz"]
    np.testing.assert_array_equal(read_volume(target).array, oblique_volume(seed=3).array)


def test_failed_write_leaves_existing_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "image.nrrd"
    write_volume(oblique_volume(), target)
    before = target.read_bytes()

    def broken_write(image, path, compress):  # writes half a file, then the disk "fills up"
        path.write_bytes(b"NRRD0004\npartial")
        raise ImageError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(mio, "write_sitk", broken_write)
    monkeypatch.setattr(seg_nrrd, "write_sitk", broken_write)
    with pytest.raises(ImageError, match="No space left"):
        write_volume(oblique_volume(seed=5), target)
    with pytest.raises(ImageError, match="No space left"):
        write_segmentation(tmp_path / "seg.seg.nrrd", oblique_volume(), [])
    assert target.read_bytes() == before
    assert files_in(tmp_path) == ["image.nrrd"]


def test_write_rejects_bad_targets(tmp_path):
    vol = oblique_volume()
    with pytest.raises(ImageError, match=r"use one of .nii.gz, .nii, .nrrd, .mha"):
        write_volume(vol, tmp_path / "image.nhdr")
    (tmp_path / "folder.nii.gz").mkdir()
    with pytest.raises(ImageError, match="is a folder"):
        write_volume(vol, tmp_path / "folder.nii.gz")
    with pytest.raises(ImageError, match=r"label map needs integer voxels, this one is float32"):
        write_labelmap(vol.with_array(vol.array.astype(np.float32)), tmp_path / "labels.nii.gz")
    assert files_in(tmp_path) == ["folder.nii.gz"]
    write_labelmap(vol.with_array((vol.array % 3).astype(np.uint8)), tmp_path / "labels.nii.gz")
    assert read_volume(tmp_path / "labels.nii.gz").array.dtype == np.uint8


# ============================================================================ segmentations
@pytest.fixture()
def reference() -> Volume:
    return oblique_volume(shape_kji=(6, 8, 10), spacing=(0.3, 0.3, 10.0))


def box(shape, k, j, i) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[k, j, i] = True
    return mask


@pytest.fixture()
def segments(reference) -> list[Segment]:
    shape = reference.array.shape
    return [
        Segment("liver", box(shape, slice(1, 4), slice(2, 6), slice(1, 5)), color=(0.9, 0.1, 0.2), label_value=7),
        Segment("tumour", box(shape, slice(2, 5), slice(4, 8), slice(3, 9)), tags={"MAIS.clicks": "[[1, 2, 3, 1]]"}),
        Segment("dot", box(shape, 5, 0, 9)),  # a single corner voxel
        Segment("empty", np.zeros(shape, np.uint8), label_value=9),
    ]


def slicerio_mask_kji(seg: dict, name: str) -> np.ndarray:
    import slicerio

    return slicerio.segment_mask(seg, name).transpose(2, 1, 0)  # slicerio: (i, j, k) -> ours: (k, j, i)


def test_seg_nrrd_read_by_slicerio(tmp_path, reference, segments):
    slicerio = pytest.importorskip("slicerio")
    path = tmp_path / "result.seg.nrrd"
    write_segmentation(path, reference, segments)
    assert files_in(tmp_path) == ["result.seg.nrrd"]

    seg = slicerio.read_segmentation(str(path))
    # the tumour overlaps the liver: two layers, with Slicer's leading "list" axis
    assert seg["voxels"].shape == (2, 10, 8, 6)
    np.testing.assert_allclose(np.asarray(seg["ijkToLPS"]), LPS @ reference.ijk_to_ras, atol=1e-9)
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert seg["referenceImageExtentOffset"] == [0, 0, 0]
    geometry = next(p for p in seg["conversionParameters"] if p["name"] == "Reference image geometry")["value"]
    np.testing.assert_allclose([float(v) for v in geometry.split(";")[:16]], reference.ijk_to_ras.ravel())
    assert geometry.endswith(";0;9;0;7;0;5;")

    by_name = {s["name"]: s for s in seg["segments"]}
    assert list(by_name) == ["liver", "tumour", "dot", "empty"]
    assert [by_name[n]["labelValue"] for n in by_name] == [7, 2, 3, 9]
    assert [by_name[n]["layer"] for n in by_name] == [0, 1, 0, 0]
    np.testing.assert_allclose(by_name["liver"]["color"], (0.9, 0.1, 0.2))
    np.testing.assert_allclose(by_name["tumour"]["color"], DEFAULT_SEGMENT_COLORS[1])
    assert by_name["liver"]["colorAutoGenerated"] is False and by_name["tumour"]["colorAutoGenerated"] is True
    assert by_name["tumour"]["tags"] == {"MAIS.clicks": "[[1, 2, 3, 1]]"}
    assert by_name["liver"]["id"] == "Segment_7"
    assert all(s["extent"] == [0, 9, 0, 7, 0, 5] for s in seg["segments"])
    for original in segments:
        np.testing.assert_array_equal(slicerio_mask_kji(seg, original.name), original.mask != 0)


def test_seg_nrrd_single_layer_is_3d(tmp_path, reference, segments):
    slicerio = pytest.importorskip("slicerio")
    path = tmp_path / "flat.seg.nrrd"
    write_segmentation(path, reference, [segments[0], segments[2]])
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].shape == (10, 8, 6)
    assert seg["voxels"].dtype == np.uint8
    np.testing.assert_array_equal(slicerio_mask_kji(seg, "liver"), segments[0].mask)
    np.testing.assert_array_equal(slicerio_mask_kji(seg, "dot"), segments[2].mask)


def test_seg_nrrd_geometry_matches_reference_in_simpleitk(tmp_path, reference, segments):
    write_segmentation(tmp_path / "s.seg.nrrd", reference, segments)
    write_volume(reference, tmp_path / "ref.nrrd")
    seg_image = sitk.ReadImage(str(tmp_path / "s.seg.nrrd"))
    ref_image = sitk.ReadImage(str(tmp_path / "ref.nrrd"))
    assert seg_image.GetSize() == ref_image.GetSize() == (10, 8, 6)
    assert seg_image.GetNumberOfComponentsPerPixel() == 2  # two layers
    np.testing.assert_allclose(seg_image.GetSpacing(), ref_image.GetSpacing(), rtol=1e-12)
    np.testing.assert_allclose(seg_image.GetOrigin(), ref_image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(seg_image.GetDirection(), ref_image.GetDirection(), atol=1e-12)
    assert seg_image.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"
    assert seg_image.GetMetaData("Segment0_Name") == "liver"
    with pytest.raises(ImageError, match=r"segmentation with 2 layers .*read_segmentation"):
        read_volume(tmp_path / "s.seg.nrrd")
    assert seg_image.GetMetaData("Segment1_Tags") == "MAIS.clicks:[[1, 2, 3, 1]]|"
    assert seg_image.GetMetaData("Segment0_NameAutoGenerated") == "0"
    assert "End capping|1|" in seg_image.GetMetaData("Segmentation_ConversionParameters")


def test_seg_nrrd_round_trip_with_read_segmentation(tmp_path, reference, segments):
    path = tmp_path / "s.seg.nrrd"
    write_segmentation(path, reference, segments)
    volume, back = read_segmentation(path)
    np.testing.assert_allclose(volume.ijk_to_ras, reference.ijk_to_ras, atol=1e-9)
    assert volume.array.shape == reference.array.shape
    assert [s.name for s in back] == ["liver", "tumour", "dot", "empty"]
    assert [s.label_value for s in back] == [7, 2, 3, 9]
    assert [s.segment_id for s in back] == ["Segment_7", "Segment_2", "Segment_3", "Segment_9"]
    np.testing.assert_allclose(back[0].color, (0.9, 0.1, 0.2))
    np.testing.assert_allclose(back[2].color, DEFAULT_SEGMENT_COLORS[2])
    assert back[1].tags == {"MAIS.clicks": "[[1, 2, 3, 1]]"}
    for original, read in zip(segments, back):
        assert read.mask.dtype == np.bool_
        np.testing.assert_array_equal(read.mask, original.mask != 0)
    # flattened labelmap: every segment painted with its label value (later ones on top)
    assert volume.array[1, 2, 1] == 7 and volume.array[3, 5, 4] == 2 and volume.array[5, 0, 9] == 3

    # rewriting what was read gives the same file content
    write_segmentation(tmp_path / "again.seg.nrrd", volume, back)
    _, again = read_segmentation(tmp_path / "again.seg.nrrd")
    assert [(s.name, s.label_value, s.color, s.segment_id, s.tags) for s in again] == [
        (s.name, s.label_value, s.color, s.segment_id, s.tags) for s in back
    ]


def test_empty_segmentation_and_plain_labelmap(tmp_path, reference):
    write_segmentation(tmp_path / "none.seg.nrrd", reference, [])
    volume, segs = read_segmentation(tmp_path / "none.seg.nrrd")
    assert segs == [] and volume.array.shape == reference.array.shape

    labels = np.zeros(reference.array.shape, np.uint8)
    labels[0, 0, :3] = 2
    labels[5, 7, 9] = 5
    write_labelmap(reference.with_array(labels), tmp_path / "labels.nii.gz")
    volume, segs = read_segmentation(tmp_path / "labels.nii.gz")
    assert [(s.name, s.label_value, int(s.mask.sum())) for s in segs] == [("Segment_2", 2, 3), ("Segment_5", 5, 1)]
    np.testing.assert_array_equal(volume.array, labels)
    # label maps saved as float by other tools are accepted when every value is a whole number
    write_volume(reference.with_array(labels.astype(np.float32)), tmp_path / "float_labels.nrrd")
    _, segs = read_segmentation(tmp_path / "float_labels.nrrd")
    assert [s.label_value for s in segs] == [2, 5]
    write_volume(reference.with_array(labels + np.float32(0.5)), tmp_path / "not_labels.nrrd")
    with pytest.raises(ImageError, match="not whole numbers"):
        read_segmentation(tmp_path / "not_labels.nrrd")


@pytest.mark.parametrize("name", ["Segmentation.seg.nrrd", "SegmentationOverlapping.seg.nrrd"])
def test_read_segmentation_of_slicer_written_files(name):
    slicerio = pytest.importorskip("slicerio")
    path = Path(slicerio.__file__).parent / "data" / name
    if not path.exists():
        pytest.skip(f"slicerio ships no {name}")
    volume, segs = read_segmentation(path)
    ref = slicerio.read_segmentation(str(path))
    assert [s.name for s in segs] == slicerio.segment_names(ref)
    np.testing.assert_allclose(LPS @ volume.ijk_to_ras, np.asarray(ref["ijkToLPS"]), atol=1e-9)
    for seg, info in zip(segs, ref["segments"]):
        assert seg.label_value == info["labelValue"]
        assert seg.segment_id == info["id"]
        np.testing.assert_allclose(seg.color, info["color"])
        assert "TerminologyEntry" in seg.tags
        np.testing.assert_array_equal(seg.mask, slicerio_mask_kji(ref, info["id"]))


def test_seg_nrrd_opens_in_slicer_core(tmp_path, reference, segments):
    """The real thing: Slicer's own segmentation storage node reads our file (runs where slicer-core is installed)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    import vtk
    from slicer.util import arrayFromVolume

    path = tmp_path / "s.seg.nrrd"
    write_segmentation(path, reference, segments)
    write_volume(reference, tmp_path / "ref.nrrd")

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the segmentation converter rules
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    ref_node = volumes.AddArchetypeVolume(str(tmp_path / "ref.nrrd"), "ref")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(segments)
    assert segmentation.GetNumberOfLayers() == 2
    for n, original in enumerate(segments):
        segment_id = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == original.name
        assert segment.GetLabelValue() == [7, 2, 3, 9][n]
        np.testing.assert_allclose(segment.GetColor(), original.color or DEFAULT_SEGMENT_COLORS[n], atol=1e-6)
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert logic.ExportSegmentsToLabelmapNode(node, ids, labelmap, ref_node)
        np.testing.assert_array_equal(arrayFromVolume(labelmap) > 0, original.mask != 0)
    assert segmentation.GetSegment(segmentation.GetNthSegmentID(1)).HasTag("MAIS.clicks")


def _seg_with(reference, **changes) -> list[Segment]:
    shape = reference.array.shape
    first = Segment("a", box(shape, 0, 0, 0), label_value=1)
    second = {"name": "b", "mask": box(shape, 1, 1, 1), "label_value": 2} | changes
    return [first, Segment(**second)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"mask": np.zeros((6, 8, 9), bool)},
            r"mask shape \(6, 8, 9\) does not match the reference volume \(6, 8, 10\)",
        ),
        ({"mask": np.zeros((6, 8, 10), np.float32)}, r"mask is float32; give a bool or integer mask"),
        ({"name": "a"}, r"two segments are named 'a'"),
        ({"label_value": 1}, r"segments 'a' and 'b' both have label value 1"),
        ({"label_value": 256}, r"label value 256 is outside 1..255"),
        ({"segment_id": "Segment_1"}, r"both have segment ID 'Segment_1'"),
    ],
)
def test_write_segmentation_validates(tmp_path, reference, changes, message):
    with pytest.raises(ImageError, match=message):
        write_segmentation(tmp_path / "s.seg.nrrd", reference, _seg_with(reference, **changes))
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "  "}, "non-empty name"),
        ({"mask": np.zeros((3, 4))}, r"3-D \(K, J, I\)"),
        ({"color": (1.2, 0, 0)}, r"color must be three numbers in 0..1"),
        ({"color": (1, 0)}, r"color must be three numbers in 0..1"),
        ({"color": "red"}, r"color must be three numbers in 0..1"),
        ({"label_value": 0}, r"label_value must be >= 1"),
        ({"label_value": 1.5}, r"label_value must be an integer"),
        ({"tags": {"a:b": "x"}}, r"tag name 'a:b'"),
        ({"tags": {"clicks": "1|2"}}, r"without '\|'"),
    ],
)
def test_segment_validates(kwargs, message):
    with pytest.raises(ImageError, match=message):
        Segment(**({"name": "s", "mask": np.zeros((2, 2, 2), bool)} | kwargs))


def test_write_segmentation_rejects_other_extensions(tmp_path, reference):
    with pytest.raises(ImageError, match=r"use one of .seg.nrrd, .nrrd"):
        write_segmentation(tmp_path / "s.nii.gz", reference, [])


# ============================================================================ real data
def test_reads_a_real_case_from_the_shared_manifest():
    manifest_path = SHARED / "data" / "manifest.json"
    if not manifest_path.exists():
        pytest.skip(f"no shared data manifest at {manifest_path}")
    cases = json.loads(manifest_path.read_text())["cases"]
    present = [c for c in cases if (manifest_path.parent / c["image"]).exists()]
    if not present:
        pytest.skip("the manifest lists no image that is present")
    case = min(present, key=lambda c: (manifest_path.parent / c["image"]).stat().st_size)
    vol = read_volume(manifest_path.parent / case["image"])
    assert vol.shape_ijk == tuple(case["shape"])
    np.testing.assert_allclose(vol.spacing, case["spacing"], rtol=1e-5)
    assert vol.array.dtype == np.int16
    labels = read_volume(manifest_path.parent / case["label"])
    assert labels.array.shape == vol.array.shape
    np.testing.assert_allclose(labels.ijk_to_ras, vol.ijk_to_ras, atol=1e-4)
    present_labels = {int(v) for v in np.unique(labels.array) if v > 0}
    assert present_labels == {int(k) for k in case["labels"]}


def test_image_larger_than_available_memory_is_refused_before_reading(tmp_path, monkeypatch):
    import MAISSegmentLib.sysinfo as sysinfo

    path = tmp_path / "big.nrrd"
    write_volume(Volume(np.zeros((20, 30, 40), np.int16), np.eye(4)), path)
    monkeypatch.setattr(sysinfo, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(ImageError, match="crop or downsample"):
        read_volume(path)


# ============================================================================ NIfTI values ITK hides
def _float_nifti(path: Path, dtype=np.float32, bad=(np.nan, np.inf)) -> None:
    """A float NIfTI whose voxels include ``bad`` values and zeros."""
    array = np.arange(3 * 4 * 5, dtype=dtype).reshape(3, 4, 5)
    for n, value in enumerate(bad):
        array.flat[7 + n] = value
    write_volume(Volume(array, np.eye(4)), path)


@pytest.mark.parametrize("name", ["nan.nii", "nan.nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nifti_nan_and_inf_voxels_are_refused(tmp_path, name, dtype):
    # ITK's NIfTI reader would hand them back as 0: the image would look valid and be segmented as it is
    path = tmp_path / name
    _float_nifti(path, dtype)
    assert np.count_nonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) == 0) == 3  # the hazard is real
    with pytest.raises(ImageError, match=r"has 2 NaN/Inf voxels .*replace them"):
        read_volume(path)


def test_float_nifti_with_zeros_but_no_nan_reads(tmp_path):
    _float_nifti(tmp_path / "ok.nii.gz", bad=())
    assert read_volume(tmp_path / "ok.nii.gz").array.flat[0] == 0


def _nifti_with_pixdim(path: Path, value: float) -> None:
    """A NIfTI-1 file (gzip-compressed if the name says so) whose pixdim[2], the voxel size along j, is ``value``."""
    plain = path.with_name("plain.nii")
    write_volume(Volume.from_geometry(np.zeros((3, 4, 5), np.int16), (0.8, 0.9, 2.5), (0.0, 0.0, 0.0)), plain)
    raw = bytearray(plain.read_bytes())
    assert np.frombuffer(raw[84:88], "<f4")[0] == np.float32(0.9)  # the field is where the standard puts it
    raw[84:88] = np.array([value], "<f4").tobytes()
    plain.unlink()
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))


@pytest.mark.parametrize("name", ["bad.nii", "bad.nii.gz"])
@pytest.mark.parametrize("value", [0.0, -0.9, float("nan"), float("inf")])
def test_nifti_zero_negative_or_nan_voxel_size_is_refused(tmp_path, name, value):
    # ITK reads a zero (or NaN) voxel size as 1 mm and a negative one as a flip: every distance would be wrong
    path = tmp_path / name
    _nifti_with_pixdim(path, value)
    with pytest.raises(ImageError, match=rf"voxel size of \(0\.8, {value:g}, 2\.5\) mm .*positive"):
        read_volume(path)
    with pytest.raises(ImageError, match="voxel size"):
        mio.read_geometry(path)


def _write_empty(path: Path) -> None:
    path.write_bytes(b"")


def _write_gzip_named_nii(path: Path) -> None:
    write_volume(oblique_volume(), path.with_name("real.nii.gz"))
    path.write_bytes(path.with_name("real.nii.gz").read_bytes())


def _write_nrrd_named_nifti(path: Path) -> None:
    write_volume(oblique_volume(), path.with_name("real.nrrd"))
    path.write_bytes(path.with_name("real.nrrd").read_bytes())


@pytest.mark.parametrize(
    ("name", "make", "hint"),
    [
        ("empty.nii.gz", _write_empty, r"the file is empty \(0 bytes\): copy it again"),  # here it is the cause
        ("notes.nii.gz", _write_text, r"it holds text, not an image"),
        ("notes.nrrd", _write_text, r"it holds text, not an image"),
        ("image.nii", _write_gzip_named_nii, r"gzip-compressed file, not NIfTI: rename it to \.nii\.gz"),
        ("image.nii", _write_nrrd_named_nifti, r"a NRRD file, not NIfTI: rename it to \.nrrd"),
    ],
)
def test_unreadable_file_messages_say_what_the_file_is(tmp_path, name, make, hint):
    # not "copy it again" (but for an empty file): copying a text file or a misnamed image again changes nothing
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError, match=hint) as info:
        read_volume(path)
    assert "copy it again" not in str(info.value) or name.startswith("empty")


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha"])
def test_read_geometry_matches_read_volume_without_the_voxels(tmp_path, extension):
    path = tmp_path / f"image{extension}"
    write_volume(oblique_volume(shape_kji=(6, 7, 9)), path)
    full, header_only = read_volume(path), mio.read_geometry(path)
    assert header_only.array.shape == full.array.shape and header_only.array.strides == (0, 0, 0)
    np.testing.assert_allclose(header_only.ijk_to_ras, full.ijk_to_ras)
