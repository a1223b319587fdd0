"""Register the released built-in model and write its model card from the measured figures.

Last step of ``scripts/release_builtin_model.sh``. Reads the exported weight file, the training log and the
result files of the release run, then

- adds (or replaces) the model's entry in ``Resources/models.json`` and makes it the default
  (file, size, SHA-256, licence, training data, preset, version);
- writes ``Resources/models/<id>.md`` from ``scripts/model_card_template.md``, filling in the file's size and
  hashes, the training facts (from ``log.csv``), the test-split table and the few-shot table (from the
  EVALUATION.md JSON files written by ``mais evaluate`` and ``mais fewshot``).

Nothing is invented here: a figure the release run did not produce is written as "not measured".

    .venv/bin/python scripts/register_builtin_model.py --weights Resources/models/mais-small-shared.pth \\
        --log runs/mais-small-shared/log.csv --eval runs/release/test_split.json \\
        --fewshot runs/release/fewshot_Myo/fewshot.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MAISSegmentLib import weights  # noqa: E402
from MAISSegmentLib.fileutil import atomic_write, atomic_write_text  # noqa: E402

LICENSE = (
    "research / non-commercial use only (derived from training data under CC BY-NC-SA and research-only "
    "terms; see the model card). MAISSegment's code is Apache-2.0."
)
COPIED_NOTE = "the log is no longer here, so this paragraph is copied from this file's earlier card"
TRAINED_ON = (
    "train split of the project's shared data: ACDC, LA 2018, OpenKBP, IBSI sarcoma, BraTS 2013, DeepLesion "
    "(173 volumes, 625 targets)"
)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def training_facts(log_csv: Path, batch_size: int) -> str:
    """A paragraph on the run: steps, episodes (``batch_size`` per step, from the checkpoint's recipe), wall time,
    loss and training Dice early vs late."""
    rows = list(csv.DictReader(log_csv.open())) if log_csv.exists() else []
    # a resumed run logs again the steps after its last checkpoint: keep the last row of each step
    rows = sorted({int(r["step"]): r for r in rows}.values(), key=lambda r: int(r["step"]))
    if not rows:
        return f"Training log `{_shown(log_csv)}`: not found."
    n = len(rows)
    w = min(50, n)
    first, last = rows[:w], rows[-w:]

    def mean(rs, key):
        return statistics.fmean(float(r[key]) for r in rs)

    hours = (float(rows[-1]["time"]) - float(rows[0]["time"])) / 3600
    return (
        f"Run as released: {rows[-1]['step']} steps ({batch_size * n} episodes), {hours:.2f} h of wall time on the "
        f"2-core CPU (other work shared the machine part of the time). Steps 1–{w}: loss {mean(first, 'loss'):.3f}, "
        f"training Dice after the last click {mean(first, 'last_click_dice'):.3f}; steps {n - w + 1}–{n}: loss "
        f"{mean(last, 'loss'):.3f}, Dice {mean(last, 'last_click_dice'):.3f} (log: `{_shown(log_csv)}`)."
    )


def recorded_training_facts(card: Path, file_sha: str) -> str | None:
    """The training paragraph (``Run as released: ...``) of an existing card of the same weight file, or None.

    Training logs live in ``runs/`` and are lost with the machine; a later release of the same weights (new
    figures after a change of the session's defaults, say) keeps the paragraph measured from the log when it
    was there, instead of writing "not found". The note saying so is added once: a paragraph that already
    carries it (a card that was itself released without the log) is kept as it is."""
    if not card.exists():
        return None
    text = card.read_text()
    if file_sha not in text:
        return None  # a card of other weights: its training facts are not these
    for line in text.splitlines():
        if line.startswith("Run as released:"):
            if COPIED_NOTE in line:
                return line
            return line[:-2] + f"; {COPIED_NOTE})." if line.endswith(").") else line + f" ({COPIED_NOTE})."
    return None


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (no machine paths in the card)."""
    try:
        return path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path.name


def _family(name: str) -> str:
    for prefix in ("Left", "Right"):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    return name.split("_")[0] if name.startswith(("rib", "vertebrae")) else name


def method_table(doc: dict) -> str:
    clicks = [str(c) for c in doc["clicks"]]
    head = "| method | " + " | ".join(f"Dice@{c}" for c in clicks) + " | median Dice@" + clicks[-1] + " | s/click |"
    lines = [head, "|---|" + "---:|" * (len(clicks) + 2)]
    for name, m in doc["methods"].items():
        cells = [_fmt(m["dice_mean"].get(c)) for c in clicks]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {_fmt(m['dice_median'].get(clicks[-1]))} | {m.get('seconds_per_click_median', 0):.3f} |"
        )
    return "\n".join(lines)


def family_table(doc: dict, click: str) -> str:
    """Mean Dice@click per structure family and method (targets pooled by name, left/right merged)."""
    fams: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for name, m in doc["methods"].items():
        for t in m["targets"]:
            fams[_family(t["name"])][name].append(t["dice"][click])
    methods = list(doc["methods"])
    lines = [
        "| family | targets | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for fam in sorted(fams, key=lambda f: -len(fams[f][methods[0]])):
        n = len(fams[fam][methods[0]])
        lines.append(f"| {fam} | {n} | " + " | ".join(_fmt(statistics.fmean(fams[fam][m])) for m in methods) + " |")
    return "\n".join(lines)


def source_table(doc: dict) -> str:
    """Mean Dice at every click count per data source (the case id's prefix before ``__``) for each method."""
    clicks = [str(c) for c in doc["clicks"]]
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for name, m in doc["methods"].items():
        for t in m["targets"]:
            groups[t["case"].split("__")[0]][name].append(t["dice"])
    lines = ["| source | targets | method | " + " | ".join(f"Dice@{c}" for c in clicks) + " |"]
    lines.append("|---|---:|---|" + "---:|" * len(clicks))
    for src in sorted(groups):
        for name, dices in groups[src].items():
            cells = " | ".join(_fmt(statistics.fmean(d[c] for d in dices)) for c in clicks)
            lines.append(f"| {src} | {len(dices)} | {name} | {cells} |")
    return "\n".join(lines)


def eval_section(path: Path | None) -> str:
    if path is None or not path.exists():
        return "Not measured."
    doc = json.loads(path.read_text())
    d = doc["data"]
    click = "10" if "10" in {str(c) for c in doc["clicks"]} else str(doc["clicks"][-1])
    models = [m.get("model") or {} for m in doc["methods"].values()]
    connected = [m["grow_connected"] for m in models if "grow_connected" in m]
    growth = ""
    if connected and all(connected):
        growth = (
            " (session defaults: a new 128³ ROI is added only where the part of the mask connected to an include "
            "point reaches a ROI face)"
        )
    return (
        f"`{doc['command']}`\n\n"
        f"{d['n_cases']} volumes, {d['n_targets']} targets ({d['n_skipped']} skipped under 10 mm³) of the `test` "
        f"split, robot user of EVALUATION.md (`center`, seed {doc['seed']}); mean over targets, measured on the "
        f"released float16 file{growth}:\n\n{method_table(doc)}\n\nMean Dice@{click} by structure family:\n\n"
        f"{family_table(doc, click)}\n\nBy data source (TotalSegmentator is not in the training data):\n\n"
        f"{source_table(doc)}\n\n"
        "`no-memory` is the same weights with the memory attention switched off (the paper's Ft-SAM3D "
        "baseline); `growcut` is Slicer's Grow from seeds (`vtkImageGrowCutSegment`) seeded with the same clicks "
        "inside the same region."
    )


def fewshot_section(path: Path | None) -> str:
    if path is None or not path.exists():
        return "Not measured."
    doc = json.loads(path.read_text())
    fs = doc["fewshot"]
    cases = "; ".join(f"k = {k}: {', '.join(v)}" for k, v in fs["train_cases"].items())
    lr_pd, lr_mem = fs.get("lr_prompt_decoder", 8e-5), fs.get("lr_memory", 8e-4)  # older files: the paper's
    loss = f", Dice loss at {fs['loss_size']}³" if "loss_size" in fs else ""
    if fs.get("lr_encoder"):
        encoder = f"the MAIS recipe but with the image encoder trained too, at {fs['lr_encoder']:g}"
    else:
        encoder = "the MAIS recipe: image encoder frozen"
    return (
        f"`mais fewshot` on the family {', '.join(fs['structures'])}: `mais finetune` of this model ({encoder}, "
        f"AdamW, MultiStepLR; prompt encoder + decoder {lr_pd:g}, memory attention "
        f"{lr_mem:g}{loss}, {fs['steps']} steps) on k training cases ({cases}), then the robot user on that family's "
        f"{doc['data']['n_targets']} targets of the `test` split ({doc['data']['n_cases']} volumes):\n\n"
        f"{method_table(doc)}"
    )


def copy_figure(result_json: Path | None, dest: Path) -> str:
    """Copy the PNG written next to a result JSON beside the card; returns a Markdown image or ''."""
    if result_json is None:
        return ""
    png = result_json.with_suffix(".png")
    if not png.exists():
        return ""
    data = png.read_bytes()
    atomic_write(dest, lambda tmp: tmp.write_bytes(data))
    return f"\n\n![{dest.stem}]({dest.name})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="the exported release file in Resources/models/")
    ap.add_argument("--log", type=Path, required=True, help="log.csv of the training run")
    ap.add_argument("--eval", type=Path, help="test-split result JSON of mais evaluate")
    ap.add_argument("--fewshot", type=Path, help="fewshot.json of mais fewshot")
    ap.add_argument("--eval-note", default="", help="a sentence added after the test-split tables (e.g. on timing)")
    ap.add_argument("--template", type=Path, default=REPO / "scripts" / "model_card_template.md")
    ap.add_argument("--registry", type=Path, default=REPO / "Resources" / "models.json")
    a = ap.parse_args(argv)

    info = weights.inspect_checkpoint(a.weights)
    model_id, version = info["model_id"], info["version"]
    file_sha = weights.file_sha256(a.weights)
    size = a.weights.stat().st_size

    reg = json.loads(a.registry.read_text())
    rel = a.weights.resolve().relative_to(a.registry.resolve().parent).as_posix()
    entry = {
        "id": model_id,
        "version": version,
        "file": rel,
        "url": None,
        "sha256": file_sha,
        "size_bytes": size,
        "license": LICENSE,
        "format": "maissegment",
        "preset": info["preset"],
        "description": (
            "Built-in default model: mais-small (SAM-Med3D layout, 4-block encoder) + MAIS memory attention, "
            "trained from scratch on CPU. Good on head-and-neck CT, cardiac MR and tumours like its training "
            f"data; weak on abdominal organs. Model card: models/{model_id}.md"
        ),
        "trained_on": TRAINED_ON,
    }
    reg["models"] = [m for m in reg["models"] if m["id"] != model_id] + [entry]
    reg["default"] = model_id
    atomic_write_text(a.registry, json.dumps(reg, indent=1) + "\n")

    out = a.weights.parent / f"{model_id}.md"
    facts = training_facts(a.log, int(info["provenance"].get("recipe", {}).get("batch_size", 2)))
    if not a.log.exists():
        facts = recorded_training_facts(out, file_sha) or facts
    card = a.template.read_text()
    for key, value in {
        "@VERSION@": str(version),
        "@SIZE@": f"{size:,}",
        "@FILE_SHA@": file_sha,
        "@WEIGHTS_SHA@": str(info["sha256"]),
        "@TRAINING_FACTS@": facts,
        "@EVAL@": eval_section(a.eval)
        + (f" {a.eval_note}" if a.eval_note else "")
        + copy_figure(a.eval, a.weights.parent / f"{model_id}_test_split.png"),
        "@FEWSHOT@": fewshot_section(a.fewshot) + copy_figure(a.fewshot, a.weights.parent / f"{model_id}_fewshot.png"),
    }.items():
        card = card.replace(key, value)
    atomic_write_text(out, card)
    print(f"registered {model_id} {version} ({size:,} bytes, sha256 {file_sha[:12]}...) as default; card {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
