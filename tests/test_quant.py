"""apr.quant against gguf-py's numpy dequantization (the reference implementation of ggml's layouts).

Comparisons are EXACT (torch.equal), not approximate: our torch code does the same float32 operations in
the same order as gguf.quants (scale * sub-scale, then * quant, then +/- min), and each product of an fp16
scale with small integers is exactly representable in float32, so both sides round identically. Any layout
mistake (a swapped nibble, a shifted bit, a wrong byte offset) changes values by whole quantization steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import gguf.quants
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from apr.errors import BadModelFile
from apr.quant import (
    QUANT_TYPES,
    QuantEmbedding,
    QuantLinear,
    dequantize,
    dequantize_rows,
    is_supported,
    row_bytes,
    type_name,
)
from apr.quant.testing import random_blocks

TYPES = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
         T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
REAL_GGUF = Path("/root/.cache/apr/models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def _reference(raw: torch.Tensor | np.ndarray, qtype: int) -> torch.Tensor:
    """gguf-py's dequantization of a (..., row_bytes) uint8 array, as a float32 tensor."""
    arr = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(arr, T(qtype)), dtype=np.float32))


def _matrix(qtype: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random raw bytes of a (rows, cols) tensor: uint8 (rows, row_bytes)."""
    n_blocks = rows * cols // GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, n_blocks, torch.Generator().manual_seed(seed))
    return blocks.reshape(rows, row_bytes(qtype, cols))  # (n_blocks, type_size) -> (rows, row_bytes)


def test_table_covers_the_13_types_with_ggml_sizes():
    assert sorted(QUANT_TYPES) == sorted(int(t) for t in TYPES)
    for t in TYPES:
        q = QUANT_TYPES[t]
        assert (q.name, q.type_id) == (t.name, int(t))
        assert (q.block_size, q.type_size) == GGML_QUANT_SIZES[t]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_blocks_match_gguf_py_exactly(qtype):
    q = QUANT_TYPES[qtype]
    blocks = random_blocks(qtype, 96, torch.Generator().manual_seed(int(qtype)))
    ours = q.dequant(blocks)
    assert ours.dtype == torch.float32 and ours.shape == (96, q.block_size)
    assert torch.isfinite(ours).all()
    assert ours.unique().numel() > 8  # random blocks give varied values, so equality below means something
    assert torch.equal(ours, _reference(blocks, qtype).reshape(96, q.block_size))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_shapes_and_inputs(qtype):
    cols = 512  # a multiple of every block size (1, 32, 256)
    raw = _matrix(qtype, 6, cols, seed=1)
    want = _reference(raw, qtype)  # (6, 512)
    assert torch.equal(dequantize(raw, qtype, (6, cols)), want)
    # numpy input of any shape, and a 3-D target shape (rows first, last dim contiguous)
    flat = raw.numpy().reshape(-1)
    assert torch.equal(dequantize(flat, qtype, (2, 3, cols)), want.reshape(2, 3, cols))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_matches_full_rows(qtype):
    raw = _matrix(qtype, 10, 256, seed=2)
    full = dequantize(raw, qtype, (10, 256))
    ids = torch.tensor([7, 0, 7, 9, 3])  # unordered, repeated
    assert torch.equal(dequantize_rows(raw, qtype, ids), full[ids])
    batch = torch.tensor([[1, 2], [9, 1]])
    assert torch.equal(dequantize_rows(raw, qtype, batch), full[batch])  # (2, 2, 256)


def test_chunked_path_matches_gguf_py():
    # more values than one internal chunk, so the stepwise path and its seams are covered
    raw = _matrix(T.Q4_K, 1100, 256, seed=3)
    assert torch.equal(dequantize(raw, T.Q4_K, (1100, 256)), _reference(raw, T.Q4_K))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quant_linear_forward_equals_f_linear(qtype):
    out_f, in_f = 48, 256
    raw = _matrix(qtype, out_f, in_f, seed=4)
    bias = torch.randn(out_f, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(6))
    layer = QuantLinear(raw, qtype, in_f, out_f, bias)
    assert layer.weight is None  # nothing dense until first use
    y = layer(x)
    assert y.shape == (3, 5, out_f)
    assert torch.equal(y, F.linear(x, _reference(raw, qtype), bias))
    assert layer.raw is raw  # raw blocks kept for future packed kernels


def test_quant_linear_materialize_dtype_and_state():
    raw = _matrix(T.Q3_K, 16, 256, seed=7)
    layer = QuantLinear(raw, T.Q3_K, 256, 16, bias=torch.ones(16))  # no native kernel: dense bf16
    weight = layer.materialize(torch.bfloat16)
    assert weight is layer.weight and weight.dtype == torch.bfloat16
    assert torch.equal(weight, _reference(raw, T.Q3_K).to(torch.bfloat16))
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    assert set(layer.state_dict()) == {"raw", "bias"}  # the dense weight is derived, not saved
    with pytest.raises(BadModelFile, match="Q3_K"):
        QuantLinear(raw, T.Q3_K, 512, 16)  # bytes do not fit the claimed shape


def test_quant_embedding_dequantizes_only_requested_rows():
    raw = _matrix(T.Q5_0, 40, 64, seed=8)
    emb = QuantEmbedding(raw, T.Q5_0, 64)
    ids = torch.tensor([[3, 39, 3]])
    full = _reference(raw, T.Q5_0)
    assert torch.equal(emb(ids), full[ids])  # (1, 3, 64)
    emb.materialize(torch.float16)
    out = emb(ids)
    assert out.dtype == torch.float16 and torch.equal(out, full[ids].half())
    assert emb.raw is raw


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.TQ1_0, 999], ids=str)
def test_unsupported_type_is_bad_model_file(qtype):
    assert not is_supported(qtype)
    raw = torch.zeros(4, 66, dtype=torch.uint8)
    with pytest.raises(BadModelFile, match=type_name(qtype)) as info:
        dequantize(raw, qtype, (4, 256))
    assert "\n" not in str(info.value)
    with pytest.raises(BadModelFile):
        dequantize_rows(raw, qtype, torch.tensor([0]))


def test_wrong_sizes_are_bad_model_file():
    raw = _matrix(T.Q8_0, 4, 64)
    with pytest.raises(BadModelFile, match="bytes"):
        dequantize(raw, T.Q8_0, (5, 64))
    with pytest.raises(BadModelFile, match="block"):
        dequantize(raw, T.Q8_0, (8, 33))


def test_small_helpers():
    assert row_bytes(T.Q4_K, 896 * 4) == 14 * 144 and row_bytes(T.Q8_0, 896) == 28 * 34
    assert row_bytes(T.F32, 3) == 12
    assert is_supported(T.Q6_K) and is_supported(int(T.BF16))
    assert type_name(T.Q5_0) == "Q5_0" and type_name(12) == "Q4_K" and type_name(999) == "type 999"


@pytest.mark.real
@pytest.mark.skipif(not REAL_GGUF.exists(), reason=f"{REAL_GGUF} not pulled")
def test_real_qwen_tensors_match_gguf_py():
    from apr.formats.gguf import read_gguf

    tensors = read_gguf(REAL_GGUF).tensors
    by_type: dict[int, list] = {}
    for t in tensors.values():
        by_type.setdefault(t.qtype, []).append(t)
    assert {T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0} <= set(by_type)
    for qtype, group in by_type.items():
        for t in group[:3]:
            cols = t.shape[-1]
            rows = min(48, t.data.size // row_bytes(qtype, cols))  # the head rows keep gguf-py fast
            raw = np.asarray(t.data).reshape(-1, row_bytes(qtype, cols))[:rows]  # (rows, row_bytes)
            assert torch.equal(dequantize(raw, qtype, (rows, cols)), _reference(raw, qtype)), t.name
    small = tensors["blk.0.attn_k.weight"]  # a whole tensor through the memmap path
    assert torch.equal(dequantize(small.data, small.qtype, small.shape),
                       _reference(np.asarray(small.data).reshape(small.shape[0], -1), small.qtype))
    emb = tensors["token_embd.weight"]
    table = np.asarray(emb.data).reshape(emb.shape[0], -1)  # (151936, row_bytes), still memory-mapped
    ids = torch.tensor([0, 151642, 9707, 9707])
    assert torch.equal(dequantize_rows(table, emb.qtype, ids), _reference(table[ids.numpy()], emb.qtype))
