"""The full-resolution mask path: ROI-resolution logits (128^3 at 1.5 mm) instead of SAM-Med3D's 32^3.

SAM-Med3D's decoder predicts 32^3 logits for a 128^3 ROI, a 6 mm grid: upsampled, no model can exceed a Dice of about
0.74 on our test split (thin and small structures far less). This head refines those logits on the ROI's own grid, in
the spirit of SAM 2's high-resolution skip features and RefSAM3D's hierarchical decoder, under a CPU budget:

* once per ROI (like the encoder embedding, cached by the session): a light convolutional stem on the ROI image gives
  features at 64^3 (``mid_channels``) and at 128^3 (``hi_channels``), see :meth:`FullResHead.encode`;
* per click, nothing but point-wise operations: at 64^3 a small MLP over [stem features, the decoder's logits upsampled,
  the previous full-resolution mask, include/exclude click maps] followed by a dot product with weights generated from
  the decoder's mask token (SAM's hypernetwork idea, here per object and per click); at 128^3 the upsampled result
  plus a second token-generated dot product with the 128^3 features, plus learned bumps exactly at the clicks, so a
  correction click acts where it was placed.

The projections producing the per-click corrections start at zero, so an untrained head outputs the decoder's logits
upsampled (the behaviour without the head): SAM-Med3D checkpoints load unchanged and ``mais finetune`` trains the head.
Its state-dict prefix is ``fullres_head.``.

Shapes use ROI tensor order (R, A, S) like the rest of the network: logits ``(B, 1, n, n, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import FullResConfig

FULLRES_PREFIX = "fullres_head."


@dataclass
class FullResFeatures:
    """Once-per-ROI image features of :meth:`FullResHead.encode`.

    Attributes:
        mid: ``(1, mid_channels, n/2, n/2, n/2)`` features at half the ROI resolution (64^3).
        hi: ``(1, hi_channels, n, n, n)`` features at the ROI resolution (128^3), stored in ``store_dtype``.
    """

    mid: torch.Tensor
    hi: torch.Tensor


class FullResHead(nn.Module):
    """ROI-resolution mask logits from once-per-ROI image features, the decoder's output and the clicks.

    Args:
        transformer_dim: width of the decoder's mask token (the prompt embedding width, 384).
        img_size: ROI edge in voxels (128).
        cfg: :class:`~MAISSegmentLib.model.config.FullResConfig`.
    """

    def __init__(self, transformer_dim: int, img_size: int, cfg: FullResConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = img_size
        mid, hi, hidden = cfg.mid_channels, cfg.hi_channels, cfg.hidden_channels
        self.stem_hi = nn.Conv3d(1, hi, kernel_size=3, padding=1)  # 128^3, once per ROI
        self.stem_mid = nn.Sequential(  # 128^3 -> 64^3, once per ROI
            nn.Conv3d(1, cfg.stem_channels, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv3d(cfg.stem_channels, mid, kernel_size=3, padding=1),
            nn.GELU(),
        )
        # point-wise at 64^3 over [mid features | coarse logits, previous mask, include map, exclude map]: linear
        # layers over the channels, applied as matrix products on (C, voxels); the mid features' part of the first
        # layer does not depend on the clicks and is computed once per ROI (FullResFeatures.mid)
        self.mix_image = nn.Linear(mid, hidden)
        self.mix_prompt = nn.Linear(4, hidden, bias=False)
        self.mix2 = nn.Linear(hidden, hidden)
        self.hyper_mid = nn.Linear(transformer_dim, hidden + 1)  # token -> weights (and bias) over the mix
        self.hyper_hi = nn.Linear(transformer_dim, hi + 1)  # token -> weights (and bias) over the 128^3 features
        self.click_gain = nn.Parameter(torch.zeros(2))  # logit bumps at include / exclude clicks (128^3)
        for layer in (self.hyper_mid, self.hyper_hi):  # start as "the decoder's logits, upsampled"
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------------------------------ once per ROI
    def encode(self, image: torch.Tensor) -> FullResFeatures:
        """Image features of one ROI (compute once, reuse for every click in it).

        Args:
            image: ``(1, 1, n, n, n)`` the z-normalised ROI (the encoder's input).
        """
        mid = self.stem_mid(image).flatten(2)  # (1, mid, h^3)
        mid = self.mix_image.weight @ mid + self.mix_image.bias[:, None]  # (1, hidden, h^3)
        hi = F.gelu(self.stem_hi(image)).flatten(2)  # (1, hi, n^3)
        return FullResFeatures(mid, hi.to(_store_dtype(self.cfg, hi)))

    # ------------------------------------------------------------------------------------------ per click
    def forward(
        self,
        features: FullResFeatures,
        low_res_logits: torch.Tensor,
        mask_token: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
        prev_full: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full-resolution logits of one step.

        Args:
            features: :meth:`encode` of the ROI.
            low_res_logits: ``(B, 1, s, s, s)`` the decoder's logits (s = n/4 = 32).
            mask_token: ``(B, C)`` the decoder's output mask token.
            points: ``(B, t, 3)`` every click so far, ROI voxel indices (R, A, S).
            labels: ``(B, t)`` 1 include, 0 exclude.
            prev_full: ``(B, 1, n, n, n)`` the previous step's full-resolution logits (None: first click).

        Returns:
            ``(B, 1, n, n, n)`` logits on the ROI grid.
        """
        n = self.img_size
        half = n // 2
        b = low_res_logits.shape[0]
        coarse = F.interpolate(low_res_logits, size=(half,) * 3, mode="trilinear", align_corners=False)
        if prev_full is None:
            prev = torch.zeros_like(coarse)
        else:
            prev = F.avg_pool3d(torch.sigmoid(prev_full.to(coarse.dtype)), kernel_size=2)
        include, exclude = click_maps(points, labels, half, n, self.cfg.click_sigma / 2, coarse.dtype)
        prompt = torch.cat([coarse, prev, include, exclude], dim=1).flatten(2)  # (B, 4, h^3)
        x = F.relu(features.mid.to(coarse.dtype) + self.mix_prompt.weight @ prompt)
        x = F.relu(self.mix2.weight @ x + self.mix2.bias[:, None])  # (B, H, h^3)
        w = self.hyper_mid(mask_token)  # (B, H + 1): per-object weights over the mix, and a bias
        correction = (w[:, None, :-1] @ x).view(b, 1, half, half, half) + w[:, -1].view(b, 1, 1, 1, 1)
        logits = F.interpolate(coarse + correction, size=(n,) * 3, mode="trilinear", align_corners=False)
        w_hi = self.hyper_hi(mask_token)  # (B, c + 1)
        hi = features.hi.to(logits.dtype)  # (1 or B, c, n^3)
        flat = logits.view(b, n**3)
        if b == 1 and not torch.is_grad_enabled():
            flat.add_(w_hi[0, -1]).addmm_(w_hi[:, :-1], hi[0])  # in place: no 8 MB temporaries per click
        else:
            flat = flat + (w_hi[:, None, :-1] @ hi)[:, 0] + w_hi[:, -1:]
        return add_click_bumps(flat.view(b, 1, n, n, n), points, labels, self.click_gain, self.cfg.click_sigma)


def _store_dtype(cfg: FullResConfig, tensor: torch.Tensor) -> torch.dtype:
    """The 128^3 features may be kept in half precision at inference (``half_features``: 16 MB instead of 32 MB
    per ROI for 4 channels, at ~20 ms per click to convert them back on a CPU)."""
    return torch.float16 if cfg.half_features and not tensor.requires_grad else tensor.dtype


def _windows(centres: torch.Tensor, radius: int, size: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The voxels of a window of ``radius`` around each rounded centre and their Gaussian weights, for every click at
    once (no Python loop over clicks: a click costs the same at the 80th as at the first).

    Args:
        centres: ``(B, t, 3)`` continuous positions in a grid of ``size``^3 (tensor axis order).

    Returns:
        ``(flat, weight)``, both ``(B, t, w, w, w)`` with ``w = 2 * radius + 1``: flat indices into the ``size``^3 grid
        and ``exp(-d^2 / 2 sigma^2)`` for the voxels inside the grid, 0 (at a clamped index) for those outside.
    """
    c = centres.round().long().clamp(0, size - 1)  # (B, t, 3)
    offsets = torch.arange(-radius, radius + 1, device=centres.device)
    idx = c[..., None] + offsets  # (B, t, 3, w)
    inside = (idx >= 0) & (idx < size)
    g = torch.exp(-((idx.to(centres.dtype) - centres[..., None]) ** 2) / (2 * sigma**2)) * inside
    idx = idx.clamp(0, size - 1)
    weight = g[:, :, 0, :, None, None] * g[:, :, 1, None, :, None] * g[:, :, 2, None, None, :]
    flat = (idx[:, :, 0, :, None, None] * size + idx[:, :, 1, None, :, None]) * size + idx[:, :, 2, None, None, :]
    return flat, weight


def click_maps(
    points: torch.Tensor, labels: torch.Tensor, size: int, roi_size: int, sigma: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Include and exclude click maps ``(B, 1, size, size, size)``: the maximum of Gaussians (``sigma`` voxels of
    this grid) at the clicks, each written in a window of 3 sigma around its click (no full-grid distance)."""
    b, t = points.shape[:2]
    radius = max(1, int(3 * sigma + 0.5))
    centres = (points.float() + 0.5) * (size / roi_size) - 0.5  # (B, t, 3) in this grid
    flat, weight = _windows(centres, radius, size, sigma)
    channel = (labels <= 0.5).long()  # 0 include, 1 exclude
    flat = flat + (channel * size**3).view(b, t, 1, 1, 1)
    maps = torch.zeros(b, 2 * size**3, dtype=dtype, device=points.device)
    maps.scatter_reduce_(1, flat.reshape(b, -1), weight.reshape(b, -1).to(dtype), reduce="amax")
    maps = maps.view(b, 2, size, size, size)
    return maps[:, :1], maps[:, 1:]


def add_click_bumps(
    logits: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, gain: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``logits`` plus ``gain[0]`` (include) / ``-gain[1]`` (exclude) times a Gaussian of ``sigma`` voxels at each
    click, added in a window of 3 sigma around it: the clicks' own voxels, at full resolution. In place without
    autograd; a new tensor with it."""
    b, n = logits.shape[0], logits.shape[-1]
    radius = max(1, int(3 * sigma + 0.5))
    flat, weight = _windows(points.float(), radius, n, sigma)
    signed = torch.where(labels > 0.5, gain[0], -gain[1]).to(logits.dtype)  # (B, t)
    src = (weight.to(logits.dtype) * signed[:, :, None, None, None]).reshape(b, -1)
    if not torch.is_grad_enabled():
        logits.view(b, -1).scatter_add_(1, flat.reshape(b, -1), src)
        return logits
    return logits.reshape(b, -1).scatter_add(1, flat.reshape(b, -1), src).view_as(logits)
