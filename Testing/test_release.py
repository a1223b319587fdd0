"""``scripts/release_repository.sh`` (the public repository as one commit of the tracked tree, its clone size, the
Extensions Index checker run offline by ``scripts/check_extension_offline.py``), on temporary folders: the checkout's
history is read, never written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TESTING

ROOT = TESTING.parent
SCRIPT = ROOT / "scripts" / "release_repository.sh"
WEIGHTS = ROOT / "Resources" / "models" / "mais-small-shared.pth"

pytestmark = pytest.mark.slow


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def release(out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), *options], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """This checkout's HEAD released into a temporary folder (size limit raised: measured, not enforced here)."""
    refs_before = git("for-each-ref", cwd=ROOT)
    out = tmp_path_factory.mktemp("release") / "SlicerMAISSegment"
    proc = release(out, "--max-mb", "100000", "--contributors", "Jane Doe (Example University), Li Wei (Example Lab)")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert git("for-each-ref", cwd=ROOT) == refs_before  # nothing written into the checkout's repository
    return out, proc


def clone_mib(proc: subprocess.CompletedProcess) -> float:
    line = next(line for line in proc.stdout.splitlines() if line.strip().startswith("clone:"))
    return float(line.split()[1])


def test_the_public_repository_is_one_commit_of_the_tracked_tree(released):
    out, proc = released
    assert git("rev-list", "--count", "HEAD", cwd=out) == "1" and git("branch", "--show-current", cwd=out) == "main"
    assert git("ls-tree", "-r", "--name-only", "HEAD", cwd=out) == git("ls-tree", "-r", "--name-only", "HEAD", cwd=ROOT)
    assert git("status", "--porcelain", cwd=out) == ""
    assert git("rev-parse", "HEAD", cwd=ROOT) in git("log", "-1", "--format=%s", cwd=out)  # says where it came from
    cmake = (out / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CONTRIBUTORS "Jane Doe (Example University), Li Wei (Example Lab)")' in cmake
    assert not (out / ".venv").exists() and not (out / "runs").exists()
    assert "Extensions Index checker not run" in proc.stdout and clone_mib(proc) > 1


@pytest.mark.xfail(
    WEIGHTS.stat().st_size > 25_000_000,
    reason="the bundled weights (float16, 47 MB) count twice in a clone (pack and checkout); the int8 export "
    "(mais weights export --dtype int8, 22.7 MB; issue 7: <= 25 MB) brings the clone to about 55 MiB",
    strict=True,
)
def test_the_public_repository_clones_under_the_extensions_index_limit(released):
    assert clone_mib(released[1]) <= 100


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    """A small repository shaped like the extension's (catalog entry, CMake lists, icon, licence)."""
    src = tmp_path / "src"
    (src / "MAISSegment" / "Resources" / "Icons").mkdir(parents=True)
    (src / "MAISSegment" / "Resources" / "Icons" / "MAISSegment.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (src / "LICENSE").write_text("Apache License 2.0\n")
    (src / "MAISSegment.json").write_text((ROOT / "MAISSegment.json").read_text())
    (src / "CMakeLists.txt").write_text(
        'project(MAISSegment)\nset(EXTENSION_CONTRIBUTORS "Someone (Somewhere)")\nset(EXTENSION_ICONURL '
        '"https://raw.githubusercontent.com/MAISSegment/SlicerMAISSegment/main/MAISSegment/Resources/Icons/'
        'MAISSegment.png")\n'
    )
    (src / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB that do not compress away... much
    git("init", "-q", "-b", "work", cwd=src)
    git("add", "-A", cwd=src)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=src)
    (src / "untracked.txt").write_text("not released")
    return src


def test_a_clone_over_the_limit_fails_the_release(tiny_source, tmp_path):
    proc = release(tmp_path / "out", "--source", str(tiny_source), "--max-mb", "1")
    assert proc.returncode == 1 and "over the 1 MiB limit" in proc.stderr
    assert not (tmp_path / "out" / "untracked.txt").exists() and (tmp_path / "out" / "big.bin").exists()
    assert release(tmp_path / "out", "--source", str(tiny_source)).returncode == 2  # never into a used folder
    inside = release(tiny_source / "sub", "--source", str(tiny_source))
    assert inside.returncode == 2 and "inside the source repository" in inside.stderr


# A stand-in for Slicer/ExtensionsIndex's scripts/check_description_files.py with the interface the offline runner
# relies on (module globals requests / ExtensionCheckError / check_git_repository_topics, main() reading argv and the
# current folder, the report's check lines): it clones scm_url, downloads the icon and the schema, asks for topics.
FAKE_CHECKER = r"""
import json, os, subprocess, sys, tempfile
requests = None
class ExtensionCheckError(RuntimeError):
    def __init__(self, extension_name, check_name, details):
        self.details = details
    def __str__(self):
        return self.details
def check_git_repository_topics(extension_name, metadata):
    requests.get("https://api.github.com/repos/x/y/topics")
def main():
    name = sys.argv[1][:-5]
    metadata = json.load(open(sys.argv[1]))
    folder = tempfile.mkdtemp()
    def clone():
        subprocess.run(["git", "clone", metadata["scm_url"], folder], check=True, capture_output=True)
        subprocess.run(["git", "checkout", metadata["scm_revision"]], cwd=folder, check=True, capture_output=True)
    def icon():
        text = open(os.path.join(folder, "CMakeLists.txt")).read()
        url = text.split('EXTENSION_ICONURL "')[1].split('"')[0]
        try:
            response = requests.get(url, timeout=10)
        except requests.RequestException as exc:
            raise ExtensionCheckError(name, "icon", str(exc))
        assert response.headers["Content-Type"] == "image/png", response.headers
    def schema():
        try:
            requests.get(metadata["$schema"])
        except requests.RequestException as exc:
            raise ExtensionCheckError(name, "schema", str(exc))
    def dependencies():
        assert os.path.isfile("PyTorch.json")
    for title, check in (("Clone repository", clone), ("Check CMakeLists.txt content", icon),
                         ("Check JSON schema", schema),
                         ("Check git repository topics", lambda: check_git_repository_topics(name, metadata)),
                         ("Check dependencies", dependencies)):
        try:
            check()
            print(f"- :white_check_mark: {title} completed successfully")
        except ExtensionCheckError as exc:
            print(f"- :x: {title} failed: {exc}")
    return 1
"""


def test_the_offline_checker_clones_the_new_repository_and_serves_its_files(tiny_source, tmp_path):
    out = tmp_path / "SlicerMAISSegment"
    assert release(out, "--source", str(tiny_source)).returncode == 0
    index = tmp_path / "ExtensionsIndex"
    (index / "scripts").mkdir(parents=True)
    (index / "scripts" / "check_description_files.py").write_text(FAKE_CHECKER)
    (index / "PyTorch.json").write_text(json.dumps({"category": "Utilities"}))
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_extension_offline
    finally:
        sys.path.pop(0)
    status, report, results = check_extension_offline.run(index, out, schema=None)
    assert results["Clone repository"] == "passed", report  # git's insteadOf sent the clone to the new repository
    assert results["Check CMakeLists.txt content"] == "passed", report  # the icon's raw URL answered from its file
    assert results["Check JSON schema"].startswith("not checked: offline")  # no --schema: needs the network
    assert results["Check git repository topics"].startswith("not checked: not checked offline: needs the published")
    assert results["Check dependencies"] == "passed" and status == 0
    schema = tmp_path / "schema.json"
    schema.write_text("{}")
    status, report, results = check_extension_offline.run(index, out, schema=schema)
    assert results["Check JSON schema"] == "passed" and status == 0
    (out / "MAISSegment" / "Resources" / "Icons" / "MAISSegment.png").unlink()  # a missing picture is a failure
    status, report, results = check_extension_offline.run(index, out, schema=schema)
    assert results["Check CMakeLists.txt content"].startswith("failed") and status == 1
