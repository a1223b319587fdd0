"""Dice vs clicks with the robot user of ``docs/EVALUATION.md``; the result JSON and PNG tools read.

Methods, compared in one run on the same targets:

* ``mais``: the model with memory; ``no-memory``: the same weights with the memory off (the paper's
  Ft-SAM3D), both with the default :class:`SessionOptions` (ROIs grow only from the mask connected to include
  points); ``mais-grow-all``: ``mais`` with ``grow_connected=False`` (ROIs grow from any part of the mask, as
  before that option); ``ckpt:FILE``: another checkpoint (with memory if it has one);
* ``growcut``: Slicer's Grow from seeds (``vtkImageGrowCutSegment`` from slicer-core) seeded with the
  same kind of clicks, restricted to the region the model sees (the 192 mm ROI box of the first click).

Every method runs its own click sequence: click 1 is the same for all (it depends only on the target),
later clicks come from each method's own errors, as a user would click. The model methods go through
:class:`InteractiveSession` on the original image grid, exactly as in interactive use.
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .clicks import RobotClick, RobotUser
from .errors import ConfigError
from .fileutil import atomic_write
from .model.mais import MAISModel
from .roi import Roi
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

    def __init__(self, model: MAISModel, use_memory: bool, memory_size: int = 60, grow_connected: bool = True) -> None:
        self.model, self.use_memory, self.memory_size = model, use_memory and model.has_memory, memory_size
        self.grow_connected = grow_connected  # SessionOptions.grow_connected (False: the ``mais-grow-all`` method)
        self.session: InteractiveSession | None = None

    def describe(self) -> dict[str, Any]:
        rep = getattr(self.model, "load_report", None)
        return {
            "id": (rep.model_id or rep.path) if rep else None,
            "sha256": rep.sha256 if rep else None,
            "memory": self.use_memory,
            "memory_size": self.memory_size if self.use_memory else 0,
            "grow_connected": self.grow_connected,
        }

    def start(self, volume: Volume) -> None:
        self.session = InteractiveSession(
            self.model,
            SessionOptions(
                use_memory=self.use_memory, memory_size=self.memory_size, grow_connected=self.grow_connected
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
            method.start(volume)
            pred, scores = None, {}
            for k in range(1, n_clicks + 1):
                c = robot.click(gt, pred)
                t0 = time.perf_counter()
                pred = method.click(c)
                out[name]["_times"].append(time.perf_counter() - t0)
                if k in clicks:
                    scores[str(k)] = dice(pred, gt)
            out[name]["targets"].append(
                {"case": case.id, "label": int(target.label), "name": target.name, "dice": scores}
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
        # put the per-target list last, as in EVALUATION.md
        res["targets"] = res.pop("targets")
    return out


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
