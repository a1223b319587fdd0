"""The Slicer extension's CMake lists, run by real CMake against a stand-in Slicer (``SlicerConfig.cmake`` defining the
macros the lists call), and what they install: every listed file exists (Slicer's macro stops the build otherwise),
every ``MAISSegmentLib`` module that ``MAISSegment/`` reaches at run time is listed, the command-line-only files and
the tests are not, and the installed tree imports on its own (``MAISSegmentLib`` from the install, with its bundled
model). Also the meta-information the Extensions Index checks (icon, screenshots, contributors, catalog entry)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTING

ROOT = TESTING.parent
LIB = ROOT / "MAISSegmentLib"
MODULE_DIR = ROOT / "MAISSegment"
RAW_PREFIX = "https://raw.githubusercontent.com/MAISSegment/SlicerMAISSegment/main/"
CLI_ONLY = {"__main__.py", "cli.py", "bench.py", "demo.py", "fewshot.py", "markups.py", "seg_nrrd.py"}

# A stand-in for Slicer's CMake package: the variables and macros the extension's lists use. The scripted-module
# macro checks that each listed file exists (as slicerMacroBuildScriptedModule does) and records where it would be
# installed (qt-scripted-modules/<path as listed>, relative to the calling folder).
FAKE_SLICER_CONFIG = r"""
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/CPack.cmake")
set(RECORD "${CMAKE_BINARY_DIR}/installed.txt")
file(WRITE "${RECORD}" "")
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords: ${MY_UNPARSED_ARGUMENTS}")
  endif()
  foreach(kind SCRIPTS RESOURCES)
    foreach(file ${MY_${kind}})
      if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${file}")
        message(FATAL_ERROR "slicerMacroBuildScriptedModule(${kind}) given nonexistent file '${file}'")
      endif()
      file(APPEND "${RECORD}" "${MY_NAME}|${kind}|${CMAKE_CURRENT_SOURCE_DIR}|${file}\n")
    endforeach()
  endforeach()
endmacro()
macro(slicer_add_python_unittest)
  file(APPEND "${RECORD}" "TEST|${ARGN}\n")
endmacro()
"""


def runtime_lib_modules() -> set[str]:
    """The files of MAISSegmentLib reached from the module file and its logic package: imports (also inside
    functions) followed through the package, and ``MAISSegmentLib.x`` module names run with ``python -m``."""

    def module_file(name: str) -> Path | None:
        path = ROOT.joinpath(*name.split("."))
        for candidate in (path / "__init__.py", path.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        return None

    def imported(path: Path, package: str) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                names |= {module} | {f"{module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Constant) and re.fullmatch(r"MAISSegmentLib(\.\w+)+", str(node.value)):
                names.add(node.value)  # e.g. learn.WORKER_MODULE, run with python -m
        return {n for n in names if n.split(".")[0] == "MAISSegmentLib"}

    starts = [MODULE_DIR / "MAISSegment.py", *sorted((MODULE_DIR / "MAISSegmentLogic").glob("*.py"))]
    todo = [name for path in starts for name in imported(path, "MAISSegmentLogic")]
    seen: set[Path] = set()
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs before its submodules
            name = ".".join(parts[:i])
            path = module_file(name)
            if path is not None and path not in seen:
                seen.add(path)
                todo += imported(path, name if path.name == "__init__.py" else ".".join(parts[: i - 1]))
    return {p.relative_to(ROOT).as_posix() for p in seen}


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> list[tuple[str, str, Path, str]]:
    """``cmake -S <checkout> -B <tmp>`` with the stand-in Slicer: (target, kind, source folder, file) per listed
    file, and the tests registered."""
    if shutil.which("cmake") is None or not (shutil.which("cc") and shutil.which("c++")):
        pytest.skip("cmake and a C/C++ compiler are needed to configure the extension's CMake project")
    tmp = tmp_path_factory.mktemp("cmake")
    fake = tmp / "slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER_CONFIG)
    (fake / "UseSlicer.cmake").write_text("")
    (fake / "CPack.cmake").write_text("")
    (fake / "GenerateConfig.cmake").write_text(
        "foreach(v HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)\n"
        '  file(APPEND "${RECORD}" "META|${v}|${EXTENSION_${v}}\\n")\nendforeach()\n'
    )
    build = tmp / "build"
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in (build / "installed.txt").read_text().splitlines()]
    return rows


def installed_files(rows) -> dict[str, Path]:
    """qt-scripted-modules/<path> -> source file, as the scripted-module macro copies them (no WITH_SUBDIR)."""
    return {row[3]: Path(row[2]) / row[3] for row in rows if row[0] not in ("TEST", "META")}


def test_cmake_configures_and_lists_the_module_and_its_library(configured):
    installed = installed_files(configured)
    targets = {row[0] for row in configured if row[0] not in ("TEST", "META")}
    assert targets == {"MAISSegment", "MAISSegmentLib"}  # both built with slicerMacroBuildScriptedModule
    logic = {f"MAISSegmentLogic/{p.name}" for p in (MODULE_DIR / "MAISSegmentLogic").glob("*.py")}
    assert {"MAISSegment.py", *logic, "README.md", "Resources/requirements.txt"} <= set(installed)
    assert {"Resources/UI/MAISSegment.ui", "Resources/Icons/MAISSegment.png", "Resources/models.json"} <= set(installed)
    assert ["TEST", "SCRIPT", "MAISSegment.py"] in [
        row[:1] + row[1].split(";") for row in configured if row[0] == "TEST"
    ]
    assert all(source.is_file() for source in installed.values())


def test_every_module_the_runtime_imports_is_listed_and_nothing_else(configured):
    listed = {f for f in installed_files(configured) if f.startswith("MAISSegmentLib/")}
    needed = runtime_lib_modules()
    assert {"MAISSegmentLib/session.py", "MAISSegmentLib/learn_worker.py", "MAISSegmentLib/train.py"} <= needed
    assert not needed - listed, f"imported at run time but not in CMakeLists.txt: {sorted(needed - listed)}"
    assert not listed - needed, f"listed but never used by the module: {sorted(listed - needed)}"
    assert not {f"MAISSegmentLib/{name}" for name in CLI_ONLY} & listed
    everything = set(installed_files(configured))
    assert not any(f.startswith(("Testing/", "scripts/", "docs/", "Resources/sample/")) for f in everything)


def test_the_installed_tree_imports_on_its_own_with_the_bundled_model(configured, tmp_path):
    """Copy what the lists install into a fresh qt-scripted-modules/ and import every installed MAISSegmentLib module
    from there (not from the checkout); the registry finds the bundled weights in the installed Resources/."""
    modules_dir = tmp_path / "qt-scripted-modules"
    for target, source in installed_files(configured).items():
        (modules_dir / target).parent.mkdir(parents=True, exist_ok=True)
        if source.suffix == ".pth":  # the weights: a link is enough (only their presence is checked)
            (modules_dir / target).symlink_to(source)
        else:
            shutil.copy2(source, modules_dir / target)
    names = sorted(
        f.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for f in installed_files(configured)
        if f.startswith("MAISSegmentLib/")
    )
    code = (
        "import importlib, json, sys\n"
        f"names = {names!r}\n"
        "for name in names: importlib.import_module(name)\n"
        "import MAISSegmentLib\n"
        "from MAISSegmentLib import resources, weights\n"
        "entry = weights.get_model(weights.default_model_id())\n"
        "print(json.dumps({'lib': MAISSegmentLib.__file__, 'resources': str(resources.resources_dir()),"
        " 'default': str(entry.path), 'status': entry.status}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAIS_MODELS_JSON")}
    env["PYTHONPATH"] = str(modules_dir)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["lib"]).is_relative_to(modules_dir)
    assert Path(found["resources"]) == modules_dir / "Resources"
    assert Path(found["default"]).is_relative_to(modules_dir / "Resources" / "models") and found["status"] == "bundled"


def test_meta_information_the_extensions_index_checks(configured):
    meta = {row[1]: row[2] for row in configured if row[0] == "META"}
    assert meta["CATEGORY"] == "Segmentation" and meta["DEPENDS"] == "PyTorch"
    assert "non-commercial" in meta["DESCRIPTION"] and "accept" in meta["DESCRIPTION"]
    # contributors in Slicer's "Name (Affiliation)" form; real names are set by the release step (--contributors)
    assert all(re.fullmatch(r"[^(),]+ \([^()]+\)", c.strip()) for c in meta["CONTRIBUTORS"].split(","))
    catalog = json.loads((ROOT / "MAISSegment.json").read_text())
    assert catalog["scm_url"].removesuffix(".git") == meta["HOMEPAGE"] and meta["HOMEPAGE"].endswith(
        "/SlicerMAISSegment"
    )
    # the icon and screenshots: raw URLs of the public repository, each a file of this tree that will be served there
    urls = [meta["ICONURL"], *meta["SCREENSHOTURLS"].split()]
    assert len(urls) >= 3
    for url in urls:
        assert url.startswith(RAW_PREFIX), url
        path = ROOT / url.removeprefix(RAW_PREFIX)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000, url
        width, height = struct.unpack(">II", data[16:24])
        assert min(width, height) >= 128, (url, width, height)
    # the checker's own patterns (scripts/check_description_files.py of Slicer/ExtensionsIndex) find them
    top = (ROOT / "CMakeLists.txt").read_text()
    assert re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', top, re.I)[0].split() == urls[1:]
    assert re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', top, re.I)[0] == urls[0]
    assert re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", top, re.I)[0] == "MAISSegment"
