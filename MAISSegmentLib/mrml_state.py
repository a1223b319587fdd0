"""The interactive session's state stored with the scene: a JSON segment tag (MRML side; no Qt).

:func:`save_state` stores the session's JSON state (``InteractiveSession.state()``) in the segment tag
``MAISSegment.State``, saved in ``.seg.nrrd`` and hence in ``.mrb``/``.mrml`` scenes; :func:`load_state` reads it back
(a damaged tag is a :class:`~MAISSegmentLib.mrml_volumes.BridgeError`), :func:`clear_state` removes it.
"""

from __future__ import annotations

import json
from typing import Any

import vtk

from .mrml_volumes import (
    BridgeError,
    _segment,
)

__all__ = [
    "STATE_TAG",
    "clear_state",
    "load_state",
    "save_state",
]

STATE_TAG = "MAISSegment.State"  # segment tag holding the session state (JSON)


def _state_text(state: dict[str, Any]) -> str:
    try:
        text = json.dumps(state, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BridgeError(f"the session state is not JSON-serialisable: {exc}") from None
    # Slicer's .seg.nrrd header separates tags with '|': escape it (only possible inside JSON strings).
    return text.replace("|", "\\u007c")


def save_state(segmentation_node: Any, segment_id: str, state: dict[str, Any]) -> None:
    """Store ``state`` (e.g. ``InteractiveSession.state()``) as JSON in the segment tag ``MAISSegment.State``.

    The tag is saved with the segmentation (``.seg.nrrd``, scenes), so a reloaded scene can replay the session.
    """
    if not isinstance(state, dict):
        raise BridgeError(f"the session state must be a dict, got {type(state).__name__}")
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    segment.SetTag(STATE_TAG, _state_text(state))


def load_state(segmentation_node: Any, segment_id: str) -> dict[str, Any] | None:
    """The state stored by :func:`save_state`, or None when the segment has none.

    Raises:
        BridgeError: unknown segment, or a tag that is not a JSON object (damaged).
    """
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    value = vtk.reference("")
    if not segment.GetTag(STATE_TAG, value) or not str(value):
        return None
    try:
        state = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise BridgeError(
            f"the MAISSegment state of segment {segment.GetName()!r} is damaged ({exc}); clear it to start over"
        ) from None
    if not isinstance(state, dict):
        raise BridgeError(f"the MAISSegment state of segment {segment.GetName()!r} is not a JSON object")
    return state


def clear_state(segmentation_node: Any, segment_id: str) -> None:
    """Remove the stored session state of a segment (no error if there is none)."""
    segment = _segment(segmentation_node.GetSegmentation(), segment_id, segmentation_node)
    segment.RemoveTag(STATE_TAG)
