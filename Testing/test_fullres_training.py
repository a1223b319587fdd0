"""Training the full-resolution head (issue 12): `mais train/finetune --fullres` adds a fresh head and trains it,
and the head learns a thin structure beyond what any 32^3 output can represent."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from helpers.synthetic_training import sphere_sample, tiny_config

from MAISSegmentLib import build_model
from MAISSegmentLib.checkpoint import build_model as load
from MAISSegmentLib.model.fullres_head import FULLRES_PREFIX
from MAISSegmentLib.train import dice_loss, param_groups, train


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(2 * (pred & target).sum() / max(1, int(pred.sum() + target.sum())))


def test_training_with_fullres_adds_a_fresh_head_and_trains_it(tmp_path):
    """From a checkpoint without the head: the run adds one (every other weight kept), gives it its own learning
    rate (fresh: 8e-4), updates it, and writes it into the checkpoints."""
    base = build_model("sam-med3d-tiny")
    start = tmp_path / "base.pth"
    from MAISSegmentLib.checkpoint import save_checkpoint

    save_checkpoint(base, start, "base", "1")
    cfg = tiny_config(steps=2, init_checkpoint=str(start), fullres=True, checkpoint_every=2)
    model = train(cfg, sphere_sample, tmp_path / "run", progress=False, log=lambda s: None)
    assert model.has_fullres
    groups = {g["name"]: g["lr"] for g in param_groups(model, cfg.__class__(**{**cfg.__dict__}))}
    assert "fullres" in groups
    saved = load(None, checkpoint=tmp_path / "run" / "model.pth")
    assert saved.load_report.fullres_head == "loaded"
    fresh = base.with_fullres_head()
    moved = [
        k
        for k, v in saved.state_dict().items()
        if k.startswith(FULLRES_PREFIX) and not torch.equal(v, fresh.state_dict()[k])
    ]
    assert moved, "the head was not trained"
    assert saved.load_report.provenance["recipe"]["lr_fullres"] == 8e-4


def test_the_head_learns_a_thin_slab_beyond_the_32_grid_ceiling():
    """A 2-voxel (3 mm) slab across a boundary of the 32^3 grid's cells: the best any 32^3 output can do (the true
    mask area-averaged onto 32^3, upsampled, thresholded) misses it entirely; the head, trained on the image alone
    for a few steps (decoder frozen), finds it."""
    torch.manual_seed(0)
    model = build_model("sam-med3d-tiny").with_fullres_head().train()
    head = model.fullres_head
    size = 128
    target = torch.zeros(size, size, size, dtype=torch.bool)
    target[:, :, 63:65] = True  # a slab 2 ROI voxels thick, half in each of two 4-voxel cells
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(0, 0.3, (size,) * 3).astype(np.float32))
    image[target] += 2.0
    image = image[None, None]
    coarse = F.adaptive_avg_pool3d(target[None, None].float(), 32)
    ceiling = dice(F.interpolate(coarse, size=(size,) * 3, mode="trilinear")[0, 0] > 0.5, target)
    with torch.no_grad():
        embedding = model.encode_image(image)
        points = torch.tensor([[[64.0, 64.0, 62.0]]])
        labels = torch.tensor([[1.0]])
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(15):
        optimiser.zero_grad()
        out = model.step(embedding, points, labels, features=model.encode_fullres(image))
        dice_loss(out.full_res_logits, target).backward()
        optimiser.step()
    with torch.no_grad():
        out = model.step(embedding, points, labels, features=model.encode_fullres(image))
    learned = dice(out.full_res_logits[0, 0] > 0, target)
    assert ceiling < 0.1 and learned > 0.6, (ceiling, learned)
