"""The native ggml matvec (apr/quant/csrc/ggml_matvec.c) against an exact model of its arithmetic.

The kernel rounds each 32-value block of x to int8 (scale = block max / 127, round half to even) and
otherwise computes exactly: so against x rounded the same way and the float32 dequantization of the
weights, in float64, only float32 accumulation error remains (~1e-6 relative). The second check, against
unrounded x, bounds what the rounding costs. Speed lives in benchmarks/, never here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from apr.quant import dequantize, native, row_bytes
from apr.quant.table import _lookup
from apr.quant.testing import random_blocks

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.status()}")


def raw_matrix(qtype: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    blocks = random_blocks(qtype, rows * cols // _lookup(qtype).block_size, gen)
    return blocks.reshape(rows, row_bytes(qtype, cols))  # (blocks, size) -> (rows, row_bytes)


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the kernel sees it: each 32-block rounded to int8 steps of max|block| / 127."""
    xb = x.double().reshape(x.shape[0], -1, 32)  # (M, K) -> (M, K/32, 32)
    amax = xb.abs().amax(-1, keepdim=True).float().double()
    step = (amax.float() / 127).double()
    q = torch.round(xb * torch.where(amax > 0, (127.0 / amax.float()).double(), torch.zeros_like(amax)))
    return (q * step).reshape(x.shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: Q(q).name)
@pytest.mark.parametrize("rows", [1, 3])
def test_matches_exact_arithmetic(qtype, rows):
    n, k = 37, 512  # an odd row count: the threads' split has a remainder
    raw = raw_matrix(qtype, n, k, seed=int(qtype))
    w = dequantize(raw, qtype, (n, k)).double()
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    y = native.matmul(x, raw, qtype, n, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert rel(y, int8_blocks(x) @ w.T + bias.double()) < 2e-6
    assert rel(y, x.double() @ w.T + bias.double()) < 1.5e-2  # what rounding x to int8 costs


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q6_K])
def test_bfloat16_in_and_out(qtype):
    n, k = 40, 256
    raw = raw_matrix(qtype, n, k)
    x = torch.randn(2, k).bfloat16()
    y = native.matmul(x, raw, qtype, n)
    assert y.dtype == torch.bfloat16
    exact = native.matmul(x.float(), raw, qtype, n)  # same rounded x: bf16 output is the only difference
    assert torch.equal(y, exact.bfloat16())  # round to nearest even, as torch rounds


def test_group_outputs_side_by_side_equal_separate_calls():
    k = 256
    parts = [(raw_matrix(Q.Q5_0, 24, k, 1), Q.Q5_0, 24, torch.randn(24)),
             (raw_matrix(Q.Q4_K, 8, k, 2), Q.Q4_K, 8, None),
             (raw_matrix(Q.Q8_0, 8, k, 3), Q.Q8_0, 8, torch.randn(8))]
    x = torch.randn(3, k)
    y = native.Group(parts)(x)
    assert y.shape == (3, 40)
    assert torch.equal(y, torch.cat([native.matmul(x, *p) for p in parts], dim=-1))


def test_weights_are_read_in_place_from_a_row_stride():
    """raw may be a row slice of a bigger mapped tensor (no copy): stride(0) is the row length in bytes."""
    raw = raw_matrix(Q.Q8_0, 64, 256)
    x = torch.randn(1, 256)
    torch.testing.assert_close(native.matmul(x, raw[16:32], Q.Q8_0, 16), native.matmul(x, raw, Q.Q8_0, 64)[:, 16:32],
                               rtol=0, atol=0)


def test_unsupported_inputs_are_refused():
    assert not native.supports(Q.Q2_K) and not native.supports(Q.F16)
    with pytest.raises(RuntimeError, match="native matmul failed"):  # K not a multiple of the 256-block
        native.matmul(torch.randn(1, 288), torch.zeros(4, row_bytes(Q.Q8_0, 288), dtype=torch.uint8), Q.Q4_K, 4)


def test_switch_and_failed_build_fall_back_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("APR_NATIVE", "0")
    assert not native.available() and "APR_NATIVE=0" in native.status()
    monkeypatch.setenv("APR_NATIVE", "1")
    monkeypatch.setenv("APR_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native._build_and_load.cache_clear()
    try:
        assert not native.available()
        assert "build failed" in native.status()
        assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written is left to load later
    finally:
        monkeypatch.undo()
        native._build_and_load.cache_clear()
    assert native.available()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: Q(q).name)
def test_dequantize_is_bit_identical_to_the_torch_reference(qtype):
    from apr.quant.table import QUANT_TYPES

    n, k = 9, 512
    raw = raw_matrix(qtype, n, k, seed=5)
    ours = native.dequantize(raw, qtype, k)
    blocks = raw.reshape(-1, _lookup(qtype).type_size)  # (n, row_bytes) -> (blocks, type_size)
    torch_ref = QUANT_TYPES[qtype].dequant(blocks).reshape(n, k)  # itself bit-identical to gguf-py
    assert ours.unique().numel() > 8 and torch.equal(ours, torch_ref)
    assert torch.equal(dequantize(raw, qtype, (n, k)), ours)  # the table dispatches here on the CPU


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: Q(q).name)
def test_bf16_dequantize_rounds_like_torch(qtype):
    """The one-pass bf16 tile equals the float32 tile converted by torch, bit for bit (NaN where NaN)."""
    n, k = 9, 512
    raw = raw_matrix(qtype, n, k, seed=6).clone()
    exact = native.dequantize(raw, qtype, k)
    ours = native.dequantize(raw, qtype, k, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours.view(torch.int16), exact.to(torch.bfloat16).view(torch.int16))
    into = torch.full((n, k), 7.0, dtype=torch.bfloat16)
    assert native.dequantize(raw, qtype, k, torch.bfloat16, out=into) is into and torch.equal(into, ours)
    with pytest.raises(ValueError, match="contiguous"):
        native.dequantize(raw, qtype, k, torch.bfloat16, out=torch.empty(n, k + 1, dtype=torch.bfloat16))
    # a NaN block scale (a damaged file) gives NaN where the float32 path does, not a finite value or an inf
    d_at = {Q.Q6_K: 208, Q.Q4_K: 0, Q.Q5_K: 0}.get(qtype, 0)  # byte offset of the f16 scale d in a block
    raw[0, d_at:d_at + 2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # f16 NaN, little-endian
    nan32 = native.dequantize(raw, qtype, k).isnan()
    assert nan32.any() and torch.equal(native.dequantize(raw, qtype, k, torch.bfloat16).isnan(), nan32)


@pytest.mark.parametrize("tile_dtype", [torch.bfloat16, torch.float32])
def test_tile_linear_reuses_its_buffer_without_mixing_weights(tile_dtype, monkeypatch):
    """Prefill tiles are made into one reused buffer: several tiles per weight, then another weight, must give
    what fresh tiles give (the old path: table.dequantize, then .to(dtype))."""
    from apr.quant import kernels

    monkeypatch.setattr(kernels, "_DEQUANT_VALUES", 128 * 256)  # 128-row tiles: 3 of them for 300 rows
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(0)).to(tile_dtype)
    for qtype, seed in [(Q.Q4_K, 1), (Q.Q8_0, 2), (Q.Q4_K, 3)]:
        raw = raw_matrix(qtype, 300, 256, seed=seed)
        p = kernels.Prepared("ggml", tile_dtype, {"raw": raw}, 1, 300, "ggml", int(qtype))
        fresh = lambda r0, r1: dequantize(raw[r0:r1], qtype, (r1 - r0, 256)).to(tile_dtype)  # noqa: E731
        want = kernels.chunked_gemm(x, fresh, 300, None)
        assert torch.equal(kernels.ggml_tile_linear(x, p, None, tile_dtype), want)


@pytest.mark.parametrize("arch,qtype", [("qwen2", Q.Q5_0), ("llama", Q.Q4_K), ("qwen2", Q.Q6_K)])
def test_c_decode_block_matches_the_torch_block(tmp_path, monkeypatch, arch, qtype):
    """The C block (apr.model.native_step) against the torch Block, teacher-forced over a prefilled cache:
    both are as close to the float32 reference as each other (they differ in where activations are
    rounded: bf16 between torch ops, float32 in C), and close to each other."""
    from tiny_gguf import write_tiny_gguf

    from apr.model import native_step
    from apr.runtime import load_model

    path = write_tiny_gguf(tmp_path / "m.gguf", arch, qtype, n_heads=4, n_kv_heads=2)
    prompt, steps = torch.tensor([5, 77, 200, 3, 99]), [10, 20, 30, 40, 50, 60]

    def logits(model, flag: str) -> torch.Tensor:
        monkeypatch.setenv("APR_NATIVE_STEP", flag)
        model.setup_cache(32)
        model._native = None
        out = [model(prompt, 0)] + [model(torch.tensor([t]), len(prompt) + i) for i, t in enumerate(steps)]
        assert (model._native is not None) == (flag == "1" and model.dtype != torch.float32)  # what ran
        return torch.cat(out)  # (1 + steps, vocab)

    ref = logits(load_model(path, dtype="float32", backend="cpu", quiet=True).model, "1")
    model = load_model(path, dtype="bfloat16", backend="cpu", quiet=True).model
    model.setup_cache(32)
    assert native_step.usable(model)
    c_block, torch_block = logits(model, "1"), logits(model, "0")

    def cos(a, b) -> float:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())

    assert cos(c_block, ref) > cos(torch_block, ref) - 2e-3
    assert cos(c_block, torch_block) > 0.99 and cos(c_block, ref) > 0.99


@pytest.mark.parametrize("arch,heads", [("qwen2", 8), ("llama", 4), ("qwen2", 2)])
def test_c_block_layer_matches_the_torch_block(tmp_path, arch, heads):
    """One layer, one decode step over a prefilled cache: what the C block's attention adds to the residual
    stream against what the torch Block's adds. Head sizes 32, 64 and 128 take every path of the C attention's
    weighted sum (a chunk shorter than 64 lanes, one chunk, two chunks)."""
    import ctypes

    from tiny_gguf import write_tiny_gguf

    from apr.model.native_step import NativeStep
    from apr.runtime import load_model

    # a zero ffn_norm silences layer 0's FFN, so what the layer adds is the attention's output alone
    path = write_tiny_gguf(tmp_path / "m.gguf", arch, Q.Q8_0, n_heads=heads, n_kv_heads=2,
                           overrides={"blk.0.ffn_norm.weight": np.zeros(256)})
    model = load_model(path, dtype="bfloat16", backend="cpu", quiet=True).model
    model.setup_cache(32)
    prompt = torch.tensor([5, 77, 200, 3, 99, 14, 150, 42, 7])
    model(prompt, 0)  # prefill: the cache holds 9 positions
    pos, x = len(prompt), model.token_embd(torch.tensor([10])).float()  # (1, dim)
    cos, sin = model.rope(slice(pos, pos + 1))
    saved = model.cache.k.clone(), model.cache.v.clone()
    added_torch = model.blk[0](x, pos, cos, sin, model.cache, None) - x
    model.cache.k.copy_(saved[0]), model.cache.v.copy_(saved[1])
    xc = x.clone().contiguous()
    cos_c, sin_c = (t.float().contiguous() for t in (cos, sin))
    one = ctypes.c_int64 * 1
    rc = native.lib().apr_decode_layer(ctypes.byref(NativeStep(model).layers[0]), xc.data_ptr(), 1, one(pos), one(0),
                                       cos_c.data_ptr(), sin_c.data_ptr(), torch.get_num_threads())
    assert rc == 0
    added_c = xc - x
    assert float((added_c - added_torch).norm() / added_torch.norm()) < 0.02


def test_decode_block_follows_reprepared_weights(tmp_path):
    """The C block and the fused calls hold raw pointers: swapping a module's blocks must reach them."""
    from tiny_gguf import write_tiny_gguf

    from apr.runtime import load_model

    model = load_model(write_tiny_gguf(tmp_path / "m.gguf", "qwen2", Q.Q8_0), dtype="bfloat16", backend="cpu",
                       quiet=True).model

    model.setup_cache(16)
    model(torch.tensor([5, 77, 200]), 0)  # the prompt's cache, shared by every step below

    def step() -> torch.Tensor:
        return model(torch.tensor([9]), 3)  # one token at the same position: the C block

    before = step()
    assert model._native is not None
    mod = model.blk[0].attn_q
    raw = mod.raw
    mod.raw, mod.prepared = raw.flip(0).clone(), None  # rows reversed: another model
    mod.materialize(torch.bfloat16)
    changed = step()
    mod.raw, mod.prepared = raw, None
    mod.materialize(torch.bfloat16)
    assert not torch.equal(changed, before) and torch.equal(step(), before)
