"""SAM-Med3D 3-D prompt encoder: clicks -> sparse tokens, previous mask -> dense embedding.

Click coordinates are ROI voxel indices in ROI tensor axis order ``(dim2, dim3, dim4)`` of the
``(B, 1, 128, 128, 128)`` input, as ``torch.argwhere`` returns them on a ``(D, H, W)`` mask.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding with a persistent ``(3, dim/3)`` Gaussian buffer.

    Features of a point ``c`` in [0, 1]^3 are ``[sin, cos, sin]`` of ``2 pi (2c - 1) G`` (width ``dim``).
    The repeated ``sin`` is the original's and is kept for checkpoint compatibility.
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def dense(self, size: int) -> torch.Tensor:
        """Dense PE ``(dim, size, size, size)`` of the embedding grid.

        The grid point of index ``(a0, a1, a2)`` is encoded at ``((a1+.5)/s, (a0+.5)/s, (a2+.5)/s)``:
        axes 0 and 1 are swapped relative to the point encoding, exactly as in SAM-Med3D.
        """
        device = self.positional_encoding_gaussian_matrix.device
        centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
        a0, a1, a2 = torch.meshgrid(centres, centres, centres, indexing="ij")
        return self._pe_encoding(torch.stack([a1, a0, a2], dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """PE of points ``(B, N, 3)`` given in voxels of an ``image_size``^3 ROI -> ``(B, N, dim)``."""
        return self._pe_encoding(coords.float() / image_size)


class PromptEncoder3D(nn.Module):
    """Encodes clicks and the previous low-res mask.

    Args:
        embed_dim: prompt embedding width (384 full size).
        grid_size: image-embedding grid edge (8).
        input_size: ROI edge in voxels (128).
        mask_in_chans: channels of the mask-downscaling stack (16).
    """

    def __init__(self, embed_dim: int, grid_size: int, input_size: int, mask_in_chans: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.grid_size = grid_size
        self.input_size = input_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(2)])  # 0: exclude, 1: include
        self.not_a_point_embed = nn.Embedding(1, embed_dim)  # pad point (label -1)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Dense positional encoding of the image embedding, ``(1, embed_dim, G, G, G)``."""
        return self.pe_layer.dense(self.grid_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool = True) -> torch.Tensor:
        """Click tokens.

        Args:
            points: ``(B, N, 3)`` ROI voxel indices (tensor axis order).
            labels: ``(B, N)``: 1 include, 0 exclude, -1 not a point.
            pad: append a (0, 0, 0) point with label -1, as SAM-Med3D does when no box is given.

        Returns:
            ``(B, N (+1), embed_dim)``.
        """
        points = points.float() + 0.5
        labels = labels.to(points.device)
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 3)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
        emb = emb + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        return emb

    def embed_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """Previous low-res logits ``(B, 1, 4G, 4G, 4G)`` -> dense embedding ``(B, embed_dim, G, G, G)``."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM-Med3D's call: ``(sparse (B, N+1, C), dense (B, C, G, G, G))``. Boxes are not supported."""
        if boxes is not None:
            raise NotImplementedError("box prompts are not part of SAM-Med3D's 3-D prompt encoder")
        if points is not None:
            bs = points[0].shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((bs, 0, self.embed_dim), device=device)
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(points[0], points[1], pad=True)], dim=1)
        if masks is not None:
            dense = self.embed_mask(masks)
        else:
            g = self.grid_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(bs, -1, g, g, g)
        return sparse, dense
