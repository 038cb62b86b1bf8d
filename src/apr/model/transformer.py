"""One Transformer for the llama and qwen2 architectures; their differences are ModelConfig flags.

Module names follow the GGUF tensor names (`token_embd`, `blk.N.attn_q`, `ffn_gate`, `output`, ...),
so a GGUF tensor `blk.3.attn_q.weight` is the raw blocks of module `blk.3.attn_q`: no renaming table.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from apr.model.cache import KVCache
from apr.model.config import ModelConfig
from apr.quant import QuantEmbedding, QuantLinear

# A tap sees (layer index, point name, activation) at every traced point; None costs one branch.
Tap = Callable[[int, str, torch.Tensor], None]


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the compute dtype, as the reference does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rope_tables(cfg: ModelConfig, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (capacity, head_dim // 2), computed in float32 (float64 angles for long contexts)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(capacity, dtype=torch.float32), inv_freq)  # (S, half)
    assert angles.shape[1] == half
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (1, H, T, hd); cos/sin (T, hd/2). llama GGUFs rotate adjacent pairs, qwen2 (NEOX) the two halves."""
    if interleaved:
        xr = x.float().unflatten(-1, (-1, 2))  # (1, H, T, hd/2, 2)
        x1, x2 = xr[..., 0], xr[..., 1]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (1, H, T, hd)
    else:
        x1, x2 = x.float().chunk(2, dim=-1)  # 2 × (1, H, T, hd/2)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, w: dict):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        p = f"blk.{layer}."
        self.attn_norm = RMSNorm(w[p + "attn_norm.weight"], cfg.norm_eps)
        self.attn_q = w[p + "attn_q"]
        self.attn_k = w[p + "attn_k"]
        self.attn_v = w[p + "attn_v"]
        self.attn_output = w[p + "attn_output"]
        self.ffn_norm = RMSNorm(w[p + "ffn_norm.weight"], cfg.norm_eps)
        self.ffn_gate = w[p + "ffn_gate"]
        self.ffn_up = w[p + "ffn_up"]
        self.ffn_down = w[p + "ffn_down"]

    def forward(self, x, pos, cos, sin, cache: KVCache, tap: Tap | None):
        cfg, t = self.cfg, x.shape[0]
        h = self.attn_norm(x)  # (T, dim)
        q, k, v = self.attn_q(h), self.attn_k(h), self.attn_v(h)
        if tap:
            for name, val in (("attn_norm", h), ("q", q), ("k", k), ("v", v)):
                tap(self.layer, name, val)
        q = q.view(t, cfg.n_heads, cfg.head_dim).transpose(0, 1).unsqueeze(0)  # (1, H, T, hd)
        k = k.view(t, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1).unsqueeze(0)  # (1, KV, T, hd)
        v = v.view(t, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1).unsqueeze(0)  # (1, KV, T, hd)
        q = apply_rope(q, cos, sin, cfg.rope_interleaved)
        k = apply_rope(k, cos, sin, cfg.rope_interleaved)
        k, v = cache.update(self.layer, pos, k, v)  # (1, KV, pos+T, hd)
        a = attention(q, k, v, pos)  # (1, H, T, hd)
        a = a.squeeze(0).transpose(0, 1).reshape(t, cfg.n_heads * cfg.head_dim)  # (T, H*hd)
        a = self.attn_output(a)
        x = x + a
        h = self.ffn_norm(x)
        gate, up = self.ffn_gate(h), self.ffn_up(h)
        act = F.silu(gate) * up
        ffn = self.ffn_down(act)
        if tap:
            for name, val in (("attn_out", a), ("ffn_norm", h), ("gate", gate), ("up", up), ("swiglu", act), ("ffn_out", ffn)):
                tap(self.layer, name, val)
        x = x + ffn
        if tap:
            tap(self.layer, "residual", x)
        return x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """Causal GQA attention of T new queries at positions [pos, pos+T) over S = pos+T keys."""
    t, s = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # (1, KV, S, hd) -> (1, H, S, hd); explicit so any torch >= 2.4 works
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v)
    # query i (absolute pos+i) sees keys j <= pos+i
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict):
        """`weights` maps GGUF names to modules (`blk.0.attn_q` -> QuantLinear) or norm tensors (`....weight`)."""
        super().__init__()
        self.cfg = cfg
        self.token_embd: QuantEmbedding = weights["token_embd"]
        self.blk = nn.ModuleList(Block(cfg, i, weights) for i in range(cfg.n_layers))
        self.output_norm = RMSNorm(weights["output_norm.weight"], cfg.norm_eps)
        self.output: QuantLinear = weights["output"]
        self.cache: KVCache | None = None
        self.tap: Tap | None = None
        self.dtype = torch.float32

    def materialize(self, dtype: torch.dtype) -> "Transformer":
        """Prepare every quantized module for compute in `dtype` (dense or packed, the module decides)."""
        self.dtype = dtype
        for m in self.modules():
            if isinstance(m, (QuantLinear, QuantEmbedding)):
                m.materialize(dtype)
        return self

    def setup_cache(self, capacity: int) -> None:
        if self.cache is None or self.cache.capacity < capacity or self.cache.k.dtype != self.dtype:
            cfg = self.cfg
            self.cache = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, capacity, self.dtype)
            self.cos, self.sin = rope_tables(cfg, capacity)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        """ids (T,) at positions [pos, pos+T) -> float32 logits (T, vocab), or (1, vocab) for the last one."""
        t = ids.shape[0]
        if self.cache is None or pos + t > self.cache.capacity:
            raise ValueError(f"positions up to {pos + t} exceed the KV cache; call setup_cache first")
        x = self.token_embd(ids).to(self.dtype)  # (T, dim)
        if self.tap:
            self.tap(-1, "embedding", x)
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]
        for block in self.blk:
            x = block(x, pos, cos, sin, self.cache, self.tap)
        if not all_logits:
            x = x[-1:]
        x = self.output_norm(x)
        logits = self.output(x).float()  # (T or 1, vocab)
        if self.tap:
            self.tap(self.cfg.n_layers, "logits", logits)
        return logits
