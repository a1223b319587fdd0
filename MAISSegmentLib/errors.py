"""Exception types of MAISSegmentLib.

Every error a user can meet is one of these, with a message that says what is wrong and what to do.
They derive from ``MAISError`` (catch-all for the CLI and the Slicer module) and from the matching
builtin (``ValueError``...) so generic callers still behave.
"""

from __future__ import annotations


class MAISError(Exception):
    """Base class of all MAISSegment errors."""


class ConfigError(MAISError, ValueError):
    """An invalid model, memory or session configuration."""


class CheckpointError(MAISError, ValueError):
    """A weight file that cannot be loaded into the requested network (nothing was loaded)."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that needs unsafe unpickling; load it only with ``trusted=True`` if you trust it."""


class PromptError(MAISError, ValueError):
    """Invalid clicks or masks given to the network."""


class ImageError(MAISError, ValueError):
    """An image or segmentation that cannot be read, written or used (missing, damaged, 2-D/4-D, bad geometry)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the machine ran out of (CPU or GPU) memory: ``MemoryError``, ``torch.OutOfMemoryError``
    (a ``RuntimeError``) or another runtime error whose message says "out of memory" (older torch, MPS)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
