"""SAM's two-way transformer in 3-D: tokens attend to image tokens and back (mask decoder core)."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections, optionally at ``dim / downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"internal dim {self.internal_dim} not divisible by {num_heads} heads")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q (B, Nq, C)``, ``k``/``v`` ``(B, Nk, C)`` -> ``(B, Nq, C)``."""
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        attn = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        out = attn.softmax(dim=-1) @ v
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock3D(nn.Module):
    """Self-attention of tokens, token->image, MLP, image->token (post-norm, as in SAM)."""

    def __init__(
        self, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe  # layer 0: no residual, no PE in self-attention

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    """Two-way transformer over ``(B, C, G, G, G)`` image tokens and ``(B, N, C)`` prompt tokens."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns processed tokens ``(B, N, C)`` and image tokens ``(B, G^3, C)``."""
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image(q=queries + point_embedding, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn_out), keys
