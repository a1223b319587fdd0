"""The MAIS memory bank: explicit, serialisable state of one object being segmented.

An entry is the prompt encoder's output for one interaction (no separate memory encoder):

* sparse memory ``(T, C)``: the click token(s) of that interaction (positional encoding + label
  embedding; SAM-Med3D's pad token is dropped), ``T`` = clicks in that interaction (1 for a click);
* dense memory ``(C, G, G, G)``: the embedding of the mask that interaction started from,
  ``mask_downscaling(previous low-res logits)``.

The bank is a FIFO of the latest ``capacity`` entries (paper: N = 60). The variant says which halves
are kept: ``"sparse"``, ``"dense"`` or ``"sparse+dense"`` (the paper's final model).

Each entry also carries a ``cache`` of its projections made by the memory attention (see
``model/memory_attention.py``) so that adding an interaction never re-projects older memories. The
cache is keyed by the weights that made it and is never serialised.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError
from .model.config import MEMORY_VARIANTS

_ENTRY_SERIAL = itertools.count()


@dataclass
class MemoryEntry:
    """One interaction's memory. ``sparse`` ``(T, C)`` or None; ``dense`` ``(C, G, G, G)`` or None."""

    sparse: torch.Tensor | None
    dense: torch.Tensor | None
    index: int = 0  # position in the object's interaction sequence (0 = first)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    # unique for the process: caches are keyed by it, never by ``index`` (after an undo a new entry
    # can have the same index as the one it replaces)
    uid: int = field(default_factory=lambda: next(_ENTRY_SERIAL), repr=False)


class MemoryBank:
    """FIFO memory of the latest ``capacity`` interactions of one object.

    Args:
        capacity: N, the number of interactions kept (oldest evicted first).
        variant: ``"sparse"``, ``"dense"`` or ``"sparse+dense"``.
    """

    def __init__(self, capacity: int = 60, variant: str = "sparse+dense") -> None:
        if variant not in MEMORY_VARIANTS:
            raise ConfigError(f"memory variant {variant!r} is not one of {MEMORY_VARIANTS}")
        if capacity < 1:
            raise ConfigError(f"memory capacity must be at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.variant = variant
        self.entries: deque[MemoryEntry] = deque()
        self.total_pushed = 0  # interactions ever pushed (the first one is used unconditioned)
        self.cache: dict[str, Any] = {}  # bank-level projections of the memory attention (not serialised)

    @property
    def keeps_sparse(self) -> bool:
        return self.variant in ("sparse", "sparse+dense")

    @property
    def keeps_dense(self) -> bool:
        return self.variant in ("dense", "sparse+dense")

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, sparse: torch.Tensor, dense: torch.Tensor) -> None:
        """Add one interaction; evicts the oldest when full.

        Args:
            sparse: ``(T, C)`` click tokens of this interaction (no pad token).
            dense: ``(C, G, G, G)`` embedding of the mask the interaction started from.
        """
        if sparse.ndim != 2 or dense.ndim != 4 or sparse.shape[1] != dense.shape[0]:
            raise ValueError(
                f"memory entry needs sparse (T, C) and dense (C, G, G, G); got {tuple(sparse.shape)}, "
                f"{tuple(dense.shape)}"
            )
        self.entries.append(
            MemoryEntry(sparse if self.keeps_sparse else None, dense if self.keeps_dense else None, self.total_pushed)
        )
        while len(self.entries) > self.capacity:
            self.entries.popleft()
        self.total_pushed += 1

    def clear(self) -> None:
        """Forget every interaction."""
        self.entries.clear()
        self.cache.clear()
        self.total_pushed = 0

    def clear_cache(self) -> None:
        """Drop cached projections (e.g. between truncated back-propagation windows in training)."""
        self.cache.clear()
        for e in self.entries:
            e.cache.clear()

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Serialise to a dict of tensors (``torch.save``-able with ``weights_only`` loading).

        Keys: ``capacity`` ``()``, ``variant`` ``()`` (index into ``MEMORY_VARIANTS``), ``total_pushed`` ``()``,
        ``sparse`` ``(sum T, C)`` and ``sparse_counts`` ``(n,)`` if sparse is kept, ``dense``
        ``(n, C, G, G, G)`` if dense is kept. Cached projections are not included.
        """
        out = {
            "capacity": torch.tensor(self.capacity),
            "variant": torch.tensor(MEMORY_VARIANTS.index(self.variant)),
            "total_pushed": torch.tensor(self.total_pushed),
            "length": torch.tensor(len(self.entries)),
        }
        if self.entries and self.keeps_sparse:
            out["sparse"] = torch.cat([e.sparse.detach().cpu() for e in self.entries])
            out["sparse_counts"] = torch.tensor([e.sparse.shape[0] for e in self.entries])
        if self.entries and self.keeps_dense:
            out["dense"] = torch.stack([e.dense.detach().cpu() for e in self.entries])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> MemoryBank:
        """Inverse of :meth:`to_dict`."""
        try:
            bank = cls(int(data["capacity"]), MEMORY_VARIANTS[int(data["variant"])])
            n = int(data["length"])
            sparse: list[torch.Tensor | None] = [None] * n
            dense: list[torch.Tensor | None] = [None] * n
            if n and bank.keeps_sparse:
                sparse = list(torch.split(data["sparse"].to(device), data["sparse_counts"].tolist()))
            if n and bank.keeps_dense:
                dense = list(data["dense"].to(device).unbind(0))
        except (KeyError, IndexError, RuntimeError) as exc:
            raise ValueError(f"not a serialised MemoryBank: {exc}") from exc
        bank.total_pushed = int(data["total_pushed"])
        first = bank.total_pushed - n
        bank.entries.extend(MemoryEntry(s, d, first + i) for i, (s, d) in enumerate(zip(sparse, dense)))
        return bank
