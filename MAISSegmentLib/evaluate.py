"""Dice vs clicks with the robot user of ``docs/EVALUATION.md``; the result JSON and PNG tools read.

Methods, compared in one run on the same targets:

* ``mais``: the model with memory; ``no-memory``: the same weights with the memory off (the paper's
  Ft-SAM3D), both with the default :class:`SessionOptions` (ROIs grow only from the mask connected to include
  points); ``mais-grow-all``: ``mais`` with ``grow_connected=False`` (ROIs grow from any part of the mask, as
  before that option); ``mais-zoom``: ``mais`` with ``zoom=True`` (the ROI's voxel size follows the object);
  ``ckpt:FILE``: another checkpoint (with memory if it has one);
* ``growcut``: Slicer's Grow from seeds (``vtkImageGrowCutSegment`` from slicer-core) seeded with the
  same kind of clicks, restricted to the region the model sees (the 192 mm ROI box of the first click).

Every method runs its own click sequence: click 1 is the same for all (it depends only on the target),
later clicks come from each method's own errors, as a user would click. The model methods go through
:class:`InteractiveSession` on the original image grid, exactly as in interactive use.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .clicks import RobotClick, RobotUser
from .errors import ConfigError
from .fileutil import atomic_write
from .model.mais import MAISModel
from .roi import Box, Roi, positive_roi_range, resample_to_ras_grid, roi_logits_on_grid
from .session import MAX_CLICKS, InteractiveSession, SessionOptions
from .volume import Volume

RESULT_VERSION = 1


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two masks; an empty prediction of a non-empty target is 0 (two empty masks: 1)."""
    p, g = pred.astype(bool), gt.astype(bool)
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, g).sum()) / denom


def target_seed(seed: int, case_id: str, label: int) -> int:
    """Per-target robot seed: the same for every method, independent of target order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{case_id}/{label}".encode()).digest()[:4], "little")


class ModelMethod:
    """A network method: clicks go through an :class:`InteractiveSession` on the original grid."""

    def __init__(
        self, model: MAISModel, use_memory: bool, memory_size: int = 60, grow_connected: bool = True, zoom: bool = False
    ) -> None:
        self.model, self.use_memory, self.memory_size = model, use_memory and model.has_memory, memory_size
        self.grow_connected = grow_connected  # SessionOptions.grow_connected (False: the ``mais-grow-all`` method)
        self.zoom = zoom  # SessionOptions.zoom (True: the ``mais-zoom`` method)
        self.session: InteractiveSession | None = None

    def describe(self) -> dict[str, Any]:
        rep = getattr(self.model, "load_report", None)
        return {
            "id": (rep.model_id or rep.path) if rep else None,
            "sha256": rep.sha256 if rep else None,
            "memory": self.use_memory,
            "memory_size": self.memory_size if self.use_memory else 0,
            "grow_connected": self.grow_connected,
            "zoom": self.zoom,
        }

    def start(self, volume: Volume) -> None:
        self.session = InteractiveSession(
            self.model,
            SessionOptions(
                use_memory=self.use_memory,
                memory_size=self.memory_size,
                grow_connected=self.grow_connected,
                zoom=self.zoom,
            ),
        )
        self.session.set_image(volume)

    def click(self, c: RobotClick) -> np.ndarray:
        self.session.add_click(c.ijk, c.include, space="ijk")
        return self.session.mask


class GrowCutMethod:
    """Slicer's Grow from seeds on the ROI box of the first click (the region the model sees)."""

    def __init__(self) -> None:
        self.volume: Volume | None = None
        self.clicks: list[RobotClick] = []
        self.region = None

    def describe(self) -> dict[str, Any]:
        return {"id": "slicer-grow-from-seeds", "sha256": None, "memory": False, "memory_size": 0}

    def start(self, volume: Volume) -> None:
        self.volume, self.clicks, self.region = volume, [], None

    def click(self, c: RobotClick) -> np.ndarray:
        from .baselines import growcut_segment

        if self.region is None:
            ras = self.volume.ijk_to_ras_points(np.array([c.ijk], dtype=float))[0]
            self.region = Roi(tuple(ras)).box_on(self.volume).slices
        self.clicks.append(c)
        return growcut_segment(self.volume.array, self.clicks, self.volume.spacing, region=self.region)


# ------------------------------------------------------------------------------------------------ oracle methods
ORACLE_GRIDS = (32, 64, 128)  # output grids of the ``oracle-N`` methods (N^3 values for a 128^3 ROI)
ORACLE_SUPERSAMPLE = (2, 4)  # sub-samples per ROI voxel and axis for the area average: at least 2 (0.75 mm for a
# 1.5 mm ROI), more for images finer than that (one sub-sample per image voxel), at most 4 (bounds the cost)
ORACLE_FACE_VOXELS = 4  # ROI voxels (one 6 mm cell of the 32^3 grid) at a face the truth must reach to grow there
ORACLE_CHUNK_POINTS = 2_000_000  # sub-samples resampled per call (bounds memory)


def oracle_rois(
    volume: Volume,
    truth: np.ndarray,
    first_ras: Sequence[float],
    roi_size: int = 128,
    roi_spacing: float = 1.5,
    max_rois: int | None = None,
) -> list[Roi]:
    """The ROIs a session would use for ``truth`` if the model predicted it perfectly.

    ROI 0 is centred on the first click (as :class:`InteractiveSession` places it). The session's growth rule is
    then applied to the truth instead of a prediction: where the truth reaches a ROI face (its outermost
    :data:`ORACLE_FACE_VOXELS` ROI voxels, the session's 6 mm low-res layer) and the image continues at least
    :data:`~MAISSegmentLib.session.GROW_MIN_MM` beyond it, the neighbour half a window further along that axis is
    added, unless a ROI is already there. Truth left outside every ROI (a disconnected part, or one beyond a face
    where the image ends) gets a new ROI centred on its voxel nearest its centroid, as a click there would open
    one, and grows in turn. At most ``max_rois`` (the session's default) ROIs.

    Args:
        volume: the image (its geometry).
        truth: ``(K, J, I)`` bool mask on the image grid.
        first_ras: RAS mm of the first click (ROI 0's centre).

    Returns:
        The ROIs, ROI 0 first (the same for every output grid, so the oracles differ only by their grid).
    """
    from .session import GROW_MIN_MM

    max_rois = SessionOptions().max_rois if max_rois is None else max_rois
    kji = np.argwhere(truth)
    points = volume.ijk_to_ras_points(kji[:, ::-1].astype(np.float64))  # (N, 3) RAS of the truth's voxels
    n = np.asarray(volume.shape_ijk, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (-0.5, n[0] - 0.5) for y in (-0.5, n[1] - 0.5) for z in (-0.5, n[2] - 0.5)])
    corners_ras = volume.ijk_to_ras_points(corners)
    image_lo, image_hi = corners_ras.min(0), corners_ras.max(0)
    half = roi_size * roi_spacing / 2
    rois: list[Roi] = []
    queue: list[Roi] = []
    covered = np.zeros(len(points), dtype=bool)
    center = np.asarray(first_ras, dtype=np.float64)
    while len(rois) < max_rois:
        rois.append(Roi(tuple(float(x) for x in center), roi_size, roi_spacing))
        queue.append(rois[-1])
        while queue and len(rois) < max_rois:
            roi = queue.pop(0)
            a = roi.ras_to_roi(points)
            inside = np.all((a >= -0.5) & (a <= roi_size - 0.5), axis=-1)
            covered |= inside
            for axis in range(3):
                for sign in (-1, 1):
                    edge = a[inside, axis]
                    reach = edge < ORACLE_FACE_VOXELS - 0.5 if sign < 0 else edge > roi_size - 0.5 - ORACLE_FACE_VOXELS
                    if not reach.any():
                        continue
                    face = roi.center[axis] + sign * half
                    if (image_hi[axis] - face if sign > 0 else face - image_lo[axis]) < GROW_MIN_MM:
                        continue  # the image (almost) ends at this face: the session grows no ROI there
                    nxt = np.asarray(roi.center, dtype=np.float64)
                    nxt[axis] += sign * half
                    if any(np.max(np.abs(np.asarray(o.center) - nxt)) < half / 2 for o in rois):
                        continue  # already covered
                    if len(rois) >= max_rois:
                        break
                    rois.append(Roi(tuple(float(x) for x in nxt), roi_size, roi_spacing))
                    queue.append(rois[-1])
        for roi in queue:  # ROIs added when max_rois was reached
            covered |= roi.contains(points)
        if covered.all() or not len(points):
            break
        rest = points[~covered]
        center = rest[int(np.argmin(np.linalg.norm(rest - rest.mean(0), axis=-1)))]
    return rois


def truth_fractions(volume: Volume, truth: np.ndarray, roi: Roi, supersample: int | None = None) -> torch.Tensor:
    """How much of each ROI voxel is truth, and how much of it is inside the image.

    A voxel of the label map is a box of its spacing. Each ROI voxel is split into ``supersample^3`` sub-voxels,
    each takes the label of the image voxel containing its centre (nearest neighbour,
    :func:`~MAISSegmentLib.roi.resample_to_ras_grid`); the means over the ROI voxel of "truth" and of "inside the
    image" are its two channels. Only the part of the ROI that the truth reaches is resampled, in whole cells of
    the coarsest output grid (elsewhere both channels are 0), so :func:`oracle_logits` can average both over any
    output cell and divide.

    Args:
        volume: the image (its geometry).
        truth: ``(K, J, I)`` bool mask on the image grid.
        roi: the ROI.
        supersample: sub-samples per ROI voxel and axis; default: enough for one per image voxel along the image's
            finest axis, within :data:`ORACLE_SUPERSAMPLE`.

    Returns:
        ``(1, 2, size, size, size)`` float32 in ROI order (R, A, S): channel 0 the fraction covered by the truth,
        channel 1 the fraction inside the image; values in [0, 1].
    """
    size = roi.size
    out = torch.zeros(1, 2, size, size, size)
    kji = np.argwhere(truth)
    if not len(kji):
        return out
    # the truth's voxel box (grown by one voxel, to hold the voxels' extent) in ROI indices, in whole coarsest cells
    lo, hi = kji.min(0)[::-1] - 1.0, kji.max(0)[::-1] + 1.0
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    a = roi.ras_to_roi(volume.ijk_to_ras_points(corners))
    cell = size // min(ORACLE_GRIDS)
    a_lo = np.clip(np.floor((a.min(0) + 0.5) / cell).astype(int) * cell, 0, size)  # ROI voxel a: [a - 0.5, a + 0.5)
    a_hi = np.clip(np.ceil((a.max(0) + 0.5) / cell).astype(int) * cell, 0, size)
    if np.any(a_hi <= a_lo):
        return out
    lo_s, hi_s = ORACLE_SUPERSAMPLE
    s = supersample or int(np.clip(np.ceil(roi.spacing / float(np.min(volume.spacing)) - 1e-6), lo_s, hi_s))
    fine_spacing = roi.spacing / s
    origin = roi.roi_to_ras(a_lo.astype(np.float64) - 0.5) + fine_spacing / 2  # centre of the first sub-voxel
    shape = tuple(int(x) for x in (a_hi - a_lo) * s)
    coded = truth.astype(np.float32) + 1  # 2: truth, 1: image, 0 (the resampling's padding): outside the image
    rows = max(s, ORACLE_CHUNK_POINTS // (shape[1] * shape[2]) // s * s)  # whole ROI voxels per chunk
    parts = []
    for r0 in range(0, shape[0], rows):
        n_r = min(rows, shape[0] - r0)
        o = origin + np.array([r0 * fine_spacing, 0.0, 0.0])
        fine = resample_to_ras_grid(volume, o, (n_r, shape[1], shape[2]), fine_spacing, "nearest", array=coded)
        parts.append(F.avg_pool3d(torch.cat([(fine > 1.5).float(), (fine > 0.5).float()], dim=1), s))
    out[..., a_lo[0] : a_hi[0], a_lo[1] : a_hi[1], a_lo[2] : a_hi[2]] = torch.cat(parts, dim=2)
    return out


def oracle_logits(fractions: torch.Tensor, grid: int) -> torch.Tensor:
    """The oracle's logits on a ``grid``^3 output grid: the area average of the truth minus 0.5.

    The average is over the part of each cell inside the image (outside it there is no truth to average, and a
    model may predict anything there); a cell wholly outside the image gets -0.5.

    Args:
        fractions: ``(1, 2, size, size, size)`` from :func:`truth_fractions`.
        grid: output grid edge (divides ``size``).

    Returns:
        ``(1, 1, grid, grid, grid)``: > 0 where more than half of the cell is truth, so the session's "logit > 0"
        after trilinear upsampling is a threshold at 0.5 of the upsampled area average.
    """
    size = fractions.shape[-1]
    if size % grid:
        raise ConfigError(f"oracle output grid {grid} does not divide the ROI's {size} voxels")
    pooled = F.avg_pool3d(fractions, size // grid)
    truth, inside = pooled[:, :1], pooled[:, 1:]
    return torch.where(inside > 0, truth / inside.clamp(min=1e-12), torch.zeros_like(truth)) - 0.5


def compose_rois(volume: Volume, logits: Sequence[tuple[Roi, torch.Tensor]], blend_margin: float = 16.0) -> np.ndarray:
    """The mask of several ROIs' logits on the image grid, as :class:`InteractiveSession` composes it.

    Each ROI's logits are mapped by :func:`~MAISSegmentLib.roi.roi_logits_on_grid` (trilinear, the session's
    mapping) inside the box that can hold positive voxels; overlapping ROIs are cross-faded by their weights.

    Returns:
        ``(K, J, I)`` uint8 mask.
    """
    mask = np.zeros(volume.array.shape, dtype=np.uint8)
    box = Box.nothing()
    for roi, lg in logits:
        rng = positive_roi_range(lg, roi)
        if rng is not None:
            box = box.union(roi.box_on(volume, *rng))
    if box.empty:
        return mask
    parts = []
    for roi, lg in logits:
        sub = box.intersect(roi.box_on(volume))
        if sub.empty:
            continue
        values, weights = roi_logits_on_grid(lg, roi, volume, sub, blend_margin)
        rel = tuple(slice(s.start - o, s.stop - o) for s, o in zip(sub.slices, (box.lo[2], box.lo[1], box.lo[0])))
        parts.append((rel, values, weights))
    if len(parts) == 1:
        rel, v, w = parts[0]
        out = np.zeros(box.shape_kji, dtype=bool)
        out[rel] = (v > 0) & (w > 0)
    else:
        num = np.zeros(box.shape_kji, dtype=np.float32)
        den = np.zeros(box.shape_kji, dtype=np.float32)
        for rel, v, w in parts:
            num[rel] += w * v
            den[rel] += w
        out = (den > 0) & (num > 0)
    mask[box.slices] = out
    return mask


def oracle_mask(volume: Volume, truth: np.ndarray, first_ras: Sequence[float], grid: int) -> np.ndarray:
    """The best mask a model with a ``grid``^3 output for a 128^3 ROI at 1.5 mm can give (no model involved).

    The truth is area-averaged onto the output grid of each ROI of :func:`oracle_rois`, upsampled trilinearly and
    thresholded at 0.5 on the image grid exactly as the session maps a model's logits (:func:`compose_rois`).

    Args:
        volume: the image (its geometry).
        truth: ``(K, J, I)`` bool mask on the image grid.
        first_ras: RAS mm of the first click.
        grid: output grid edge (32, 64 or 128).

    Returns:
        ``(K, J, I)`` uint8 mask.
    """
    rois = oracle_rois(volume, truth, first_ras)
    return compose_rois(volume, [(r, oracle_logits(truth_fractions(volume, truth, r), grid)) for r in rois])


class OracleMethod:
    """``oracle-N``: the ceiling of a model whose output grid for a 128^3 ROI is ``N``^3 (:func:`oracle_mask`).

    It reads the truth (``uses_truth``); its mask depends only on the truth and the first click (``static``), so
    its Dice is the same at every click count. Oracles of one run share ``cache`` (the ROIs and the truth's
    per-voxel fractions of the current target), so the finer grids cost little more than the first.
    """

    uses_truth = True  # start() receives the truth
    static = True  # the mask never changes after the first click

    def __init__(self, grid: int, cache: dict[str, Any] | None = None) -> None:
        if grid not in ORACLE_GRIDS:
            raise ConfigError(f"oracle-{grid}: the output grid must be one of {', '.join(map(str, ORACLE_GRIDS))}")
        self.grid = grid
        self.cache = {} if cache is None else cache
        self.volume: Volume | None = None
        self.truth: np.ndarray | None = None
        self.mask: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "id": f"oracle-{self.grid}",
            "sha256": None,
            "memory": False,
            "memory_size": 0,
            "output_grid": self.grid,
        }

    def start(self, volume: Volume, truth: np.ndarray) -> None:
        self.volume, self.truth, self.mask = volume, truth, None

    def click(self, c: RobotClick) -> np.ndarray:
        if self.mask is None:
            key = (c.kji, self.truth.shape)
            if self.cache.get("truth") is not self.truth or self.cache.get("key") != key:
                ras = self.volume.ijk_to_ras_points(np.array([c.ijk], dtype=np.float64))[0]
                rois = oracle_rois(self.volume, self.truth, ras)
                fractions = [truth_fractions(self.volume, self.truth, r) for r in rois]
                self.cache.clear()
                self.cache.update(truth=self.truth, key=key, rois=rois, fractions=fractions)
            logits = [(r, oracle_logits(f, self.grid)) for r, f in zip(self.cache["rois"], self.cache["fractions"])]
            self.mask = compose_rois(self.volume, logits)
        return self.mask


def oracle_methods(names: Sequence[str]) -> dict[str, OracleMethod]:
    """``{"oracle-32": OracleMethod(32), ...}`` for the oracle names among ``names``, sharing one cache."""
    cache: dict[str, Any] = {}
    return {n: OracleMethod(int(n.split("-", 1)[1]), cache) for n in names if n in ORACLE_METHODS}


ORACLE_METHODS = tuple(f"oracle-{n}" for n in ORACLE_GRIDS)


def parse_clicks(text: str | Sequence[int]) -> list[int]:
    """``"1,5,10,20"`` -> ``[1, 5, 10, 20]`` (sorted, unique, 1 to :data:`~MAISSegmentLib.session.MAX_CLICKS`)."""
    try:
        values = sorted({int(x) for x in (text.split(",") if isinstance(text, str) else text)})
    except ValueError:
        raise ConfigError(f"--clicks {text!r}: give click counts like 1,5,10,20") from None
    if not values or values[0] < 1:
        raise ConfigError("--clicks: click counts must be >= 1")
    if values[-1] > MAX_CLICKS:
        raise ConfigError(f"--clicks {text}: at most {MAX_CLICKS} clicks per target (an object's limit in a session)")
    return values


def evaluate(
    targets: Sequence[Any],
    methods: dict[str, Any],
    clicks: Sequence[int] = (1, 5, 10, 20),
    strategy: str = "center",
    seed: int = 0,
    read: Callable[[Path], Volume] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method on every target; return the ``methods`` part of the result file.

    Args:
        targets: :class:`MAISSegmentLib.data.Target` s (case + label value + name).
        methods: name -> method object (:class:`ModelMethod`, :class:`GrowCutMethod`).
        clicks: click counts at which Dice is recorded; the run goes to the largest.

    Raises:
        ConfigError: no targets. DataError: a label map whose labelled voxels lie outside its image (label maps on
            another grid than their image are resampled onto it: :func:`MAISSegmentLib.data.label_on_image_grid`).
    """
    from .data import label_on_image_grid
    from .io import read_volume

    if not targets:
        raise ConfigError("no targets to evaluate: the cases hold no labelled structure of at least 10 mm^3")
    read = read or read_volume
    n_clicks = max(clicks)
    out = {name: {"model": m.describe(), "targets": [], "_times": []} for name, m in methods.items()}
    t_start = time.perf_counter()
    cache: dict[tuple[Path, Path], tuple[Volume, np.ndarray]] = {}
    for n, target in enumerate(targets):
        case = target.case
        key = (case.image, case.label)
        if key not in cache:
            cache.clear()  # one case at a time in memory
            image = read(case.image)
            cache[key] = (image, label_on_image_grid(case, image, read(case.label)))
        volume, labels = cache[key]
        gt = labels == target.label
        for name, method in methods.items():
            robot = RobotUser(strategy, seed=target_seed(seed, case.id, target.label), spacing=volume.spacing)
            if getattr(method, "uses_truth", False):
                method.start(volume, gt)  # an oracle: the ceiling of an output grid, computed from the truth
            else:
                method.start(volume)
            pred, scores = None, {}
            for k in range(1, n_clicks + 1):
                c = robot.click(gt, pred)
                t0 = time.perf_counter()
                pred = method.click(c)
                out[name]["_times"].append(time.perf_counter() - t0)
                if k in clicks:
                    scores[str(k)] = dice(pred, gt)
                if getattr(method, "static", False):  # the mask never changes: the same Dice at every count
                    d = dice(pred, gt)
                    scores = {str(j): d for j in clicks}
                    break
            out[name]["targets"].append(
                {
                    "case": case.id,
                    "label": int(target.label),
                    "name": target.name,
                    "source": case.source,
                    "family": structure_family(target.name),
                    "dice": scores,
                }
            )
        if progress:
            _progress(n + 1, len(targets), time.perf_counter() - t_start)
    if progress:
        sys.stderr.write("\n")
    for res in out.values():
        times = res.pop("_times")
        per = {str(k): [t["dice"][str(k)] for t in res["targets"]] for k in clicks}
        res["dice_mean"] = {k: float(np.mean(v)) if v else None for k, v in per.items()}
        res["dice_median"] = {k: float(np.median(v)) if v else None for k, v in per.items()}
        res["seconds_per_click_median"] = statistics.median(times) if times else None
        res["by_source"] = group_means(res["targets"], clicks, "source")
        res["by_family"] = group_means(res["targets"], clicks, "family")
        # put the per-target list last, as in EVALUATION.md
        res["targets"] = res.pop("targets")
    return out


# ---------------------------------------------------------------------------------------- families and grouping
# Structure families, first match wins (so "LungTumor" is a tumour, "portal_vein" a vessel, "spinal_cord" nervous
# tissue). A keyword matches a word of the name (split at "_", "-", spaces, digits and camelCase, lower-cased)
# exactly, or as its beginning when the keyword has 4 letters or more ("vertebra" matches "vertebrae").
STRUCTURE_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
    (family, tuple(keywords.split()))
    for family, keywords in (
        ("tumour/lesion", "tumor tumour lesion gtv ctv mass edema oedema necros metasta nodule cyst"),
        ("heart", "heart lv rv la ra myo myocard atrium atrial ventricle pericard"),
        ("vessel", "aorta artery arteries vein vena cava vessel carotid jugular trunk"),
        ("brain/nerve", "brain brainstem spinal cord nerve chiasm cochlea hippocamp"),
        ("gland", "gland parotid thyroid submandibular prostate pituitary adrenal lacrimal"),
        ("muscle", "muscle autochthon iliopsoas psoas gluteus masseter constrictor"),
        (
            "bone/cartilage",
            "bone rib ribs vertebra intervertebral disc cartilage mandible skull sacrum hip femur humerus scapula "
            "clavicula clavicle sternum pelvis tibia spine",
        ),
        ("GI tract/airway", "esophagus oesophagus larynx pharynx trachea stomach duodenum bowel colon rectum"),
        ("solid organ", "liver spleen kidney pancreas gallbladder lung bladder uterus ovary"),
    )
)
OTHER_FAMILY = "other"


def structure_family(name: str) -> str:
    """The family of a structure name (:data:`STRUCTURE_FAMILIES`), :data:`OTHER_FAMILY` when no keyword matches.

    Examples: ``"rib_left_6"`` -> ``"bone/cartilage"``, ``"LeftParotid"`` -> ``"gland"``, ``"Myo"`` -> ``"heart"``,
    ``"NonEnhancingTumor"`` -> ``"tumour/lesion"``, ``"portal_vein_and_splenic_vein"`` -> ``"vessel"``.
    """
    words = [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", name)]
    for family, keywords in STRUCTURE_FAMILIES:
        for key in keywords:
            if any(w == key or (len(key) >= 4 and w.startswith(key)) for w in words):
                return family
    return OTHER_FAMILY


def group_means(targets: Sequence[dict[str, Any]], clicks: Sequence[int], field: str) -> dict[str, dict[str, Any]]:
    """Mean Dice per value of a target field (``"source"`` or ``"family"``), groups sorted by name.

    Args:
        targets: the per-target entries of a method (``{"source": ..., "family": ..., "dice": {"1": ...}}``).
        clicks: the click counts.
        field: the field to group by.

    Returns:
        ``{group: {"n_targets": n, "dice_mean": {"1": mean, ...}}}``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        groups.setdefault(str(t.get(field, "")), []).append(t)
    return {
        g: {
            "n_targets": len(ts),
            "dice_mean": {str(k): float(np.mean([t["dice"][str(k)] for t in ts])) for k in clicks},
        }
        for g, ts in sorted(groups.items())
    }


def format_tables(methods: dict[str, Any], clicks: Sequence[int]) -> str:
    """The tables ``mais evaluate`` prints: mean Dice per method, then per source and per family for each method."""
    width = max(len(n) for n in methods)
    lines = [f"{'method':<{width}}  " + "  ".join(f"Dice@{k:<3}" for k in clicks) + "  s/click"]
    for name, res in methods.items():
        spc = res["seconds_per_click_median"]
        lines.append(
            f"{name:<{width}}  "
            + "  ".join(f"{res['dice_mean'][str(k)]:.3f}  " for k in clicks)
            + (f"  {spc:.3f}" if spc is not None else "  -")
        )
    for field, title in (("by_source", "source"), ("by_family", "family")):
        groups = sorted({g for res in methods.values() for g in res.get(field, {})})
        if not groups:
            continue
        gw = max(len(title), *(len(g) for g in groups))
        lines.append("")
        lines.append(f"{title:<{gw}}  targets  {'method':<{width}}  " + "  ".join(f"Dice@{k:<3}" for k in clicks))
        for g in groups:
            for name, res in methods.items():
                entry = res.get(field, {}).get(g)
                if entry is None:
                    continue
                lines.append(
                    f"{g:<{gw}}  {entry['n_targets']:>7}  {name:<{width}}  "
                    + "  ".join(f"{entry['dice_mean'][str(k)]:.3f}  " for k in clicks)
                )
    return "\n".join(lines)


def _progress(done: int, total: int, elapsed: float) -> None:
    width = 30
    eta = elapsed / done * (total - done)
    sys.stderr.write(
        f"\r[{'#' * int(width * done / total):<{width}}] {done}/{total} targets, "
        f"{elapsed / 60:.1f} min, eta {eta / 60:.1f} min "
    )
    sys.stderr.flush()


def result_document(
    command: str,
    manifest: str,
    split: str | None,
    n_cases: int,
    n_targets: int,
    n_skipped: int,
    clicks: Sequence[int],
    seed: int,
    methods: dict[str, Any],
    strategy: str = "center",
) -> dict[str, Any]:
    """The EVALUATION.md result file."""
    return {
        "version": RESULT_VERSION,
        "command": command,
        "data": {
            "manifest": manifest,
            "split": split,
            "n_cases": n_cases,
            "n_targets": n_targets,
            "n_skipped": n_skipped,
        },
        "clicks": list(clicks),
        "seed": seed,
        "strategy": strategy,
        "methods": methods,
    }


def plot_results(doc: dict[str, Any], path: str | Path) -> None:
    """Dice vs clicks, one line per method (mean over targets), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = doc["clicks"]
    for name, res in doc["methods"].items():
        ys = [res["dice_mean"][str(k)] for k in xs]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    d = doc["data"]
    ax.set_title(f"{d.get('split') or 'all'}: {d['n_targets']} targets, {doc.get('strategy', 'center')} clicks")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    plt.close(fig)
