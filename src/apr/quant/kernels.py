"""Fast matmul formats for ggml weights, keyed by ggml type like the quant table.

`QuantLinear.materialize(dtype, device)` asks `prepare()` for a `Prepared` state and `linear()` runs it.
float32 never comes here: it is the exact reference path (dense dequantized weights).

Representations for bf16 compute (errors: relative Frobenius error of the weight against the exact
float32 dequantization; speed: one 4864x896 matvec, bf16 activations, 1 thread, median; measured on the
2-core AMD EPYC (AVX2, no AVX-512/AMX) dev box under load 6-9, so absolute times are inflated ~3x;
`benchmarks/kernel_table.py` reprints this table):

    type   chosen   bytes/w  weight err  |  bf16 dense err  matvec us (int4 | bf16 dense | int8/row)
    Q4_0   int4     0.625    2.1e-3      |  1.9e-3          see benchmarks/README.md
    Q4_1   int4     0.625    1.2e-3      |  1.3e-3
    Q4_K   int4     0.625    1.2e-3      |  1.2e-3
    Q5_0   int4x2   1.25     1.9e-3      |  1.9e-3
    Q5_1   int4x2   1.25     1.2e-3      |  1.2e-3
    Q5_K   int4x2   1.25     1.2e-3      |  1.2e-3
    Q8_0   int4x2   1.25     1.9e-3      |  1.9e-3          (int8 per-row scale: 2.6e-2, rejected)
    Q6_K   dense    2        1.9e-3      |  1.9e-3          (int8 per-row scale: 1.3e-2, rejected)
    Q2_K, Q3_K, F16, BF16, F32: dense bf16 (16-value sub-blocks have no exact int4 group-32 form)

int4 is torch's tinygemm: w = (q - 8) * scale + zero per group of 32 along K, scale/zero in bf16 (the
activation dtype). "int4x2" splits a 5- or 8-bit quant into two 4-bit planes (q = lo + 16 * hi) stacked
along N, so one kernel call gives [x @ W_lo.T, x @ W_hi.T] and one add sums them. (Stacking along K with
[x, x] as input computes the same, but its matvec measured 3x slower in median on this box while stacking
along N costs the expected 2x of one plane, 1.93 ms vs 5.9 ms for 2 x 4864x896.) Both planes use the *same*
bf16-rounded block scale, so the weight error is the bf16 rounding of the scale (2^-9 relative), the same
as bf16 dense weights; a per-row int8 scale (`_weight_int8pack_mm`) cannot represent ggml's per-block
scales and measured 10x worse, so it is not used. Q6_K/Q3_K/Q2_K have 16-value sub-blocks with their own
scales, which group-32 int4 cannot hold without doubling K, so they stay dense bf16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T

from apr.quant import dequant as dq
from apr.quant.table import _lookup, dequantize

GROUP = 32  # tinygemm group size along K
_PACK_ROWS = 2048  # rows packed per step: bounded temporaries (int32 copy of the quants) for the vocab head
_CPU_ROW_MULTIPLE = 64  # CPU packers need N % 16 == 0 and block rows by up to 64: pad with zero rows
_CUDA_ROW_MULTIPLE = 8
_DEQUANT_VALUES = 1 << 22  # values dequantized per prefill step (16 MiB of float32)
_TILE_ROWS = 128  # prefill tiles start at multiples of this (a multiple of every CPU packer row block)

# rows of x from which a CPU matmul dequantizes tiles and runs a dense GEMM instead of the int4 kernel;
# measured crossover on AVX2 near 32 rows (benchmarks/kernel_table.py), env APR_PREFILL_ROWS overrides
PREFILL_ROWS = 32


# ---- int4 planes: each type as (q, scale, zero) with w = (q - 8) * scale + zero, exactly ----
# A plane function maps uint8 blocks (n, type_size) to q uint8 (n, P, bs), scale and zero float32
# (n, P, bs // 32); `r` rounds a scale to the kernel's scale dtype (kept float32), so every plane
# derived from one block scale uses the same rounded value.

Planes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _q4_0(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    d = r(dq._f16(b, 0)).view(n, 1, 1)
    return dq._nibbles(b[:, 2:], n).view(n, 1, 32), d, torch.zeros_like(d)  # d (q - 8)


def _q4_1(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    d, m = r(dq._f16(b, 0)).view(n, 1, 1), dq._f16(b, 2).view(n, 1, 1)
    return dq._nibbles(b[:, 4:], n).view(n, 1, 32), d, 8 * d + m  # d q + m


def _split5(lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor, z_lo: torch.Tensor) -> Planes:
    """5-bit q = lo + 16 hi as two planes: (lo - 8) s + z_lo and (hi - 8) 16 s + 128 s = 16 s hi."""
    q = torch.stack([lo, hi], dim=1)  # 2 x (n, *rest) -> (n, 2, *rest)
    return q, torch.stack([s, 16 * s], 1), torch.stack([z_lo, 128 * s], 1)


def _q5_0(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    d = r(dq._f16(b, 0)).view(n, 1)
    q, s, z = _split5(dq._nibbles(b[:, 6:], n), dq._high_bit(b[:, 2:6], n), d, -8 * d)  # d (q - 16)
    return q, s, z


def _q5_1(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    d, m = r(dq._f16(b, 0)).view(n, 1), dq._f16(b, 2).view(n, 1)
    return _split5(dq._nibbles(b[:, 8:], n), dq._high_bit(b[:, 4:8], n), d, 8 * d + m)  # d q + m


def _q8_0(b: torch.Tensor, r) -> Planes:
    """int8 q = lo + 16 hi (lo 0..15, hi -8..7): planes d lo and 16 d hi."""
    n = b.shape[0]
    d = r(dq._f16(b, 0)).view(n, 1)
    q = b[:, 2:].view(torch.int8)
    planes = torch.stack([(q & 15).to(torch.uint8), ((q >> 4) + 8).to(torch.uint8)], dim=1)  # (n, 2, 32)
    return planes, torch.stack([d, 16 * d], 1), torch.stack([8 * d, torch.zeros_like(d)], 1)


def _k_scales(b: torch.Tensor, r) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: per 32-value sub-block scale d sc (rounded) and offset dmin m, each (n, 8)."""
    sc, mn = dq._k_scale_min(b[:, 4:16])
    return r(dq._f16(b, 0) * sc.float()), dq._f16(b, 2) * mn.float()


def _q4_k(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    s, off = _k_scales(b, r)
    q = dq._bits(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 1, 256)  # (n, 4, 2, 32) -> (n, 1, 256)
    return q, s.view(n, 1, 8), (8 * s - off).view(n, 1, 8)  # s q - dmin m


def _q5_k(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    s, off = _k_scales(b, r)
    lo = dq._bits(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 256)  # (n, 4, 2, 32) -> (n, 256)
    hi = dq._bits(b[:, 16:48].reshape(n, 1, 32), 1).reshape(n, 256)  # (n, 1, 8, 32) -> (n, 256)
    return _split5(lo, hi, s, 8 * s - off)


PLANES: dict[int, Callable[[torch.Tensor, Callable], Planes]] = {
    int(T.Q4_0): _q4_0, int(T.Q4_1): _q4_1, int(T.Q5_0): _q5_0, int(T.Q5_1): _q5_1, int(T.Q8_0): _q8_0,
    int(T.Q4_K): _q4_k, int(T.Q5_K): _q5_k,
}
PARTS = {t: (2 if fn in (_q5_0, _q5_1, _q8_0, _q5_k) else 1) for t, fn in PLANES.items()}  # int4 planes per type


def int4_planes(raw2d: torch.Tensor, qtype: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """ggml rows (N, row_bytes) -> q uint8 (N, P, K), scale and zero float32 (N, P, K/32) for P planes."""
    qt = _lookup(qtype)
    n_rows = raw2d.shape[0]
    blocks = raw2d.reshape(-1, qt.type_size)  # (N, row_bytes) -> (N*B, type_size)
    q, s, z = PLANES[qt.type_id](blocks, lambda t: t.to(scale_dtype).float())
    p = q.shape[1]

    def rows(t: torch.Tensor) -> torch.Tensor:  # (N*B, P, c) -> (N, B, P, c) -> (N, P, B, c) -> (N, P, B*c)
        return t.reshape(n_rows, -1, p, t.shape[-1]).transpose(1, 2).reshape(n_rows, p, -1)

    return rows(q), rows(s), rows(z)


# ---- Prepared: what forward needs after materialize ----

@dataclass
class Prepared:
    """kind "dense": tensors {weight}; kind "int4": {packed, sz} (+ `parts` planes stacked along N, each padded to `packed rows / parts`; `rows` is the real N).

    `layout` names the packed layout (device and packer block), so a stored state is only reused where
    it matches (see QuantLinear.load_prepared)."""

    kind: str
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: int = 1
    rows: int = 0
    layout: str = "dense"


def supports_int4(qtype: int, device: torch.device) -> bool:
    if device.type == "cpu":
        return int(qtype) in PLANES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return device.type == "cuda" and int(qtype) in PLANES


def prepare(raw2d: torch.Tensor, qtype: int, out_features: int, in_features: int, dtype: torch.dtype,
            device: torch.device | str = "cpu") -> Prepared:
    """Pack ggml rows for `dtype` compute on `device`: int4 where the type has an exact form, else dense."""
    device = torch.device(device)
    if dtype == torch.float32 or not supports_int4(qtype, device) or in_features % GROUP:
        w = dequantize(raw2d, qtype, (out_features, in_features))
        return Prepared("dense", dtype, {"weight": w.to(device=device, dtype=dtype)})
    from apr.quant import kernels_int4 as k4

    packer = k4.pack_cpu if device.type == "cpu" else k4.pack_cuda
    return packer(raw2d, qtype, out_features, dtype, device)


def linear(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b for x (..., K) in the compute dtype."""
    if p.kind == "dense":
        return _dense_linear(x, p.tensors["weight"], bias)
    from apr.quant import kernels_int4 as k4

    return k4.int4_linear(x, p, bias)


def _dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and w.dtype == torch.bfloat16 and rows >= PREFILL_ROWS and not native_bf16_gemm():
        # without AMX/AVX512-BF16 a bf16 GEMM is several times slower than float32: widen the weight per call
        return chunked_gemm(x, lambda r0, r1: w[r0:r1].float(), w.shape[0], bias)
    return F.linear(x, w, bias)


@functools.lru_cache(maxsize=None)
def native_bf16_gemm() -> bool:
    """Whether this CPU has bf16 GEMM hardware (AMX or AVX512-BF16); without it prefill runs in float32."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def chunked_gemm(x: torch.Tensor, tile: Callable[[int, int], torch.Tensor], n_out: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ W.T with W made tile by tile (rows [r0, r1) of W, dense) so no whole dense W is held."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (..., K) -> (T, K)
    step = max(_TILE_ROWS, _DEQUANT_VALUES // k // _TILE_ROWS * _TILE_ROWS)
    out = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    for r0 in range(0, n_out, step):  # a few tiles per weight; each tile's GEMM does the real work
        w = tile(r0, min(n_out, r0 + step))
        xt = x2 if x2.dtype == w.dtype else x2.to(w.dtype)
        out[:, r0 : r0 + w.shape[0]] = F.linear(xt, w)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n_out)  # (T, N) -> (..., N)
