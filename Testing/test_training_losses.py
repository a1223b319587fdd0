"""Training options that let a click correct a confident mistake (issue 12): cross-entropy next to the Dice loss,
centre-of-error training clicks (the evaluation robot's), and a loss at the clicked voxels themselves."""

from __future__ import annotations

import pytest
import torch
from helpers.synthetic_training import sphere_sample, tiny_config

from MAISSegmentLib import build_model
from MAISSegmentLib.errors import ConfigError
from MAISSegmentLib.train import click_loss, dice_loss, param_groups, run_episode, segmentation_loss, simulate_click


def _ball(size: int, centre: tuple[int, int, int], radius: float) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*(torch.arange(size),) * 3, indexing="ij")).float()
    return ((grid - torch.tensor(centre).float()[:, None, None, None]) ** 2).sum(0) <= radius**2


def test_dice_alone_leaves_a_confidently_wrong_voxel_without_gradient_cross_entropy_does_not():
    """The reason for --ce-weight: a voxel at logit +100 that should be background gets no Dice gradient."""
    target = _ball(16, (8, 8, 8), 4)
    logits = torch.where(target, 100.0, -100.0)[None, None]
    logits[0, 0, 1, 1, 1] = 100.0  # a confident false positive (an exclude click would sit here)
    for weight, expect_gradient in ((0.0, False), (1.0, True)):
        x = logits.clone().requires_grad_(True)
        segmentation_loss(x, target, weight).backward()
        assert (abs(float(x.grad[0, 0, 1, 1, 1])) > 1e-6) == expect_gradient
    assert float(segmentation_loss(logits, target, 0.0)) == pytest.approx(float(dice_loss(logits, target)))


def test_segmentation_loss_accepts_a_soft_target_and_is_lowest_at_the_truth():
    soft = torch.rand(8, 8, 8)
    good = torch.logit(soft.clamp(0.01, 0.99))[None, None]
    assert float(segmentation_loss(good, soft, 1.0)) < float(segmentation_loss(-good, soft, 1.0))


def test_click_loss_reads_the_clicked_voxels_on_the_logits_grid():
    logits = torch.full((1, 1, 32, 32, 32), -5.0)
    logits[0, 0, 10, 20, 30] = 5.0  # ROI voxel (41, 82, 121) of a 128^3 crop falls in 32^3 cell (10, 20, 30)
    points = [torch.tensor([41.0, 82.0, 121.0]), torch.tensor([2.0, 3.0, 4.0])]
    agree = float(click_loss(logits, points, [1.0, 0.0], 128))
    disagree = float(click_loss(logits, points, [0.0, 1.0], 128))
    assert agree < 0.01 and disagree > 4.9
    full = torch.full((1, 1, 128, 128, 128), -5.0)
    full[0, 0, 41, 82, 121] = 5.0
    assert float(click_loss(full, points, [1.0, 0.0], 128)) == pytest.approx(agree)


def test_centre_clicks_go_to_the_middle_of_the_largest_wrong_blob():
    target = _ball(48, (24, 24, 24), 8)
    pred = target | _ball(48, (8, 8, 38), 5)  # a false-positive blob ...
    pred &= ~_ball(48, (24, 24, 30), 2)  # ... larger than this hole
    point, label = simulate_click(target, pred, torch.Generator().manual_seed(0), center_prob=1.0)
    assert tuple(point.long().tolist()) == (8, 8, 38) and label == 0
    # uniform clicks (the default) land anywhere in the error, mostly not at the centre
    gen = torch.Generator().manual_seed(0)
    clicks = {tuple(simulate_click(target, pred, gen)[0].long().tolist()) for _ in range(20)}
    assert len(clicks) > 10


def test_centre_click_option_off_draws_exactly_as_before():
    """center_prob 0 makes no extra random draw: earlier runs' click sequences replay unchanged."""
    target = _ball(24, (12, 12, 12), 5)
    pred = _ball(24, (13, 12, 12), 5)
    a = [simulate_click(target, pred, g)[0] for g in [torch.Generator().manual_seed(3)] * 5]
    b = [simulate_click(target, pred, g, center_prob=0.0)[0] for g in [torch.Generator().manual_seed(3)] * 5]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_an_episode_with_all_three_options_trains_the_decoder():
    cfg = tiny_config(ce_weight=1.0, center_click_prob=0.5, click_loss_weight=0.2, loss_size=32)
    model = build_model("sam-med3d-tiny").train()
    param_groups(model, cfg)
    stats = run_episode(model, sphere_sample(2), cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["loss"] > 0
    grads = [p.grad for p in model.mask_decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("ce_weight", -1.0, "--ce-weight"),
        ("click_loss_weight", float("nan"), "--click-loss-weight"),
        ("center_click_prob", 1.5, "--center-click-prob"),
    ],
)
def test_bad_loss_options_are_refused_by_name(field, value, option):
    with pytest.raises(ConfigError, match=option):
        tiny_config(**{field: value})


def test_fine_tuning_keeps_the_loss_options_the_starting_model_was_trained_with(tmp_path):
    """A model trained with cross-entropy is fine-tuned with it (``mais finetune``, Learn from my cases) unless the
    options are given; a model without them (SAM-Med3D, older MAISSegment files) gets Dice alone."""
    from MAISSegmentLib.train import resolve_loss_options, train

    sam = build_model("sam-med3d-tiny")
    assert {k: getattr(resolve_loss_options(tiny_config(), sam), k) for k in LOSS} == dict.fromkeys(LOSS, 0.0)
    trained = tiny_config(steps=1, ce_weight=1.0, center_click_prob=0.5, click_loss_weight=0.2)
    train(trained, sphere_sample, tmp_path / "base", progress=False, log=lambda s: None)
    base = tmp_path / "base" / "model.pth"
    tuned = tiny_config(steps=1, preset=None, init_checkpoint=str(base), click_loss_weight=0.0)
    train(tuned, sphere_sample, tmp_path / "ft", progress=False, log=lambda s: None)
    recipe = build_model(None, checkpoint=tmp_path / "ft" / "model.pth").load_report.provenance["recipe"]
    assert (recipe["ce_weight"], recipe["center_click_prob"], recipe["click_loss_weight"]) == (1.0, 0.5, 0.0)


LOSS = ("ce_weight", "center_click_prob", "click_loss_weight")
