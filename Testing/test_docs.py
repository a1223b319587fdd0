"""The documents the code cites are in the repository and say what the code does."""

from __future__ import annotations

import inspect
import json

from conftest import TESTING
from MAISSegmentLib.data import list_targets
from MAISSegmentLib.evaluate import result_document

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
