"""The user's own edits of a segment, so that MAISSegment never paints over them.

Between two points a radiologist touches the segment up in the Segment Editor (paints a missed voxel, erases a
leak). The next point rewrites the segment inside the box the network changed; without care it would erase the
touch-up. :class:`SegmentEdits` remembers what MAISSegment last wrote into a segment; before each write, the voxels
of the box where the segment now differs from that are the user's edits, and they are kept as they are (now and in
every later write) until the user explicitly lets the model overwrite them (:meth:`SegmentEdits.forget_edits`).

Everything is a bool mask on the segment's reference grid, KJI order, stored only inside the box that holds its
True voxels (:class:`BoxedMask`), so a segment costs one byte per voxel of its own bounding box, not of the volume.
Pure numpy: no MRML, no torch; :mod:`MAISSegmentLib.mrml_writing` reads and writes the segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .roi import Box


def _box_of(mask: np.ndarray, origin: tuple[int, int, int] = (0, 0, 0)) -> Box:
    """The IJK box of the True voxels of a bool KJI ``mask`` whose voxel ``[0, 0, 0]`` is IJK ``origin``."""
    if not mask.any():
        return Box.nothing()
    lo, hi = [], []
    for axis in (2, 1, 0):  # i, j, k
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]) + 1)
    return Box(tuple(a + o for a, o in zip(lo, origin)), tuple(b + o for b, o in zip(hi, origin)))


def _relative(inner: Box, outer: Box) -> tuple[slice, slice, slice]:
    """KJI index of ``inner`` within an array covering ``outer`` (``inner`` inside ``outer``)."""
    return tuple(slice(inner.lo[d] - outer.lo[d], inner.hi[d] - outer.lo[d]) for d in (2, 1, 0))


@dataclass
class BoxedMask:
    """A bool mask on a grid of ``shape_kji`` voxels, stored inside ``box`` (False everywhere outside it).

    ``data`` is bool of ``box.shape_kji`` (KJI). The box grows when True voxels are written outside it and shrinks
    back to the True voxels' bounding box when it has grown much larger than them.
    """

    shape_kji: tuple[int, int, int]
    box: Box = field(default_factory=Box.nothing)
    data: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), dtype=bool))

    @classmethod
    def from_dense(cls, mask: np.ndarray) -> BoxedMask:
        """From a full-grid KJI array (non-zero = True), cropped to its True voxels."""
        dense = np.asarray(mask) != 0
        box = _box_of(dense)
        if box.empty:
            return cls(tuple(dense.shape))
        return cls(tuple(dense.shape), box, dense[box.slices].copy())

    def read(self, box: Box) -> np.ndarray:
        """Bool ``box.shape_kji``: the mask inside ``box`` (any box of the grid)."""
        out = np.zeros(box.shape_kji, dtype=bool)
        common = box.intersect(self.box)
        if not common.empty:
            out[_relative(common, box)] = self.data[_relative(common, self.box)]
        return out

    def write(self, box: Box, values: np.ndarray) -> None:
        """Set the mask inside ``box`` to ``values`` (bool ``box.shape_kji``)."""
        values = np.asarray(values, dtype=bool)
        needed = _box_of(values, box.lo)
        if not needed.empty and not self._covers(needed):
            grown = self.box.union(needed)
            data = np.zeros(grown.shape_kji, dtype=bool)
            if not self.box.empty:
                data[_relative(self.box, grown)] = self.data
            self.box, self.data = grown, data
        common = box.intersect(self.box)
        if not common.empty:
            self.data[_relative(common, self.box)] = values[_relative(common, box)]
        self._shrink()

    def count(self) -> int:
        """Number of True voxels."""
        return int(np.count_nonzero(self.data))

    def _covers(self, box: Box) -> bool:
        return not self.box.empty and box.intersect(self.box) == box

    def _shrink(self) -> None:
        if self.box.empty:
            return
        tight = _box_of(self.data, self.box.lo)
        if tight.empty:
            self.box, self.data = Box.nothing(), np.zeros((0, 0, 0), dtype=bool)
        elif np.prod(tight.shape_kji) * 2 < self.data.size:
            self.data = self.data[_relative(tight, self.box)].copy()
            self.box = tight


@dataclass
class SegmentEdits:
    """What MAISSegment last wrote into one segment and which voxels the user has changed since.

    ``written`` is None until MAISSegment knows the segment's content as its own (before the first write, or after
    a scene was reloaded): :meth:`set_baseline` gives it (e.g. the replayed session's mask, or the segment's current
    content when the user agreed to replace it); without one, every voxel already in the segment counts as the
    user's and is kept.
    """

    shape_kji: tuple[int, int, int]
    written: BoxedMask | None = None  # the segment as MAISSegment left it
    edited: BoxedMask = None  # voxels the user changed since MAISSegment wrote them: kept by later writes

    def __post_init__(self) -> None:
        if self.edited is None:
            self.edited = BoxedMask(self.shape_kji)

    @property
    def known(self) -> bool:
        """Whether MAISSegment knows what it last wrote (else the segment's voxels all count as the user's)."""
        return self.written is not None

    def set_baseline(self, written: BoxedMask) -> None:
        """Take ``written`` as the segment's content as MAISSegment made it; earlier edits are forgotten."""
        self.written = written
        self.edited = BoxedMask(self.shape_kji)

    def observe(self, box: Box, current: np.ndarray) -> np.ndarray:
        """Record the user's edits inside ``box`` and return the voxels to keep there.

        Args:
            box: the IJK box about to be written.
            current: bool ``box.shape_kji``, the segment's content there now.

        Returns:
            Bool ``box.shape_kji``: True where the segment must keep its current voxel (edited by the user now or
            earlier).
        """
        current = np.asarray(current, dtype=bool)
        written = self.written.read(box) if self.written is not None else np.zeros(box.shape_kji, dtype=bool)
        changed = current != written
        if changed.any():
            self.edited.write(box, self.edited.read(box) | changed)
        return self.edited.read(box)

    def wrote(self, box: Box, content: np.ndarray) -> None:
        """After a write (or an undo/redo) by MAISSegment: the segment holds ``content`` (bool ``box.shape_kji``)
        inside ``box``."""
        if self.written is None:
            self.written = BoxedMask(self.shape_kji)
        self.written.write(box, content)

    def forget_edits(self) -> Box:
        """Let the model overwrite the user's edits from now on. Returns the box they covered (empty if none)."""
        box = self.edited.box
        self.edited = BoxedMask(self.shape_kji)
        return box

    def edited_count(self) -> int:
        """Voxels currently kept as the user's edits."""
        return self.edited.count()
