"""MAISSegment: interactive 3-D segmentation with include/exclude points (3D Slicer scripted module).

The file follows Slicer's scripted-module template: ``MAISSegment`` (the module's description),
``MAISSegmentParameterNode`` (the GUI state, bound to the ``.ui`` widgets through their ``SlicerParameterName``
property), ``MAISSegmentWidget`` (a thin Qt layer), ``MAISSegmentLogic`` (everything else; no Qt, usable from the Python
console and tested headless on slicer-core by ``Testing/test_slicer_module.py``) and ``MAISSegmentTest`` (the in-Slicer
test, the same scenarios).

How points become voxels
------------------------
One :class:`MAISSegmentLib.session.InteractiveSession` per (segmentation, segment, volume) holds the clicks and the MAIS
memory of that object. The clicks are the control points of two point lists of the segment (include + and exclude −),
in click order (``mais:order=N`` in each point's description, see ``MAISSegmentLib.mrml_markups``). Whenever the points
change, :meth:`MAISSegmentLogic.on_points_changed` compares them with the session: new points become clicks; a moved or
deleted point makes the session rebuild from the points (the memory is replayed). Only the changed box is written into
the segment, through ``mrml_writing.write_mask`` (editable area, "modify other segments" and locked segments honoured),
and every write is recorded, so :meth:`~MAISSegmentLogic.undo` / :meth:`~MAISSegmentLogic.redo` restore the exact
labelmaps together with the session (memory included) and the points. After every change the session's state
(clicks, options, model) is stored in the segment tag ``MAISSegment.State``, so a saved and reloaded scene continues
with the full memory.

Threads: :meth:`~MAISSegmentLogic.prepare_update` and :meth:`~MAISSegmentLogic.apply_update` touch MRML (main thread);
:meth:`~MAISSegmentLogic.compute_update` runs the network and touches neither MRML nor Qt, so the widget runs it on one
persistent worker thread (:class:`Worker`; cuDNN/MPS caches are per thread).

Heavy imports (torch, MAISSegmentLib) happen inside functions, at first use, after the dependency check.
"""

import collections
import importlib.util
import inspect
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_NAME = "MAISSegment"
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH_VERSION = "2.5"  # torch.serialization.safe_globals, used by MAISSegmentLib.checkpoint
DEVICES = ("auto", "cpu", "cuda", "mps")  # MAISSegmentLib.devices.DEVICE_CHOICES
OVERWRITE_MODES = ("none", "visible", "all")  # MAISSegmentLib.mrml_masking.OVERWRITE_MODES
DEFAULT_MAX_LIVE_SESSIONS = 8  # segments whose session stays in memory (the others replay their clicks when used)
DEFAULT_UNDO_BUDGET_BYTES = 256 * 2**20  # undo history kept for all segments together (oldest dropped first)
SAME_POSITION_MM = 1e-3  # two clicks closer than this (mm, per axis) on the same side are the same click
INCLUDE_COLOR = (0.20, 0.80, 0.30)  # include (+) points: green
EXCLUDE_COLOR = (0.95, 0.25, 0.20)  # exclude (−) points: red
POINTS_ROLE_ATTRIBUTE = "MAISSegment.Role"  # "include" | "exclude" on the point lists this module creates
POINTS_SEGMENT_ATTRIBUTE = "MAISSegment.SegmentID"
POINTS_SEGMENTATION_REFERENCE = "MAISSegmentSegmentation"  # node reference role: point list -> segmentation node
ROLES = ("include", "exclude")

# Keyboard shortcuts while the module is shown: (key sequence, widget method); descriptions in shortcutDescriptions().
SHORTCUTS = (
    ("I", "onPlaceIncludeShortcut"),
    ("E", "onPlaceExcludeShortcut"),
    ("Ctrl+Alt+Z", "onUndo"),
    ("Ctrl+Alt+Y", "onRedo"),
    ("Ctrl+Alt+F", "onForgetPoint"),
)


class MAISSegmentError(RuntimeError):
    """A problem the user can fix (missing dependency, no model, wrong nodes); the message says how."""


class RewriteNeeded(MAISSegmentError):
    """The segment was made with other weights than the model in use: its points replayed with this model give
    another mask everywhere, so the next update would rewrite the whole segment. Nothing was changed; call
    :meth:`MAISSegmentLogic.allow_rewrite` once the user agrees, then update again."""


#
# MAISSegment
#


class MAISSegment(ScriptedLoadableModule):
    """Module description (title, category, help), as in Slicer's scripted-module template."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MAIS Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MAISSegment developers"]
        self.parent.helpText = _(
            "Interactive 3-D segmentation: place include (+) and exclude (−) points and a network running on this "
            "computer (CPU or GPU) refines the selected segment after each point. The MAIS memory remembers every "
            "earlier point of the segment, so each point improves the result. Move or delete a point to recompute; "
            "undo, redo and forget any point; the points and the memory are saved with the scene. Only the changed "
            "region is written, honouring the Segment Editor's masking settings."
        )
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _(
            "The network is a SAM-Med3D-compatible backbone (Wang et al.) with the MAIS memory attention "
            "(Orbes-Arteaga et al., MIDL 2025). Built on 3D Slicer's scripted-module template."
        )


#
# MAISSegmentParameterNode
#


@parameterNodeWrapper
class MAISSegmentParameterNode:
    """The module's GUI state, saved with the scene.

    inputVolume - the volume the network segments (the reference grid of the mask).
    segmentation - the segmentation node holding the target segment.
    segmentId - the segment being segmented (set by the segment selector; it has no parameter-node connector).
    includePoints, excludePoints - the point lists of that segment (created by the logic).
    modelId - the model (registered or imported id; the combo box is filled at run time, so it is not bound).
    device - where the network runs.
    useMemory, memorySize - MAIS memory on/off and its capacity (entries per ROI).
    useEditorMasking - take the editable area and "modify other segments" from the Segment Editor.
    overwriteMode - which other segments give up voxels when the Segment Editor's settings are not used.
    learnSteps, learnHoldout - "Learn from my cases": fine-tuning steps and cases held aside for the comparison.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    includePoints: vtkMRMLMarkupsFiducialNode
    excludePoints: vtkMRMLMarkupsFiducialNode
    modelId: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    useMemory: bool = True
    memorySize: Annotated[int, WithinRange(1, 1000)] = 60
    useEditorMasking: bool = True
    overwriteMode: Annotated[str, Choice(list(OVERWRITE_MODES))] = "none"
    learnSteps: Annotated[int, WithinRange(1, 100000)] = 100
    learnHoldout: Annotated[int, WithinRange(0, 100)] = 1


#
# Helpers without Qt or MRML (unit-tested headless)
#


@dataclass(frozen=True)
class UpdatePlan:
    """What to do with a session so that its clicks become the points' clicks.

    kind: ``"none"``, ``"add"`` (``clicks`` are new, appended in order), ``"forget"`` (remove session click ``index``)
    or ``"rebuild"`` (``clicks`` is the whole new list: a point moved, changed side, or several changed).
    """

    kind: str
    clicks: tuple[tuple[tuple[float, float, float], bool], ...] = ()
    index: int = -1


def _click_pair(click: Any) -> tuple[tuple[float, float, float], bool]:
    """``(ras, include)`` of a session Click or of a ``(ras, include)`` pair."""
    ras, include = (click.ras, click.include) if hasattr(click, "ras") else click
    return (float(ras[0]), float(ras[1]), float(ras[2])), bool(include)


def plan_update(session_clicks: Sequence[Any], point_clicks: Sequence[Any], tolerance_mm: float = SAME_POSITION_MM):
    """Compare a session's clicks with the clicks read from the point lists and say what to do (:class:`UpdatePlan`).

    Args:
        session_clicks: the session's clicks (``Click`` objects or ``(ras, include)`` pairs), in order.
        point_clicks: ``(ras (3,) mm, include)`` pairs from ``mrml_markups.clicks_from_markups``, in click order.
        tolerance_mm: positions closer than this on every axis are the same click.
    """
    old = [_click_pair(c) for c in session_clicks]
    new = [_click_pair(c) for c in point_clicks]

    def same(a, b) -> bool:
        return a[1] == b[1] and max(abs(x - y) for x, y in zip(a[0], b[0])) <= tolerance_mm

    prefix = 0
    while prefix < min(len(old), len(new)) and same(old[prefix], new[prefix]):
        prefix += 1
    if prefix == len(old) == len(new):
        return UpdatePlan("none")
    if prefix == len(old):
        return UpdatePlan("add", tuple(new[prefix:]))
    if len(new) == len(old) - 1 and all(same(old[i + 1], new[i]) for i in range(prefix, len(new))):
        return UpdatePlan("forget", index=prefix)
    return UpdatePlan("rebuild", tuple(new))


class Worker:
    """One persistent background thread for the network work (cuDNN and MPS caches are per thread); no Qt inside.

    :meth:`submit` queues ``job()`` for the thread; :meth:`deliver`, called on the main thread (the widget calls it
    from a QTimer), runs ``done(result, error)`` there for every finished job, in submission order. Only one job runs
    at a time.
    """

    def __init__(self, name: str = "MAISSegment worker") -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs submitted whose ``done`` has not been delivered yet."""
        with self._lock:
            return self._pending

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    def submit(self, job: Callable[[], Any], done: Callable[[Any, BaseException | None], None] | None = None) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the MAISSegment worker thread has stopped")
        with self._lock:
            self._pending += 1
        self._jobs.put((job, done))

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # any failure (even SystemExit/KeyboardInterrupt raised in a job) is
                result, error = None, exc  # delivered to the main thread, which reports it and is no longer busy
            self._results.put((done, result, error))

    def deliver(self) -> int:
        """Run the ``done`` callbacks of finished jobs (call on the main thread). Returns how many were delivered."""
        count = 0
        while True:
            try:
                done, result, error = self._results.get_nowait()
            except queue.Empty:
                return count
            with self._lock:
                self._pending -= 1
            count += 1
            if done is None:
                if error is not None:
                    logging.error("MAISSegment: background job failed: %s", error)
                continue
            try:
                done(result, error)
            except Exception:  # one failing callback must not stop the delivery of the others
                logging.exception("MAISSegment: error while handling a background result")

    def stop(self, timeout: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


class BackgroundCommands:
    """Run commands (argv lists, no shell) one after another in a Python thread; no Qt and no MRML inside.

    For installs that take minutes (PyTorch): the main thread keeps running and polls :meth:`take_lines` (new output
    lines, stdout and stderr merged) and :attr:`finished`; :attr:`error` is ``None`` after success, else a message that
    names the failed command, its exit status and its last output lines. :meth:`cancel` stops the running process
    and skips the rest.
    """

    TAIL_LINES = 12  # output lines quoted in the error message

    def __init__(self, commands: Sequence[Sequence[str]]) -> None:
        self.commands = [list(c) for c in commands]
        self._lines: queue.Queue = queue.Queue()
        self._tail: collections.deque = collections.deque(maxlen=self.TAIL_LINES)
        self._process = None
        self._cancelled = threading.Event()
        self._finished = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="MAISSegment install", daemon=True)

    def start(self) -> "BackgroundCommands":
        self._thread.start()
        return self

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def take_lines(self) -> list[str]:
        """The output lines that arrived since the last call (main thread)."""
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the commands are done (scripts and tests; the widget polls instead)."""
        return self._finished.wait(timeout)

    def cancel(self, timeout: float = 5.0) -> None:
        self._cancelled.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except Exception:
                process.kill()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        import subprocess

        try:
            for command in self.commands:
                if self._cancelled.is_set():
                    break
                self._lines.put("$ " + " ".join(command))
                self._process = subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    errors="replace",
                )
                for line in self._process.stdout:
                    line = line.rstrip()
                    self._lines.put(line)
                    self._tail.append(line)
                code = self._process.wait()
                if self._cancelled.is_set():
                    break
                if code != 0:
                    tail = "\n".join(self._tail)
                    self.error = f"'{' '.join(command[1:])}' failed (exit status {code}):\n{tail}"
                    break
        except OSError as exc:  # plain text here: no translation (Qt) off the main thread
            self.error = f"could not run '{' '.join(command)}': {exc}"
        finally:
            if self._cancelled.is_set() and self.error is None:
                self.error = "cancelled"
            self._finished.set()


@dataclass
class DependencyPlan:
    """What :meth:`MAISSegmentLogic.dependency_plan` found missing, and how it will be installed.

    ``torch_commands``: the commands that install PyTorch (empty when it is installed): light-the-torch with the
    PyTorch extension's arguments, run by Slicer's Python in a background process. ``packages``: the lines of
    ``Resources/requirements.txt`` that are not satisfied (installed afterwards with ``pip_ensure``).
    """

    torch_commands: list[list[str]] = field(default_factory=list)
    torch_requirement: str = ""
    packages: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return bool(self.torch_commands or self.packages)

    def describe(self) -> str:
        """The confirmation text: every package that will be downloaded and installed."""
        lines = [_("MAISSegment needs these Python packages, which will be downloaded and installed now:"), ""]
        if self.torch_commands:
            lines.append(
                "• "
                + _(
                    "PyTorch ({requirement}): the CUDA or CPU build that fits this computer, chosen by "
                    "light-the-torch (1-3 GB; several minutes; Slicer stays usable meanwhile)"
                ).format(requirement=self.torch_requirement)
            )
        lines += [f"• {p}" for p in self.packages]
        return "\n".join(lines)


def _pytorch_utils() -> Any:
    """The PyTorch extension's ``PyTorchUtils`` module (imported at first use).

    Raises:
        MAISSegmentError: the extension is not installed (the message says how to get it).
    """
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise MAISSegmentError(
            _(
                "MAISSegment needs the PyTorch extension: install 'PyTorch' from the Extensions Manager and "
                "restart Slicer."
            )
        ) from None
    return PyTorchUtils


def slicer_python() -> str:
    """The Python interpreter that installs into this Slicer (``PythonSlicer``), else this process's Python."""
    import shutil

    return shutil.which("PythonSlicer") or sys.executable


def read_requirements(path: str) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options skipped)."""
    lines = []
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "-")):
                lines.append(line)
    return lines


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """The requirements (PEP 508 strings) that are not installed at an acceptable version in this Python."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement  # shipped with Slicer
    except ImportError:  # pragma: no cover - packaging is everywhere pip is
        Requirement = None
    missing = []
    for text in requirements:
        if Requirement is None:
            name, specifier, marker = re.split(r"[<>=!~;\[ ]", text, maxsplit=1)[0], None, None
        else:
            req = Requirement(text)
            name, specifier, marker = req.name, req.specifier, req.marker
        if marker is not None and not marker.evaluate():
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if specifier is not None and not specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


def _add_library_path() -> None:
    """Make ``MAISSegmentLib`` importable when the module runs from a source checkout (it lies beside MAISSegment/);
    an installed extension has it beside this file, on Slicer's module path already."""
    for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(folder, "MAISSegmentLib", "__init__.py")):
            if folder not in sys.path:
                sys.path.insert(0, folder)
            return


def _state_fits(state: dict, volume: Any) -> bool:
    """Whether a stored session state was made on this volume's grid (shape and IJK->RAS)."""
    try:
        image = state["image"]
        return list(volume.array.shape) == list(image["shape_kji"]) and bool(
            np.allclose(volume.ijk_to_ras, np.asarray(image["ijk_to_ras"], dtype=float), atol=1e-4)
        )
    except (KeyError, TypeError, ValueError):
        return False


def _add_state_points(state: dict, include_node: Any, exclude_node: Any) -> None:
    """Add the clicks of a stored session state to the point lists, with their click orders."""
    _add_library_path()
    from MAISSegmentLib.mrml_markups import add_click_point
    from MAISSegmentLib.mrml_volumes import BridgeError

    for order, click in enumerate(state.get("clicks") or []):
        try:
            node = include_node if bool(click["include"]) else exclude_node
            if node is not None:
                add_click_point(node, [float(x) for x in click["ras"]], order)
        except (KeyError, TypeError, ValueError, BridgeError):
            logging.warning("MAISSegment: skipping a malformed stored click %r", click)


def _same_mask(a: Any, b: Any) -> bool:
    """Whether two protected masks (``PackedMask`` or bool arrays, or None) hold the same voxels."""
    if a is None or b is None:
        return a is None and b is None
    if hasattr(a, "equals"):
        return a.equals(b)
    if hasattr(b, "equals"):
        return b.equals(a)
    return np.array_equal(a, b)


def _defined_points(nodes: dict[bool, Any]) -> dict[tuple[bool, str], dict[str, Any]]:
    """The placed points of ``{include: point list node or None}``, keyed by ``(include, control point ID)``:
    ``{"id", "ras" (3,) world RAS mm, "order" (mais:order or None)}``. Points being placed are skipped."""
    _add_library_path()
    from MAISSegmentLib.mrml_markups import click_order

    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    points: dict[tuple[bool, str], dict[str, Any]] = {}
    for side, node in nodes.items():
        for i in range(node.GetNumberOfControlPoints() if node is not None else 0):
            if node.GetNthControlPointPositionStatus(i) != defined:
                continue
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, position)
            point_id = node.GetNthControlPointID(i)
            points[(side, point_id)] = {"id": point_id, "ras": np.asarray(position), "order": click_order(node, i)}
    return points


def _copy_boxed(mask: Any) -> Any:
    """A copy of a ``segment_edits.BoxedMask`` (for undo)."""
    from MAISSegmentLib.segment_edits import BoxedMask

    return BoxedMask(mask.shape_kji, mask.box, mask.data.copy())


def _rebuild_session(session: Any, clicks: Sequence[tuple[Sequence[float], bool]]) -> Any:
    """Replace the session's clicks by ``clicks`` (a moved point) and replay them: one undoable operation.

    Returns the changed box; a refused click raises the session's ``PromptError`` with nothing changed.
    """
    return session.replace_clicks(clicks)


#
# MAISSegmentLogic
#


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


@dataclass(frozen=True)
class ModelChoice:
    """A model offered in the model selector."""

    id: str
    label: str
    usable: bool  # its weight file is here and verified by size (SHA-256 at load)
    download_url: str | None = None  # registered with a URL and not here yet: it can be downloaded
    size_bytes: int | None = None
    verification: str = ""  # how its file is checked (``ModelEntry.verification_text``), e.g. "unverified (first
    # download records the hash)"


class MAISSegmentLogic(ScriptedLoadableModuleLogic):
    """Interactive segmentation of segments from include/exclude points, without Qt.

    Usable from the Python console and from other modules::

        logic = MAISSegmentLogic()
        logic.select_model(model_id="sam-med3d-turbo", device="auto")     # or checkpoint="/path/model.pth"
        include, exclude = logic.get_point_lists(segmentationNode, segmentId)
        include.AddControlPoint([12.0, -40.5, 88.0])                      # RAS mm
        logic.on_points_changed(segmentationNode, segmentId, volumeNode, include, exclude)
        logic.undo(segmentationNode, segmentId, volumeNode)

    Settings (attributes): ``use_memory``, ``memory_size`` (new sessions), ``overwrite`` (``"none"``, ``"visible"``,
    ``"all"``: other segments that give up voxels) and ``segment_editor_node`` (when set, its editable area, intensity
    range and "modify other segments" are used instead of ``overwrite``).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.use_memory = True
        self.memory_size = 60
        self.overwrite = "none"
        self.undo_budget_bytes = DEFAULT_UNDO_BUDGET_BYTES  # undo history of all segments of the scene
        self._serial = 0  # operations recorded so far (orders them across segments)
        self.segment_editor_node = None
        self._requirements_file: str | None = None  # default: Resources/requirements.txt (see requirements_path)
        self._targets: dict[tuple[str, str, str], _Target] = {}
        self._volumes: dict[str, tuple[tuple, Any]] = {}  # volume node ID -> (modification stamp, shared Volume)
        self.max_live_sessions = DEFAULT_MAX_LIVE_SESSIONS  # sessions kept in memory (least recently used dropped)
        self._model = None
        self._model_key: tuple | None = None
        self._model_choice: dict[str, Any] = {"model_id": "", "checkpoint": None, "device": "auto", "trusted": False}
        self._loaded_choice: dict[str, Any] | None = None  # the choice the model in use was loaded (or given) for
        self._previous_choice: dict[str, Any] | None = None  # what use_learned_model() replaced (switch back)
        self.last_learn_result = None  # MAISSegmentLib.learn.LearnResult of the last finished run
        self.model_label = ""
        self._dependencies_ok = False

    def getParameterNode(self):
        return MAISSegmentParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------------------------------------- dependencies
    @property
    def requirements_file(self) -> str | None:
        """The requirements file checked by :meth:`ensure_dependencies` (None: ``Resources/requirements.txt``);
        setting it makes the next call check again."""
        return self._requirements_file

    @requirements_file.setter
    def requirements_file(self, path: str | None) -> None:
        self._requirements_file = path
        self._dependencies_ok = False

    def requirements_path(self) -> str | None:
        """``Resources/requirements.txt``: beside this file once installed, at the repository root in a checkout."""
        if self.requirements_file:
            return self.requirements_file
        for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
            path = os.path.join(folder, "Resources", "requirements.txt")
            if os.path.isfile(path):
                return path
        return None

    def missing_requirements(self) -> list[str]:
        """The packages of ``Resources/requirements.txt`` that this Python lacks (torch is handled separately)."""
        path = self.requirements_path()
        return missing_requirements(read_requirements(path)) if path else []

    def dependencies_present(self) -> bool:
        """Cheap check (nothing imported): whether torch is installed and MAISSegmentLib can be found."""
        _add_library_path()
        return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("MAISSegmentLib") is not None

    def ensure_dependencies(self, confirm: Callable[[list[str]], bool] | None = None) -> None:
        """Make torch and the packages of ``Resources/requirements.txt`` available; nothing is imported before.

        Inside Slicer (main thread: it may show dialogs) torch comes from the PyTorch extension (``PyTorchUtils``
        chooses the CUDA or CPU build for the machine, asking first) and missing packages are listed to the user
        (``confirm(packages) -> bool``; default: a dialog) before ``slicer.packaging.pip_ensure`` (Slicer ≥ 5.12;
        ``slicer.util.pip_install`` before) installs them. Outside Slicer nothing is installed: a missing package is
        an error naming it.

        Raises:
            MAISSegmentError: a dependency is missing and was not installed (the message says what to do).
        """
        if self._dependencies_ok:
            return
        in_slicer = getattr(slicer, "app", None) is not None
        self._ensure_torch(in_slicer)
        missing = self.missing_requirements()
        if missing:
            packages = ", ".join(missing)
            if not in_slicer:
                raise MAISSegmentError(
                    _("Missing Python packages: {packages}. Install them into this Python environment.").format(
                        packages=packages
                    )
                )
            if not (confirm or self._confirm_install)(missing):
                raise MAISSegmentError(
                    _("MAISSegment cannot run without these Python packages: {packages}.").format(packages=packages)
                )
            self._pip_install(missing)
            still = self.missing_requirements()
            if still:
                raise MAISSegmentError(
                    _("Installing {packages} did not succeed; see the Python console.").format(
                        packages=", ".join(still)
                    )
                )
        _add_library_path()
        if importlib.util.find_spec("MAISSegmentLib") is None:
            raise MAISSegmentError(_("MAISSegmentLib is missing from this installation; reinstall the extension."))
        self._dependencies_ok = True

    @staticmethod
    def _confirm_install(packages: list[str]) -> bool:
        text = DependencyPlan(packages=list(packages)).describe()
        return bool(slicer.util.confirmOkCancelDisplay(text, _("MAISSegment: install Python packages")))

    @staticmethod
    def _pip_install(packages: list[str]) -> None:
        """Install through ``slicer.packaging.pip_ensure`` (the user was asked already), else ``slicer.util``."""
        packaging = getattr(slicer, "packaging", None)
        ensure = getattr(packaging, "pip_ensure", None)
        if ensure is not None:
            wanted = {"prompt_install": False, "requester": MODULE_NAME}
            try:
                accepted = inspect.signature(ensure).parameters
            except (TypeError, ValueError):
                accepted = {}
            ensure(list(packages), **{k: v for k, v in wanted.items() if k in accepted})
        else:
            slicer.util.pip_install(list(packages))

    @staticmethod
    def _ensure_torch(in_slicer: bool) -> None:
        if in_slicer:
            torch_logic = _pytorch_utils().PyTorchUtilsLogic()
            if not torch_logic.torchInstalled():
                logging.info("MAISSegment: PyTorch is required; installing it (this may take several minutes)")
                if (
                    torch_logic.installTorch(askConfirmation=True, torchVersionRequirement=f">={MIN_TORCH_VERSION}")
                    is None
                ):
                    raise MAISSegmentError(_("PyTorch was not installed; MAISSegment cannot run without it."))
            version = torch_logic.torch.__version__
        else:
            if importlib.util.find_spec("torch") is None:
                raise MAISSegmentError(_("PyTorch is not installed in this Python environment (pip install torch)."))
            import torch

            version = torch.__version__
        if _version_tuple(version) < _version_tuple(MIN_TORCH_VERSION):
            raise MAISSegmentError(
                _(
                    "PyTorch {version} is too old; MAISSegment needs {minimum} or newer (PyTorch Utils module: "
                    "install with the version requirement >={minimum})."
                ).format(version=version, minimum=MIN_TORCH_VERSION)
            )

    def dependency_plan(self) -> DependencyPlan:
        """What is missing and how it will be installed; cheap (nothing heavy is imported), main thread. Empty once
        :meth:`ensure_dependencies` has succeeded.

        Raises:
            MAISSegmentError: inside Slicer without the PyTorch extension (it says to install it).
        """
        if self._dependencies_ok:  # checked once by ensure_dependencies: every later point skips the lookups
            return DependencyPlan()
        plan = DependencyPlan(packages=self.missing_requirements())
        if importlib.util.find_spec("torch") is None:
            plan.torch_requirement = f"torch>={MIN_TORCH_VERSION}"
            if getattr(slicer, "app", None) is not None:
                plan.torch_commands = self.torch_install_commands()
        return plan

    @staticmethod
    def torch_install_commands() -> list[list[str]]:
        """The commands that install PyTorch the way the PyTorch extension does, for a background process.

        ``PyTorchUtilsLogic.installTorch`` runs light-the-torch (which picks the CUDA build that fits the NVIDIA
        driver, else the CPU build) on the main thread, which freezes Slicer for minutes. The same installation is run
        here as two commands of Slicer's Python (``PythonSlicer``): ``pip install light-the-torch``, then
        ``light_the_torch install`` with the arguments PyTorchUtils builds (its ``_getPipInstallArguments``, when it
        has one), so the result is the one the extension would give.
        """
        requirement = f">={MIN_TORCH_VERSION}"
        arguments = None
        build = getattr(_pytorch_utils().PyTorchUtilsLogic, "_getPipInstallArguments", None)
        if build is not None:
            try:
                arguments = list(build(None, requirement))
            except Exception:  # another version of the extension: use the plain form
                logging.exception("MAISSegment: PyTorchUtils._getPipInstallArguments failed")
        if not arguments:
            arguments = ["install", "torch" + requirement]
        python = slicer_python()
        return [
            [python, "-m", "pip", "install", "--disable-pip-version-check", "light-the-torch>=0.5"],
            [python, "-m", "light_the_torch", *arguments],
        ]

    def start_dependency_install(self, plan: DependencyPlan) -> BackgroundCommands:
        """Start installing PyTorch in the background (the user has confirmed ``plan.describe()``).

        When it has finished without error, call :meth:`ensure_dependencies` with ``confirm=lambda packages: True``
        on the main thread: it finds torch and installs ``plan.packages`` with ``pip_ensure``.
        """
        return BackgroundCommands(plan.torch_commands).start()

    # ---------------------------------------------------------------------------------------------- models
    def available_models(self) -> list[ModelChoice]:
        """Registered (``Resources/models.json``) and imported models, with whether their file is there."""
        self.ensure_dependencies()
        from MAISSegmentLib import weights

        status_text = {
            "bundled": _("built in"),
            "cached": _("downloaded"),
            "imported": _("imported"),
            "not downloaded": _("not downloaded"),
            "missing": _("file missing"),
            "damaged": _("damaged"),
        }
        return [
            ModelChoice(
                e.id,
                f"{e.id} ({status_text.get(e.status, e.status)})",
                e.status in ("bundled", "cached", "imported"),
                e.url if e.builtin and e.url and e.status in ("not downloaded", "damaged") else None,
                e.size_bytes,
                e.verification_text,
            )
            for e in weights.list_models()
        ]

    def download_model(self, model_id: str, progress: Callable[[int, int | None], None] | None = None) -> str:
        """Download a registered model into the weight cache (``$MAIS_WEIGHTS_DIR``), checked by size and SHA-256.
        Slow: run it on the worker thread; ``progress(bytes_done, bytes_total_or_None)`` is called from that thread.
        Returns the verified file's path.

        Raises:
            MAISSegmentError: unknown id, no URL, no network, HTTP error, short or damaged file (nothing is left in
            the cache; the model in use is unchanged).
        """
        self.ensure_dependencies()
        from MAISSegmentLib import weights

        try:
            return os.fspath(weights.download(model_id, progress=progress))
        except weights.WeightsError as exc:
            raise MAISSegmentError(
                _("Downloading '{model}' failed: {error}").format(model=model_id, error=exc)
            ) from exc

    @staticmethod
    def _choice_key(choice: dict[str, Any]) -> tuple:
        """What identifies a loaded network: the model id, weight file, device and trust of a model choice."""
        return (choice["model_id"], choice["checkpoint"], choice["device"], choice["trusted"])

    @property
    def model_loaded(self) -> bool:
        """Whether the chosen model is loaded already (else the next update loads it first: seconds)."""
        return self._model is not None and self._model_key in (self._choice_key(self._model_choice), "given")

    def select_model(
        self,
        model_id: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        trusted: bool | None = None,
    ) -> None:
        """Choose the network for the next clicks; it is loaded at first use (:meth:`ensure_model`).

        Args:
            model_id: a registered or imported id (``mais weights list``); "" = the registry's default.
            checkpoint: a weight file instead of an id (SAM-Med3D or MAISSegment checkpoint).
            device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
            trusted: allow unsafe unpickling of that file (only for files you trust).
        """
        if device is not None and device not in DEVICES and not device.startswith("cuda:"):
            raise MAISSegmentError(_("Unknown device '{device}'.").format(device=device))
        choice = dict(self._model_choice)
        if model_id is not None:
            choice["model_id"], choice["checkpoint"] = model_id, None
        if checkpoint is not None:
            choice["checkpoint"] = os.path.abspath(os.fspath(checkpoint))
            if model_id is None:
                choice["model_id"] = ""
        if device is not None:
            choice["device"] = device
        if trusted is not None:
            choice["trusted"] = bool(trusted)
        if choice != self._model_choice:
            self._model_choice = choice
            if self._model_key == "given":  # a network given to use_model() is replaced by the new choice
                self._model_key = None

    def use_model(self, model: Any, label: str) -> None:
        """Use an already built network (e.g. from ``MAISSegmentLib.build_model``) until :meth:`select_model`
        chooses another one. A segment made with other weights asks before its next update rewrites it
        (:class:`RewriteNeeded`); its clicks are then replayed with this network."""
        self._replace_model(model, "given", label)

    def _replace_model(self, model: Any, key: Any, label: str) -> None:
        """Switch the network (may run on the worker: it touches no target; each target notices the switch at its
        next update, on the worker for that target, see :meth:`_compute_update`)."""
        self._model, self._model_key, self.model_label = model, key, label
        self._loaded_choice = dict(self._model_choice)

    def ensure_model(self) -> Any:
        """The selected network, loaded if needed (worker thread is fine). Changing it drops the sessions: they are
        rebuilt from their stored states (the clicks replayed with the new model) at the next point.

        Raises:
            MAISSegmentError: no model selected and no default registered. CheckpointError/WeightsError: the weight
            file is missing or damaged (messages from MAISSegmentLib).
        """
        if self.model_loaded:
            return self._model
        choice = dict(self._model_choice)
        key = self._choice_key(choice)
        self.ensure_dependencies()
        from MAISSegmentLib import build_model
        from MAISSegmentLib.errors import MAISError, is_out_of_memory

        try:
            path, label = self._checkpoint_of(choice)
            model = build_model(None, checkpoint=path, device=choice["device"], trusted=choice["trusted"])
        except MAISSegmentError:
            self._keep_loaded_model()
            raise
        except Exception as exc:
            if not isinstance(exc, (MAISError, OSError)) and not is_out_of_memory(exc):
                raise
            kept = self._keep_loaded_model()
            wanted = choice["model_id"] or os.path.basename(os.fspath(choice["checkpoint"] or ""))
            text = _("The model '{model}' cannot be used: {error}").format(model=wanted, error=exc)
            if is_out_of_memory(exc):
                text += " " + _("There is not enough memory for it: choose the CPU device or a smaller model.")
            if kept:
                text += " " + _("Still using '{model}'.").format(model=self.model_label)
            raise MAISSegmentError(text) from exc
        self._replace_model(model, key, label or os.path.basename(os.fspath(path)))
        return model

    def _keep_loaded_model(self) -> bool:
        """After a failed load: go back to the model in use (if any), so the next point still works. Returns
        whether there is one."""
        if self._model is None or self._loaded_choice is None:
            return False
        self._model_choice = dict(self._loaded_choice)
        choice = self._model_choice
        if self._model_key != "given":
            self._model_key = self._choice_key(choice)
        return True

    def _checkpoint_of(self, choice: dict[str, Any]) -> tuple[str, str]:
        """``(weight file, model id or "")`` of a model choice (the registry's default when nothing is chosen).

        Raises:
            MAISSegmentError: nothing chosen and no default. WeightsError: the file is missing or damaged.
        """
        from MAISSegmentLib import weights

        if choice["checkpoint"] is not None:
            return choice["checkpoint"], choice["model_id"]
        label = choice["model_id"] or weights.default_model_id() or ""
        if not label:
            raise MAISSegmentError(
                _(
                    "No model is selected and none is built in yet: import a weight file (e.g. "
                    "sam_med3d_turbo.pth) with 'Import weights…' and select it."
                )
            )
        entry = weights.get_model(label)
        if entry.status == "not downloaded":
            how = _("press Download next to the model list, or ") if entry.builtin and entry.url else ""
            raise MAISSegmentError(
                _(
                    "The model '{model}' is not on this computer yet: {how}use 'Import weights…' with its file "
                    "({file})."
                ).format(model=label, how=how, file=entry.file)
            )
        return os.fspath(weights.resolve(label)), label

    @property
    def current_model_id(self) -> str:
        """The id of the model chosen now ("" for a weight file chosen by path, or the registry default)."""
        return self._model_choice["model_id"]

    def import_weights(self, path: str, model_id: str | None = None) -> str:
        """Copy a local weight file into the weight cache and register it (offline sites). Returns its model id."""
        self.ensure_dependencies()
        from MAISSegmentLib import weights

        entry = weights.import_weights(path, id=model_id or None, trusted=self._model_choice["trusted"])
        for note in entry.notes:
            logging.info("MAISSegment: %s", note)
        return entry.id

    # ---------------------------------------------------------------------------------------------- learn from my cases
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
            _add_library_path()
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

    # ---------------------------------------------------------------------------------------------- point lists
    @staticmethod
    def _point_lists_in_scene(scene: Any) -> list[Any]:
        nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
        nodes.UnRegister(None)  # the collection is returned with a reference owned by the caller (as slicer.util does)
        found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        return [n for n in found if n.GetAttribute(POINTS_ROLE_ATTRIBUTE) in ROLES]

    def get_point_lists(self, segmentation_node: Any, segment_id: str, create: bool = True) -> tuple[Any, Any]:
        """The include (+) and exclude (−) point lists of a segment, created (green and red) if missing.

        The lists carry the attributes ``MAISSegment.Role`` / ``MAISSegment.SegmentID`` and a node reference to the
        segmentation, so they are found again after the scene is saved and reloaded. The point lists of the other
        segments are hidden.
        """
        self._check_segment(segmentation_node, segment_id)
        scene = segmentation_node.GetScene()
        lists: dict[str, Any] = {}
        for node in self._point_lists_in_scene(scene):
            mine = (
                node.GetAttribute(POINTS_SEGMENT_ATTRIBUTE) == segment_id
                and node.GetNodeReferenceID(POINTS_SEGMENTATION_REFERENCE) == segmentation_node.GetID()
            )
            if mine:
                lists.setdefault(node.GetAttribute(POINTS_ROLE_ATTRIBUTE), node)
            display = node.GetDisplayNode()
            if display is not None:
                display.SetVisibility(bool(mine))
        if create:
            segment_name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
            for role, color, sign in (("include", INCLUDE_COLOR, "+"), ("exclude", EXCLUDE_COLOR, "-")):
                if role in lists:
                    continue
                name = (_("{segment} include points") if role == "include" else _("{segment} exclude points")).format(
                    segment=segment_name
                )
                node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
                node.CreateDefaultDisplayNodes()
                node.SetAttribute(POINTS_ROLE_ATTRIBUTE, role)
                node.SetAttribute(POINTS_SEGMENT_ATTRIBUTE, segment_id)
                node.SetNodeReferenceID(POINTS_SEGMENTATION_REFERENCE, segmentation_node.GetID())
                node.SetMarkupLabelFormat(f"{sign}%d")
                display = node.GetDisplayNode()
                if display is not None:
                    display.SetSelectedColor(*color)  # Slicer draws selected points (the default) in this colour
                    display.SetColor(*color)
                    if hasattr(display, "SetActiveColor"):
                        display.SetActiveColor(*[min(1.0, c + 0.2) for c in color])
                lists[role] = node
        return lists.get("include"), lists.get("exclude")

    @staticmethod
    def selected_point(include_node: Any, exclude_node: Any) -> tuple[Any, int]:
        """The point "Forget selected point" removes: ``(node, index)``, or ``(None, -1)`` if there is no point.

        The point under the mouse (the display node's active control point), else the last-clicked of the points
        selected in the point lists when not all of them are (Slicer selects new points), else the last click.
        """
        _add_library_path()
        from MAISSegmentLib.mrml_markups import click_order

        nodes = [n for n in (include_node, exclude_node) if n is not None]
        for node in nodes:
            display = node.GetDisplayNode()
            active = (
                display.GetActiveControlPoint()
                if display is not None and hasattr(display, "GetActiveControlPoint")
                else -1
            )
            if 0 <= active < node.GetNumberOfControlPoints():
                return node, active
        points = [(node, i) for node in nodes for i in range(node.GetNumberOfControlPoints())]
        if not points:
            return None, -1
        selected = [(node, i) for node, i in points if node.GetNthControlPointSelected(i)]
        pool = selected if 0 < len(selected) < len(points) else points
        order = {(node.GetID(), i): click_order(node, i) for node, i in pool}
        return max(pool, key=lambda p: -1 if order[(p[0].GetID(), p[1])] is None else order[(p[0].GetID(), p[1])])

    # ---------------------------------------------------------------------------------------------- targets
    @staticmethod
    def _check_segment(segmentation_node: Any, segment_id: str) -> None:
        if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise MAISSegmentError(_("Select a segmentation."))
        if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise MAISSegmentError(_("Select a segment of the segmentation (or add one)."))

    @classmethod
    def _check_selection(cls, segmentation_node: Any, segment_id: str, volume_node: Any) -> None:
        cls._check_segment(segmentation_node, segment_id)
        if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
            raise MAISSegmentError(_("Select the volume to segment."))

    @classmethod
    def missing_selection_message(cls, segmentation_node: Any, segment_id: str, volume_node: Any) -> str:
        """What the user must select before placing points ("" when the segment and the volume are selected)."""
        try:
            cls._check_selection(segmentation_node, segment_id, volume_node)
        except MAISSegmentError as exc:
            return str(exc)
        return ""

    def _target(self, segmentation_node: Any, segment_id: str, volume_node: Any, create: bool = True) -> _Target | None:
        self._check_selection(segmentation_node, segment_id, volume_node)
        key = (segmentation_node.GetID(), segment_id, volume_node.GetID())
        target = self._targets.get(key)
        if target is None and create:
            target = _Target(segmentation_node.GetScene(), *key)
            self._targets[key] = target
        return target

    def session(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> Any:
        """The InteractiveSession of a segment on a volume, or None if it has none (yet)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return None if target is None else target.session

    def unowned_voxels(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> int:
        """Voxels of the segment that no MAISSegment session made: non-zero only before a segment's first update,
        when it was drawn elsewhere (Segment Editor, a loaded file). That update replaces the segment inside the box
        it writes with the network's mask (Undo restores the exact labelmap), so the widget asks first. 0 when the
        segment has a session or a stored session state with clicks (its content is MAISSegment's own)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is not None and target.session is not None:
            return 0
        _add_library_path()
        from MAISSegmentLib.mrml_state import load_state
        from MAISSegmentLib.mrml_volumes import BridgeError, count_segment_voxels

        try:
            state = load_state(segmentation_node, segment_id)
            if state is not None and state.get("clicks"):
                return 0
        except BridgeError:
            pass  # a damaged state is not a session: count the voxels
        return count_segment_voxels(segmentation_node, segment_id, volume_node)

    def can_undo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> bool:
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return bool(target and target.undo)

    def can_redo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> bool:
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return bool(target and target.redo)

    def clear(self) -> None:
        """Forget every session (scene closed). Their states stay in the segments' tags."""
        self._targets.clear()
        self._volumes.clear()

    def _volume(self, volume_node: Any) -> Any:
        """The node's voxels as one read-only ``Volume`` shared by every session on it (copied once per change of the
        node's image or geometry, not once per segment)."""
        image = volume_node.GetImageData()
        stamp = (
            volume_node.GetMTime(),
            0 if image is None else image.GetMTime(),
            0
            if image is None or image.GetPointData().GetScalars() is None
            else image.GetPointData().GetScalars().GetMTime(),
        )
        cached = self._volumes.get(volume_node.GetID())
        if cached is not None and cached[0] == stamp:
            return cached[1]
        _add_library_path()
        from MAISSegmentLib.mrml_volumes import volume_from_node

        volume = volume_from_node(volume_node)
        volume.array.flags.writeable = False
        self._volumes[volume_node.GetID()] = (stamp, volume)
        return volume

    def _drop_idle_sessions(self, keep: _Target) -> int:
        """Keep at most ``max_live_sessions`` sessions in memory: the least recently used others are dropped (their
        clicks are in their segments' tags; the next point there replays them). Returns how many were dropped."""
        live = [t for t in self._targets.values() if t.session is not None and t is not keep and not t.busy]
        excess = len(live) + 1 - self.max_live_sessions
        dropped = 0
        for target in sorted(live, key=lambda t: t.used)[: max(0, excess)]:
            target.session, target.undo, target.redo = None, [], []
            dropped += 1
        return dropped

    def _node(self, target: _Target, node_id: str | None) -> Any:
        return target.scene.GetNodeByID(node_id) if node_id else None

    def _nodes(self, target: _Target) -> tuple[Any, Any]:
        segmentation = self._node(target, target.segmentation_node_id)
        volume = self._node(target, target.volume_node_id)
        if segmentation is None or volume is None:
            raise MAISSegmentError(_("The segmentation or the volume of this segment was removed from the scene."))
        return segmentation, volume

    def _overwrite_mode(self) -> str:
        if self.segment_editor_node is not None:
            _add_library_path()
            from MAISSegmentLib.mrml_masking import overwrite_mode_from_editor_node

            return overwrite_mode_from_editor_node(self.segment_editor_node)
        if self.overwrite not in OVERWRITE_MODES:
            raise MAISSegmentError(_("Unknown overwrite mode '{mode}'.").format(mode=self.overwrite))
        return self.overwrite

    # ---------------------------------------------------------------------------------------------- updates
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
        _add_library_path()
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

    def _edits(self, target: _Target) -> Any:
        """The target's :class:`~MAISSegmentLib.segment_edits.SegmentEdits` (created on first use)."""
        if target.edits is None:
            from MAISSegmentLib.segment_edits import SegmentEdits

            target.edits = SegmentEdits(tuple(target.session.mask.shape))
        return target.edits

    def _adopt_segment(self, target: _Target) -> None:
        """Take the segment's current content as MAISSegment's own (the user agreed to replace it)."""
        _add_library_path()
        from MAISSegmentLib.mrml_volumes import read_segment
        from MAISSegmentLib.segment_edits import BoxedMask

        segmentation, volume = self._nodes(target)
        current = read_segment(segmentation, target.segment_id, volume)
        self._edits(target).set_baseline(BoxedMask.from_dense(current))

    def allow_rewrite(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> None:
        """The user agreed (after :class:`RewriteNeeded`): the next update replays the segment's points with the model
        in use and rewrites the whole segment (their edits since the last point kept when known; undoable)."""
        self._target(segmentation_node, segment_id, volume_node).rewrite_allowed = True

    def allow_replacing(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> None:
        """The user agreed that the first update replaces the voxels drawn elsewhere (:meth:`unowned_voxels`) around
        the points. Without it they are kept as the user's own edits."""
        self._target(segmentation_node, segment_id, volume_node).replace_allowed = True

    def edited_voxels(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> int:
        """Voxels of the segment kept as the user's edits (changed since MAISSegment wrote them)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        return 0 if target is None or target.edits is None else target.edits.edited_count()

    def overwrite_edits(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """ "Let the model overwrite my edits": write the session's mask over the voxels kept as the user's edits
        (undoable: Undo brings the edits back, protected again)."""
        from MAISSegmentLib.segment_edits import BoxedMask

        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is None or target.session is None or target.edits is None or not target.edits.edited_count():
            return UpdateResult("none", model=self.model_label)
        _add_library_path()
        from MAISSegmentLib.mrml_volumes import read_segment_box

        edits = target.edits
        edited_before = _copy_boxed(edits.edited)
        box = edits.forget_edits()
        current = read_segment_box(segmentation_node, segment_id, volume_node, box)
        edits.wrote(box, current)  # what is there now is MAISSegment's to replace
        try:
            record = self._write(target, box)
        except BaseException:
            edits.edited = edited_before
            raise
        self._push(target, _Operation(0, record, "overwrite", edited_before, BoxedMask(edits.shape_kji)))
        self._store_state(target)
        return self._result(target, "overwrite", record, 0.0, 0)

    def _protection_stamp(self, target: _Target) -> tuple:
        """What the session's protected mask depends on: the overwrite mode and, for every other segment, its
        labelmap's and its own modification times (voxels, lock tag), plus visibility in "visible" mode. Cheap: no
        voxel is read. Recorded after each change this logic makes, so only changes made elsewhere differ."""
        segmentation_node, _volume = self._nodes(target)
        segmentation = segmentation_node.GetSegmentation()
        labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        others = []
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(n)
            if segment_id == target.segment_id:
                continue
            segment = segmentation.GetSegment(segment_id)
            layer = segment.GetRepresentation(labelmap)
            others.append((segment_id, segment.GetMTime(), 0 if layer is None else layer.GetMTime()))
        mode = self._overwrite_mode()
        display = segmentation_node.GetDisplayNode()
        visibility = display.GetMTime() if mode == "visible" and display is not None else 0
        return (mode, visibility, tuple(others))

    def _write(self, target: _Target, box: Any) -> Any:
        _add_library_path()
        from MAISSegmentLib.mrml_masking import editable_mask, editing_restricted
        from MAISSegmentLib.mrml_writing import write_mask

        segmentation, volume = self._nodes(target)
        editable = None
        if editing_restricted(self.segment_editor_node):
            editable = editable_mask(segmentation, target.segment_id, volume, self.segment_editor_node)
        record = write_mask(
            segmentation,
            target.segment_id,
            volume,
            target.session.mask,
            box,
            editable=editable,
            overwrite=self._overwrite_mode(),
            edits=self._edits(target),
        )
        self._others_wrote(target, record)
        return record

    def _others_wrote(self, target: _Target, record: Any) -> None:
        """Other segments a write (or undo/redo) changed hold the record's content now: not the user's edits."""
        for segment_id in record.segment_ids[1:]:
            for other in self._targets.values():
                if (
                    other.segmentation_node_id == target.segmentation_node_id
                    and other.segment_id == segment_id
                    and other.edits is not None
                    and other.edits.known
                ):
                    other.edits.wrote(record.box, record.after(segment_id))

    def _others_restored(self, target: _Target, record: Any) -> None:
        """After an undo: the other segments the write changed hold their content from before it."""
        for segment_id in record.segment_ids[1:]:
            for other in self._targets.values():
                if (
                    other.segmentation_node_id == target.segmentation_node_id
                    and other.segment_id == segment_id
                    and other.edits is not None
                    and other.edits.known
                ):
                    other.edits.wrote(record.box, record.before(segment_id))

    def _push(self, target: _Target, operation: _Operation) -> None:
        """Record an operation; keep no more session steps than the session itself can undo."""
        self._serial += 1
        operation.serial = self._serial
        target.undo.append(operation)
        target.redo.clear()
        limit = target.session.options.undo_limit
        while target.undo and sum(op.steps for op in target.undo) > limit:
            target.undo.pop(0)

    def undo_nbytes(self) -> int:
        """Bytes held by the undo/redo history of every segment (segment patches and sessions' records)."""
        return sum(self._target_undo_nbytes(t) for t in self._targets.values())

    @staticmethod
    def _target_undo_nbytes(target: _Target) -> int:
        ops = sum(op.nbytes for op in target.undo) + sum(op.nbytes for op in target.redo)
        return ops + (target.session.undo_nbytes if target.session is not None else 0)

    def _trim_undo(self) -> int:
        """Keep the undo history of all segments within ``undo_budget_bytes``: the oldest operations (of any segment)
        are dropped first, never the newest one. Also drops operations whose session steps the session itself no
        longer holds (its own byte budget). Returns the number of operations dropped."""
        dropped = 0
        for target in self._targets.values():
            depth = target.session.undo_depth if target.session is not None else 0
            while target.undo and sum(op.steps for op in target.undo) > depth:
                target.undo.pop(0)
                dropped += 1
        total = self.undo_nbytes()
        while total > self.undo_budget_bytes:
            candidates = [t for t in self._targets.values() if t.undo]
            if sum(len(t.undo) for t in candidates) <= 1:
                break
            target = min(candidates, key=lambda t: t.undo[0].serial)
            before = self._target_undo_nbytes(target)
            operation = target.undo.pop(0)
            if target.session is not None:
                target.session.drop_oldest_undo(operation.steps)
            total -= before - self._target_undo_nbytes(target)
            dropped += 1
        return dropped

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

    def reset(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """Remove every point of the segment and what the network wrote for them (undoable)."""
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        if target is None or target.session is None or not target.session.clicks:
            return UpdateResult("none", model=self.model_label)
        box = target.session.reset()
        edits = self._edits(target)
        edited_before = _copy_boxed(edits.edited)
        try:
            record = self._write(target, box)
        except BaseException:
            target.session.undo()
            raise
        self._push(target, _Operation(1, record, "reset", edited_before, _copy_boxed(edits.edited)))
        self._sync_points(target)
        self._store_state(target)
        target.protection_stamp = self._protection_stamp(target)
        return self._result(target, "reset", record, 0.0, 0)

    def undo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """Undo the last change of this segment: exact labelmaps (other segments too), session memory and points."""
        return self._undo_redo(segmentation_node, segment_id, volume_node, redo=False)

    def redo(self, segmentation_node: Any, segment_id: str, volume_node: Any) -> UpdateResult:
        """Redo the last undone change of this segment."""
        return self._undo_redo(segmentation_node, segment_id, volume_node, redo=True)

    def _undo_redo(self, segmentation_node: Any, segment_id: str, volume_node: Any, redo: bool) -> UpdateResult:
        target = self._target(segmentation_node, segment_id, volume_node, create=False)
        stack = None if target is None else (target.redo if redo else target.undo)
        if not stack:
            return UpdateResult("none", model=self.model_label)
        _add_library_path()
        from MAISSegmentLib.mrml_writing import redo_write, undo_write

        operation = stack[-1]
        if operation.record is not None:  # MRML first: if the segment cannot be restored, nothing changes
            record = operation.record
            (redo_write if redo else undo_write)(segmentation_node, record)
            if target.edits is not None:  # the segment holds the record's content again, edits as they were then
                target.edits.wrote(record.box, (record.after if redo else record.before)(target.segment_id))
                edited = operation.edited_after if redo else operation.edited_before
                if edited is not None:
                    target.edits.edited = _copy_boxed(edited)
            self._others_wrote(target, record) if redo else self._others_restored(target, record)
        stack.pop()
        for _step in range(operation.steps):
            target.session.redo() if redo else target.session.undo()
        (target.undo if redo else target.redo).append(operation)
        self._sync_points(target)
        self._store_state(target)
        target.protection_stamp = self._protection_stamp(target)
        return self._result(target, "redo" if redo else "undo", operation.record, 0.0, 0)

    # ---------------------------------------------------------------------------------------------- points <-> session
    def _sync_points(self, target: _Target, seen: dict | None = None) -> None:
        """Make the point lists show the session's clicks: click ``n`` is a point carrying ``mais:order=n``.

        Points that match a click (same side, same position) are kept; a point carrying the order of a click that
        moved is moved back; other points (refused, undone) are removed and missing clicks (redone) are added.
        Points being placed (position not yet defined) are left alone, and so are, when ``seen`` (the points an
        update was computed from, :attr:`UpdateRequest.seen`) is given, the points placed or moved since: the user
        made them while the network ran, and the next update takes them in.
        """
        nodes = {True: self._node(target, target.include_node_id), False: self._node(target, target.exclude_node_id)}
        if nodes[True] is None and nodes[False] is None:
            return
        _add_library_path()
        from MAISSegmentLib.mrml_markups import add_click_point, click_order, set_click_order

        clicks = [_click_pair(c) for c in target.session.clicks] if target.session is not None else []
        existing: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        # control point IDs are unique within a point list only: points are keyed by (side, ID)
        used: set[tuple[bool, str]] = set()
        later: set[tuple[bool, str]] = set()  # placed or moved since the update was prepared: the next update's
        matched: dict[int, str] = {}  # click index -> ID of its point (on the click's side)
        for (side, point_id), point in _defined_points(nodes).items():
            before = None if seen is None else seen.get((side, point_id))
            if seen is None or (before is not None and np.max(np.abs(point["ras"] - before)) <= SAME_POSITION_MM):
                existing[side].append(point)
                continue
            later.add((side, point_id))
            n = point["order"]
            if before is not None and n is not None and n < len(clicks) and clicks[n][1] == side:
                matched[n] = point_id  # a moved click's point stays where the user put it
        moved: dict[tuple[bool, str], tuple[float, float, float]] = {}
        for n, (ras, include) in enumerate(clicks):
            if n in matched:
                continue
            candidates = [
                p
                for p in existing[include]
                if (include, p["id"]) not in used and np.max(np.abs(p["ras"] - np.asarray(ras))) <= SAME_POSITION_MM
            ]
            if candidates:
                pick = next((p for p in candidates if p["order"] == n), candidates[0])
                used.add((include, pick["id"]))
                matched[n] = pick["id"]
        for n, (ras, include) in enumerate(clicks):
            if n in matched:
                continue
            pick = next((p for p in existing[include] if (include, p["id"]) not in used and p["order"] == n), None)
            if pick is not None:
                used.add((include, pick["id"]))
                matched[n] = pick["id"]
                moved[(include, pick["id"])] = ras
        for side, node in nodes.items():
            if node is None:
                continue
            modifying = node.StartModify()
            try:
                for point in existing[side]:
                    if (side, point["id"]) not in used:
                        node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(point["id"]))
                for n, (ras, include) in enumerate(clicks):
                    if include != side:
                        continue
                    if n not in matched:
                        add_click_point(node, ras, n)
                        continue
                    if (side, matched[n]) in later:
                        continue  # moved since the update: left where the user put it, for the next update
                    index = node.GetNthControlPointIndexByID(matched[n])
                    if (side, matched[n]) in moved:
                        node.SetNthControlPointPositionWorld(index, *moved[(side, matched[n])])
                    if click_order(node, index) != n:
                        set_click_order(node, index, n)
            finally:
                node.EndModify(modifying)

    # ---------------------------------------------------------------------------------------------- scene state
    def _store_state(self, target: _Target) -> None:
        if target.session is None:
            return
        segmentation = self._node(target, target.segmentation_node_id)
        if segmentation is None or segmentation.GetSegmentation().GetSegment(target.segment_id) is None:
            return
        _add_library_path()
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
        _add_library_path()
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

    # ---------------------------------------------------------------------------------------------- status
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


#
# MAISSegmentWidget
#


class MAISSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The Qt layer: binds the .ui to the parameter node and forwards user actions to :class:`MAISSegmentLogic`.

    The network runs on :class:`Worker` (one persistent thread); MRML and Qt are touched on the main thread only.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._pollTimer = None
        self._busy = False
        self._updatePending = False
        self._configurePending = False  # a pending update must also apply the memory settings
        self._ignorePointEvents = False
        self._sceneGeneration = 0  # incremented when the scene closes: results computed before are dropped
        self._observedPointNodes = []
        self._shortcuts = []
        self._learnRun = None  # MAISSegmentLib.learn.LearnRun in progress
        self._installRun = None  # BackgroundCommands installing PyTorch
        self._learnCandidates = []  # LearnCandidate per row of learnCasesListWidget
        self._learnResult = None  # the last registered LearnResult
        self._modelChoices = {}  # model id -> ModelChoice of the model selector
        self._downloadProgress = None  # (bytes done, total or None) written by the worker, shown by the poll timer
        self._draggingPoint = False  # a point is being dragged: its end-interaction event updates the segment

    # ------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MAISSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MAISSegmentLogic()

        self._worker = Worker()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(30)
        self._pollTimer.connect("timeout()", self._worker.deliver)
        self._pollTimer.connect("timeout()", self._pollLearning)
        self._pollTimer.connect("timeout()", self._pollDownload)
        self._pollTimer.connect("timeout()", self._pollInstall)
        self._pollTimer.start()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartSaveEvent, self.onSceneStartSave)
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        self.addObserver(interactionNode, interactionNode.InteractionModeChangedEvent, self.onInteractionModeChanged)

        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.includeButton.connect("toggled(bool)", lambda checked: self.onPlaceToggled(True, checked))
        self.ui.excludeButton.connect("toggled(bool)", lambda checked: self.onPlaceToggled(False, checked))
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.redoButton.connect("clicked()", self.onRedo)
        self.ui.forgetButton.connect("clicked()", self.onForgetPoint)
        self.ui.resetButton.connect("clicked()", self.onResetSegment)
        self.ui.overwriteEditsButton.connect("clicked()", self.onOverwriteEdits)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.ui.importWeightsButton.connect("clicked()", self.onImportWeights)
        self.ui.downloadWeightsButton.connect("clicked()", self.onDownloadWeights)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.useMemoryCheckBox.connect("toggled(bool)", self.onMemorySettingsChanged)
        self.ui.memorySizeSpinBox.connect("valueChanged(int)", self.onMemorySettingsChanged)
        self.ui.useEditorMaskingCheckBox.connect("toggled(bool)", self._updateGui)
        self.ui.learnCollapsibleButton.connect("contentsCollapsed(bool)", self.onLearnPanelCollapsed)
        self.ui.learnRefreshCasesButton.connect("clicked()", self.refreshLearningCases)
        self.ui.learnStartButton.connect("clicked()", self.onLearnStart)
        self.ui.learnCancelButton.connect("clicked()", self.onLearnCancel)
        self.ui.learnUseModelButton.connect("clicked()", self.onUseLearnedModel)
        self.ui.learnSwitchBackButton.connect("clicked()", self.onSwitchBackModel)

        descriptions = self.shortcutDescriptions()
        tips = "\n".join(f"{key}: {descriptions[method]}" for key, method in SHORTCUTS)
        self.ui.pointsCollapsibleButton.toolTip = _("Keyboard shortcuts while this module is shown:") + "\n" + tips
        self.initializeParameterNode()

    @staticmethod
    def shortcutDescriptions() -> dict[str, str]:
        return {
            "onPlaceIncludeShortcut": _("place include (+) points"),
            "onPlaceExcludeShortcut": _("place exclude (−) points"),
            "onUndo": _("undo the last MAISSegment change"),
            "onRedo": _("redo"),
            "onForgetPoint": _("forget the selected point"),
        }

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()
        self._removeShortcuts()
        if self._learnRun is not None:
            self._learnRun.cancel()
        if self._installRun is not None:
            self._installRun.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._worker is not None:
            self._worker.stop()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._installShortcuts()
        if self.logic.dependencies_present():
            self.refreshModels()
        else:
            self._setStatus(_("PyTorch is installed when you place the first point (the PyTorch extension is used)."))

    def exit(self) -> None:
        self._removeShortcuts()
        self._stopPlacing()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._sceneGeneration += 1
        self._stopPlacing()
        self.setParameterNode(None)
        self._observePointNodes([])
        self.logic.clear()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneStartSave(self, caller, event) -> None:
        self.logic.save_state_to_scene()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.segmentation:
            firstSegmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentationNode:
                self._parameterNode.segmentation = firstSegmentationNode

    def setParameterNode(self, inputParameterNode: MAISSegmentParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # ------------------------------------------------------------------------------------------ state -> GUI
    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        if self.ui.segmentSelector.currentNode() != p.segmentation:
            self.ui.segmentSelector.setCurrentNode(p.segmentation)
        if p.segmentation and p.segmentId and self.ui.segmentSelector.currentSegmentID() != p.segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        self._syncLogicSettings()
        self._updatePointLists()
        self._updateGui()

    def _syncLogicSettings(self) -> None:
        p = self._parameterNode
        self.logic.use_memory, self.logic.memory_size = p.useMemory, p.memorySize
        self.logic.overwrite = p.overwriteMode
        editorNode = None
        if p.useEditorMasking:
            editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        self.logic.segment_editor_node = editorNode
        self.logic.select_model(model_id=p.modelId, device=p.device)

    def _selection(self):
        """(segmentation, segment id, volume) as selected now (any may be None/empty)."""
        p = self._parameterNode
        if p is None:
            return None, "", None
        return p.segmentation, p.segmentId, p.inputVolume

    def _currentTarget(self):
        """(segmentation, segment id, volume) when all three are selected, else None."""
        selection = self._selection()
        return None if self.logic.missing_selection_message(*selection) else selection

    def _updatePointLists(self) -> None:
        target = self._currentTarget()
        if target is None:
            self._observePointNodes([])
            return
        segmentation, segmentId, _volume = target
        include, exclude = self.logic.get_point_lists(segmentation, segmentId)
        if self._parameterNode.includePoints != include:
            self._parameterNode.includePoints = include
        if self._parameterNode.excludePoints != exclude:
            self._parameterNode.excludePoints = exclude
        self._observePointNodes([include, exclude])
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        placing = interactionNode.GetCurrentInteractionMode() == interactionNode.Place
        for button, node in ((self.ui.includeButton, include), (self.ui.excludeButton, exclude)):
            if placing and button.checked:  # e.g. another segment was chosen while placing: place on its list
                slicer.app.applicationLogic().GetSelectionNode().SetActivePlaceNodeID(node.GetID())

    def _observePointNodes(self, nodes) -> None:
        if [n for n in nodes] == self._observedPointNodes:
            return
        markups = slicer.vtkMRMLMarkupsNode
        events = (  # (event, callback): VTK gives custom events no name, so each has its own callback
            (markups.PointPositionDefinedEvent, self.onPointsModified),
            (markups.PointRemovedEvent, self.onPointsModified),
            (markups.PointStartInteractionEvent, self.onPointDragStarted),
            (markups.PointEndInteractionEvent, self.onPointDragEnded),
            (markups.PointModifiedEvent, self.onPointMoved),  # e.g. coordinates typed in the Markups module
        )
        for node in self._observedPointNodes:
            for event, callback in events:
                self.removeObserver(node, event, callback)
        self._observedPointNodes = [n for n in nodes if n is not None]
        for node in self._observedPointNodes:
            for event, callback in events:
                self.addObserver(node, event, callback)
        self._draggingPoint = False

    def _updateGui(self, *args) -> None:
        target = self._currentTarget()
        ready = target is not None and not self._busy
        for button in (self.ui.includeButton, self.ui.excludeButton, self.ui.forgetButton, self.ui.resetButton):
            button.enabled = ready
        self.ui.overwriteEditsButton.enabled = ready and self.logic.edited_voxels(*target) > 0
        self.ui.undoButton.enabled = ready and self.logic.can_undo(*target)
        self.ui.redoButton.enabled = ready and self.logic.can_redo(*target)
        self.ui.overwriteComboBox.enabled = not self.ui.useEditorMaskingCheckBox.checked
        learning = self._learnRun is not None
        self.ui.learnStartButton.enabled = not learning
        self.ui.learnCancelButton.enabled = learning and self._learnRun.running  # not while registering
        self.ui.learnUseModelButton.enabled = (
            self._learnResult is not None and self.logic.current_model_id != self._learnResult.model_id
        )
        self.ui.learnSwitchBackButton.enabled = self.logic.can_switch_back

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    # ------------------------------------------------------------------------------------------ user actions
    def onSegmentChanged(self, segmentId) -> None:
        if self._parameterNode is not None and self._parameterNode.segmentId != segmentId:
            self._parameterNode.segmentId = segmentId or ""

    def _ensureDependencies(self) -> bool:
        """True when torch and the other packages are there. Otherwise ask (listing them) and start installing
        PyTorch in a background process (:meth:`_pollInstall` follows it), and return False: Slicer stays usable and
        the user repeats the action once the status line says the installation is done."""
        if self._installRun is not None:
            self._setStatus(_("PyTorch is still being installed; please wait (see the Python console)."))
            return False
        try:
            plan = self.logic.dependency_plan()
            if plan.torch_commands:
                if not slicer.util.confirmOkCancelDisplay(plan.describe(), _("MAISSegment: install Python packages")):
                    self._setStatus(_("MAISSegment cannot run without PyTorch."))
                    return False
                self._installRun = self.logic.start_dependency_install(plan)
                self._showModelProgress(busy=True)
                self._setStatus(_("Installing PyTorch in the background (several minutes)…"))
                self._updateGui()
                return False
            self.logic.ensure_dependencies()
        except Exception as exc:
            slicer.util.errorDisplay(_("MAISSegment cannot start.") + "\n\n" + str(exc))
            return False
        if self.ui.modelComboBox.count == 0:
            self.refreshModels()
        return True

    def _pollInstall(self) -> None:
        """Poll timer: log the background installation's output; when it ends, finish on the main thread."""
        run = self._installRun
        if run is None:
            return
        for line in run.take_lines():
            logging.info("MAISSegment install: %s", line)
        if not run.finished:
            return
        self._installRun = None
        self._hideModelProgress()
        self._updateGui()
        if run.error is not None:
            self._setStatus(_("PyTorch was not installed."))
            slicer.util.errorDisplay(
                _("Installing PyTorch failed; MAISSegment cannot run without it.") + "\n\n" + run.error
            )
            return
        importlib.invalidate_caches()
        try:  # torch is there now; the other missing packages (already listed to the user) through pip_ensure
            self.logic.ensure_dependencies(confirm=lambda packages: True)
        except Exception as exc:
            slicer.util.errorDisplay(_("MAISSegment cannot start.") + "\n\n" + str(exc))
            return
        self.refreshModels()
        self._setStatus(_("PyTorch is installed: place your point again."))

    def onPlaceToggled(self, include: bool, checked: bool) -> None:
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        if not checked:
            if not (self.ui.includeButton.checked or self.ui.excludeButton.checked):
                interactionNode.SwitchToViewTransformMode()
            return
        other = self.ui.excludeButton if include else self.ui.includeButton
        wasBlocked = other.blockSignals(True)
        other.checked = False
        other.blockSignals(wasBlocked)
        if self._currentTarget() is None or not self._ensureDependencies():
            button = self.ui.includeButton if include else self.ui.excludeButton
            button.checked = False
            if self._currentTarget() is None:
                self._setStatus(self.logic.missing_selection_message(*self._selection()))
            return
        node = self._parameterNode.includePoints if include else self._parameterNode.excludePoints
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode.SetPlaceModePersistence(1)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onPlaceIncludeShortcut(self) -> None:
        self.ui.includeButton.checked = not self.ui.includeButton.checked

    def onPlaceExcludeShortcut(self) -> None:
        self.ui.excludeButton.checked = not self.ui.excludeButton.checked

    def _stopPlacing(self) -> None:
        for button in (self.ui.includeButton, self.ui.excludeButton):
            if button.checked:
                button.checked = False

    def onInteractionModeChanged(self, caller, event) -> None:
        if caller.GetCurrentInteractionMode() != caller.Place:
            for button in (self.ui.includeButton, self.ui.excludeButton):
                wasBlocked = button.blockSignals(True)
                button.checked = False
                button.blockSignals(wasBlocked)

    def onPointsModified(self, caller=None, event=None) -> None:
        """A point placed or removed: recompute (requests made while busy are coalesced)."""
        if not self._ignorePointEvents:
            self.requestUpdate()

    def onPointDragStarted(self, caller=None, event=None) -> None:
        self._draggingPoint = True

    def onPointDragEnded(self, caller=None, event=None) -> None:
        self._draggingPoint = False
        self.onPointsModified()

    def onPointMoved(self, caller=None, event=None) -> None:
        """Any change of a point (also its label or selection): the logic sees whether a position changed (a point
        that did not move changes nothing). During a drag only the drop counts."""
        if not self._draggingPoint:
            self.onPointsModified()

    def onMemorySettingsChanged(self, *args) -> None:
        if self._currentTarget() is not None and self.logic.session(*self._currentTarget()) is not None:
            self.requestUpdate(configure=True)

    def requestUpdate(self, configure: bool = False) -> None:
        """Recompute the segment from its points, on the worker; requests made while it is busy are coalesced."""
        if self._busy:
            self._updatePending = True
            self._configurePending = self._configurePending or configure
            return
        target = self._currentTarget()
        if target is None:
            return
        segmentation, segmentId, volume = target
        p = self._parameterNode
        self._syncLogicSettings()
        if not self._ensureDependencies():  # never installs on this (the UI) thread: it asks, then runs in background
            return
        if not self._confirmReplacing(segmentation, segmentId, volume):
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot update the segment."), waitCursor=True):
            memory = (self.ui.useMemoryCheckBox.checked, self.ui.memorySizeSpinBox.value) if configure else (None, None)
            request = self.logic.prepare_update(
                segmentation, segmentId, volume, p.includePoints, p.excludePoints, *memory
            )
            self._busy = True
            if self.logic.model_loaded:
                self._setStatus(_("Computing…"))
            else:
                self._setStatus(_("Loading the model, then computing… (the first time takes a few seconds)"))
                self._showModelProgress(busy=True)
            self._updateGui()
            generation = self._sceneGeneration
            self._worker.submit(
                lambda: self.logic.compute_update(request),
                lambda outcome, error: self._onComputed(outcome, error, generation, request),
            )

    def _confirmReplacing(self, segmentation, segmentId, volume) -> bool:
        """Before a segment's first update: if it already holds voxels drawn elsewhere, ask whether MAISSegment may
        replace them around the points (Yes) or must keep them as the user's own and segment around them (No)."""
        p = self._parameterNode
        if not any(n is not None and n.GetNumberOfDefinedControlPoints() for n in (p.includePoints, p.excludePoints)):
            return True  # no point: this update writes nothing
        try:
            count = self.logic.unowned_voxels(segmentation, segmentId, volume)
        except Exception as exc:  # cannot read it: the update itself reports the problem
            logging.warning("MAISSegment: cannot count the segment's voxels: %s", exc)
            return True
        if count == 0:
            return True
        name = segmentation.GetSegmentation().GetSegment(segmentId).GetName()
        question = _(
            "Segment '{name}' already holds {count} voxels drawn without MAISSegment.\n\nReplace them with "
            "MAISSegment's result around your points? (Undo restores them.)\n\nNo: they are kept exactly as they "
            "are, and MAISSegment segments around them."
        ).format(name=name, count=f"{count:,}")
        if slicer.util.confirmYesNoDisplay(question, _("MAISSegment: segment not empty")):
            self.logic.allow_replacing(segmentation, segmentId, volume)
        return True

    def _confirmRewrite(self, error, request) -> bool:
        """After :class:`RewriteNeeded`: ask; Yes: allowed, and the update is requested again. No: the points the
        update would have added are removed (nothing was written), the segment stays as it is."""
        target = request.target
        nodes = self.logic._nodes(target)
        question = str(error) + "\n\n" + _("Replace the whole segment with this model's result?")
        if slicer.util.confirmYesNoDisplay(question, _("MAISSegment: segment made with another model")):
            self.logic.allow_rewrite(nodes[0], target.segment_id, nodes[1])
            return True
        _add_library_path()
        from MAISSegmentLib.mrml_markups import click_order

        p = self._parameterNode
        self._ignorePointEvents = True
        try:
            for node in (p.includePoints, p.excludePoints):
                if node is None:
                    continue
                for index in reversed(range(node.GetNumberOfControlPoints())):
                    if click_order(node, index) is None:  # placed now, never applied
                        node.RemoveNthControlPoint(index)
        finally:
            self._ignorePointEvents = False
        self._setStatus(_("Segment left as it was; select the model it was made with to continue it."))
        return False

    def _onComputed(self, outcome, error, generation, request=None) -> None:
        self._busy = False
        self._hideModelProgress()
        if error is not None and request is not None:
            self.logic.update_failed(request)
        if error is not None and not isinstance(error, Exception):  # e.g. KeyboardInterrupt raised in the job
            error = MAISSegmentError(_("The computation was interrupted ({kind}).").format(kind=type(error).__name__))
        if generation != self._sceneGeneration:  # the scene was closed meanwhile: nothing to write into
            self._updatePending = self._configurePending = False
            return
        if isinstance(error, RewriteNeeded) and request is not None:
            if self._confirmRewrite(error, request):
                self._updatePending = True
            self._updateGui()
            if self._updatePending:
                configure, self._updatePending, self._configurePending = self._configurePending, False, False
                self.requestUpdate(configure=configure)
            return
        try:
            if error is not None:
                raise error
            self._ignorePointEvents = True
            try:
                result = self.logic.apply_update(outcome)
            finally:
                self._ignorePointEvents = False
            self._setStatus(self.logic.describe(result))
            if result.rejected:
                slicer.util.warningDisplay(_("Point refused:") + "\n" + "\n".join(result.rejected))
        except Exception as exc:
            self._setStatus(_("Failed: {error}").format(error=exc))
            slicer.util.errorDisplay(_("Segmentation failed.") + "\n\n" + str(exc))
            p = self._parameterNode
            if p is not None and p.modelId != self.logic.current_model_id:  # a model that failed to load: keep the
                p.modelId = self.logic.current_model_id  # one in use selected, or every next point would fail again
                self.refreshModels()
        finally:
            self._updateGui()
            if self._updatePending:
                configure, self._updatePending, self._configurePending = self._configurePending, False, False
                self.requestUpdate(configure=configure)

    def _runQuickAction(self, message: str, action) -> None:
        """Run a quick logic action (undo, redo, reset: no network) with the point observers muted."""
        target = self._currentTarget()
        if target is None or self._busy:
            return
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            self._ignorePointEvents = True
            try:
                result = action(*target)
            finally:
                self._ignorePointEvents = False
            self._setStatus(self.logic.describe(result))
            self._updateGui()

    def onUndo(self) -> None:
        self._runQuickAction(_("Undo failed."), self.logic.undo)

    def onRedo(self) -> None:
        self._runQuickAction(_("Redo failed."), self.logic.redo)

    def onResetSegment(self) -> None:
        self._runQuickAction(_("Reset failed."), self.logic.reset)

    def onOverwriteEdits(self) -> None:
        """Let the model's mask replace the voxels kept as the user's edits (undoable)."""
        self._runQuickAction(_("Overwriting your edits failed."), self.logic.overwrite_edits)

    def onForgetPoint(self) -> None:
        """Remove the selected point; the point-removed event recomputes the segment without it (on the worker)."""
        if self._currentTarget() is None or self._busy:
            return
        try:
            node, index = self.logic.selected_point(
                self._parameterNode.includePoints, self._parameterNode.excludePoints
            )
        except Exception as exc:  # e.g. MAISSegmentLib's packages are not installed yet
            slicer.util.errorDisplay(_("Cannot forget the point.") + "\n\n" + str(exc))
            return
        if node is None:
            self._setStatus(_("There is no point to forget."))
            return
        node.RemoveNthControlPoint(index)

    # ------------------------------------------------------------------------------------------ model
    def refreshModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            self._modelChoices = {}
            try:
                for choice in self.logic.available_models():
                    combo.addItem(choice.label, choice.id)
                    combo.setItemData(combo.count - 1, choice.verification, qt.Qt.ToolTipRole)
                    self._modelChoices[choice.id] = choice
            except Exception as exc:  # e.g. a damaged user_models.json: say so, keep the module usable
                self._setStatus(_("Cannot list the models: {error}").format(error=exc))
            wanted = self._parameterNode.modelId if self._parameterNode else ""
            index = combo.findData(wanted) if wanted else -1
            combo.currentIndex = index if index >= 0 else (0 if combo.count else -1)
        finally:
            combo.blockSignals(wasBlocked)
        self.onModelSelected()

    def onModelSelected(self, *args) -> None:
        if self._parameterNode is None or self.ui.modelComboBox.currentIndex < 0:
            return
        modelId = self.ui.modelComboBox.currentData or ""
        if self._parameterNode.modelId != modelId:
            self._parameterNode.modelId = modelId
        self.logic.select_model(model_id=modelId, device=self._parameterNode.device)
        choice = self._modelChoices.get(modelId)
        self.ui.downloadWeightsButton.enabled = bool(choice and choice.download_url) and not self._busy
        if choice is not None and not choice.usable:
            if choice.download_url:
                self._setStatus(_("'{model}' is not downloaded yet: press Download.").format(model=modelId))
            else:
                self._setStatus(_("'{model}' has no weight file here: use Import weights….").format(model=modelId))

    def onDeviceChanged(self, *args) -> None:
        if self._parameterNode is not None:
            self.logic.select_model(device=self._parameterNode.device)

    def onDownloadWeights(self) -> None:
        """Ask, then download the selected registered model on the worker (progress bar; SHA-256 checked)."""
        modelId = self.ui.modelComboBox.currentData or ""
        choice = self._modelChoices.get(modelId)
        if choice is None or not choice.download_url or self._busy or not self._ensureDependencies():
            return
        size = f" ({choice.size_bytes / 2**20:.0f} MiB)" if choice.size_bytes else ""
        if not slicer.util.confirmOkCancelDisplay(
            _("Download the model '{model}'{size} from\n{url}\ninto the weight cache now?\n\nChecksum: {check}").format(
                model=modelId, size=size, url=choice.download_url, check=choice.verification or _("unknown")
            ),
            _("MAISSegment: download model"),
        ):
            return
        self._busy = True
        self._downloadProgress = (0, choice.size_bytes)
        self._showModelProgress(busy=False)
        self._setStatus(_("Downloading '{model}'…").format(model=modelId))
        self._updateGui()

        def progress(done, total):  # worker thread: no Qt here, the poll timer shows it
            self._downloadProgress = (done, total)

        self._worker.submit(
            lambda: self.logic.download_model(modelId, progress), lambda path, error: self._onDownloaded(modelId, error)
        )

    def _pollDownload(self) -> None:
        progress = self._downloadProgress
        if progress is None:
            return
        done, total = progress
        bar = self.ui.modelProgressBar
        if total:
            bar.setRange(0, 1000)
            bar.value = int(1000 * done / total)
            bar.format = f"{done / 2**20:.0f} / {total / 2**20:.0f} MiB"
        else:
            bar.setRange(0, 0)

    def _onDownloaded(self, modelId, error) -> None:
        self._busy = False
        self._downloadProgress = None
        self._hideModelProgress()
        self._updateGui()
        if error is not None:
            self._setStatus(_("Download failed: {error}").format(error=error))
            slicer.util.errorDisplay(str(error))
            return
        self.refreshModels()
        self._setStatus(_("Model '{model}' downloaded, checked and selected.").format(model=modelId))

    def _showModelProgress(self, busy: bool) -> None:
        bar = self.ui.modelProgressBar
        bar.setRange(0, 0 if busy else 1000)
        bar.value = 0
        bar.visible = True

    def _hideModelProgress(self) -> None:
        if self._downloadProgress is None:
            self.ui.modelProgressBar.visible = False

    def onImportWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("Import model weights"),
            "",
            _("PyTorch checkpoints (*.pth *.pt *.ckpt);;All files (*)"),
        )
        if not path or not self._ensureDependencies() or self._busy:
            return
        self._busy = True
        self._setStatus(_("Checking and importing {file}…").format(file=os.path.basename(path)))
        self._updateGui()
        self._worker.submit(lambda: self.logic.import_weights(path), self._onImported)

    def _onImported(self, modelId, error) -> None:
        self._busy = False
        self._updateGui()
        if error is not None:
            self._setStatus(_("Import failed: {error}").format(error=error))
            slicer.util.errorDisplay(_("The weight file cannot be used.") + "\n\n" + str(error))
            return
        self._parameterNode.modelId = modelId
        self.refreshModels()
        self._setStatus(_("Model '{model}' imported and selected.").format(model=modelId))

    # ------------------------------------------------------------------------------------------ learn from my cases
    def onLearnPanelCollapsed(self, collapsed) -> None:
        if not collapsed:
            self.refreshLearningCases()

    def refreshLearningCases(self) -> None:
        """List the scene's segmentations (checked when the volume they were drawn on is known)."""
        listWidget = self.ui.learnCasesListWidget
        listWidget.clear()
        self._learnCandidates = []
        if not self.logic.dependencies_present():
            return
        default = self._parameterNode.inputVolume if self._parameterNode else None
        self._learnCandidates = self.logic.learning_candidates(default_volume=default)
        for candidate in self._learnCandidates:
            item = qt.QListWidgetItem(candidate.label)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if candidate.volume is not None else qt.Qt.Unchecked)
            listWidget.addItem(item)

    def onLearnStart(self) -> None:
        if self._learnRun is not None or not self._ensureDependencies():
            return
        listWidget = self.ui.learnCasesListWidget
        cases = [
            (candidate.volume, candidate.segmentation)
            for row, candidate in enumerate(self._learnCandidates)
            if listWidget.item(row) is not None and listWidget.item(row).checkState() == qt.Qt.Checked
        ]
        folder = self.ui.learnFolderPathLineEdit.currentPath.strip()
        self._syncLogicSettings()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot start learning from these cases."), waitCursor=True):
            self._learnRun = self.logic.start_learning(
                None if folder else cases,
                folder or None,
                steps=p.learnSteps,
                holdout=p.learnHoldout,
                on_event=self._onLearnEvent,
            )
            self.ui.learnProgressBar.value = 0
            self.ui.learnResultsTable.setRowCount(0)
            self.ui.learnStatusLabel.text = _("Fine-tuning started in the background; you can keep working.")
        self._updateGui()

    def _onLearnEvent(self, event) -> None:
        run = self._learnRun
        if run is not None:
            self.ui.learnProgressBar.value = round(100 * run.progress)
            if run.message:
                self.ui.learnStatusLabel.text = run.message

    def _pollLearning(self) -> None:
        """Called by the poll timer: read the run's progress; once it ended, register its model on the worker."""
        run = self._learnRun
        if run is None or not run.running:
            return
        run.poll()
        if not run.running:
            self.ui.learnStatusLabel.text = _("Registering the new model…")
            self._worker.submit(lambda: self.logic.finish_learning(run), self._onLearnFinished)
            self._updateGui()

    def _onLearnFinished(self, result, error) -> None:
        self._learnRun = None
        if error is not None:
            self.ui.learnProgressBar.value = 0
            self.ui.learnStatusLabel.text = _("Learning failed; the model in use is unchanged.")
            slicer.util.errorDisplay(_("Learning from your cases failed.") + "\n\n" + str(error))
        else:
            self._learnResult = result
            self._showLearnResult(result)
            self.refreshModels()
        self._updateGui()

    def _showLearnResult(self, result) -> None:
        table = self.ui.learnResultsTable
        rows = result.table()
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels([_("Points"), _("Dice before"), _("Dice after")])
        table.setRowCount(len(rows))
        for row, (clicks, before, after) in enumerate(rows):
            for column, value in enumerate((str(clicks), f"{before:.3f}", f"{after:.3f}")):
                table.setItem(row, column, qt.QTableWidgetItem(value))
        text = _("New model '{model}' ({steps} steps on {cases} case(s), {seconds:.0f} s).").format(
            model=result.model_id, steps=result.steps, cases=len(result.train_cases), seconds=result.seconds
        )
        if not rows:
            text += " " + _("No case was held aside, so there is no before/after comparison.")
        self.ui.learnStatusLabel.text = text

    def onLearnCancel(self) -> None:
        if self._learnRun is None:
            return
        self._learnRun.cancel(timeout=2.0)  # a fine-tuning process stops at once on terminate; killed after 2 s
        self._learnRun = None
        self.ui.learnProgressBar.value = 0
        self.ui.learnStatusLabel.text = _("Cancelled; the model in use and the model list are unchanged.")
        self._updateGui()

    def onUseLearnedModel(self) -> None:
        if self._learnResult is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot use the new model."), waitCursor=True):
            self.logic.use_learned_model(self._learnResult.model_id)
            self._parameterNode.modelId = self._learnResult.model_id
            self.refreshModels()
            self._setStatus(_("Using '{model}' from the next point on.").format(model=self._learnResult.model_id))
        self._updateGui()

    def onSwitchBackModel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot switch back."), waitCursor=True):
            if self.logic.switch_back_model():
                self._parameterNode.modelId = self.logic.current_model_id
                self.refreshModels()
                self._setStatus(_("Switched back to the previous model."))
        self._updateGui()

    # ------------------------------------------------------------------------------------------ shortcuts
    def _installShortcuts(self) -> None:
        self._removeShortcuts()
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return
        for key, method in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), mainWindow)
            shortcut.connect("activated()", getattr(self, method))
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []


#
# MAISSegmentTest
#


def _test_checkpoint() -> str | None:
    """The tiny reference checkpoint of the repository's tests, when the source tree is there (or
    ``$MAISSEGMENT_TEST_CHECKPOINT``); None: the tests use a seeded random ``sam-med3d-tiny`` network."""
    path = os.environ.get("MAISSEGMENT_TEST_CHECKPOINT")
    if path:
        return path
    for folder in (os.path.dirname(MODULE_DIR), os.path.dirname(os.path.dirname(MODULE_DIR))):
        candidate = os.path.join(folder, "Testing", "fixtures", "sammed3d_tiny", "ref_tiny.pth")
        if os.path.isfile(candidate):
            return candidate
    return None


class MAISSegmentTest(ScriptedLoadableModuleTest):
    """In-Slicer tests of the logic (``Testing/test_slicer_module.py`` runs them headless on slicer-core too).

    The scene: a small oblique, anisotropic volume (LPS-like axis flips, 0.7 × 0.9 × 2 mm) with a bright ball, and a
    segmentation with a ``target`` segment and an ``other`` segment overlapping the ball's side.
    """

    SHAPE = (40, 50, 60)  # K, J, I

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        if not MAISSegmentLogic().dependencies_present():
            # installing PyTorch asks the user (a dialog would block an unattended ctest run): say so and stop
            self.delayDisplay(
                _(
                    "MAISSegment tests skipped: PyTorch is not installed. Open the module and place a point once to "
                    "install it."
                )
            )
            return
        for test in (
            self.test_points_update_undo_redo,
            self.test_work_made_meanwhile_is_kept,
            self.test_neighbours_untouched_and_memory_kept_per_segment,
            self.test_state_restored_from_scene,
            self.test_learn_from_my_cases,
        ):
            self.setUp()
            test()

    # -------------------------------------------------------------------------------- scene and logic
    @staticmethod
    def affine() -> np.ndarray:
        """IJK -> RAS of the test volume: rotated 27° about (1, 2, 3), I and J flipped, 0.7 × 0.9 × 2 mm."""
        axis = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
        angle = np.deg2rad(27.0)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag([0.7, 0.9, 2.0])
        affine[:3, 3] = [18.0, -12.5, -35.0]
        return affine

    @classmethod
    def ras(cls, ijk) -> list[float]:
        """RAS (mm) of a voxel index (i, j, k) of the test volume."""
        return (cls.affine() @ np.array([*ijk, 1.0]))[:3].tolist()

    @classmethod
    def make_scene(cls):
        """(volume, segmentation, {"target": id, "other": id}) in ``slicer.mrmlScene``."""
        k, j, i = np.indices(cls.SHAPE)
        ball = (i - 30) ** 2 + (j - 25) ** 2 + (4 * (k - 20)) ** 2 < 12**2
        noise = np.random.default_rng(0).integers(0, 20, cls.SHAPE)
        image = (np.where(ball, 400, 40) + noise).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(image, cls.affine(), "ball")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        ids = {name: segmentation.GetSegmentation().AddEmptySegment(name, name) for name in ("target", "other")}
        other = np.zeros(cls.SHAPE, np.uint8)
        other[18:22, 20:32, 36:46] = 1  # overlaps the ball's side
        slicer.util.updateSegmentBinaryLabelmapFromArray(other, segmentation, ids["other"], volume)
        return volume, segmentation, ids

    @staticmethod
    def make_logic() -> MAISSegmentLogic:
        """A logic on the CPU with the tests' tiny checkpoint (else a seeded random tiny network)."""
        logic = MAISSegmentLogic()
        checkpoint = _test_checkpoint()
        if checkpoint is None:
            logic.ensure_dependencies()
            import torch

            from MAISSegmentLib import build_model

            torch.manual_seed(0)
            logic.use_model(build_model("sam-med3d-tiny"), "sam-med3d-tiny (random weights)")
        else:
            logic.select_model(checkpoint=checkpoint, device="cpu")
        return logic

    @staticmethod
    def segment_array(segmentation, segment_id, volume) -> np.ndarray:
        """The segment on the volume's grid as Slicer exports it: bool KJI."""
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0

    @staticmethod
    def place(node, ras) -> None:
        """Place a control point at world RAS ``ras`` as the user does (no click order yet)."""
        node.AddControlPointWorld(vtk.vtkVector3d(*ras))

    # -------------------------------------------------------------------------------- tests
    def test_points_update_undo_redo(self):
        self.delayDisplay(_("Points update the segment; undo and redo restore it exactly"))
        volume, segmentation, ids = self.make_scene()
        target = (segmentation, ids["target"], volume)
        logic = self.make_logic()
        include, exclude = logic.get_point_lists(segmentation, ids["target"])
        snapshots, counts = [self.segment_array(*target)], [0]

        def step(action):
            self.assertEqual(logic.on_points_changed(*target, include, exclude).action, action)
            snapshots.append(self.segment_array(*target))
            counts.append(include.GetNumberOfControlPoints() + exclude.GetNumberOfControlPoints())

        self.place(include, self.ras((30, 25, 20)))
        step("add")
        self.place(exclude, self.ras((8, 8, 8)))
        step("add")
        self.assertTrue(snapshots[-1].any())
        self.assertTrue(np.array_equal(snapshots[-1], logic.session(*target).mask > 0))
        exclude.SetNthControlPointPositionWorld(0, *self.ras((10, 8, 8)))
        step("rebuild")
        exclude.RemoveNthControlPoint(0)
        step("forget")
        for expected, count in zip(reversed(snapshots[:-1]), reversed(counts[:-1])):
            self.assertEqual(logic.undo(*target).action, "undo")
            self.assertTrue(np.array_equal(self.segment_array(*target), expected))
            self.assertEqual(include.GetNumberOfControlPoints() + exclude.GetNumberOfControlPoints(), count)
        self.assertEqual(logic.undo(*target).action, "none")
        for expected, count in zip(snapshots[1:], counts[1:]):
            self.assertEqual(logic.redo(*target).action, "redo")
            self.assertTrue(np.array_equal(self.segment_array(*target), expected))
            self.assertEqual(include.GetNumberOfControlPoints() + exclude.GetNumberOfControlPoints(), count)
        self.delayDisplay(_("Test passed"))

    def test_work_made_meanwhile_is_kept(self):
        self.delayDisplay(_("Points placed while computing are kept; undo never overwrites a later edit"))
        from MAISSegmentLib.mrml_writing import EditedSinceError

        volume, segmentation, ids = self.make_scene()
        target = (segmentation, ids["target"], volume)
        logic = self.make_logic()
        include, exclude = logic.get_point_lists(segmentation, ids["target"])
        self.place(include, self.ras((30, 25, 20)))
        outcome = logic.compute_update(logic.prepare_update(*target, include, exclude))
        self.place(exclude, self.ras((8, 8, 8)))  # while the worker computed
        logic.apply_update(outcome)
        self.assertEqual(exclude.GetNumberOfControlPoints(), 1)
        self.assertEqual(logic.on_points_changed(*target, include, exclude).clicks, 2)
        edited = self.segment_array(*target).astype(bool)
        edited[tuple(np.argwhere(edited)[0])] = False  # a Segment Editor edit after the last click
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, ids["target"], volume)
        with self.assertRaises(EditedSinceError):
            logic.undo(*target)
        self.assertTrue(np.array_equal(self.segment_array(*target).astype(bool), edited))
        self.delayDisplay(_("Test passed"))

    def test_neighbours_untouched_and_memory_kept_per_segment(self):
        self.delayDisplay(_("Other segments stay untouched; each segment keeps its memory"))
        volume, segmentation, ids = self.make_scene()
        logic = self.make_logic()
        lists = {name: logic.get_point_lists(segmentation, sid) for name, sid in ids.items()}
        for name, ijk in (("target", (30, 25, 20)), ("other", (40, 26, 20)), ("target", (26, 22, 19))):
            other_name = "other" if name == "target" else "target"
            before = self.segment_array(segmentation, ids[other_name], volume)
            self.place(lists[name][0], self.ras(ijk))
            logic.on_points_changed(segmentation, ids[name], volume, *lists[name])
            self.assertTrue(np.array_equal(self.segment_array(segmentation, ids[other_name], volume), before))
        self.assertEqual(len(logic.session(segmentation, ids["target"], volume).clicks), 2)
        self.assertEqual(len(logic.session(segmentation, ids["other"], volume).clicks), 1)
        target = self.segment_array(segmentation, ids["target"], volume)
        self.assertTrue(target.any())
        self.assertFalse(np.any(target & self.segment_array(segmentation, ids["other"], volume)))
        self.delayDisplay(_("Test passed"))

    def test_state_restored_from_scene(self):
        self.delayDisplay(_("A new logic continues from the state stored in the scene"))
        volume, segmentation, ids = self.make_scene()
        target = (segmentation, ids["target"], volume)
        logic = self.make_logic()
        include, exclude = logic.get_point_lists(segmentation, ids["target"])
        self.place(include, self.ras((30, 25, 20)))
        logic.on_points_changed(*target, include, exclude)
        logic.save_state_to_scene()
        restored = self.make_logic()
        self.assertEqual(restored.restore_from_scene(*target, include, exclude).clicks, 1)
        self.place(exclude, self.ras((8, 8, 8)))
        logic.on_points_changed(*target, include, exclude)  # the uninterrupted session
        expected = logic.session(*target).mask.copy()
        self.assertEqual(restored.on_points_changed(*target, include, exclude).action, "add")
        self.assertTrue(np.array_equal(restored.session(*target).mask, expected))
        self.delayDisplay(_("Test passed"))

    def test_learn_from_my_cases(self):
        self.delayDisplay(_("Fine-tuning on finished cases registers a new model to switch to and back"))
        import tempfile

        from MAISSegmentLib import weights

        volume, segmentation, ids = self.make_scene()
        ball = self.segment_array(segmentation, ids["other"], volume)  # a finished segment to learn from
        second = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(volume).copy(), self.affine(), "second")
        finished = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "finished")
        finished.CreateDefaultDisplayNodes()
        finished.SetReferenceImageGeometryParameterFromVolumeNode(second)
        segment = finished.GetSegmentation().AddEmptySegment("other", "other")
        slicer.util.updateSegmentBinaryLabelmapFromArray(ball.astype(np.uint8), finished, segment, second)
        logic = self.make_logic()
        if logic._model_key == "given":  # no weight file to fine-tune (an installed extension without the tests' one)
            self.delayDisplay(_("Skipped: no test checkpoint"))
            return
        base = logic.ensure_model()
        saved = os.environ.get(weights.ENV_CACHE)
        with tempfile.TemporaryDirectory() as cache:  # never register test models in the user's cache
            os.environ[weights.ENV_CACHE] = cache
            try:
                cases = [(c.volume, c.segmentation) for c in logic.learning_candidates()]
                self.assertEqual(len(cases), 2)
                result = logic.learn(cases, steps=2, holdout=1, clicks=(1, 2), episode_clicks=2, memory_size=4)
                self.assertEqual(sorted(result.before), ["1", "2"])
                self.assertEqual(sorted(result.after), ["1", "2"])
                self.assertIs(logic.ensure_model(), base)
                logic.use_learned_model(result.model_id)
                self.assertEqual(logic.ensure_model().load_report.model_id, result.model_id)
                self.assertTrue(logic.switch_back_model())
                self.assertEqual(logic.ensure_model().load_report.path, base.load_report.path)
            finally:
                if saved is None:
                    os.environ.pop(weights.ENV_CACHE, None)
                else:
                    os.environ[weights.ENV_CACHE] = saved
        self.delayDisplay(_("Test passed"))
