"""SAM-Med3D 3-D mask decoder: image embedding + prompt tokens -> low-res mask logits and IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm3d, conv_transpose3d_k2s2
from .config import MaskDecoderConfig
from .transformer import TwoWayTransformer3D


class MaskDecoder3D(nn.Module):
    """Predicts ``(B, M, 4G, 4G, 4G)`` low-res logits (32^3 full size) and ``(B, M)`` IoU scores.

    Args:
        transformer_dim: prompt/image embedding width (384 full size).
        cfg: decoder configuration.
    """

    def __init__(self, transformer_dim: int, cfg: MaskDecoderConfig) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer3D(
            cfg.transformer_depth,
            transformer_dim,
            cfg.transformer_num_heads,
            cfg.transformer_mlp_dim,
            cfg.attention_downsample_rate,
        )
        self.num_mask_tokens = cfg.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, cfg.iou_head_hidden_dim, self.num_mask_tokens, cfg.iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode.

        Args:
            image_embeddings: ``(B or 1, C, G, G, G)``.
            image_pe: ``(1, C, G, G, G)`` dense positional encoding.
            sparse_prompt_embeddings: ``(B, N, C)`` click tokens.
            dense_prompt_embeddings: ``(B, C, G, G, G)``.
            multimask_output: True -> mask tokens 1..3, False -> mask token 0.

        Returns:
            low-res logits ``(B, 1 or 3, 4G, 4G, 4G)`` and IoU predictions ``(B, 1 or 3)`` (no sigmoid).
        """
        masks, iou, _tokens = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]

    def single_mask(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` with ``multimask_output=False``, also returning that mask's output token ``(B, C)`` (what
        the full-resolution head generates its per-click weights from)."""
        masks, iou, tokens = self.predict_masks(image_embeddings, image_pe, sparse, dense)
        return masks[:, :1], iou[:, :1], tokens[:, 0]

    def upscale(self, src: torch.Tensor) -> torch.Tensor:
        """``output_upscaling(src)``: ``(B, C, G, G, G)`` -> ``(B, C/8, 4G, 4G, 4G)``.

        The two transposed convolutions are computed as matrix products (exact; see
        :func:`conv_transpose3d_k2s2`), everything else is the Sequential's own layers.
        """
        up1, ln, act1, up2, act2 = self.output_upscaling
        return act2(conv_transpose3d_k2s2(act1(ln(conv_transpose3d_k2s2(src, up1))), up2))

    def predict_masks(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks ``(B, M, 4G, 4G, 4G)``, IoU predictions ``(B, M)`` and the mask tokens'
        outputs ``(B, M, C)``."""
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        n = tokens.shape[0]
        src = image_embeddings if image_embeddings.shape[0] == n else image_embeddings.repeat_interleave(n, 0)
        src = src + dense
        pos_src = image_pe if image_pe.shape[0] == n else image_pe.repeat_interleave(n, 0)
        b, c, x, y, z = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.upscale(src.transpose(1, 2).reshape(b, c, x, y, z))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, x, y, z = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, x * y * z)).view(b, -1, x, y, z)
        return masks, self.iou_prediction_head(iou_token_out), mask_tokens_out
