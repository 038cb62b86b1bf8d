"""Preallocated KV cache: one (k, v) pair of fixed-size buffers per layer.

Buffers are allocated once for a capacity and reused across requests; positions beyond the current
length are never read (attention is limited to [0, pos + T)), so nothing leaks between requests.
"""

from __future__ import annotations

import torch


class KVCache(torch.nn.Module):
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.capacity = capacity
        shape = (n_layers, 1, n_kv_heads, capacity, head_dim)  # (L, B=1, KV, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (1, KV, T, hd) at [pos, pos+T) and return the valid prefix (1, KV, pos+T, hd)."""
        t = k.shape[2]
        self.k[layer, :, :, pos : pos + t] = k
        self.v[layer, :, :, pos : pos + t] = v
        return self.k[layer, :, :, : pos + t], self.v[layer, :, :, : pos + t]
