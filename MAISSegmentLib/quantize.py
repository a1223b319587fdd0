"""8-bit storage of released weights: half the size of float16 (the bundled model must stay small enough for the
Extensions Index), dequantised to float32 when loaded.

Every floating-point matrix or kernel (2 or more dimensions, at least 1024 values) is stored as int8 with one float32
scale per output row (symmetric, ``scale = max|row| / 127``): about 0.4% of a row's largest weight as worst rounding
error. Vectors and small tensors (biases, norms, positional embeddings...) stay float16. The network runs in float32
as before; only the stored values change, so the release's figures must be measured on the exported file.
"""

from __future__ import annotations

import torch

from .errors import CheckpointError

MIN_QUANTISED_VALUES = 1024


def quantise_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(stored, scales)``: int8 rows for matrices and kernels with their float32 row scales, float16 for the
    other floating-point tensors, anything else unchanged."""
    stored: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        v = value.detach().cpu()
        if not v.is_floating_point():
            stored[key] = v.contiguous()
        elif v.ndim >= 2 and v.numel() >= MIN_QUANTISED_VALUES:
            rows = v.float().reshape(v.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            stored[key] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(v.shape)
            scales[key] = scale.contiguous()
        else:
            stored[key] = v.to(torch.float16).contiguous()
    return stored, scales


def dequantise_state_dict(stored: dict[str, torch.Tensor], scales: object) -> dict[str, torch.Tensor]:
    """The float32 weights of :func:`quantise_state_dict`'s output.

    Raises:
        CheckpointError: the scales are not a dict of 1-D float tensors matching int8 weights row for row.
    """
    if not isinstance(scales, dict) or not all(isinstance(s, torch.Tensor) for s in scales.values()):
        raise CheckpointError("the checkpoint's int8 weights have no valid row scales (quant_scales); it is damaged")
    out: dict[str, torch.Tensor] = {}
    for key, value in stored.items():
        scale = scales.get(key)
        if scale is None:
            out[key] = value.float() if value.is_floating_point() else value
            continue
        if value.dtype != torch.int8 or scale.ndim != 1 or scale.shape[0] != value.shape[0]:
            raise CheckpointError(f"the checkpoint's int8 weight {key} does not match its row scales; it is damaged")
        out[key] = (value.float().reshape(value.shape[0], -1) * scale.float()[:, None]).reshape(value.shape)
    extra = sorted(set(scales) - set(stored))
    if extra:
        raise CheckpointError(f"the checkpoint has row scales for missing weights ({', '.join(extra[:3])}); damaged")
    return out
