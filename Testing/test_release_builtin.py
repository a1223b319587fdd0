"""The built-in model's release tooling: ``scripts/register_builtin_model.py`` writes a complete, honest card and
registry entry from the release run's files, and ``scripts/release_builtin_model.sh`` runs the commands the card
describes. On a tiny fake checkpoint, a result file in ``mais evaluate``'s format and a fake log, into a temporary
copy of the registry (the real ``Resources/models.json`` and card are never touched)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from MAISSegmentLib.checkpoint import build_model, export_release, save_checkpoint
from MAISSegmentLib.evaluate import group_means, result_document, structure_family
from test_builtin_model import repeated_sentences
from test_cli import REPO

CLICKS = [1, 5, 10, 20]
MAIS = {"1": 0.50, "5": 0.70, "10": 0.75, "20": 0.80}  # the fake evaluation's Dice of every target, per method
NO_MEMORY = {"1": 0.50, "5": 0.55, "10": 0.56, "20": 0.57}
ZOOM = {"1": 0.48, "5": 0.66, "10": 0.70, "20": 0.74}
HALF = {"1": 0.51, "5": 0.70, "10": 0.74, "20": 0.79}
HALF_METHOD = "ckpt:runs/release/mais-small-shared-float16.pth"
# structures of the fake test split per source, as many as the real split has targets there
TEST_NAMES = {
    "acdc_3dcardiac": ["RV", "Myo", "LV"] * 2,
    "brats2013_deepmedic": ["Necrosis", "Edema", "NonEnhancingTumor", "EnhancingTumor"] * 2,
    "deeplesion_medsam2": ["Lesion"],
    "ibsi_sts": ["GTV_Mass"] * 2,
    "la2018_uamt": ["LeftAtrium"],
    "openkbp_han_ct": ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible"] * 2,
    "pyradiomics": ["LungTumor"],
    "totalsegmentator": ["liver", "spleen", "kidney_left", "aorta"] + [f"rib_left_{i}" for i in range(1, 51)],
}


def _register():
    spec = importlib.util.spec_from_file_location("register_builtin_model", REPO / "scripts/register_builtin_model.py")
    reg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reg)
    return reg


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _method(model: dict, dice: dict[str, float]) -> dict:
    targets = [
        {
            "case": f"{src}__case{i % 2}",
            "label": i + 1,
            "name": name,
            "source": src,
            "family": structure_family(name),
            "dice": dict(dice),
        }
        for src, names in TEST_NAMES.items()
        for i, name in enumerate(names)
    ]
    return {
        "model": model,
        "dice_mean": dict(dice),
        "dice_median": dict(dice),
        "seconds_per_click_median": 0.05,
        "by_source": group_means(targets, CLICKS, "source"),
        "by_family": group_means(targets, CLICKS, "family"),
        "targets": targets,
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny int8 release file with a stage-3 recipe, its log, manifest, data README and evaluation."""
    tmp = tmp_path_factory.mktemp("release")
    resources = tmp / "Resources"
    (resources / "models").mkdir(parents=True)
    shutil.copy(REPO / "Resources/models.json", resources / "models.json")
    data = tmp / "data"
    data.mkdir()
    cases = [
        {"id": f"btcv_vlalignseg__img{i:04d}", "source": "btcv_vlalignseg", "modality": "CT", "split": "train",
         "labels": {"1": "spleen", "6": "liver"} if i else {"1": "spleen"}}
        for i in range(3)
    ] + [
        {"id": f"openkbp_han_ct__pt_{i}", "source": "openkbp_han_ct", "modality": "CT", "split": "train",
         "labels": {"1": "Brainstem", "7": "Mandible"}}
        for i in range(2)
    ] + [{"id": "openkbp_han_ct__pt_99", "source": "openkbp_han_ct", "modality": "CT", "split": "test",
          "labels": {"1": "Brainstem"}}]  # fmt: skip
    (data / "manifest.json").write_text(json.dumps({"version": 1, "cases": cases}))
    (data / "README.md").write_text(
        "## Provenance per source\n| source | origin | data terms | labels |\n|---|---|---|---|\n"
        "| btcv_vlalignseg | github x | **CC BY 4.0 (verify)** | 13 organs |\n"
        "| openkbp_han_ct | github y | MIT; TCIA terms | 7 OARs |\n\n## Caveats\n"
    )
    model = build_model("sam-med3d-tiny").with_fullres_head()
    recipe = {
        "mode": "finetune", "preset": None, "init_checkpoint": "runs/pilot-fullres-250.pth", "steps": 40,
        "batch_size": 2, "episode_clicks": 8, "tbptt": 4, "memory_size": 60, "lr_encoder": 8e-5,
        "lr_prompt_decoder": 8e-5, "lr_memory": 8e-5, "fullres": True, "lr_fullres": 3e-4,
        "low_res_loss_weight": 0.5, "weight_decay": 0.1, "milestones": [0.645, 0.9], "crop_size": 128,
        "loss_size": 32, "cpu_bf16": True, "synthetic_fraction": 0.15, "ct_window_prob": 0.3, "seed": 3,
        "ce_weight": 1.0, "center_click_prob": 0.5, "click_loss_weight": 0.2,
        "extra": {"cases": [c["id"] for c in cases if c["split"] == "train"]},
    }  # fmt: skip
    train = tmp / "last.pth"
    save_checkpoint(model, train, "mais-small-shared", "0.3.0", provenance={"recipe": recipe, "steps_done": 40})
    weights = resources / "models" / "mais-small-shared.pth"
    info = export_release(train, weights, dtype="int8")
    head = sum(p.numel() for p in model.fullres_head.parameters())
    log = tmp / "log.csv"
    rows = ["step,loss,last_click_dice,lr,episodes_per_s,time"]
    t = 1000.0
    for step in range(1, 41):
        t += 20.0 if step != 21 else 7200.0  # a pause between two runs before step 21
        rows.append(f"{step},{1.0 - step / 100},{step / 100},8e-05,0.1,{t}")
    log.write_text("\n".join(rows) + "\n")
    methods = {
        "mais": _method({"id": "mais-small-shared", "sha256": info["weights_sha256"], "grow_connected": True}, MAIS),
        "no-memory": _method({"id": "mais-small-shared", "sha256": info["weights_sha256"]}, NO_MEMORY),
        "mais-zoom": _method({"id": "mais-small-shared", "sha256": info["weights_sha256"], "zoom": True}, ZOOM),
        HALF_METHOD: _method({"id": "mais-small-shared", "sha256": "0" * 64}, HALF),
        "oracle-32": _method({"id": "oracle-32", "sha256": None}, dict.fromkeys(MAIS, 0.735)),
        "oracle-128": _method({"id": "oracle-128", "sha256": None}, dict.fromkeys(MAIS, 0.988)),
    }
    doc = result_document("mais evaluate --split test", "m.json", "test", 13, 87, 0, CLICKS, 0, methods, "center")
    (tmp / "test_split.json").write_text(json.dumps(doc))
    (tmp / "precision.json").write_text(
        json.dumps({"requested": "auto", "used": "bfloat16", "bf16_speedup": 4.2, "threads": 2})
    )
    (tmp / "demo.txt").write_text(
        "".join(f"click {k:2d} (+) at IJK (1, 2, 3): Dice 0.{70 + k} (0.1 s)\n" for k in range(1, 11))
    )
    (tmp / "bench.json").write_text(
        json.dumps(
            {
                "preset": "mais-small-fr",
                "click_to_mask_seconds": 0.085,
                "first_click_seconds": 1.25,
                "memory_overhead_fullres": 1.1,
                "click_seconds_fullres": 0.06,
            }
        )
    )
    return {"tmp": tmp, "weights": weights, "info": info, "head": head, "log": log, "data": data}


def _run(release, *extra: str) -> str:
    r = release
    args = [
        "--weights", str(r["weights"]), "--log", str(r["log"]), "--eval", str(r["tmp"] / "test_split.json"),
        "--precision", str(r["tmp"] / "precision.json"), "--float16-method", HALF_METHOD,
        "--manifest", str(r["data"] / "manifest.json"), "--registry", str(r["tmp"] / "Resources/models.json"),
        *extra,
    ]  # fmt: skip
    assert _register().main(args) == 0
    return (r["weights"].parent / "mais-small-shared.md").read_text(encoding="utf-8")


def test_card_and_registry_from_the_release_files(release):
    real = {p: _sha(REPO / p) for p in ("Resources/models.json", "Resources/models/mais-small-shared.md")}
    card = _run(release, "--demo", str(release["tmp"] / "demo.txt"), "--bench", str(release["tmp"] / "bench.json"))
    assert {p: _sha(REPO / p) for p in real} == real, "the real registry and card must not change"
    assert not re.findall(r"@[A-Z0-9_]+@", card)
    assert repeated_sentences(card) == []
    for heading in ("Training data", "Recipe", "Test split", "Targets", "Latency", "Few-shot", "Limitations"):
        assert re.search(rf"^## .*{heading}", card, re.M), heading
    assert "scripts/train_builtin_model.sh" in card and "scripts/train_builtin_fullres.sh" in card
    assert "scripts/release_builtin_model.sh" in card
    # the registry: the file's real SHA-256 and size, the default
    weights = release["weights"]
    reg = json.loads((release["tmp"] / "Resources/models.json").read_text())
    entry = next(m for m in reg["models"] if m["id"] == "mais-small-shared")
    assert reg["default"] == "mais-small-shared" and entry["version"] == "0.3.0"
    assert entry["sha256"] == _sha(weights) and entry["size_bytes"] == weights.stat().st_size
    assert entry["file"] == "models/mais-small-shared.pth"
    assert "5 volumes, 9 targets" in entry["trained_on"] and entry["preset"] == "sam-med3d-tiny"
    assert any(m["id"] == "sam-med3d-turbo" for m in reg["models"]), "other entries are kept"
    # the file: int8 storage, hashes, the head's parameters counted on the file
    assert _sha(weights) in card and release["info"]["weights_sha256"] in card
    assert "as int8" in card and "float32 scale per row" in card
    assert f"full-resolution head {release['head']:,}" in card
    # training data from the manifest (train cases of the recipe) with the README's terms
    assert "| 3 | CT | 5 | spleen 3; liver 2 | CC BY 4.0 (verify) |" in card
    assert "| 2 | CT | 4 | Brainstem, Mandible (2 each) | MIT; TCIA terms |" in card
    assert "[-125, 275] HU" in card and "clipped 30% of all CT crops" in card
    # the recipe: stage 3 as released in 0.2.0, stage 4 from the provenance, training facts from the log (the pause
    # left out)
    assert "Stage 2" in card and "not released" in card and "**Stage 3** (released as 0.2.0)" in card
    assert "from `runs/pilot-fullres-250.pth` (stage 3's result): 40 steps of batch 2, image encoder frozen" in card
    assert "the head at 0.0003" in card and "15% synthetic targets, 30% CT windows" in card
    assert "50% of the correction clicks at the centre of the largest error component" in card
    assert "Dice + 1 × binary cross-entropy" in card and "0.2 × cross-entropy at the clicked voxels" in card
    assert "Run as released: 40 steps (80 episodes), 0.22 h of training on the 2-core CPU, in 2 runs over 2.2 h" in card
    assert "Steps 1–20: loss 0.895, training Dice after the last click 0.105; steps 21–40: loss 0.695" in card
    # test-split tables with the given numbers, the precision used, the reference Grow from seeds labelled
    assert "| mais | 0.500 | 0.700 | 0.750 | 0.800 | 0.800 | 0.050 |" in card
    assert "| mais-zoom | 0.480 | 0.660 | 0.700 | 0.740 |" in card
    assert "| oracle-128 | 0.988 | 0.988 | 0.988 | 0.988 |" in card
    assert "| mais, float16 file | 0.510 | 0.700 | 0.740 | 0.790 |" in card
    assert "| growcut † | 0.323 | 0.351 | 0.461 | 0.569 | 0.605 |" in card
    assert "| totalsegmentator | 54 | mais | 0.500 | 0.700 | 0.750 | 0.800 |" in card
    assert "| totalsegmentator | 54 | growcut † | 0.361 | 0.396 | 0.509 | 0.633 |" in card
    assert "| bone/cartilage | 52 | 0.750 | 0.560 | 0.700 | 0.740 | 0.735 | 0.988 | – |" in card  # not the ref's 23
    assert "| heart | 7 | 0.750 | 0.560 | 0.700 | 0.740 | 0.735 | 0.988 | 0.333 |" in card  # RV, Myo, LV, atrium
    assert "not re-measured" in card and "2bd4fd1" in card and "23d7fdf" in card
    assert "`--precision auto` resolved to bfloat16 on this CPU (bfloat16 matrix products measured 4.2× as fast" in card
    # issue 12's targets, computed: margins and met / missed
    assert "| Dice@1 with memory (aim 0.60) | ≥ 0.45 | 0.500 | +0.050 | met |" in card
    assert "| Dice@10 with memory (aim 0.85) | ≥ 0.72 | 0.750 | +0.030 | met |" in card
    assert "| above Grow from seeds † at 20 clicks | ≥ +0.05 | +0.231 | +0.181 | met |" in card
    assert "| memory over no-memory at 20 clicks | ≥ +0.02 | +0.230 | +0.210 | met |" in card
    assert "| `mais demo` liver Dice after 10 clicks | ≥ 0.80 | 0.800 | +0.000 | met |" in card
    assert "| first click of a ROI (`mais bench`) | ≤ 1.0 s | 1.25 s | −0.250 | **missed** |" in card
    assert "13 of the 14 measured targets met" in card
    # limitations: int8 vs float16, zoom, anatomy seen in training; few-shot of 0.1.0 labelled
    assert "mean Dice −0.010 at 1, +0.000 at 5, +0.010 at 10, +0.010 at 20 clicks (int8 minus float16)" in card
    assert "−0.020 at 1, −0.040 at 5, −0.050 at 10, −0.060 at 20 clicks" in card
    assert (
        "2 of their 54 targets have a structure of the same name in the training data (liver, spleen), the other 52 "
        "(bone/cartilage 50, solid organ 1, vessel 1)" in card
    )
    assert "**Not re-measured for this release**" in card and "measured on **0.1.0**" in card


def test_card_without_optional_figures_says_not_measured(release):
    card = _run(release)
    assert "Not measured in this release run (`BENCH=1`" in card
    assert "| `mais demo` liver Dice after 10 clicks | ≥ 0.80 | not measured |" in card
    assert "4 not measured in this release run" in card
    assert not re.findall(r"@[A-Z0-9_]+@", card) and repeated_sentences(card) == []


def test_register_refuses_figures_of_other_weights_and_oversized_files(release, tmp_path):
    doc = json.loads((release["tmp"] / "test_split.json").read_text())
    doc["methods"]["mais"]["model"]["sha256"] = "f" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    with pytest.raises(SystemExit, match="not on the released file"):
        _run(release, "--eval", str(other))
    with pytest.raises(SystemExit, match="over the 1,000-byte limit"):
        _run(release, "--max-bytes", "1000")


def test_release_script_runs_the_documented_commands(tmp_path):
    """The shell script with a stand-in ``mais``: int8 export of the stage-4 checkpoint as 0.3.0, the test-split
    methods (Grow from seeds only with GROWCUT=1), the precision pinned to what it resolved to."""
    subprocess.run(["bash", "-n", str(REPO / "scripts/release_builtin_model.sh")], check=True)
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts/release_builtin_model.sh", tmp_path / "scripts")
    venv = tmp_path / ".venv/bin"
    venv.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    (venv / "mais").write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {calls}\n'
        'if [[ $1 == weights ]]; then while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && head -c 1000 /dev/zero > "$2"; '
        "shift; done; fi\n"
    )
    (venv / "mais").chmod(0o755)
    (venv / "python").write_text(f'#!/usr/bin/env bash\nexec {REPO / ".venv/bin/python"} "$@"\n')
    (venv / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MAIS_PRECISION"}
    env.update(STEPS="export eval", PRECISION="float32", PYTHONPATH=str(REPO))
    for growcut in ("0", "1"):
        subprocess.run(["bash", "scripts/release_builtin_model.sh"], cwd=tmp_path, check=True, capture_output=True,
                       env={**env, "GROWCUT": growcut})  # fmt: skip
    lines = calls.read_text().splitlines()
    assert lines[0].startswith(
        "weights export runs/mais-small-shared-s4/model.pth --out runs/release/mais-small-shared.pth"
    )
    assert "--dtype int8 --id mais-small-shared --version 0.3.0" in lines[0]
    assert "--dtype float16" in lines[1]
    evals = [line for line in lines if line.startswith("evaluate")]
    assert "--methods mais,no-memory,mais-zoom,ckpt:runs/release/mais-small-shared-float16.pth,oracle-32," \
           "oracle-128 " in evals[0]  # fmt: skip
    assert ",growcut," in evals[1] and "growcut" not in evals[0]
    assert all("--precision float32" in e and "--split test" in e and "--seed 0" in e for e in evals)
    assert json.loads((tmp_path / "runs/release/precision.json").read_text())["used"] == "float32"
    env["MAX_BYTES"] = "10"
    run = subprocess.run(["bash", "scripts/release_builtin_model.sh"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "STEPS": "export"})  # fmt: skip
    assert run.returncode != 0 and "over the 10-byte limit" in run.stderr
