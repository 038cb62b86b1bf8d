"""Tiny random GGUF models written with the `gguf` package: every quant type, both architectures.

Dimensions are multiples of 256 so the K-quant types (256-element blocks) fit every linear layer.
The vocabulary is byte-level BPE (256 byte symbols, a few merges, ChatML special tokens), so the
tokenizer, the chat template and generation all run end to end on these files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

from apr.quant.testing import random_blocks

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MERGES = ["Ġ t", "h e", "i n", "Ġt he", "d e", "Ġ Ġ"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def vocab() -> list[str]:
    return byte_symbols() + [m.replace(" ", "") for m in MERGES] + SPECIALS


def write_tiny_gguf(path: str | Path, arch: str = "qwen2", qtype: int = Q.Q8_0, *, dim: int = 256, ffn: int = 512,
                    n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0, tied: bool | None = None,
                    rope_theta: float | None = None, chat_template: str | None = CHATML, embd_qtype: int | None = None,
                    overrides: dict | None = None) -> Path:
    """Write a random model; `overrides` maps tensor names to float32 arrays (e.g. planted faults)."""
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    tokens = vocab()
    head_dim = dim // n_heads
    tied = (arch == "llama") if tied is None else tied
    w = GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(rope_theta or (1e6 if arch == "qwen2" else 1e5))
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    overrides = overrides or {}

    def add(name: str, rows: int, cols: int, qt: int) -> None:
        if name in overrides:
            w.add_tensor(name, np.asarray(overrides[name], dtype=np.float32).reshape(rows, cols))
            return
        block, type_size = _sizes(qt)
        n_blocks = rows * cols // block
        raw = random_blocks(qt, n_blocks, gen).numpy().reshape(rows, cols // block * type_size)  # (rows, row_bytes)
        w.add_tensor(name, raw, raw_dtype=qt)

    def vec(name: str, n: int, scale: float, base: float) -> None:
        data = overrides.get(name)
        if data is None:
            data = (base + scale * torch.randn(n, generator=gen)).numpy()
        w.add_tensor(name, np.asarray(data, dtype=np.float32))

    add("token_embd.weight", len(tokens), dim, embd_qtype or Q.Q8_0)
    for i in range(n_layers):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", dim, 0.1, 1.0)
        vec(p + "ffn_norm.weight", dim, 0.1, 1.0)
        for name, rows, cols in (("attn_q", dim, dim), ("attn_k", n_kv_heads * head_dim, dim),
                                 ("attn_v", n_kv_heads * head_dim, dim), ("attn_output", dim, dim),
                                 ("ffn_gate", ffn, dim), ("ffn_up", ffn, dim), ("ffn_down", dim, ffn)):
            add(p + name + ".weight", rows, cols, qtype)
        if arch == "qwen2":
            for name, n in (("attn_q", dim), ("attn_k", n_kv_heads * head_dim), ("attn_v", n_kv_heads * head_dim)):
                vec(p + name + ".bias", n, 0.1, 0.0)
    vec("output_norm.weight", dim, 0.1, 1.0)
    if not tied:
        add("output.weight", len(tokens), dim, Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _sizes(qt: int) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qt]
