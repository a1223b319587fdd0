"""A newcomer's first use of the panel, walked headless on real MRML (slicer-core), and the panel's static promises.

The walk (issue 13): a CT is loaded, a segment is created as the Segment Editor's *Add* does, an include point makes
the mask, a touch-up is painted into the segment as the editor's Paint/Erase would (with the editor's snapshot undo
history), the next point keeps the touch-up, and Ctrl+Z undoes the point, then the stroke, then the first point, in
the order they were made; the panel's state (enabled buttons, the hint saying what to do next, the status line) is
checked at each step through the module's Qt-free ``panel_state`` and the logic the widget calls. The coded
terminology of the segment and the points with their memory travel with the scene (``.mrb``).

Static: the ``.ui`` fits Slicer's default module panel width, and the shortcuts collide with neither the Segment
Editor's nor SlicerNNInteractive's, and use no AltGr combination.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import slicer_module_stubs
from slicer_headless import mrml_fixture  # noqa: F401  (provides the "mrml" fixture)
from slicer_module_stubs import module_fixture  # noqa: F401  (provides the "module" fixture)

from conftest import TESTING, TINY

ROOT = TESTING.parent
UI_FILE = ROOT / "MAISSegment" / "Resources" / "UI" / "MAISSegment.ui"
SAMPLE = ROOT / "Resources" / "sample"
MAX_PANEL_WIDTH = 350  # px: Slicer's module panel at its default width, scroll bar included
LIVER = 5  # label of the liver in the sample case (Resources/sample/manifest.json)
TISSUE = "SCT^85756007^Tissue"

# the Segment Editor's keys (qMRMLSegmentEditorWidget::installKeyboardShortcuts) and SlicerNNInteractive's
EDITOR_KEYS = {str(n) for n in range(10)} | {f"Shift+{n}" for n in range(10)}
EDITOR_KEYS |= {"Esc", "Escape", "Space", "Q", "W", "/", "*", ",", ".", ">", "<", "I"}
NNINTERACTIVE_KEYS = {"P", "B", "L", "S", "E", "R", "Delete", "T", "V"}
SLICE_VIEW_KEYS = {"B", "F", "R", "V", "G", "T", "[", "]", "{", "}"}


# ================================================================================================ static
def _ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _size(widget: ET.Element, name: str) -> tuple[int, int] | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            size = prop.find("size") if prop.find("size") is not None else prop.find("rect")
            if size is not None:
                return int(size.findtext("width")), int(size.findtext("height"))
    return None


def _text(widget: ET.Element) -> str:
    for prop in widget.findall("property"):
        if prop.get("name") == "text":
            return prop.findtext("string") or ""
    return ""


def _bool(widget: ET.Element, name: str) -> bool:
    return any(p.get("name") == name and p.findtext("bool") == "true" for p in widget.findall("property"))


def _text_px(text: str) -> int:
    """A generous estimate of a one-line text's width at Slicer's default font (about 7 px per character)."""
    return 7 * len(text)


def test_ui_fits_slicers_default_module_width():
    """No declared minimum size or geometry wider than the panel; long labels wrap; a row of buttons (grid rows,
    horizontal layouts) fits without a horizontal scroll bar."""
    root = _ui_root()
    widgets = list(root.iter("widget"))
    for widget in widgets:
        for name in ("minimumSize", "geometry", "baseSize"):
            size = _size(widget, name)
            assert size is None or size[0] <= MAX_PANEL_WIDTH, (widget.get("name"), name, size)
        maximum = _size(widget, "maximumSize")  # a fixed width (minimum == maximum) would be caught above
        assert maximum is None or maximum[0] >= 16777215 or maximum[0] <= MAX_PANEL_WIDTH, widget.get("name")
        if widget.get("class") == "QLabel" and _text_px(_text(widget)) > MAX_PANEL_WIDTH // 2:
            assert _bool(widget, "wordWrap"), f"{widget.get('name')}: a long label must wrap"
    for layout in root.iter("layout"):
        rows: dict[str, list[ET.Element]] = {}
        for item in layout.findall("item"):
            row = item.get("row", "0") if layout.get("class") == "QGridLayout" else "0"
            child = item.find("widget")
            if child is not None and child.get("class") == "QPushButton":
                rows.setdefault(row, []).append(child)
        if layout.get("class") not in ("QGridLayout", "QHBoxLayout"):
            continue
        for row, buttons in rows.items():
            width = sum(_text_px(_text(b)) + 30 for b in buttons)  # text + icon/padding of each button
            assert width <= MAX_PANEL_WIDTH - 40, (layout.get("name"), row, [_text(b) for b in buttons], width)


def test_ui_panel_layout_for_a_first_use():
    """The point buttons and the Segment Editor are open; model, device and memory are under a collapsed *Advanced*;
    *Learn from my cases* is its own collapsed section; no separate masking row (the editor's masking applies)."""
    widgets = {w.get("name"): w for w in _ui_root().iter("widget")}
    assert widgets["segmentEditorWidget"].get("class") == "qMRMLSegmentEditorWidget"
    for name in ("pointsCollapsibleButton", "segmentsCollapsibleButton"):
        assert not _bool(widgets[name], "collapsed"), name
    for name in ("advancedCollapsibleButton", "learnCollapsibleButton"):
        assert _bool(widgets[name], "collapsed"), name
    advanced = {w.get("name") for w in widgets["advancedCollapsibleButton"].iter("widget")}
    assert {"modelComboBox", "deviceComboBox", "useMemoryCheckBox", "memorySizeSpinBox"} <= advanced
    assert not {"useEditorMaskingCheckBox", "overwriteComboBox", "segmentSelector", "volumeSelector"} & set(widgets)
    assert "color: #1f9d3a" in ET.tostring(widgets["includeButton"], encoding="unicode")  # green
    assert "color: #d93a2b" in ET.tostring(widgets["excludeButton"], encoding="unicode")  # red
    assert "Segment:" not in [_text(w) for w in widgets.values()]  # "Segment: Segment:" is gone


def test_shortcuts_collide_with_neither_the_segment_editor_nor_nninteractive(module):
    keys = [key for keys, _method in module.SHORTCUTS for key in keys]
    assert len(keys) == len(set(keys))
    single = {k for k in keys if "+" not in k}
    assert not single & (EDITOR_KEYS | NNINTERACTIVE_KEYS | SLICE_VIEW_KEYS), single
    assert not any("Alt" in k for k in keys)  # Ctrl+Alt is AltGr on Windows keyboards: it types characters
    undo = dict((method, keys) for keys, method in module.SHORTCUTS)
    assert {"Ctrl+Z", "Z"} <= set(undo["onUndo"]) and {"Ctrl+Y", "Y"} <= set(undo["onRedo"])  # the editor's keys
    legend = module.shortcutLegend()
    for key in (module.INCLUDE_KEY, module.EXCLUDE_KEY, module.FORGET_KEY, "Ctrl+Z", "Ctrl+Y"):
        assert key in legend
    ui = ET.tostring(_ui_root(), encoding="unicode")
    assert f"Include ({module.INCLUDE_KEY})" in ui and f"Exclude ({module.EXCLUDE_KEY})" in ui
    assert "Ctrl+Alt" not in ui
    assert all(method in dir(module.MAISSegmentWidget) for _keys, method in module.SHORTCUTS)


def test_the_widget_stops_polling_when_hidden_and_never_imports_torch_entering():
    """exit() stops the poll timer once nothing started there runs; enter() imports the library on the worker only."""
    source = (ROOT / "MAISSegment" / "MAISSegment.py").read_text(encoding="utf-8")
    body = re.search(r"\n    def enter\(self\) -> None:\n(.*?)\n    def exit", source, re.S).group(1)
    assert "_pollTimer.start()" in body and "refreshModels()" not in body and "import" not in body
    exit_body = re.search(r"\n    def exit\(self\) -> None:\n(.*?)\n    def _idle", source, re.S).group(1)
    assert "_pollTimer.stop()" in exit_body and "removeViewObservations" in exit_body
    setup_body = re.search(r"\n    def setup\(self\) -> None:\n(.*?)\n    @staticmethod", source, re.S).group(1)
    assert "_pollTimer.start()" not in setup_body


# ================================================================================================ the walk
class EditorHistory:
    """The Segment Editor's undo as its effects use it: a snapshot of the segment before each stroke, restored by
    undo (the current one kept for redo). ``can_undo`` is what its (hidden) Undo button's enabled state says."""

    def __init__(self, segmentation, segment_id, volume) -> None:
        self.target = (segmentation, segment_id, volume)
        self.undo_stack: list[np.ndarray] = []
        self.redo_stack: list[np.ndarray] = []

    def _read(self) -> np.ndarray:
        import slicer

        return slicer.util.arrayFromSegmentBinaryLabelmap(*self.target) > 0

    def _write(self, array: np.ndarray) -> None:
        import slicer

        segmentation, segment_id, volume = self.target
        slicer.util.updateSegmentBinaryLabelmapFromArray(array.astype(np.uint8), segmentation, segment_id, volume)

    def stroke(self, array: np.ndarray) -> None:
        """Paint / erase: the segment becomes ``array``."""
        self.undo_stack.append(self._read())
        self.redo_stack.clear()
        self._write(array)

    @property
    def can_undo(self) -> bool:
        return bool(self.undo_stack)

    def undo(self) -> bool:
        if not self.undo_stack:
            return False
        self.redo_stack.append(self._read())
        self._write(self.undo_stack.pop())
        return True

    def redo(self) -> bool:
        if not self.redo_stack:
            return False
        self.undo_stack.append(self._read())
        self._write(self.redo_stack.pop())
        return True


def _ras(volume, kji) -> list[float]:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    k, j, i = kji
    return list(matrix.MultiplyPoint([float(i), float(j), float(k), 1.0])[:3])


def _terminology(segmentation, segment_id) -> str:
    import slicer
    import vtk

    value = vtk.reference("")
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    return str(value) if segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), value) else ""


def test_a_newcomer_segments_the_liver_touches_it_up_and_undoes_in_order(mrml, module, tmp_path):
    import slicer

    panel = module.panel_state
    logic = module.MAISSegmentLogic()
    logic.select_model(checkpoint=str(TINY / "ref_tiny.pth"), device="cpu")  # the module tests' tiny model
    editor = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")  # the Segment Editor's (embedded) node
    logic.segment_editor_node = editor  # its masking settings apply, as the widget sets them

    # an empty scene: the hint says to load a volume; nothing can be placed
    state = panel(logic, *module.editor_selection(editor))
    assert not state.include and not state.exclude and "Load a CT" in state.hint

    # a CT is loaded and shown in the editor: Include is already usable (it creates a segment), the hint says so
    ct = mrml.volumes.AddArchetypeVolume(str(SAMPLE / "ct_abdomen_img.nii.gz"), "ct")
    labels = slicer.util.arrayFromVolume(
        mrml.volumes.AddArchetypeVolume(str(SAMPLE / "ct_abdomen_lab.nii.gz"), "lab", 1)
    )
    editor.SetAndObserveSourceVolumeNode(ct)
    segmentation = logic.create_segmentation(ct)  # what the panel does for a scene without a segmentation
    editor.SetAndObserveSegmentationNode(segmentation)
    state = panel(logic, *module.editor_selection(editor))
    assert state.include and not state.exclude and not state.undo
    assert "Include (A)" in state.hint and "new segment" in state.hint

    # the segment, as the Segment Editor's "Add" creates it (Include would have made the same)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "liver")
    editor.SetSelectedSegmentID(segment_id)
    selection = module.editor_selection(editor)
    assert selection == (segmentation, segment_id, ct)
    state = panel(logic, *selection)
    assert state.include and state.exclude and not state.undo and not state.reset
    assert "Press Include (A)" in state.hint and "Ctrl+Z" in state.hint
    state = panel(logic, *selection, placing="include")
    assert "green point" in state.hint

    # the first include point, on the liver: the mask appears; the status says it in words
    include, exclude = logic.get_point_lists(segmentation, segment_id)
    liver = np.argwhere(labels == LIVER)
    first = tuple(liver[np.argmin(np.linalg.norm(liver - liver.mean(axis=0), axis=1))])
    include.AddControlPointWorld(*_ras(ct, first))
    result = logic.on_points_changed(*selection, include, exclude)
    after_first = slicer.util.arrayFromSegmentBinaryLabelmap(*selection) > 0
    assert result.action == "add" and after_first.any()
    status = logic.describe(result)
    assert re.fullmatch(r"Mask updated: [\d.,]+ mL, 1 point\.", status), status
    assert "network" in logic.describe_details(result)
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    assert result.volume_ml == pytest.approx(np.count_nonzero(after_first) * voxel_ml)
    assert TISSUE in _terminology(segmentation, segment_id)  # coded for a DICOM SEG export
    state = panel(logic, *selection)
    assert state.undo and state.reset and state.forget and not state.redo and not state.overwrite

    # a touch-up in the Segment Editor: erase the mask's upper half (in k), paint 30 voxels beside the point
    history = EditorHistory(*selection)
    erased = after_first.copy()
    erased[: int(np.median(np.nonzero(after_first)[0]))] = False
    erased = after_first & ~erased
    outside = np.argwhere(~after_first)
    nearest = outside[np.argsort(np.linalg.norm(outside - np.array(first), axis=1))[:30]]
    painted = np.zeros_like(after_first)
    painted[tuple(nearest.T)] = True
    touched = (after_first & ~erased) | painted
    history.stroke(touched)
    assert erased.any() and painted.any()
    assert logic.changed_since_written(*selection)
    assert panel(logic, *selection, editor_can_undo=history.can_undo).undo

    # the next point keeps the touch-up (and the status says so)
    second = tuple(liver[np.argsort(np.linalg.norm(liver - np.array(first), axis=1))[40]])
    # off the voxel centre, as a click is: the markups file of the saved scene rounds positions by ~1e-13 mm, which
    # must not move a region boundary
    second_ras = (np.asarray(_ras(ct, second)) + np.array([0.31, -0.27, 0.43])).tolist()
    include.AddControlPointWorld(*second_ras)
    result = logic.on_points_changed(*selection, include, exclude)
    after_second = slicer.util.arrayFromSegmentBinaryLabelmap(*selection) > 0
    assert result.action == "add" and result.clicks == 2
    assert after_second[painted].all() and not after_second[erased].any()
    assert logic.describe(result).startswith("Mask updated: ") and "2 points" in logic.describe(result)
    assert not logic.changed_since_written(*selection)
    assert panel(logic, *selection).overwrite == (logic.edited_voxels(*selection) > 0)

    # Ctrl+Z: the second point, then the stroke, then the first point, in the order they were made
    undo = logic.undo_last_change
    result = undo(*selection, editor_undo=history.undo)
    assert result.action == "undo" and result.clicks == 1
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(*selection) > 0, touched)
    assert include.GetNumberOfControlPoints() == 1 and logic.describe(result).startswith("Undone: ")
    result = undo(*selection, editor_undo=history.undo)
    assert result.action == "editor-undo" and "Segment Editor stroke" in logic.describe(result)
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(*selection) > 0, after_first)
    result = undo(*selection, editor_undo=history.undo)
    assert result.action == "undo" and result.clicks == 0
    assert not (slicer.util.arrayFromSegmentBinaryLabelmap(*selection) > 0).any()
    assert include.GetNumberOfControlPoints() == 0
    assert undo(*selection, editor_undo=history.undo).action == "none"
    # Ctrl+Y brings the first point back
    result = logic.redo_last_change(*selection, editor_redo=history.redo)
    assert result.action == "redo" and result.clicks == 1
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(*selection) > 0, after_first)

    # the scene is saved and reopened: the terminology, the points and the memory come back; the next point
    # continues as the uninterrupted session does on the reopened scene (the saved volume's geometry differs from
    # the loaded NIfTI's by ~1e-13 mm, which may move a resampled voxel at a region's edge: compare on the same data)
    logic.save_state_to_scene()
    bundle = tmp_path / "walk.mrb"
    mrml.save_mrb(bundle)
    mrml.load_mrb(bundle)
    reopened = module.MAISSegmentLogic()
    reopened.select_model(checkpoint=str(TINY / "ref_tiny.pth"), device="cpu")
    segmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    ct = slicer.mrmlScene.GetFirstNodeByName("ct")
    assert TISSUE in _terminology(segmentation, segment_id)
    include, exclude = reopened.get_point_lists(segmentation, segment_id, create=False)
    assert include is not None and include.GetNumberOfControlPoints() == 1
    include.AddControlPointWorld(*second_ras)
    result = reopened.on_points_changed(segmentation, segment_id, ct, include, exclude)
    assert result.action == "add" and result.clicks == 2 and "2 points" in reopened.describe(result)
    from MAISSegmentLib import mrml_volumes
    from MAISSegmentLib.session import InteractiveSession

    uninterrupted = InteractiveSession(reopened.ensure_model())
    uninterrupted.set_image(mrml_volumes.volume_from_node(ct))
    for click in reopened.session(segmentation, segment_id, ct).clicks:
        uninterrupted.add_click(click.ras, click.include)
    assert np.array_equal(reopened.session(segmentation, segment_id, ct).mask, uninterrupted.mask)
    assert np.array_equal(
        slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, ct) > 0, uninterrupted.mask > 0
    )


def test_a_segment_the_user_coded_keeps_its_terminology(mrml, module):
    """ensure_terminology fills in the default only where there is none; create_segment makes a coded segment."""
    import slicer

    volume = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16))
    logic = module.MAISSegmentLogic()
    segmentation = logic.create_segmentation(volume)
    coded = logic.create_segment(segmentation)
    assert TISSUE in _terminology(segmentation, coded)
    chosen = "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
    chosen += "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    other = segmentation.GetSegmentation().AddEmptySegment("", "liver")
    segmentation.GetSegmentation().GetSegment(other).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), chosen)
    assert not logic.ensure_terminology(segmentation, other) and _terminology(segmentation, other) == chosen
    assert slicer_module_stubs.MODULE_FILE.is_file()


def test_a_stroke_taken_in_by_a_later_point_is_undone_after_that_point(mrml, module):
    """Point 1, a stroke inside what point 2 rewrites, point 2: Ctrl+Z undoes point 2, then the stroke (the editor's
    undo, although MAISSegment's record of the segment now holds it), then point 1 - never point 1 over the stroke."""
    import slicer

    volume, segmentation, ids = module.MAISSegmentTest.make_scene()
    logic = module.MAISSegmentTest.make_logic()
    target = (segmentation, ids["target"], volume)
    include, exclude = logic.get_point_lists(*target[:2])
    module.MAISSegmentTest.place(include, module.MAISSegmentTest.ras((30, 25, 20)))
    logic.on_points_changed(*target, include, exclude)
    after_first = slicer.util.arrayFromSegmentBinaryLabelmap(*target) > 0
    history = EditorHistory(*target)
    stroke = after_first.copy()
    stroke[20, 25, 31:34] = True  # three voxels beside the mask, near point 2: inside the box it rewrites
    stroke[20, 25, 28] = False
    history.stroke(stroke)
    module.MAISSegmentTest.place(include, module.MAISSegmentTest.ras((31, 25, 20)))
    result = logic.on_points_changed(*target, include, exclude)
    assert result.action == "add" and logic.edited_voxels(*target) > 0
    assert logic.undo_last_change(*target, editor_undo=history.undo).action == "undo"
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(*target) > 0, stroke)
    assert not logic.changed_since_written(*target)  # the record holds the stroke now: the order alone tells
    assert logic.undo_last_change(*target, editor_undo=history.undo).action == "editor-undo"
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(*target) > 0, after_first)
    result = logic.undo_last_change(*target, editor_undo=history.undo)
    assert result.action == "undo" and result.clicks == 0
    assert not (slicer.util.arrayFromSegmentBinaryLabelmap(*target) > 0).any()
    # without an editor (the Python console), Ctrl+Z is MAISSegment's own undo
    result = logic.redo_last_change(*target)
    assert result.action == "redo" and result.clicks == 1


def test_reload_imports_the_logic_and_the_library_afresh():
    """Slicer's Reload re-executes only MAISSegment.py: its onReload first drops MAISSegmentLogic and MAISSegmentLib
    from sys.modules, so an edit there takes effect without restarting Slicer."""
    import importlib
    import sys

    logic_pkg = importlib.import_module("MAISSegmentLogic")
    importlib.import_module("MAISSegmentLogic.constants")
    importlib.import_module("MAISSegmentLib.roi")
    kept = {n: m for n, m in sys.modules.items() if n.startswith(("MAISSegmentLogic", "MAISSegmentLib"))}
    try:
        dropped = logic_pkg.forget_loaded_packages()
        assert {"MAISSegmentLogic", "MAISSegmentLogic.constants", "MAISSegmentLib.roi"} <= set(dropped)
        assert not any(n.startswith(("MAISSegmentLogic", "MAISSegmentLib")) for n in sys.modules)
        assert "MAISSegmentLibrary" not in dropped  # only these packages, not names that merely start alike
        fresh = importlib.import_module("MAISSegmentLogic.constants")
        assert fresh is not kept["MAISSegmentLogic.constants"]
    finally:
        for name in [n for n in sys.modules if n.startswith(("MAISSegmentLogic", "MAISSegmentLib"))]:
            del sys.modules[name]
        sys.modules.update(kept)  # the other tests keep the modules (and classes) they already hold
    source = (ROOT / "MAISSegment" / "MAISSegment.py").read_text(encoding="utf-8")
    body = re.search(r"\n    def onReload\(self\) -> None:\n(.*?)\n    def cleanup", source, re.S).group(1)
    assert body.index("self.cleanup()") < body.index("forget_loaded_packages()") < body.index(".onReload(self)")
