"""Training loop: the paper's parameter groups, episodes, resume, CSV log, and 2-process DDP (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.synthetic_training import ddp_config, first_gradients, sphere_sample, tiny_config

from conftest import TESTING, TINY
from MAISSegmentLib import build_model
from MAISSegmentLib.errors import ConfigError
from MAISSegmentLib.train import LR_MEMORY_FRESH, param_groups, resolve_lr_memory, run_episode, simulate_click, train


def test_finetune_freezes_encoder_and_trains_prompt_decoder_memory():
    cfg = tiny_config()
    model = build_model("sam-med3d-tiny").train()
    groups = {g["name"]: g["lr"] for g in param_groups(model, cfg)}
    assert groups == {"prompt+decoder": 8e-5, "memory": 8e-4}
    stats = run_episode(model, sphere_sample(0), cfg, torch.Generator().manual_seed(0))
    assert 0 <= stats["loss"] <= 1 and 0 <= stats["dice"] <= 1
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mask_decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.memory_attention.parameters())
    train_cfg = tiny_config(mode="train")
    assert "encoder" in {g["name"] for g in param_groups(build_model("sam-med3d-tiny"), train_cfg)}


@pytest.mark.parametrize(("mode", "loss_size", "cpu_bf16"), [("train", 128, False), ("finetune", 32, True)])
def test_long_backprop_window_through_the_memory(mode, loss_size, cpu_bf16):
    """A window spanning several memory-conditioned clicks (needs the functional memory path); also the
    CPU recipe's options (low-resolution loss, bf16 autocast)."""
    cfg = tiny_config(mode=mode, episode_clicks=5, tbptt=5, loss_size=loss_size, cpu_bf16=cpu_bf16)
    model = build_model("sam-med3d-tiny").train()
    param_groups(model, cfg)
    run_episode(model, sphere_sample(1), cfg, torch.Generator().manual_seed(1))
    mem_grads = [p.grad for p in model.memory_attention.parameters()]
    assert all(g is not None for g in mem_grads) and sum(g.abs().sum() for g in mem_grads) > 0
    enc_has_grad = any(p.grad is not None for p in model.image_encoder.parameters())
    assert enc_has_grad == (mode == "train")


def test_memory_lr_is_the_papers_when_fresh_and_the_decoders_when_already_trained(tmp_path):
    """8e-4 is for a memory attention trained from scratch (on SAM-Med3D weights); a MAISSegment checkpoint's trained
    memory is fine-tuned at the prompt encoder/decoder rate, and an explicit value always wins."""
    cfg = tiny_config(lr_memory=None)
    sam = build_model(None, checkpoint=TINY / "ref_tiny.pth")  # SAM-Med3D weights: no memory attention in the file
    assert sam.load_report.memory_attention == "fresh"
    assert resolve_lr_memory(cfg, sam).lr_memory == LR_MEMORY_FRESH == 8e-4
    train(tiny_config(steps=1), sphere_sample, tmp_path / "base", progress=False, log=lambda s: None)
    base = tmp_path / "base" / "model.pth"
    mais = build_model(None, checkpoint=base)
    assert mais.load_report.memory_attention == "loaded"
    assert resolve_lr_memory(cfg, mais).lr_memory == cfg.lr_prompt_decoder
    assert resolve_lr_memory(tiny_config(lr_memory=3e-4), mais).lr_memory == 3e-4
    messages = []
    tuned = train(
        tiny_config(steps=1, lr_memory=None, preset=None, init_checkpoint=str(base)),
        sphere_sample,
        tmp_path / "ft",
        progress=False,
        log=messages.append,
    )
    assert "memory attention loaded: lr 8e-05" in messages
    again = build_model(None, checkpoint=tmp_path / "ft" / "model.pth")
    assert again.load_report.provenance["recipe"]["lr_memory"] == 8e-5
    assert tuned.load_report.memory_attention == "loaded"


def test_simulated_clicks_follow_the_error_region():
    target = torch.zeros(8, 8, 8, dtype=torch.bool)
    target[2:5, 2:5, 2:5] = True
    gen = torch.Generator().manual_seed(0)
    p, lab = simulate_click(target, None, gen)
    assert target[tuple(p.long())] and lab == 1
    pred = target.clone()
    pred[6, 6, 6] = True  # one false positive, nothing missed
    p, lab = simulate_click(target, pred, gen)
    assert tuple(p.long().tolist()) == (6, 6, 6) and lab == 0


def test_resume_equals_uninterrupted(tmp_path):
    straight = train(tiny_config(steps=4), sphere_sample, tmp_path / "a", progress=False, log=lambda s: None)
    # interrupted after 3 steps (between checkpoints), then resumed to 4
    train(tiny_config(steps=4), sphere_sample, tmp_path / "c", progress=False, log=lambda s: None, stop_at_step=3)
    resumed = train(
        tiny_config(steps=4), sphere_sample, tmp_path / "c", resume=True, progress=False, log=lambda s: None
    )
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    log = (tmp_path / "a" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,last_click_dice,lr") and len(log) == 5
    again = build_model(None, checkpoint=tmp_path / "a" / "model.pth")
    assert again.load_report.provenance["recipe"]["mode"] == "finetune"


def test_two_process_gloo_matches_single_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) on a global batch of 2 == one process on the same 2 episodes.

    Checked where DDP makes its promise: the averaged gradients equal the single process's accumulated
    ones, and the two ranks stay bit-identical. (After Adam the weights agree to ~1e-4 only: Adam divides
    near-zero gradients by their own magnitude, so summation-order noise there becomes lr-sized steps.)
    """
    torch.set_num_threads(1)
    grads: dict = {}
    single = train(
        ddp_config(),
        sphere_sample,
        tmp_path / "single",
        progress=False,
        log=lambda s: None,
        on_step=first_gradients(grads),
    )
    env = {**os.environ, "PYTHONPATH": f"{TESTING.parent}{os.pathsep}{TESTING}", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        str(TESTING / "helpers" / "synthetic_training.py"),
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    assert set(r0["grads"]) == set(grads) and grads
    for k, g in grads.items():
        assert torch.allclose(r0["grads"][k], g, rtol=1e-4, atol=1e-7), k
    for k, w in r0["weights"].items():
        assert torch.equal(w, r1["weights"][k]), k  # the ranks stay in sync
        assert torch.allclose(w, single.state_dict()[k], atol=5e-4), k
    ddp = build_model(None, checkpoint=tmp_path / "ddp" / "model.pth")
    assert all(torch.equal(a, r0["weights"][k]) for k, a in ddp.state_dict().items())


def test_several_targets_of_a_crop_share_one_encoder_pass():
    import numpy as np

    from MAISSegmentLib.train import crop_sample

    rng = np.random.default_rng(0)
    label = np.zeros((128, 128, 128), np.uint8)
    label[40:70, 40:70, 40:70] = 1
    label[80:100, 50:70, 50:70] = 2
    label[5:7, 5:7, 5:7] = 3  # too small to be an extra target
    image = (label * 100 + rng.normal(0, 10, label.shape)).astype(np.float32)
    sample = crop_sample(image, label, 1, rng, others=3)
    assert len(sample.others) == 1 and sample.others[0].sum() == 20 * 20 * 20
    cfg = tiny_config(mode="train", episode_clicks=3, tbptt=2, targets_per_crop=2)
    model = build_model("sam-med3d-tiny").train()
    param_groups(model, cfg)
    calls = []
    model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    stats = run_episode(model, sample, cfg, torch.Generator().manual_seed(0))
    assert len(calls) == 1 and 0 <= stats["dice"] <= 1
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_encoder.parameters())


def test_learning_rate_schedule():
    from MAISSegmentLib.train import lr_factor

    paper = tiny_config(steps=200)
    assert [lr_factor(paper, s) for s in (0, 128, 129, 179, 180)] == [1.0, 1.0, 0.1, 0.1, pytest.approx(0.01)]
    warm = tiny_config(steps=200, warmup_steps=10)
    assert lr_factor(warm, 0) == 0.1 and lr_factor(warm, 4) == 0.5 and lr_factor(warm, 9) == 1.0


def test_resume_after_a_crash_between_checkpoints_logs_each_step_once(tmp_path):
    cfg = tiny_config(steps=2, checkpoint_every=2, batch_size=1)
    train(cfg, sphere_sample, tmp_path / "r", progress=False, log=lambda s: None, stop_at_step=1)  # checkpoint: 1
    log = tmp_path / "r" / "log.csv"
    first = log.read_text().splitlines()[1]
    with open(log, "a") as fh:  # what a crash after the checkpoint leaves: a logged step 2 and half a step 3
        fh.write("2" + first[1:] + "\r\n3,0.4")
    messages = []
    train(cfg, sphere_sample, tmp_path / "r", resume=True, progress=False, log=messages.append)
    rows = log.read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"] and rows[1] == first
    assert any("dropped 2 row(s) after step 1" in m for m in messages)


def test_a_folder_with_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "log.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(ConfigError, match=r"already holds a run \(log\.csv\); continue it with --resume"):
        train(tiny_config(steps=1), sphere_sample, run, progress=False, log=lambda s: None)
    assert sorted(p.name for p in run.iterdir()) == ["log.csv"]
    messages = []
    train(tiny_config(steps=1), sphere_sample, run, progress=False, log=messages.append, overwrite=True)
    (backup,) = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert (backup / "log.csv").read_text() == "step,loss\n1,0.5\n"  # the old run is kept, not deleted
    assert (run / "model.pth").is_file() and (run / "log.csv").read_text().count("\n") == 2
    assert any(str(backup) in m for m in messages)
