"""``mais bench``: speed and memory figures of the network (random weights are fine for timing).

Measured in one run, so ratios compare like with like:

* encoder seconds (median of ``repeats``) with the exact windowed speed-up and with the padded
  reference attention of the original code -> ``encoder_speedup``;
* per-click seconds (median over ``clicks`` clicks) with a full memory bank of ``memory_size``
  interactions and with the memory off, on the same weights and click sequence -> ``memory_overhead``.
  A click is: prompt encoder, memory attention (when on), mask decoder, and the low-res logits
  upsampled to the 128^3 ROI and thresholded (what the session turns into a mask);
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

import torch
import torch.nn.functional as F

from .checkpoint import build_model
from .devices import resolve_device
from .memory import MemoryBank
from .model.mais import MAISModel


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


def time_clicks(
    model: MAISModel,
    embedding: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    bank: MemoryBank | None,
    warm: int,
) -> list[float]:
    """Run every click of the sequence; return the seconds of those after the first ``warm``."""
    device, size = model.device, model.cfg.image_encoder.img_size
    pe = model.dense_pe()
    prev = model.empty_mask()
    times: list[float] = []
    for t in range(points.shape[1]):
        pts, lab = points[:, : t + 1].to(device), labels[:, : t + 1].to(device)

        def click(pts: torch.Tensor = pts, lab: torch.Tensor = lab) -> None:
            nonlocal prev
            out = model.step(embedding, pts, lab, prev, bank=bank, image_pe=pe)
            prev = out.low_res_logits
            hi = F.interpolate(prev, size=(size, size, size), mode="trilinear", align_corners=False)
            (hi > 0).to(torch.uint8)  # sigmoid(x) > 0.5  <=>  x > 0

        dt = _timed(click, device)
        if t >= warm:
            times.append(dt)
    return times


def run_bench(
    preset: str = "sam-med3d-vit-b",
    device: str = "auto",
    threads: int | None = None,
    repeats: int = 3,
    clicks: int = 20,
    memory_size: int = 60,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure and return the figures (see module docstring). Keys are stable: tools read them."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = build_model(preset, device=dev)
    size = model.cfg.image_encoder.img_size
    image = torch.randn(1, 1, size, size, size, device=dev)
    res: dict[str, Any] = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
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
        t_mem = time_clicks(model, embedding, points, labels, model.new_memory_bank(capacity=memory_size), warm)
        t_none = time_clicks(model, embedding, points, labels, None, warm)
        res["memory_size"] = memory_size
        res["clicks_timed"] = clicks
        res["click_seconds_memory"] = statistics.median(t_mem)
        res["click_seconds_no_memory"] = statistics.median(t_none)
        res["memory_overhead"] = res["click_seconds_memory"] / res["click_seconds_no_memory"]
    res["peak_rss_mb"] = peak_rss_mb()
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return res


def format_table(res: dict[str, Any]) -> str:
    """Human-readable table of :func:`run_bench` results."""
    rows = [
        ("device", f"{res['device']} ({res['device_name']}), {res['threads']} threads, torch {res['torch']}"),
        ("preset", res["preset"]),
        ("encoder, exact speed-up", f"{res['encoder_seconds']:.3f} s"),
        ("encoder, padded reference", f"{res['encoder_reference_seconds']:.3f} s"),
        ("encoder speed-up", f"{res['encoder_speedup']:.2f}x"),
        (f"click, memory N={res['memory_size']}", f"{res['click_seconds_memory'] * 1000:.1f} ms"),
        ("click, no memory", f"{res['click_seconds_no_memory'] * 1000:.1f} ms"),
        ("memory overhead", f"{res['memory_overhead']:.2f}x"),
        ("peak RSS", f"{res['peak_rss_mb']:.0f} MiB"),
    ]
    if "peak_cuda_mb" in res:
        rows.append(("peak CUDA memory", f"{res['peak_cuda_mb']:.0f} MiB"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_json(res: dict[str, Any], path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2) + "\n")
