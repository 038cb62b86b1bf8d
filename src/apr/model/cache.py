"""Preallocated KV cache: one (k, v) pair of fixed-size buffers per layer.

Buffers are allocated once (rounded up to whole ALIGN-token pages so growing requests rarely reallocate)
and reused across requests; positions beyond the current length are never read (attention is limited to
[0, pos + T), or masked in the static decode step), so nothing leaks between requests.
"""

from __future__ import annotations

import torch

ALIGN = 256


class KVCache(torch.nn.Module):
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.capacity = capacity  # positions callers may use (checked by the Transformer)
        size = -(-capacity // ALIGN) * ALIGN  # the buffers' length: capacity rounded up
        shape = (n_layers, 1, n_kv_heads, size, head_dim)  # (L, B=1, KV, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def size(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, KV, T, hd) at [pos, pos+T) and return the valid prefix (1, KV, pos+T, hd)."""
        t = k.shape[2]
        self.k[layer, :, :, pos : pos + t] = k
        self.v[layer, :, :, pos : pos + t] = v
        return self.k[layer, :, :, : pos + t], self.v[layer, :, :, : pos + t]

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape update for graph capture: write k, v (1, KV, 1, hd) at tensor position `pos` (1,)
        and return the whole buffers (1, KV, S, hd); the caller masks keys beyond pos."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]
