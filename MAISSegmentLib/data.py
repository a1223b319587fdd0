"""Labelled cases for training and evaluation: manifests, folders, targets and the preprocessing cache.

Three steps, each usable alone:

1. :func:`load_cases` reads a list of :class:`Case` (image + label map + metadata) from a manifest JSON (the
   schema of ``shared/data/manifest.json``: ``{"version": 1, "cases": [{"id", "image", "label", "labels",
   "split", ...}]}``, paths relative to the manifest's folder) or from a folder of image/label pairs.
2. :func:`list_targets` turns cases into evaluation targets (one label value of one case, EVALUATION.md) and
   counts the ones too small to click on.
3. :class:`PreprocessCache` resamples each case once onto a RAS-aligned grid at the model's spacing around its
   labelled voxels and keeps the result on disk, so training epochs and later runs read small ``.npz`` files
   instead of decoding and resampling big CTs again.

Axis orders: ``Volume.array`` is KJI (Slicer's); a :class:`Preprocessed` array is indexed ``[r, a, s]`` along
R, A, S, the model's ROI tensor order (``MAISSegmentLib.roi``), and voxel ``(r, a, s)`` has its centre at
``origin_ras + spacing * (r, a, s)`` RAS mm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, MAISError
from .fileutil import atomic_write
from .io import read_geometry, read_volume, resample_label_map
from .roi import resample_to_ras_grid
from .volume import Volume

__all__ = [
    "CACHE_VERSION",
    "Case",
    "DataError",
    "PreprocessCache",
    "Preprocessed",
    "Target",
    "check_label_inside_image",
    "label_on_image_grid",
    "list_targets",
    "load_cases",
    "preprocess_case",
    "same_grid",
]

# Bump when the preprocessing changes what it stores (grid rule, dtypes, fill value): every old entry then gets
# a new key and is recomputed, and the stale file is removed the first time its case is read again.
CACHE_VERSION = 1

CACHE_DIR_ENV = "MAIS_CACHE_DIR"  # root of all MAISSegment caches; the preprocessing cache is its preprocessed/
_DEFAULT_CACHE_ROOT = Path("~/.cache/maissegment")

# File name endings read as images, longest first so ".nii.gz" wins over ".gz"-less matches.
_IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Sibling layouts in one folder: (image suffix, label suffix) before the extension.
_SIBLING_SUFFIXES = (("_img", "_lab"), ("_image", "_label"))
_NNUNET_CHANNEL = "_0000"  # nnU-Net names the first image channel <case>_0000.<ext>; other channels are ignored
_REQUIRED_FIELDS = ("id", "image", "label", "labels", "split")
_OPTIONAL_FIELDS = ("source", "modality", "license", "body_region", "patient")
_MAX_LISTED = 5  # missing files / bad cases named in one error message
_MAX_CHUNK_VOXELS = 4_000_000  # grid voxels resampled at once (bounds memory on whole-body label maps)


class DataError(MAISError, ValueError):
    """A manifest or data folder that cannot be used: missing, malformed, or naming files that are not there."""


# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One labelled image.

    Args:
        id: unique name of the case within its manifest or folder (e.g. ``acdc_3dcardiac__patient003_frame01``).
        image: path of the image file (absolute when loaded by :func:`load_cases`).
        label: path of its label map (integer voxels, 0 = background, usually on the image's grid).
        labels: label value -> structure name, e.g. ``{1: "RV", 2: "Myo"}``; ``label_<v>`` when not known.
        split: ``"train"``, ``"test"``... (``""`` if unknown).
        source, modality, license, body_region, patient: metadata strings (``""`` if unknown).
    """

    id: str
    image: Path
    label: Path
    labels: dict[int, str] = field(default_factory=dict, hash=False)  # dicts cannot be hashed
    split: str = ""
    source: str = ""
    modality: str = ""
    license: str = ""
    body_region: str = ""
    patient: str = ""


def load_cases(source: str | os.PathLike, split: str | None = None) -> list[Case]:
    """Read the cases of a manifest JSON or of a folder of image/label pairs.

    Folders (the first layout found is used):

    - a ``manifest.json`` inside it: read as a manifest;
    - nnU-Net: ``imagesTr/<id>_0000.<ext>`` + ``labelsTr/<id>.<ext>`` (split ``train``), and
      ``imagesTs/`` + ``labelsTs/`` when ``labelsTs/`` exists (split ``test``); names from ``dataset.json``
      ``labels`` when present;
    - ``images/<id>.<ext>`` + ``labels/<id>.<ext>``;
    - siblings ``<id>_img.<ext>`` + ``<id>_lab.<ext>`` or ``<id>_image.<ext>`` + ``<id>_label.<ext>``.

    ``<ext>`` is any of ``.nii.gz .nii .nrrd .nhdr .mha .mhd``. Folder cases without a name list get
    ``label_<v>`` names for the values found in each label map (so every label map is read once here), and
    split ``""`` outside the nnU-Net layout.

    Args:
        source: a manifest ``.json`` file or a folder.
        split: keep only cases of this split (``None``: all).

    Returns:
        The cases in manifest order (folders: sorted by id), with absolute image and label paths.

    Raises:
        DataError: the source is missing; the JSON is malformed or lacks fields; a listed file is missing
            (the first few are named); ids repeat; no case has the requested split; nothing is left.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: no such manifest or folder; give a manifest .json file or a folder of image/label pairs"
        )
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    cases = _load_manifest(path) if path.is_file() else _load_folder(path)
    if not cases:
        raise DataError(f"{path}: holds no cases")
    _check_unique_ids(cases, path)
    if split is not None:
        available = sorted({c.split for c in cases})
        cases = [c for c in cases if c.split == split]
        if not cases:
            if available == [""]:
                raise DataError(
                    f"{path}: no case has split {split!r}; its cases carry no split (plain folders never do), "
                    "so ask for all of them (no --split / split=None) or list them in a manifest with splits"
                )
            shown = ", ".join(repr(s) for s in available)
            raise DataError(f"{path}: no case has split {split!r}; the splits there are {shown}")
    return cases


def _load_manifest(path: Path) -> list[Case]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file; give a manifest .json file or a folder") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise DataError(f'{path}: a manifest is a JSON object with a "cases" list ({{"version": 1, "cases": [...]}})')
    version = doc.get("version", 1)
    if not isinstance(version, int) or version > 1:
        raise DataError(f"{path}: manifest version {version!r} is newer than this MAISSegment reads (1); update it")
    root = path.parent.resolve()
    cases, problems, missing = [], [], []
    for index, entry in enumerate(doc["cases"]):
        where = f"case {index}" + (f" ({entry['id']!r})" if isinstance(entry, dict) and "id" in entry else "")
        if not isinstance(entry, dict):
            problems.append(f"{where} is not an object")
            continue
        absent = [k for k in _REQUIRED_FIELDS if k not in entry]
        if absent:
            problems.append(f"{where} lacks {', '.join(absent)}")
            continue
        wrong = [k for k in ("id", "image", "label", "split") if not isinstance(entry[k], str) or not entry[k]]
        wrong += [k for k in _OPTIONAL_FIELDS if k in entry and not isinstance(entry[k], str)]
        if wrong:
            problems.append(f"{where}: {', '.join(wrong)} must be non-empty strings")
            continue
        try:
            labels = _parse_label_names(entry["labels"])
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        image, label = root / entry["image"], root / entry["label"]
        missing += [str(p) for p in (image, label) if not p.is_file()]
        meta = {k: entry.get(k, "") for k in _OPTIONAL_FIELDS}
        cases.append(Case(entry["id"], image, label, labels, split=entry["split"], **meta))
    if problems:
        raise DataError(f"{path}: {len(problems)} malformed case(s): {_first_few(problems, '; ')}")
    if missing:
        raise DataError(
            f"{path}: {len(missing)} listed file(s) missing: {_first_few(missing)} "
            "(paths are relative to the manifest's folder)"
        )
    return cases


def _parse_label_names(raw: object) -> dict[int, str]:
    if not isinstance(raw, dict):
        raise ValueError('"labels" must map label values to names, e.g. {"1": "liver"}')
    names = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise ValueError(f'"labels" key {key!r} is not an integer label value') from None
        if value <= 0 or not isinstance(name, str):
            raise ValueError(f'"labels" entry {key!r}: {name!r} needs a positive value and a string name')
        names[value] = name
    return dict(sorted(names.items()))


def _load_folder(folder: Path) -> list[Case]:
    folder = folder.resolve()
    pairs: list[tuple[str, Path, Path, str]] = []  # (id, image, label, split)
    missing: list[str] = []
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        layouts = [("imagesTr", "labelsTr", "train")]
        if (folder / "labelsTs").is_dir() and (folder / "imagesTs").is_dir():
            layouts.append(("imagesTs", "labelsTs", "test"))
        for images_dir, labels_dir, split in layouts:
            images = _image_files(folder / images_dir, suffix=_NNUNET_CHANNEL)
            _pair_by_id(images, _image_files(folder / labels_dir), split, pairs, missing)
        names = _nnunet_label_names(folder / "dataset.json")
    elif (folder / "images").is_dir() and (folder / "labels").is_dir():
        _pair_by_id(_image_files(folder / "images"), _image_files(folder / "labels"), "", pairs, missing)
        names = {}
    else:
        for image_suffix, label_suffix in _SIBLING_SUFFIXES:
            images, labels = _image_files(folder, image_suffix), _image_files(folder, label_suffix)
            if images or labels:
                _pair_by_id(images, labels, "", pairs, missing)
                break
        names = {}
    if missing:
        raise DataError(f"{folder}: {len(missing)} image(s) or label map(s) without a partner: {_first_few(missing)}")
    if not pairs:
        raise DataError(
            f"{folder}: no image/label pairs found; expected a manifest.json, imagesTr/ + labelsTr/ (nnU-Net), "
            "images/ + labels/ with the same file names, or <id>_img/<id>_lab (<id>_image/<id>_label) files"
        )
    cases = []
    for case_id, image, label, split in pairs:
        values = sorted(_label_voxel_counts(label))
        labels = {v: names.get(v, f"label_{v}") for v in values}
        cases.append(Case(case_id, image, label, labels, split=split, source=folder.name))
    return cases


def _image_files(folder: Path, suffix: str = "") -> dict[str, Path]:
    """``{id: path}`` of the image files in ``folder`` named ``<id><suffix><ext>`` (hidden files skipped)."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stem = _strip_extension(path.name)
        if stem is None or not stem.endswith(suffix) or len(stem) == len(suffix):
            continue
        found[stem[: len(stem) - len(suffix)] if suffix else stem] = path
    return found


def _strip_extension(name: str) -> str | None:
    lower = name.lower()
    for ext in _IMAGE_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def _pair_by_id(images: dict[str, Path], labels: dict[str, Path], split: str, pairs: list, missing: list[str]) -> None:
    for case_id in sorted(images.keys() | labels.keys()):
        if case_id not in labels:
            missing.append(f"{images[case_id]} (no label map)")
        elif case_id not in images:
            missing.append(f"{labels[case_id]} (no image)")
        else:
            pairs.append((case_id, images[case_id], labels[case_id], split))


def _nnunet_label_names(path: Path) -> dict[int, str]:
    """Names from an nnU-Net ``dataset.json``: v2 ``{"liver": 1}`` or v1 ``{"1": "liver"}`` (best effort)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8")).get("labels", {})
    except (OSError, ValueError, AttributeError):
        return {}
    names = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        if isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
        elif isinstance(value, str) and str(key).isdigit():
            names[int(key)] = value
    return {v: n for v, n in names.items() if v > 0}


def _check_unique_ids(cases: Sequence[Case], where: Path) -> None:
    seen, repeated = set(), []
    for case in cases:
        if case.id in seen and case.id not in repeated:
            repeated.append(case.id)
        seen.add(case.id)
    if repeated:
        raise DataError(f"{where}: case ids must be unique; repeated: {_first_few(repeated)}")


def _first_few(items: Sequence[str], sep: str = ", ") -> str:
    shown = sep.join(items[:_MAX_LISTED])
    return shown + (f"{sep}... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """One label value of one case: what the robot user clicks on (EVALUATION.md).

    Args:
        case: the case.
        label: the label value in its label map (> 0).
        name: the structure's name (``label_<v>`` if the case does not name it).
        volume_mm3: foreground volume in mm³ (informational; not compared).
    """

    case: Case
    label: int
    name: str
    volume_mm3: float = field(default=0.0, compare=False)


def list_targets(
    cases: Iterable[Case], min_volume_mm3: float = 10.0, check_geometry: bool = True
) -> tuple[list[Target], list[dict]]:
    """The evaluation targets of ``cases``: every label value present in each label map.

    The label maps decide which values exist. A value smaller than ``min_volume_mm3`` (voxel count × voxel
    volume) is skipped, and so is a value the case names but its label map does not hold.

    Args:
        cases: the cases (each label map is read once).
        min_volume_mm3: smallest foreground volume that makes a target (EVALUATION.md: 10 mm³).
        check_geometry: also check that every label map lies on its image (:func:`check_label_inside_image`, with
            the image's header only), so a misplaced label map fails here, before any training or evaluation.

    Returns:
        ``(targets, skipped)``: targets in case order then label order; skipped ones as
        ``{"case": id, "label": value, "name": name, "reason": text}``.

    Raises:
        ImageError: a label map (or, with ``check_geometry``, an image header) cannot be read. DataError: a label
            map holds negative or non-integer values, or (``check_geometry``) labelled voxels outside its image.
    """
    targets, skipped = [], []
    for case in cases:
        volume = read_volume(case.label)
        labels = _label_array(case.label, volume)
        if check_geometry:
            check_label_inside_image(case, read_geometry(case.image), volume, labels)
        counts = _voxel_counts(labels)
        voxel_mm3 = float(abs(np.linalg.det(volume.ijk_to_ras[:3, :3])))
        for value in sorted(counts.keys() | case.labels.keys()):
            name = case.labels.get(value, f"label_{value}")
            mm3 = counts.get(value, 0) * voxel_mm3
            if value not in counts:
                reason = "named in the case's labels but absent from its label map"
            elif mm3 < min_volume_mm3:
                reason = f"foreground {mm3:.3g} mm^3 < {min_volume_mm3:g} mm^3 ({counts[value]} voxels)"
            else:
                targets.append(Target(case, value, name, mm3))
                continue
            skipped.append({"case": case.id, "label": value, "name": name, "reason": reason})
    return targets, skipped


def _label_voxel_counts(path: Path, volume: Volume | None = None) -> dict[int, int]:
    """``{value: voxel count}`` of the non-zero values of a label map (read from ``path`` unless given)."""
    return _voxel_counts(_label_array(path, read_volume(path) if volume is None else volume))


def _voxel_counts(array: np.ndarray) -> dict[int, int]:
    """``{value: voxel count}`` of the non-zero values of a non-negative integer array."""
    if array.size and array.max() <= 65535:  # the common case (uint8/int16 maps): one fast pass
        counts = np.bincount(array.ravel().astype(np.int64, copy=False))
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v > 0}
    values, counts = np.unique(array, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts) if v > 0}


def _label_array(path: Path, volume: Volume) -> np.ndarray:
    """The label map's voxels as non-negative integers (float maps must hold whole numbers)."""
    array = volume.array
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise DataError(f"{path}: label map has non-integer values; is it an image rather than a label map?")
        array = rounded.astype(np.int64)
    if array.size and array.min() < 0:
        raise DataError(f"{path}: label map has negative values; labels are 0 (background) and positive integers")
    return array


# ---------------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True, eq=False)
class Preprocessed:
    """A case resampled onto a RAS-aligned grid around its labelled voxels.

    Args:
        image: ``(nR, nA, nS)`` float32, raw intensities (HU for CT; not normalised), trilinear; voxels outside
            the image (corners of oblique scans) hold the image's minimum.
        label: ``(nR, nA, nS)`` uint8 label values, nearest-neighbour; 0 outside the image.
        origin_ras: ``(3,)`` RAS mm of the centre of voxel ``(0, 0, 0)``.
        spacing: voxel size in mm (isotropic).
        case_id: the case's id.
    """

    image: np.ndarray
    label: np.ndarray
    origin_ras: np.ndarray
    spacing: float
    case_id: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size along (R, A, S)."""
        return tuple(int(n) for n in self.image.shape)

    def voxel_to_ras(self, index: np.ndarray) -> np.ndarray:
        """Grid indices ``(..., 3)`` in (R, A, S) order -> RAS mm ``(..., 3)``."""
        return self.origin_ras + self.spacing * np.asarray(index, dtype=np.float64)

    def ras_to_voxel(self, ras: np.ndarray) -> np.ndarray:
        """RAS mm ``(..., 3)`` -> continuous grid indices ``(..., 3)`` (round for the nearest voxel)."""
        return (np.asarray(ras, dtype=np.float64) - self.origin_ras) / self.spacing


def preprocess_case(case: Case, spacing: float = 1.5, margin_mm: float = 96.0) -> Preprocessed:
    """Resample a case onto a RAS-aligned ``spacing`` mm grid around its labelled voxels (no cache).

    The grid covers the RAS bounding box of all labelled voxels plus ``margin_mm`` on each side, clipped to
    the RAS bounding box of the image's voxel centres, and is centred in that box. A label map without
    foreground gives the whole image. Image and label are each resampled through their own geometry, so a
    label map on another grid than its image still lands in the right place.

    Raises:
        ImageError: an unreadable file. DataError: a label map with negative, non-integer or > 255 values, or
            labelled voxels that lie entirely outside the image.
    """
    _check_grid_options(spacing, margin_mm)
    image = read_volume(case.image)
    label_volume = read_volume(case.label)
    labels = _label_array(case.label, label_volume)
    if labels.size and labels.max() > 255:
        raise DataError(f"{case.label}: label values above 255 are not supported (found {int(labels.max())})")
    check_label_inside_image(case, image, label_volume, labels)
    lo_img, hi_img = _ras_bounds(image, np.zeros(3), np.asarray(image.shape_ijk) - 1.0)
    fg = labels > 0
    if fg.any():
        k, j, i = (np.flatnonzero(fg.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        lo_fg, hi_fg = _ras_bounds(label_volume, np.array([i[0], j[0], k[0]]), np.array([i[-1], j[-1], k[-1]]))
        lo, hi = np.maximum(lo_fg - margin_mm, lo_img), np.minimum(hi_fg + margin_mm, hi_img)
    else:
        lo, hi = lo_img, hi_img
    hi = np.maximum(hi, lo)  # labelled voxels up to one voxel outside the image (allowed above) leave an empty box
    extent = np.maximum(hi - lo, 0.0)
    shape = tuple(int(n) for n in np.floor(extent / spacing + 1e-6).astype(int) + 1)
    origin = lo + (extent - (np.asarray(shape) - 1) * spacing) / 2  # centre the grid in [lo, hi]
    fill = float(image.array.min())
    out_image = _resample(image, origin, shape, spacing, "bilinear", image.array, fill=fill).astype(np.float32)
    out_label = _resample(label_volume, origin, shape, spacing, "nearest", labels, fill=0.0)
    return Preprocessed(out_image, np.rint(out_label).astype(np.uint8), origin, float(spacing), case.id)


def label_on_image_grid(case: Case, image: Volume, label_volume: Volume) -> np.ndarray:
    """The case's label values on its image's grid: what a label map means for clicks and Dice on that image.

    The one geometry rule of every command (``mais train``, ``mais evaluate``, few-shot, learning in Slicer): a label
    map is placed through its own geometry (origin, spacing, direction), and every labelled voxel must lie inside the
    image (:func:`check_label_inside_image`). A label map on the image's grid is used as it is; one on another grid
    is resampled onto it (nearest neighbour).

    Args:
        case: the case (named in error messages).
        image: its image, as read from ``case.image``.
        label_volume: its label map, as read from ``case.label``.

    Returns:
        ``(K, J, I)`` non-negative integer array shaped like ``image.array``.

    Raises:
        DataError: negative or non-integer label values, or labelled voxels outside the image.
    """
    labels = _label_array(case.label, label_volume)
    check_label_inside_image(case, image, label_volume, labels)
    if same_grid(image, label_volume):
        return labels
    return resample_label_map(label_volume.with_array(labels), image)


def same_grid(a: Volume, b: Volume, atol_mm: float = 1e-3) -> bool:
    """Whether two volumes share one voxel grid: the same shape and IJK->RAS matrices within ``atol_mm``."""
    return a.array.shape == b.array.shape and bool(np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=atol_mm, rtol=0))


def check_label_inside_image(case: Case, image: Volume, label_volume: Volume, labels: np.ndarray) -> None:
    """Refuse a label map whose labelled voxels lie outside its image (one voxel of tolerance).

    Such a label map belongs to another image, or its geometry (origin, spacing, direction) is wrong: scoring or
    training on it as if it were aligned would give meaningless numbers. Label maps on the image's grid pass at once;
    on another grid every labelled voxel centre is mapped into the image's voxel coordinates (in slabs, so memory
    stays bounded) and must fall within the image's voxels grown by one voxel on each side.

    Args:
        labels: ``label_volume``'s voxels as non-negative integers (:func:`_label_array`).

    Raises:
        DataError: naming the case, the files, how many labelled voxels are outside and how far.
    """
    if same_grid(image, label_volume):
        return
    to_image = image.ras_to_ijk @ label_volume.ijk_to_ras  # label IJK -> image IJK
    upper = np.asarray(image.shape_ijk, dtype=np.float64)  # voxel centres 0..n-1, +-1 voxel of tolerance -> -1..n
    outside, total, farthest = 0, 0, 0.0
    step = max(1, _MAX_CHUNK_VOXELS // max(1, labels.shape[1] * labels.shape[2]))
    for k0 in range(0, labels.shape[0], step):
        k, j, i = np.nonzero(labels[k0 : k0 + step])
        if k.size == 0:
            continue
        ijk = np.stack([i, j, k + k0], axis=1).astype(np.float64) @ to_image[:3, :3].T + to_image[:3, 3]
        excess = np.maximum(np.maximum(-1.0 - ijk, ijk - upper), 0.0) * image.spacing  # mm beyond, per axis
        distance = np.linalg.norm(excess, axis=1)
        total += k.size
        outside += int(np.count_nonzero(distance > 1e-6))
        farthest = max(farthest, float(distance.max()))
    if outside:
        raise DataError(
            f"case {case.id!r}: {outside:,} of the {total:,} labelled voxels of {case.label} lie outside the image "
            f"{case.image} (up to about {farthest:.0f} mm beyond its edge); the label map does not belong to this "
            "image, or its geometry (origin, spacing, direction) is wrong: save it again from a segmentation of "
            "this image"
        )


def _check_grid_options(spacing: float, margin_mm: float) -> None:
    if not (np.isfinite(spacing) and spacing > 0):
        raise ConfigError(f"spacing must be a positive number of mm, got {spacing!r}")
    if not (np.isfinite(margin_mm) and margin_mm >= 0):
        raise ConfigError(f"margin_mm must be zero or a positive number of mm, got {margin_mm!r}")


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of the axis-aligned box ``[lo, hi]`` (float64)."""
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], np.float64)


def _ras_bounds(volume: Volume, lo_ijk: np.ndarray, hi_ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS bounding box ``(lo, hi)`` of the IJK box ``[lo_ijk, hi_ijk]`` (of its 8 corners, so oblique grids too)."""
    ras = volume.ijk_to_ras_points(_box_corners(lo_ijk, hi_ijk))
    return ras.min(0), ras.max(0)


def _resample(
    volume: Volume,
    origin: np.ndarray,
    shape: tuple[int, int, int],
    spacing: float,
    mode: str,
    array: np.ndarray,
    fill: float,
) -> np.ndarray:
    """``resample_to_ras_grid`` in slabs along S, with grid voxels outside the image's voxel centres set to
    ``fill`` (its zero padding would otherwise read as 0 HU = water at the corners of oblique CTs)."""
    n_r, n_a, n_s = shape
    out = np.empty(shape, dtype=np.float32)
    step = max(1, _MAX_CHUNK_VOXELS // (n_r * n_a))
    inv = volume.ras_to_ijk
    size = np.asarray(volume.shape_ijk, dtype=np.float64)
    # The grid is a box and the image's voxel-centre range is a box in IJK: when the grid's 8 corners map
    # inside it, every grid voxel does (an affine map keeps convexity), so the per-voxel test is skipped.
    corners_ijk = volume.ras_to_ijk_points(_box_corners(origin, origin + spacing * (np.asarray(shape) - 1.0)))
    check = bool(np.any((corners_ijk < -1e-3) | (corners_ijk > size - 1 + 1e-3)))
    ras_r = origin[0] + spacing * np.arange(n_r)
    ras_a = origin[1] + spacing * np.arange(n_a)
    for s0 in range(0, n_s, step):
        n = min(step, n_s - s0)
        slab_origin = np.array([origin[0], origin[1], origin[2] + spacing * s0])
        values = resample_to_ras_grid(volume, slab_origin, (n_r, n_a, n), spacing, mode=mode, array=array)
        slab = values[0, 0].numpy()
        if not check:
            out[:, :, s0 : s0 + n] = slab
            continue
        ras_s = slab_origin[2] + spacing * np.arange(n)
        ijk = (
            inv[:3, 0] * ras_r[:, None, None, None]
            + inv[:3, 1] * ras_a[None, :, None, None]
            + inv[:3, 2] * ras_s[None, None, :, None]
            + inv[:3, 3]
        )  # (nR, nA, n, 3) continuous (i, j, k)
        outside = np.any((ijk < -1e-3) | (ijk > size - 1 + 1e-3), axis=-1)
        slab[outside] = fill
        out[:, :, s0 : s0 + n] = slab
    return out


class PreprocessCache:
    """Preprocessed cases on disk, one compressed ``.npz`` per case, shared by runs and processes.

    An entry's key is the SHA-256 of the resolved image and label paths, their sizes, inode numbers and
    modification times (ns), ``spacing``, ``margin_mm`` and :data:`CACHE_VERSION`; rewriting or replacing a
    source file gives a new key, so the entry is recomputed and the stale one removed (the entry of the same
    case id, files, spacing and margin; other spacings and data sets keep theirs). Entries
    are written to a temporary file and renamed into place, so concurrent readers never see half a file and
    two processes computing the same case both end with a complete entry.

    Args:
        cache_dir: folder of the entries; default ``$MAIS_CACHE_DIR/preprocessed`` or
            ``~/.cache/maissegment/preprocessed``. Created on first write.
        spacing: grid spacing in mm (the model's 1.5).
        margin_mm: context kept around the labelled voxels on each side (96 mm covers a 128³ crop at 1.5 mm
            centred on any labelled voxel).

    Attributes:
        hits, misses: entries read from disk / computed by this instance (for tests and progress lines).

    Examples:
        >>> cache = PreprocessCache()
        >>> for case in load_cases("shared/data/manifest.json", split="train"):
        ...     item = cache.get(case)  # item.image[r, a, s], item.label[r, a, s]
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, spacing: float = 1.5, margin_mm: float = 96.0):
        _check_grid_options(spacing, margin_mm)
        if cache_dir is None:
            root = os.environ.get(CACHE_DIR_ENV) or _DEFAULT_CACHE_ROOT
            cache_dir = Path(root).expanduser() / "preprocessed"
        self.cache_dir = Path(cache_dir).expanduser()
        self.spacing = float(spacing)
        self.margin_mm = float(margin_mm)
        self.hits = 0
        self.misses = 0

    def key(self, case: Case) -> str:
        """The entry key of ``case`` (hex SHA-256; changes when either source file changes)."""
        parts: dict[str, object] = {"version": CACHE_VERSION, "spacing": self.spacing, "margin_mm": self.margin_mm}
        for name, path in (("image", case.image), ("label", case.label)):
            try:
                resolved = Path(path).resolve(strict=True)
                st = resolved.stat()
            except OSError as exc:
                raise DataError(f"case {case.id!r}: cannot read its {name} {path}: {exc.strerror or exc}") from None
            parts[name] = [str(resolved), st.st_size, st.st_mtime_ns, st.st_ino]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, case: Case) -> Path:
        """Where the entry of ``case`` lives: ``<cache_dir>/<safe id>-<path hash>__<key>.npz``."""
        return self.cache_dir / f"{self._prefix(case)}{self.key(case)[:32]}.npz"

    def get(self, case: Case) -> Preprocessed:
        """The preprocessed case: read from the cache, or computed, stored and returned.

        Raises:
            ImageError / DataError: as :func:`preprocess_case`; DataError when a source file vanished.
        """
        key = self.key(case)
        entry = self.cache_dir / f"{self._prefix(case)}{key[:32]}.npz"
        item = self._read(entry, key, case.id)
        if item is not None:
            self.hits += 1
            return item
        item = preprocess_case(case, self.spacing, self.margin_mm)
        self.misses += 1
        self._write(entry, key, item)
        self._remove_stale(case, keep=entry)
        return item

    def clear(self) -> int:
        """Delete every entry (and leftover temporary file) of this cache folder; returns how many files went.

        Only files this class writes (``*.npz`` and ``.*.tmp``) are removed, never the folder itself.
        """
        removed = 0
        if not self.cache_dir.is_dir():
            return 0
        for path in [*self.cache_dir.glob("*.npz"), *self.cache_dir.glob(".*.tmp")]:
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        return removed

    # ------------------------------------------------------------------ internals
    def _prefix(self, case: Case) -> str:
        # The id keeps file names readable. The hash of the source paths and grid options keeps two data sets
        # that both have a case "case_001", or two runs at different spacings, from evicting each other's
        # entries; CACHE_VERSION is left out so entries of an older version count as stale and go.
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", case.id)[:80]
        where = f"{Path(case.image).resolve()}\n{Path(case.label).resolve()}\n{self.spacing!r}\n{self.margin_mm!r}"
        return f"{safe}-{hashlib.sha256(where.encode()).hexdigest()[:8]}__"

    def _read(self, entry: Path, key: str, case_id: str) -> Preprocessed | None:
        if not entry.is_file():
            return None
        try:
            with np.load(entry, allow_pickle=False) as npz:
                if str(npz["key"]) != key:
                    return None
                return Preprocessed(
                    image=npz["image"],
                    label=npz["label"],
                    origin_ras=npz["origin_ras"].astype(np.float64),
                    spacing=float(npz["spacing"]),
                    case_id=case_id,
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # damaged (disk trouble, foreign file): recompute and overwrite

    def _write(self, entry: Path, key: str, item: Preprocessed) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"cannot create the cache folder {self.cache_dir}: {exc.strerror or exc}; "
                f"set {CACHE_DIR_ENV} to a writable folder"
            ) from None

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
                np.savez_compressed(
                    f,
                    image=item.image,
                    label=item.label,
                    origin_ras=item.origin_ras,
                    spacing=np.float64(item.spacing),
                    key=np.str_(key),
                    case_id=np.str_(item.case_id),
                    version=np.int64(CACHE_VERSION),
                )

        try:
            atomic_write(entry, write)
        except OSError as exc:
            raise DataError(f"cannot write the cache entry {entry}: {exc.strerror or exc}") from None

    def _remove_stale(self, case: Case, keep: Path) -> None:
        for path in self.cache_dir.glob(f"{self._prefix(case)}*.npz"):  # the prefix holds no glob characters
            if path != keep:
                with contextlib.suppress(OSError):  # another process may have removed it already
                    path.unlink()
