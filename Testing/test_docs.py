"""The documents the code cites are in the repository and say what the code does."""

from __future__ import annotations

import inspect
import json
import re

import pytest

from conftest import TESTING
from MAISSegmentLib.data import list_targets
from MAISSegmentLib.evaluate import (
    ORACLE_FACE_VOXELS,
    ORACLE_SUPERSAMPLE,
    OTHER_FAMILY,
    STRUCTURE_FAMILIES,
    result_document,
    structure_family,
)
from MAISSegmentLib.session import GROW_MIN_MM, SessionOptions

REPO = TESTING.parent
EVALUATION = REPO / "docs" / "EVALUATION.md"


def test_evaluation_protocol_is_shipped_and_its_example_is_the_result_file_of_the_code():
    text = EVALUATION.read_text(encoding="utf-8")
    example = json.loads(text.split("```json", 1)[1].split("```", 1)[0])
    data = example["data"]
    built = result_document(
        example["command"],
        data["manifest"],
        data["split"],
        data["n_cases"],
        data["n_targets"],
        data["n_skipped"],
        example["clicks"],
        example["seed"],
        example["methods"],
        strategy=example["strategy"],
    )
    assert built == example  # same fields, same nesting: the documented file is the one `mais evaluate` writes
    threshold = inspect.signature(list_targets).parameters["min_volume_mm3"].default
    assert f"smaller than {threshold:g} mm³" in text  # the documented threshold is the code's
    for res in example["methods"].values():
        assert all(t["family"] == structure_family(t["name"]) for t in res["targets"])
        for field in ("by_source", "by_family"):
            assert all(set(g) == {"n_targets", "dice_mean"} for g in res[field].values())


def test_evaluation_oracle_and_families_are_documented_as_coded():
    text = " ".join(EVALUATION.read_text(encoding="utf-8").split())  # paragraphs wrap anywhere
    assert f"outermost {ORACLE_FACE_VOXELS * 1.5:g} mm" in text and f"at least {GROW_MIN_MM:g} mm beyond" in text
    assert f"`max_rois` ({SessionOptions().max_rois})" in text
    lo, hi = ORACLE_SUPERSAMPLE
    assert f"s = {lo}, or up to {hi} for images finer than {1.5 / lo:g} mm" in text
    for family, _ in STRUCTURE_FAMILIES:
        assert f"`{family}`" in text
    assert f"`{OTHER_FAMILY}` when no keyword matches" in text


def test_readme_lint_commands_are_those_of_the_test_script():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    script = (REPO / "scripts" / "test.sh").read_text(encoding="utf-8").splitlines()
    lint = re.findall(r"`(\.venv/bin/ruff [^`]*)`", readme)
    assert lint and all(command in script for command in lint), lint


def test_readme_pip_extras_install_this_checkout_and_exist():
    """MAISSegment is not published on PyPI: an extra is installed from the checkout, and must exist."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    commands = re.findall(r"`pip install ([^`]*\[[^`]*)`", readme)
    assert commands
    for command in commands:
        target = command.split()[-1].strip("\"'")
        assert target.startswith(".["), command
        assert set(target[2:-1].split(",")) <= set(extras), command
