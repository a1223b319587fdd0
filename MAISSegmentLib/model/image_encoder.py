"""SAM-Med3D 3-D ViT image encoder, numerically identical to the original, with an exact speed-up.

Input ``(B, 1, 128, 128, 128)`` float (z-normalised ROI, axes in ROI tensor order), output image
embedding ``(B, 384, 8, 8, 8)`` for the full-size model. Token grids are channels-last
``(B, G, G, G, C)`` with ``G = img_size / patch_size``.

Two properties of the original are reproduced on purpose (``docs/SAM-MED3D-SPEC.md``, "Three traps"):

* Relative position bias. The original adds ``rel_d[..., None, None]``, ``rel_h[..., None, :, None]``,
  ``rel_w[..., None, None, :]`` to a 7-D attention tensor ``[b, i1, i2, i3, j1, j2, j3]``; because the
  einsum outputs are 5-D, broadcasting aligns them differently from the textbook decomposition::

      bias[i, j] = q(i1,i2,i3) . R_d[i1,j3] + q(i1,i2,j1) . R_h[i2,j3] + q(i1,i2,j2) . R_w[j2,j3]

  with ``R_a[p, k] = rel_pos_a[p - k + S - 1]`` and ``q`` unscaled. The 2nd and 3rd terms use the query
  at another grid position. Every released checkpoint was trained with this, so we keep it; the
  ``"textbook"`` variant exists only to prove that the equivalence test can fail.
* Window padding. In windowed blocks the 8^3 grid is zero-padded to one 14^3 window *after* ``norm1``;
  the pad tokens are real keys/values (their q/k/v equal the qkv bias), the output is cropped to 8^3.

Exact speed-up (``exact_fast_windows=True``, the default): only the 512 real query rows of a padded
window are computed. Keys/values stay 2744 long, and the query rows ``q(i1, i2, w)`` for ``w`` in the
pad range (needed by the 2nd and 3rd bias terms) equal the q-bias, so no approximation is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock
from .config import ImageEncoderConfig

REL_POS_VARIANTS = ("sam-med3d", "textbook")


def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """``R[p, k] = rel_pos[p - k + size - 1]``: ``(2*size-1, C)`` -> ``(size, size, C)``."""
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


class RelPosAttention3D(nn.Module):
    """Multi-head self-attention over a cubic token grid with SAM-Med3D's relative position bias.

    Args:
        dim: token width C.
        num_heads: number of heads (head width C / num_heads).
        grid_size: edge G of the real token grid (8).
        window_size: edge S >= G of the attended grid; S > G pads with zero tokens (windowed block),
            S == G is a global block.
        exact_fast: compute only the G^3 real query rows (exact); False runs the padded reference.
        rel_pos_variant: ``"sam-med3d"`` (the original's broadcasting) or ``"textbook"``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: int,
        window_size: int,
        exact_fast: bool = True,
        rel_pos_variant: str = "sam-med3d",
    ) -> None:
        super().__init__()
        if rel_pos_variant not in REL_POS_VARIANTS:
            raise ValueError(f"rel_pos_variant must be one of {REL_POS_VARIANTS}, got {rel_pos_variant!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.grid_size = grid_size
        self.window_size = window_size
        self.exact_fast = exact_fast
        self.rel_pos_variant = rel_pos_variant
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        n_rel = 2 * window_size - 1
        self.rel_pos_d = nn.Parameter(torch.zeros(n_rel, self.head_dim))  # table along grid axis 0
        self.rel_pos_h = nn.Parameter(torch.zeros(n_rel, self.head_dim))  # table along grid axis 1
        self.rel_pos_w = nn.Parameter(torch.zeros(n_rel, self.head_dim))  # table along grid axis 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the (padded) window.

        Args:
            x: ``(B, G, G, G, C)`` normalised real tokens (after ``norm1``).

        Returns:
            ``(B, G, G, G, C)`` attention output for the real tokens.
        """
        b, g = x.shape[0], x.shape[1]
        s, h, c = self.window_size, self.num_heads, self.head_dim
        if self.exact_fast or s == g:
            # q/k/v of the real tokens; pad tokens are zero after norm1, so their q/k/v is the bias.
            qkv_real = self.qkv(x)  # (B, G, G, G, 3C)
            if s > g:
                qkv = self.qkv.bias.expand(b, s, s, s, -1).clone()
                qkv[:, :g, :g, :g] = qkv_real
            else:
                qkv = qkv_real
            n_query = g
        else:
            # Padded reference: exactly the original's computation on all S^3 tokens.
            qkv = self.qkv(F.pad(x, (0, 0, 0, s - g, 0, s - g, 0, s - g)))
            n_query = s
        qkv = qkv.reshape(b, s**3, 3, h, c).permute(2, 0, 3, 1, 4).reshape(3, b * h, s, s, s, c)
        q, k, v = qkv.unbind(0)  # each (B*h, S, S, S, c)
        out = self._attend(q, k.reshape(b * h, s**3, c), v.reshape(b * h, s**3, c), n_query)
        out = out.view(b, h, n_query, n_query, n_query, c).permute(0, 2, 3, 4, 1, 5)
        out = out[:, :g, :g, :g].reshape(b, g, g, g, h * c)
        return self.proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
        """Softmax attention of the first ``n``^3 query rows of the window.

        ``q`` is ``(B*h, S, S, S, c)`` over the whole window; ``k``, ``v`` are ``(B*h, S^3, c)``.
        Returns ``(B*h, n^3, c)``.
        """
        bh, s, c = q.shape[0], self.window_size, self.head_dim
        q_rows = q[:, :n, :n]  # (B*h, n, n, S, c): query rows (i1, i2, w) for every w of the window
        q_real = q_rows[:, :, :, :n]  # (B*h, n, n, n, c)
        attn = (q_real.reshape(bh, n**3, c) * self.scale) @ k.transpose(-2, -1)  # (B*h, n^3, S^3)
        r_d = relative_position_table(self.rel_pos_d, s)  # (S, S, c) indexed [p, k]
        r_h = relative_position_table(self.rel_pos_h, s)
        r_w = relative_position_table(self.rel_pos_w, s)
        a7 = attn.view(bh, n, n, n, s, s, s)  # [b, i1, i2, i3, j1, j2, j3]
        if self.rel_pos_variant == "sam-med3d":
            rel_d = torch.einsum("bdhwc,dkc->bdhwk", q_real, r_d[:n])  # [b,i1,i2,i3,j3]
            rel_h = torch.einsum("bdhwc,hkc->bdhwk", q_rows, r_h[:n])  # [b,i1,i2,j1,j3] (query at w=j1)
            rel_w = torch.einsum("bdhwc,wkc->bdhwk", q_rows, r_w)  # [b,i1,i2,j2,j3] (query at w=j2)
            a7 += rel_d[:, :, :, :, None, None, :]
            a7 += rel_h[:, :, :, None, :, None, :]
            a7 += rel_w[:, :, :, None, None, :, :]
        else:  # textbook decomposition: each axis pairs query and key coordinates of that axis
            rel_d = torch.einsum("bdhwc,dkc->bdhwk", q_real, r_d[:n])  # [b,i1,i2,i3,j1]
            rel_h = torch.einsum("bdhwc,hkc->bdhwk", q_real, r_h[:n])  # [b,i1,i2,i3,j2]
            rel_w = torch.einsum("bdhwc,wkc->bdhwk", q_real, r_w[:n])  # [b,i1,i2,i3,j3]
            a7 += rel_d[:, :, :, :, :, None, None]
            a7 += rel_h[:, :, :, :, None, :, None]
            a7 += rel_w[:, :, :, :, None, None, :]
        return attn.softmax(dim=-1) @ v


class Block3D(nn.Module):
    """Pre-norm ViT block: ``x += attn(norm1(x))``; ``x += mlp(norm2(x))``. Tokens ``(B, G, G, G, C)``."""

    def __init__(self, cfg: ImageEncoderConfig, window_size: int, rel_pos_variant: str = "sam-med3d") -> None:
        super().__init__()
        dim, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = RelPosAttention3D(
            dim,
            cfg.num_heads,
            grid_size=grid,
            window_size=window_size if window_size > 0 else grid,
            exact_fast=cfg.exact_fast_windows,
            rel_pos_variant=rel_pos_variant,
        )
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MLPBlock(dim, int(dim * cfg.mlp_ratio), nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Conv3d patchify: ``(B, 1, D, H, W)`` -> channels-last ``(B, D/p, H/p, W/p, C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class ImageEncoderViT3D(nn.Module):
    """The SAM-Med3D image encoder (``vit_b_ori`` layout at the default configuration)."""

    def __init__(self, cfg: ImageEncoderConfig, rel_pos_variant: str = "sam-med3d") -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, cfg.embed_dim))  # absolute PE
        self.blocks = nn.ModuleList(
            Block3D(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size, rel_pos_variant)
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm3d(cfg.out_chans),
            nn.Conv3d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(cfg.out_chans),
        )

    def set_exact_fast_windows(self, enabled: bool) -> None:
        """Switch the exact windowed speed-up on (default) or run the padded reference attention."""
        for blk in self.blocks:
            blk.attn.exact_fast = enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode an ROI.

        Args:
            x: ``(B, in_chans, S, S, S)`` float with ``S = img_size`` (128), ROI tensor axis order.

        Returns:
            Image embedding ``(B, out_chans, G, G, G)`` (``(B, 384, 8, 8, 8)`` for the full model).
        """
        size = self.cfg.img_size
        if x.ndim != 5 or tuple(x.shape[1:]) != (self.cfg.in_chans, size, size, size):
            raise ValueError(
                f"image encoder expects (B, {self.cfg.in_chans}, {size}, {size}, {size}), got {tuple(x.shape)}"
            )
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
