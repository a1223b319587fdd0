"""``mais demo`` on the bundled sample case (with the reference fixture's weights)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TESTING, TINY
from MAISSegmentLib.seg_nrrd import read_segmentation
from test_cli import mais

ROOT = TESTING.parent
SAMPLE = ROOT / "Resources" / "sample"


def test_sample_case_is_bundled_with_its_licence():
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    case = manifest["cases"][0]
    assert "CC BY 4.0" in case["license"] and manifest["demo_structure"] == "liver"
    assert (SAMPLE / case["image"]).stat().st_size < 2_000_000 and (SAMPLE / "README.md").exists()


def test_demo_prints_dice_per_click_and_writes_outputs(tmp_path):
    proc = mais(
        "demo", "--checkpoint", str(TINY / "ref_tiny.pth"), "--clicks", "3", "--out", str(tmp_path), "--device", "cpu"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("click ")]
    assert len(lines) == 3 and all("Dice " in ln for ln in lines)
    _, segments = read_segmentation(tmp_path / "liver.seg.nrrd")
    assert [s.name for s in segments] == ["liver"]
    for png in ("liver_slices.png", "dice_vs_clicks.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_demo_errors(tmp_path):
    proc = mais(
        "demo", "--checkpoint", str(TINY / "ref_tiny.pth"), "--structure", "heart_of_gold", "--out", str(tmp_path)
    )
    assert proc.returncode == 2 and "choose one of" in proc.stderr and "liver" in proc.stderr


# Stand-in for CTK's macro: prints what the extension would install beside MAISSegmentLib.
_FAKE_CTK_MACRO = """
function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(A "NO_INSTALL_SUBDIR" "TARGET_NAME;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(resource ${A_RESOURCES})
    message(STATUS "RESOURCE ${resource}")
  endforeach()
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_slicer_extension_installs_the_sample_case(tmp_path: Path) -> None:
    """The top-level CMakeLists.txt's MAISSegmentLib rules, run by ``cmake -P`` with a stand-in for CTK's macro,
    list every file of Resources/sample/ (the demo's case) among the installed resources, beside models.json."""
    top = (ROOT / "CMakeLists.txt").read_text()
    start = top.index("file(GLOB_RECURSE MAISSegmentLib_PYTHON_SCRIPTS")
    call = re.compile(r"ctkMacroCompilePythonScript\(.*?\)\n", re.S).search(top, start)
    assert call, "no ctkMacroCompilePythonScript(...) after the MAISSegmentLib globs"
    rules = top[start : call.end()].replace("CONFIGURE_DEPENDS", "")  # only for re-configuring; not in script mode
    script = tmp_path / "resources.cmake"
    script.write_text(_FAKE_CTK_MACRO + rules)
    proc = subprocess.run(["cmake", "-P", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    installed = set(re.findall(r"RESOURCE (\S+)", proc.stdout + proc.stderr))
    sample = {f"Resources/sample/{p.name}" for p in SAMPLE.iterdir() if p.is_file()}
    assert {"Resources/sample/manifest.json", "Resources/sample/ct_abdomen_img.nii.gz"} <= sample
    assert sample <= installed and "Resources/models.json" in installed
    assert all((ROOT / r).is_file() for r in installed)
