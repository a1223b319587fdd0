"""Latency of the Slicer module: a point placed → the segment updated, through MAISSegmentLogic on real MRML.

The scene is built with slicer-core (headless Slicer: real volume, segmentation and markups nodes), the module file is
imported as the tests do (``Testing/slicer_module_stubs.py``), and every click goes through the same three calls as in
Slicer: ``prepare_update`` (read the points; main thread), ``compute_update`` (the network; worker thread) and
``apply_update`` (write the changed box into the segment, record undo, store the state; main thread). Clicks come from
the robot user of ``docs/EVALUATION.md`` on the ground truth and are placed as markups control points (RAS mm).

Printed per category (median, p90 in ms): the first click of each ROI (includes the image encoder), the later clicks
(the target: < 200 ms on 2 CPU cores), undo and redo; and the split of a click into read / compute / write.

Usage (from the repository root)::

    .venv/bin/python scripts/bench_slicer_latency.py                       # synthetic 512x512x300 CT
    .venv/bin/python scripts/bench_slicer_latency.py --sample              # the bundled sample CT (256x256x20)
    .venv/bin/python scripts/bench_slicer_latency.py --threads 2 --clicks 8 --json out/latency.json

The model: ``--checkpoint FILE`` or ``--model ID``, else the registry's default model (``Resources/models.json``),
else ``--preset`` (default ``mais-small``) with random weights. The compute time does not depend on the weights'
values, but the masks do, and they decide how much is written and whether the ROI must grow (a new encoding): random
weights predict masks that fill the whole 192 mm ROI, so every click would grow it. With random weights the network
therefore runs in full but its low-resolution logits are then replaced by balls of ``--ball-mm`` around the include
clicks (exclude clicks carve smaller ones): masks of a realistic size (``--masks network`` keeps the raw output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

SAMPLE_IMAGE = ROOT / "Resources" / "sample" / "ct_abdomen_img.nii.gz"
SAMPLE_LABEL = ROOT / "Resources" / "sample" / "ct_abdomen_lab.nii.gz"
SAMPLE_STRUCTURES = {5: "liver", 1: "spleen", 6: "stomach", 52: "aorta"}


def synthetic_ct(shape_kji=(300, 512, 512), spacing=(0.78, 0.78, 1.5), seed=0):
    """A CT-like int16 volume (HU) with four organ-like ellipsoids; returns (array KJI, ijk_to_ras, label, names).

    The grid is Slicer's usual CT orientation (LPS storage: I and J flipped in RAS), ``spacing`` in mm (i, j, k).
    """
    rng = np.random.default_rng(seed)
    k, j, i = (np.arange(n, dtype=np.float32) for n in shape_kji)
    sx, sy, sz = spacing
    x = (i - shape_kji[2] / 2) * sx  # mm from the centre along i, j, k
    y = (j - shape_kji[1] / 2) * sy
    z = (k - shape_kji[0] / 2) * sz
    image = np.full(shape_kji, -900, np.int16)  # air
    label = np.zeros(shape_kji, np.uint8)
    body = (x[None, None, :] / 180) ** 2 + (y[None, :, None] / 140) ** 2 <= 1
    image[np.broadcast_to(body, shape_kji)] = 20  # soft tissue
    organs = {  # value: (name, centre mm (x, y, z), semi-axes mm, HU)
        1: ("liver", (-60, -10, 20), (80, 65, 70), 60),
        2: ("spleen", (90, 30, 30), (35, 25, 50), 50),
        3: ("kidney", (70, 60, -50), (28, 30, 50), 35),
        4: ("lesion", (-45, -20, 30), (10, 10, 10), 110),
    }
    names = {}
    for value, (name, (cx, cy, cz), (ax, ay, az), hu) in organs.items():
        inside = (
            ((x[None, None, :] - cx) / ax) ** 2
            + ((y[None, :, None] - cy) / ay) ** 2
            + ((z[:, None, None] - cz) / az) ** 2
        ) <= 1
        image[inside] = hu
        label[inside] = value
        names[value] = name
    image += rng.integers(-15, 16, shape_kji, dtype=np.int16)  # noise
    ijk_to_ras = np.diag([-sx, -sy, sz, 1.0])
    ijk_to_ras[:3, 3] = [shape_kji[2] / 2 * sx, shape_kji[1] / 2 * sy, -shape_kji[0] / 2 * sz]
    return image, ijk_to_ras, label, names


def ball_masks(model, radius_mm: float, roi_spacing_mm: float = 1.5) -> None:
    """Make ``model.step`` run the real network, then return balls around the clicks as its low-res logits (radius
    ``radius_mm`` around include clicks, half of it carved around exclude clicks; ROI voxel indices in, see
    ``MAISModel.step``)."""
    import torch

    real_step = model.step

    def step(image_embedding, points, labels, prev_low_res=None, bank=None, image_pe=None):
        out = real_step(image_embedding, points, labels, prev_low_res, bank=bank, image_pe=image_pe)
        grid = out.low_res_logits.shape[-1]
        factor = model.cfg.image_encoder.img_size / grid  # ROI voxels per low-res voxel
        axis = torch.arange(grid, dtype=torch.float32, device=out.low_res_logits.device)
        mesh = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (g, g, g, 3) tensor order
        logits = torch.full((grid,) * 3, -10.0, device=out.low_res_logits.device)
        radius = radius_mm / (roi_spacing_mm * factor)
        for point, label in zip(points[0], labels[0]):
            centre = (point.float() + 0.5) / factor - 0.5
            inside = ((mesh - centre) ** 2).sum(-1) <= (radius if label > 0 else radius / 2) ** 2
            logits[inside] = 10.0 if label > 0 else -10.0
        out.low_res_logits = logits[None, None].to(out.low_res_logits.dtype)
        return out

    model.step = step


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summary(values):
    ms = [1000 * v for v in values]
    return {"n": len(ms), "median_ms": statistics.median(ms) if ms else None, "p90_ms": percentile(ms, 90)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sample", action="store_true", help="the bundled sample CT instead of the synthetic one")
    source.add_argument("--volume", help="an image file (with --label: its label map, same grid)")
    parser.add_argument("--label", help="label map of --volume (the robot user's ground truth)")
    parser.add_argument("--structures", default="", help="label values to click on (comma list; default: all/four)")
    parser.add_argument("--shape", default="300,512,512", help="synthetic volume K,J,I (default 300,512,512)")
    parser.add_argument("--clicks", type=int, default=8, help="clicks per structure (default 8)")
    parser.add_argument("--undo", type=int, default=3, help="undo (then redo) steps per structure")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="weight file")
    model.add_argument("--model", help="registered or imported model id")
    parser.add_argument("--preset", default="mais-small", help="random-weight preset when no model is given")
    parser.add_argument(
        "--masks",
        choices=("auto", "network", "balls"),
        default="auto",
        help="'balls': replace the network's logits by balls around the clicks (default with random weights)",
    )
    parser.add_argument("--ball-mm", type=float, default=20.0, help="radius of those balls (mm)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import slicer_module_stubs as stubs
    import torch
    import vtk
    from slicer_headless import HeadlessSlicer

    from MAISSegmentLib import build_model, weights
    from MAISSegmentLib.clicks import RobotUser
    from MAISSegmentLib.io import read_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    app = HeadlessSlicer()
    t0 = time.perf_counter()
    if args.sample or args.volume:
        image_path = Path(args.volume) if args.volume else SAMPLE_IMAGE
        label_path = Path(args.label) if args.label else (SAMPLE_LABEL if args.sample else None)
        if label_path is None:
            parser.error("--volume needs --label (the robot user clicks on a ground truth)")
        volume_node = app.volumes.AddArchetypeVolume(str(image_path), "ct")  # Slicer's own reader
        if volume_node is None:
            parser.error(f"Slicer could not read {image_path}")
        label = read_volume(label_path).array
        names = SAMPLE_STRUCTURES if args.sample else {int(v): f"label_{v}" for v in np.unique(label) if v}
        source_text = str(image_path.relative_to(ROOT) if image_path.is_relative_to(ROOT) else image_path)
    else:
        shape = tuple(int(x) for x in args.shape.split(","))
        array, ijk_to_ras, label, names = synthetic_ct(shape)
        volume_node = app.add_volume(array, ijk_to_ras, "ct")
        del array
        source_text = f"synthetic CT {shape[2]}x{shape[1]}x{shape[0]} (IJK), 0.78x0.78x1.5 mm"
    if args.structures:
        names = {int(v): names.get(int(v), f"label_{v}") for v in args.structures.split(",")}
    names = {v: n for v, n in names.items() if np.any(label == v)}
    setup_s = time.perf_counter() - t0
    segmentation = app.add_segmentation(volume_node, "segmentation")

    with stubs.installed():
        module = stubs.load_module_file(stubs.MODULE_FILE, "MAISSegment_bench")
    logic = module.MAISSegmentLogic()
    default = None if (args.checkpoint or args.model) else weights.default_model_id()
    if args.checkpoint:
        logic.select_model(checkpoint=args.checkpoint, device=args.device)
    elif args.model or default:
        logic.select_model(model_id=args.model or default, device=args.device)
    else:
        torch.manual_seed(0)
        logic.use_model(build_model(args.preset, device=args.device), f"{args.preset} (random weights)")
    t0 = time.perf_counter()
    network = logic.ensure_model()
    load_s = time.perf_counter() - t0
    random_weights = network.load_report.source == "none"
    masks = args.masks if args.masks != "auto" else ("balls" if random_weights else "network")
    if masks == "balls":
        ball_masks(network, args.ball_mm)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)

    kinds = ("first", "growth", "later")
    times = {k: [] for k in (*kinds, "undo", "redo")}
    split = {k: {"read": [], "compute": [], "write": [], "encoder": [], "network": [], "resample": []} for k in kinds}
    boxes, rejected, cold = [], 0, None
    for value, name in [(None, "warm-up"), *names.items()]:
        segment_id = segmentation.GetSegmentation().AddEmptySegment(name, name)
        include, exclude = logic.get_point_lists(segmentation, segment_id)
        gt = label == (value if value is not None else next(iter(names)))
        robot = RobotUser("center", spacing=spacing)
        pred = None
        for c in range(1 if value is None else args.clicks):
            click = robot.click(gt, pred)
            ras = (ijk_to_ras @ np.array([*click.ijk, 1.0]))[:3]
            (include if click.include else exclude).AddControlPointWorld(vtk.vtkVector3d(*ras.tolist()))
            t_start = time.perf_counter()
            request = logic.prepare_update(segmentation, segment_id, volume_node, include, exclude)
            t_read = time.perf_counter()
            outcome = logic.compute_update(request)
            t_compute = time.perf_counter()
            result = logic.apply_update(outcome)
            t_end = time.perf_counter()
            if value is None:  # the very first click of the process (torch warm-up): reported apart
                cold = t_end - t_start
                continue
            if result.action == "rejected":
                rejected += 1
            session = logic.session(segmentation, segment_id, volume_node)
            # a later click that needed a new ROI encoding (the mask reached the ROI's border: the ROI grew or a
            # second one was placed) costs what a first click costs: counted apart from the clicks inside a ROI
            kind = "first" if c == 0 else ("growth" if result.encoder_runs else "later")
            times[kind].append(t_end - t_start)
            parts = session.last_timings
            for part, seconds in (
                ("read", t_read - t_start),
                ("compute", t_compute - t_read),
                ("write", t_end - t_compute),
                ("encoder", parts.get("roi", 0.0) + parts.get("encoder", 0.0)),
                ("network", parts.get("decoder", 0.0)),
                ("resample", parts.get("resample", 0.0)),
            ):
                split[kind][part].append(seconds)
            if kind == "later" and result.box is not None:
                boxes.append(int(np.prod(result.box.shape_kji)))
            pred = session.mask > 0
        if value is None:
            logic.reset(segmentation, segment_id, volume_node)
            continue
        for kind, action in (("undo", logic.undo), ("redo", logic.redo)):
            for _ in range(min(args.undo, args.clicks)):
                t_start = time.perf_counter()
                action(segmentation, segment_id, volume_node)
                times[kind].append(time.perf_counter() - t_start)

    report = {
        "scene": source_text,
        "structures": list(names.values()),
        "model": logic.model_label,
        "masks": masks if masks == "network" else f"balls of {args.ball_mm:g} mm around the clicks",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "setup_s": setup_s,
        "model_load_s": load_s,
        "very_first_click_ms": None if cold is None else 1000 * cold,
        "clicks": {k: summary(v) for k, v in times.items()},
        "split_median_ms": {
            k: {part: 1000 * statistics.median(v) if v else None for part, v in parts.items()}
            for k, parts in split.items()
        },
        "written_box_voxels_median": int(statistics.median(boxes)) if boxes else None,
        "rejected_clicks": rejected,
    }
    print(f"scene: {report['scene']}; structures: {', '.join(report['structures'])}")
    print(
        f"model: {report['model']} on {args.device}, {report['torch_threads']} torch thread(s), "
        f"{report['cpu_count']} CPU(s), load average {report['load_average']}"
    )
    print(f"masks: {report['masks']}")
    print(f"model load {load_s:.2f} s; very first click (torch warm-up) {report['very_first_click_ms']:.0f} ms")
    labels = {
        "first": "first click of a ROI",
        "growth": "later, ROI re-encoded",
        "later": "later, inside the ROI",
        "undo": "undo",
        "redo": "redo",
    }
    print(f"{'':<26}{'n':>4}{'median ms':>11}{'p90 ms':>9}")
    for kind, label_text in labels.items():
        s = report["clicks"][kind]
        if s["n"]:
            print(f"{label_text:<26}{s['n']:>4}{s['median_ms']:>11.0f}{s['p90_ms']:>9.0f}")
    for kind in kinds:
        parts = report["split_median_ms"][kind]
        if parts["compute"] is not None:
            print(
                f"  {labels[kind]}: read points {parts['read']:.0f} + compute {parts['compute']:.0f} (encoder "
                f"{parts['encoder']:.0f}, network {parts['network']:.0f}, mask resampling {parts['resample']:.0f}) "
                f"+ write to segment {parts['write']:.0f} ms (medians)"
            )
    print(f"median box written by a click inside a ROI: {report['written_box_voxels_median']} voxels")
    print(f"clicks refused (include point on another segment, overwrite 'none'): {rejected}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
