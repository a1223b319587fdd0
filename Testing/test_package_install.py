"""A normal (non-editable) install works: build the wheel, install it into a fresh venv, run `mais` from there.

The fresh venv gets only the wheel (``--no-deps``); torch, NumPy, SimpleITK... come from this test's own
environment through a ``.pth`` line written *after* the install (so pip never sees, let alone touches, this
environment's own MAISSegment). The commands run outside the checkout without ``PYTHONPATH``, and the test
checks that the MAISSegmentLib they import is the installed copy, not the repository's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import TESTING

REPO = TESTING.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "MAISSegmentLib", "Resources")  # what the wheel is built from
RESOURCES_IN_WHEEL = "MAISSegmentLib/_resources/"

pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (the checkout gets no build/ or egg-info from this test)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, src / name)
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], src)
    (wheel,) = wheels.glob("maissegment-*.whl")
    return wheel


def fresh_venv_with(wheel: Path, tmp_path: Path) -> Path:
    """A new venv holding only the wheel; this environment's site-packages is appended for the dependencies."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]  # this pip, installing into the new venv
    run([*pip, "install", "--no-deps", "--no-index", str(wheel)], tmp_path)
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    (Path(site.stdout.strip()) / "_outer_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_ships_the_resources_and_its_install_runs_weights_list_and_demo(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n[len(RESOURCES_IN_WHEEL) :] for n in zf.namelist() if n.startswith(RESOURCES_IN_WHEEL)}
    assert {"models.json", "models/mais-small-shared.pth", "sample/manifest.json"} <= shipped
    venv = fresh_venv_with(wheel, tmp_path)
    work = tmp_path / "elsewhere"  # not the checkout: nothing importable from the current folder
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAIS_MODELS_JSON")}
    env["MAIS_WEIGHTS_DIR"] = str(tmp_path / "cache")
    code = "import MAISSegmentLib; print(MAISSegmentLib.__file__)"
    where = run([str(venv / "bin" / "python"), "-c", code], work, env)
    assert Path(where.stdout.strip()).is_relative_to(venv)

    listing = run([str(venv / "bin" / "mais"), "weights", "list"], work, env).stdout
    default = next(line for line in listing.splitlines() if line.startswith("mais-small-shared (default)"))
    assert "bundled" in default and "sam-med3d-turbo" in listing

    out = tmp_path / "demo"
    demo = run([str(venv / "bin" / "mais"), "demo", "--clicks", "2", "--out", str(out), "--device", "cpu"], work, env)
    clicks = [line for line in demo.stdout.splitlines() if line.startswith("click ")]
    assert len(clicks) == 2 and all("Dice " in line for line in clicks)
    assert "model: mais-small-shared" in demo.stdout
    assert sorted(p.name for p in out.iterdir()) == ["dice_vs_clicks.png", "liver.seg.nrrd", "liver_slices.png"]
