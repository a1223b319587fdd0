"""Register the released built-in model and write its model card from the measured figures.

Last step of ``scripts/release_builtin_model.sh``. Reads the exported weight file, the training log and the
result files of the release run, then

- adds (or replaces) the model's entry in ``Resources/models.json`` and makes it the default
  (file, size, SHA-256, licence, training data, preset, version);
- writes ``Resources/models/<id>.md`` from ``scripts/model_card_template.md``: the file (storage, size, hashes),
  the architecture and parameter counts (counted on the file), the training data (volumes and targets per source
  counted from the data manifest for the cases the recipe recorded, each source's terms from the data README), the
  two-stage recipe (stage 3's settings from the file's provenance), the training facts (``log.csv``), the test-split
  tables (``mais evaluate``'s JSON: overall, per source, per structure family), the targets of issue 12 with their
  margins, latency (``mais bench --json``, optional), the few-shot figures (``mais fewshot``, optional) and the
  limitations with the measured int8-vs-float16 and zoom differences.

Nothing is invented here: a figure the release run did not produce is written as "not measured", and figures
quoted from an earlier release (Grow from seeds, few-shot) say where and when they were measured.

    .venv/bin/python scripts/register_builtin_model.py --weights Resources/models/mais-small-shared.pth \\
        --log runs/mais-small-shared-fr/log.csv --eval runs/release/test_split.json \\
        --precision runs/release/precision.json --float16-method ckpt:runs/release/mais-small-shared-float16.pth
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MAISSegmentLib import weights  # noqa: E402
from MAISSegmentLib.evaluate import group_means, structure_family  # noqa: E402
from MAISSegmentLib.fileutil import atomic_write, atomic_write_text  # noqa: E402

LICENSE = (
    "research / non-commercial use only (derived from training data under CC BY-NC-SA and research-only "
    "terms; see the model card). MAISSegment's code is Apache-2.0."
)
COPIED_NOTE = "the log is no longer here, so this paragraph is copied from this file's earlier card"
MAX_BYTES = 25 * 10**6  # issue 12: the bundled file must stay <= 25 MB (the clone <= 100 MB for the Extensions Index)
PAUSE_S = 1800  # a gap between two logged steps longer than this is a pause between runs, not training time

SOURCE_NAMES = {
    "acdc_3dcardiac": "ACDC (3-D cardiac cine, ED/ES)",
    "brats2013_deepmedic": "BraTS 2013 (via DeepMedic)",
    "btcv_vlalignseg": "BTCV abdomen (Multi-Atlas Labeling Beyond the Cranial Vault, via SSL-ALPNet/VLAlignSeg)",
    "chaos_vlalignseg": "CHAOS T2-SPIR abdominal MR (via SSL-ALPNet/VLAlignSeg)",
    "deeplesion_medsam2": "DeepLesion (3-D masks via MedSAM2)",
    "ibsi_sts": "IBSI soft-tissue sarcoma (from TCIA STS)",
    "la2018_uamt": "LA 2018 (atrial segmentation challenge, via UA-MT)",
    "openkbp_han_ct": "OpenKBP (head and neck, from TCIA)",
    "pyradiomics": "PyRadiomics sample data",
    "totalsegmentator": "TotalSegmentator examples (labels are model output)",
}
METHOD_NOTES = {
    "mais": "the released model with memory (the session defaults: zoom off)",
    "no-memory": "the same weights with the memory attention off (the paper's Ft-SAM3D baseline)",
    "mais-zoom": "`mais` with zoom on (`SessionOptions(zoom=True)`: a small object is segmented again on a finer grid)",
    "mais-grow-all": "`mais` with ROIs grown from any part of the mask",
    "growcut": "Slicer's Grow from seeds (`vtkImageGrowCutSegment`) seeded with the same robot's clicks inside the "
    "192 mm box of the first click",
    "oracle-32": "no model: the truth area-averaged onto the 32³ output grid of SAM-Med3D's decoder and mapped back "
    "(the best any 32³-logit model can do)",
    "oracle-64": "the same ceiling for a 64³ output grid",
    "oracle-128": "the same ceiling for a 128³ output grid (what the full-resolution head predicts)",
}

# ---------------------------------------------------------------------------------------- figures of 0.1.0
# Stage 1 (scripts/train_builtin_model.sh) as released in 0.1.0: its log is gone; these are its card's figures.
STAGE1 = {
    "commit": "2bd4fd1",
    "date": "2026-12-01",
    "volumes": 173,
    "targets": 625,
    "sources": (
        "acdc_3dcardiac",
        "la2018_uamt",
        "openkbp_han_ct",
        "ibsi_sts",
        "brats2013_deepmedic",
        "deeplesion_medsam2",
    ),
    "facts": "2600 steps (5200 episodes), 1.48 h of wall time on the 2-core CPU; steps 1–50: loss 0.965, training "
    "Dice after the last click 0.066; steps 2551–2600: loss 0.517, Dice 0.538",
}
# Grow from seeds on the test split, `center` robot, seed 0: measured in the release runs of 0.1.0 (commit 2bd4fd1,
# 2026-12-01) and again with identical Dice in its re-measurement (commit 23d7fdf, 2026-12-02; only its s/click
# changed, 0.096 -> 0.161 s under load). Grow from seeds uses no weights; the robot (clicks.py), the baseline
# (baselines.py) and the ROI box it is restricted to (roi.Roi.box_on) are unchanged since.
GROWCUT_REFERENCE: dict[str, Any] = {
    "commit": "23d7fdf",
    "date": "2026-12-02",
    "first_commit": "2bd4fd1",
    "first_date": "2026-12-01",
    "n_cases": 13,
    "n_targets": 87,
    "dice_mean": {"1": 0.323, "5": 0.351, "10": 0.461, "20": 0.569},
    "dice_median_20": 0.605,
    "seconds_per_click_median": 0.096,
    "by_source": {
        "acdc_3dcardiac": (6, {"1": 0.089, "5": 0.242, "10": 0.315, "20": 0.397}),
        "brats2013_deepmedic": (8, {"1": 0.197, "5": 0.376, "10": 0.512, "20": 0.596}),
        "deeplesion_medsam2": (1, {"1": 0.871, "5": 0.833, "10": 0.263, "20": 0.861}),
        "ibsi_sts": (2, {"1": 0.543, "5": 0.318, "10": 0.505, "20": 0.457}),
        "la2018_uamt": (1, {"1": 0.490, "5": 0.242, "10": 0.438, "20": 0.314}),
        "openkbp_han_ct": (14, {"1": 0.234, "5": 0.147, "10": 0.288, "20": 0.376}),
        "pyradiomics": (1, {"1": 0.808, "5": 0.865, "10": 0.841, "20": 0.841}),
        "totalsegmentator": (54, {"1": 0.361, "5": 0.396, "10": 0.509, "20": 0.633}),
    },
}
# Its Dice@10 per structure name as 0.1.0's card grouped them (left/right merged, ribs and vertebrae pooled):
# (name, targets, Dice@10); regrouped here into evaluate.STRUCTURE_FAMILIES by target-weighted means.
GROWCUT_REFERENCE_NAMES_D10 = """
rib 14 0.511; Parotid 4 0.290; vertebrae 3 0.501; RV 2 0.296; Myo 2 0.252; LV 2 0.398; Brainstem 2 0.179;
SpinalCord 2 0.265; Esophagus 2 0.206; Larynx 2 0.214; Mandible 2 0.571; GTV_Mass 2 0.505; Necrosis 2 0.345;
Edema 2 0.619; NonEnhancingTumor 2 0.438; EnhancingTumor 2 0.646; spleen 2 0.536; liver 2 0.270; stomach 2 0.636;
pancreas 2 0.272; adrenal_gland_right 2 0.557; colon 2 0.689; aorta 2 0.620; inferior_vena_cava 2 0.334;
portal_vein_and_splenic_vein 2 0.498; spinal_cord 2 0.347; autochthon_left 2 0.644; autochthon_right 2 0.630;
Atrium 1 0.438; humerus_left 1 0.706; humerus_right 1 0.691; costal_cartilages 1 0.274; kidney_right 1 0.768;
kidney_left 1 0.724; gallbladder 1 0.402; adrenal_gland_left 1 0.508; lung_right 1 0.588; small_bowel 1 0.645;
duodenum 1 0.598; intervertebral_discs 1 0.347; iliopsoas_left 1 0.017; iliopsoas_right 1 0.513; LungTumor 1 0.841;
Lesion 1 0.263
"""
# Few-shot fine-tuning as measured on 0.1.0 (commit 23d7fdf, 2026-12-02), kept when the release skips FEWSHOT=1.
FEWSHOT_010 = {
    "commit": "23d7fdf",
    "date": "2026-12-02",
    "text": "`mais fewshot` on the family Mandible: `mais finetune` of 0.1.0 (the MAIS recipe but with the image "
    "encoder trained too, at 2e-05, AdamW, MultiStepLR; prompt encoder + decoder 2e-05, memory attention 2e-05, Dice "
    "loss at 64³, 60 steps) on k training cases (k = 1: openkbp_han_ct__pt_4; k = 3: openkbp_han_ct__pt_13, "
    "openkbp_han_ct__pt_17, openkbp_han_ct__pt_4), then the robot user on that family's 2 targets of the `test` "
    "split (2 volumes):",
    "table": """| method (0.1.0) | Dice@1 | Dice@5 | Dice@10 | Dice@20 | median Dice@20 | s/click |
|---|---:|---:|---:|---:|---:|---:|
| base | 0.218 | 0.262 | 0.305 | 0.282 | 0.282 | 0.054 |
| finetuned-1 | 0.243 | 0.342 | 0.330 | 0.362 | 0.362 | 0.055 |
| finetuned-3 | 0.240 | 0.246 | 0.331 | 0.330 | 0.330 | 0.053 |""",
}

# issue 12's targets (test split, `center` robot, seed 0)
DICE_TARGETS = {"1": (0.45, 0.60), "5": (0.65, 0.80), "10": (0.72, 0.85), "20": (0.78, 0.88)}
GROWCUT_MARGIN, MEMORY_MARGIN, TOTALSEG_D10, DEMO_D10 = 0.05, 0.02, 0.60, 0.80
LATER_CLICK_S, FIRST_CLICK_S, MEMORY_OVERHEAD = 0.100, 1.0, 1.2


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


# ------------------------------------------------------------------------------------------------ training log
def _log_rows(log_csv: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(log_csv.open())) if log_csv.exists() else []
    # a resumed run logs again the steps after its last checkpoint: keep the last row of each step
    return sorted({int(r["step"]): r for r in rows}.values(), key=lambda r: int(r["step"]))


def training_facts(log_csv: Path, batch_size: int) -> str:
    """A paragraph on the run: steps, episodes (``batch_size`` per step, from the checkpoint's recipe), training time
    (step-to-step intervals; pauses between resumed runs left out), episodes per second, loss and training Dice
    early vs late."""
    rows = _log_rows(log_csv)
    if not rows:
        return f"Training log `{_shown(log_csv)}`: not found."
    n = len(rows)
    w = min(50, max(1, n // 2))  # early and late windows, apart when the run is short
    first, last = rows[:w], rows[-w:]

    def mean(rs, key):
        return statistics.fmean(float(r[key]) for r in rs)

    times = [float(r["time"]) for r in rows]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    trained = sum(g for g in gaps if g <= PAUSE_S)
    pauses = sum(1 for g in gaps if g > PAUSE_S)
    trained += batch_size / max(float(rows[0]["episodes_per_s"]), 1e-9) if "episodes_per_s" in rows[0] else 0.0
    span = (times[-1] - times[0]) / 3600
    episodes = batch_size * int(rows[-1]["step"])
    rate = episodes / trained if trained > 0 else float("nan")
    runs = f", in {pauses + 1} runs over {span:.1f} h" if pauses else ""
    return (
        f"Run as released: {rows[-1]['step']} steps ({episodes} episodes), {trained / 3600:.2f} h of training on the "
        f"2-core CPU{runs} ({rate:.3f} episodes/s, {trained / max(n, 1):.1f} s per step; other work shared the "
        f"machine part of the time). Steps {rows[0]['step']}–{first[-1]['step']}: loss {mean(first, 'loss'):.3f}, "
        f"training Dice after the last click {mean(first, 'last_click_dice'):.3f}; steps "
        f"{last[0]['step']}–{rows[-1]['step']}: loss {mean(last, 'loss'):.3f}, Dice {mean(last, 'last_click_dice'):.3f}"
        f" (log: `{_shown(log_csv)}`)."
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


# ------------------------------------------------------------------------------------------------ the file
def storage_of(path: Path) -> str:
    """The file's ``storage_dtype`` (``"float32"`` for files written before exports recorded it)."""
    from MAISSegmentLib.checkpoint import read_checkpoint

    raw = read_checkpoint(path)
    return str(raw.get("storage_dtype", "float32")) if isinstance(raw, dict) else "float32"


def storage_text(dtype: str) -> str:
    if dtype == "int8":
        return (
            "weights stored as int8: every matrix or kernel of at least 1024 values as 8-bit rows with one float32 "
            "scale per row (`MAISSegmentLib/quantize.py`), the other tensors float16; loaded into a float32 network"
        )
    return f"weights stored as {dtype}, loaded into a float32 network"


PARTS = (
    ("image_encoder", "image encoder"),
    ("prompt_encoder", "prompt encoder"),
    ("mask_decoder", "mask decoder"),
    ("memory_attention", "memory attention"),
    ("fullres_head", "full-resolution head"),
)


def parameter_counts(path: Path) -> tuple[dict[str, int], Any]:
    """Parameters per part of the network in the file (counted on the loaded model), and its config."""
    from MAISSegmentLib.checkpoint import build_model

    model = build_model(None, checkpoint=path, device="cpu")
    counts = {}
    for attr, _ in PARTS:
        part = getattr(model, attr, None)
        if part is not None:
            counts[attr] = sum(p.numel() for p in part.parameters())
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts, model.cfg


def architecture_text(preset: str | None, cfg: Any) -> str:
    enc = cfg.image_encoder
    mem = (
        f", and the MAIS memory attention (memory of N = {cfg.memory.capacity} clicks and masks)" if cfg.memory else ""
    )
    text = (
        f"preset `{preset or 'custom'}`: SAM-Med3D layout (checkpoint keys and shapes of SAM-Med3D) with a "
        f"{enc.depth}-block, {enc.embed_dim}-wide ViT image encoder ({enc.num_heads} heads, "
        f"{enc.patch_size}³ patches of a {enc.img_size}³ crop at 1.5 mm), SAM-Med3D's prompt encoder and mask decoder"
        f"{mem}"
    )
    fr = cfg.fullres
    if fr is not None:
        n = enc.img_size
        text += (
            f"; plus the full-resolution mask head (`MAISSegmentLib/model/fullres_head.py`, state-dict prefix "
            f"`fullres_head.`): {n}³ logits for the {n}³ ROI instead of the decoder's {n // 4}³, from a convolutional "
            f"stem computed once per ROI ({fr.stem_channels} → {fr.mid_channels} channels at {n // 2}³, "
            f"{fr.hi_channels} at {n}³), and per click only point-wise operations: a {fr.hidden_channels}-channel mix "
            f"at {n // 2}³ of the stem features, the decoder's logits, the previous mask and the click maps, dot "
            f"products with weights generated from the decoder's mask token, and bumps exactly at the clicks"
        )
    return text


def parameters_text(counts: dict[str, int]) -> str:
    parts = "; ".join(f"{label} {counts[attr]:,}" for attr, label in PARTS if attr in counts)
    return f"{counts['total']:,} ({parts})"


# ------------------------------------------------------------------------------------------------ training data
def source_terms(readme: Path) -> dict[str, str]:
    """Each source's data terms from the data README's provenance table (``| source | origin | data terms |``)."""
    if not readme.exists():
        return {}
    terms: dict[str, str] = {}
    column = None
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            column = None
            continue
        if column is None:
            column = cells.index("data terms") if cells and cells[0] == "source" and "data terms" in cells else None
            continue
        if set(cells[0]) <= set("-: "):
            continue
        if len(cells) > column:
            terms[cells[0]] = cells[column].replace("**", "")
    return terms


def training_cases(manifest: Path, case_ids: list[str] | None, split: str = "train") -> list[dict[str, Any]]:
    cases = json.loads(manifest.read_text(encoding="utf-8"))["cases"]
    if case_ids:
        wanted = set(case_ids)
        picked = [c for c in cases if c["id"] in wanted]
        missing = wanted - {c["id"] for c in picked}
        if missing:
            raise SystemExit(
                f"{len(missing)} training case(s) of the recipe are not in {manifest}: {sorted(missing)[:3]}"
            )
        return picked
    return [c for c in cases if c.get("split") == split]


def _names_with_counts(counts: Counter) -> str:
    """``"spleen, liver (24 each), gallbladder 22"``: names grouped by count, in first-seen order."""
    by_count: dict[int, list[str]] = defaultdict(list)
    for name, n in counts.items():
        by_count[n].append(name)
    parts = []
    for n, names in sorted(by_count.items(), key=lambda kv: -kv[0]):
        if len(names) == 1:
            parts.append(f"{names[0]} {n}")
        else:
            parts.append(f"{', '.join(names)} ({n} each)")
    return "; ".join(parts)


def data_table(cases: list[dict[str, Any]], terms: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """The training-data table (volumes, modalities, targets per structure name, terms) and ``{source: (volumes,
    targets)}``; a target is one label value of one case (the manifest lists only values present in a label map)."""
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in cases:
        by_source[c["source"]].append(c)
    lines = [
        "| source | volumes | modality | targets | structures (targets) | licence / terms (data README) |",
        "|---|---:|---|---:|---|---|",
    ]
    totals = {}
    for src in sorted(by_source):
        cs = by_source[src]
        names = Counter(name for c in cs for name in c["labels"].values())
        modalities = Counter(c["modality"] for c in cs)
        mod = ", ".join(f"{m} {n}" if len(modalities) > 1 else m for m, n in sorted(modalities.items()))
        n_targets = sum(names.values())
        totals[src] = (len(cs), n_targets)
        lines.append(
            f"| {SOURCE_NAMES.get(src, src)} (`{src}`) | {len(cs)} | {mod} | {n_targets} | {_names_with_counts(names)} "
            f"| {terms.get(src, 'see the data README')} |"
        )
    return "\n".join(lines), totals


def data_notes(cases: list[dict[str, Any]], totals: dict[str, tuple[int, int]], recipe: dict[str, Any]) -> str:
    """Sentences on what the table implies: sources new since stage 1, the clipped BTCV window."""
    new = [s for s in sorted(totals) if s not in STAGE1["sources"]]
    out = []
    if new:
        vols = sum(totals[s][0] for s in new)
        tgts = sum(totals[s][1] for s in new)
        out.append(
            f"New since 0.1.0 (stage 3 only): {', '.join(f'`{s}`' for s in new)}, {vols} volumes and {tgts} targets. "
            f"Stage 1 (0.1.0) saw the other {len(STAGE1['sources'])} sources ({STAGE1['volumes']} volumes, "
            f"{STAGE1['targets']} targets)."
        )
    if "btcv_vlalignseg" in totals:
        p = float(recipe.get("ct_window_prob", 0.0))
        out.append(
            "The BTCV images are stored as a clipped soft-tissue window (every voxel in [-125, 275] HU; air, lung and "
            "fat read -125, bone and contrast 275: see each case's notes). So that the model does not learn that CT "
            f"ends at 275 HU, stage 3 clipped {p:.0%} of all CT crops to a random soft-tissue window."
        )
    return " ".join(out)


# ------------------------------------------------------------------------------------------------ recipe
# Stage 3 (released as 0.2.0) and its continuation, as recorded in 0.2.0's card and the pilot script's header: the
# release file's provenance records only the last stage's recipe.
STAGE3 = (
    "`scripts/train_builtin_fullres.sh`: `mais finetune` (finetune mode) from 0.1.0 with a fresh full-resolution "
    "head: 600 steps of batch 2, image encoder frozen, the head at 0.0008 (fresh), prompt encoder + decoder at 8e-05 "
    "and memory attention at 8e-05, AdamW (weight decay 0.1), ×0.1 at steps 387, 540; 8 clicks per episode, "
    "back-propagation through windows of 4, memory of 60; Dice loss on the head's 128³ logits plus the decoder's own "
    "low-resolution Dice loss (weight 0.5, at 32³); 15% of the episodes on synthetic targets drawn from the training "
    "images (`MAISSegmentLib/synthetic_targets.py`, for unseen anatomy), 30% of CT crops clipped to a random "
    "soft-tissue window; bf16 autocast on the CPU; seed 3. 600 steps, 1.40 h on the 2-core CPU. Then 250 more steps "
    "of the plain head recipe (`PILOT=fullres bash scripts/train_fullres_pilot.sh --steps 250`: the same without "
    "synthetic targets or CT windows, seed 1, ×0.1 at steps 161, 225; 19 min), which raised test Dice@1/5/10/20 from "
    "0.2.0's 0.327/0.493/0.529/0.545 to 0.334/0.506/0.542/0.554."
)


def stage4_text(recipe: dict[str, Any], steps_done: int | None) -> str:
    """The last stage's settings as recorded in the file's provenance."""
    if not recipe:
        return "The file records no recipe."
    steps = int(recipe.get("steps", 0))
    mil = ", ".join(str(round(float(m) * steps)) for m in recipe.get("milestones", ()))
    frozen = (
        "image encoder frozen" if recipe.get("mode") == "finetune" else f"image encoder at {recipe.get('lr_encoder'):g}"
    )
    init = recipe.get("init_checkpoint") or "random initialisation"
    done = f" ({steps_done} done)" if steps_done is not None and steps_done != steps else ""
    ce = float(recipe.get("ce_weight", 0) or 0)
    centre = float(recipe.get("center_click_prob", 0) or 0)
    click = float(recipe.get("click_loss_weight", 0) or 0)
    loss = "Dice" + (f" + {ce:g} × binary cross-entropy" if ce else "")
    return (
        f"`mais {'finetune' if recipe.get('mode') == 'finetune' else 'train'}` from `{init}` (stage 3's result): "
        f"{steps} steps{done} of batch {recipe.get('batch_size')}, {frozen}, the head at {recipe.get('lr_fullres'):g}, "
        f"prompt encoder + decoder at {recipe.get('lr_prompt_decoder'):g}, memory attention at "
        f"{recipe.get('lr_memory'):g}, AdamW (weight decay {recipe.get('weight_decay')}), ×0.1 at steps {mil}; "
        f"{recipe.get('episode_clicks')} clicks per episode, {centre:.0%} of the correction clicks at the centre of "
        "the largest error component (the evaluation robot's click) and the rest uniform in the error region, "
        f"back-propagation through windows of {recipe.get('tbptt')}, memory of {recipe.get('memory_size')}; loss: "
        f"{loss} on the head's {recipe.get('crop_size')}³ logits plus {recipe.get('low_res_loss_weight')} × the same "
        f"on the decoder's {recipe.get('loss_size')}³ logits"
        + (f", plus {click:g} × cross-entropy at the clicked voxels themselves" if click else "")
        + f"; {float(recipe.get('synthetic_fraction', 0)):.0%} synthetic targets, "
        f"{float(recipe.get('ct_window_prob', 0)):.0%} CT windows; "
        f"{'bf16 autocast on the CPU; ' if recipe.get('cpu_bf16') else ''}seed {recipe.get('seed')}. Why: 0.2.0 was "
        "trained with Dice alone and its logits reached ±100–300; Dice gives no gradient to a saturated voxel, so an "
        "exclude click inside a confident blob left its own voxel at logit +100 and the robot user clicked the same "
        "voxel again and again (the 20-click curve was flat after 10)."
    )


# ------------------------------------------------------------------------------------------------ test split
def _groups(method: dict[str, Any], field: str, clicks: list[str]) -> dict[str, dict[str, Any]]:
    """``by_source`` / ``by_family`` of a method; computed from its targets for result files that lack them."""
    if field in method:
        return method[field]
    key = field.split("_", 1)[1]
    targets = [
        {
            **t,
            "source": t.get("source") or t["case"].split("__")[0],
            "family": t.get("family") or structure_family(t["name"]),
        }
        for t in method["targets"]
    ]
    return group_means(targets, [int(c) for c in clicks], key)


def growcut_reference_families() -> dict[str, tuple[int, float]]:
    """The reference Grow-from-seeds Dice@10 regrouped into ``evaluate.STRUCTURE_FAMILIES``."""
    acc: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for item in GROWCUT_REFERENCE_NAMES_D10.replace("\n", " ").split(";"):
        name, n, d = item.split()
        acc[structure_family(name)].append((int(n), float(d)))
    return {fam: (sum(n for n, _ in v), sum(n * d for n, d in v) / sum(n for n, _ in v)) for fam, v in acc.items()}


class Results:
    """The test-split result file with the Grow-from-seeds reference where the run did not measure it."""

    def __init__(self, doc: dict[str, Any], float16_method: str | None) -> None:
        self.doc = doc
        self.clicks = [str(c) for c in doc["clicks"]]
        self.methods: dict[str, dict[str, Any]] = dict(doc["methods"])
        self.float16 = float16_method if float16_method in self.methods else None
        self.growcut_measured = "growcut" in self.methods
        d = doc["data"]
        by_source = _groups(self.methods["mais"], "by_source", self.clicks) if "mais" in self.methods else {}
        ref_sources = {s: n for s, (n, _) in GROWCUT_REFERENCE["by_source"].items()}
        self.same_targets = (
            d.get("split") == "test"
            and doc.get("strategy", "center") == "center"
            and doc.get("seed") == 0
            and d["n_targets"] == GROWCUT_REFERENCE["n_targets"]
            and d["n_cases"] == GROWCUT_REFERENCE["n_cases"]
            and {s: g["n_targets"] for s, g in by_source.items()} == ref_sources
        )

    def label(self, name: str) -> str:
        if name == self.float16:
            return "mais, float16 file"
        return name

    def mean(self, name: str, click: str) -> float | None:
        if name == "growcut" and not self.growcut_measured:
            return GROWCUT_REFERENCE["dice_mean"].get(click)
        m = self.methods.get(name)
        return None if m is None else m["dice_mean"].get(click)

    def has(self, name: str) -> bool:
        return name in self.methods or (name == "growcut" and self.same_targets)

    def source_mean(self, name: str, source: str, click: str) -> float | None:
        if name == "growcut" and not self.growcut_measured:
            ref = GROWCUT_REFERENCE["by_source"].get(source)
            return ref[1].get(click) if ref else None
        g = _groups(self.methods[name], "by_source", self.clicks).get(source)
        return None if g is None else g["dice_mean"].get(click)


def method_table(res: Results) -> str:
    clicks = res.clicks
    head = "| method | " + " | ".join(f"Dice@{c}" for c in clicks) + f" | median Dice@{clicks[-1]} | s/click |"
    lines = [head, "|---|" + "---:|" * (len(clicks) + 2)]
    for name, m in res.methods.items():
        cells = [_fmt(m["dice_mean"].get(c)) for c in clicks]
        spc = m.get("seconds_per_click_median")
        lines.append(
            f"| {res.label(name)} | "
            + " | ".join(cells)
            + f" | {_fmt(m['dice_median'].get(clicks[-1]))} | {'–' if spc is None else f'{spc:.3f}'} |"
        )
    if not res.growcut_measured and res.same_targets:
        ref = GROWCUT_REFERENCE
        cells = [_fmt(ref["dice_mean"].get(c)) for c in clicks]
        median = _fmt(ref["dice_median_20"]) if clicks[-1] == "20" else "–"
        lines.append("| growcut † | " + " | ".join(cells) + f" | {median} | {ref['seconds_per_click_median']:.3f} |")
    return "\n".join(lines)


def source_table(res: Results) -> str:
    """Mean Dice at every click count per data source for each method (the reference Grow from seeds marked †)."""
    clicks = res.clicks
    names = list(res.methods) + (["growcut"] if not res.growcut_measured and res.same_targets else [])
    sources = sorted({s for n in res.methods for s in _groups(res.methods[n], "by_source", clicks)})
    lines = ["| source | targets | method | " + " | ".join(f"Dice@{c}" for c in clicks) + " |"]
    lines.append("|---|---:|---|" + "---:|" * len(clicks))
    for src in sources:
        for name in names:
            if name in res.methods:
                g = _groups(res.methods[name], "by_source", clicks).get(src)
                if g is None:
                    continue
                n, label = g["n_targets"], res.label(name)
            else:
                n, label = GROWCUT_REFERENCE["by_source"].get(src, (0, {}))[0], "growcut †"
                if not n:
                    continue
            cells = " | ".join(_fmt(res.source_mean(name, src, c)) for c in clicks)
            lines.append(f"| {src} | {n} | {label} | {cells} |")
    return "\n".join(lines)


def family_table(res: Results, click: str) -> str:
    """Mean Dice@click per structure family (``evaluate.STRUCTURE_FAMILIES``), one column per method."""
    names = list(res.methods)
    groups = {n: _groups(res.methods[n], "by_family", res.clicks) for n in names}
    ref = growcut_reference_families() if (not res.growcut_measured and res.same_targets and click == "10") else None
    families = sorted(
        {f for g in groups.values() for f in g}, key=lambda f: (-groups[names[0]].get(f, {}).get("n_targets", 0), f)
    )
    head = "| family | targets | " + " | ".join(res.label(n) for n in names) + (" | growcut † |" if ref else " |")
    lines = [head, "|---|---:|" + "---:|" * (len(names) + (1 if ref else 0))]
    for fam in families:
        n = max(g.get(fam, {}).get("n_targets", 0) for g in groups.values())
        cells = [_fmt(groups[m][fam]["dice_mean"].get(click)) if fam in groups[m] else "–" for m in names]
        if ref:
            r = ref.get(fam)
            cells.append(_fmt(r[1]) if r and r[0] == n else "–")
        lines.append(f"| {fam} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growcut_note(res: Results) -> str:
    ref = GROWCUT_REFERENCE
    if res.growcut_measured:
        return "Grow from seeds was measured in this run (`GROWCUT=1`)."
    if not res.same_targets:
        return (
            "Grow from seeds was not run (`GROWCUT=1` runs it, over an hour on this CPU), and this run's targets are "
            "not those of its earlier measurement, so no Grow-from-seeds figure is given."
        )
    return (
        f"† Grow from seeds was **not re-measured** for this release (it takes over an hour on this CPU; `GROWCUT=1` "
        f"runs it): its figures are those measured on the same `test` split ({ref['n_cases']} volumes, "
        f"{ref['n_targets']} targets, the same per-source target counts as this run) with the same robot (`center`, "
        f"seed 0) on {ref['first_date']} (commit {ref['first_commit']}) and again, with identical Dice, on "
        f"{ref['date']} (commit {ref['commit']}). Grow from seeds uses no weights, and its code, the robot and the ROI "
        f"box it is restricted to have not changed since; its s/click is that of the idle run of "
        f"{ref['first_date']}. Its per-family Dice@10 are 0.1.0's per-structure figures (rounded to 3 decimals) "
        "regrouped into the families above."
    )


def method_legend(res: Results) -> str:
    items = []
    for name in res.methods:
        if name == res.float16:
            items.append(
                f"`{res.label(name)}`: `mais` on the float16 export of the same training checkpoint "
                "(the int8 rounding check)"
            )
        elif name in METHOD_NOTES:
            items.append(f"`{name}`: {METHOD_NOTES[name]}")
    if not res.growcut_measured and res.same_targets:
        items.append(f"`growcut †`: {METHOD_NOTES['growcut']}")
    return "; ".join(items) + "."


def eval_section(res: Results | None, storage: str, precision: dict[str, Any] | None, note: str) -> str:
    if res is None:
        return "Not measured."
    doc, d = res.doc, res.doc["data"]
    click = "10" if "10" in res.clicks else res.clicks[-1]
    models = [m.get("model") or {} for m in doc["methods"].values()]
    connected = [m["grow_connected"] for m in models if "grow_connected" in m]
    growth = ""
    if connected and all(connected):
        growth = " (ROIs grow only from the part of the mask connected to an include point, the session default)"
    prec = precision_text(precision)
    tables = (
        f"`{doc['command']}`\n\n"
        f"{d['n_cases']} volumes, {d['n_targets']} targets ({d['n_skipped']} skipped under 10 mm³) of the `test` "
        f"split, robot user of EVALUATION.md (`{doc.get('strategy', 'center')}`, seed {doc['seed']}); mean over "
        f"targets, measured on the released {storage} file{growth}. {prec}\n\n{method_table(res)}\n\n"
        f"{method_legend(res)} {growcut_note(res)}"
    )
    if note:
        tables += f" {note}"
    return (
        f"{tables}\n\nMean Dice@{click} by structure family (`MAISSegmentLib.evaluate.STRUCTURE_FAMILIES`):\n\n"
        f"{family_table(res, click)}\n\nBy data source (TotalSegmentator and PyRadiomics are only in the test split):"
        f"\n\n{source_table(res)}"
    )


def precision_text(precision: dict[str, Any] | None) -> str:
    if not precision:
        return "The inference precision of this run was not recorded."
    used, asked = precision.get("used"), precision.get("requested", "auto")
    how = ""
    if asked == "auto":
        speed, native = precision.get("bf16_speedup"), precision.get("native_bf16")
        why = []
        if native is not None:
            why.append(f"native bfloat16 instructions {'present' if native else 'absent'}")
        if speed:
            why.append(f"bfloat16 matrix products measured {speed:.1f}× as fast as float32")
        why.append(f"{precision.get('threads')} threads")
        how = (
            f"`--precision auto` resolved to {used} on this CPU ({', '.join(why)}), and the run was pinned to it "
            f"(`--precision {used}`)"
        )
    else:
        how = f"`--precision {used}` as asked"
    return (
        f"Inference precision: {how}: the encoder, prompt encoder, memory attention and decoder under {used} "
        "autocast, the full-resolution head in float32. float32 inference was not measured for this card."
    )


# ------------------------------------------------------------------------------------------------ targets
def _row(what: str, required: str, measured: float | None, margin: float | None, shown: str | None = None) -> tuple:
    if measured is None or margin is None:
        return (what, required, "not measured", "–", "–")
    return (what, required, shown or f"{measured:.3f}", _signed(margin), "met" if margin >= 0 else "**missed**")


def targets_section(
    res: Results | None, demo: float | None, demo_clicks: int | None, bench: dict[str, Any] | None
) -> str:
    rows = []
    if res is not None:
        for c, (need, aim) in DICE_TARGETS.items():
            m = res.mean("mais", c) if c in res.clicks else None
            rows.append(
                _row(f"Dice@{c} with memory (aim {aim:.2f})", f"≥ {need:.2f}", m, None if m is None else m - need)
            )
        means = [res.mean("mais", c) for c in res.clicks]
        if all(v is not None for v in means):
            steps = [b - a for a, b in itertools.pairwise(means)]
            rows.append(
                _row(
                    "Dice non-decreasing over " + "/".join(res.clicks) + " clicks",
                    "every step ≥ 0",
                    min(steps),
                    min(steps),
                    shown=" → ".join(f"{v:.3f}" for v in means),
                )
            )
        for c in ("5", "10", "20"):
            g = res.mean("growcut", c) if res.has("growcut") else None
            m = res.mean("mais", c)
            diff = None if g is None or m is None else m - g
            tag = "" if res.growcut_measured else " †"
            rows.append(
                _row(
                    f"above Grow from seeds{tag} at {c} clicks",
                    f"≥ +{GROWCUT_MARGIN:.2f}",
                    diff,
                    None if diff is None else diff - GROWCUT_MARGIN,
                    shown=None if diff is None else _signed(diff),
                )
            )
        m, n = res.mean("mais", "20"), res.mean("no-memory", "20")
        diff = None if m is None or n is None else m - n
        rows.append(
            _row(
                "memory over no-memory at 20 clicks",
                f"≥ +{MEMORY_MARGIN:.2f}",
                diff,
                None if diff is None else diff - MEMORY_MARGIN,
                shown=None if diff is None else _signed(diff),
            )
        )
        ts = res.source_mean("mais", "totalsegmentator", "10") if "mais" in res.methods else None
        rows.append(
            _row(
                "TotalSegmentator targets (unseen anatomy) Dice@10",
                f"≥ {TOTALSEG_D10:.2f}",
                ts,
                None if ts is None else ts - TOTALSEG_D10,
            )
        )
    after = f" (after {demo_clicks} clicks)" if demo_clicks and demo_clicks != 10 else ""
    rows.append(
        _row(
            f"`mais demo` liver Dice after 10 clicks{after}",
            f"≥ {DEMO_D10:.2f}",
            demo,
            None if demo is None or demo_clicks != 10 else demo - DEMO_D10,
        )
    )
    b = bench or {}
    later, first = b.get("click_to_mask_seconds"), b.get("first_click_seconds")
    over = b.get("memory_overhead_fullres", b.get("memory_overhead"))
    for label, required, value, limit, shown in (
        ("later click, median (`mais bench` click → mask)", f"≤ {LATER_CLICK_S * 1000:.0f} ms", later, LATER_CLICK_S,
         None if later is None else f"{later * 1000:.0f} ms"),
        ("first click of a ROI (`mais bench`)", f"≤ {FIRST_CLICK_S:.1f} s", first, FIRST_CLICK_S,
         None if first is None else f"{first:.2f} s"),
        ("memory overhead per click (memory / no memory)", f"≤ {MEMORY_OVERHEAD:.1f}×", over, MEMORY_OVERHEAD,
         None if over is None else f"{over:.2f}×"),
    ):  # fmt: skip
        rows.append(_row(label, required, value, None if value is None else limit - value, shown=shown))
    lines = ["| target (issue 12) | required | measured | margin | |", "|---|---|---:|---:|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    done = [r for r in rows if r[4] != "–"]
    met = sum(r[4] == "met" for r in done)
    return (
        f"{met} of the {len(done)} measured targets met; {len(rows) - len(done)} not measured in this release run. "
        "Margin: measured minus required (for a limit, required minus measured), so a negative margin is by how much "
        "the target is missed.\n\n" + "\n".join(lines)
    )


def latency_section(bench: dict[str, Any] | None) -> str:
    if not bench:
        return "Not measured in this release run (`BENCH=1` runs `mais bench --preset mais-small-fr`)."
    device = None
    if "device" in bench:
        device = (
            f"{bench.get('device')} ({bench.get('device_name')}), {bench.get('threads')} threads, torch "
            f"{bench.get('torch')}, inference {bench.get('inference_dtype', 'float32')}"
        )
    rows = [
        ("device", device),
        ("encoder (once per ROI)", _ms(bench.get("encoder_seconds"))),
        ("full-resolution features (once per ROI)", _ms(bench.get("fullres_features_seconds"))),
        ("click, memory, 32³ logits", _ms(bench.get("click_seconds_memory"))),
        ("click, no memory, 32³ logits", _ms(bench.get("click_seconds_no_memory"))),
        ("click, memory + full-resolution head", _ms(bench.get("click_seconds_fullres"))),
        ("click, no memory + full-resolution head", _ms(bench.get("click_seconds_fullres_no_memory"))),
        ("memory overhead with the head", _x(bench.get("memory_overhead_fullres"))),
        ("first click, 512×512×300 CT", _ms(bench.get("first_click_seconds"))),
        ("later click → mask, same CT", _ms(bench.get("click_to_mask_seconds"))),
        ("peak RSS", None if bench.get("peak_rss_mb") is None else f"{bench['peak_rss_mb']:.0f} MiB"),
    ]
    lines = ["| `mais bench` | |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows if v is not None]
    return (
        f"`mais bench --preset {bench.get('preset')}` (random weights of this network's shape: timing does not depend "
        "on the values), one run, medians:\n\n" + "\n".join(lines) + "\n\nIn Slicer, a click also reads the point "
        "and writes the segment: `scripts/bench_slicer_latency.py` measures that end to end."
    )


def _ms(x: float | None) -> str | None:
    return None if x is None else f"{x * 1000:.0f} ms"


def _x(x: float | None) -> str | None:
    return None if x is None else f"{x:.2f}×"


# ------------------------------------------------------------------------------------------------ few-shot
def fewshot_section(path: Path | None) -> str:
    if path is None or not path.exists():
        ref = FEWSHOT_010
        return (
            "**Not re-measured for this release** (the release ran without `FEWSHOT=1`; it takes about an hour). "
            f"The figures below were measured on **0.1.0** on {ref['date']} (commit {ref['commit']}), before the "
            f"full-resolution head; they say how fine-tuning behaved on 0.1.0, not on this model.\n\n{ref['text']}\n\n"
            f"{ref['table']}"
        )
    doc = json.loads(path.read_text())
    fs = doc["fewshot"]
    cases = "; ".join(f"k = {k}: {', '.join(v)}" for k, v in fs["train_cases"].items())
    lr_pd, lr_mem = fs.get("lr_prompt_decoder", 8e-5), fs.get("lr_memory", 8e-4)  # older files: the paper's
    loss = f", Dice loss at {fs['loss_size']}³" if "loss_size" in fs else ""
    if fs.get("lr_encoder"):
        encoder = f"the MAIS recipe but with the image encoder trained too, at {fs['lr_encoder']:g}"
    else:
        encoder = "the MAIS recipe: image encoder frozen"
    table = method_table(Results({**doc, "methods": doc["methods"]}, None))
    return (
        f"`mais fewshot` on the family {', '.join(fs['structures'])}: `mais finetune` of this model ({encoder}, "
        f"AdamW, MultiStepLR; prompt encoder + decoder {lr_pd:g}, memory attention "
        f"{lr_mem:g}{loss}, {fs['steps']} steps) on k training cases ({cases}), then the robot user on that family's "
        f"{doc['data']['n_targets']} targets of the `test` split ({doc['data']['n_cases']} volumes):\n\n{table}"
    )


# ------------------------------------------------------------------------------------------------ limitations
def limitations(
    res: Results | None,
    counts: dict[str, int],
    recipe: dict[str, Any],
    steps_done: int | None,
    storage: str,
    n_train_targets: int,
    train_names: set[str],
    fewshot_measured: bool,
) -> str:
    total = counts["total"]
    steps3 = steps_done if steps_done is not None else recipe.get("steps")
    items = [
        f"**Small and briefly trained.** {total / 1e6:.1f} M parameters: stage 1 (2600 steps of batch 2 from random "
        f"initialisation), stage 3 (850 steps of batch 2, encoder frozen) and stage 4 ({steps3} steps of batch "
        f"{recipe.get('batch_size', 2)}, encoder {'frozen' if recipe.get('mode') == 'finetune' else 'trained'}) on "
        f"{n_train_targets} training targets, a few CPU hours in all. SAM-Med3D-turbo was trained on 143 K masks on "
        "GPUs.",
    ]
    if "fullres_head" in counts:
        items.append(
            f"**The full-resolution head** has {counts['fullres_head']:,} parameters and was trained only in "
            "stages 3 and 4, on top of a frozen encoder trained for 32³ logits; its 128³ image features come from a "
            "light two-level stem, not from the ViT. It runs in float32 even where the rest runs in bfloat16."
        )
    if res is not None and "mais-zoom" in res.methods and "mais" in res.methods:
        diffs = {c: res.mean("mais-zoom", c) - res.mean("mais", c) for c in res.clicks}
        per_src = {
            s: res.source_mean("mais-zoom", s, "10") - res.source_mean("mais", s, "10")
            for s in _groups(res.methods["mais"], "by_source", res.clicks)
            if "10" in res.clicks
        }
        worst = min(per_src, key=per_src.get) if per_src else None
        best = max(per_src, key=per_src.get) if per_src else None
        spread = (
            f"; by source at 10 clicks from {_signed(per_src[worst])} ({worst}) to {_signed(per_src[best])} ({best})"
            if worst
            else ""
        )
        items.append(
            "**Zoom** (opt-in, `SessionOptions(zoom=True)`: the ROI's voxel size follows the object) changed the mean "
            "Dice by "
            + ", ".join(f"{_signed(v)} at {c}" for c, v in diffs.items())
            + f" clicks against the same weights at a fixed 1.5 mm (`mais-zoom` minus `mais`){spread}. The model was "
            "trained on 1.5 mm crops only, so zoom stays off by default."
        )
    if res is not None and "mais" in res.methods:
        ts = [
            t
            for t in res.methods["mais"]["targets"]
            if (t.get("source") or t["case"].split("__")[0]) == "totalsegmentator"
        ]
        seen = sorted({t["name"] for t in ts if t["name"] in train_names})
        n_seen = sum(t["name"] in train_names for t in ts)
        unseen = Counter(structure_family(t["name"]) for t in ts if t["name"] not in train_names)
        kinds = ", ".join(f"{fam} {n}" for fam, n in unseen.most_common())
        if ts:
            items.append(
                f"**Anatomy**: the TotalSegmentator cases are only in the test split; {n_seen} of their {len(ts)} "
                f"targets have a structure of the same name in the training data ({', '.join(seen) or 'none'}), the "
                f"other {len(ts) - n_seen} ({kinds or 'none'}) were never labelled in training and are reached only "
                "through the synthetic targets."
            )
    items.append(
        "**Clipped CT**: the BTCV training scans hold only [-125, 275] HU; random window clipping of CT in training "
        "is meant to keep the model from relying on that, but no clipped image is in the test split to check it."
    )
    items.append(
        "**Input**: one channel, intensities normalised per crop (as SAM-Med3D); structures much smaller than ~3 "
        "voxels of the ROI grid are unlikely to be found."
    )
    if res is not None:
        d = res.doc["data"]
        items.append(
            f"The test split is small ({d['n_cases']} volumes, {d['n_targets']} targets), so the means have wide "
            "uncertainty; per-family and per-source figures rest on few targets."
        )
    if res is not None and res.float16:
        diffs = ", ".join(f"{_signed(res.mean('mais', c) - res.mean(res.float16, c))} at {c}" for c in res.clicks)
        items.append(
            f"**{storage} rounding**: the {storage} file against the float16 export of the same checkpoint, in the "
            f"same run on the same targets: mean Dice {diffs} clicks ({storage} minus float16). All figures above "
            f"are of the released {storage} file."
        )
    else:
        items.append(
            f"**{storage} rounding** of the weights was not compared with float16 in this release run; the figures "
            f"above are of the released {storage} file itself."
        )
    if not fewshot_measured:
        items.append(
            "**Few-shot fine-tuning** was not measured on this model; on 0.1.0 it helped only sometimes (table above, "
            "2 test targets per family). Check before you switch: the module's *Learn from my cases* shows Dice before "
            "and after on cases held aside, and *Switch back* returns to this model."
        )
    else:
        items.append(
            "**Few-shot fine-tuning** rests on 2 test targets per family (±0.05 is within the noise). Check before you "
            "switch: the module's *Learn from my cases* shows Dice before and after on cases held aside."
        )
    return "\n".join(f"- {t}" for t in items)


# ------------------------------------------------------------------------------------------------ inputs
def demo_dice(path: Path | None) -> tuple[float | None, int | None]:
    """Dice after the last click of a saved ``mais demo`` output (``click 10 (+) at IJK ...: Dice 0.812``)."""
    if path is None or not path.exists():
        return None, None
    found = re.findall(r"click\s+(\d+) \([+-]\) at IJK .*?: Dice (\d\.\d+)", path.read_text(errors="replace"))
    if not found:
        return None, None
    k, d = found[-1]
    return float(d), int(k)


def _json(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def check_eval_is_of(doc: dict[str, Any], weights_sha: str, float16_method: str | None) -> None:
    """Refuse a result file whose model methods ran on other weights than the released file."""
    for name, m in doc["methods"].items():
        sha = (m.get("model") or {}).get("sha256")
        if sha is None or name == float16_method or name.startswith("ckpt:"):  # other checkpoints by definition
            continue
        if sha != weights_sha:
            raise SystemExit(
                f"the evaluation's method {name!r} ran on weights {sha[:12]}..., not on the released file's "
                f"{weights_sha[:12]}...: evaluate the exported file (scripts/release_builtin_model.sh)"
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


def fewshot_figure(fewshot_json: Path | None, dest: Path) -> str:
    """The few-shot plot: this run's, or the one already beside the card (0.1.0's), labelled as such."""
    if fewshot_json is not None and fewshot_json.exists():
        return copy_figure(fewshot_json, dest)
    return f"\n\n![few-shot fine-tuning of 0.1.0]({dest.name})" if dest.exists() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="the exported release file in Resources/models/")
    ap.add_argument("--log", type=Path, required=True, help="log.csv of the training run")
    ap.add_argument("--eval", type=Path, help="test-split result JSON of mais evaluate")
    ap.add_argument("--float16-method", help="the eval's method (ckpt:FILE) run on the float16 export, if any")
    ap.add_argument("--precision", type=Path, help="JSON {requested, used, bf16_speedup, threads} of the eval run")
    ap.add_argument("--fewshot", type=Path, help="fewshot.json of mais fewshot (absent: 0.1.0's figures, labelled)")
    ap.add_argument("--bench", type=Path, help="JSON of mais bench --json (latency; optional)")
    ap.add_argument("--demo", type=Path, help="saved output of mais demo (the liver Dice after 10 clicks; optional)")
    ap.add_argument("--eval-note", default="", help="a sentence added after the test-split table (e.g. on timing)")
    ap.add_argument("--manifest", type=Path, default=REPO.parent / "shared" / "data" / "manifest.json")
    ap.add_argument("--data-readme", type=Path, help="the data README (default: README.md beside the manifest)")
    ap.add_argument("--template", type=Path, default=REPO / "scripts" / "model_card_template.md")
    ap.add_argument("--registry", type=Path, default=REPO / "Resources" / "models.json")
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="refuse a larger file (issue 12: 25 MB)")
    a = ap.parse_args(argv)

    size = a.weights.stat().st_size
    if size > a.max_bytes:
        raise SystemExit(f"{a.weights} is {size:,} bytes, over the {a.max_bytes:,}-byte limit: export it as int8")
    info = weights.inspect_checkpoint(a.weights)
    model_id, version = info["model_id"], info["version"]
    file_sha = weights.file_sha256(a.weights)
    storage = storage_of(a.weights)
    counts, cfg = parameter_counts(a.weights)
    provenance = info["provenance"] or {}
    recipe = provenance.get("recipe", {})
    steps_done = provenance.get("steps_done")

    cases = training_cases(a.manifest, (recipe.get("extra") or {}).get("cases"))
    terms = source_terms(a.data_readme or a.manifest.parent / "README.md")
    table, totals = data_table(cases, terms)
    n_vol, n_tgt = len(cases), sum(t for _, t in totals.values())
    train_names = {name for c in cases for name in c["labels"].values()}
    names = ", ".join(SOURCE_NAMES.get(s, s).split(" (")[0] for s in sorted(totals))

    doc = _json(a.eval)
    res = None
    if doc is not None:
        check_eval_is_of(doc, str(info["sha256"]), a.float16_method)
        res = Results(doc, a.float16_method)
    bench = _json(a.bench)
    demo, demo_k = demo_dice(a.demo)

    reg = json.loads(a.registry.read_text())
    rel = a.weights.resolve().relative_to(a.registry.resolve().parent).as_posix()
    head = " + full-resolution mask head (128³ logits)" if "fullres_head" in counts else ""
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
            f"Built-in default model: mais-small (SAM-Med3D layout, 4-block encoder) + MAIS memory attention{head}, "
            f"trained on CPU (from scratch, then fine-tuned with the head); weights stored as {storage}. Dice per "
            f"source and structure family on the test split in its model card: models/{model_id}.md"
        ),
        "trained_on": f"train split of the project's shared data: {names} ({n_vol} volumes, {n_tgt} targets)",
    }
    reg["models"] = [m for m in reg["models"] if m["id"] != model_id] + [entry]
    reg["default"] = model_id

    out = a.weights.parent / f"{model_id}.md"
    facts = training_facts(a.log, int(recipe.get("batch_size", 2)))
    if not a.log.exists():
        facts = recorded_training_facts(out, file_sha) or facts
    card = a.template.read_text()
    for key, value in {
        "@VERSION@": str(version),
        "@STORAGE@": storage_text(storage),
        "@SIZE@": f"{size:,} bytes ({size / 1e6:.1f} MB)",
        "@FILE_SHA@": file_sha,
        "@WEIGHTS_SHA@": str(info["sha256"]),
        "@ARCHITECTURE@": architecture_text(info["preset"], cfg),
        "@PARAMETERS@": parameters_text(counts),
        "@DATA_SUMMARY@": f"{n_vol} volumes, {n_tgt} targets",
        "@DATA_TABLE@": table,
        "@DATA_NOTES@": data_notes(cases, totals, recipe),
        "@STAGE1_DATA@": f"{STAGE1['volumes']} volumes, {STAGE1['targets']} targets",
        "@STAGE1_FACTS@": STAGE1["facts"],
        "@STAGE3@": STAGE3,
        "@STAGE4@": stage4_text(recipe, steps_done),
        "@TRAINING_FACTS@": facts,
        "@EVAL@": eval_section(res, storage, _json(a.precision), a.eval_note)
        + copy_figure(a.eval, a.weights.parent / f"{model_id}_test_split.png"),
        "@TARGETS@": targets_section(res, demo, demo_k, bench),
        "@LATENCY@": latency_section(bench),
        "@FEWSHOT@": fewshot_section(a.fewshot)
        + fewshot_figure(a.fewshot, a.weights.parent / f"{model_id}_fewshot.png"),
        "@LIMITATIONS@": limitations(
            res, counts, recipe, steps_done, storage, n_tgt, train_names, a.fewshot is not None and a.fewshot.exists()
        ),
    }.items():
        card = card.replace(key, value)
    left = sorted(set(re.findall(r"@[A-Z0-9_]+@", card)))
    if left:
        raise SystemExit(f"{a.template}: placeholders without a value: {', '.join(left)}")
    atomic_write_text(a.registry, json.dumps(reg, indent=1) + "\n")
    atomic_write_text(out, card)
    print(f"registered {model_id} {version} ({size:,} bytes, sha256 {file_sha[:12]}...) as default; card {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
