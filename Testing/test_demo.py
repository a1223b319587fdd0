"""``mais demo`` on the bundled sample case (with the reference fixture's weights)."""

from __future__ import annotations

import json

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
