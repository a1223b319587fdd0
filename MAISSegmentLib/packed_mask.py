"""A read-only bool volume stored at one bit per voxel (numpy ``packbits`` along the last axis).

Used for a session's protected voxels (the other segments): a full-grid bool array is one byte per voxel, 78 MB for a
512x512x300 CT per segment being edited; packed it is 10 MB, and a box of it is unpacked in the time of a copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class PackedMask:
    """Bool ``shape`` (KJI), packed along the last axis. Index it like the bool array it holds: ``m[k, j, i]`` gives
    a bool, ``m[ks, js, is_]`` with slices a bool array (a copy).

    Args:
        mask: any array-like of that shape; non-zero = True.
    """

    __slots__ = ("_bits", "_count", "shape")

    def __init__(self, mask: Any) -> None:
        dense = np.asarray(mask) != 0
        if dense.ndim != 3:
            raise ValueError(f"a PackedMask is 3-D, got shape {dense.shape}")
        self.shape = tuple(int(n) for n in dense.shape)
        self._bits = np.packbits(dense, axis=-1)
        self._count = int(np.count_nonzero(dense))

    def __getitem__(self, index: tuple) -> Any:
        if not isinstance(index, tuple) or len(index) != 3:
            raise IndexError("index a PackedMask with three ints or slices (k, j, i)")
        k, j, i = index
        if all(isinstance(x, (int, np.integer)) for x in index):
            return bool((self._bits[k, j, int(i) // 8] >> (7 - int(i) % 8)) & 1)
        ks = k if isinstance(k, slice) else slice(int(k), int(k) + 1)
        js = j if isinstance(j, slice) else slice(int(j), int(j) + 1)
        start, stop, step = (i if isinstance(i, slice) else slice(int(i), int(i) + 1)).indices(self.shape[2])
        if step != 1:
            raise IndexError("PackedMask slices along i must have step 1")
        rows = self._bits[ks, js, start // 8 : (stop + 7) // 8]
        out = np.unpackbits(rows, axis=-1)[..., start % 8 : start % 8 + max(0, stop - start)].astype(bool)
        return out.reshape(tuple(n for n, x in zip(out.shape, index) if isinstance(x, slice)))

    def any(self) -> bool:
        return self._count > 0

    def equals(self, other: Any) -> bool:
        """Whether ``other`` (a PackedMask or an array of the same shape) holds the same voxels."""
        if other is None:
            return False
        if not isinstance(other, PackedMask):
            other = PackedMask(other)
        return self.shape == other.shape and np.array_equal(self._bits, other._bits)
