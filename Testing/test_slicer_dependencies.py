"""The module's dependencies, the weights' licence and its help link (``MAISSegment/MAISSegmentLogic/dependencies.py``,
``licence.py``, ``documentation.py``), with stand-ins for the PyTorch extension (``PyTorchUtils``) and
``slicer.packaging``: PyTorch through the extension's light-the-torch (Slicer's fork, installed by the extension),
the other packages of the module's ``Resources/requirements.txt`` through ``load_requirements`` / ``pip_check`` /
``pip_ensure``, installs only on the main thread."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import threading
import types
import typing
from pathlib import Path

import pytest
from slicer_module_stubs import module_fixture  # noqa: F401  (provides the "module" fixture)

from conftest import TESTING

ROOT = TESTING.parent
MODULE_DIR = ROOT / "MAISSegment"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"


class FakePyTorchUtilsLogic:
    """The current PyTorch extension's logic, as far as MAISSegment uses it."""

    calls: typing.ClassVar[list] = []

    @staticmethod
    def _getPipInstallArguments(forceComputationBackend=None, torchVersionRequirement=None, **kwargs):
        return ["install", "torch" + (torchVersionRequirement or ""), "torchvision", "numpy<2"]

    @staticmethod
    def _installLightTheTorch():
        FakePyTorchUtilsLogic.calls.append("_installLightTheTorch")

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None, **kw):
        FakePyTorchUtilsLogic.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
        return types.SimpleNamespace(__version__="2.6.0")


@pytest.fixture
def in_slicer(module, monkeypatch):
    """Inside Slicer (simulated), without torch and without light-the-torch, with the PyTorch extension."""
    import slicer

    FakePyTorchUtilsLogic.calls = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(), raising=False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakePyTorchUtilsLogic))
    real_find_spec = importlib.util.find_spec
    specs = {"torch": None, "light_the_torch": None}  # what find_spec answers for these (None: not installed)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: specs[name] if name in specs else real_find_spec(name)
    )
    return specs


def test_the_requirements_file_is_the_modules_and_lists_only_what_pip_may_install_into_slicer(module):
    from packaging.requirements import Requirement

    logic = module.MAISSegmentLogic()
    assert Path(logic.requirements_path()) == REQUIREMENTS
    names = {Requirement(line).name.lower() for line in module.read_requirements(str(REQUIREMENTS))}
    assert names and not names & {"torch", "numpy", "simpleitk", "light-the-torch"}, names
    assert not (ROOT / "Resources" / "requirements.txt").exists()  # one requirements file, the module's


def test_pytorch_comes_from_the_extensions_light_the_torch_in_a_background_process(module, in_slicer, tmp_path):
    logic = module.MAISSegmentLogic()
    logic.requirements_file = str(tmp_path / "requirements.txt")
    (tmp_path / "requirements.txt").write_text("scipy>=1.0\n")
    plan = logic.dependency_plan()
    python = module.slicer_python()
    # the extension's arguments (torch, torchvision, its pins), run by Slicer's Python; no PyPI light-the-torch
    assert plan.torch_commands == [[python, "-m", "light_the_torch", "install", "torch>=2.5", "torchvision", "numpy<2"]]
    assert plan.torch_requirement == "torch>=2.5" and plan.packages == []
    assert "light-the-torch" in plan.describe() and "PyTorch extension" in plan.describe()
    assert not any("pip" in part for command in plan.torch_commands for part in command)

    plan.torch_commands = [[sys.executable, "-c", "print('torch installed')"]]  # stands in for light-the-torch
    run = logic.start_dependency_install(plan)
    assert FakePyTorchUtilsLogic.calls == ["_installLightTheTorch"]  # Slicer's fork, installed by the extension
    assert run.wait(60) and run.error is None and "torch installed" in run.take_lines()

    in_slicer["light_the_torch"] = object()  # already there: not installed again
    FakePyTorchUtilsLogic.calls = []
    assert logic.start_dependency_install(plan).wait(60)
    assert FakePyTorchUtilsLogic.calls == []


def test_without_the_extensions_helpers_its_public_install_torch_is_used(module, in_slicer, monkeypatch):
    class OldLogic(FakePyTorchUtilsLogic):
        _getPipInstallArguments = None
        _installLightTheTorch = None

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=OldLogic))
    logic = module.MAISSegmentLogic()
    plan = logic.dependency_plan()
    assert plan.torch_commands[0][1:] == ["-m", "light_the_torch", "install", "torch>=2.5", "torchvision"]
    run = logic.start_dependency_install(plan)
    assert run.finished and run.error is None
    assert FakePyTorchUtilsLogic.calls == [("installTorch", False, ">=2.5")]

    monkeypatch.setattr(OldLogic, "installTorch", lambda self, **kw: None)  # the user cancelled, or it failed
    run = logic.start_dependency_install(plan)
    assert run.finished and "did not install" in run.error


def test_installs_only_from_the_main_thread(module, in_slicer):
    logic = module.MAISSegmentLogic()
    plan = logic.dependency_plan()
    errors = []

    def off_main_thread():
        try:
            logic.start_dependency_install(plan)
        except module.MAISSegmentError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=off_main_thread)
    thread.start()
    thread.join(30)
    assert errors and "main thread" in errors[0] and FakePyTorchUtilsLogic.calls == []


def test_dependency_plan_without_the_pytorch_extension_says_to_install_it(module, in_slicer, monkeypatch):
    monkeypatch.delitem(sys.modules, "PyTorchUtils")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "PyTorchUtils") else object()
    )
    with pytest.raises(module.MAISSegmentError, match="PyTorch extension"):
        module.MAISSegmentLogic().dependency_plan()


def test_requirements_go_through_slicer_packaging(module, monkeypatch, tmp_path):
    """``load_requirements`` reads the file, ``pip_check`` says what is missing, ``pip_ensure`` installs it (the user
    has seen the list in MAISSegment's one confirmation, so ``pip_ensure`` does not ask again)."""
    import slicer
    from packaging.requirements import Requirement

    calls = []
    installed = {"scipy"}

    def load_requirements(path):
        calls.append(("load_requirements", Path(path).name))
        return [Requirement(line) for line in Path(path).read_text().split() if not line.startswith("#")]

    def pip_check(requirement):
        return Requirement(str(requirement)).name in installed

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None, skip_in_testing=True):
        calls.append(("pip_ensure", [str(r) for r in requirements], prompt_install, requester))
        installed.update(Requirement(str(r)).name for r in requirements)

    fake = types.SimpleNamespace(load_requirements=load_requirements, pip_check=pip_check, pip_ensure=pip_ensure)
    monkeypatch.setattr(slicer, "packaging", fake, raising=False)
    torch_logic = types.SimpleNamespace(torchInstalled=lambda: True, torch=types.SimpleNamespace(__version__="2.6"))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: torch_logic))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("scipy>=1.0\nmaissegment-extra>=2.0\n")
    logic = module.MAISSegmentLogic()
    logic.requirements_file = str(requirements)
    assert logic.missing_requirements() == ["maissegment-extra>=2.0"]
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(), raising=False)
    asked = []
    logic.ensure_dependencies(confirm=lambda packages: asked.append(packages) or True)
    assert asked == [["maissegment-extra>=2.0"]]
    assert ("pip_ensure", ["maissegment-extra>=2.0"], False, "MAISSegment") in calls
    assert calls[0] == ("load_requirements", "requirements.txt")
    calls.clear()
    logic.ensure_dependencies()  # checked once: nothing read or installed again
    assert calls == []


# ------------------------------------------------------------------------------------------------ weights licence
class FakeSettings(dict):
    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):
        self[key] = value

    def remove(self, key):
        self.pop(key, None)


def test_restricted_weights_are_used_after_one_recorded_acceptance(module):
    licence = importlib.import_module("MAISSegmentLogic.licence")
    settings = FakeSettings()
    text = licence.registered_licence("mais-small-shared")
    assert "non-commercial" in text and licence.licence_needs_acceptance(text)
    question = licence.weights_licence_question("mais-small-shared", settings)
    assert question and "research and non-commercial use only" in question and text in question
    assert licence.pending_weights_licence("mais-small-shared", settings) == text
    licence.record_weights_licence_acceptance("mais-small-shared", settings=settings)
    assert list(settings) == ["MAISSegment/AcceptedWeightsLicences/mais-small-shared"]
    assert licence.pending_weights_licence("mais-small-shared", settings) is None
    assert licence.weights_licence_question("mais-small-shared", settings) is None
    # a changed licence text is asked about again; forgetting asks again too
    assert not licence.weights_licence_accepted("mais-small-shared", text + " (amended)", settings)
    licence.forget_weights_licence_acceptance("mais-small-shared", settings)
    assert licence.pending_weights_licence("mais-small-shared", settings) == text


def test_permissive_unknown_and_imported_weights_need_no_acceptance(module, tmp_path):
    licence = importlib.import_module("MAISSegmentLogic.licence")
    settings = FakeSettings()
    assert licence.pending_weights_licence("sam-med3d-turbo", settings) is None  # Apache-2.0
    assert licence.pending_weights_licence("my-imported-model", settings) is None  # not in the registry
    registry = tmp_path / "models.json"
    registry.write_text('{"models": [{"id": "x", "license": "CC BY-NC 4.0 (noncommercial)"}, {"id": "y"}]}')
    assert licence.pending_weights_licence("x", settings, str(registry)) == "CC BY-NC 4.0 (noncommercial)"
    assert licence.pending_weights_licence("y", settings, str(registry)) is None
    licence.record_weights_licence_acceptance("y", settings=settings, registry=str(registry))
    assert settings == {}  # nothing to accept, nothing recorded
    assert licence.registered_default_model(str(registry)) is None


def test_a_point_with_the_default_model_asks_about_its_licence_first(module):
    """With no model chosen in Advanced, the first point uses the registry's default: the built-in model, whose
    weights are research / non-commercial; the panel asks before anything is placed, and the module's text says so."""
    licence = importlib.import_module("MAISSegmentLogic.licence")
    default = licence.registered_default_model()
    assert default == "mais-small-shared" and licence.weights_licence_question(default, FakeSettings())
    widget = (MODULE_DIR / "MAISSegment.py").read_text()
    toggled = widget[widget.index("def onPlaceToggled") : widget.index("def onPlaceIncludeShortcut")]
    assert toggled.index("self._ensureWeightsLicence()") < toggled.index("self._ensureSegment()")
    assert "help_link_html()" in widget and "getDefaultModuleDocumentationLink" not in widget


def test_the_description_says_the_bundled_weights_are_non_commercial():
    top = (ROOT / "CMakeLists.txt").read_text()
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', top).group(1)
    assert "non-commercial" in description and "accept" in description


# ------------------------------------------------------------------------------------------------------- help link
def test_help_links_the_user_guide_that_ships_with_the_module(module):
    documentation = importlib.import_module("MAISSegmentLogic.documentation")
    html = documentation.help_link_html()
    guide = MODULE_DIR / "README.md"
    assert guide.is_file() and guide.resolve().as_uri() in html and html.startswith("<p>")
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"^\s+README\.md$", module_cmake, re.M), "the user guide is installed beside the module"
