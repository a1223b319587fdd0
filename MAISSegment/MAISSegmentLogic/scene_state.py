"""The sessions saved with the scene and continued after it is reopened (no Qt).

After every change the session's state (clicks, options, weights) is stored in the segment tag ``MAISSegment.State``
(``MAISSegmentLib.mrml_state``), saved with the segmentation (``.seg.nrrd``, ``.mrb``). :class:`SceneStateMixin`
stores it (``_store_state``, ``save_state_to_scene``) and rebuilds a session from it (``restore_from_scene``: the
clicks replayed, same mask, full memory).
"""

import time
from typing import Any

from slicer.i18n import tr as _

from .dependencies import add_library_path
from .errors import MAISSegmentError
from .records import UpdateResult, _Target


class SceneStateMixin:
    """The logic's session states stored in and restored from the scene (see the module docstring)."""

    def _store_state(self, target: _Target) -> None:
        if target.session is None:
            return
        segmentation = self._node(target, target.segmentation_node_id)
        if segmentation is None or segmentation.GetSegmentation().GetSegment(target.segment_id) is None:
            return
        add_library_path()
        from MAISSegmentLib.mrml_state import save_state

        save_state(segmentation, target.segment_id, target.session.state())

    def save_state_to_scene(self) -> int:
        """Store every session's state (clicks, options, model id) in its segment's ``MAISSegment.State`` tag, saved
        with the segmentation (``.seg.nrrd``, ``.mrb``). Done after each change anyway; the widget also calls it when
        the scene is about to be saved. Returns the number of segments written."""
        count = 0
        for target in self._targets.values():
            if target.session is not None and not target.busy:  # a busy one's last state is in its tag already
                self._store_state(target)
                count += 1
        return count

    def restore_from_scene(
        self,
        segmentation_node: Any,
        segment_id: str,
        volume_node: Any,
        include_node: Any = None,
        exclude_node: Any = None,
    ) -> UpdateResult:
        """Rebuild the segment's session from its stored state (its clicks replayed: same mask, full memory), e.g.
        after a scene was reloaded. The segment's voxels are not rewritten. The point lists (found or created when not
        given) are made to show the restored clicks. Synchronous: it runs the network.

        Raises:
            MAISSegmentError: the segment has no stored state. ConfigError: the state belongs to another image.
        """
        add_library_path()
        from MAISSegmentLib.mrml_masking import protected_mask
        from MAISSegmentLib.mrml_state import load_state

        self.ensure_dependencies()
        target = self._target(segmentation_node, segment_id, volume_node)
        state = load_state(segmentation_node, segment_id)
        if state is None:
            raise MAISSegmentError(_("This segment has no stored MAISSegment points to continue from."))
        if include_node is None and exclude_node is None:
            include_node, exclude_node = self.get_point_lists(segmentation_node, segment_id)
        model = self.ensure_model()
        t0 = time.perf_counter()
        volume = self._volume(volume_node)
        protected = protected_mask(segmentation_node, segment_id, volume_node, self._overwrite_mode())
        from MAISSegmentLib.segment_edits import BoxedMask, SegmentEdits
        from MAISSegmentLib.session import state_weights_match
        from MAISSegmentLib.weights_identity import weights_sha256

        target.session = self._session_from_state(model, volume, state, protected)
        target.undo, target.redo = [], []
        target.edits = SegmentEdits(tuple(target.session.mask.shape))
        if state_weights_match(state, model):  # the segment shows this replay, apart from the user's edits
            target.made_with = weights_sha256(model)
            target.edits.set_baseline(BoxedMask.from_dense(target.session.mask))
        else:  # made with other weights: the next update asks before rewriting it (RewriteNeeded)
            target.made_with = state.get("weights_sha256") or "other"
        target.protection_stamp = self._protection_stamp(target)
        target.include_node_id = include_node.GetID() if include_node is not None else None
        target.exclude_node_id = exclude_node.GetID() if exclude_node is not None else None
        self._sync_points(target)
        return self._result(target, "restore", None, time.perf_counter() - t0, target.session.encoder_runs)
