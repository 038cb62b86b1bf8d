"""Every fast kernel path against the exact float32 dequantization, on tiny random ggml blocks.

No timing asserts here: speed lives in benchmarks/.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from apr.quant import QuantEmbedding, QuantLinear, dequantize, kernels, native, row_bytes
from apr.quant import kernels_int4 as k4
from apr.quant.pages import release_file_pages
from apr.quant.table import _lookup
from apr.quant.testing import random_blocks

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
CUDA = torch.cuda.is_available()


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test on both CPU paths: the native ggml kernel (where it builds) and torch's kernels alone."""
    if request.param == "native" and not native.available():
        pytest.skip(f"native kernel unavailable: {native.status()}")
    monkeypatch.setenv("APR_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def expected_kind(qtype: int, path: str) -> str:
    if path == "native" and native.supports(qtype):
        return "ggml"
    return "int4" if int(qtype) in kernels.PLANES else "dense"


def raw_matrix(qtype: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    qt = _lookup(qtype)
    gen = torch.Generator().manual_seed(seed)
    return random_blocks(qtype, rows * cols // qt.block_size, gen).reshape(rows, row_bytes(qtype, cols))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def reference(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    y = x.double() @ w.double().T  # the bf16 activations, exact weights, float64 products
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: Q(q).name)
@pytest.mark.parametrize("rows", [1, 5, 48])  # decode, a short chunk, a prefill tile (APR_PREFILL_ROWS=32)
def test_bf16_paths_match_exact_dequant(qtype, rows, path, monkeypatch):
    monkeypatch.setenv("APR_PREFILL_ROWS", "32")
    monkeypatch.setattr(kernels, "WIDEN_ROWS", 32)
    n, k = 80, 512  # 80 rows: not a multiple of the packer's row block, so padding is exercised
    raw = raw_matrix(qtype, n, k, seed=int(qtype))
    w = dequantize(raw, qtype, (n, k))
    bias = torch.randn(n)
    ql = QuantLinear(raw, qtype, k, n, bias)
    ql.materialize(torch.bfloat16)
    p = ql.prepared
    assert p.kind == expected_kind(qtype, path)
    assert p.parts == (1 if p.kind == "ggml" else kernels.PARTS.get(int(qtype), 1))
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = ql(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert rel_err(y, reference(x, w, bias.bfloat16().float())) < 1e-2  # bf16 output rounding is ~4e-3


@pytest.mark.parametrize("qtype", sorted(kernels.PLANES), ids=lambda q: Q(q).name)
def test_int4_planes_reconstruct_the_weights(qtype):
    """(q - 8) * scale + zero summed over planes is the ggml dequantization (scales kept in float32)."""
    n, k = 16, 256
    raw = raw_matrix(qtype, n, k, seed=3)
    planes = kernels.int4_planes(raw, qtype, torch.float32)  # per plane: (N, K), (N, G), (N, G)
    assert len(planes) == kernels.PARTS[int(qtype)]
    g = k // kernels.GROUP
    w = torch.zeros(n, g, kernels.GROUP)
    for q, s, z in planes:
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
        w += (q.view(n, g, kernels.GROUP).float() - 8) * s.unsqueeze(-1) + z.unsqueeze(-1)  # (N, G, 32)
    exact = dequantize(raw, qtype, (n, k))
    torch.testing.assert_close(w.view(n, k), exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.Q8_0])
def test_prefill_tiles_equal_the_int4_kernel(qtype, monkeypatch):
    monkeypatch.setenv("APR_NATIVE", "0")
    n, k = 200, 512
    ql = QuantLinear(raw_matrix(qtype, n, k), qtype, k, n)
    ql.materialize(torch.bfloat16)
    x = torch.randn(40, k).bfloat16()
    monkeypatch.setenv("APR_PREFILL_ROWS", "16")
    tiles = ql(x)  # 40 rows >= 16: dequantized tiles + dense GEMM
    monkeypatch.setenv("APR_PREFILL_ROWS", "100000")
    kernel = ql(x)
    assert rel_err(tiles, kernel) < 1e-2


def test_cpu_packing_layout_round_trips():
    bn = k4.cpu_block_n()
    if not bn:
        pytest.skip("this torch build packs int4 in a layout apr does not read; the kernel path is used")
    q = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    direct = k4.pack_cpu_direct(q, bn)
    assert torch.equal(direct, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
    assert torch.equal(k4.unpack_cpu(direct, bn), q)


def test_float32_stays_the_exact_dense_path():
    raw = raw_matrix(Q.Q5_0, 64, 256)
    ql = QuantLinear(raw, Q.Q5_0, 256, 64)
    assert ql.materialize(torch.float32) is ql.weight
    assert ql.prepared.kind == "dense" and torch.equal(ql.weight, dequantize(raw, Q.Q5_0, (64, 256)))
    x = torch.randn(3, 256)
    torch.testing.assert_close(ql(x), x @ ql.weight.T, rtol=0, atol=0)


def test_bias_is_recast_from_float32_each_time():
    bias = torch.randn(64) * 1e3 + 0.123456
    ql = QuantLinear(raw_matrix(Q.Q4_0, 64, 256), Q.Q4_0, 256, 64, bias)
    ql.materialize(torch.bfloat16)
    ql.materialize(torch.float32)
    assert torch.equal(ql.bias, bias)  # not a bf16 round trip


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.Q6_K])
def test_prepared_state_round_trip(qtype, path):
    n, k = 96, 256
    raw = raw_matrix(qtype, n, k)
    a = QuantLinear(raw, qtype, k, n)
    a.materialize(torch.bfloat16)
    state = {key: t.clone() for key, t in a.prepared_state().items()}
    assert state["kind"].dtype == torch.uint8
    b = QuantLinear(raw, qtype, k, n)
    assert b.load_prepared(state, torch.bfloat16)
    assert b.kind == a.kind
    x = torch.randn(2, k).bfloat16()
    assert torch.equal(a(x), b(x))


def test_prepared_state_for_another_layout_is_repacked(monkeypatch):
    monkeypatch.setenv("APR_NATIVE", "0")  # int4 layouts are what a state can disagree on
    raw = raw_matrix(Q.Q4_K, 64, 256)
    a = QuantLinear(raw, Q.Q4_K, 256, 64)
    a.materialize(torch.bfloat16)
    state = a.prepared_state()
    text = bytes(state["kind"].tolist()).decode().replace("int4-cpu-bn", "int4-cpu-bnX")
    state["kind"] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    b = QuantLinear(raw, Q.Q4_K, 256, 64)
    assert not b.load_prepared(state, torch.bfloat16)  # not reused ...
    x = torch.randn(1, 256).bfloat16()
    assert torch.equal(a(x), b(x))  # ... but packed anew from raw
    assert not b.load_prepared(a.prepared_state(), torch.float32)  # a bf16 state is never used for float32


def test_embedding_prepared_state_and_lookup():
    raw = raw_matrix(Q.Q8_0, 40, 64)
    emb = QuantEmbedding(raw, Q.Q8_0, 64)
    assert emb.load_prepared(emb.prepared_state(), torch.bfloat16)
    ids = torch.tensor([3, 0, 39])
    out = emb(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize(raw, Q.Q8_0, (40, 64))[ids].bfloat16())


def test_file_pages_are_released_only_for_file_mappings(tmp_path):
    anon = torch.arange(1 << 16, dtype=torch.uint8)
    assert not release_file_pages(anon)
    assert torch.equal(anon, torch.arange(1 << 16, dtype=torch.uint8))  # anonymous memory untouched
    path = tmp_path / "blob.bin"
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    data.tofile(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    assert release_file_pages(mapped[4096:-4096])
    assert torch.equal(mapped, torch.from_numpy(data))  # the pages read back from the file


NATIVE_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.skipif(not X86 or native._compiler() is None, reason="the native kernels need an x86 C compiler")
@pytest.mark.parametrize("isa", list(native.VARIANTS))
def test_every_isa_variant_compiles(isa):
    """Built whatever this CPU runs: a variant it cannot execute is compiled, never loaded."""
    so = {v: native._build(native._compiler(), v) for v in (isa, "avx2")}
    assert so[isa].stat().st_size > 0 and (isa == "avx2" or so[isa].name != so["avx2"].name)  # own flags, own .so


def _use_isa(isa: str, monkeypatch) -> None:
    if isa not in native.runnable_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels (needs {' '.join(sorted(native.VARIANTS[isa][1]))}; "
                    f"runnable: {native.runnable_isas() or 'none'})")
    monkeypatch.setenv("APR_NATIVE", "1")
    monkeypatch.setenv("APR_KERNEL_ISA", isa)
    assert native.isa() == isa


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda q: Q(q).name)
@pytest.mark.parametrize("isa", list(native.VARIANTS))
def test_isa_variant_matches_exact_arithmetic(isa, qtype, monkeypatch):
    """Every variant against the int8-rounded x times the exact dequantization in float64, and bit for bit
    against the AVX2 variant: the variants differ only in how they form the same int32 block sums. An odd
    number of 32-blocks (544 = 17) for the small types: the AVX-512 dots take blocks in pairs, then the tail."""
    n, k = 37, 512 if _lookup(qtype).block_size == 256 else 544
    raw = raw_matrix(qtype, n, k, seed=int(qtype))
    w = dequantize(raw, qtype, (n, k)).double()
    x, bias = torch.randn(3, k, generator=torch.Generator().manual_seed(1)), torch.randn(n)
    xb = x.double().reshape(3, -1, 32)  # the kernel's int8 blocks: x * (127 / max|block|) to nearest even
    amax = xb.abs().amax(-1, keepdim=True).float()
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)).double())
    xq = (q * (amax / 127).double()).reshape(3, k)
    _use_isa("avx2", monkeypatch)
    base = native.matmul(x, raw, qtype, n, bias)
    _use_isa(isa, monkeypatch)
    y = native.matmul(x, raw, qtype, n, bias)
    assert rel_err(y, xq @ w.T + bias.double()) < 2e-6
    assert torch.equal(y, base)
    assert torch.equal(native.dequantize(raw, qtype, k), dequantize(raw, qtype, (n, k)))


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda q: Q(q).name)
@pytest.mark.parametrize("isa", list(native.VARIANTS))
def test_multi_row_kernel_equals_one_row_calls_bit_for_bit(isa, qtype, monkeypatch):
    """M rows at once (each weight block unpacked once for a tile of rows) give every row the bits that row gets
    alone through the one-row dot: M = 2..8 inside a tile, 11 and 19 across tiles, every tile size, and an odd
    number of 32-blocks (the AVX-512 pairs' tail) where the type allows it."""
    _use_isa(isa, monkeypatch)
    n, k = 37, 512 if _lookup(qtype).block_size == 256 else 544  # 544: 17 blocks of 32
    raw, bias = raw_matrix(qtype, n, k, seed=7 + int(qtype)), torch.randn(n)
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 2, 19)[:, None]
    x[4, :32] = 0  # a block whose int8 scale is 0
    one = torch.cat([native.matmul(x[i:i + 1], raw, qtype, n, bias) for i in range(19)])  # (19, n), row by row
    for m in (2, 3, 4, 5, 6, 7, 8, 11, 19):
        assert torch.equal(native.matmul(x[:m], raw, qtype, n, bias), one[:m]), f"M={m}"
    assert torch.equal(native.matmul(x.bfloat16(), raw, qtype, n, bias),
                       torch.cat([native.matmul(r[None], raw, qtype, n, bias) for r in x.bfloat16()]))
    old = native.set_row_tile(1)
    try:
        for tile in (1, 2, 3, 5, 8):
            native.set_row_tile(tile)
            assert torch.equal(native.matmul(x, raw, qtype, n, bias), one), f"tile {tile}"
    finally:
        native.set_row_tile(old)


def _int8_steps(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded as the kernel rounds it: 32-blocks in int8 steps of max|block| / 127 (float64)."""
    xb = x.double().reshape(x.shape[0], -1, 32)  # (M, K) -> (M, K/32, 32)
    amax = xb.abs().amax(-1, keepdim=True).float()
    q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)).double())
    return (q * (amax / 127).double()).reshape(x.shape)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda q: Q(q).name)
@pytest.mark.parametrize("isa", list(native.VARIANTS))
def test_split_activations_cut_the_rounding_and_batch_bit_for_bit(isa, qtype, monkeypatch):
    """split: x as two int8 rows (the second rounds what the first rounded off). Against the exact model of
    that arithmetic in float64 only float32 accumulation remains; against unrounded x the error is ~100x
    below one int8 row's; and batched rows, every tile size included, equal one-row calls bit for bit."""
    _use_isa(isa, monkeypatch)
    n, k = 37, 512 if _lookup(qtype).block_size == 256 else 544
    raw, bias = raw_matrix(qtype, n, k, seed=11 + int(qtype)), torch.randn(n)
    w = dequantize(raw, qtype, (n, k)).double()
    x = torch.randn(11, k, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 2, 11)[:, None]
    x[2, 64:96] = 0  # a block whose two scales are 0
    x[5, 7] = 400.0  # an outlier that takes its block's int8 scale: what the second row exists for
    first = _int8_steps(x)
    exact = first + _int8_steps((x.double() - first).float())  # d q + d2 q2, as quantize_rows forms it
    exact = exact @ w.T + bias.double()
    y = native.matmul(x, raw, qtype, n, bias, split=True)
    assert rel_err(y, exact) < 2e-6
    ref = x.double() @ w.T + bias.double()
    assert rel_err(y, ref) * 100 < rel_err(native.matmul(x, raw, qtype, n, bias), ref)
    one = torch.cat([native.matmul(x[i:i + 1], raw, qtype, n, bias, split=True) for i in range(11)])
    assert torch.equal(y, one)
    old = native.set_row_tile(1)
    try:
        for tile in (1, 2, 3, 5, 8):  # odd tiles are made even: a row's two halves share a tile
            native.set_row_tile(tile)
            assert torch.equal(native.matmul(x, raw, qtype, n, bias, split=True), one), f"tile {tile}"
    finally:
        native.set_row_tile(old)


def test_unrunnable_isa_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setenv("APR_KERNEL_ISA", "nope")
    assert not native.available() and "APR_KERNEL_ISA=nope" in native.status()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_K, Q.Q8_0, Q.Q6_K])
@pytest.mark.parametrize("rows", [1, 48])
def test_cuda_paths_match_exact_dequant(qtype, rows):
    n, k = 80, 512
    raw = raw_matrix(qtype, n, k, seed=int(qtype))
    w = dequantize(raw, qtype, (n, k))
    ql = QuantLinear(raw, qtype, k, n)
    ql.materialize(torch.bfloat16, "cuda")
    p = ql.prepared
    assert p.kind == ("int4" if int(qtype) in kernels.PLANES else "dense")
    x = torch.randn(rows, k).bfloat16()
    y = ql(x.cuda())
    assert y.device.type == "cuda"
    assert rel_err(y.cpu(), reference(x, w)) < 1e-2
