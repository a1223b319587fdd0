"""The Slicer module (MAISSegment/): static checks of its files, then its logic driven headless.

(a) Static, without importing Slicer: the ``.ui`` has every widget the code uses and binds only parameter-node fields
of matching types; no heavy import at module level; user-visible strings are wrapped in ``_()``; CMake files, catalog
entry, requirements and icon are what Slicer's extension build expects.
(b) The module file imported with stand-ins for what slicer-core lacks (``Testing/slicer_module_stubs.py``) and
``MAISSegmentLogic`` driven with real MRML nodes (``Testing/slicer_headless.py``) and the tiny reference checkpoint:
points → segment, undo/redo, masking, memory per segment, the state through ``.seg.nrrd`` and a whole ``.mrb`` scene
bundle, and the clear failures (no volume/segment, point outside, missing dependency, damaged weights, out of memory)
that leave segments and model as they were. "Learn from my cases" is in ``test_slicer_learn.py``. The Qt widget is
the one layer not run here (no Slicer application).
"""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from slicer_headless import mrml_fixture  # noqa: F401  (provides the "mrml" fixture)
from slicer_module_stubs import module_fixture  # noqa: F401  (provides the "module" fixture)

from conftest import TESTING, TINY

ROOT = TESTING.parent
MODULE_DIR = ROOT / "MAISSegment"
MODULE_FILE = MODULE_DIR / "MAISSegment.py"
LOGIC_DIR = MODULE_DIR / "MAISSegmentLogic"  # the logic's files, imported by the module file
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MAISSegment.ui"
ICON_FILE = MODULE_DIR / "Resources" / "Icons" / "MAISSegment.png"
CATALOG = ROOT / "MAISSegment.json"

# imported at module level they would slow Slicer's start-up or fail before the dependency check
HEAVY = {"torch", "MAISSegmentLib", "scipy", "SimpleITK", "matplotlib", "PyTorchUtils", "monai", "sitkUtils"}
# calls whose text argument the user reads
USER_FACING_CALLS = {
    "errorDisplay",
    "warningDisplay",
    "infoDisplay",
    "messageBox",
    "confirmOkCancelDisplay",
    "confirmYesNoDisplay",
    "tryWithErrorDisplay",
    "delayDisplay",
    "_setStatus",
    "MAISSegmentError",
    "PromptError",
    "showStatusMessage",
}
USER_FACING_ATTRIBUTES = {"title", "helpText", "acknowledgementText", "text", "toolTip", "windowTitle"}
NEUTRAL_TEXT = re.compile(r"^[\s\W]*$")  # separators such as "\n", " · ", "• "


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def python_files() -> list:
    """The module file and every file of its logic package (all loaded when Slicer loads the module)."""
    return [MODULE_FILE, *sorted(LOGIC_DIR.glob("*.py"))]


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def widget_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            text = prop.find("string")
            return None if text is None else text.text
    return None


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation source of MAISSegmentParameterNode."""
    tree = module_tree()
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MAISSegmentParameterNode")
    return {
        n.target.id: ast.unparse(n.annotation)
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


# ================================================================================================ (a) static checks
def test_ui_has_every_widget_the_code_uses_once():
    tree = module_tree()
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    root = ET.parse(UI_FILE).getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate objectName in the .ui"
    assert used, "the widget uses no self.ui.<name>?"
    assert used <= set(names), f"missing from MAISSegment.ui: {sorted(used - set(names))}"
    # every non-Qt class used in the .ui is declared as a custom widget (Designer/loadUI need the header)
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {w.get("class") for w in root.iter("widget") if not w.get("class").startswith("Q")}
    assert custom <= declared, sorted(custom - declared)


def test_ui_binds_only_parameter_node_fields_of_matching_types():
    fields = parameter_fields()
    bound = {}
    for name, widget in ui_widgets().items():
        parameter = widget_property(widget, "SlicerParameterName")
        if parameter is not None:
            assert parameter in fields, f"{name} binds {parameter!r}, not a MAISSegmentParameterNode field"
            bound[parameter] = widget.get("class")
    assert set(bound) >= {"device", "useMemory", "memorySize", "learnSteps", "learnHoldout"}
    # the volume, segmentation and segment are the embedded Segment Editor's selection (copied into the parameter node)
    assert not {"inputVolume", "segmentation", "segmentId"} & set(bound)
    for parameter, widget_class in bound.items():
        annotation = fields[parameter]
        expected = {  # what Slicer's parameterNodeWrapper GUI connectors accept
            "qMRMLNodeComboBox": annotation.startswith("vtkMRML"),
            "QComboBox": "Choice(" in annotation,  # QComboBoxToStringableConnector needs the Choice annotation
            "QCheckBox": annotation == "bool",
            "QSpinBox": annotation == "int" or annotation.startswith("Annotated[int"),
        }
        assert expected.get(widget_class, False), f"{parameter}: {widget_class} cannot show {annotation}"
    # the combo boxes filled at run time must not be bound (the Choice connector would replace their items)
    assert widget_property(ui_widgets()["modelComboBox"], "SlicerParameterName") is None


def test_no_heavy_import_at_module_level():
    """Only function bodies may import torch, MAISSegmentLib...: the module and its logic package load at Slicer
    start-up."""
    offenders = []

    def visit(statements, path):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # imported at first use
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders.extend(f"{path.name} line {node.lineno}: {n}" for n in names if n.split(".")[0] in HEAVY)
            for child in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, child, []) or [], path)

    assert len(python_files()) > 5  # the logic package is there
    for path in python_files():
        visit(ast.parse(path.read_text(encoding="utf-8")).body, path)
    assert not offenders, offenders


def _is_tr_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "translate")


def _untranslated_literals(expression: ast.AST) -> list[str]:
    """String literals of ``expression`` outside ``_()``/``translate()`` that hold words."""
    found = []

    def visit(node):
        if _is_tr_call(node):
            return
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if not NEUTRAL_TEXT.match(node.value):
                found.append(node.value)
            return
        if isinstance(node, ast.JoinedStr):
            literal = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if not NEUTRAL_TEXT.match(literal):
                found.append(ast.unparse(node))
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(expression)
    return found


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.name)
def test_user_visible_strings_are_translatable(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        if _is_tr_call(node) and node.func.id == "_":
            # the extractor needs one plain literal: _("...").format(...), never _(f"...") or _(variable)
            ok = len(node.args) == 1 and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            if not ok:
                problems.append(f"line {node.lineno}: _() needs one string literal: {ast.unparse(node)}")
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in USER_FACING_CALLS:
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    problems += [f"line {node.lineno}: {name}({text!r})" for text in _untranslated_literals(arg)]
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr in USER_FACING_ATTRIBUTES:
                    problems += [
                        f"line {node.lineno}: .{target.attr} = {t!r}" for t in _untranslated_literals(node.value)
                    ]
        if (
            isinstance(node, ast.AugAssign)
            and isinstance(node.target, ast.Attribute)
            and node.target.attr in USER_FACING_ATTRIBUTES
        ):
            problems += [f"line {node.lineno}: += {t!r}" for t in _untranslated_literals(node.value)]
    assert not problems, "\n".join(problems)


def test_cmake_lists_declare_the_extension_and_package_the_library():
    top = (ROOT / "CMakeLists.txt").read_text()
    for needed in (
        "project(MAISSegment)",
        'set(EXTENSION_CATEGORY "Segmentation")',
        'set(EXTENSION_DEPENDS "PyTorch")',
        "EXTENSION_HOMEPAGE",
        "EXTENSION_ICONURL",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(MAISSegment)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert needed in top, needed
    # MAISSegmentLib: built with the scripted-module macro, its runtime files listed (Testing/test_extension_build.py
    # configures the project and checks the list against the module's imports)
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME MAISSegmentLib\b", top)
    for resource in re.findall(r"^\s+(Resources/\S+)$", top, re.M):
        assert (ROOT / resource).is_file(), resource
    assert "Resources/models.json" in set(re.findall(r"Resources/\S+", top))

    module = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MODULE_NAME MAISSegment\)", module)
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", module, re.S).group(1)
    assert "NAME ${MODULE_NAME}" in macro and "WITH_GENERIC_TESTS" in macro
    listed = [
        f.replace("${MODULE_NAME}", "MAISSegment") for f in re.findall(r"^\s+(\S+\.(?:py|png|ui))$", module, re.M)
    ]
    logic = {f"MAISSegmentLogic/{p.name}" for p in LOGIC_DIR.glob("*.py")}  # every file of the logic package
    assert "MAISSegmentLogic/__init__.py" in logic
    assert set(listed) == {"MAISSegment.py", *logic, "Resources/Icons/MAISSegment.png", "Resources/UI/MAISSegment.ui"}
    assert all((MODULE_DIR / f).is_file() for f in listed)
    assert re.search(
        r"if\(BUILD_TESTING\).*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\).*endif", module, re.S
    )


def test_catalog_entry_follows_schema_v1_0_2():
    entry = json.loads(CATALOG.read_text())
    allowed = {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "dicom_support_rule",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["category"] == "Segmentation"
    assert entry["build_dependencies"] == ["PyTorch"]
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry["scm_url"].startswith("https://") and isinstance(entry.get("scm_revision", ""), str)
    homepage = re.search(r'EXTENSION_HOMEPAGE "([^"]+)"', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage


def test_icon_is_a_small_128px_png():
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
    assert len(data) < 20_000


# ================================================================================================ (b) the module
def test_module_description_parameters_and_library_constants(module):
    from MAISSegmentLib import mrml_masking
    from MAISSegmentLib.devices import DEVICE_CHOICES

    parent = types.SimpleNamespace()
    module.MAISSegment(parent)
    assert parent.title and parent.categories == ["Segmentation"] and parent.helpText and parent.contributors
    assert module.DEVICES == DEVICE_CHOICES and module.OVERWRITE_MODES == mrml_masking.OVERWRITE_MODES
    params = module.MAISSegmentParameterNode(None)
    assert (params.device, params.useMemory, params.memorySize) == ("auto", True, 60)
    assert set(parameter_fields()) == set(module.MAISSegmentParameterNode.allParameters)
    for name in ("torch", "MAISSegmentLib.session", "MAISSegmentLib.checkpoint"):
        assert name not in vars(module)


OLD = [((0.0, 0.0, 0.0), True), ((5.0, 0.0, 0.0), False), ((9.0, 1.0, 0.0), True)]


@pytest.mark.parametrize(
    ("new", "kind", "index", "clicks"),
    [
        (OLD, "none", -1, 0),
        ([*OLD, ((1.0, 2.0, 3.0), False)], "add", -1, 1),
        ([*OLD, ((1.0, 2.0, 3.0), False), ((4.0, 2.0, 3.0), True)], "add", -1, 2),
        ([OLD[0], OLD[2]], "forget", 1, 0),
        (OLD[:2], "forget", 2, 0),
        ([((0.5, 0.0, 0.0), True), *OLD[1:]], "rebuild", -1, 3),  # a point moved
        ([OLD[0], ((5.0, 0.0, 0.0), True), OLD[2]], "rebuild", -1, 3),  # changed side
        ([OLD[0]], "rebuild", -1, 1),  # two removed at once
        ([], "rebuild", -1, 0),
        ([((0.0004, 0.0, 0.0), True), *OLD[1:]], "none", -1, 0),  # within the tolerance
    ],
)
def test_plan_update(module, new, kind, index, clicks):
    plan = module.plan_update(OLD, [(np.asarray(r), inc) for r, inc in new])
    assert (plan.kind, plan.index, len(plan.clicks)) == (kind, index, clicks)


def test_worker_runs_jobs_on_one_thread_and_delivers_on_the_caller(module):
    worker = module.Worker()
    try:
        seen, delivered = [], []
        for n in range(3):
            worker.submit(
                lambda n=n: (seen.append(threading.get_ident()), n * n)[1], lambda r, e: delivered.append((r, e))
            )
        worker.submit(lambda: 1 / 0, lambda r, e: delivered.append((r, type(e))))
        worker.submit(lambda: None, lambda r, e: 1 / 0)  # a failing callback does not stop the others
        worker.submit(lambda: "last", lambda r, e: delivered.append((r, threading.get_ident())))
        deadline = time.time() + 10
        while worker.pending and time.time() < deadline:
            worker.deliver()
            time.sleep(0.01)
        assert worker.pending == 0
        assert len(set(seen)) == 1 and seen[0] == worker.thread_id != threading.get_ident()
        assert delivered == [
            (0, None),
            (1, None),
            (4, None),
            (None, ZeroDivisionError),
            ("last", threading.get_ident()),
        ]
    finally:
        worker.stop()


def test_dependencies_are_listed_before_anything_is_installed(module, monkeypatch, tmp_path):
    """Inside Slicer (simulated): torch through PyTorchUtils, then the missing packages shown, then pip_ensure."""
    import slicer

    logic = module.MAISSegmentLogic()
    assert logic.missing_requirements() == []  # this environment has everything Resources/requirements.txt lists
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nscipy>=1.0\nmaissegment-no-such-package>=1.0  # never installed\n")
    logic.requirements_file = str(requirements)
    assert logic.missing_requirements() == ["maissegment-no-such-package>=1.0"]
    with pytest.raises(module.MAISSegmentError, match="maissegment-no-such-package"):
        logic.ensure_dependencies()  # outside Slicer: nothing is installed, the package is named

    calls = []
    torch_logic = types.SimpleNamespace(
        torchInstalled=lambda: False,
        installTorch=lambda **kw: calls.append(("installTorch", kw)) or types.SimpleNamespace(__version__="2.6.0"),
        torch=types.SimpleNamespace(__version__="2.6.0+cu124"),
    )
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: torch_logic))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(), raising=False)

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None):
        calls.append(("pip_ensure", list(requirements), prompt_install, requester))

    monkeypatch.setattr(slicer, "packaging", types.SimpleNamespace(pip_ensure=pip_ensure), raising=False)
    with pytest.raises(module.MAISSegmentError, match="cannot run without"):
        logic.ensure_dependencies(confirm=lambda packages: calls.append(("asked", packages)) and False)
    assert calls == [
        ("installTorch", {"askConfirmation": True, "torchVersionRequirement": ">=2.5"}),
        ("asked", ["maissegment-no-such-package>=1.0"]),
    ]
    calls.clear()
    with pytest.raises(module.MAISSegmentError, match="did not succeed"):  # the fake pip_ensure installs nothing
        logic.ensure_dependencies(confirm=lambda packages: calls.append(("asked", packages)) or True)
    assert calls[1:] == [
        ("asked", ["maissegment-no-such-package>=1.0"]),
        ("pip_ensure", ["maissegment-no-such-package>=1.0"], False, "MAISSegment"),
    ]
    torch_logic.torch.__version__ = "2.1.0"
    torch_logic.torchInstalled = lambda: True
    with pytest.raises(module.MAISSegmentError, match="too old"):
        logic.ensure_dependencies()
    monkeypatch.delitem(sys.modules, "PyTorchUtils")
    with pytest.raises(module.MAISSegmentError, match="PyTorch extension"):
        logic.ensure_dependencies()


def test_background_commands_stream_output_and_stop_at_the_first_failure(module):
    fast = [sys.executable, "-c", "print('one'); print('two')"]
    failing = [sys.executable, "-c", "import sys; print('no matching distribution'); sys.exit(3)"]
    never = [sys.executable, "-c", "print('never')"]
    run = module.BackgroundCommands([fast, failing, never]).start()
    assert run.wait(60)
    lines = run.take_lines()
    assert "one" in lines and "two" in lines and "never" not in lines
    assert lines[0].startswith("$ ") and run.take_lines() == []
    assert "exit status 3" in run.error and "no matching distribution" in run.error
    ok = module.BackgroundCommands([fast]).start()
    assert ok.wait(60) and ok.error is None


def test_background_commands_leave_the_caller_free_and_can_be_cancelled(module):
    slow = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    run = module.BackgroundCommands([slow, slow]).start()
    assert not run.finished  # start() returned while the command runs
    deadline = time.monotonic() + 30
    seen = []
    while "started" not in seen and time.monotonic() < deadline:
        seen += run.take_lines()
        time.sleep(0.05)
    run.cancel()
    assert run.wait(30) and run.cancelled and run.error == "cancelled"
    assert sum(line == "started" for line in seen + run.take_lines()) == 1  # the second command never ran
    missing = module.BackgroundCommands([["maissegment-no-such-program"]]).start()
    assert missing.wait(30) and "could not run" in missing.error


# ------------------------------------------------------------------------------------------------ logic on MRML
@pytest.fixture(name="scene")
def scene_fixture(mrml, module):
    """The in-Slicer test's scene (oblique anisotropic volume, target + other segments) and a logic with the tiny
    checkpoint loaded through select_model(checkpoint=...)."""
    volume, segmentation, ids = module.MAISSegmentTest.make_scene()
    logic = module.MAISSegmentTest.make_logic()
    assert logic._model_choice["checkpoint"] == str(TINY / "ref_tiny.pth")  # the repository's fixture
    return types.SimpleNamespace(volume=volume, seg=segmentation, ids=ids, logic=logic, T=module.MAISSegmentTest)


def arrays(s) -> dict[str, np.ndarray]:
    return {name: s.T.segment_array(s.seg, sid, s.volume) for name, sid in s.ids.items()}


def point_clicks(include, exclude, decimals: int | None = 6) -> list[tuple[tuple[float, ...], bool]]:
    """The clicks the point lists hold, in order (rounded for comparisons; ``decimals=None``: exact)."""
    from MAISSegmentLib import mrml_markups

    clicks = mrml_markups.clicks_from_markups(include, exclude)
    return [(tuple(r if decimals is None else np.round(r, decimals)), inc) for r, inc in clicks]


def reference_mask(s, clicks, segment="target", overwrite="none") -> np.ndarray:
    """An InteractiveSession run directly on the volume (no logic, no markups): the expected mask."""
    from MAISSegmentLib import mrml_masking, mrml_volumes
    from MAISSegmentLib.session import InteractiveSession

    session = InteractiveSession(s.logic.ensure_model())
    session.set_image(
        mrml_volumes.volume_from_node(s.volume),
        protected=mrml_masking.protected_mask(s.seg, s.ids[segment], s.volume, overwrite),
    )
    for ras, include in clicks:
        session.add_click(ras, include)
    return session.mask > 0


def test_points_on_an_oblique_volume_update_the_segment_where_the_session_puts_them(scene):
    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(s.seg, s.ids["target"])
    assert (
        include.GetAttribute("MAISSegment.Role") == "include" and exclude.GetAttribute("MAISSegment.Role") == "exclude"
    )
    colors = [tuple(n.GetDisplayNode().GetSelectedColor()) for n in (include, exclude)]
    assert colors[0] != colors[1]
    assert s.logic.get_point_lists(s.seg, s.ids["target"]) == (include, exclude)  # found again, not re-created
    other_before = arrays(s)["other"]
    s.T.place(include, s.T.ras((30, 25, 20)))
    result = s.logic.on_points_changed(*target, include, exclude)
    assert (result.action, result.clicks, result.rois, result.encoder_runs) == ("add", 1, 1, 1)
    s.T.place(exclude, s.T.ras((8, 8, 8)))
    result = s.logic.on_points_changed(*target, include, exclude)
    assert (result.action, result.clicks, result.encoder_runs) == ("add", 2, 0)
    session = s.logic.session(*target)
    expected_ras = [tuple(np.round(s.T.ras(ijk), 6)) for ijk in ((30, 25, 20), (8, 8, 8))]
    assert [tuple(np.round(c.ras, 6)) for c in session.clicks] == expected_ras
    assert [include.GetNthControlPointDescription(0), exclude.GetNthControlPointDescription(0)] == [
        "mais:order=0",
        "mais:order=1",
    ]
    after = arrays(s)
    assert after["target"].any() and np.array_equal(after["target"], session.mask > 0)
    assert np.array_equal(after["other"], other_before) and not (after["target"] & after["other"]).any()
    # the status line in a radiologist's words: the mask's volume and the points; the details in its tooltip
    voxel_ml = abs(np.linalg.det(s.T.affine()[:3, :3])) / 1000
    assert result.volume_ml == pytest.approx(np.count_nonzero(after["target"]) * voxel_ml)
    status, details = s.logic.describe(result), s.logic.describe_details(result)
    assert status.startswith("Mask updated: ") and " mL, 2 points." in status
    assert "ms" not in status and "ROI" not in status and "ref_tiny.pth" not in status
    assert "Points: 2" in details and "ref_tiny.pth" in details
    # the details: point read -> segment written (>= the network part), and where the last point's ROI is
    assert result.total_seconds >= result.seconds > 0 and "network" in details
    center, edge = result.roi
    assert edge == 192.0 and session.rois[0].contains(np.asarray(session.clicks[-1].ras))
    assert np.allclose(center, session.rois[0].center) and "192 mm cube at R" in details
    # a moved point: the session is rebuilt from the points, as a fresh session with those clicks would be
    include.SetNthControlPointPositionWorld(0, *s.T.ras((28, 24, 20)))
    result = s.logic.on_points_changed(*target, include, exclude)
    assert (result.action, result.clicks, result.encoder_runs) == ("rebuild", 2, 1)  # the first click placed the ROI
    assert np.array_equal(arrays(s)["target"], reference_mask(s, point_clicks(include, exclude, None)))
    assert s.logic.on_points_changed(*target, include, exclude).action == "none"


def test_undo_redo_restore_exact_labelmaps_of_every_segment(scene):
    """Overwrite "all" (the other segment gives up voxels), memory settings and reset: all undone and redone exactly,
    points included."""
    s = scene
    s.logic.overwrite = "all"
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(s.seg, s.ids["target"])
    states = [(arrays(s), point_clicks(include, exclude))]
    s.T.place(include, s.T.ras((36, 26, 20)))
    assert s.logic.on_points_changed(*target, include, exclude).action == "add"
    states.append((arrays(s), point_clicks(include, exclude)))
    taken = states[0][0]["other"] & states[1][0]["target"]
    assert taken.any(), "the click should take voxels of the other segment"
    assert np.array_equal(states[1][0]["other"], states[0][0]["other"] & ~taken)
    result = s.logic.configure(*target, use_memory=False, memory_size=60)
    assert result.action == "configure" and not s.logic.session(*target).options.use_memory
    states.append((arrays(s), point_clicks(include, exclude)))
    assert s.logic.reset(*target).action == "reset"
    states.append((arrays(s), point_clicks(include, exclude)))
    assert not states[-1][0]["target"].any() and states[-1][1] == []
    for expected, clicks in reversed(states[:-1]):
        assert s.logic.undo(*target).action == "undo"
        now = arrays(s)
        assert all(np.array_equal(now[k], expected[k]) for k in expected) and point_clicks(include, exclude) == clicks
    assert s.logic.session(*target).options.use_memory and not s.logic.can_undo(*target)
    for expected, clicks in states[1:]:
        assert s.logic.redo(*target).action == "redo"
        now = arrays(s)
        assert all(np.array_equal(now[k], expected[k]) for k in expected) and point_clicks(include, exclude) == clicks
    assert not s.logic.can_redo(*target)


def test_points_placed_or_moved_while_the_network_runs_are_kept_for_the_next_update(scene):
    """The widget runs prepare_update (main thread), compute_update (worker) and apply_update (main thread); a point
    placed or moved in between must not be deleted or snapped back by apply_update: the next update takes it in."""
    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(s.seg, s.ids["target"])
    s.T.place(include, s.T.ras((30, 25, 20)))
    request = s.logic.prepare_update(*target, include, exclude)
    outcome = s.logic.compute_update(request)
    s.T.place(exclude, s.T.ras((8, 8, 8)))  # placed while the network ran
    assert s.logic.apply_update(outcome).clicks == 1
    assert exclude.GetNumberOfControlPoints() == 1 and include.GetNumberOfControlPoints() == 1
    result = s.logic.on_points_changed(*target, include, exclude)
    assert (result.action, result.clicks) == ("add", 2)
    s.T.place(include, s.T.ras((32, 26, 21)))
    request = s.logic.prepare_update(*target, include, exclude)
    outcome = s.logic.compute_update(request)
    include.SetNthControlPointPositionWorld(0, *s.T.ras((28, 24, 20)))  # click 0 dragged meanwhile
    assert s.logic.apply_update(outcome).clicks == 3
    position = [0.0, 0.0, 0.0]
    include.GetNthControlPointPositionWorld(0, position)
    assert np.allclose(position, s.T.ras((28, 24, 20)))  # not snapped back
    assert include.GetNumberOfControlPoints() == 2 and exclude.GetNumberOfControlPoints() == 1
    result = s.logic.on_points_changed(*target, include, exclude)
    assert (result.action, result.clicks) == ("rebuild", 3)
    assert np.array_equal(arrays(s)["target"], reference_mask(s, point_clicks(include, exclude, None)))


def test_voxels_drawn_elsewhere_are_counted_before_the_first_update(scene):
    """``unowned_voxels``: what the widget asks about before a segment's first update replaces it (undo restores it
    exactly); 0 once MAISSegment owns the segment (a session, or a stored state after reloading)."""
    import slicer

    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    assert s.logic.unowned_voxels(*target) == 0  # empty
    drawn = np.zeros_like(arrays(s)["target"])
    drawn[18:22, 20:30, 25:35] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(drawn.astype(np.uint8), s.seg, s.ids["target"], s.volume)
    assert s.logic.unowned_voxels(*target) == int(drawn.sum())
    include, exclude = s.logic.get_point_lists(*target[:2])
    s.T.place(include, s.T.ras((30, 25, 20)))
    s.logic.on_points_changed(*target, include, exclude)
    assert s.logic.unowned_voxels(*target) == 0
    assert s.logic.undo(*target).action == "undo" and np.array_equal(arrays(s)["target"], drawn)
    s.logic.clear()  # as after reopening the scene: no session; the stored state has no click left
    assert s.logic.unowned_voxels(*target) == int(drawn.sum())
    assert include.GetNumberOfControlPoints() == 0  # the undone click's point went with it
    s.T.place(include, s.T.ras((30, 25, 20)))
    assert s.logic.on_points_changed(*target, include, exclude).clicks == 1
    s.logic.clear()  # now the stored state has the click: the content is MAISSegment's
    assert s.logic.unowned_voxels(*target) == 0


def test_undo_and_redo_refuse_to_overwrite_edits_made_since(scene):
    """A voxel painted elsewhere (Segment Editor) after a click: undoing that click would erase the paint, so undo
    refuses with a message and changes nothing (segment, session, points); once the paint is gone it works. The
    same for redo."""
    import slicer

    from MAISSegmentLib import mrml_writing

    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(s.seg, s.ids["target"])
    s.T.place(include, s.T.ras((30, 25, 20)))
    s.logic.on_points_changed(*target, include, exclude)
    clicked = arrays(s)
    assert clicked["target"].any()
    painted = clicked["target"].copy()
    painted[tuple(np.argwhere(painted)[0])] = False  # erase one voxel the click set (inside the box it wrote)
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), s.seg, s.ids["target"], s.volume)
    with pytest.raises(mrml_writing.EditedSinceError, match="edited since"):
        s.logic.undo(*target)
    assert np.array_equal(arrays(s)["target"], painted) and len(s.logic.session(*target).clicks) == 1
    assert point_clicks(include, exclude) and s.logic.can_undo(*target)
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        clicked["target"].astype(np.uint8), s.seg, s.ids["target"], s.volume
    )
    assert s.logic.undo(*target).action == "undo" and not arrays(s)["target"].any()
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted.astype(np.uint8), s.seg, s.ids["target"], s.volume)
    with pytest.raises(mrml_writing.EditedSinceError, match="redone"):
        s.logic.redo(*target)
    assert np.array_equal(arrays(s)["target"], painted) and s.logic.can_redo(*target)


def test_segment_editor_masking_settings_are_honoured(scene, mrml):
    """With a Segment Editor node: its editable intensity range limits the write, its overwrite mode is used."""
    import slicer

    s = scene
    editor = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(300.0, 1000.0)  # the ball (about 400), not the background (about 50)
    editor.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    s.logic.overwrite = "all"  # ignored while the editor node is used
    s.logic.segment_editor_node = editor
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(*target[:2])
    before = arrays(s)
    s.T.place(include, s.T.ras((30, 25, 20)))
    assert s.logic.on_points_changed(*target, include, exclude).action == "add"
    after = arrays(s)
    bright = slicer.util.arrayFromVolume(s.volume) >= 300
    session_mask = s.logic.session(*target).mask > 0
    assert after["target"].any() and np.array_equal(after["target"], session_mask & bright)
    assert np.array_equal(after["other"], before["other"])  # "none" from the editor node, not the logic's "all"


def test_refused_points_and_locked_segments_change_nothing(scene, module):
    from MAISSegmentLib import mrml_masking

    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(s.seg, s.ids["target"])
    before = arrays(s)
    s.T.place(include, s.T.ras((40, 25, 20)))  # on the other segment, which overwrite "none" protects
    s.T.place(exclude, s.T.ras((30, 25, 400)))  # outside the volume
    result = s.logic.on_points_changed(*target, include, exclude)
    assert result.action == "rejected" and len(result.rejected) == 2
    assert include.GetNumberOfControlPoints() == exclude.GetNumberOfControlPoints() == 0  # the points were removed
    assert all(np.array_equal(arrays(s)[k], before[k]) for k in before)
    assert s.logic.describe(result).startswith("Point not used: ") and "\n" not in s.logic.describe(result)
    assert s.logic.describe_details(result).count("Refused") == 2
    mrml_masking.set_segment_locked(s.seg, s.ids["target"])
    s.T.place(include, s.T.ras((30, 25, 20)))
    with pytest.raises(module.MAISSegmentError, match="locked"):
        s.logic.on_points_changed(*target, include, exclude)
    assert include.GetNumberOfControlPoints() == 1 and all(np.array_equal(arrays(s)[k], before[k]) for k in before)


def test_switching_segments_and_back_keeps_each_memory(scene):
    s = scene
    lists = {name: s.logic.get_point_lists(s.seg, sid) for name, sid in s.ids.items()}
    include, exclude = 0, 1
    for name, side, ijk in (
        ("target", include, (30, 25, 20)),
        ("other", include, (40, 26, 20)),
        ("target", exclude, (8, 8, 8)),
    ):
        s.T.place(lists[name][side], s.T.ras(ijk))
        s.logic.on_points_changed(s.seg, s.ids[name], s.volume, *lists[name])
    # the other segment's points are hidden while the target's are shown (the last get_point_lists call shows "other")
    s.logic.get_point_lists(s.seg, s.ids["target"])
    assert [n.GetDisplayNode().GetVisibility() for n in (*lists["target"], *lists["other"])] == [1, 1, 0, 0]
    session = s.logic.session(s.seg, s.ids["target"], s.volume)
    assert len(session.clicks) == 2 and session.encoder_runs == 1  # the same session, its ROI embedding reused
    expected = reference_mask(s, point_clicks(*lists["target"], decimals=None))
    assert np.array_equal(session.mask > 0, expected)


def test_state_in_segment_tags_survives_seg_nrrd_and_a_new_logic_continues(scene, tmp_path, module, mrml):
    import slicer

    from MAISSegmentLib import mrml_state

    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(*target[:2])
    s.T.place(include, s.T.ras((30, 25, 20)))
    s.logic.on_points_changed(*target, include, exclude)
    assert s.logic.save_state_to_scene() == 1
    # "reload": write the segmentation to .seg.nrrd and read it into a new node (the points are not in that file)
    path = tmp_path / "saved.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(path))
    assert writer.WriteData(s.seg)
    reloaded = s.volume.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded)
    rid = reloaded.GetSegmentation().GetSegmentIdBySegmentName("target")
    assert mrml_state.load_state(reloaded, rid)["clicks"] == mrml_state.load_state(s.seg, s.ids["target"])["clicks"]
    # a new logic restores the session (the point lists are re-created from the state) and continues
    logic2 = module.MAISSegmentTest.make_logic()
    restored = logic2.restore_from_scene(reloaded, rid, s.volume)
    assert (restored.action, restored.clicks, restored.encoder_runs) == ("restore", 1, 1)
    include2, exclude2 = logic2.get_point_lists(reloaded, rid, create=False)
    assert point_clicks(include2, exclude2) == point_clicks(include, exclude)
    s.T.place(exclude, s.T.ras((8, 8, 8)))
    s.T.place(exclude2, s.T.ras((8, 8, 8)))
    s.logic.on_points_changed(*target, include, exclude)  # the uninterrupted session
    assert logic2.on_points_changed(reloaded, rid, s.volume, include2, exclude2).action == "add"
    uninterrupted = s.logic.session(*target).mask
    assert np.array_equal(logic2.session(reloaded, rid, s.volume).mask, uninterrupted)
    assert np.array_equal(s.T.segment_array(reloaded, rid, s.volume), s.T.segment_array(*target))
    # a third logic picks the stored state up by itself at the next change of the points (nothing to recompute)
    logic3 = module.MAISSegmentTest.make_logic()
    result = logic3.on_points_changed(reloaded, rid, s.volume, include2, exclude2)
    assert (result.action, result.clicks) == ("none", 2)
    assert np.array_equal(logic3.session(reloaded, rid, s.volume).mask, uninterrupted)
    # point lists that lost the stored clicks (new, empty ones): the clicks are put back, the new point comes after
    logic4 = module.MAISSegmentTest.make_logic()
    include4, exclude4 = mrml.add_points("include 4"), mrml.add_points("exclude 4")
    s.T.place(include4, s.T.ras((33, 28, 21)))
    result = logic4.on_points_changed(reloaded, rid, s.volume, include4, exclude4)
    assert (result.action, result.clicks) == ("add", 3)
    assert point_clicks(include4, exclude4)[:2] == point_clicks(include2, exclude2)


def test_mrb_save_reload_and_continue_gives_the_uninterrupted_mask(scene, mrml, module, tmp_path):
    """Clicks applied through the logic, the scene saved as a Slicer data bundle (.mrb, as File → Save does), the
    scene cleared and the bundle opened again: a NEW logic finds the point lists, continues with a new click and
    gives exactly the mask of the session that was never interrupted (same memory), in the segment too."""
    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(*target[:2])
    s.T.place(include, s.T.ras((30, 25, 20)))
    s.logic.on_points_changed(*target, include, exclude)
    s.T.place(exclude, s.T.ras((8, 8, 8)))
    s.logic.on_points_changed(*target, include, exclude)
    s.T.place(include, s.T.ras((27, 23, 21)))
    s.logic.on_points_changed(*target, include, exclude)
    before_save = arrays(s)
    bundle = tmp_path / "session.mrb"
    mrml.save_mrb(bundle)
    assert bundle.stat().st_size > 0
    # the uninterrupted session goes on with one more click
    s.T.place(exclude, s.T.ras((40, 30, 22)))
    assert s.logic.on_points_changed(*target, include, exclude).action == "add"
    uninterrupted_mask = s.logic.session(*target).mask.copy()
    uninterrupted = arrays(s)
    assert not np.array_equal(uninterrupted["target"], before_save["target"])  # the last click changed something

    mrml.load_mrb(bundle)  # clears the scene first: nothing of the first session is left
    scene_ = mrml.scene
    volume = scene_.GetFirstNodeByName("ball")
    segmentation = scene_.GetFirstNodeByName("segmentation")
    assert volume is not s.volume and segmentation is not s.seg
    ids = {name: segmentation.GetSegmentation().GetSegmentIdBySegmentName(name) for name in ("target", "other")}
    reloaded = {name: s.T.segment_array(segmentation, sid, volume) for name, sid in ids.items()}
    assert all(np.array_equal(reloaded[k], before_save[k]) for k in before_save)
    logic = module.MAISSegmentTest.make_logic()
    include2, exclude2 = logic.get_point_lists(segmentation, ids["target"], create=False)
    assert include2 is not None and exclude2 is not None
    assert (include2.GetNumberOfControlPoints(), exclude2.GetNumberOfControlPoints()) == (2, 1)
    s.T.place(exclude2, s.T.ras((40, 30, 22)))
    result = logic.on_points_changed(segmentation, ids["target"], volume, include2, exclude2)
    assert (result.action, result.clicks) == ("add", 4)
    assert np.array_equal(logic.session(segmentation, ids["target"], volume).mask, uninterrupted_mask)
    after = {name: s.T.segment_array(segmentation, sid, volume) for name, sid in ids.items()}
    assert all(np.array_equal(after[k], uninterrupted[k]) for k in uninterrupted)
    # and undo in the new logic goes back to the saved state exactly
    assert logic.undo(segmentation, ids["target"], volume).action == "undo"
    assert np.array_equal(s.T.segment_array(segmentation, ids["target"], volume), before_save["target"])


# ------------------------------------------------------------------------------------------------ clear failures
@pytest.fixture(name="started")
def started_fixture(scene):
    """The scene with one click applied (the model loaded, the target segment painted)."""
    s = scene
    s.target = (s.seg, s.ids["target"], s.volume)
    s.include, s.exclude = s.logic.get_point_lists(*s.target[:2])
    s.T.place(s.include, s.T.ras((30, 25, 20)))
    assert s.logic.on_points_changed(*s.target, s.include, s.exclude).action == "add"
    s.model, s.choice = s.logic.ensure_model(), dict(s.logic._model_choice)
    s.before = arrays(s)
    return s


def assert_unchanged(s, clicks: int = 1) -> None:
    """The segments, the model in use, its selection and the session are as they were."""
    now = arrays(s)
    assert all(np.array_equal(now[k], s.before[k]) for k in s.before)
    assert s.logic.ensure_model() is s.model and s.logic._model_choice == s.choice
    assert len(s.logic.session(*s.target).clicks) == clicks


def test_failure_no_volume_no_segment(started, module):
    s = started
    with pytest.raises(module.MAISSegmentError, match="Select the volume to segment"):
        s.logic.on_points_changed(s.seg, s.ids["target"], None, s.include, s.exclude)
    with pytest.raises(module.MAISSegmentError, match="Select a segment of the segmentation"):
        s.logic.on_points_changed(s.seg, "", s.volume, s.include, s.exclude)
    with pytest.raises(module.MAISSegmentError, match="Select a segment of the segmentation"):
        s.logic.on_points_changed(s.seg, "removed-segment", s.volume, s.include, s.exclude)
    with pytest.raises(module.MAISSegmentError, match="Select a segmentation"):
        s.logic.on_points_changed(None, s.ids["target"], s.volume, s.include, s.exclude)
    assert_unchanged(s)


def test_failure_point_outside_the_volume(started):
    s = started
    s.T.place(s.include, s.T.ras((30, 25, 95)))  # k = 95 > 39
    result = s.logic.on_points_changed(*s.target, s.include, s.exclude)
    assert result.action == "rejected" and "outside the image" in result.rejected[0]
    assert "RAS vs LPS" in result.rejected[0] and "Point not used" in s.logic.describe(result)
    assert s.include.GetNumberOfControlPoints() == 1  # the refused point was taken away
    assert_unchanged(s)


def test_failure_missing_dependency(started, module, tmp_path):
    s = started
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("maissegment-missing-package>=1.0\n")
    s.logic.requirements_file = str(requirements)
    s.T.place(s.exclude, s.T.ras((8, 8, 8)))
    with pytest.raises(module.MAISSegmentError, match=r"Missing Python packages: maissegment-missing-package>=1\.0"):
        s.logic.on_points_changed(*s.target, s.include, s.exclude)
    s.logic.requirements_file = None  # installed: the same point goes through
    assert_unchanged(s)
    assert s.logic.on_points_changed(*s.target, s.include, s.exclude).action == "add"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_failure_corrupt_weight_file_keeps_the_model_in_use(started, module, tmp_path, damage):
    s = started
    bad = tmp_path / "damaged.pth"
    data = (TINY / "ref_tiny.pth").read_bytes()
    bad.write_bytes(b"not a checkpoint at all" * 10 if damage == "garbage" else data[: len(data) // 2])
    s.logic.select_model(checkpoint=str(bad))
    s.T.place(s.exclude, s.T.ras((8, 8, 8)))
    with pytest.raises(module.MAISSegmentError) as info:
        s.logic.on_points_changed(*s.target, s.include, s.exclude)
    message = str(info.value)
    assert message.startswith("The model 'damaged.pth' cannot be used: ") and "Still using 'ref_tiny.pth'." in message
    assert str(bad) in message  # the checkpoint loader names the file
    assert_unchanged(s)
    assert s.logic.on_points_changed(*s.target, s.include, s.exclude).action == "add"  # the next try works


@pytest.mark.parametrize(
    "error",
    [
        lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        lambda: RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"),
        MemoryError,
    ],
    ids=["torch-oom", "runtime-oom", "memoryerror"],
)
def test_failure_out_of_memory_leaves_segment_session_and_model(started, module, monkeypatch, error):
    s = started

    def step(*args, **kwargs):
        raise error()

    monkeypatch.setattr(s.model, "step", step)  # the network runs out of memory on the next point
    s.T.place(s.exclude, s.T.ras((8, 8, 8)))
    with pytest.raises(module.MAISSegmentError, match=r"Not enough memory on cpu to update the segment; it was not"):
        s.logic.on_points_changed(*s.target, s.include, s.exclude)
    assert_unchanged(s)
    monkeypatch.undo()
    assert s.logic.on_points_changed(*s.target, s.include, s.exclude).action == "add"
    other = s.logic.session(*s.target).mask.copy()
    assert np.array_equal(arrays(s)["target"], other > 0)


def test_unrelated_errors_are_not_reported_as_memory_problems(started, monkeypatch):
    s = started

    def step(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(s.model, "step", step)
    s.T.place(s.exclude, s.T.ras((8, 8, 8)))
    with pytest.raises(RuntimeError, match=r"^shape mismatch$"):
        s.logic.on_points_changed(*s.target, s.include, s.exclude)
    assert_unchanged(s)


def test_selected_point_rules(mrml, module):
    from MAISSegmentLib import mrml_markups

    logic = module.MAISSegmentLogic()
    include, exclude = mrml.add_points("include"), mrml.add_points("exclude")
    assert logic.selected_point(include, exclude) == (None, -1)
    for order, (node, ras) in enumerate(((include, (0, 0, 0)), (exclude, (1, 0, 0)), (include, (2, 0, 0)))):
        mrml_markups.add_click_point(node, ras, order)
    node, index = logic.selected_point(include, exclude)  # all selected (Slicer's default): the last click
    assert node is include and index == 1
    for n in range(2):
        include.SetNthControlPointSelected(n, False)
    node, index = logic.selected_point(include, exclude)  # the only selected point
    assert node is exclude and index == 0
    include.GetDisplayNode().SetActiveControlPoint(0)  # the point under the mouse wins
    assert logic.selected_point(include, exclude) == (include, 0)


def test_the_in_slicer_test_case_is_skipped_not_passed_without_pytorch(mrml, module, monkeypatch):
    """Without PyTorch the in-Slicer test cannot run: it must be reported as skipped (with the reason), not as a
    success."""
    import unittest

    monkeypatch.setattr(module.MAISSegmentLogic, "dependencies_present", lambda self: False)
    monkeypatch.setattr(module.MAISSegmentTest, "delayDisplay", lambda self, message, *a: None)
    outcome = unittest.TextTestRunner(verbosity=0).run(unittest.TestSuite([module.MAISSegmentTest("runTest")]))
    assert len(outcome.skipped) == 1 and "PyTorch is not installed" in outcome.skipped[0][1]
    assert outcome.testsRun == 1 and not outcome.failures and not outcome.errors


@pytest.mark.slow
def test_the_in_slicer_test_case_passes_headless(mrml, module):
    """MAISSegmentTest (what Slicer runs: ctest / Reload and Test) on slicer-core."""
    import unittest

    suite = unittest.TestSuite([module.MAISSegmentTest("runTest")])
    outcome = unittest.TextTestRunner(verbosity=0).run(suite)
    assert outcome.wasSuccessful(), outcome.failures + outcome.errors


# ------------------------------------------------------------------------------------------------ models in the module
def _serve(folder):
    """An HTTP server on 127.0.0.1 serving ``folder`` (own thread); returns (base URL, stop)."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()

    def stop():
        httpd.shutdown()
        httpd.server_close()

    return f"http://127.0.0.1:{httpd.server_address[1]}", stop


def test_download_a_registered_model_from_the_module(scene, module, monkeypatch, tmp_path):
    """A registered model that is not here: selecting it says to press Download; the download (checked by SHA-256,
    with progress) makes it usable; a failing download leaves nothing and says why."""
    import hashlib

    from MAISSegmentLib import weights

    s = scene
    served = tmp_path / "served"
    served.mkdir()
    body = (TINY / "ref_tiny.pth").read_bytes()
    (served / "tiny.pth").write_bytes(body)
    url, stop = _serve(served)
    try:
        entry = {
            "id": "remote-tiny",
            "version": "1",
            "file": "remote_tiny.pth",
            "url": f"{url}/tiny.pth",
            "sha256": hashlib.sha256(body).hexdigest(),
            "size_bytes": len(body),
            "license": "test",
            "format": "sam-med3d",
            "preset": "sam-med3d-tiny",
            "description": "served locally",
            "trained_on": "nothing",
        }
        broken = {**entry, "id": "remote-missing", "file": "missing.pth", "url": f"{url}/missing.pth"}
        registry = tmp_path / "models.json"
        registry.write_text(json.dumps({"version": 1, "default": None, "models": [entry, broken]}))
        monkeypatch.setenv("MAIS_MODELS_JSON", str(registry))
        monkeypatch.setenv("MAIS_WEIGHTS_DIR", str(tmp_path / "cache"))
        choices = {c.id: c for c in s.logic.available_models()}
        assert not choices["remote-tiny"].usable and choices["remote-tiny"].download_url == entry["url"]
        assert choices["remote-tiny"].size_bytes == len(body) and "not downloaded" in choices["remote-tiny"].label
        assert choices["remote-tiny"].verification == "verified (SHA-256 in the registry)"
        unverified = {**entry, "id": "remote-unverified", "sha256": None}
        registry.write_text(json.dumps({"version": 1, "default": None, "models": [entry, broken, unverified]}))
        listed = {c.id: c for c in s.logic.available_models()}["remote-unverified"]
        assert listed.verification == "unverified (first download records the hash)"
        registry.write_text(json.dumps({"version": 1, "default": None, "models": [entry, broken]}))

        s.logic.select_model(model_id="remote-tiny")
        target = (s.seg, s.ids["target"], s.volume)
        include, exclude = s.logic.get_point_lists(*target[:2])
        s.T.place(include, s.T.ras((30, 25, 20)))
        with pytest.raises(module.MAISSegmentError, match="not on this computer yet: press Download"):
            s.logic.on_points_changed(*target, include, exclude)
        assert not arrays(s)["target"].any()

        with pytest.raises(module.MAISSegmentError, match=r"Downloading 'remote-missing' failed: .*404"):
            s.logic.download_model("remote-missing")
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []  # no partial file

        seen = []
        path = s.logic.download_model("remote-tiny", progress=lambda done, total: seen.append((done, total)))
        assert weights.file_sha256(path) == entry["sha256"]
        assert seen[0] == (0, len(body)) and seen[-1] == (len(body), len(body))
        assert {c.id: c for c in s.logic.available_models()}["remote-tiny"].usable
        assert not s.logic.model_loaded
        assert s.logic.on_points_changed(*target, include, exclude).action == "add"
        assert s.logic.model_loaded and arrays(s)["target"].any()
    finally:
        stop()


def test_masking_is_computed_only_when_the_editor_restricts_editing(mrml, module):
    import slicer

    from MAISSegmentLib import mrml_masking

    editor = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    assert not mrml_masking.editing_restricted(None) and not mrml_masking.editing_restricted(
        editor
    )  # default: everywhere, no range
    editor.SetSourceVolumeIntensityMask(True)
    assert mrml_masking.editing_restricted(editor)
    editor.SetSourceVolumeIntensityMask(False)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideAllSegments)
    assert mrml_masking.editing_restricted(editor)


def test_missing_selection_messages(scene, module):
    s = scene
    message = s.logic.missing_selection_message
    assert message(s.seg, s.ids["target"], s.volume) == ""
    assert message(None, "", s.volume) == "Select a segmentation."
    assert message(s.seg, "", s.volume).startswith("Select a segment")
    assert message(s.seg, s.ids["target"], None) == "Select the volume to segment."


def test_deleted_point_recomputes_the_segment_from_the_remaining_points(scene):
    """Deleting a point (as the point list's delete or *Forget selected point* does) gives exactly the mask of a
    fresh session with the remaining clicks, in the segment too, and can be undone."""
    s = scene
    target = (s.seg, s.ids["target"], s.volume)
    include, exclude = s.logic.get_point_lists(*target[:2])
    for node, ijk in ((include, (30, 25, 20)), (exclude, (8, 8, 8)), (include, (33, 27, 21))):
        s.T.place(node, s.T.ras(ijk))
        assert s.logic.on_points_changed(*target, include, exclude).action == "add"
    three = arrays(s)["target"]
    exclude.RemoveNthControlPoint(0)
    result = s.logic.on_points_changed(*target, include, exclude)
    assert (result.action, result.clicks) == ("forget", 2)
    remaining = point_clicks(include, exclude, None)
    assert [inc for _, inc in remaining] == [True, True]
    assert np.array_equal(arrays(s)["target"], reference_mask(s, remaining))
    assert s.logic.undo(*target).action == "undo"
    assert np.array_equal(arrays(s)["target"], three) and exclude.GetNumberOfControlPoints() == 1
