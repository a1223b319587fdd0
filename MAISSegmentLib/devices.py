"""Choosing the torch device from a user-facing name."""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, else MPS, else CPU; ``"cuda"``/``"cuda:1"``/``"mps"``/``"cpu"`` checked for availability.

    Raises:
        ConfigError: unknown name, or the device is not available on this machine.
    """
    if isinstance(name, torch.device):
        name = str(name)
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)
