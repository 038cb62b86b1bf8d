"""Preallocated KV cache: one (k, v) pair of fixed-size buffers per layer, with one slot per sequence.

Buffers are allocated once (rounded up to whole ALIGN-token pages so growing requests rarely reallocate)
and reused across requests; positions beyond a sequence's current length are never read (attention is
limited to [0, pos + T), or masked in the static decode step), so nothing leaks between requests or slots.
A slot is one sequence's rows: the batched engine (apr.engine) gives each running request its own slot.
"""

from __future__ import annotations

import torch

ALIGN = 256


class KVCache(torch.nn.Module):
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device=None,
                 slots: int = 1):
        super().__init__()
        self.capacity = capacity  # positions callers may use (checked by the Transformer)
        size = -(-capacity // ALIGN) * ALIGN  # the buffers' length: capacity rounded up
        shape = (n_layers, slots, n_kv_heads, size, head_dim)  # (L, slots, KV, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def size(self) -> int:
        return self.k.shape[3]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def grown(self, capacity: int, slots: int) -> "KVCache":
        """A cache with room for `capacity` positions and `slots` sequences holding this one's contents."""
        new = KVCache(self.k.shape[0], self.k.shape[2], self.k.shape[4], max(capacity, self.size), self.k.dtype,
                      self.k.device, max(slots, self.slots))
        s, n = self.size, self.slots
        new.k[:, :n, :, :s] = self.k
        new.v[:, :n, :, :s] = self.v
        new.capacity = max(capacity, self.capacity)
        return new

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, KV, T, hd) at [pos, pos+T) of `slot` and return its valid prefix (1, KV, pos+T, hd)."""
        t = k.shape[2]
        self.k[layer, slot : slot + 1, :, pos : pos + t] = k
        self.v[layer, slot : slot + 1, :, pos : pos + t] = v
        return self.k[layer, slot : slot + 1, :, : pos + t], self.v[layer, slot : slot + 1, :, : pos + t]

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape update for graph capture (slot 0): write k, v (1, KV, 1, hd) at tensor position `pos` (1,)
        and return the whole buffers (1, KV, S, hd); the caller masks keys beyond pos."""
        self.k[layer, :1].index_copy_(2, pos, k)
        self.v[layer, :1].index_copy_(2, pos, v)
        return self.k[layer, :1], self.v[layer, :1]
