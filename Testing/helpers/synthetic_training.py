"""Deterministic synthetic training crops and a torchrun entry point for the DDP test."""

from __future__ import annotations

import sys

import numpy as np
import torch

from MAISSegmentLib.train import Sample, TrainConfig, crop_sample, train


def sphere_sample(index: int) -> Sample:
    """A noisy 128^3 crop with a bright sphere whose centre and radius depend on ``index``."""
    rng = np.random.default_rng(index)
    size = 128
    grid = np.indices((size,) * 3, dtype=np.float32)
    centre = rng.uniform(40, 88, 3)
    radius = rng.uniform(8, 20)
    inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
    image = (inside * 200 + rng.normal(100, 20, inside.shape)).astype(np.float32)
    return crop_sample(image, inside.astype(np.uint8), 1, rng, size)


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        preset="sam-med3d-tiny",
        steps=3,
        batch_size=2,
        episode_clicks=3,
        tbptt=2,
        memory_size=4,
        checkpoint_every=2,
        mode="finetune",
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def ddp_config() -> TrainConfig:
    """The DDP comparison's recipe: :func:`tiny_config` with the memory attention at the decoder's 8e-5 instead of
    the fresh-memory 8e-4. Adam turns summation-order noise of near-zero gradients into steps of about the learning
    rate, so at 8e-4 single- and two-process weights differ by up to ~3 x 8e-4 after 3 steps for reasons that have
    nothing to do with DDP; the gradients (the real check) are compared exactly either way."""
    return tiny_config(lr_memory=8e-5)


def first_gradients(store: dict):
    """``on_step`` hook keeping the averaged gradients of the first step."""

    def hook(step, model):
        if step == 0:
            store.update({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})

    return hook


if __name__ == "__main__":  # torchrun --nproc_per_node 2 synthetic_training.py OUT_DIR
    import torch.distributed as dist

    torch.set_num_threads(1)
    grads: dict = {}
    model = train(
        ddp_config(), sphere_sample, sys.argv[1], progress=False, log=lambda s: None, on_step=first_gradients(grads)
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"grads": grads, "weights": model.state_dict()}, f"{sys.argv[1]}/rank{rank}.pt")
