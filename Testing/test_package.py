"""House rules of the package that a test can check."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import TESTING

LIB = TESTING.parent / "MAISSegmentLib"
FORBIDDEN = {"slicer", "qt", "vtk", "ctk", "vtkmodules", "slicer_core", "vtkSlicerSegmentationsModuleLogicPython"}
# the bridge to Slicer: the only modules allowed to touch MRML (volumes, markups, masking, writing + undo, scene
# state, export of finished cases)
BRIDGE = {
    "mrml_volumes.py",
    "mrml_markups.py",
    "mrml_masking.py",
    "mrml_writing.py",
    "mrml_state.py",
    "mrml_export.py",
}
LAZY_ONLY = {"baselines.py"}  # Slicer's Grow from seeds: imported inside the function that runs it


def test_library_never_imports_slicer_qt_or_vtk():
    offenders = []
    for path in LIB.rglob("*.py"):
        if path.name in BRIDGE and path.parent == LIB:
            continue
        tree = ast.parse(path.read_text())
        # in LAZY_ONLY modules only module-level imports count (function bodies may import lazily)
        nodes = tree.body if path.name in LAZY_ONLY else ast.walk(tree)
        for node in nodes:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(LIB)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_bridge_is_exactly_the_mrml_modules():
    """Every ``mrml_*`` module of the package is one of the bridge's, and each of them exists."""
    assert {p.name for p in LIB.glob("mrml_*.py")} == BRIDGE


def test_import_is_light():
    """Importing the package loads neither SimpleITK nor any Slicer/VTK module (fast start-up in Slicer)."""
    code = (
        "import sys, MAISSegmentLib; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'SimpleITK', 'vtk', 'slicer'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTING.parent, check=True)
    assert out.stdout.strip() == "[]"


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages (Resources/ is mapped into the package): a new subpackage must be added."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((TESTING.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(LIB.parent).parts) for p in LIB.rglob("__init__.py")}
    assert found <= listed and "MAISSegmentLib._resources" in listed
