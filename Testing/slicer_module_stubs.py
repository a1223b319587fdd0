"""Stand-ins for the parts of the Slicer application that slicer-core lacks, so that ``MAISSegment/MAISSegment.py``
can be imported headless and its logic driven with real MRML (``Testing/slicer_headless.py``).

Only what the module file needs at import time and what its logic and in-Slicer test call:

- ``slicer.ScriptedLoadableModule``: the four base classes (the logic's parameter node is a real
  ``vtkMRMLScriptedModuleNode`` of ``slicer.mrmlScene``, like Slicer's; the test base is ``unittest.TestCase``);
- ``slicer.parameterNodeWrapper``: the decorator (typed attributes with their defaults, no GUI binding),
  ``Choice``, ``WithinRange``, ``Default``;
- ``slicer.i18n``: ``tr`` and ``translate`` returning the text;
- ``qt`` and ``ctk``: empty modules (only the widget, which these tests do not run, uses them).

:func:`installed` injects them into ``sys.modules`` and the ``slicer`` package and restores everything afterwards;
:func:`load_module_file` imports the module file under a private name, with its folder on ``sys.path`` as Slicer
has it (the logic package ``MAISSegment/MAISSegmentLogic/`` is imported from there, afresh); the ``module`` fixture
(import ``module_fixture`` into a test file) gives the imported module file to the tests of that file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import sys
import types
import typing
import unittest
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MODULE_FILE = Path(__file__).resolve().parents[1] / "MAISSegment" / "MAISSegment.py"
LOGIC_PACKAGE = "MAISSegmentLogic"  # beside the module file: imported by it from the module's folder
STUBBED = ("slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper", "slicer.i18n", "qt", "ctk")


# ---------------------------------------------------------------------------------------------- ScriptedLoadableModule
class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent
        self.moduleName = type(self).__name__

    def getDefaultModuleDocumentationLink(self, docPage: str | None = None) -> str:
        return ""


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        self.parent = parent
        self.moduleName = type(self).__name__.removesuffix("Widget")

    def setup(self) -> None:  # pragma: no cover - the widget is not run headless
        pass


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self) -> Any:
        """The module's singleton ``vtkMRMLScriptedModuleNode`` in ``slicer.mrmlScene`` (created if missing)."""
        import slicer

        scene = slicer.mrmlScene
        nodes = scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute("ModuleName") == self.moduleName:
                return node
        node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 1000) -> None:
        logging.info(message)


# ---------------------------------------------------------------------------------------------- parameterNodeWrapper
@dataclasses.dataclass(frozen=True)
class Choice:
    choices: list


@dataclasses.dataclass(frozen=True)
class WithinRange:
    minimum: float
    maximum: float


@dataclasses.dataclass(frozen=True)
class Default:
    value: Any


def parameterNodeWrapper(classtype: type | None = None):
    """Typed attributes with their class defaults (None for nodes); ``allParameters`` maps names to annotations."""

    def wrap(cls: type) -> type:
        hints = typing.get_type_hints(cls, include_extras=True)
        defaults = {name: getattr(cls, name, None) for name in hints}

        def __init__(self, parameterNode: Any) -> None:
            self.parameterNode = parameterNode
            for name, value in defaults.items():
                setattr(self, name, value)

        cls.__init__ = __init__
        cls.allParameters = dict(hints)
        return cls

    return wrap if classtype is None else wrap(classtype)


# ---------------------------------------------------------------------------------------------- assembly
def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def stub_modules() -> dict[str, types.ModuleType]:
    """Fresh stand-in modules, by their import names."""
    return {
        "slicer.ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule",
            ScriptedLoadableModule=ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
        ),
        "slicer.parameterNodeWrapper": _module(
            "slicer.parameterNodeWrapper",
            parameterNodeWrapper=parameterNodeWrapper,
            Choice=Choice,
            WithinRange=WithinRange,
            Default=Default,
        ),
        "slicer.i18n": _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
        "qt": _module("qt"),
        "ctk": _module("ctk"),
    }


@contextlib.contextmanager
def installed() -> Iterator[dict[str, types.ModuleType]]:
    """Inject the stand-ins (``sys.modules`` and attributes of the real ``slicer`` package); restore on exit.

    A name that already exists (e.g. a real ``qt``) is replaced only for the duration.
    """
    import slicer

    stubs = stub_modules()
    saved_modules = {name: sys.modules.get(name) for name in stubs}
    attributes = [name.split(".", 1)[1] for name in stubs if name.startswith("slicer.")]
    saved_attributes = {attribute: getattr(slicer, attribute, None) for attribute in attributes}
    try:
        for name, module in stubs.items():
            sys.modules[name] = module
            if name.startswith("slicer."):
                setattr(slicer, name.split(".", 1)[1], module)
        yield stubs
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for attribute, value in saved_attributes.items():
            if value is None:
                if hasattr(slicer, attribute):
                    delattr(slicer, attribute)
            else:
                setattr(slicer, attribute, value)


def forget_logic_package() -> None:
    """Drop the imported logic package (``MAISSegmentLogic.*``) from ``sys.modules``: the next import reads it again,
    with the stand-ins installed then."""
    for name in [m for m in sys.modules if m == LOGIC_PACKAGE or m.startswith(LOGIC_PACKAGE + ".")]:
        del sys.modules[name]


def load_module_file(path: Path, name: str = "MAISSegment_under_test") -> types.ModuleType:
    """Import a module file under ``name`` (registered in ``sys.modules`` so that dataclasses and typing resolve).

    Its folder is put on ``sys.path`` first, as Slicer does for a module's folder, so that the module file's
    ``from MAISSegmentLogic... import ...`` finds the logic package beside it (imported afresh).
    """
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    forget_logic_package()
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


@pytest.fixture(name="module", scope="module")
def module_fixture() -> Iterator[types.ModuleType]:
    """``MAISSegment/MAISSegment.py`` imported with the stand-ins (restored afterwards); skipped without slicer-core."""
    from slicer_headless import HAVE_SLICER, SKIP_REASON

    if not HAVE_SLICER:
        pytest.skip(SKIP_REASON)
    with installed():
        loaded = load_module_file(MODULE_FILE)
        try:
            yield loaded
        finally:
            sys.modules.pop(loaded.__name__, None)
            forget_logic_package()
