"""Decode steps (one token for each of a batch of sequences) through the C block of apr.quant.native
(csrc/decode_layer.c).

Used by Transformer.step (see its step_impl) when every linear of every block reads ggml blocks in place (kind "ggml"),
the compute dtype is not float32 (the reference path stays torch), nothing is tapped (trace/parity see
the torch block) and the step is one token per sequence on the CPU. Prefill, taps and every other case run the torch
Block; both write the same KV cache, so a prompt prefilled in torch decodes in C and vice versa.
"""

from __future__ import annotations

import ctypes
import os

import torch

from apr.quant import native
from apr.quant.linear import prepared_version

_P = ctypes.c_void_p


class _WGroup(ctypes.Structure):
    _fields_ = [("n", ctypes.c_int), ("qtypes", _P), ("ws", _P), ("row_bytes", _P), ("Ns", _P), ("biases", _P),
                ("split", ctypes.c_int)]


class _DLayer(ctypes.Structure):
    _fields_ = [(f, ctypes.c_int64) for f in ("dim", "n_heads", "n_kv", "head_dim", "ffn_dim", "cache_len")] + [
        ("neox", ctypes.c_int), ("eps", ctypes.c_float),
        ("attn_norm", _P), ("ffn_norm", _P), ("qkv", _WGroup), ("out", _WGroup), ("gate_up", _WGroup),
        ("down", _WGroup), ("k_cache", _P), ("v_cache", _P), ("n_slots", ctypes.c_int64)]


def _group(mods) -> tuple[_WGroup, native.Group]:
    g = native.Group([(m.raw, m.qtype, m.out_features, m._bias32) for m in mods], mods[0].act_split)
    return _WGroup(g.args[0], *(ctypes.cast(a, _P) for a in g.args[1:]), g.split), g


def usable(model) -> bool:
    if os.environ.get("APR_NATIVE_STEP", "1") == "0":  # diagnostic switch: decode through the torch block
        return False
    lib = native.lib()
    if lib is None or model.dtype == torch.float32 or model.device.type != "cpu" or model.cache is None:
        return False
    if model.cache.k.dtype != torch.bfloat16 or model.cfg.head_dim > 1024 or model.cfg.head_dim % 8:
        return False
    return all(getattr(b, name).kind == "ggml" for b in model.blk for name in
               ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))


class NativeStep:
    """The C block for every layer of `model`, built over its current KV cache buffers and prepared weights."""

    def __init__(self, model):
        cfg, cache = model.cfg, model.cache
        self.model, self.cache_k, self.version = model, cache.k, prepared_version()
        self.keep, self.layers = [], []
        per_layer = cache.k[0].numel() * cache.k.element_size()  # (slots, KV, S, hd) bytes
        for i, b in enumerate(model.blk):
            groups = [_group(mods) for mods in ((b.attn_q, b.attn_k, b.attn_v), (b.attn_output,),
                                                (b.ffn_gate, b.ffn_up), (b.ffn_down,))]
            self.keep += [g for _, g in groups] + [b.attn_norm.weight, b.ffn_norm.weight]
            self.layers.append(_DLayer(
                cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cache.size,
                int(not cfg.rope_interleaved), cfg.norm_eps,
                b.attn_norm.weight.data_ptr(), b.ffn_norm.weight.data_ptr(), *(w for w, _ in groups),
                cache.k.data_ptr() + i * per_layer, cache.v.data_ptr() + i * per_layer, cache.slots))
        out = model.output
        # the head in float32 in and out: the logits of near-ties differ by less than a bf16 step (1/128 of a
        # logit near 1), and rounding x to bf16 before its int8 blocks adds a rounding of its own
        self.head = _group((out,))[1] if out.kind == "ggml" else None

    def valid_for(self, model) -> bool:
        """Built over this cache and these weights (any re-prepared linear invalidates it)."""
        return model.cache is not None and model.cache.k is self.cache_k and prepared_version() == self.version

    def __call__(self, ids: torch.Tensor, pos: list[int], slots: list[int]) -> torch.Tensor:
        """ids (M,): one token per sequence, row m at position pos[m] of cache slot slots[m] -> float32 logits
        (M, vocab). The weights are read once for all M rows."""
        m, lib = self.model, native.lib()
        x = m.token_embd(ids).float().contiguous()  # (M, dim): the residual streams, updated in place
        at = torch.tensor(pos, dtype=torch.long)
        cos, sin = (t.float().contiguous() for t in m.rope(at))  # (M, hd) or (M, hd/2)
        pos_c, slot_c = (ctypes.c_int64 * len(pos))(*pos), (ctypes.c_int64 * len(slots))(*slots)
        threads = torch.get_num_threads()
        for layer in self.layers:
            rc = lib.apr_decode_layer(ctypes.byref(layer), x.data_ptr(), len(pos), pos_c, slot_c, cos.data_ptr(),
                                      sin.data_ptr(), threads)
            if rc:
                raise RuntimeError(f"native decode step failed ({rc}) at positions {pos}, slots {slots}")
        if self.head is None:
            return m.output(m.output_norm(x)).float()
        norm = m.output_norm
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight  # RMSNorm, kept float32
        return self.head(h)  # (M, vocab) float32
