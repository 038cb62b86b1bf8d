"""Raw tensors (GGUF names) -> the modules the Transformer is assembled from."""

from __future__ import annotations

import torch

from apr.errors import BadModelFile
from apr.model.config import ModelConfig
from apr.quant import QuantEmbedding, QuantLinear, dequantize, is_supported, row_bytes, type_name

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies, with its torch-order shape (rows, cols)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (cfg.dim,)}
    if not cfg.tied_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": (cfg.dim,), p + "ffn_norm.weight": (cfg.dim,),
            p + "attn_q.weight": (q, cfg.dim), p + "attn_k.weight": (kv, cfg.dim), p + "attn_v.weight": (kv, cfg.dim),
            p + "attn_output.weight": (cfg.dim, q),
            p + "ffn_gate.weight": (cfg.ffn_dim, cfg.dim), p + "ffn_up.weight": (cfg.ffn_dim, cfg.dim),
            p + "ffn_down.weight": (cfg.dim, cfg.ffn_dim),
        })
        if cfg.qkv_bias:
            shapes.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
    return shapes


def check_tensors(cfg: ModelConfig, tensors: dict) -> None:
    for name, shape in expected_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            raise BadModelFile(f"missing tensor {name}")
        if tuple(t.shape) != shape:
            raise BadModelFile(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not is_supported(t.qtype):
            raise BadModelFile(f"tensor {name} has unsupported type {type_name(t.qtype)}")


def _raw2d(t) -> torch.Tensor:
    """Raw blocks as (rows, row_bytes) uint8, sharing memory with the mapped file."""
    rows, cols = t.shape
    return torch.from_numpy(t.data).view(rows, row_bytes(t.qtype, cols))


def _dense(t) -> torch.Tensor:
    return dequantize(torch.from_numpy(t.data), t.qtype, t.shape)


def build_modules(cfg: ModelConfig, tensors: dict) -> dict:
    """GGUF-named modules for Transformer(cfg, weights)."""
    check_tensors(cfg, tensors)
    w: dict = {}
    emb = tensors["token_embd.weight"]
    w["token_embd"] = QuantEmbedding(_raw2d(emb), emb.qtype, cfg.dim)
    out = emb if cfg.tied_embeddings else tensors["output.weight"]
    w["output"] = QuantLinear(_raw2d(out), out.qtype, cfg.dim, cfg.vocab_size)
    w["output_norm.weight"] = _dense(tensors["output_norm.weight"])
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        for norm in ("attn_norm", "ffn_norm"):
            w[p + norm + ".weight"] = _dense(tensors[p + norm + ".weight"])
        for name in LINEARS:
            t = tensors[p + name + ".weight"]
            bias = tensors.get(p + name + ".bias")
            rows, cols = t.shape
            w[p + name] = QuantLinear(_raw2d(t), t.qtype, cols, rows, _dense(bias) if bias is not None else None)
    return w
