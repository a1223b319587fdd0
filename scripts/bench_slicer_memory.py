"""Memory and main-thread cost of the Slicer module with many segments, through MAISSegmentLogic on real MRML.

Two measurements on a synthetic 512x512x300 CT (``bench_slicer_latency.synthetic_ct``), each in its own process so
that the peak resident memory is its own:

``--mode memory`` (default ``--segments 20 --clicks 20``): points on 20 segments, 20 clicks each, as in Slicer
(``prepare_update`` / ``compute_update`` / ``apply_update``). Prints the peak RSS of the process, the RSS before the
first point (volume and scene), and the bytes held by the undo history afterwards (segment patches + the sessions'
records, counted from the objects).

``--mode main-thread`` (default ``--others 100``): one target segment among 100 other segments stored in one shared
labelmap layer (as a TotalSegmentator result is). Prints the main-thread time per point, i.e. ``prepare_update`` +
``apply_update`` (the worker's ``compute_update`` is not main-thread time), for the first point (the protected mask of
the other segments is read) and the later ones.

The network is ``--preset`` (default ``mais-small``) with random weights whose masks are replaced by balls of 20 mm
around the points (``bench_slicer_latency.ball_masks``), so every run writes masks of the same, realistic size.

Usage (from the repository root; works on older checkouts of the module too, for before/after figures)::

    .venv/bin/python scripts/bench_slicer_memory.py --mode memory --json out/memory.json
    .venv/bin/python scripts/bench_slicer_memory.py --mode main-thread
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing"), str(ROOT / "scripts")]


def rss_mb() -> float:
    """Current resident memory of this process (MB), from /proc (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def undo_bytes(logic) -> int:
    """Bytes of the undo/redo history: the segment patches of each operation and the sessions' own records (the mask
    patches and the ROI logits they keep; counted the same way for old and new record formats)."""
    total = 0
    for target in logic._targets.values():
        for op in [*target.undo, *target.redo]:
            if op.record is not None:
                total += int(op.record.nbytes)
        session = target.session
        if session is None:
            continue
        for rec in [*session._undo, *session._redo]:
            if hasattr(rec, "flipped"):
                total += len(rec.flipped)
            else:
                total += int(rec.mask_before.nbytes + rec.mask_after.nbytes)
            kept = {id(st.prev) for st in rec.before.rois if st.prev is not None}
            total += sum(
                st.prev.numel() * st.prev.element_size()
                for st in rec.after.rois
                if st.prev is not None and id(st.prev) not in kept
            )
    return total


def click(logic, segmentation, segment_id, volume_node, include, ras) -> tuple[float, float]:
    """Place an include point at ``ras`` and update; returns (main-thread seconds, worker seconds)."""
    import vtk

    include.AddControlPointWorld(vtk.vtkVector3d(*[float(x) for x in ras]))
    t0 = time.perf_counter()
    request = logic.prepare_update(segmentation, segment_id, volume_node, include, None)
    t1 = time.perf_counter()
    outcome = logic.compute_update(request)
    t2 = time.perf_counter()
    logic.apply_update(outcome)
    t3 = time.perf_counter()
    return (t1 - t0) + (t3 - t2), t2 - t1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("memory", "main-thread"), default="memory")
    parser.add_argument("--segments", type=int, default=20, help="memory mode: segments clicked on")
    parser.add_argument("--clicks", type=int, default=20, help="memory mode: clicks per segment")
    parser.add_argument("--others", type=int, default=100, help="main-thread mode: other segments in one layer")
    parser.add_argument("--points", type=int, default=8, help="main-thread mode: points on the target")
    parser.add_argument("--shape", default="300,512,512", help="synthetic volume K,J,I")
    parser.add_argument("--preset", default="mais-small")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--live-sessions", type=int, default=0, help="sessions kept in memory (0: the module's default)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import slicer_module_stubs as stubs
    import torch
    from bench_slicer_latency import ball_masks, synthetic_ct
    from slicer_headless import HeadlessSlicer

    from MAISSegmentLib import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    app = HeadlessSlicer()
    shape = tuple(int(x) for x in args.shape.split(","))
    array, ijk_to_ras, _label, _names = synthetic_ct(shape)
    volume_node = app.add_volume(array, ijk_to_ras, "ct")
    del array, _label
    segmentation = app.add_segmentation(volume_node, "segmentation")
    with stubs.installed():
        module = stubs.load_module_file(stubs.MODULE_FILE, "MAISSegment_bench_memory")
    logic = module.MAISSegmentLogic()
    if args.live_sessions:
        logic.max_live_sessions = args.live_sessions
    torch.manual_seed(0)
    network = build_model(args.preset)
    ball_masks(network, 20.0)
    logic.use_model(network, f"{args.preset} (random weights, 20 mm balls)")
    rng = np.random.default_rng(0)
    k, j, i = shape

    # points inside the body ellipse (180 x 140 mm semi-axes, centred), spread over the slices
    def random_ras():
        while True:
            ijk = np.array([rng.uniform(0.2, 0.8) * i, rng.uniform(0.25, 0.75) * j, rng.uniform(0.1, 0.9) * k])
            ras = (ijk_to_ras @ np.array([*ijk, 1.0]))[:3]
            if (ras[0] / 150) ** 2 + (ras[1] / 110) ** 2 <= 1:
                return ras

    import MAISSegmentLib

    report: dict = {
        "mode": args.mode,
        "volume_kji": list(shape),
        "checkout": str(ROOT.name),
        "library_in_checkout": Path(MAISSegmentLib.__file__).resolve().is_relative_to(ROOT),
    }
    if args.mode == "memory":
        report["rss_before_points_mb"] = round(rss_mb(), 1)
        t0 = time.perf_counter()
        for n in range(args.segments):
            segment_id = segmentation.GetSegmentation().AddEmptySegment(f"s{n}", f"s{n}")
            include, _exclude = logic.get_point_lists(segmentation, segment_id)
            centre = random_ras()
            for c in range(args.clicks):
                offset = rng.normal(0, 6, 3) if c else np.zeros(3)
                click(logic, segmentation, segment_id, volume_node, include, centre + offset)
        report.update(
            segments=args.segments,
            clicks_per_segment=args.clicks,
            seconds=round(time.perf_counter() - t0, 1),
            peak_rss_mb=round(peak_rss_mb(), 1),
            rss_after_mb=round(rss_mb(), 1),
            undo_bytes=undo_bytes(logic),
            clicks_applied=sum(len(t.session.clicks) for t in logic._targets.values() if t.session is not None),
            live_sessions=sum(t.session is not None for t in logic._targets.values()),
        )
    else:
        import slicer

        labels = np.zeros(shape, np.uint8)
        cells = int(np.ceil((args.others + 1) ** (1 / 3)))  # a grid of cells, one free for the target
        free = tuple(n // 2 * cells // n for n in shape)  # the cell holding the volume's centre
        value = 0
        for cell in np.ndindex(cells, cells, cells):
            if cell == free or value >= args.others:
                continue
            value += 1
            box = tuple(slice(int(x * n / cells) + 2, int((x + 1) * n / cells) - 2) for x, n in zip(cell, shape))
            labels[box] = value
        centre_kji = [(x + 0.5) * n / cells for x, n in zip(free, shape)]
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        labelmap.SetIJKToRASMatrix(volume_node_matrix(volume_node))
        slicer.util.updateVolumeFromArray(labelmap, labels)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        del labels
        target = segmentation.GetSegmentation().AddEmptySegment("target", "target")
        include, _exclude = logic.get_point_lists(segmentation, target)
        centre = (ijk_to_ras @ np.array([*centre_kji[::-1], 1.0]))[:3]  # the free cell's centre, RAS
        main_thread, worker = [], []
        for c in range(args.points):
            m, w = click(logic, segmentation, target, volume_node, include, centre + (rng.normal(0, 6, 3) if c else 0))
            main_thread.append(m)
            worker.append(w)
        report.update(
            other_segments=args.others,
            layers=len(
                {
                    segmentation.GetSegmentation().GetLayerIndex(s)
                    for s in segmentation.GetSegmentation().GetSegmentIDs()
                }
            ),
            clicks=sum(len(t.session.clicks) for t in logic._targets.values() if t.session is not None),
            first_point_main_thread_ms=round(1000 * main_thread[0], 1),
            later_points_main_thread_median_ms=round(1000 * statistics.median(main_thread[1:]), 1),
            later_points_worker_median_ms=round(1000 * statistics.median(worker[1:]), 1),
            peak_rss_mb=round(peak_rss_mb(), 1),
        )
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def volume_node_matrix(volume_node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


if __name__ == "__main__":
    sys.exit(main())
