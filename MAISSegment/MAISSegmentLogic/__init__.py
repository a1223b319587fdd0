"""The logic of the MAISSegment Slicer module (no Qt; usable from the Python console), one file per job.

``MAISSegment.py`` composes :class:`MAISSegmentLogic` from the mixins below (one object: they share its attributes,
set in its ``__init__``) and re-exports the public names, so ``MAISSegment.MAISSegmentLogic`` and
``slicer.util.getModuleLogic("MAISSegment")`` are what they always were. Slicer puts the module's folder on
``sys.path``, hence the top-level package name.

================  =====================================================================================================
``constants``     settings and names shared by every part (MRML attributes, colours, defaults, limits)
``errors``        ``MAISSegmentError`` (a problem the user can fix), ``RewriteNeeded``
``dependencies``  torch and ``Resources/requirements.txt`` checked at first use and installed after one confirmation
                  (``DependencyPlan``, ``BackgroundCommands``, ``DependenciesMixin``); ``add_library_path``
``worker``        ``Worker``: the one persistent thread the network runs on
``models``        model choice, download, import and loading (``ModelChoice``, ``ModelsMixin``)
``learning``      "Learn from my cases": fine-tuning in a background process (``LearnCandidate``, ``LearningMixin``)
``records``       what the logic keeps per segment (``_Target``, ``_Operation``) and what updates take and return
                  (``UpdateRequest``, ``UpdateOutcome``, ``UpdateResult``)
``targets``       selection checks, targets and their sessions, shared volumes, protected-mask stamps (``TargetsMixin``)
``points``        point lists ↔ session clicks (``plan_update``, ``PointListsMixin``)
``updates``       points → network → segment in three parts: prepare / compute (worker) / apply (``UpdatesMixin``)
``edits``         the user's own edits kept against the network's mask (``EditsMixin``)
``history``       segment writes with exact undo records, undo / redo / reset, the undo byte budget (``HistoryMixin``)
``scene_state``   session states stored in the segments' tags and restored from a reopened scene (``SceneStateMixin``)
``status``        the status line (``StatusMixin.describe``)
================  =====================================================================================================

Like the module file, no file here imports torch or MAISSegmentLib at module level (they are imported inside
functions, after the dependency check); user-visible strings go through ``_()`` (``slicer.i18n.tr``).
"""

import sys

RELOADED_PACKAGES = ("MAISSegmentLogic", "MAISSegmentLib")  # what Slicer's Reload must import afresh with the module


def forget_loaded_packages(packages: tuple[str, ...] = RELOADED_PACKAGES) -> list[str]:
    """Drop these packages and their submodules from ``sys.modules`` (returns the names dropped, sorted).

    Slicer's *Reload* re-executes only ``MAISSegment.py``; its imports of ``MAISSegmentLogic`` and ``MAISSegmentLib``
    would otherwise return the modules already loaded, so a developer's edits there would not take effect until Slicer
    restarts. The widget's ``onReload`` calls this first (after stopping its worker and timers)."""
    names = sorted(n for n in sys.modules if any(n == p or n.startswith(p + ".") for p in packages))
    for name in names:
        del sys.modules[name]
    return names
