"""``mais train`` / ``mais finetune`` / ``mais evaluate`` end to end on a small synthetic manifest."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.io import write_volume
from MAISSegmentLib.volume import Volume
from test_cli import mais
from test_session import affine, rotation


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Three cases (two train, one test): a bright sphere (label 1) and a darker box (label 2) in noise."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    cases = []
    for n, split in enumerate(["train", "train", "test"]):
        m = affine((1.5, 1.7, 2.0), (-50.0, -55.0, -40.0), rotation((0, 0, 1), 10 * n))
        k, j, i = np.indices((40, 60, 64))
        ras = np.stack([i, j, k, np.ones_like(i)], -1) @ m.T
        sphere = np.linalg.norm(ras[..., :3] - [5.0 * n, 0, 0], axis=-1) < 14
        box = (np.abs(ras[..., 0] + 25) < 8) & (np.abs(ras[..., 1] - 20) < 8) & (np.abs(ras[..., 2]) < 10)
        label = np.where(sphere, 1, np.where(box, 2, 0)).astype(np.uint8)
        image = (100 + 300 * sphere + 150 * box + rng.normal(0, 20, sphere.shape)).astype(np.int16)
        write_volume(Volume(image, m), d / f"c{n}_img.nii.gz")
        write_volume(Volume(label, m), d / f"c{n}_lab.nii.gz")
        cases.append(
            {
                "id": f"synth__c{n}",
                "source": "synth",
                "patient": f"p{n}",
                "modality": "CT",
                "body_region": "phantom",
                "split": split,
                "image": f"c{n}_img.nii.gz",
                "label": f"c{n}_lab.nii.gz",
                "labels": {"1": "Sphere", "2": "Box"},
                "license": "CC0",
            }
        )
    (d / "manifest.json").write_text(json.dumps({"version": 1, "description": "synthetic", "cases": cases}))
    return d / "manifest.json"


def test_finetune_then_evaluate_all_methods(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("MAIS_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    proc = mais(
        "finetune",
        "--manifest",
        str(manifest),
        "--checkpoint",
        str(TINY / "ref_tiny.pth"),
        "--structures",
        "sphere",
        "--cases",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--episode-clicks",
        "3",
        "--tbptt",
        "3",
        "--memory-size",
        "4",
        "--out",
        str(run),
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 targets" not in proc.stderr and "1 targets in 1 cases" in proc.stderr
    model = build_model(None, checkpoint=run / "model.pth")
    prov = model.load_report.provenance
    assert prov["recipe"]["mode"] == "finetune" and prov["recipe"]["extra"]["cases"] == ["synth__c0"]
    assert model.load_report.memory_attention == "loaded"
    assert (run / "log.csv").read_text().count("\n") == 3
    out = tmp_path / "eval" / "results.json"
    proc = mais(
        "evaluate",
        "--manifest",
        str(manifest),
        "--split",
        "test",
        "--checkpoint",
        str(run / "model.pth"),
        "--methods",
        f"mais,no-memory,mais-grow-all,growcut,ckpt:{TINY / 'ref_tiny.pth'}",
        "--clicks",
        "1,3",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["version"] == 1 and doc["clicks"] == [1, 3] and doc["seed"] == 0
    assert doc["data"] == {"manifest": str(manifest), "split": "test", "n_cases": 1, "n_targets": 2, "n_skipped": 0}
    assert list(doc["methods"]) == ["mais", "no-memory", "mais-grow-all", "growcut", f"ckpt:{TINY / 'ref_tiny.pth'}"]
    for res in doc["methods"].values():
        assert set(res) >= {"model", "dice_mean", "dice_median", "seconds_per_click_median", "targets"}
        assert set(res["dice_mean"]) == {"1", "3"} and all(0 <= v <= 1 for v in res["dice_mean"].values())
        assert [t["name"] for t in res["targets"]] == ["Sphere", "Box"]
    assert doc["methods"]["mais"]["model"]["memory"] and not doc["methods"]["no-memory"]["model"]["memory"]
    grow_all = doc["methods"]["mais-grow-all"]["model"]
    assert grow_all["memory"] and not grow_all["grow_connected"] and doc["methods"]["mais"]["model"]["grow_connected"]
    assert doc["methods"]["mais"]["model"]["sha256"] == model.load_report.sha256
    assert doc["methods"]["growcut"]["dice_mean"]["3"] > 0.5  # Grow from seeds finds the sphere and the box
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_resume_and_bad_arguments(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("MAIS_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "train",
        "--manifest",
        str(manifest),
        "--preset",
        "sam-med3d-tiny",
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--episode-clicks",
        "2",
        "--tbptt",
        "2",
        "--checkpoint-every",
        "1",
        "--out",
        str(tmp_path / "r"),
        "--device",
        "cpu",
    ]
    proc = mais(*args, "--time-limit", "0")
    assert proc.returncode == 0 and "continue with --resume" in proc.stderr
    proc = mais(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed at step 0" in proc.stderr and (tmp_path / "r" / "model.pth").exists()
    no_default = tmp_path / "models.json"  # a registry without a default model: the model must be named
    no_default.write_text('{"version": 1, "default": null, "models": []}')
    os.environ["MAIS_MODELS_JSON"] = str(no_default)
    try:
        bad = mais("evaluate", "--manifest", str(manifest), "--methods", "mais", "--out", str(tmp_path / "x.json"))
    finally:
        del os.environ["MAIS_MODELS_JSON"]
    assert bad.returncode == 2 and "needs --checkpoint" in bad.stderr
    bad = mais("evaluate", "--manifest", str(manifest), "--methods", "magic", "--out", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "unknown method" in bad.stderr
    bad = mais("train", "--manifest", str(tmp_path / "none.json"), "--out", str(tmp_path / "y"))
    assert bad.returncode == 2 and "mais: error:" in bad.stderr and "Traceback" not in bad.stderr


def test_fewshot_experiment(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("MAIS_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "fs"
    proc = mais(
        "fewshot",
        "--checkpoint",
        str(TINY / "ref_tiny.pth"),
        "--manifest",
        str(manifest),
        "--structures",
        "sphere",
        "--cases",
        "1,2",
        "--steps",
        "1",
        "--episode-clicks",
        "2",
        "--clicks",
        "1,2",
        "--out",
        str(out),
        "--loss-size",
        "32",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "fewshot.json").read_text())
    assert list(doc["methods"]) == ["base", "finetuned-1", "finetuned-2"]
    assert doc["fewshot"]["train_cases"] == {"1": ["synth__c0"], "2": ["synth__c0", "synth__c1"]}
    assert doc["data"]["n_targets"] == 1 and (out / "fewshot.png").exists()
    # SAM-Med3D weights have no memory attention: it is trained from scratch at the paper's 8e-4
    assert doc["fewshot"]["lr_memory"] == 8e-4 and doc["fewshot"]["lr_prompt_decoder"] == 8e-5
    assert doc["fewshot"]["loss_size"] == 32
    assert doc["fewshot"]["mode"] == "finetune" and doc["fewshot"]["lr_encoder"] is None
    # --lr-encoder: the encoder trains too (frozen by default: the k=1 model keeps the base encoder exactly)
    enc = out.parent / "fs_enc"
    proc = mais(
        "fewshot", "--checkpoint", str(TINY / "ref_tiny.pth"), "--manifest", str(manifest), "--structures", "sphere",
        "--cases", "1", "--steps", "1", "--episode-clicks", "2", "--clicks", "1", "--out", str(enc),
        "--loss-size", "32", "--lr-encoder", "1e-4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    fs = json.loads((enc / "fewshot.json").read_text())["fewshot"]
    assert fs["mode"] == "train" and fs["lr_encoder"] == 1e-4
    base = build_model(None, checkpoint=TINY / "ref_tiny.pth").image_encoder.state_dict()
    frozen = build_model(None, checkpoint=out / "k1" / "model.pth").image_encoder.state_dict()
    trained = build_model(None, checkpoint=enc / "k1" / "model.pth").image_encoder.state_dict()
    assert all(torch.equal(base[k], frozen[k]) for k in base)
    assert not all(torch.equal(base[k], trained[k]) for k in base)
    bad = mais(
        "fewshot",
        "--checkpoint",
        str(TINY / "ref_tiny.pth"),
        "--manifest",
        str(manifest),
        "--structures",
        "sphere",
        "--cases",
        "5",
        "--out",
        str(out.parent / "fs_bad"),
    )
    assert bad.returncode == 2 and "only 2 training cases" in bad.stderr


def test_evaluate_oracles_print_dice_per_source_and_family(manifest, tmp_path):
    """``oracle-N`` needs no model; the printed tables and the JSON give mean Dice per source and per family."""
    out = tmp_path / "oracle.json"
    methods = "oracle-32,oracle-64,oracle-128"
    proc = mais("evaluate", "--manifest", str(manifest), "--methods", methods, "--clicks", "1,5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert list(doc["methods"]) == methods.split(",") and doc["data"]["n_targets"] == 6
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["source", "targets", "method", "Dice@1", "Dice@5"] in rows
    assert ["family", "targets", "method", "Dice@1", "Dice@5"] in rows
    for name, res in doc["methods"].items():
        assert res["model"] == {
            "id": name,
            "sha256": None,
            "memory": False,
            "memory_size": 0,
            "output_grid": int(name[7:]),
        }
        synth = res["by_source"]["synth"]
        assert list(res["by_source"]) == ["synth"] and synth["n_targets"] == 6
        assert synth["dice_mean"] == res["dice_mean"] and res["dice_mean"]["1"] == res["dice_mean"]["5"]
        assert res["by_family"] == {"other": synth}  # "Sphere" and "Box" are no anatomy
        assert {t["source"] for t in res["targets"]} == {"synth"} and {t["family"] for t in res["targets"]} == {"other"}
        assert ["synth", "6", name, f"{synth['dice_mean']['1']:.3f}", f"{synth['dice_mean']['5']:.3f}"] in rows
    dice1 = [doc["methods"][m]["dice_mean"]["1"] for m in methods.split(",")]
    assert 0.8 < dice1[0] <= dice1[1] <= dice1[2]  # a 14 mm sphere and a 16 x 16 x 20 mm box
