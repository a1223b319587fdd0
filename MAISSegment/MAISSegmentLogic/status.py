"""The status line: what an update did, in words the user reads (translatable; no Qt)."""

from slicer.i18n import tr as _

from .records import UpdateResult


class StatusMixin:
    """The logic's status line (see the module docstring)."""

    def describe(self, result: UpdateResult | None) -> str:
        """The status line for a result: what happened, the network time, ROIs, clicks and model."""
        if result is None:
            return ""
        names = {
            "add": _("Point added"),
            "forget": _("Point removed"),
            "rebuild": _("Recomputed from the points"),
            "configure": _("Memory settings applied"),
            "reset": _("Segment reset"),
            "undo": _("Undone"),
            "redo": _("Redone"),
            "restore": _("Restored from the scene"),
            "overwrite": _("Your edits replaced by the model's mask"),
            "none": _("Up to date"),
            "rejected": _("Point refused"),
        }
        if result.total_seconds:
            timing = _("{total:.0f} ms (network {network:.0f} ms)").format(
                total=1000 * result.total_seconds, network=1000 * result.seconds
            )
        else:
            timing = _("{network:.0f} ms").format(network=1000 * result.seconds)
        text = _("{action} · {timing} · {rois} ROI(s) · {clicks} point(s) · model: {model}").format(
            action=names.get(result.action, result.action),
            timing=timing,
            rois=result.rois,
            clicks=result.clicks,
            model=result.model or _("none"),
        )
        if result.roi is not None:
            (r, a, s), edge = result.roi
            text += " · " + _("last point's ROI: {edge:.0f} mm cube at R {r:.0f}, A {a:.0f}, S {s:.0f}").format(
                edge=edge, r=r, a=a, s=s
            )
        if result.encoder_runs:
            text += " · " + _("{count} new ROI encoding(s)").format(count=result.encoder_runs)
        if result.kept_edits:
            text += "\n" + _(
                "Kept {count} voxels you edited since the last point (the model would have changed them); "
                "'Overwrite my edits' lets the model replace them."
            ).format(count=f"{result.kept_edits:,}")
        if result.undo_dropped:
            text += "\n" + _("Undo history full: the {count} oldest step(s) can no longer be undone.").format(
                count=result.undo_dropped
            )
        if result.rejected:
            text += "\n" + _("Refused: {reasons}").format(reasons="; ".join(result.rejected))
        return text
