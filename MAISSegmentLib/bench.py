"""``mais bench``: speed and memory figures of the network (random weights are fine for timing).

Measured in one run, so ratios compare like with like:

* encoder seconds (median of ``repeats``) with the exact windowed speed-up and with the padded
  reference attention of the original code -> ``encoder_speedup``;
* per-click seconds (median over ``clicks`` clicks) with a full memory bank of ``memory_size``
  interactions and with the memory off, on the same weights and click sequence -> ``memory_overhead``. The variants
  run interleaved, click by click (:func:`time_click_variants`), so a slow spell of the machine hits them alike.
  A click is: prompt encoder, memory attention (when on), mask decoder, and the low-res logits
  upsampled to the 128^3 ROI and thresholded (what the session turns into a mask);
* first click and click -> mask through the interactive session on a synthetic 512x512x300 CT
  (0.8 x 0.8 x 1.0 mm): ROI resampling, encoder, network and resampling back onto the original grid
  (``first_click_seconds``, ``click_to_mask_seconds``, ``click_to_mask_breakdown``);
* with a full-resolution head (e.g. ``--preset mais-small-fr``): its once-per-ROI features
  (``fullres_features_seconds``) and the per-click seconds with the head (128^3 logits) against the same clicks
  without it (32^3 logits upsampled) -> ``fullres_overhead``, and with the head with and without memory ->
  ``memory_overhead_fullres``; the session figures then include the head;
* ``--precision``: the inference precision (``auto`` picks bfloat16 where it is faster, as the CLI and Slicer do;
  run ``--precision float32`` beside it for the comparison);
* peak resident memory of the process (and peak CUDA memory on a GPU).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import build_model
from .devices import resolve_device
from .memory import MemoryBank
from .model.mais import MAISModel
from .precision import cpu_bf16_speedup


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def click_sequence(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random clicks ``(1, n, 3)`` in a ``size``^3 ROI with labels ``(1, n)`` (first include)."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randint(0, size, (1, n, 3), generator=g).float()
    labels = (torch.rand(1, n, generator=g) > 0.3).float()
    labels[0, 0] = 1
    return points, labels


def time_click_variants(
    model: MAISModel,
    embedding: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    variants: list[tuple[MemoryBank | None, Any]],
    warm: int,
) -> list[list[float]]:
    """Several click sequences on the same clicks, **interleaved** (click t of every variant, then click t + 1...), so
    that a slow spell of a shared machine slows them all alike and their ratios stay meaningful. Each variant is
    ``(bank, features)``: the object's memory (None: memory off) and the ROI's full-resolution features
    (:meth:`MAISModel.encode_fullres`; None: the 32^3 logits upsampled, else the head's 128^3 logits are thresholded).
    Returns the seconds of each variant's clicks after the first ``warm``."""
    device, size = model.device, model.cfg.image_encoder.img_size
    pe = model.dense_pe()
    state = [[model.empty_mask(), None] for _ in variants]
    times: list[list[float]] = [[] for _ in variants]
    for t in range(points.shape[1]):
        pts, lab = points[:, : t + 1].to(device), labels[:, : t + 1].to(device)
        for v, (bank, features) in enumerate(variants):

            def click(
                v: int = v,
                bank: MemoryBank | None = bank,
                features: Any = features,
                pts: torch.Tensor = pts,
                lab: torch.Tensor = lab,
            ) -> None:
                prev, prev_full = state[v]
                out = model.step(
                    embedding, pts, lab, prev, bank=bank, image_pe=pe, features=features, prev_full=prev_full
                )
                state[v] = [out.low_res_logits, out.full_res_logits]
                hi = out.full_res_logits
                if hi is None:
                    hi = F.interpolate(out.low_res_logits, size=(size,) * 3, mode="trilinear", align_corners=False)
                (hi > 0).to(torch.uint8)  # sigmoid(x) > 0.5  <=>  x > 0

            dt = _timed(click, device)
            if t >= warm:
                times[v].append(dt)
    return times


def synthetic_ct(shape_kji: tuple[int, int, int] = (300, 512, 512), spacing=(0.8, 0.8, 1.0), seed: int = 0):
    """A CT-like int16 volume (body ellipse, a 5 cm 'organ', noise) and the organ centre in RAS mm.

    Built slice by slice to keep memory at the size of the result (512x512x300 int16 = 157 MB).
    """
    from .volume import Volume

    rng = np.random.default_rng(seed)
    k_n, j_n, i_n = shape_kji
    vol = Volume.from_geometry(np.empty(shape_kji, dtype=np.int16), spacing, (0.0, 0.0, 0.0))
    centre_ijk = np.array([i_n * 0.55, j_n * 0.45, k_n * 0.5])
    jj, ii = np.meshgrid(np.arange(j_n), np.arange(i_n), indexing="ij")
    body = ((ii - i_n / 2) / (0.42 * i_n)) ** 2 + ((jj - j_n / 2) / (0.32 * j_n)) ** 2 <= 1
    for k in range(k_n):
        d2 = ((ii - centre_ijk[0]) * spacing[0]) ** 2 + ((jj - centre_ijk[1]) * spacing[1]) ** 2
        d2 = d2 + ((k - centre_ijk[2]) * spacing[2]) ** 2
        sl = np.where(body, 40.0, -1000.0) + np.where(d2 <= 25.0**2, 80.0, 0.0)
        vol.array[k] = (sl + rng.normal(0, 15, sl.shape)).astype(np.int16)
    return vol, vol.ijk_to_ras_points(centre_ijk[None])[0]


def run_click_to_mask(
    model: MAISModel,
    clicks: int = 10,
    shape_kji: tuple[int, int, int] = (300, 512, 512),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """First click and click -> mask on the original grid of a large CT, through the session.

    ROI growth is off: with random weights the predicted blob touches the window faces and would open
    ROIs (and encoder runs) that a trained model would not.
    """
    from .session import InteractiveSession, SessionOptions

    vol, centre = synthetic_ct(shape_kji)
    rng = np.random.default_rng(1)
    session = InteractiveSession(model, SessionOptions(grow_rois=False))
    t0 = time.perf_counter()
    session.set_image(vol)
    box = session.add_click(centre, True)
    first = time.perf_counter() - t0
    first_t = dict(session.last_timings)
    log(f"first click on {shape_kji[::-1]} (IJK) CT: {first:.3f}s {_fmt(first_t)}")
    per_click, parts, voxels = [], [], []
    for n in range(clicks):
        p = centre + rng.uniform(-20, 20, 3)
        t0 = time.perf_counter()
        box = session.add_click(p, bool(n % 3 != 2))
        per_click.append(time.perf_counter() - t0)
        parts.append(dict(session.last_timings))
        voxels.append(int(np.prod(box.shape_kji)))
    med = {k: statistics.median(t[k] for t in parts) for k in ("decoder", "resample")}
    log(
        f"click -> mask: median {statistics.median(per_click):.3f}s (network {med['decoder']:.3f}s, "
        f"resample {med['resample']:.3f}s) over boxes of median {statistics.median(voxels):,} voxels"
    )
    return {
        "first_click_seconds": first,
        "click_to_mask_seconds": statistics.median(per_click),
        "click_to_mask_breakdown": {
            "first_click": {k: first_t.get(k, 0.0) for k in ("roi", "encoder", "decoder", "resample")},
            "click": {"network": med["decoder"], "resample": med["resample"]},
            "changed_box_voxels_median": statistics.median(voxels),
            "image_shape_ijk": list(shape_kji[::-1]),
        },
    }


def _fmt(t: dict[str, float]) -> str:
    return "(" + ", ".join(f"{k} {v:.3f}s" for k, v in t.items() if k != "total") + ")"


def run_bench(
    preset: str = "sam-med3d-vit-b",
    device: str = "auto",
    threads: int | None = None,
    repeats: int = 3,
    clicks: int = 20,
    memory_size: int = 60,
    log: Callable[[str], None] = print,
    with_ct: bool = True,
    precision: str = "auto",
) -> dict[str, Any]:
    """Measure and return the figures (see module docstring). Keys are stable: tools read them.

    ``precision``: the network's inference precision (:mod:`MAISSegmentLib.precision`; ``auto`` as the CLI and
    Slicer use it), recorded as ``inference_dtype``.
    """
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = build_model(preset, device=dev, precision=precision)
    size = model.cfg.image_encoder.img_size
    image = torch.randn(1, 1, size, size, size, device=dev)
    res: dict[str, Any] = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "inference_dtype": str(model.inference_dtype).replace("torch.", ""),
        "cpu_bf16_speedup": cpu_bf16_speedup(torch.get_num_threads()) if dev.type == "cpu" else None,
        "torch": torch.__version__,
        "preset": preset,
    }
    with torch.inference_mode():
        enc: dict[bool, list[float]] = {}
        for fast in (True, False):
            model.image_encoder.set_exact_fast_windows(fast)
            model.encode_image(image)  # warm-up
            enc[fast] = [_timed(lambda: model.encode_image(image), dev) for _ in range(repeats)]
            log(
                f"encoder {'exact speed-up' if fast else 'padded reference'}: "
                + ", ".join(f"{t:.3f}s" for t in enc[fast])
            )
        model.image_encoder.set_exact_fast_windows(True)
        res["encoder_seconds"] = statistics.median(enc[True])
        res["encoder_reference_seconds"] = statistics.median(enc[False])
        res["encoder_speedup"] = res["encoder_reference_seconds"] / res["encoder_seconds"]

        embedding = model.encode_image(image)
        warm = max(memory_size, 3)  # fill the bank to capacity before timing
        points, labels = click_sequence(warm + clicks, size)
        features = None
        if model.has_fullres:
            model.encode_fullres(image)  # warm-up
            res["fullres_features_seconds"] = statistics.median(
                _timed(lambda: model.encode_fullres(image), dev) for _ in range(repeats)
            )
            features = model.encode_fullres(image)
        variants = [(model.new_memory_bank(capacity=memory_size), None), (None, None)]
        if features is not None:
            variants += [(model.new_memory_bank(capacity=memory_size), features), (None, features)]
        timed = time_click_variants(model, embedding, points, labels, variants, warm)  # interleaved: fair ratios
        res["memory_size"] = memory_size
        res["clicks_timed"] = clicks
        res["click_seconds_memory"] = statistics.median(timed[0])
        res["click_seconds_no_memory"] = statistics.median(timed[1])
        res["memory_overhead"] = res["click_seconds_memory"] / res["click_seconds_no_memory"]
        if features is not None:
            res["click_seconds_fullres"] = statistics.median(timed[2])
            res["click_seconds_fullres_no_memory"] = statistics.median(timed[3])
            res["fullres_overhead"] = res["click_seconds_fullres"] / res["click_seconds_memory"]
            res["memory_overhead_fullres"] = res["click_seconds_fullres"] / res["click_seconds_fullres_no_memory"]
        if with_ct:
            res.update(run_click_to_mask(model, log=log))
    res["peak_rss_mb"] = peak_rss_mb()
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def format_table(res: dict[str, Any]) -> str:
    """Human-readable table of :func:`run_bench` results."""
    rows = [
        ("device", f"{res['device']} ({res['device_name']}), {res['threads']} threads, torch {res['torch']}"),
        ("inference precision", res.get("inference_dtype", "float32")),
        ("bfloat16 matrix-product speed-up", f"{res['cpu_bf16_speedup']:.1f}x" if res.get("cpu_bf16_speedup") else "-"),
        ("preset", res["preset"]),
        ("encoder, exact speed-up", f"{res['encoder_seconds']:.3f} s"),
        ("encoder, padded reference", f"{res['encoder_reference_seconds']:.3f} s"),
        ("encoder speed-up", f"{res['encoder_speedup']:.2f}x"),
        (f"click, memory N={res['memory_size']}", f"{res['click_seconds_memory'] * 1000:.1f} ms"),
        ("click, no memory", f"{res['click_seconds_no_memory'] * 1000:.1f} ms"),
        ("memory overhead", f"{res['memory_overhead']:.2f}x"),
        ("peak RSS", f"{res['peak_rss_mb']:.0f} MiB"),
    ]
    if "click_seconds_fullres" in res:
        rows[-1:-1] = [
            ("full-resolution features (per ROI)", f"{res['fullres_features_seconds'] * 1000:.0f} ms"),
            ("click, memory + full-resolution head", f"{res['click_seconds_fullres'] * 1000:.1f} ms"),
            ("click, no memory + full-resolution head", f"{res['click_seconds_fullres_no_memory'] * 1000:.1f} ms"),
            ("full-resolution overhead", f"{res['fullres_overhead']:.2f}x"),
            ("memory overhead with the head", f"{res['memory_overhead_fullres']:.2f}x"),
        ]
    if "first_click_seconds" in res:
        b = res["click_to_mask_breakdown"]
        f = b["first_click"]
        rows.append(
            (
                "first click, 512x512x300 CT",
                f"{res['first_click_seconds']:.3f} s (ROI {f['roi']:.3f}, encoder "
                f"{f['encoder']:.3f}, network {f['decoder']:.3f}, resample {f['resample']:.3f})",
            )
        )
        rows.append(
            (
                "click -> mask, same CT",
                f"{res['click_to_mask_seconds'] * 1000:.0f} ms (network "
                f"{b['click']['network'] * 1000:.0f}, resample {b['click']['resample'] * 1000:.0f})",
            )
        )
    if "peak_cuda_mb" in res:
        rows.append(("peak CUDA memory", f"{res['peak_cuda_mb']:.0f} MiB"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(res: dict[str, Any], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2) + "\n")
