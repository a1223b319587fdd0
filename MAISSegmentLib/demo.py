"""``mais demo``: segment one structure of the bundled sample case with simulated clicks.

Prints Dice after each click and writes, into the output folder: ``<structure>.seg.nrrd`` (opens in
3D Slicer), ``<structure>_slices.png`` (three orthogonal slices through the structure, model outline
and reference outline) and ``dice_vs_clicks.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .clicks import RobotUser
from .data import Target, list_targets, load_cases
from .errors import ConfigError, PromptError
from .evaluate import dice
from .fileutil import atomic_write, writable_problem
from .model.mais import MAISModel
from .resources import sample_dir
from .session import MAX_CLICKS, InteractiveSession, SessionOptions
from .volume import Volume

SAMPLE_DIR = sample_dir()  # Resources/sample of the checkout, or its copy inside an installed wheel


@dataclass(frozen=True)
class DemoPlan:
    """What a demo run reads and writes, known before any work (:func:`plan_demo`).

    Args:
        target: the sample case's structure to segment.
        segmentation: ``<out>/<structure>.seg.nrrd``.
        slices: ``<out>/<structure>_slices.png`` (three planes with outlines).
        curve: ``<out>/dice_vs_clicks.png``.
    """

    target: Target
    segmentation: Path
    slices: Path
    curve: Path

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return (self.segmentation, self.slices, self.curve)


def plan_demo(
    out_dir: str | Path, structure: str | None = None, n_clicks: int = 10, sample_dir: str | Path = SAMPLE_DIR
) -> DemoPlan:
    """Check a demo's settings and output folder and name its files, before any work (reads headers only).

    Args:
        out_dir: the output folder (created when missing); it must not be a file nor a folder we cannot write in.
        structure: a structure of the sample case (None: the sample's ``demo_structure``, the liver).
        n_clicks: simulated clicks, 1 to :data:`~MAISSegmentLib.session.MAX_CLICKS`.
        sample_dir: the folder holding the sample's ``manifest.json``.

    Raises:
        PromptError: ``n_clicks`` out of range; the sample has no such structure.
        ConfigError: ``out_dir`` is an existing file or a folder that cannot be written into.
    """
    if isinstance(n_clicks, bool) or not isinstance(n_clicks, int | np.integer) or not 1 <= n_clicks <= MAX_CLICKS:
        raise PromptError(
            f"--clicks must be between 1 and {MAX_CLICKS} (an object's limit in a session), got {n_clicks}"
        )
    out = Path(out_dir)
    problem = writable_problem(out, folder=True)
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    manifest = Path(sample_dir) / "manifest.json"
    structure = structure or json.loads(manifest.read_text()).get("demo_structure", "")
    targets, _ = list_targets(load_cases(manifest))
    chosen = [t for t in targets if t.name.lower() == structure.lower()]
    if not chosen:
        names = ", ".join(sorted({t.name for t in targets}))
        raise PromptError(f"the sample case has no structure {structure!r}; choose one of: {names}")
    name = chosen[0].name.replace(" ", "_")
    return DemoPlan(chosen[0], out / f"{name}.seg.nrrd", out / f"{name}_slices.png", out / "dice_vs_clicks.png")


def run_demo(
    model: MAISModel,
    out_dir: str | Path,
    structure: str | None = None,
    n_clicks: int = 10,
    sample_dir: str | Path = SAMPLE_DIR,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo; returns ``{"structure", "dice": [per click], "seconds": [per click], "files": [...]}``.

    Raises:
        PromptError, ConfigError: as :func:`plan_demo`, before any click.
    """
    from .io import read_volume
    from .seg_nrrd import Segment, write_segmentation

    plan = plan_demo(out_dir, structure, n_clicks, sample_dir)
    target = plan.target
    volume = read_volume(target.case.image)
    gt = read_volume(target.case.label).array == target.label
    session = InteractiveSession(model, SessionOptions())
    session.set_image(volume)
    robot = RobotUser("center", seed=0, spacing=volume.spacing)
    scores, seconds, pred = [], [], None
    log(f"segmenting {target.name} in {target.case.id} ({int(gt.sum())} voxels) with {n_clicks} simulated clicks")
    for k in range(1, n_clicks + 1):
        c = robot.click(gt, pred)
        t0 = time.perf_counter()
        session.add_click(c.ijk, c.include, space="ijk")
        seconds.append(time.perf_counter() - t0)
        pred = session.mask > 0
        scores.append(dice(pred, gt))
        log(f"click {k:2d} ({'+' if c.include else '-'}) at IJK {c.ijk}: Dice {scores[-1]:.3f} ({seconds[-1]:.2f} s)")
    seg_path, slices_path, plot_path = plan.files
    write_segmentation(seg_path, volume, [Segment(target.name, session.mask)])
    save_slices_png(
        volume, session.mask > 0, gt, slices_path, title=f"{target.name}: Dice {scores[-1]:.3f} after {n_clicks} clicks"
    )
    save_curve_png(scores, plot_path, title=f"{target.name} ({target.case.id})")
    files = [str(seg_path), str(slices_path), str(plot_path)]
    log("wrote " + ", ".join(files))
    return {"structure": target.name, "dice": scores, "seconds": seconds, "files": files}


def save_slices_png(
    volume: Volume, mask: np.ndarray, reference: np.ndarray | None, path: Path, title: str = ""
) -> None:
    """Axial, coronal and sagittal slices through the mask's centre (KJI array), with outlines.

    Slices are shown in voxel order with the physical aspect ratio (not reoriented to radiological view).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = np.argwhere(mask if mask.any() else (reference if reference is not None else mask))
    kc, jc, ic = where.mean(0).round().astype(int) if len(where) else np.array(mask.shape) // 2
    si, sj, sk = volume.spacing
    views = [
        ("axial (k)", volume.array[kc], mask[kc], None if reference is None else reference[kc], sj / si),
        ("coronal (j)", volume.array[:, jc], mask[:, jc], None if reference is None else reference[:, jc], sk / si),
        (
            "sagittal (i)",
            volume.array[:, :, ic],
            mask[:, :, ic],
            None if reference is None else reference[:, :, ic],
            sk / sj,
        ),
    ]
    lo, hi = np.percentile(volume.array, [1, 99])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=110)
    for ax, (label, img, m, ref, aspect) in zip(axes, views):
        ax.imshow(
            img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower" if label != "axial (k)" else "upper"
        )
        if ref is not None and ref.any():
            ax.contour(ref, levels=[0.5], colors="yellow", linewidths=1.0, linestyles="dashed")
        if m.any():
            ax.contour(m, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title + "   (red: MAIS, yellow dashed: reference)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    plt.close(fig)


def save_curve_png(scores: list[float], path: Path, title: str = "") -> None:
    """Dice after each click."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    ax.plot(range(1, len(scores) + 1), scores, marker="o")
    ax.set_xlabel("clicks")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    plt.close(fig)
