"""One Transformer for the llama and qwen2 architectures; their differences are ModelConfig flags.

Module names follow the GGUF tensor names (`token_embd`, `blk.N.attn_q`, `ffn_gate`, `output`, ...),
so a GGUF tensor `blk.3.attn_q.weight` is the raw blocks of module `blk.3.attn_q`: no renaming table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from apr.model.cache import KVCache
from apr.model.config import ModelConfig
from apr.quant import QuantEmbedding, QuantLinear
from apr.quant.linear import fused, sequence_rows

# A tap sees (layer index, point name, activation) at every traced point; None costs one branch.
Tap = Callable[[int, str, torch.Tensor], None]


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.eps = eps
        self.out_dtype: torch.dtype | None = None  # the linears' compute dtype (None: x's dtype)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        # normalise in float32 whatever the compute dtype, as the reference does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(out_dtype or self.out_dtype or x.dtype)


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


def rope_halves(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """NEOX rope in 4 ops for the decode step: x (..., hd), cos2 = [cos, cos], sin2 = [-sin, sin] (T, hd).
    x * cos2 + roll(x, hd/2) * sin2 is [x1 cos - x2 sin, x2 cos + x1 sin], the same products as apply_rope."""
    return (x * cos2 + x.roll(x.shape[-1] // 2, -1) * sin2).to(x.dtype)


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a step: `n` tokens at positions [pos, pos + n) of KV-cache slot `slot`."""
    slot: int
    pos: int
    n: int


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

    def forward(self, x, pos, cos, sin, cache: KVCache, tap: Tap | None, mask: torch.Tensor | None = None,
                segs: list[Segment] | None = None):
        """x (T, dim) at positions [pos, pos+T) of cache slot 0, or, with `segs`, the rows of several sequences
        side by side (each Segment: its slot, first position and row count; cos/sin rows follow x's). The
        linears run once over all rows (the weights are read once per step); attention runs per segment over its
        own slot. With `mask` (static decode: T == 1, pos a (1,) tensor) the cache is written by index and
        attention runs over the whole buffer, masked: fixed shapes for graphs."""
        cfg, t = self.cfg, x.shape[0]
        h = self.attn_norm(x)  # (T, dim)
        q, k, v = fused([self.attn_q, self.attn_k, self.attn_v], h)  # 3 x (T, out)
        if tap:
            for name, val in (("attn_norm", h), ("q", q), ("k", k), ("v", v)):
                tap(self.layer, name, val)
        q = q.view(t, cfg.n_heads, cfg.head_dim).transpose(0, 1).unsqueeze(0)  # (1, H, T, hd)
        k = k.view(t, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1).unsqueeze(0)  # (1, KV, T, hd)
        v = v.view(t, cfg.n_kv_heads, cfg.head_dim).transpose(0, 1).unsqueeze(0)  # (1, KV, T, hd)
        if cos.shape[-1] == cfg.head_dim:  # NEOX tables in halves form (see Transformer.rope)
            q, k = rope_halves(q, cos, sin), rope_halves(k, cos, sin)
        else:
            q = apply_rope(q, cos, sin, cfg.rope_interleaved)
            k = apply_rope(k, cos, sin, cfg.rope_interleaved)
        if mask is not None:
            k, v = cache.write_at(self.layer, pos, k, v)  # (1, KV, S, hd)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (1, H, 1, hd)
        else:
            parts, row = [], 0
            for seg in segs or [Segment(0, pos, t)]:
                rows = slice(row, row + seg.n)
                ks, vs = cache.update(self.layer, seg.pos, k[:, :, rows], v[:, :, rows], seg.slot)  # (1, KV, pos+n, hd)
                parts.append(attention(q[:, :, rows], ks, vs, seg.pos))  # (1, H, n, hd)
                row += seg.n
            a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (1, H, T, hd)
        a = a.squeeze(0).transpose(0, 1).reshape(t, cfg.n_heads * cfg.head_dim)  # (T, H*hd)
        a = self.attn_output(a)
        x = x + a
        h = self.ffn_norm(x)
        gate, up = fused([self.ffn_gate, self.ffn_up], h)  # 2 x (T, ffn_dim)
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
    if groups > 1 and q.dtype == torch.float32:  # the reference path: explicit, as it always was
        k = k.repeat_interleave(groups, dim=1)  # (1, KV, S, hd) -> (1, H, S, hd)
        v = v.repeat_interleave(groups, dim=1)
    gqa = {"enable_gqa": True} if groups > 1 and q.dtype != torch.float32 else {}  # no copy of the cache per step
    if t == 1:
        return F.scaled_dot_product_attention(q, k, v, **gqa)
    # query i (absolute pos+i) sees keys j <= pos+i
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


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
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self._graph: _Graph | None = None
        self._native = None  # apr.model.native_step.NativeStep over the current cache and weights
        self.act_split = False  # see set_act_split

    def materialize(self, dtype: torch.dtype, device=None) -> "Transformer":
        """Prepare every quantized module for compute in `dtype` on `device` (dense or packed, the module
        decides); norms move to `device` (in float32); the raw ggml blocks stay where they are (host)."""
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        for m in self.modules():
            if isinstance(m, QuantLinear):
                m.materialize(dtype, self.device)
            elif isinstance(m, QuantEmbedding):  # rows feed the float32 residual stream
                m.materialize(torch.float32, self.device)
            elif isinstance(m, RMSNorm):
                m.weight, m.out_dtype = m.weight.to(self.device), dtype
        self.cache, self._graph, self._native = None, None, None
        return self

    def set_act_split(self, on: bool) -> None:
        """Whether the native kernels round activations to two int8 rows instead of one (native.Group)."""
        self.act_split = bool(on)
        for m in self.modules():
            if isinstance(m, QuantLinear):
                m.act_split, m._groups = self.act_split, {}
        self._native = None  # its groups were built with the old setting

    def setup_cache(self, capacity: int, slots: int = 1, keep: bool = False) -> None:
        """Room for `capacity` positions in each of `slots` sequences. `keep` (the engine's prefix cache) grows
        the buffers with their contents; otherwise a new cache is made only when the old one is too small."""
        cache, cfg = self.cache, self.cfg
        fits = cache is not None and cache.k.dtype == self.dtype and cache.k.device == self.device
        if fits and cache.size >= capacity and cache.slots >= slots:
            cache.capacity = max(capacity, cache.capacity if keep else 1)
            return
        if fits and keep:
            self.cache = cache.grown(capacity, slots)
        else:
            self.cache = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, capacity, self.dtype, self.device, slots)
        cos, sin = rope_tables(cfg, self.cache.size)
        if not cfg.rope_interleaved:  # halves form for rope_halves: [cos, cos], [-sin, sin] (S, hd)
            cos, sin = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self._graph = None  # captured over the old buffers
        self.cache.capacity = max(capacity, 1)

    def rope(self, at: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for positions `at` (a slice, or a (1,) tensor in the static step): (T, hd/2) pairs for
        interleaved rope, (T, hd) halves form ([cos, cos], [-sin, sin]) for NEOX rope."""
        if isinstance(at, slice):
            return self.cos[at], self.sin[at]
        return self.cos.index_select(0, at), self.sin.index_select(0, at)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, all_logits: bool = False) -> torch.Tensor:
        """ids (T,) at positions [pos, pos+T) of slot 0 -> float32 logits (T, vocab), or (1, vocab) for the last one.
        Direct calls (trace, parity, gates) are counted: the engine's prefix cache no longer trusts slot 0 after one."""
        self.direct_steps = getattr(self, "direct_steps", 0) + 1
        return self.step(ids, [Segment(0, pos, ids.shape[0])], all_logits)

    def step_impl(self, segs: list[Segment]) -> str:
        """Which implementation runs a step over `segs`: the one place this is decided (the engine reports it).
        "cuda-graph": one token of slot 0 on CUDA; "native-c-block": one token per sequence on the CPU with every
        linear reading ggml blocks in place and a bf16 cache (apr.model.native_step); else "torch-block"."""
        if self.tap is not None or any(s.n != 1 for s in segs):
            return "torch-block"
        if self._graphs_enabled():
            return "cuda-graph" if len(segs) == 1 and segs[0].slot == 0 else "torch-block"
        if self.device.type == "cpu" and self._native_ok():
            return "native-c-block"
        return "torch-block"

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, segs: list[Segment], all_logits: bool = False) -> torch.Tensor:
        """One forward over the rows of several sequences: ids (T,) = each segment's tokens in order. Returns
        float32 logits (T, vocab) with `all_logits`, else each segment's last row (len(segs), vocab)."""
        t = ids.shape[0]
        if self.cache is None or any(s.pos + s.n > self.cache.capacity or s.slot >= self.cache.slots for s in segs):
            raise ValueError(f"positions or slots {segs} exceed the KV cache; call setup_cache first")
        assert sum(s.n for s in segs) == t, (segs, t)
        impl = self.step_impl(segs)
        if impl == "cuda-graph":
            return self._graph_step(ids, segs[0].pos)
        if impl == "native-c-block":
            return self._native(ids, [s.pos for s in segs], [s.slot for s in segs])
        # the residual stream stays float32 whatever the compute dtype, so its sums over dozens of layers
        # add no rounding of their own (a small effect: SmolLM2 Q4_1 top-1 vs float32 96.3% -> 96.5%)
        x = self.token_embd(ids).float()  # (T, dim)
        if self.tap:
            self.tap(-1, "embedding", x)
        if len(segs) == 1:
            cos, sin = self.rope(slice(segs[0].pos, segs[0].pos + t))
        else:
            cos, sin = self.rope(torch.cat([torch.arange(s.pos, s.pos + s.n) for s in segs]).to(self.device))
        sizes = [s.n for s in segs]
        with sequence_rows(sizes):  # each sequence's rows get the kernels and GEMM shapes they would get alone
            for block in self.blk:
                x = block(x, segs[0].pos, cos, sin, self.cache, self.tap, segs=segs)
        if not all_logits:
            last = torch.tensor([sum(s.n for s in segs[: i + 1]) - 1 for i in range(len(segs))])
            x = x[-1:] if len(segs) == 1 else x.index_select(0, last.to(x.device))  # (segs, dim)
            sizes = [1] * len(segs)  # one row each, as alone
        with sequence_rows(sizes):
            logits = self.output.forward_float32(self.output_norm(x, out_dtype=torch.float32))  # (T or segs, vocab)
        if self.tap:
            self.tap(self.cfg.n_layers, "logits", logits)
        return logits

    # ---- static decode step (fixed shapes), replayed as a CUDA graph ----

    def static_step(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step from the embedding x (1, dim) at tensor position pos (1,) -> logits (1, vocab)."""
        cos, sin = self.rope(pos)  # (1, hd/2) or (1, hd)
        keys = torch.arange(self.cache.size, device=pos.device)
        mask = (keys <= pos).view(1, 1, 1, -1)  # (1, 1, 1, S): cached keys up to pos
        for block in self.blk:
            x = block(x, pos, cos, sin, self.cache, None, mask)
        return self.output(self.output_norm(x)).float()

    def _native_ok(self) -> bool:
        """Whether this step can run the C block (apr.model.native_step); (re)built over the current cache."""
        from apr.model import native_step

        if self._native is not None and self._native.valid_for(self):
            return True
        self._native = native_step.NativeStep(self) if native_step.usable(self) else None
        return self._native is not None

    def _graphs_enabled(self) -> bool:
        return self.device.type == "cuda" and os.environ.get("APR_CUDA_GRAPHS", "1") != "0"

    def _graph_step(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        g = self._graph or self._capture()
        g.x.copy_(self.token_embd(ids))  # the host-side lookup stays outside the graph
        g.pos.fill_(pos)
        g.graph.replay()
        return g.logits.clone()

    def _capture(self) -> "_Graph":
        dev = self.device
        x = torch.zeros(1, self.cfg.dim, dtype=torch.float32, device=dev)  # the residual stream's dtype
        # capture at the last slot: warm-up writes there are overwritten before any step can read them
        pos = torch.full((1,), self.cache.size - 1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels pick their configs and allocate workspaces off the graph
                self.static_step(x, pos)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.static_step(x, pos)
        self._graph = _Graph(graph, x, pos, logits)
        return self._graph


class _Graph:
    def __init__(self, graph, x: torch.Tensor, pos: torch.Tensor, logits: torch.Tensor):
        self.graph, self.x, self.pos, self.logits = graph, x, pos, logits
