"""The built-in default model as shipped: registry entry, bundled file, model card and `mais demo` on it.

These run on a fresh clone (the weights and the sample case are in the repository) and need no ``../shared``.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from MAISSegmentLib import weights
from MAISSegmentLib.checkpoint import build_model
from MAISSegmentLib.model import get_preset
from test_cli import REPO, mais

RESOURCES = REPO / "Resources"


@pytest.fixture(scope="module")
def default_entry():
    default, entries = weights.load_registry()
    assert default is not None, "Resources/models.json registers no default model"
    return next(e for e in entries if e.id == default)


def test_default_model_is_bundled_verified_and_documented(default_entry):
    e = default_entry
    path = weights.resolve(e.id)  # checks size and SHA-256 against the registry
    assert path == RESOURCES / e.file and path.stat().st_size == e.size_bytes
    assert e.size_bytes <= 50 * 10**6, "bundled weights must stay within 50 MB"
    assert e.sha256 and e.license and e.trained_on and e.version and e.format == "maissegment"
    card = RESOURCES / "models" / f"{e.id}.md"
    text = card.read_text(encoding="utf-8")
    assert e.sha256 in text, "the model card must quote the SHA-256 of the file it describes"
    assert "scripts/train_builtin_model.sh" in text and "scripts/release_builtin_model.sh" in text
    for heading in ("Training data", "Recipe", "Test split", "Few-shot", "Limitations"):
        assert re.search(rf"^#+ .*{heading}", text, re.M | re.I), f"model card lacks a '{heading}' section"


def test_default_model_loads_with_trained_memory(default_entry):
    model = build_model(None, checkpoint=weights.resolve(default_entry.id))
    rep = model.load_report
    assert rep.source == "maissegment" and rep.memory_attention == "loaded"
    assert (rep.model_id, rep.version) == (default_entry.id, default_entry.version)
    recipe = rep.provenance["recipe"]
    # trained from the preset (stage 1), or fine-tuned from a file of that preset (stage 3: the configuration comes
    # from the starting checkpoint, recorded as its init_checkpoint)
    assert recipe["preset"] == default_entry.preset or (recipe["preset"] is None and recipe["init_checkpoint"])
    assert model.cfg.replace(fullres=None) == get_preset(default_entry.preset) and rep.provenance["steps_done"] > 0
    assert next(model.parameters()).dtype.is_floating_point and next(model.parameters()).element_size() == 4
    # trained, not fresh: the memory attention's zero-initialised residual branches have moved
    ma = model.memory_attention
    moved = [layer.weight.abs().max().item() for layer in (ma.dense_out, ma.cross_out, ma.mlp[2])]
    assert min(moved) > 0


def test_demo_runs_on_the_default_model(tmp_path: Path):
    run = mais("demo", "--out", str(tmp_path), "--device", "cpu", "--clicks", "5")
    assert run.returncode == 0, run.stderr
    dice = [float(x) for x in re.findall(r"Dice (\d\.\d+)", run.stdout)]
    assert len(dice) == 5
    assert dice[-1] > 0.1, "the bundled model segments nothing of the demo structure: is it the right file?"
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".seg.nrrd") for f in files) and "dice_vs_clicks.png" in files
    assert any(f.endswith("_slices.png") for f in files)


def register_script():
    """``scripts/register_builtin_model.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("register_builtin_model", REPO / "scripts/register_builtin_model.py")
    reg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reg)
    return reg


def repeated_sentences(text: str) -> list[str]:
    """Sentences or clauses (split at . ; ! ? and parentheses) of more than 40 characters that occur twice."""
    parts = [p.strip() for p in re.split(r"[.;!?]\s+|[()]", text) if len(p.strip()) > 40]
    return [p for p, n in Counter(parts).items() if n > 1]


def test_model_card_repeats_nothing_and_re_releases_do_not_repeat_the_copied_note(default_entry, tmp_path: Path):
    card = RESOURCES / "models" / f"{default_entry.id}.md"
    assert repeated_sentences(card.read_text(encoding="utf-8")) == []
    reg = register_script()
    released = tmp_path / "card.md"
    released.write_text(f"`{'ab' * 32}`\n\nRun as released: 2600 steps (log: `x.csv`).\n")
    for _ in range(3):  # three releases of the same weights without the training log
        facts = reg.recorded_training_facts(released, "ab" * 32)
        released.write_text(f"`{'ab' * 32}`\n\n{facts}\n")
    assert facts.count(reg.COPIED_NOTE) == 1 and repeated_sentences(released.read_text()) == []


def test_release_keeps_the_recorded_training_facts_when_the_log_is_gone(tmp_path: Path):
    """``scripts/register_builtin_model.py``: a re-release of the same weight file without its training log keeps
    the training paragraph of that file's card; a card of another file, or none, gives nothing."""
    reg = register_script()
    card = tmp_path / "card.md"
    assert reg.recorded_training_facts(card, "ab" * 32) is None
    card.write_text(f"| SHA-256 of the file | `{'ab' * 32}` |\n\nRun as released: 2600 steps (log: `x.csv`).\n")
    facts = reg.recorded_training_facts(card, "ab" * 32)
    assert facts == (
        "Run as released: 2600 steps (log: `x.csv`; the log is no longer here, so this paragraph is copied from "
        "this file's earlier card)."
    )
    assert reg.recorded_training_facts(card, "cd" * 32) is None
    assert reg.training_facts(tmp_path / "missing.csv", 2).endswith("not found.")
