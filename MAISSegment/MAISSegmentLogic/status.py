"""The status line: what an update did, in a radiologist's words, and its technical details (translatable; no Qt).

:meth:`StatusMixin.describe` gives the line the panel shows ("Mask updated: 124 mL, 3 points."), with what the user
may need to act on (kept touch-ups, a refused point, undo history full); :meth:`StatusMixin.describe_details` gives
the rest (timings, regions, where the last region is, model) for the line's tooltip. :func:`next_step_hint` says what
to do next when nothing can be placed yet.
"""

from slicer.i18n import tr as _

from .constants import EXCLUDE_KEY, INCLUDE_KEY, UNDO_KEYS
from .records import UpdateResult


def format_volume_ml(volume_ml: float) -> str:
    """``124`` / ``3.4`` / ``< 0.1``: a segment volume in mL with the digits that mean something."""
    if volume_ml >= 10:
        return f"{volume_ml:,.0f}"
    if volume_ml >= 0.05:
        return f"{volume_ml:.1f}"
    return "0" if volume_ml == 0 else "< 0.1"


def _points(count: int) -> str:
    return _("1 point") if count == 1 else _("{count} points").format(count=count)


def next_step_hint(has_volume: bool, has_segmentation: bool, has_segment: bool, placing: str = "") -> str:
    """What to do next, for the hint above the point buttons (``placing``: ``"include"``, ``"exclude"`` or "")."""
    if not has_volume:
        return _("Load a CT or MR volume (File ▸ Add Data, or Sample Data) to start.")
    if not has_segmentation or not has_segment:
        return _(
            "Press Include ({include}) and click on the structure: a new segment is made for it. Or add and name "
            "one in the segment list below first."
        ).format(include=INCLUDE_KEY)
    if placing == "include":
        return _("Click on the structure in a slice view: each green point adds to the mask.")
    if placing == "exclude":
        return _("Click where the mask leaked: each red point removes that region.")
    return _(
        "Press Include ({include}) and click on the structure; Exclude ({exclude}) removes a leak; {undo} undoes."
    ).format(include=INCLUDE_KEY, exclude=EXCLUDE_KEY, undo=UNDO_KEYS[0])


class StatusMixin:
    """The logic's status line (see the module docstring)."""

    def describe(self, result: UpdateResult | None) -> str:
        """The status line for a result: what happened to the mask, in words (details: :meth:`describe_details`)."""
        if result is None:
            return ""
        points = _points(result.clicks)
        volume = "" if result.volume_ml is None else format_volume_ml(result.volume_ml)
        if result.action in ("add", "forget", "rebuild", "configure"):
            text = (
                _("Mask updated: {volume} mL, {points}.").format(volume=volume, points=points)
                if volume
                else _("Mask updated: {points}.").format(points=points)
            )
        elif result.action in ("undo", "redo"):
            what = _("Undone") if result.action == "undo" else _("Redone")
            text = (
                _("{what}: {volume} mL, {points}.").format(what=what, volume=volume, points=points)
                if volume
                else _("{what}: {points}.").format(what=what, points=points)
            )
        elif result.action == "editor-undo":
            text = _("Undone: your last Segment Editor stroke.")
        elif result.action == "editor-redo":
            text = _("Redone: your last Segment Editor stroke.")
        elif result.action == "reset":
            text = _("Segment cleared: all its points removed (Undo brings them back).")
        elif result.action == "restore":
            text = _("Continued from the saved scene: {points}.").format(points=points)
        elif result.action == "overwrite":
            text = _("The model's mask replaced your touch-ups (Undo brings them back).")
        elif result.action == "rejected":
            text = _("Point not used: {reason}").format(reason=result.rejected[0] if result.rejected else "")
        else:
            text = _("Nothing to change.")
        if result.rejected and result.action != "rejected":
            text += " " + _("Point not used: {reason}").format(reason=result.rejected[0])
        if result.kept_edits:
            text += " " + _("Your touch-ups kept ({count} voxels).").format(count=f"{result.kept_edits:,}")
        if result.undo_dropped:
            text += " " + _("Undo history full: the oldest steps were dropped.")
        return text

    def describe_details(self, result: UpdateResult | None) -> str:
        """The technical details of a result (the status line's tooltip): timings, regions, model, kept voxels."""
        if result is None:
            return ""
        lines = []
        if result.total_seconds:
            lines.append(
                _("Time: {total:.0f} ms (network {network:.0f} ms)").format(
                    total=1000 * result.total_seconds, network=1000 * result.seconds
                )
            )
        elif result.seconds:
            lines.append(_("Time: {network:.0f} ms").format(network=1000 * result.seconds))
        lines.append(
            _("{rois} region(s) of 128³ voxels (ROIs); {encodings} new encoding(s)").format(
                rois=result.rois, encodings=result.encoder_runs
            )
        )
        if result.roi is not None:
            (r, a, s), edge = result.roi
            lines.append(
                _("Last point's region: {edge:.0f} mm cube at R {r:.0f}, A {a:.0f}, S {s:.0f}").format(
                    edge=edge, r=r, a=a, s=s
                )
            )
        lines.append(_("Points: {clicks} · model: {model}").format(clicks=result.clicks, model=result.model or "-"))
        if result.edited_voxels:
            lines.append(
                _(
                    "{count} voxels you painted or erased are kept by every later point ('Overwrite my edits' lets "
                    "the model replace them)."
                ).format(count=f"{result.edited_voxels:,}")
            )
        if result.undo_dropped:
            lines.append(
                _("Undo history full: the {count} oldest step(s) can no longer be undone.").format(
                    count=result.undo_dropped
                )
            )
        for reason in result.rejected:
            lines.append(_("Refused: {reason}").format(reason=reason))
        return "\n".join(lines)
