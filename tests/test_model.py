"""The Transformer on tiny random GGUFs: against a naive reference written independently here, and
the KV cache (prefill + decode) against one full forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from apr.formats.gguf import config_from_gguf, read_gguf
from apr.model.load import build_modules
from apr.model.transformer import Transformer
from apr.quant import dequantize
from tiny_gguf import write_tiny_gguf

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def load(path, dtype=torch.float32):
    g = read_gguf(path)
    cfg = config_from_gguf(g)
    return cfg, g, Transformer(cfg, build_modules(cfg, g.tensors)).materialize(dtype)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> HF's rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def naive_logits(cfg, g, ids: list[int]) -> torch.Tensor:
    """Textbook forward pass: dense float64 weights, HF-style rotate-half RoPE, explicit causal softmax."""
    W = {n: dequantize(torch.from_numpy(t.data), t.qtype, t.shape).double() for n, t in g.tensors.items()}
    T, hd = len(ids), cfg.head_dim

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, hd/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (T, hd)

    def rope(x):  # x (heads, T, hd), halves rotated
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = W["token_embd.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        h = norm(x, W[p + "attn_norm.weight"])
        wq, wk = W[p + "attn_q.weight"], W[p + "attn_k.weight"]
        bq, bk = W.get(p + "attn_q.bias"), W.get(p + "attn_k.bias")
        if cfg.architecture == "llama":  # llama.cpp permuted these rows at conversion
            wq, wk = unpermute(wq, cfg.n_heads), unpermute(wk, cfg.n_kv_heads)
        q = h @ wq.T + (0 if bq is None else (unpermute(bq, cfg.n_heads) if cfg.architecture == "llama" else bq))
        k = h @ wk.T + (0 if bk is None else (unpermute(bk, cfg.n_kv_heads) if cfg.architecture == "llama" else bk))
        v = h @ W[p + "attn_v.weight"].T + W.get(p + "attn_v.bias", 0)
        q = rope(q.view(T, cfg.n_heads, hd).transpose(0, 1))
        k = rope(k.view(T, cfg.n_kv_heads, hd).transpose(0, 1))
        v = v.view(T, cfg.n_kv_heads, hd).transpose(0, 1)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        x = x + a @ W[p + "attn_output.weight"].T
        h = norm(x, W[p + "ffn_norm.weight"])
        g_ = h @ W[p + "ffn_gate.weight"].T
        x = x + (torch.nn.functional.silu(g_) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    out = W.get("output.weight", W["token_embd.weight"])
    return norm(x, W["output_norm.weight"]) @ out.T


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: Q(q).name)
def test_matches_naive_reference(tmp_path, arch, qtype):
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, qtype, seed=int(qtype))
    cfg, g, model = load(path)
    ids = [5, 77, 200, 3, 99, 260, 1, 42]
    model.setup_cache(16)
    ours = model(torch.tensor(ids), 0, all_logits=True)
    ref = naive_logits(cfg, g, ids).float()
    assert torch.isfinite(ours).all()
    assert ours.shape == (len(ids), cfg.vocab_size)
    tol = 1e-3 * ref.abs().max().item() + 1e-4
    assert (ours - ref).abs().max().item() < tol


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decode_equals_full_forward(tmp_path, arch, dtype, monkeypatch):
    from apr.quant import native

    # every chunk on one kernel path and the torch block (the C decode block is checked against it in
    # test_native.py): this tests the cache, not kernels
    monkeypatch.setattr(native, "MAX_ROWS", 64)
    monkeypatch.setenv("APR_NATIVE_STEP", "0")
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, Q.Q4_K)
    _, _, model = load(path, dtype)
    ids = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 100])
    model.setup_cache(32)
    full = model(ids, 0, all_logits=True)
    part = [model(ids[:4], 0, all_logits=True)]  # prefill 4, then chunk of 3, then one at a time
    part.append(model(ids[4:7], 4, all_logits=True))
    part += [model(ids[i : i + 1], i) for i in range(7, 10)]
    tol = 1e-4 if dtype == torch.float32 else 0.15
    assert (torch.cat(part) - full).abs().max().item() < tol


def test_positions_beyond_cache_are_refused(tmp_path):
    _, _, model = load(write_tiny_gguf(tmp_path / "m.gguf", "qwen2"))
    model.setup_cache(4)
    with pytest.raises(ValueError):
        model(torch.tensor([1, 2, 3, 4, 5]), 0)


def test_config_flags(tiny_qwen, tiny_llama):
    q = config_from_gguf(read_gguf(tiny_qwen))
    l = config_from_gguf(read_gguf(tiny_llama))
    assert (q.architecture, q.rope_interleaved, q.qkv_bias, q.tied_embeddings) == ("qwen2", False, True, False)
    assert (l.architecture, l.rope_interleaved, l.qkv_bias, l.tied_embeddings) == ("llama", True, False, True)
    assert q.head_dim == 64 and q.n_kv_heads == 2 and q.vocab_size == 265
