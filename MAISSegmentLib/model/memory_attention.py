"""MAIS memory attention: conditions the image embedding on every past interaction of the object.

Block (``docs/MAIS-SPEC.md`` section 1; about 2.84 M parameters at d = 384)::

    S  = sparse memory tokens of all entries                 (T, C)
    S' = S + SelfAttn(LN_s(S))                                pre-norm, 8 heads
    E  = E + ConvAttn(LN_d(dense memories), query = newest)   per voxel, along the memory axis
    E  = E + CrossAttn(q = LN_c(E) + PE, k = v = LN_k(S'))    image tokens -> sparse memory
    E  = E + MLP(LN_m(E))                                     384 -> 2048 -> 384, ReLU
    E' = LN_f(E)

Choices where the paper is silent (tested in ``Testing/test_memory.py``):

* The current interaction is pushed into the bank *before* the attention runs, so the newest dense
  memory is the conv-attention query and the newest click is among the sparse memories.
* The first interaction of an object uses the image embedding unconditioned (paper); from the second
  on, the conditioned embedding is used.
* The decoder sees all clicks so far, as SAM-Med3D does (``MemoryConfig.decoder_clicks = "all"``; set
  ``"newest"`` to give it only the latest click and leave the rest to the memory). This also makes the
  memory-off path exactly SAM-Med3D's inference loop on the same weights.
* No learned slot or time embeddings: clicks are a set (the self-attention is permutation-invariant
  over the sparse memory); recency enters through the conv-attention query, which is the newest mask.
* The output projections of the three residual branches (conv attention, cross-attention, MLP) start at
  zero, so a freshly initialised block only re-normalises the embedding: it does not scramble the
  decoder of a loaded SAM-Med3D checkpoint before it is trained.
* Incremental: the per-entry projections (LN + q/k/v of the sparse self-attention, LN + k/v of the
  dense memory) are cached on the bank entry and never recomputed when an interaction is added. What
  depends on the whole set (the self-attention mixing over <= N tokens, and the cross-attention keys
  and values made from its output, ``T x C x 2C`` multiply-adds) is recomputed each click; it is tiny.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import MemoryBank, MemoryEntry
from .common import LayerNorm3d
from .config import MemoryConfig


class MemoryAttention(nn.Module):
    """Memory attention over a :class:`MemoryBank`.

    Args:
        dim: embedding width C (384 full size).
        cfg: memory configuration (heads, dense q/k/v width, MLP width).
    """

    def __init__(self, dim: int, cfg: MemoryConfig) -> None:
        super().__init__()
        self.dim, self.num_heads, self.dense_dim = dim, cfg.num_heads, cfg.dense_dim
        # 1. self-attention over the sparse memory tokens (pre-norm)
        self.sparse_norm = nn.LayerNorm(dim)
        self.sparse_qkv = nn.Linear(dim, 3 * dim)
        self.sparse_out = nn.Linear(dim, dim)
        # 2. convolutional attention over the dense memories (1x1x1 convs, pre-norm over channels)
        self.dense_norm = LayerNorm3d(dim)
        self.dense_q = nn.Conv3d(dim, cfg.dense_dim, 1)
        self.dense_k = nn.Conv3d(dim, cfg.dense_dim, 1)
        self.dense_v = nn.Conv3d(dim, cfg.dense_dim, 1)
        self.dense_out = nn.Conv3d(cfg.dense_dim, dim, 1)
        # 3. cross-attention image tokens (+ dense PE) -> sparse memory
        self.cross_norm = nn.LayerNorm(dim)  # on the image-token queries
        self.cross_memory_norm = nn.LayerNorm(dim)  # on the memory keys/values
        self.cross_q = nn.Linear(dim, dim)
        self.cross_k = nn.Linear(dim, dim)
        self.cross_v = nn.Linear(dim, dim)
        self.cross_out = nn.Linear(dim, dim)
        # 4. MLP and final norm
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, dim))
        self.final_norm = nn.LayerNorm(dim)
        for layer in (self.dense_out, self.cross_out, self.mlp[2]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ----------------------------------------------------------------- per-entry projections (cached)
    def _cache_key(self) -> tuple:
        # Any in-place update of the weights (optimizer step, load_state_dict) bumps a version counter,
        # which invalidates projections cached under the old weights.
        return (id(self), tuple(p._version for p in self.parameters()))

    def project_entry(self, entry: MemoryEntry, key: tuple | None = None) -> dict[str, torch.Tensor]:
        """Projections of one entry, computed once per set of weights (``key``: :meth:`_cache_key`, when the caller
        has it already: a forward computes it once for all its entries).

        Returns a dict with ``sparse_qkv`` ``(T, 3C)`` and/or ``dense_k``/``dense_v`` ``(d, G^3)``.
        """
        key = self._cache_key() if key is None else key
        if entry.cache.get("key") == key:
            return entry.cache["proj"]
        proj: dict[str, torch.Tensor] = {}
        if entry.sparse is not None:
            proj["sparse_qkv"] = self.sparse_qkv(self.sparse_norm(entry.sparse))
        if entry.dense is not None:
            normed = self.dense_norm(entry.dense.unsqueeze(0))
            # the query is only ever used while the entry is the newest, but it is computed here, once
            # float32 even under a bfloat16 autocast: the readout over N memories is element-wise work, which a CPU
            # does slower in bfloat16 than in float32
            proj["dense_k"] = self.dense_k(normed).reshape(self.dense_dim, -1).float()  # (d, G^3)
            proj["dense_v"] = self.dense_v(normed).reshape(self.dense_dim, -1).float()
            proj["dense_q"] = self.dense_q(normed).reshape(self.dense_dim, -1).float()
        entry.cache["key"], entry.cache["proj"] = key, proj
        return proj

    # ------------------------------------------------------------------------- low-precision inference
    def _linear(
        self, layer: nn.Module, x: torch.Tensor, key: tuple, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``layer(x)`` (a Linear, or a 1x1x1 Conv3d's ``weight`` flattened, on ``(..., C)`` tokens).

        Under a bfloat16 autocast without autograd (``MAISModel.inference_dtype``), the weights' low-precision copies
        are made once per set of weights (``key``: the forward's :meth:`_cache_key`) instead of at every click:
        autocast alone re-casts each weight at each call, which made the memory's share of a click on a CPU ~40%
        copies."""
        w = layer.weight if weight is None else weight
        device = x.device.type
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(device):
            return F.linear(x, w, layer.bias)
        dtype = torch.get_autocast_dtype(device)
        key = (key, dtype)
        cache = self.__dict__.setdefault("_low_precision", {"key": None})
        if cache["key"] != key:
            cache.clear()
            cache["key"] = key
        pair = cache.get(id(layer))
        if pair is None:
            bias = None if layer.bias is None else layer.bias.to(dtype)
            pair = cache[id(layer)] = (w.to(dtype), bias)
        return F.linear(x.to(dtype), *pair)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, bank: MemoryBank) -> torch.Tensor:
        """Condition the image embedding on the memory.

        Args:
            image_embedding: ``(1, C, G, G, G)`` from the image encoder (one object, batch 1).
            image_pe: ``(1, C, G, G, G)`` dense positional encoding.
            bank: the object's memory (at least one entry).

        Returns:
            Memory-conditioned embedding ``(1, C, G, G, G)``.
        """
        if len(bank) == 0:
            raise ValueError("memory attention needs at least one memory entry")
        _, c, g0, g1, g2 = image_embedding.shape
        x = image_embedding.flatten(2).transpose(1, 2)  # (1, G^3, C)
        key = self._cache_key()  # once per click: it reads every parameter's version
        projs = [self.project_entry(e, key) for e in bank.entries]
        if bank.keeps_dense:
            x = x + self._dense_attention(bank, projs, key).unsqueeze(0)
        if bank.keeps_sparse:
            memory = self._sparse_self_attention(bank, projs, key)  # (1, T, C)
            q = self.cross_norm(x) + image_pe.flatten(2).transpose(1, 2)
            mem = self.cross_memory_norm(memory)
            attended = self._mha(
                self._linear(self.cross_q, q, key),
                self._linear(self.cross_k, mem, key),
                self._linear(self.cross_v, mem, key),
            )
            x = x + self._linear(self.cross_out, attended, key)
        hidden = F.relu(self._linear(self.mlp[0], self.mlp_norm(x), key))
        x = x + self._linear(self.mlp[2], hidden, key)
        x = self.final_norm(x)
        return x.transpose(1, 2).reshape(1, c, g0, g1, g2)

    def _dense_attention(self, bank: MemoryBank, projs: list[dict[str, torch.Tensor]], key: tuple) -> torch.Tensor:
        """Per voxel, attention of the newest dense memory over all dense memories -> ``(G^3, C)``.

        Keys/values live in ring buffers ``(N, d, G^3)`` on the bank, entry ``i`` in slot ``i mod N``:
        a click writes only its own slot (softmax over the memory axis does not depend on order).
        """
        q = projs[-1]["dense_q"]  # (d, V)
        if torch.is_grad_enabled():
            # training: the ring buffer is updated in place, which autograd cannot allow while an earlier
            # click's graph still reads it; stack functionally instead (same numbers)
            k = torch.stack([p["dense_k"] for p in projs])
            v = torch.stack([p["dense_v"] for p in projs])
            return self._dense_readout(q, k, v, key)
        n = len(bank)
        ring = bank.cache.get("dense_ring")
        if ring is None or ring["key"] != key:
            shape = (bank.capacity, *projs[-1]["dense_k"].shape)
            ring = {
                "key": key,
                "k": projs[-1]["dense_k"].new_zeros(shape),
                "v": projs[-1]["dense_v"].new_zeros(shape),
                "held": [-1] * bank.capacity,
            }
            bank.cache["dense_ring"] = ring
        for entry, proj in zip(bank.entries, projs):
            slot = entry.index % bank.capacity
            if ring["held"][slot] != entry.uid:
                ring["k"][slot], ring["v"][slot] = proj["dense_k"], proj["dense_v"]
                ring["held"][slot] = entry.uid
        k, v = ring["k"][:n], ring["v"][:n]  # after eviction n == capacity: every slot is a live entry
        return self._dense_readout(q, k, v, key)

    def _dense_readout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: tuple) -> torch.Tensor:
        """Softmax over the memory axis per voxel: ``q (d, V)``, ``k``/``v`` ``(n, d, V)`` -> ``(V, C)``."""
        # broadcast multiply-sum: on CPU several times faster than einsum/bmm at these shapes
        weights = torch.softmax((q.unsqueeze(0) * k).sum(1) * self.dense_dim**-0.5, dim=0)  # (n, V)
        out = (weights.unsqueeze(1) * v).sum(0)  # (d, V)
        return self._linear(self.dense_out, out.t(), key, self.dense_out.weight.flatten(1))  # (V, C)

    def _sparse_self_attention(
        self, bank: MemoryBank, projs: list[dict[str, torch.Tensor]], key: tuple
    ) -> torch.Tensor:
        tokens = torch.cat([e.sparse for e in bank.entries]).unsqueeze(0)  # (1, T, C)
        qkv = torch.cat([p["sparse_qkv"] for p in projs]).unsqueeze(0)  # (1, T, 3C)
        q, k, v = qkv.chunk(3, dim=-1)
        return tokens + self._linear(self.sparse_out, self._mha(q, k, v), key)

    def _mha(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of projected ``q (1, Nq, C)`` over ``k``/``v`` ``(1, Nk, C)``."""
        h = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(q.shape)
