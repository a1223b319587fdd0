"""Points → network → segment: one update of a segment, in three parts that can run on two threads (no Qt).

:meth:`UpdatesMixin.prepare_update` reads the points (and the volume, the stored state and the protected voxels when
a session starts) from MRML on the main thread; :meth:`~UpdatesMixin.compute_update` runs the network on the worker
thread (it touches neither MRML nor Qt, and no state the main thread reads); :meth:`~UpdatesMixin.apply_update`
writes the changed box into the segment on the main thread, records it for undo, tidies the points and stores the
state. :meth:`~UpdatesMixin.on_points_changed` runs the three in a row (scripts, tests). A segment made with other
weights is rewritten only after the user agreed (:class:`~errors.RewriteNeeded`).
"""

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from slicer.i18n import tr as _

from .dependencies import add_library_path
from .edits import _copy_boxed
from .errors import MAISSegmentError, RewriteNeeded
from .points import _add_state_points, _defined_points, plan_update
from .records import UpdateOutcome, UpdateRequest, UpdateResult, _Operation, _Target


def _state_fits(state: dict, volume: Any) -> bool:
    """Whether a stored session state was made on this volume's grid (shape and IJK->RAS)."""
    try:
        image = state["image"]
        return list(volume.array.shape) == list(image["shape_kji"]) and bool(
            np.allclose(volume.ijk_to_ras, np.asarray(image["ijk_to_ras"], dtype=float), atol=1e-4)
        )
    except (KeyError, TypeError, ValueError):
        return False


def _same_mask(a: Any, b: Any) -> bool:
    """Whether two protected masks (``PackedMask`` or bool arrays, or None) hold the same voxels."""
    if a is None or b is None:
        return a is None and b is None
    if hasattr(a, "equals"):
        return a.equals(b)
    if hasattr(b, "equals"):
        return b.equals(a)
    return np.array_equal(a, b)


def _rebuild_session(session: Any, clicks: Sequence[tuple[Sequence[float], bool]]) -> Any:
    """Replace the session's clicks by ``clicks`` (a moved point) and replay them: one undoable operation.

    Returns the changed box; a refused click raises the session's ``PromptError`` with nothing changed.
    """
    return session.replace_clicks(clicks)


def _segment_volume_ml(target: _Target) -> float | None:
    """The segment's volume in mL as MAISSegment last left it (its written content, user's kept edits included), or
    None when unknown. Counts the written mask's own bounding box only, not the whole volume."""
    session, edits = target.session, target.edits
    if session is None or edits is None or edits.written is None:
        return None
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(session.image.ijk_to_ras, dtype=float)[:3, :3])))
    return edits.written.count() * voxel_mm3 / 1000.0


class UpdatesMixin:
    """The logic's updates from points (see the module docstring)."""

    def on_points_changed(
        self,
        segmentation_node: Any,
        segment_id: str,
        volume_node: Any,
        include_node: Any,
        exclude_node: Any,
        use_memory: bool | None = None,
        memory_size: int | None = None,
    ) -> UpdateResult:
        """Bring the segment up to date with its points (and memory settings); synchronous.

        A new point is added as a click; a moved or deleted point (or a changed side) rebuilds the session from the
        points, replaying its memory. The changed box is written into the segment with the masking settings, and the
        change can be undone (:meth:`undo`). Points that cannot be clicks (outside the volume, an include point on a
        protected voxel) are removed and reported in ``rejected``. The widget runs the three parts separately:
        :meth:`prepare_update` and :meth:`apply_update` on the main thread, :meth:`compute_update` on its worker.

        Args:
            segmentation_node, segment_id: the segment to segment (binary labelmap, not locked).
            volume_node: the scalar volume the network sees (its voxel grid is the mask's grid).
            include_node, exclude_node: the point lists (``vtkMRMLMarkupsFiducialNode``; either may be None).
            use_memory, memory_size: new memory settings to apply first (None: unchanged).
        """
        request = self.prepare_update(
            segmentation_node, segment_id, volume_node, include_node, exclude_node, use_memory, memory_size
        )
        try:
            outcome = self.compute_update(request)
        except BaseException:
            self.update_failed(request)
            raise
        return self.apply_update(outcome)

    def prepare_update(
        self,
        segmentation_node: Any,
        segment_id: str,
        volume_node: Any,
        include_node: Any,
        exclude_node: Any,
        use_memory: bool | None = None,
        memory_size: int | None = None,
    ) -> UpdateRequest:
        """Read what an update needs from MRML (main thread): the points, and the volume when a session starts."""
        started = time.perf_counter()
        self.ensure_dependencies()
        add_library_path()
        from MAISSegmentLib.mrml_markups import clicks_from_markups, next_click_order
        from MAISSegmentLib.mrml_masking import is_segment_locked, protected_mask
        from MAISSegmentLib.mrml_state import load_state
        from MAISSegmentLib.mrml_volumes import BridgeError

        target = self._target(segmentation_node, segment_id, volume_node)
        if is_segment_locked(segmentation_node, segment_id):
            raise MAISSegmentError(_("This segment is locked for MAISSegment; unlock it to segment it."))
        target.include_node_id = include_node.GetID() if include_node is not None else None
        target.exclude_node_id = exclude_node.GetID() if exclude_node is not None else None
        options = None
        if use_memory is not None or memory_size is not None:
            options = (
                self.use_memory if use_memory is None else bool(use_memory),
                self.memory_size if memory_size is None else int(memory_size),
            )
            self.use_memory, self.memory_size = options
        volume = state = None
        if target.session is None:
            volume = self._volume(volume_node)
            try:
                state = load_state(segmentation_node, segment_id)
            except BridgeError as exc:
                logging.warning("MAISSegment: %s; starting a new session", exc)
            if state is not None and _state_fits(state, volume) and next_click_order(include_node, exclude_node) == 0:
                # the point lists lost the stored clicks (e.g. only the .seg.nrrd was loaded): put them back first,
                # so that points placed since count as new clicks instead of replacing the stored ones
                _add_state_points(state, include_node, exclude_node)
        request = UpdateRequest(target, clicks_from_markups(include_node, exclude_node), options, volume=volume)
        request.state, request.started = state, started
        if state is not None and not _state_fits(state, volume):
            request.state = None
        request.seen = {
            key: point["ras"] for key, point in _defined_points({True: include_node, False: exclude_node}).items()
        }
        target.busy = True  # until apply_update / update_failed: the worker owns the session meanwhile
        if target.session is None or self._protection_stamp(target) != target.protection_stamp:
            # the other segments changed since the session's protected mask was made (or there is no session yet)
            request.protected = protected_mask(segmentation_node, segment_id, volume_node, self._overwrite_mode())
        return request

    def _new_session(self, model: Any, volume: Any, protected: Any, state: dict | None) -> Any:
        """A session on ``volume``: replayed from ``state`` (a stored state of this image), else empty."""
        from MAISSegmentLib.session import InteractiveSession, SessionOptions

        if state is not None:
            return self._session_from_state(model, volume, state, protected)
        options = SessionOptions(use_memory=self.use_memory and model.has_memory, memory_size=self.memory_size)
        session = InteractiveSession(model, options)
        session.set_image(volume, protected=protected)
        return session

    def _session_from_state(self, model: Any, volume: Any, state: dict, protected: Any) -> Any:
        """Replay a stored state with ``model`` (whose weights may differ: the caller checked that with the user).

        Raises:
            MAISSegmentError: the state is damaged (malformed, a click outside the volume): says what to do.
        """
        from MAISSegmentLib.errors import ConfigError, PromptError
        from MAISSegmentLib.session import InteractiveSession

        try:
            return InteractiveSession.from_state(model, volume, state, protected=protected, check_model=False)
        except (ConfigError, PromptError) as exc:
            raise MAISSegmentError(
                _(
                    "The MAISSegment points stored with this segment cannot be replayed: {error}. Clear them "
                    "(Reset segment) to start over; the segment's voxels are left as they are."
                ).format(error=exc)
            ) from exc

    def compute_update(self, request: UpdateRequest) -> UpdateOutcome:
        """Run the network for a prepared request. Touches neither MRML nor Qt, and no state the main thread reads
        (the target's session is handed over in the outcome): safe on the worker thread.

        On an unexpected error the session is left as it was (its operations of this call are undone); running out
        of (CPU or GPU) memory is reported as a :class:`MAISSegmentError` saying what to do.

        Raises:
            RewriteNeeded: the segment was made with other weights and the user has not agreed to rewrite it.
        """
        from MAISSegmentLib.errors import is_out_of_memory

        try:
            return self._compute_update(request)
        except MAISSegmentError:
            raise
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._release_memory()
            device = self._model_choice["device"]
            raise MAISSegmentError(
                _(
                    "Not enough memory on {device} to update the segment; it was not changed. Close other programs, "
                    "choose the CPU device if the GPU is full, or crop the volume (Crop Volume module). ({error})"
                ).format(device=device, error=exc)
            ) from exc

    def _release_memory(self) -> None:
        """Return cached GPU memory after an out-of-memory error (the failed step's tensors are gone by then)."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _session_for(self, request: UpdateRequest, model: Any) -> tuple[Any, bool, Any]:
        """The session to update: ``(session, rewrite, baseline)``.

        The target's own session when it runs on ``model``; else one replayed with ``model`` from the target's
        clicks (a model switch) or from the stored state (a reloaded scene), or a new one. ``rewrite``: the segment
        shows another network's result, so the whole segment is rewritten (only once the user agreed, else
        :class:`RewriteNeeded`). ``baseline``: for a session replayed with the weights the segment was made with,
        its mask before this update (``BoxedMask``): what MAISSegment had written, the differences being the user's.
        """
        from MAISSegmentLib.segment_edits import BoxedMask
        from MAISSegmentLib.session import state_weights_match
        from MAISSegmentLib.weights_identity import weights_sha256

        target = request.target
        session = target.session
        current = weights_sha256(model)
        if session is not None and session.model is model:  # (restored from the scene with these weights, or not)
            made_with, state = target.made_with, None
            old_model = session.model_id
        elif session is not None:  # the model was switched: replay the clicks with the new one
            state, volume, protected = session.state(), session.image, session.protected
            if request.protected is not None:
                protected = request.protected
            made_with, old_model = target.made_with, session.model_id
        else:
            state, volume, protected = request.state, request.volume, request.protected
            made_with = None if state is None else state.get("weights_sha256")
            if state is not None and not made_with and state_weights_match(state, model):
                made_with = current  # saved before the hash was recorded, by a model of this id
            old_model = (state or {}).get("model_id")
        clicks = (session.clicks if session is not None else []) if state is None else state.get("clicks")
        rewrite = bool(clicks and made_with and made_with != current)
        if rewrite and not target.rewrite_allowed:
            raise RewriteNeeded(
                _(
                    "This segment was made with other weights (model '{old}') than the model in use ('{new}'). Its "
                    "points replayed with '{new}' give another mask, so the next update replaces the whole segment "
                    "(your edits since the last point are kept where known; Undo restores the segment). Nothing was "
                    "changed."
                ).format(old=old_model or "?", new=self.model_label)
            )
        if state is None and session is not None:
            return session, rewrite, None
        new = self._new_session(model, volume, protected, state)
        baseline = None if rewrite or state is None else BoxedMask.from_dense(new.mask)
        return new, rewrite, baseline

    def _compute_update(self, request: UpdateRequest) -> UpdateOutcome:
        from MAISSegmentLib.errors import PromptError
        from MAISSegmentLib.roi import Box, image_box
        from MAISSegmentLib.weights_identity import weights_sha256

        model = self.ensure_model()
        target = request.target
        t0 = time.perf_counter()
        session, rewrite, baseline = self._session_for(request, model)
        existed = session is target.session  # (a new or replayed session was made with request.protected)
        encoder_runs = session.encoder_runs
        box, steps, rejected, actions = Box.nothing(), 0, [], []
        if rewrite:  # the clicks were replayed with other weights: the mask differs anywhere, not only here
            box = image_box(session.image)
        try:
            if existed and request.protected is not None and not _same_mask(session.protected, request.protected):
                box = box.union(session.set_protected(request.protected))  # other segments changed meanwhile
                steps += 1
            if request.options is not None:
                use_memory = request.options[0] and session.model.has_memory
                if (use_memory, request.options[1]) != (session.options.use_memory, session.options.memory_size):
                    box = box.union(session.configure(use_memory=use_memory, memory_size=request.options[1]))
                    steps += 1
                    actions.append("configure")
            plan = plan_update(session.clicks, request.clicks)
            before = steps
            if plan.kind == "add":
                for ras, include in plan.clicks:
                    try:
                        box = box.union(session.add_click(ras, include))
                        steps += 1
                    except PromptError as exc:
                        rejected.append(str(exc))
            elif plan.kind in ("forget", "rebuild"):
                try:
                    changed = (
                        session.forget(plan.index) if plan.kind == "forget" else _rebuild_session(session, plan.clicks)
                    )
                    box = box.union(changed)
                    steps += 1
                except PromptError as exc:
                    rejected.append(str(exc))
            if plan.kind != "none" and steps > before:
                actions.append(plan.kind)
        except BaseException:
            for _step in range(steps):
                session.undo()
            raise
        action = actions[-1] if actions else ("rejected" if rejected else "none")
        return UpdateOutcome(
            target,
            action,
            steps,
            box,
            time.perf_counter() - t0,
            session.encoder_runs - encoder_runs,
            rejected,
            request,
            session=session,
            rewrite=rewrite and steps > 0,
            baseline=baseline,
            made_with=weights_sha256(model),
        )

    def apply_update(self, outcome: UpdateOutcome) -> UpdateResult:
        """Write a computed update into the segment (main thread), record it for undo, tidy the points, store the state.

        The user's edits of the segment since MAISSegment last wrote it (Segment Editor touch-ups) are kept: the
        network's mask is written around them (:meth:`overwrite_edits` lets it replace them). If the write fails the
        session's operations are undone, the points are left as they are and the error is raised (nothing was
        modified).
        """
        target = outcome.target
        target.busy = False
        target.used = time.monotonic()
        record = None
        if outcome.session is not target.session:
            if outcome.steps == 0 and outcome.rewrite is False and target.session is not None:
                pass  # a replayed session that changed nothing: keep the target's (its undo history stays valid)
            else:
                target.session, target.undo, target.redo = outcome.session, [], []
        edits = self._edits(target)
        if target.replace_allowed or (outcome.rewrite and not edits.known):
            # the user agreed to replace what is there (drawn elsewhere, or another model's result of which there is
            # no record): it is MAISSegment's to overwrite
            self._adopt_segment(target)
        elif outcome.baseline is not None and not edits.known:
            edits.set_baseline(outcome.baseline)
        if outcome.steps:
            edited_before = _copy_boxed(edits.edited)
            try:
                record = self._write(target, outcome.box)
            except BaseException:
                for _step in range(outcome.steps):
                    target.session.undo()
                raise
            self._push(
                target, _Operation(outcome.steps, record, outcome.action, edited_before, _copy_boxed(edits.edited))
            )
            target.made_with = outcome.made_with
            target.rewrite_allowed = target.replace_allowed = False
            self.ensure_terminology(self._nodes(target)[0], target.segment_id)
        request = outcome.request
        self._sync_points(target, None if request is None else request.seen)
        self._store_state(target)
        target.protection_stamp = self._protection_stamp(target)
        result = self._result(target, outcome.action, record, outcome.seconds, outcome.encoder_runs, outcome.rejected)
        self._drop_idle_sessions(target)
        result.undo_dropped = self._trim_undo()
        if request is not None and request.started:
            result.total_seconds = time.perf_counter() - request.started
        return result

    def update_failed(self, request: UpdateRequest) -> None:
        """The worker's computation for ``request`` failed (main thread): the target may be read again."""
        request.target.busy = False

    def _result(self, target: _Target, action: str, record: Any, seconds: float, encoder_runs: int, rejected=()):
        session = target.session
        roi = None
        if session is not None and session.clicks and session.rois:
            last = np.asarray(session.clicks[-1].ras)
            inside = [r for r in session.rois if r.contains(last)] or list(session.rois)
            roi = (tuple(float(x) for x in inside[0].center), inside[0].size * inside[0].spacing)
        result = UpdateResult(
            action=action,
            clicks=len(session.clicks) if session is not None else 0,
            seconds=seconds,
            rois=len(session.rois) if session is not None else 0,
            roi=roi,
            encoder_runs=encoder_runs,
            model=self.model_label,
            box=None if record is None else record.box,
            changed=bool(record is not None and record.changed),
            rejected=list(rejected),
            kept_edits=0 if record is None else int(record.kept_edits),
            edited_voxels=0 if target.edits is None else target.edits.edited_count(),
            volume_ml=_segment_volume_ml(target),
        )
        target.last = result
        return result

    def configure(
        self, segmentation_node: Any, segment_id: str, volume_node: Any, use_memory: bool, memory_size: int
    ) -> UpdateResult:
        """Switch the memory on/off or change its size for this segment (the clicks are replayed; undoable)."""
        target = self._target(segmentation_node, segment_id, volume_node)
        include, exclude = self._node(target, target.include_node_id), self._node(target, target.exclude_node_id)
        if include is None and exclude is None:
            include, exclude = self.get_point_lists(segmentation_node, segment_id)
        return self.on_points_changed(
            segmentation_node, segment_id, volume_node, include, exclude, use_memory, memory_size
        )

    def forget_point(
        self,
        segmentation_node: Any,
        segment_id: str,
        volume_node: Any,
        include_node: Any,
        exclude_node: Any,
        node: Any,
        index: int,
    ) -> UpdateResult:
        """Remove control point ``index`` of ``node`` (one of the two lists) and recompute without it (undoable)."""
        if node is None or not 0 <= index < node.GetNumberOfControlPoints():
            raise MAISSegmentError(_("There is no such point to forget."))
        node.RemoveNthControlPoint(index)
        return self.on_points_changed(segmentation_node, segment_id, volume_node, include_node, exclude_node)
