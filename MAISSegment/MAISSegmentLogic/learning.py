""" "Learn from my cases": fine-tuning the selected model on finished segmentations of the scene (no Qt).

:class:`LearnCandidate` is a segmentation offered for learning, with the volume it was drawn on.
:class:`LearningMixin` exports the cases and starts the fine-tuning process (``start_learning``; the widget polls it),
registers its model (``finish_learning``), and switches to it and back (``use_learned_model``,
``switch_back_model``). The work itself is ``MAISSegmentLib.learn`` (a separate Python process).
"""

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import slicer
from slicer.i18n import tr as _

from .dependencies import add_library_path
from .errors import MAISSegmentError


@dataclass(frozen=True)
class LearnCandidate:
    """A segmentation offered to "Learn from my cases", with the volume it was drawn on (None if unknown)."""

    segmentation: Any  # vtkMRMLSegmentationNode
    volume: Any  # vtkMRMLScalarVolumeNode or None
    segments: int

    @property
    def label(self) -> str:
        volume = self.volume.GetName() if self.volume is not None else _("no volume")
        return _("{segmentation} on {volume} ({count} segment(s))").format(
            segmentation=self.segmentation.GetName(), volume=volume, count=self.segments
        )


class LearningMixin:
    """The logic's "Learn from my cases" (see the module docstring)."""

    def learning_candidates(self, scene: Any = None, default_volume: Any = None) -> list[LearnCandidate]:
        """The segmentations of the scene that hold segments, each with the volume it was drawn on (its reference
        geometry), else ``default_volume`` (may be None: exporting it then says to choose a volume)."""
        scene = scene or slicer.mrmlScene
        nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
        nodes.UnRegister(None)
        found = []
        for n in range(nodes.GetNumberOfItems()):
            segmentation = nodes.GetItemAsObject(n)
            count = segmentation.GetSegmentation().GetNumberOfSegments()
            if count == 0:
                continue
            add_library_path()
            from MAISSegmentLib.mrml_export import reference_volume_of

            volume = reference_volume_of(segmentation) or default_volume
            found.append(LearnCandidate(segmentation, volume, count))
        return found

    def start_learning(
        self,
        cases: Sequence[Sequence[Any]] | None = None,
        folder: str | None = None,
        steps: int = 100,
        holdout: int = 1,
        on_event: Callable[[dict], None] | None = None,
        **options: Any,
    ) -> Any:
        """Start fine-tuning the selected model on finished cases in a background process; returns at once.

        The cases are exported from the scene into the run's temporary folder (main thread: it reads MRML), or read
        from ``folder`` (a manifest ``.json`` or a folder of image/label pairs). Poll the returned run
        (``run.poll()``, e.g. from a timer; ``on_event`` receives its progress events), then call
        :meth:`finish_learning` (it registers the new model; the worker thread is fine for it), or ``run.cancel()``.
        The model in use does not change until :meth:`use_learned_model`.

        Args:
            cases: ``(volume node, segmentation node)`` or ``(volume node, segmentation node, segment IDs)`` items.
            folder: instead of ``cases``: a manifest or a folder of cases.
            steps: fine-tuning steps. holdout: cases held aside for the before/after Dice-vs-clicks comparison.
            options: more :class:`MAISSegmentLib.learn.LearnConfig` fields (clicks, episode_clicks, seed...).

        Returns:
            The :class:`MAISSegmentLib.learn.LearnRun`, started.

        Raises:
            MAISSegmentError: no cases, or the model in use has no weight file. BridgeError: a case cannot be
            exported (no volume, empty segmentation, wrong volume); nothing is started and no file is left then.
        """
        self.ensure_dependencies()
        from MAISSegmentLib import learn
        from MAISSegmentLib.mrml_export import export_cases

        if not cases and not folder:
            raise MAISSegmentError(
                _("Choose volumes with finished segmentations (or a folder of cases) to learn from.")
            )
        if self._model_key == "given":
            raise MAISSegmentError(
                _("The model in use was not loaded from a weight file; select a model to fine-tune first.")
            )
        choice = self._model_choice  # the model the next point uses
        checkpoint, model_id = self._checkpoint_of(choice)
        config = learn.LearnConfig(
            base_checkpoint=os.fspath(checkpoint),
            base_model_id=model_id,
            steps=int(steps),
            holdout=int(holdout),
            device=choice["device"],
            **options,
        )
        config.check()  # before exporting anything
        run = learn.LearnRun(config, on_event=on_event)
        try:
            if folder:
                config.data = os.fspath(folder)
            else:
                manifest, exported = export_cases(cases, run.cases_dir)
                for case in exported:
                    for note in case.notes:
                        logging.info("MAISSegment: case %s: %s", case.id, note)
                config.data = os.fspath(manifest)
            run.start()
        except BaseException:
            run.cleanup()
            raise
        return run

    def finish_learning(self, run: Any) -> Any:
        """Register the model of a finished run (see :meth:`start_learning`) and return its
        :class:`MAISSegmentLib.learn.LearnResult`. The model in use is unchanged: see :meth:`use_learned_model`.

        Raises:
            LearnCancelled / LearnError: the run was cancelled or failed (with the end of its error output).
        """
        result = run.finish()
        self.last_learn_result = result
        return result

    def learn(self, cases=None, folder=None, steps: int = 100, holdout: int = 1, **options: Any) -> Any:
        """:meth:`start_learning`, wait, :meth:`finish_learning` (blocking; for scripts and tests)."""
        run = self.start_learning(cases, folder, steps, holdout, **options)
        run.wait()
        return self.finish_learning(run)

    def use_learned_model(self, model_id: str) -> None:
        """Use a fine-tuned model from now on (loaded at the next point); :meth:`switch_back_model` returns to the
        model used before. Sessions continue with the new model (their clicks are replayed)."""
        if not model_id:
            raise MAISSegmentError(_("There is no fine-tuned model to use yet."))
        if self._model_choice["model_id"] != model_id:
            self._previous_choice = dict(self._model_choice)
        self.select_model(model_id=model_id)

    def switch_back_model(self) -> bool:
        """Go back to the model used before :meth:`use_learned_model`. Returns False if there is none."""
        if self._previous_choice is None:
            return False
        previous, self._previous_choice = self._previous_choice, None
        self.select_model(
            model_id=previous["model_id"] if previous["checkpoint"] is None else None,
            checkpoint=previous["checkpoint"],
            device=previous["device"],
            trusted=previous["trusted"],
        )
        return True

    @property
    def can_switch_back(self) -> bool:
        return self._previous_choice is not None
