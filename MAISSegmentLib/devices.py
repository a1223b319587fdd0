"""Choosing the torch device from a user-facing name."""

from __future__ import annotations

import re

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda|mps)(?::(\d+))?$")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, else MPS, else CPU; ``"cuda"``/``"cuda:1"``/``"mps"``/``"cpu"`` checked for availability.

    Raises:
        ConfigError: unknown name, a malformed index (``cpu:x``, ``cuda:-1``), or the device is not available on
            this machine.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"device must be a name such as 'cpu' or 'cuda:0', got {name!r}")
    match = _DEVICE_NAME.match(name.strip().lower())
    if match is None:
        kind = name.split(":")[0].strip().lower()
        if kind in DEVICE_CHOICES:
            raise ConfigError(f"device {name!r}: the part after ':' must be a device number, e.g. cuda:0")
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if index is not None:
            raise ConfigError(f"device {name!r}: 'auto' takes no device number; use auto or cuda:N")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu" and index not in (None, "0"):
        raise ConfigError(f"device {name!r}: there is only one CPU device; use --device cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(
                f"device {name!r}: this machine has {count} CUDA GPU(s), numbered 0 to {count - 1}; pick one of those"
            )
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
        if index not in (None, "0"):
            raise ConfigError(f"device {name!r}: there is only one MPS device; use --device mps")
    return torch.device(kind if index is None else f"{kind}:{index}")
