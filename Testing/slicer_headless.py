"""Headless Slicer for tests: a real MRML scene with the module logics that node I/O needs (slicer-core, no Qt).

Use the ``mrml`` fixture (a fresh :class:`HeadlessSlicer` per test) by importing it into a test module::

    from slicer_headless import mrml_fixture  # noqa: F401  (provides the "mrml" fixture)

Tests using it are skipped, with the reason, when slicer-core is not installed. Same recipe as
``shared/examples/slicer_core_demo.py`` (and trame-slicer's SlicerApp), plus the data I/O manager that scene bundles
need (:meth:`HeadlessSlicer.save_mrb` / :meth:`HeadlessSlicer.load_mrb`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

try:
    import slicer  # the slicer-core wheel's meta-package

    if not hasattr(slicer, "vtkMRMLScene"):  # an unrelated PyPI package called "slicer"
        raise ImportError("the installed 'slicer' package is not slicer-core")
    import slicer.util
    import vtk
except ImportError as exc:  # pragma: no cover - depends on the environment
    slicer = None
    HAVE_SLICER = False
    SKIP_REASON = f"slicer-core is not available ({exc}); install it with `pip install slicer-core` (Linux, Py 3.11)"
else:
    HAVE_SLICER = True
    SKIP_REASON = ""

requires_slicer = pytest.mark.skipif(not HAVE_SLICER, reason=SKIP_REASON or "slicer-core is available")


def _dedupe_converter_rules() -> None:
    """Each segmentations logic registers the converter rules again in the process-wide factory: keep one of each."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    seen = set()
    for rule in list(factory.GetConverterRules() or []):
        key = rule.GetClassName()
        if key in seen:
            factory.UnregisterConverterRule(rule)
        else:
            seen.add(key)


class HeadlessSlicer:
    """A scene, the application logic and the colours/volumes/segmentations/markups logics, bound to each other.

    While it is open, ``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()`` point at it (what ``slicer.util``
    helpers use); :meth:`close` restores the previous values and clears the scene.
    """

    def __init__(self) -> None:
        if not HAVE_SLICER:
            raise RuntimeError(SKIP_REASON)
        self._saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().SetMRMLScene(self.scene)
        self.app_logic.GetColorLogic().AddDefaultColorNodes()
        self.colors = self._register(slicer.vtkMRMLColorLogic(), "Colors")
        self.volumes = self._register(slicer.vtkSlicerVolumesLogic(), "Volumes")
        # Setting its scene registers the segmentation converter rules (without them AddEmptySegment returns '')
        self.segmentations = self._register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        self.markups = self._register(slicer.vtkSlicerMarkupsLogic(), "Markups")
        _dedupe_converter_rules()
        # Scene bundles (.mrb): vtkMRMLScene.ReadFromMRB unpacks into the remote cache directory of the scene's data
        # I/O manager, which the Slicer application creates with vtkMRMLRemoteIOLogic; without it reading fails
        # ("cannot retrieve remote cache directory from DataIOManager"). Same set-up, with a private cache folder.
        self._cache = tempfile.mkdtemp(prefix="slicer_headless_cache_")
        self.remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.remote_io.SetMRMLScene(self.scene)
        self.remote_io.AddDataIOToScene()
        self.remote_io.GetCacheManager().SetRemoteCacheDirectory(self._cache)
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentations),
            volumes=types.SimpleNamespace(logic=lambda: self.volumes),
            markups=types.SimpleNamespace(logic=lambda: self.markups),
        )

    def _register(self, logic: Any, name: str) -> Any:
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    # ------------------------------------------------------------------ node factories
    def add_volume(self, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume") -> Any:
        """A scalar volume node holding ``array_kji`` on the grid ``ijk_to_ras`` (4x4, direction included)."""
        return slicer.util.addVolumeFromArray(np.ascontiguousarray(array_kji), np.asarray(ijk_to_ras), name)

    def add_segmentation(self, reference_volume: Any = None, name: str = "segmentation") -> Any:
        """A segmentation node with display nodes, its geometry taken from ``reference_volume`` if given."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        if reference_volume is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
        return node

    def add_points(self, name: str = "points") -> Any:
        """An empty markups point list (vtkMRMLMarkupsFiducialNode) with display nodes."""
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        return node

    def add_linear_transform(self, matrix: np.ndarray, name: str = "transform") -> Any:
        """A linear transform node (to parent) holding the 4x4 ``matrix``."""
        node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(matrix[r][c]))
        node.SetMatrixTransformToParent(m)
        return node

    def add_warp_transform(self, name: str = "warp") -> Any:
        """A non-linear (thin-plate spline) transform node."""
        tps = vtk.vtkThinPlateSplineTransform()
        src, dst = vtk.vtkPoints(), vtk.vtkPoints()
        for p in ((0, 0, 0), (50, 0, 0), (0, 50, 0), (0, 0, 50), (30, 30, 30)):
            src.InsertNextPoint(*p)
            dst.InsertNextPoint(p[0] + 2.0, p[1] - 1.0, p[2] + (3.0 if p == (30, 30, 30) else 0.0))
        tps.SetSourceLandmarks(src)
        tps.SetTargetLandmarks(dst)
        tps.SetBasisToR()
        node = self.scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
        node.SetAndObserveTransformToParent(tps)
        return node

    def save_mrb(self, path: str | os.PathLike) -> None:
        """Save the whole scene as a Slicer data bundle (``.mrb``: the ``.mrml`` scene and every node's files, zipped),
        as File → Save Scene does. Raises RuntimeError when Slicer reports a failure."""
        if not self.scene.WriteToMRB(os.fspath(path)):
            raise RuntimeError(f"Slicer could not write the scene bundle {path}")

    def load_mrb(self, path: str | os.PathLike) -> None:
        """Replace the scene's content by a ``.mrb`` bundle (File → Open data), as a new Slicer session would."""
        self.scene.Clear(False)
        if not self.scene.ReadFromMRB(os.fspath(path)):
            raise RuntimeError(f"Slicer could not read the scene bundle {path}")

    def close(self) -> None:
        self.scene.Clear(True)
        self.remote_io.RemoveDataIOFromScene()
        shutil.rmtree(self._cache, ignore_errors=True)
        for name, value in self._saved.items():
            if value is None:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)

    def __enter__(self) -> HeadlessSlicer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(name="mrml")
def mrml_fixture() -> Iterator[HeadlessSlicer]:
    """A fresh headless Slicer scene; skips the test when slicer-core is missing."""
    if not HAVE_SLICER:
        pytest.skip(SKIP_REASON)
    app = HeadlessSlicer()
    try:
        yield app
    finally:
        app.close()
