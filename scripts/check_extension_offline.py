#!/usr/bin/env python3
"""Run the Extensions Index checker (``scripts/check_description_files.py`` of a Slicer/ExtensionsIndex checkout,
unmodified) on the extension's public repository before it is published, without the network.

* the checker's ``git clone`` of ``scm_url`` (https://github.com/MAISSegment/SlicerMAISSegment.git) is redirected to
  the local repository made by ``scripts/release_repository.sh`` (git's ``url.<base>.insteadOf``, in the
  environment);
* its downloads (``requests.get``) are answered offline: the raw.githubusercontent.com URLs of that repository (the
  icon and the screenshots) with the repository's own files, as GitHub will serve them once it is pushed; the
  description's ``$schema`` with a local copy of Slicer's schema (``--schema``); anything else is a download error;
* the one check that needs the published GitHub repository (its topics, through GitHub's API) is reported as not
  checked.

The checker runs in a temporary copy of the index's description files (it checks the dependencies between them, so
``PyTorch.json`` must be there) with ``MAISSegment.json`` taken from the repository. Exit status 0 when every other
check passed.

    python scripts/check_extension_offline.py --extensions-index ExtensionsIndex --repository OUT [--schema FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

NEEDS_PUBLIC_REPOSITORY = {"Check git repository topics"}  # GitHub's API on the published repository
GIT_KEYS = ("GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0", "GIT_CONFIG_VALUE_0")  # the clone's redirection
NEEDS_NETWORK_WITHOUT_SCHEMA = {"Check JSON schema"}  # the schema is downloaded unless --schema is given


class OfflineRequestError(Exception):
    """A download the offline run cannot answer (the checker catches ``requests.RequestException``)."""


class OfflineResponse:
    def __init__(self, url: str, content: bytes, content_type: str) -> None:
        self.url, self.content, self.status_code = url, content, 200
        self.headers = {"Content-Type": content_type}
        self.text = content.decode("utf-8", "replace")

    def raise_for_status(self) -> None:
        pass

    def json(self):
        return json.loads(self.content)


CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif"}


def offline_requests(raw_prefix: str, repository: Path, schemas: dict[str, Path]) -> types.ModuleType:
    """A stand-in for the ``requests`` module: ``get`` answers from the repository's files and the local schemas."""

    def get(url: str, timeout: float | None = None, headers: dict | None = None, **kwargs) -> OfflineResponse:
        base = url.split("#", 1)[0]
        if base in schemas:
            return OfflineResponse(url, schemas[base].read_bytes(), "application/json")
        if base.startswith(raw_prefix):
            path = repository / base.removeprefix(raw_prefix)
            if not path.is_file():
                raise OfflineRequestError(f"404 Client Error: Not Found for url: {url} (not in the repository)")
            return OfflineResponse(url, path.read_bytes(), CONTENT_TYPES.get(path.suffix.lower(), "text/plain"))
        raise OfflineRequestError(f"offline: {url} is not available without the network")

    return types.SimpleNamespace(get=get, RequestException=OfflineRequestError)


def load_checker(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("check_description_files", path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):  # its import-time warning about optional modules
        spec.loader.exec_module(module)
    return module


def run(index: Path, repository: Path, schema: Path | None, name: str = "MAISSegment") -> tuple[int, str, dict]:
    """Run the checker; returns (exit status, its report, {check: "passed" | "failed: ..." | "not checked: ..."})."""
    checker = load_checker(index / "scripts" / "check_description_files.py")
    description = json.loads((repository / f"{name}.json").read_text())
    scm_url = description["scm_url"]
    owner_repo = re.sub(r"\.git$", "", scm_url.split("github.com/", 1)[1])
    branch = description.get("scm_revision", "main")
    raw_prefix = f"https://raw.githubusercontent.com/{owner_repo}/{branch}/"
    schemas = {description["$schema"].split("#", 1)[0]: schema} if schema else {}
    checker.requests = offline_requests(raw_prefix, repository, schemas)

    def topics_not_checked(extension_name, metadata):
        raise checker.ExtensionCheckError(
            extension_name,
            "check_git_repository_topics",
            "not checked offline: needs the published GitHub repository (give it the topic '3d-slicer-extension')",
        )

    checker.check_git_repository_topics = topics_not_checked
    work = Path(tempfile.mkdtemp(prefix="extensions_index_"))
    saved = (
        os.getcwd(),
        sys.argv,
        {k: os.environ.get(k) for k in GIT_KEYS},
    )
    try:
        for entry in index.glob("*.json"):
            shutil.copy2(entry, work / entry.name)
        shutil.copy2(repository / f"{name}.json", work / f"{name}.json")
        os.environ.update(
            GIT_CONFIG_COUNT="1",
            GIT_CONFIG_KEY_0=f"url.{repository.resolve().as_uri()}.insteadOf",
            GIT_CONFIG_VALUE_0=scm_url,
        )
        os.chdir(work)
        sys.argv = ["check_description_files.py", f"{name}.json"]
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            status = checker.main()
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(work, ignore_errors=True)
    text = report.getvalue()
    results = {}
    for line in text.splitlines():
        passed = re.match(r"- :white_check_mark: (.+?) completed successfully", line)
        failed = re.match(r"- :x: (.+?) failed: (.*)", line)
        if passed:
            results[passed.group(1)] = "passed"
        elif failed:
            allowed = NEEDS_PUBLIC_REPOSITORY | (set() if schema else NEEDS_NETWORK_WITHOUT_SCHEMA)
            results[failed.group(1)] = ("not checked: " if failed.group(1) in allowed else "failed: ") + failed.group(2)
    if ":x: Dependency check failed" in text:
        results["Dependency check"] = "failed"
    elif "Dependency check completed successfully" in text:
        results["Dependency check"] = "passed"
    ok = bool(results) and all(not value.startswith("failed") for value in results.values())
    del status  # the checker's own status counts the offline-only failures too
    return (0 if ok else 1), text, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extensions-index", required=True, type=Path, help="a checkout of Slicer/ExtensionsIndex")
    parser.add_argument("--repository", required=True, type=Path, help="the repository made by release_repository.sh")
    parser.add_argument("--schema", type=Path, help="Slicer's slicer-extension-catalog-entry-schema-v1.0.2.json")
    parser.add_argument("--report", type=Path, help="also write the checker's full report (Markdown) here")
    args = parser.parse_args(argv)
    status, text, results = run(args.extensions_index, args.repository.resolve(), args.schema)
    if args.report:
        args.report.write_text(text)
    width = max(len(k) for k in results) if results else 0
    for check, result in results.items():
        print(f"   {check:<{width}}  {result}")
    print(
        "   offline check: "
        + ("passed (everything that does not need the public repository)" if status == 0 else "FAILED")
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
