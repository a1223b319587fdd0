"""Small typed configuration of the MAIS network and its named presets.

The backbone fields mirror the constructor arguments of SAM-Med3D's ``_build_sam3D_ori`` so that a
SAM-Med3D checkpoint maps one-to-one onto our modules (see ``docs/SAM-MED3D-SPEC.md``). Presets are
named after what they are; ``sam-med3d-vit-b`` is the layout of the public SAM-Med3D-turbo checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

MEMORY_VARIANTS = ("sparse", "dense", "sparse+dense")


@dataclass(frozen=True)
class ImageEncoderConfig:
    """3-D ViT image encoder (SAM-Med3D ``ImageEncoderViT3D``)."""

    img_size: int = 128  # edge of the cubic input ROI, voxels
    patch_size: int = 16  # edge of the cubic patch, voxels -> grid of img_size // patch_size per axis
    in_chans: int = 1  # input channels (one intensity channel)
    embed_dim: int = 768  # token width
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width = embed_dim * mlp_ratio
    window_size: int = 14  # windowed blocks pad the token grid to this edge (0 = all global)
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)  # blocks with global attention
    out_chans: int = 384  # neck output channels = prompt embedding dim
    norm_eps: float = 1e-6  # LayerNorm eps in blocks
    exact_fast_windows: bool = True  # compute only the real query rows in padded windowed blocks


@dataclass(frozen=True)
class PromptEncoderConfig:
    """3-D prompt encoder (SAM-Med3D ``PromptEncoder3D``)."""

    mask_in_chans: int = 16  # channels of the mask-downscaling stack


@dataclass(frozen=True)
class MaskDecoderConfig:
    """3-D mask decoder with its two-way transformer (SAM-Med3D ``MaskDecoder3D``)."""

    num_multimask_outputs: int = 3  # mask tokens 1..3 when multimask_output=True
    iou_head_depth: int = 3  # layers of the IoU prediction MLP
    iou_head_hidden_dim: int = 256  # hidden width of the IoU prediction MLP
    transformer_depth: int = 2  # two-way attention blocks
    transformer_mlp_dim: int = 2048  # MLP width inside the two-way blocks (ReLU)
    transformer_num_heads: int = 8  # heads of every decoder attention
    attention_downsample_rate: int = 2  # token<->image attentions work at dim / rate


@dataclass(frozen=True)
class MemoryConfig:
    """MAIS memory attention and bank (``docs/MAIS-SPEC.md`` section 1)."""

    capacity: int = 60  # FIFO size N of the memory bank (paper: 60; ablation 10-80)
    variant: str = "sparse+dense"  # which memories are used: "sparse", "dense" or "sparse+dense"
    num_heads: int = 8  # heads of the sparse self-attention and the image->memory cross-attention
    dense_dim: int = 48  # q/k/v width of the convolutional attention over dense memories
    mlp_dim: int = 2048  # hidden width of the block's MLP (ReLU)
    decoder_clicks: str = "all"  # the decoder sees "all" clicks so far, or only the "newest"

    def __post_init__(self) -> None:
        if self.variant not in MEMORY_VARIANTS:
            raise ConfigError(f"memory variant {self.variant!r} is not one of {MEMORY_VARIANTS}")
        if not 1 <= self.capacity <= 10_000:
            raise ConfigError(f"memory capacity must be between 1 and 10000, got {self.capacity}")
        if self.decoder_clicks not in ("all", "newest"):
            raise ConfigError(f"decoder_clicks must be 'all' or 'newest', got {self.decoder_clicks!r}")


@dataclass(frozen=True)
class FullResConfig:
    """The full-resolution mask path (:mod:`MAISSegmentLib.model.fullres_head`): logits on the ROI's own grid."""

    stem_channels: int = 8  # first stem convolution (128^3 -> 64^3, stride 2), once per ROI
    mid_channels: int = 16  # image features at 64^3, once per ROI
    hi_channels: int = 4  # image features at 128^3, once per ROI (kept in float16 at inference)
    hidden_channels: int = 16  # width of the per-click point-wise mix at 64^3
    click_sigma: float = 1.5  # ROI voxels: width of the click maps and of the click bumps at 128^3
    half_features: bool = False  # keep the 128^3 features in float16 between clicks (inference; saves memory,
    # costs time per click)

    def __post_init__(self) -> None:
        for name in ("stem_channels", "mid_channels", "hi_channels", "hidden_channels"):
            value = getattr(self, name)
            if not 1 <= value <= 256:
                raise ConfigError(f"fullres {name} must be between 1 and 256, got {value}")
        if not 0.25 <= self.click_sigma <= 16:
            raise ConfigError(f"fullres click_sigma must be between 0.25 and 16 ROI voxels, got {self.click_sigma}")


@dataclass(frozen=True)
class ModelConfig:
    """Whole MAIS network: SAM-Med3D backbone plus (optionally) the memory attention."""

    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    memory: MemoryConfig | None = field(default_factory=MemoryConfig)  # None: plain SAM-Med3D
    fullres: FullResConfig | None = None  # the full-resolution mask path; None: SAM-Med3D's 32^3 logits

    def __post_init__(self) -> None:
        enc = self.image_encoder
        if enc.img_size % enc.patch_size:
            raise ConfigError(f"img_size {enc.img_size} is not a multiple of patch_size {enc.patch_size}")
        if enc.embed_dim % enc.num_heads:
            raise ConfigError(f"embed_dim {enc.embed_dim} is not divisible by num_heads {enc.num_heads}")
        if any(not 0 <= i < enc.depth for i in enc.global_attn_indexes):
            raise ConfigError(f"global_attn_indexes {enc.global_attn_indexes} out of range for depth {enc.depth}")
        if 0 < enc.window_size < self.grid_size:
            raise ConfigError(
                f"window_size {enc.window_size} is smaller than the token grid {self.grid_size}; "
                "SAM-Med3D pads the grid up to one window, it never splits it"
            )
        dim = self.embed_dim
        if self.fullres is not None and enc.img_size % 4:
            raise ConfigError(f"the full-resolution head needs img_size divisible by 4, got {enc.img_size}")
        if dim % 3 or dim % 8:
            raise ConfigError(f"prompt embedding dim {dim} must be divisible by 3 (Fourier PE) and 8")
        if self.memory is not None and dim % self.memory.num_heads:
            raise ConfigError(f"prompt embedding dim {dim} not divisible by memory heads {self.memory.num_heads}")

    @property
    def embed_dim(self) -> int:
        """Prompt/image embedding width (the neck's output channels)."""
        return self.image_encoder.out_chans

    @property
    def grid_size(self) -> int:
        """Edge of the image-embedding grid in tokens (8 for a 128 input with 16 patches)."""
        return self.image_encoder.img_size // self.image_encoder.patch_size

    @property
    def low_res_size(self) -> int:
        """Edge of the low-resolution logits (4 x the embedding grid: 32 for the standard model)."""
        return 4 * self.grid_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown fields raise :class:`ConfigError`."""
        try:
            enc = dict(data.get("image_encoder", {}))
            if "global_attn_indexes" in enc:
                enc["global_attn_indexes"] = tuple(enc["global_attn_indexes"])
            memory = data.get("memory")
            fullres = data.get("fullres")
            return cls(
                image_encoder=ImageEncoderConfig(**enc),
                prompt_encoder=PromptEncoderConfig(**data.get("prompt_encoder", {})),
                mask_decoder=MaskDecoderConfig(**data.get("mask_decoder", {})),
                memory=None if memory is None else MemoryConfig(**memory),
                fullres=None if fullres is None else FullResConfig(**fullres),
            )
        except TypeError as exc:
            raise ConfigError(f"model configuration has unknown or missing fields: {exc}") from exc

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with top-level fields replaced (``cfg.replace(memory=None)``)."""
        return dataclasses.replace(self, **changes)


def _tiny() -> ModelConfig:
    # The configuration of ../shared/fixtures/sammed3d_tiny (ref_tiny_config.json): tiny widths, block 0
    # windowed, block 1 global. Used by the equivalence test and fast unit tests.
    return ModelConfig(
        image_encoder=ImageEncoderConfig(embed_dim=96, depth=2, num_heads=3, global_attn_indexes=(1,), out_chans=48),
        mask_decoder=MaskDecoderConfig(iou_head_hidden_dim=32),
        memory=MemoryConfig(num_heads=8, dense_dim=16, mlp_dim=256),
    )


def _small() -> ModelConfig:
    # A smaller backbone for the built-in model trained on CPU: same token grid and prompt width as
    # SAM-Med3D (so clicks, memory and decoder are unchanged), 4 blocks of width 384, all with global
    # attention over the 8^3 tokens: SAM-Med3D's 14^3 padded windows cost 5x more and, with one window
    # covering the whole grid anyway, add nothing but the pad tokens (measured: 1.9 vs 2.4 s per
    # training episode on 2 CPU cores).
    return ModelConfig(
        image_encoder=ImageEncoderConfig(embed_dim=384, depth=4, num_heads=6, window_size=0, global_attn_indexes=()),
    )


def _small_fullres() -> ModelConfig:
    # mais-small with the full-resolution mask path (128^3 logits for a 128^3 ROI instead of 32^3).
    return _small().replace(fullres=FullResConfig())


PRESETS: dict[str, Any] = {
    "sam-med3d-vit-b": ModelConfig,  # SAM-Med3D vit_b_ori (the turbo checkpoint) + MAIS memory attention
    "mais-small": _small,  # small encoder for CPU training
    "mais-small-fr": _small_fullres,  # small encoder + full-resolution mask path
    "sam-med3d-tiny": _tiny,  # the reference fixture's configuration
}


def get_preset(name: str) -> ModelConfig:
    """Configuration of a named preset.

    Raises:
        ConfigError: unknown name (the message lists the known presets).
    """
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}") from None
