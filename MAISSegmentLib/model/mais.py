"""The MAIS network: SAM-Med3D backbone + memory attention, and one interaction step.

Interaction protocol (``docs/MAIS-SPEC.md``)::

    t = 1: E' = E;  low_1 = decoder(E, PE, sparse_1, dense_1);  push(sparse_1, dense_1)
    t > 1: sparse_t, dense_t = prompt_encoder(clicks, mask = low_{t-1});  push(sparse_t, dense_t)
           E' = memory_attention(E, PE, memory);  low_t = decoder(E', PE, sparse_t, dense_t)

With the memory off (or ``memory=None`` in the config) this is exactly SAM-Med3D's inference loop:
``prev = zeros``; every click: prompt encoder with all clicks and ``masks=prev``, decoder with
``multimask_output=False``, ``prev = low_res_logits``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PromptError
from ..memory import MemoryBank
from .config import ModelConfig
from .fullres_head import FULLRES_PREFIX, FullResFeatures, FullResHead
from .image_encoder import REL_POS_VARIANTS, ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .memory_attention import MemoryAttention
from .prompt_encoder import PromptEncoder3D

MEMORY_PREFIX = "memory_attention."


@dataclass
class StepOutput:
    """Result of one interaction.

    Attributes:
        low_res_logits: ``(1, 1, 32, 32, 32)`` logits in ROI tensor order (4x the embedding grid).
        iou: ``(1, 1)`` predicted IoU (no sigmoid).
        used_memory: whether the image embedding was memory-conditioned for this step.
        full_res_logits: ``(1, 1, 128, 128, 128)`` logits on the ROI grid from the full-resolution head, when the
            model has one and the ROI's features were given; else None.
    """

    low_res_logits: torch.Tensor
    iou: torch.Tensor
    used_memory: bool
    full_res_logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """The finest logits of the step: the full-resolution ones when there are, else the low-res ones."""
        return self.low_res_logits if self.full_res_logits is None else self.full_res_logits


class MAISModel(nn.Module):
    """SAM-Med3D-compatible network with the MAIS memory attention.

    The state-dict names of the backbone are SAM-Med3D's (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``); the memory attention lives under ``memory_attention.*`` and is absent when
    ``cfg.memory is None``; the full-resolution mask path under ``fullres_head.*``, absent when ``cfg.fullres is
    None`` (SAM-Med3D's 32^3 output only).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        enc = cfg.image_encoder
        self.image_encoder = ImageEncoderViT3D(enc)
        self.prompt_encoder = PromptEncoder3D(
            cfg.embed_dim, cfg.grid_size, enc.img_size, cfg.prompt_encoder.mask_in_chans
        )
        self.mask_decoder = MaskDecoder3D(cfg.embed_dim, cfg.mask_decoder)
        self.memory_attention = MemoryAttention(cfg.embed_dim, cfg.memory) if cfg.memory is not None else None
        self.fullres_head = FullResHead(cfg.embed_dim, enc.img_size, cfg.fullres) if cfg.fullres is not None else None
        # inference precision of the encoder, prompt encoder, memory and decoder (MAISSegmentLib.precision); the
        # full-resolution head and everything with autograd on always run in float32 (or the caller's autocast)
        self.inference_dtype = torch.float32

    @property
    def has_fullres(self) -> bool:
        """Whether the model has the full-resolution mask path."""
        return self.fullres_head is not None

    def init_fresh_fullres(self, seed: int = 1) -> None:
        """Re-initialise the full-resolution head from a fixed seed (as :meth:`init_fresh_memory`): a checkpoint
        without its weights (SAM-Med3D, or a MAISSegment model trained before it existed) gets the same fresh head at
        every load. A fresh head outputs the decoder's logits upsampled."""
        if self.cfg.fullres is None:
            return
        device = self.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = FullResHead(self.cfg.embed_dim, self.cfg.image_encoder.img_size, self.cfg.fullres)
        self.fullres_head = head.to(device)

    def with_fullres_head(self) -> MAISModel:
        """This network plus a fresh full-resolution head (fixed seed): every other weight is copied, so it predicts
        exactly what this one does, on the ROI grid, until the head is trained. ``self`` when it has a head."""
        if self.has_fullres:
            return self
        from .config import FullResConfig

        grown = MAISModel(self.cfg.replace(fullres=FullResConfig())).to(self.device)
        grown.load_state_dict(self.state_dict(), strict=False)
        grown.init_fresh_fullres()
        report = getattr(self, "load_report", None)
        if report is not None:
            import dataclasses

            grown.load_report = dataclasses.replace(report, fullres_head="fresh", notes=[*report.notes])
            grown.load_report.notes.append("a fresh full-resolution head was added")
        return grown

    def init_fresh_memory(self, seed: int = 0) -> None:
        """Re-initialise the memory attention from a fixed seed (the global RNG is left untouched).

        A checkpoint without memory weights (SAM-Med3D) gets a fresh, untrained memory attention; drawing it from a
        fixed seed makes every load of the same file the same network, so a saved session replays to the same mask.
        """
        if self.cfg.memory is None:
            return
        device = self.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.memory_attention = MemoryAttention(self.cfg.embed_dim, self.cfg.memory).to(device)

    # ------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.no_mask_embed.weight.device

    @property
    def has_memory(self) -> bool:
        return self.memory_attention is not None

    def new_memory_bank(self, capacity: int | None = None, variant: str | None = None) -> MemoryBank:
        """An empty bank with the configured (or given) capacity and variant."""
        if self.cfg.memory is None:
            raise PromptError("this model has no memory attention (its configuration has memory=None)")
        return MemoryBank(capacity or self.cfg.memory.capacity, variant or self.cfg.memory.variant)

    def sam_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights alone, in SAM-Med3D's layout (324 keys for ``sam-med3d-vit-b``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith((MEMORY_PREFIX, FULLRES_PREFIX))}

    def set_rel_pos_variant(self, variant: str) -> None:
        """Switch the encoder's relative-position bias (``"textbook"`` exists only to fail the fixture)."""
        if variant not in REL_POS_VARIANTS:
            raise ValueError(f"variant must be one of {REL_POS_VARIANTS}")
        for blk in self.image_encoder.blocks:
            blk.attn.rel_pos_variant = variant

    # ------------------------------------------------------------------------------- inference
    def _low_precision(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast when :attr:`inference_dtype` asks for it and no gradient is being recorded."""
        if self.inference_dtype == torch.float32 or torch.is_grad_enabled():
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.inference_dtype)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 128, 128, 128)`` ROI -> image embedding ``(B, 384, 8, 8, 8)`` (float32)."""
        with self._low_precision():
            return self.image_encoder(image).float()

    def encode_fullres(self, image: torch.Tensor) -> FullResFeatures | None:
        """Once-per-ROI features of the full-resolution head (None when the model has none).

        Args:
            image: ``(1, 1, 128, 128, 128)`` the same z-normalised ROI as :meth:`encode_image`.
        """
        return None if self.fullres_head is None else self.fullres_head.encode(image)

    def dense_pe(self) -> torch.Tensor:
        """Dense positional encoding ``(1, C, G, G, G)``."""
        return self.prompt_encoder.get_dense_pe()

    def empty_mask(self) -> torch.Tensor:
        """The all-zero previous mask of the first click, ``(1, 1, 4G, 4G, 4G)``."""
        s = self.cfg.low_res_size
        return torch.zeros(1, 1, s, s, s, device=self.device)

    def step(
        self,
        image_embedding: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        prev_low_res: torch.Tensor | None = None,
        bank: MemoryBank | None = None,
        image_pe: torch.Tensor | None = None,
        features: FullResFeatures | None = None,
        prev_full: torch.Tensor | None = None,
    ) -> StepOutput:
        """One interaction: all clicks so far -> new low-res logits (``multimask_output=False``).

        Args:
            image_embedding: ``(1, C, G, G, G)`` from :meth:`encode_image`.
            points: ``(1, t, 3)`` ROI voxel indices of every click so far in ROI tensor order (the
                newest last); the newest click is this interaction's.
            labels: ``(1, t)`` 1 include / 0 exclude.
            prev_low_res: ``(1, 1, 32, 32, 32)`` logits of the previous step (None: zeros).
            bank: the object's memory; None runs without memory (the no-memory baseline). The newest
                click and the mask embedding are pushed into it.
            image_pe: cached :meth:`dense_pe` (computed when None).
            features: the ROI's :meth:`encode_fullres`; given (and the model has the head), the step also returns
                full-resolution logits.
            prev_full: ``(1, 1, 128, 128, 128)`` the previous step's full-resolution logits (None: first click).

        Returns:
            :class:`StepOutput`.

        Raises:
            PromptError: malformed points or labels.
        """
        if points.ndim != 3 or points.shape[0] != 1 or points.shape[2] != 3 or points.shape[1] < 1:
            raise PromptError(f"points must be (1, t, 3) with t >= 1, got {tuple(points.shape)}")
        if labels.shape != points.shape[:2]:
            raise PromptError(f"labels must be (1, {points.shape[1]}), got {tuple(labels.shape)}")
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise PromptError("click labels must be 1 (include) or 0 (exclude)")
        if prev_low_res is None:
            prev_low_res = self.empty_mask()
        if image_pe is None:
            image_pe = self.dense_pe()
        with self._low_precision():
            newest_only = self.cfg.memory is not None and self.cfg.memory.decoder_clicks == "newest"
            dec_points, dec_labels = (points[:, -1:], labels[:, -1:]) if newest_only else (points, labels)
            sparse, dense = self.prompt_encoder(points=(dec_points, dec_labels), masks=prev_low_res)
            embedding, used_memory = image_embedding, False
            if bank is not None:
                if self.memory_attention is None:
                    raise PromptError("a memory bank was given but this model has no memory attention")
                click_tokens = self.prompt_encoder.embed_points(points[:, -1:], labels[:, -1:], pad=False)
                bank.push(click_tokens[0], dense[0])
                if bank.total_pushed > 1:
                    embedding = self.memory_attention(image_embedding, image_pe, bank)
                    used_memory = True
            if self.fullres_head is None or features is None:
                low_res, iou = self.mask_decoder(embedding, image_pe, sparse, dense, multimask_output=False)
                return StepOutput(low_res.float(), iou.float(), used_memory)
            low_res, iou, token = self.mask_decoder.single_mask(embedding, image_pe, sparse, dense)
        low_res, iou, token = low_res.float(), iou.float(), token.float()
        full = self.fullres_head(features, low_res, token, points, labels, prev_full)
        return StepOutput(low_res, iou, used_memory, full)
