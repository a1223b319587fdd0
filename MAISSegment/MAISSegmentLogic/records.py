"""The records of the logic: what it keeps per segment, and what its update calls take and return.

:class:`_Target` is one object being segmented (a segment on a volume: its session, point lists, undo history and the
user's edits); :class:`_Operation` one undoable change. An update runs in three parts (see ``updates.py``):
:class:`UpdateRequest` (read from MRML on the main thread) → :class:`UpdateOutcome` (computed on the worker) →
:class:`UpdateResult` (written; what the status line shows). Plain dataclasses: no MRML, no Qt, no torch.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class UpdateResult:
    """What one logic call did (shown in the status line).

    action: ``"none"``, ``"add"``, ``"forget"``, ``"rebuild"``, ``"configure"``, ``"reset"``, ``"undo"``, ``"redo"``,
        ``"restore"`` or ``"rejected"`` (every new point was refused).
    clicks: clicks of the session afterwards. seconds: wall time of the call's network part. total_seconds: from
        the points read (``prepare_update``) to the segment written (``apply_update``), worker queue included.
    rois: ROIs of the session. roi: (center RAS mm (3,), edge mm) of the ROI of the last click, or None.
    encoder_runs: image-encoder runs during the call. model: model label.
    box: the IJK box written (``MAISSegmentLib.roi.Box``; None if nothing). changed: whether any voxel changed.
    rejected: messages of points that were refused (their points were removed from the point lists).
    kept_edits: voxels the user had edited (e.g. painted in the Segment Editor) that the network's mask would have
        changed: they were kept. edited_voxels: all voxels kept as the user's edits in this segment.
    undo_dropped: older operations dropped from the undo history by this call (its byte budget).
    volume_ml: the segment's volume (mL) as MAISSegment left it, or None when not known.
    """

    action: str
    clicks: int = 0
    seconds: float = 0.0
    total_seconds: float = 0.0
    rois: int = 0
    roi: tuple | None = None
    encoder_runs: int = 0
    model: str = ""
    box: Any = None
    changed: bool = False
    rejected: list[str] = field(default_factory=list)
    kept_edits: int = 0
    edited_voxels: int = 0
    undo_dropped: int = 0
    volume_ml: float | None = None


@dataclass
class _Operation:
    """One undoable logic change: ``steps`` session operations and the segment write that showed them."""

    steps: int
    record: Any  # mrml_writing.UndoRecord, or None when nothing was written
    action: str
    edited_before: Any = None  # segment_edits.BoxedMask of the user's edits before/after (restored by undo/redo)
    edited_after: Any = None
    serial: int = 0  # order of the operations of all segments (the oldest is dropped first)

    @property
    def nbytes(self) -> int:
        """Bytes of the segment patches this operation keeps (the session's part is counted by the session)."""
        return 0 if self.record is None else int(self.record.nbytes)


@dataclass
class _Target:
    """One object being segmented: a segment of a segmentation node, on a volume."""

    scene: Any
    segmentation_node_id: str
    segment_id: str
    volume_node_id: str
    session: Any = None  # MAISSegmentLib.session.InteractiveSession
    include_node_id: str | None = None
    exclude_node_id: str | None = None
    protection_stamp: tuple | None = None  # the other segments' state the session's protected mask was made from
    undo: list[_Operation] = field(default_factory=list)
    redo: list[_Operation] = field(default_factory=list)
    last: UpdateResult | None = None
    edits: Any = None  # segment_edits.SegmentEdits: what MAISSegment wrote into the segment, the user's edits since
    made_with: str | None = None  # SHA-256 of the weights whose result the segment shows (None: not known yet)
    rewrite_allowed: bool = False  # the user agreed that the next update rewrites the whole segment (other weights)
    replace_allowed: bool = False  # the user agreed that voxels drawn elsewhere before the first update are replaced
    busy: bool = False  # an update is being computed on the worker: its session must not be read meanwhile
    stroke_first: bool = False  # the last undone operation had taken in a stroke made before it: undo that next
    used: float = 0.0  # time.monotonic() of its last update (the least recently used sessions are dropped first)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.segmentation_node_id, self.segment_id, self.volume_node_id)


@dataclass
class UpdateRequest:
    """Everything :meth:`MAISSegmentLogic.compute_update` needs, read from MRML on the main thread."""

    target: _Target
    clicks: list  # (ras (3,), include) from the point lists, in click order
    options: tuple[bool, int] | None = None  # (use_memory, memory_size) to apply first, or None
    volume: Any = None  # MAISSegmentLib Volume, only when the session must be created
    protected: Any = None  # bool KJI mask of voxels not to take: for a new session, or when other segments changed
    state: dict | None = None  # stored session state, only when the session must be created
    seen: dict | None = None  # {(include, control point ID): RAS (3,)} of the defined points the clicks were read from
    started: float = 0.0  # time.perf_counter() when the points were read
    made_with: str | None = None  # weights SHA-256 of the stored state (when the session must be created)


@dataclass
class UpdateOutcome:
    """What :meth:`MAISSegmentLogic.compute_update` did, to be written by :meth:`~MAISSegmentLogic.apply_update`."""

    target: _Target
    action: str
    steps: int
    box: Any
    seconds: float
    encoder_runs: int
    rejected: list[str]
    request: UpdateRequest | None = None  # what it was computed from (its ``seen`` points, its ``started`` time)
    session: Any = None  # the session (new, replayed or the target's own) the update was computed in
    rewrite: bool = False  # the clicks were replayed with other weights: the whole segment is rewritten
    baseline: Any = None  # segment_edits.BoxedMask: the replayed mask before this update's clicks, for a session
    # rebuilt from a stored state (what MAISSegment had written, the user's edits being the differences)
    made_with: str = ""  # SHA-256 of the weights it was computed with
