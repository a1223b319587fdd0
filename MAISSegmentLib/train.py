"""Training and few-shot fine-tuning of MAIS (``mais train`` / ``mais finetune``).

Recipe (MAIS paper, App. A; ``docs/MAIS-SPEC.md``): image encoder frozen (fine-tuning) or trained
(training from scratch); prompt encoder and mask decoder at lr 8e-5; memory attention from scratch at
8e-4; AdamW (weight decay 0.1); MultiStepLR x0.1 at 64.5% and 90% of the steps (epochs 129 and 180 of
200); Dice loss; 128^3 crops centred on a random foreground voxel.

An *episode* is one target (one label value of one case) in one crop: click 1 is a random foreground
voxel, each further click is drawn uniformly from the error region of the previous prediction
(positive if it is a missed foreground voxel: the SAM-Med3D/MAIS protocol; ``center_click_prob`` makes a share of
them the evaluation robot's click, the centre of the largest error component), the memory bank is filled
along the episode, and the loss is the mean Dice loss over the episode's interactions (``ce_weight`` adds
cross-entropy, ``click_loss_weight`` a cross-entropy at the clicked voxels). Back-propagation
is truncated every ``tbptt`` interactions (the memory entries are detached there), so long episodes
(memory capacity 60) fit in memory.

Data parallel training with ``torchrun``: every rank builds the same model (same seed), takes its
slice of each global batch, and gradients are averaged with ``all_reduce`` before each optimizer step,
so all ranks stay identical and the result equals a single process on the same global batch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .errors import ConfigError
from .memory import MemoryBank
from .model.mais import MAISModel
from .roi import normalise_roi
from .session import ROI_SPACING

TRAIN_STATE_FILE = "last.pth"
ZOOM_TRAIN_SPACINGS = (1.0, 0.75)  # mm: the finer ROI voxel sizes of zoomed training crops (the cache is at 1.5 mm)
LR_MEMORY_FRESH = 8e-4  # the paper's memory-attention learning rate: the memory is trained from scratch there


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint's provenance)."""

    mode: str = "train"  # "train" (encoder trained too) or "finetune" (encoder frozen, the paper's recipe)
    preset: str | None = "mais-small"  # network preset (ignored when init_checkpoint carries a config)
    init_checkpoint: str | None = None  # SAM-Med3D or MAISSegment weights to start from
    steps: int = 2000  # optimizer steps
    batch_size: int = 2  # global batch (episodes per optimizer step, over all ranks)
    episode_clicks: int = 8  # interactions per episode
    tbptt: int = 4  # interactions per back-propagation window
    memory_size: int = 60  # memory bank capacity N
    use_memory: bool = True  # False trains the no-memory model
    lr_encoder: float = 8e-5  # image encoder (mode "train" only)
    lr_prompt_decoder: float = 8e-5  # prompt encoder and mask decoder
    lr_memory: float | None = None  # memory attention; None: LR_MEMORY_FRESH when it starts fresh (the paper:
    # trained from scratch), lr_prompt_decoder when the starting checkpoint has a trained one (see resolve_lr_memory)
    fullres: bool = False  # add a fresh full-resolution head (model/fullres_head.py) when the network has none
    lr_fullres: float | None = None  # full-resolution head; None: like lr_memory (fresh: LR_MEMORY_FRESH)
    low_res_loss_weight: float = 0.5  # with the head: weight of the decoder's own (low-res) Dice loss, which keeps
    # its logits (the next click's mask prompt) good; the head's 128^3 Dice loss has weight 1
    weight_decay: float = 0.1
    milestones: tuple[float, float] = (0.645, 0.9)  # fractions of steps where the lr drops x0.1
    warmup_steps: int = 0  # linear learning-rate warm-up (0: the paper's schedule; from scratch use ~100)
    crop_size: int = 128  # must equal the model's img_size
    loss_size: int = 128  # Dice loss on logits upsampled to this edge (128: the reference; 32: the low-res
    # logits against the area-averaged target, several times cheaper on CPU)
    amp: bool = True  # mixed precision (bf16) on CUDA
    cpu_bf16: bool = False  # bf16 autocast on the CPU too (fast on CPUs with AVX512-BF16/AMX; ~1.3x here)
    targets_per_crop: int = 1  # episodes per crop (other labels in the crop share the encoder pass)
    synthetic_fraction: float = 0.0  # share of episodes on a synthetic target drawn from the image itself
    # (synthetic_targets.py: unseen anatomy); the rest on labelled structures
    ct_window_prob: float = 0.0  # chance that a CT crop is clipped to a random soft-tissue window first
    zoom_prob: float = 0.0  # chance that an episode's crop is at a finer ROI voxel size (ZOOM_TRAIN_SPACINGS: a
    # smaller region of the 1.5 mm case upsampled to the crop), as SessionOptions(zoom=True) shows small objects
    ce_weight: float | None = None  # weight of a binary cross-entropy term added to every Dice loss (0: Dice
    # alone, the paper's; None: the starting checkpoint's, else 0, see resolve_loss_options). Dice alone gives no
    # gradient to a voxel whose logit has saturated: confidently wrong voxels (an exclude click inside a +100 logit
    # blob) are never corrected; cross-entropy keeps the logits finite and pulls hardest on exactly those voxels
    # (SAM-Med3D and nnInteractive train with Dice + cross-entropy)
    center_click_prob: float | None = None  # chance that a correction click is the centre of the largest error
    # component (the evaluation robot's `center` click, clicks.RobotUser) instead of a uniform voxel of the error
    # region (None: the starting checkpoint's, else 0)
    click_loss_weight: float | None = None  # weight of a cross-entropy term at the clicked voxels themselves (every
    # click so far, its own label): a click must hold where it was placed (None: the starting checkpoint's, else 0)
    checkpoint_every: int = 200  # steps between checkpoints
    seed: int = 0
    model_id: str = "mais-custom"
    version: str = "0.1.0"
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in provenance (data, command...)

    def __post_init__(self) -> None:
        if self.mode not in ("train", "finetune"):
            raise ConfigError(f"mode must be 'train' or 'finetune', got {self.mode!r}")
        self.milestones = tuple(self.milestones)
        _check_config(self)


# TrainConfig fields that default to the starting checkpoint's recipe (resolve_loss_options): a model trained with
# them is fine-tuned with them (``mais finetune``, Learn from my cases) unless they are given
LOSS_OPTIONS = ("ce_weight", "center_click_prob", "click_loss_weight")

# TrainConfig integer fields that count something and must be >= 1 (the CLI option names them with dashes)
_POSITIVE_COUNTS = (
    "steps",
    "batch_size",
    "episode_clicks",
    "tbptt",
    "checkpoint_every",
    "targets_per_crop",
    "crop_size",
    "loss_size",
)


def _check_config(cfg: TrainConfig) -> None:
    """Refuse settings that would fail (or train nonsense) later, before anything is built or written.

    Raises:
        ConfigError: naming the setting, its value and what is allowed.
    """
    from .session import MAX_CLICKS, SessionOptions  # the bounds of interactive use apply to training too

    for name in _POSITIVE_COUNTS:
        value = getattr(cfg, name)
        if not _whole(value) or value < 1:
            raise ConfigError(f"{name} ({_option(name)}) must be a whole number >= 1, got {value!r}")
    for name in ("warmup_steps", "seed"):
        value = getattr(cfg, name)
        if not _whole(value) or value < 0:
            raise ConfigError(f"{name} ({_option(name)}) must be a whole number >= 0, got {value!r}")
    rates = {
        "lr_encoder": cfg.lr_encoder,
        "lr_prompt_decoder": cfg.lr_prompt_decoder,
        "lr_memory": cfg.lr_memory,
        "lr_fullres": cfg.lr_fullres,
    }
    for name, value in rates.items():
        if value is not None and not _positive_number(value):
            raise ConfigError(f"{name} ({_option(name)}) must be a positive learning rate such as 8e-5, got {value!r}")
    for name in ("synthetic_fraction", "ct_window_prob", "zoom_prob", "center_click_prob"):
        value = getattr(cfg, name)
        if value is None and name in LOSS_OPTIONS:
            continue
        if not (_positive_number(value) or value == 0) or value > 1:
            raise ConfigError(f"{name} ({_option(name)}) must be a fraction between 0 and 1, got {value!r}")
    for name in ("low_res_loss_weight", "ce_weight", "click_loss_weight"):
        value = getattr(cfg, name)
        if value is None and name in LOSS_OPTIONS:
            continue
        if not (_positive_number(value) or value == 0):
            raise ConfigError(f"{name} ({_option(name)}) must be zero or a positive number, got {value!r}")
    if not (_positive_number(cfg.weight_decay) or cfg.weight_decay == 0):
        raise ConfigError(f"weight_decay must be zero or a positive number, got {cfg.weight_decay!r}")
    if not all(_positive_number(m) and m <= 1 for m in cfg.milestones):
        raise ConfigError(f"milestones must be fractions of the steps in (0, 1], got {cfg.milestones!r}")
    if cfg.episode_clicks > MAX_CLICKS:
        raise ConfigError(
            f"episode_clicks (--episode-clicks) {cfg.episode_clicks}: at most {MAX_CLICKS}, an object's click limit"
        )
    if cfg.loss_size > cfg.crop_size:
        raise ConfigError(f"loss_size {cfg.loss_size} (--loss-size) exceeds the crop size {cfg.crop_size}")
    try:
        SessionOptions(memory_size=cfg.memory_size)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (--memory-size: the bank capacity `mais segment` accepts)") from None
    for name in ("model_id", "version"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name).strip():
            raise ConfigError(f"{name} ({_option(name)}) must be a non-empty string, got {getattr(cfg, name)!r}")


def _whole(value: object) -> bool:
    """An integer (Python or NumPy; bool refused)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_number(value: object) -> bool:
    """A finite number > 0 (bool refused)."""
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return numeric and bool(np.isfinite(value)) and value > 0


def _option(field_name: str) -> str:
    """The CLI option of a :class:`TrainConfig` field (``lr_memory`` -> ``--lr-memory``)."""
    return "--" + field_name.replace("_", "-")


@dataclass
class Sample:
    """One training crop: normalised image ``(1, 1, S, S, S)`` and target mask ``(S, S, S)`` bool, (R, A, S) order."""

    image: torch.Tensor
    target: torch.Tensor
    name: str = ""
    others: list[torch.Tensor] = field(default_factory=list)  # more targets in the same crop (same encoder pass)


# ------------------------------------------------------------------------------------------ sampling
def crop_sample(
    image: np.ndarray,
    label: np.ndarray,
    value: int,
    rng: np.random.Generator,
    size: int = 128,
    others: int = 0,
    min_voxels: int = 64,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    scale: float = 1.0,
) -> Sample:
    """A ``size``^3 crop of a preprocessed case centred on a random voxel of label ``value`` (zero-padded).

    ``others``: up to this many other labels present in the crop (at least ``min_voxels`` voxels) become
    extra targets of the same crop, so one encoder pass serves several episodes. ``transform``: applied to the
    crop's raw intensities before normalisation (e.g. :func:`~MAISSegmentLib.synthetic_targets.random_ct_window`).
    ``scale``: a zoomed crop (:func:`crop_arrays`).
    """
    img, lab = crop_arrays(image, label, value, rng, size, scale)
    if transform is not None:
        img = transform(img)
    extra: list[torch.Tensor] = []
    if others > 0:
        values, counts = np.unique(lab[lab > 0], return_counts=True)
        candidates = [int(v) for v, c in zip(values, counts) if v != value and c >= min_voxels]
        for v in rng.permutation(candidates)[:others] if candidates else []:
            extra.append(torch.from_numpy(lab == v))
    return Sample(normalise_roi(torch.from_numpy(img))[None, None], torch.from_numpy(lab == value), others=extra)


def crop_arrays(
    image: np.ndarray, label: np.ndarray, value: int, rng: np.random.Generator, size: int = 128, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``size``^3 crops (image float32, label) centred on a random voxel of label ``value``; outside the case
    the image is zero and the label background.

    ``scale`` < 1: a zoomed crop, the ROI voxel size times ``scale`` (0.5: 0.75 mm from the 1.5 mm cache): a region
    of ``round(size * scale)`` voxels around the same centre, resized to ``size`` (image trilinear, label nearest)."""
    fg = np.argwhere(label == value)
    if len(fg) == 0:
        raise ValueError(f"label {value} is not present")
    centre = fg[rng.integers(len(fg))]
    edge = size if scale == 1.0 else max(8, round(size * scale))
    lo = centre - edge // 2
    img = np.zeros((edge,) * 3, np.float32)
    lab = np.zeros((edge,) * 3, label.dtype)
    src = tuple(slice(max(0, lo[d]), min(image.shape[d], lo[d] + edge)) for d in range(3))
    dst = tuple(slice(s.start - lo[d], s.stop - lo[d]) for d, s in enumerate(src))
    img[dst] = image[src]
    lab[dst] = label[src]
    if edge != size:
        grid = (size,) * 3
        img = F.interpolate(torch.from_numpy(img)[None, None], size=grid, mode="trilinear", align_corners=False)
        img = img[0, 0].numpy()
        nearest = F.interpolate(torch.from_numpy(lab.astype(np.float32))[None, None], size=grid, mode="nearest-exact")
        lab = nearest[0, 0].numpy().astype(label.dtype)
    return img, lab


def synthetic_sample(
    image: np.ndarray,
    label: np.ndarray,
    value: int,
    rng: np.random.Generator,
    size: int = 128,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    scale: float = 1.0,
) -> Sample | None:
    """A crop placed like :func:`crop_sample`'s (inside the anatomy) whose target is a synthetic region grown from
    a random voxel within 40 voxels of the crop's centre (:func:`~MAISSegmentLib.synthetic_targets.synthetic_target`);
    None when no region of a usable size was found."""
    from .synthetic_targets import synthetic_target

    img, _lab = crop_arrays(image, label, value, rng, size, scale)
    if transform is not None:
        img = transform(img)
    centre = np.full(3, size // 2) + rng.integers(-40, 41, 3)
    mask = synthetic_target(img, rng, centre=centre)
    if mask is None:
        return None
    return Sample(normalise_roi(torch.from_numpy(img))[None, None], torch.from_numpy(mask))


def simulate_click(
    target: torch.Tensor, pred: torch.Tensor | None, gen: torch.Generator, center_prob: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Next training click (ROI voxel index, label): a foreground voxel first, then a voxel of the error region.

    Args:
        target: ``(S, S, S)`` bool, ROI order.
        pred: ``(S, S, S)`` bool, the current prediction (None: the first click).
        center_prob: chance that a correction click is the centre of the largest error component (the point farthest
            from its boundary: the evaluation robot's ``center`` click, :class:`~MAISSegmentLib.clicks.RobotUser`)
            rather than a uniform voxel of the error region. Uniform error voxels are mostly boundary voxels; the
            centre click is where a user clicks into a wrong blob. No random draw is made when it is 0, so earlier
            runs replay unchanged.
    """
    if pred is None:
        region, positive = target, None
    else:
        fn, fp = target & ~pred, pred & ~target
        region = fn | fp
        positive = fn
        if not region.any():
            region, positive = target, None
    if positive is not None and center_prob > 0 and float(torch.rand((), generator=gen)) < center_prob:
        from .clicks import RobotUser

        robot = RobotUser("center")
        robot.n_clicks = 1  # a correction click: the centre of the largest false-negative or false-positive part
        click = robot.click(target.cpu().numpy(), pred.cpu().numpy())
        return torch.tensor(click.kji, dtype=torch.float32, device=target.device), int(click.include)
    idx = region.nonzero()
    point = idx[torch.randint(len(idx), (1,), generator=gen)][0]
    label = 1 if positive is None else int(positive[tuple(point)])
    return point.float(), label


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of ``(1, 1, S, S, S)`` logits against a ``(S, S, S)`` target (bool, or soft in [0, 1])."""
    p = torch.sigmoid(logits.float()).flatten()
    t = target.float().flatten()
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.0) -> torch.Tensor:
    """Dice loss plus ``ce_weight`` times the mean binary cross-entropy, ``(1, 1, S, S, S)`` logits against a
    ``(S, S, S)`` target (bool, or soft in [0, 1])."""
    loss = dice_loss(logits, target)
    if ce_weight:
        loss = loss + ce_weight * F.binary_cross_entropy_with_logits(logits.float().flatten(), target.float().flatten())
    return loss


def click_loss(logits: torch.Tensor, points: list[torch.Tensor], labels: list[float], crop_size: int) -> torch.Tensor:
    """Mean binary cross-entropy of ``(1, 1, s, s, s)`` logits at the clicked voxels against the clicks' labels.

    Args:
        points: ROI voxel indices ``(3,)`` on the ``crop_size`` grid (ROI order), mapped to the logits' grid.
        labels: 1.0 include, 0.0 exclude.
    """
    s = logits.shape[-1]
    idx = (torch.stack(points).to(logits.device).long() * s) // crop_size
    values = logits[0, 0][idx[:, 0], idx[:, 1], idx[:, 2]].float()
    return F.binary_cross_entropy_with_logits(values, torch.tensor(labels, device=logits.device))


# ------------------------------------------------------------------------------------------ one episode
def run_episode(
    model: MAISModel, sample: Sample, cfg: TrainConfig, gen: torch.Generator, loss_scale: float = 1.0
) -> dict[str, float]:
    """Simulate the click episodes of a crop (its target, then ``sample.others``) on one encoder pass,
    back-propagating ``loss_scale * mean Dice loss`` (gradients accumulate).

    Returns the mean loss and the mean Dice of the last predictions.
    """
    dev = model.device
    use_bf16 = (cfg.amp and dev.type == "cuda") or (cfg.cpu_bf16 and dev.type == "cpu")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else _null()
    with autocast:
        train_encoder = cfg.mode == "train" and any(p.requires_grad for p in model.image_encoder.parameters())
        with torch.set_grad_enabled(train_encoder):
            embedding = model.encode_image(sample.image.to(dev))
        features = model.encode_fullres(sample.image.to(dev))  # the head trains: with gradients
    targets = [sample.target, *sample.others][: max(1, cfg.targets_per_crop)]
    stats = []
    for n, target in enumerate(targets):
        last = n == len(targets) - 1
        stats.append(
            _episode(
                model,
                embedding,
                target.to(dev),
                cfg,
                gen,
                loss_scale / len(targets),
                autocast,
                keep_encoder_graph=(train_encoder or features is not None) and not last,
                features=features,
            )
        )
    return {"loss": float(np.mean([s["loss"] for s in stats])), "dice": float(np.mean([s["dice"] for s in stats]))}


def _episode(
    model: MAISModel,
    embedding: torch.Tensor,
    target: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    loss_scale: float,
    autocast: Any,
    keep_encoder_graph: bool,
    features: Any = None,
) -> dict[str, float]:
    """One target's click episode on a given embedding (see :func:`run_episode`).

    With the full-resolution head (``features`` given): the loss is the head's Dice on the 128^3 logits plus
    ``low_res_loss_weight`` times the decoder's own Dice (as without the head), and the next click is drawn from
    the error of the full-resolution prediction.
    """
    dev = model.device
    size = target.shape[-1]
    train_encoder = embedding.requires_grad or features is not None  # the graph through them is kept per window
    pe = model.dense_pe()
    bank = MemoryBank(cfg.memory_size, model.cfg.memory.variant) if (cfg.use_memory and model.has_memory) else None
    soft_target = None
    if cfg.loss_size != size:  # fraction of each loss voxel covered by the target
        soft_target = F.adaptive_avg_pool3d(target[None, None].float(), cfg.loss_size)[0, 0]
    points, labels = [], []
    prev, pred, prev_full = None, None, None
    window_loss, total = 0.0, 0.0
    n = cfg.episode_clicks
    ce, centre, click_w = cfg.ce_weight or 0.0, cfg.center_click_prob or 0.0, cfg.click_loss_weight or 0.0  # None: 0
    for t in range(n):
        point, label = simulate_click(target, pred, gen, centre)
        points.append(point)
        labels.append(float(label))
        with autocast:
            out = model.step(
                embedding,
                torch.stack(points)[None].to(dev),
                torch.tensor([labels], device=dev),
                prev,
                bank=bank,
                image_pe=pe,
                features=features,
                prev_full=prev_full,
            )
            hi = F.interpolate(out.low_res_logits, size=(size,) * 3, mode="trilinear", align_corners=False)
            if cfg.loss_size == size:
                loss = segmentation_loss(hi, target, ce)
            else:
                logits = (
                    F.interpolate(out.low_res_logits, size=(cfg.loss_size,) * 3, mode="trilinear", align_corners=False)
                    if cfg.loss_size != out.low_res_logits.shape[-1]
                    else out.low_res_logits
                )
                loss = segmentation_loss(logits, soft_target, ce)
            if click_w:
                loss = loss + click_w * click_loss(out.low_res_logits, points, labels, size)
            if out.full_res_logits is not None:
                head_loss = segmentation_loss(out.full_res_logits, target, ce)
                if click_w:
                    head_loss = head_loss + click_w * click_loss(out.full_res_logits, points, labels, size)
                loss = head_loss + cfg.low_res_loss_weight * loss
                hi = out.full_res_logits
        window_loss = window_loss + loss
        total += float(loss.detach())
        pred = hi.detach()[0, 0] > 0
        prev = out.low_res_logits
        prev_full = out.full_res_logits
        if (t + 1) % cfg.tbptt == 0 or t == n - 1:
            (window_loss * loss_scale / n).backward(retain_graph=train_encoder and (t < n - 1 or keep_encoder_graph))
            window_loss = 0.0
            prev = prev.detach()
            prev_full = None if prev_full is None else prev_full.detach()
            if bank is not None:  # truncate: memories of earlier windows become constants
                for e in bank.entries:
                    e.sparse = None if e.sparse is None else e.sparse.detach()
                    e.dense = None if e.dense is None else e.dense.detach()
                bank.clear_cache()
    inter = (pred & target).sum().item()
    last_dice = 2 * inter / max(1, pred.sum().item() + target.sum().item())
    return {"loss": total / n, "dice": last_dice}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# ------------------------------------------------------------------------------------------ optimiser
def param_groups(model: MAISModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups of the recipe; the encoder is frozen in fine-tuning."""
    enc = list(model.image_encoder.parameters())
    for p in enc:
        p.requires_grad_(cfg.mode == "train")
    groups = [
        {
            "params": list(model.prompt_encoder.parameters()) + list(model.mask_decoder.parameters()),
            "lr": cfg.lr_prompt_decoder,
            "name": "prompt+decoder",
        }
    ]
    if model.has_memory and cfg.use_memory:
        lr_memory = resolve_lr_memory(cfg, model).lr_memory
        groups.append({"params": list(model.memory_attention.parameters()), "lr": lr_memory, "name": "memory"})
    if model.has_fullres:
        lr_fullres = resolve_lr_memory(cfg, model).lr_fullres
        groups.append({"params": list(model.fullres_head.parameters()), "lr": lr_fullres, "name": "fullres"})
    if cfg.mode == "train":
        groups.append({"params": enc, "lr": cfg.lr_encoder, "name": "encoder"})
    return groups


# ------------------------------------------------------------------------------------------ distributed
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` (0, 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when launched by torchrun."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def average_gradients(model: torch.nn.Module) -> None:
    """All-reduce (mean) every gradient over the ranks.

    A parameter no rank has a gradient for (unused by the loss, e.g. the IoU head) keeps ``grad=None``,
    exactly as in a single process (AdamW then skips it, weight decay included); one that only some
    ranks have a gradient for is zero-filled on the others so every rank reduces the same tensors.
    """
    _, world = dist_info()
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([float(p.grad is not None) for p in params])
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, any_rank in zip(params, has.tolist()):
        if not any_rank:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


# ------------------------------------------------------------------------------------------ the run folder
RUN_FILES = (TRAIN_STATE_FILE, "model.pth", "log.csv")  # what a run writes into its folder
LOG_FILE = "log.csv"


def existing_run_files(out_dir: str | os.PathLike) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out_dir`` (a run was started there before)."""
    out = Path(out_dir)
    return [name for name in RUN_FILES if (out / name).exists()]


def check_run_folder(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work, a run folder that cannot be used as asked; writes nothing.

    Args:
        out_dir: the run folder (created later when missing).
        resume: continue the run there (its ``last.pth`` must exist).
        overwrite: start again although a run is there (:func:`train` moves its files aside first).

    Raises:
        ConfigError: ``resume`` with ``overwrite``; ``out_dir`` is a file or cannot be written; a run is there and
            neither ``resume`` nor ``overwrite`` was given; ``resume`` without a ``last.pth``.
    """
    from .fileutil import writable_problem

    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite starts it again: give only one")
    problem = writable_problem(out, folder=True)
    if problem:
        raise ConfigError(f"--out {out}: {problem}")
    found = existing_run_files(out)
    if resume and TRAIN_STATE_FILE not in found:
        finished = " (it holds a finished model.pth: start a new run from it with --checkpoint)" if found else ""
        raise ConfigError(f"--resume: {out} holds no {TRAIN_STATE_FILE} to continue from{finished}")
    if found and not resume and not overwrite:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, or start again with "
            "--overwrite (the old files are moved into a previous-<date> sub-folder), or choose another --out"
        )


def _truncate_log(path: Path, step: int) -> int:
    """Drop the rows of ``log.csv`` after ``step`` (written after the last checkpoint by a run that then stopped),
    so a resumed run does not log those steps twice. Returns how many rows went; the file is replaced atomically."""
    from .fileutil import atomic_write_text

    if not path.is_file():
        return 0
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or "step" not in rows[0]:
        return 0
    column = rows[0].index("step")

    def keep(row: list[str]) -> bool:
        try:
            return int(row[column]) <= step
        except (IndexError, ValueError):
            return False  # a half-written last line of a crashed run

    kept = [rows[0]] + [row for row in rows[1:] if keep(row)]
    dropped = len(rows) - len(kept)
    if dropped:
        out = io.StringIO()
        csv.writer(out, lineterminator="\r\n").writerows(kept)
        atomic_write_text(path, out.getvalue())
    return dropped


def _resume_state(path: Path) -> dict[str, Any]:
    """The optimizer, scheduler and step stored in a training state (``last.pth``).

    Raises:
        ConfigError: the file holds weights only (a release or final ``model.pth``, e.g. copied over ``last.pth``).
    """
    _, _, meta = load_checkpoint(path)
    missing = [key for key in ("optimizer", "scheduler", "step") if key not in meta]
    if missing:
        raise ConfigError(
            f"{path} holds model weights only, without the optimizer state a run is continued from (it is a release "
            "or final model file, as `mais weights export` or the end of a run writes, not a training state): it "
            "cannot be resumed. Start a new run from it instead: --checkpoint with it, without --resume"
        )
    return meta


# ------------------------------------------------------------------------------------------ the loop
SampleFn = Callable[[int], Sample]  # global sample index -> Sample (deterministic)


def train(
    cfg: TrainConfig,
    sample_fn: SampleFn,
    out_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop_at_step: int | None = None,
    time_limit_s: float | None = None,
    on_step: Callable[[int, MAISModel], None] | None = None,
    overwrite: bool = False,
) -> MAISModel:
    """Run (or resume) training; writes ``out_dir/last.pth`` every ``checkpoint_every`` steps,
    ``out_dir/model.pth`` at the end (MAISSegment checkpoints) and ``out_dir/log.csv``.

    Args:
        cfg: the run's configuration.
        sample_fn: global sample index -> :class:`Sample`; must be deterministic (resume, ranks).
        out_dir: run folder.
        device: torch device name.
        resume: continue from ``out_dir/last.pth`` (model, optimizer, scheduler, step, RNG state); rows of
            ``log.csv`` after that checkpoint's step (a run stopped between checkpoints) are dropped.
        stop_at_step: stop (with a checkpoint to resume from) once this step is reached.
        time_limit_s: stop (with a checkpoint) after this many seconds; resume later with ``resume``.
        on_step: called with (step, model) after the gradients are averaged, before the optimizer step.
        overwrite: start again in a folder that holds a run: its files are first moved into a ``previous-<date>``
            sub-folder. Without it (and without ``resume``) such a folder is refused.

    Raises:
        ConfigError: see :func:`check_run_folder`; ``resume`` from a file without optimizer state.
    """
    out = Path(out_dir)
    check_run_folder(out, resume, overwrite)
    dev = torch.device(device)
    init_distributed(dev)
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    torch.manual_seed(cfg.seed)
    start_ckpt = out / TRAIN_STATE_FILE if resume else None
    model = (
        build_model(
            cfg.preset if not cfg.init_checkpoint else None,
            checkpoint=start_ckpt or cfg.init_checkpoint,
            device=dev,
            trusted=False,
        )
        if (start_ckpt or cfg.init_checkpoint)
        else build_model(cfg.preset, device=dev)
    )
    if cfg.fullres and not model.has_fullres:
        model = model.with_fullres_head()
        log("added a fresh full-resolution head")
    if model.cfg.image_encoder.img_size != cfg.crop_size:
        raise ConfigError(
            f"crop_size {cfg.crop_size} differs from the model's input size {model.cfg.image_encoder.img_size}"
        )
    model.train()
    cfg = resolve_lr_memory(cfg, model, resumed=start_ckpt is not None)
    cfg = resolve_loss_options(cfg, model)
    if cfg.mode == "finetune" and model.has_memory and cfg.use_memory:
        log(f"memory attention {model.load_report.memory_attention}: lr {cfg.lr_memory:g}")
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step))
    step = 0
    if start_ckpt:
        meta = _resume_state(start_ckpt)
        opt.load_state_dict(meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        step = int(meta["step"])
        log(f"resumed at step {step} from {start_ckpt}")
    per_rank = cfg.batch_size // world
    log_path = out / LOG_FILE
    if rank == 0:
        _prepare_run_folder(out, step, resume, overwrite, log)
    t_start, seen = time.perf_counter(), 0
    while step < cfg.steps:
        if (stop_at_step is not None and step >= stop_at_step) or (
            time_limit_s is not None and time.perf_counter() - t_start > time_limit_s
        ):
            if rank == 0:
                _save_state(model, cfg, out / TRAIN_STATE_FILE, step, opt, sched)
                log(f"stopped at step {step}/{cfg.steps}; continue with --resume")
            return model.eval()
        opt.zero_grad(set_to_none=True)
        stats = []
        for j in range(per_rank):
            index = step * cfg.batch_size + rank * per_rank + j
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
            stats.append(run_episode(model, sample_fn(index), cfg, gen, loss_scale=1.0 / per_rank))
        average_gradients(model)
        if on_step is not None:
            on_step(step, model)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        step += 1
        seen += per_rank * world
        loss = float(np.mean([s["loss"] for s in stats]))
        dice = float(np.mean([s["dice"] for s in stats]))
        if rank == 0:
            rate = seen / (time.perf_counter() - t_start)
            _append_csv(
                log_path,
                {
                    "step": step,
                    "loss": loss,
                    "last_click_dice": dice,
                    "lr": sched.get_last_lr()[0],
                    "episodes_per_s": rate,
                    "time": time.time(),
                },
            )
            if progress:
                _progress(step, cfg.steps, loss, dice, rate, cfg.batch_size)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_state(model, cfg, out / TRAIN_STATE_FILE, step, opt, sched)
    if rank == 0:
        if progress:
            sys.stderr.write("\n")
        save_checkpoint(model, out / "model.pth", cfg.model_id, cfg.version, provenance=_provenance(cfg, step))
        log(f"wrote {out / 'model.pth'}")
    if world > 1:
        dist.barrier()
    return model.eval()


def _prepare_run_folder(out: Path, step: int, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Create the run folder; move an old run aside (``overwrite``) or trim the log to the resumed ``step``."""
    from .fileutil import move_aside

    if overwrite:
        backup = move_aside(out, RUN_FILES)
        if backup is not None:
            log(f"moved the previous run's files to {backup}")
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        dropped = _truncate_log(out / LOG_FILE, step)
        if dropped:
            log(f"{LOG_FILE}: dropped {dropped} row(s) after step {step}, written after the last checkpoint")


def resolve_lr_memory(cfg: TrainConfig, model: MAISModel, resumed: bool = False) -> TrainConfig:
    """``cfg`` with ``lr_memory`` and ``lr_fullres`` set when they are ``None`` (the same rule for both parts: the
    memory attention and the full-resolution head).

    The paper's 8e-4 is for a memory attention trained from scratch on top of a pretrained SAM-Med3D.
    When the starting checkpoint already has a trained memory attention (a MAISSegment model, the
    built-in one included), 8e-4 on 1-3 cases wipes out what it learnt (measured on the built-in model:
    fine-tuning on the myocardium lowered its Dice@5 from 0.19 to 0.07), so it is then fine-tuned at the
    prompt encoder/decoder's rate. On ``resumed`` runs the value recorded in the checkpoint is kept.
    """
    report = getattr(model, "load_report", None)
    recipe = (getattr(report, "provenance", None) or {}).get("recipe", {}) if resumed else {}
    changes = {}
    for field_name, part in (("lr_memory", "memory_attention"), ("lr_fullres", "fullres_head")):
        if getattr(cfg, field_name) is not None:
            continue
        if recipe.get(field_name) is not None:
            changes[field_name] = float(recipe[field_name])
        elif report is not None and getattr(report, part, None) == "loaded":
            changes[field_name] = cfg.lr_prompt_decoder
        else:
            changes[field_name] = LR_MEMORY_FRESH
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve_loss_options(cfg: TrainConfig, model: MAISModel) -> TrainConfig:
    """``cfg`` with the loss options left ``None`` (:data:`LOSS_OPTIONS`) set to the starting checkpoint's recipe, or
    0 (Dice alone, uniform error clicks, no click loss) when it records none: a model trained with cross-entropy
    is fine-tuned with it. Fine-tuning 0.3.0 (trained with it, logits within about +-10) on Dice alone would let its
    logits saturate again, and a confident mistake under a click would stop being corrected."""
    report = getattr(model, "load_report", None)
    recipe = (getattr(report, "provenance", None) or {}).get("recipe", {})
    changes = {name: float(recipe.get(name) or 0.0) for name in LOSS_OPTIONS if getattr(cfg, name) is None}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warmup_steps``, then x0.1 at each milestone
    (with ``warmup_steps=0`` exactly the paper's MultiStepLR)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    drops = sum(step >= round(m * cfg.steps) for m in cfg.milestones)
    return warm * 0.1**drops


def _provenance(cfg: TrainConfig, step: int) -> dict[str, Any]:
    return {
        "recipe": dataclasses.asdict(cfg),
        "steps_done": step,
        "torch": str(torch.__version__),
        "command": " ".join(sys.argv),
    }


def _save_state(model: MAISModel, cfg: TrainConfig, path: Path, step: int, opt, sched) -> None:
    save_checkpoint(
        model,
        path,
        cfg.model_id,
        cfg.version,
        provenance=_provenance(cfg, step),
        extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
    )


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _progress(step: int, total: int, loss: float, dice: float, rate: float, batch_size: int = 1) -> None:
    """One progress line; ``rate`` in episodes/s, ``batch_size`` episodes per step (for the ETA)."""
    width = 30
    done = int(width * step / total)
    eta = (total - step) * batch_size / max(rate, 1e-9)
    sys.stderr.write(
        f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} loss {loss:.3f} "
        f"dice {dice:.3f} {rate:.2f} ep/s eta {eta / 60:.0f} min "
    )
    sys.stderr.flush()


__all__ = [
    "Sample",
    "TrainConfig",
    "click_loss",
    "crop_sample",
    "dice_loss",
    "resolve_loss_options",
    "run_episode",
    "segmentation_loss",
    "simulate_click",
    "train",
]


class TargetSampler:
    """Deterministic training samples from targets: index -> (target, crop centred on one of its voxels).

    Preprocessed cases come from a :class:`MAISSegmentLib.data.PreprocessCache` and the last
    ``keep`` of them stay in memory.
    """

    def __init__(
        self,
        targets: list,
        cache,
        seed: int = 0,
        crop_size: int = 128,
        keep: int = 16,
        others: int = 0,
        synthetic_fraction: float = 0.0,
        ct_window_prob: float = 0.0,
        zoom_prob: float = 0.0,
    ) -> None:
        self.others = others  # extra targets per crop (TrainConfig.targets_per_crop - 1)
        self.synthetic_fraction = synthetic_fraction  # TrainConfig.synthetic_fraction
        self.ct_window_prob = ct_window_prob  # TrainConfig.ct_window_prob
        self.zoom_prob = zoom_prob  # TrainConfig.zoom_prob
        if not targets:
            raise ConfigError("no training targets: check the manifest, split and --structures filter")
        self.targets, self.cache, self.seed, self.crop_size, self.keep = targets, cache, seed, crop_size, keep
        self._mem: dict[str, Any] = {}

    def _case(self, case) -> Any:
        pre = self._mem.pop(case.id, None) or self.cache.get(case)
        self._mem[case.id] = pre
        while len(self._mem) > self.keep:
            self._mem.pop(next(iter(self._mem)))
        return pre

    def __call__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, index])
        target = self.targets[int(rng.integers(len(self.targets)))]
        pre = self._case(target.case)
        transform = None
        is_ct = target.case.modality.upper().startswith("CT")
        if is_ct and rng.random() < self.ct_window_prob:
            from .synthetic_targets import random_ct_window

            def transform(img: np.ndarray, rng: np.random.Generator = rng) -> np.ndarray:
                return random_ct_window(img, rng)

        scale = 1.0
        if self.zoom_prob and rng.random() < self.zoom_prob:  # no draw without zoom: earlier runs replay unchanged
            scale = float(rng.choice(ZOOM_TRAIN_SPACINGS)) / ROI_SPACING
        if self.synthetic_fraction and rng.random() < self.synthetic_fraction:
            sample = synthetic_sample(pre.image, pre.label, target.label, rng, self.crop_size, transform, scale)
            if sample is not None:
                sample.name = f"{target.case.id}:synthetic"
                return sample
        sample = crop_sample(
            pre.image,
            pre.label,
            target.label,
            rng,
            self.crop_size,
            others=self.others,
            transform=transform,
            scale=scale,
        )
        sample.name = f"{target.case.id}:{target.name}"
        return sample
