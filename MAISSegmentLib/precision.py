"""Inference precision: float32, or bfloat16 autocast for the heavy matrix products where that is faster.

A click runs the prompt encoder, the memory attention and the mask decoder: mostly ``(512 tokens x 384)`` matrix
products (the memory attention's MLP alone is 0.8 G multiply-adds). On CPUs with native bfloat16 (AVX512-BF16, AMX:
recent Xeon and EPYC) they run ~5x faster in bfloat16; on others bfloat16 is emulated and slower. ``"auto"`` therefore
picks bfloat16 only on a CPU that announces native bfloat16 instructions (``avx512_bf16`` or ``amx_bf16`` in
``/proc/cpuinfo``), a fixed property of the machine: a timed probe would choose differently on a busy machine, and a
saved session must replay to the same mask in every process (:func:`cpu_bf16_speedup` measures the gain for
``mais bench``). The built-in
model was trained under bfloat16 autocast (``--cpu-bf16``), so its accuracy does not depend on the choice (the model
card gives both figures).

What runs in bfloat16 (:meth:`MAISSegmentLib.model.mais.MAISModel.step` and ``encode_image``, inference only): the
image encoder, the prompt encoder, the memory attention and the mask decoder, under ``torch.autocast``; their outputs
are returned as float32. The full-resolution head always runs in float32 (its 128^3 point-wise operations are not
matrix products and are slower in bfloat16 on a CPU). Training is unaffected (it has its own ``--cpu-bf16``).

``MAIS_PRECISION`` (``auto``, ``float32``, ``bfloat16``) overrides what a caller asked for, e.g. to compare.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "float32", "bfloat16")
ENV_VAR = "MAIS_PRECISION"
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags (Linux names) of native bfloat16 matrix instructions


def check_precision(name: object) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else a :class:`ConfigError` saying which are."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return str(name)


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether the CPU lists native bfloat16 instructions (:data:`NATIVE_BF16_FLAGS`). Read from ``/proc/cpuinfo``
    on Linux; False elsewhere (macOS, Windows: float32 unless asked for)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


@functools.cache
def cpu_bf16_speedup(threads: int | None = None) -> float:
    """float32 time / bfloat16 time of a decoder-sized matrix product on this CPU (median of 5 after a warm-up).

    Args:
        threads: the torch thread count it was measured with (part of the cache key; None: the current one).
    """
    del threads  # only a cache key: the measurement runs with the current thread count
    a = torch.randn(512, 384)
    b = torch.randn(384, 1024)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        with torch.inference_mode():
            x @ y  # warm-up (kernel selection)
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                x @ y
                runs.append(time.perf_counter() - t0)
        times[dtype] = sorted(runs)[2]
    return times[torch.float32] / max(times[torch.bfloat16], 1e-9)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The dtype that ``name`` means on ``device`` (after the ``MAIS_PRECISION`` override).

    ``auto``: bfloat16 on a CUDA GPU that supports it and on a CPU with native bfloat16 instructions
    (:func:`cpu_has_native_bf16`), else float32 (always on MPS).

    Raises:
        ConfigError: an unknown name (in the argument or in ``MAIS_PRECISION``).
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        try:
            name = check_precision(env)
        except ConfigError as exc:
            raise ConfigError(f"{ENV_VAR}: {exc}") from None
    name = check_precision(name)
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        if device.type == "mps":
            raise ConfigError("bfloat16 inference is not supported on MPS; use precision float32 or auto")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def set_inference_precision(model: torch.nn.Module, name: str = "auto") -> torch.dtype:
    """Make ``model`` (a :class:`~MAISSegmentLib.model.mais.MAISModel`) run its inference in the precision ``name``
    means on its device; returns the dtype chosen (also ``model.inference_dtype``)."""
    dtype = resolve_precision(name, model.device)
    model.inference_dtype = dtype
    return dtype
