"""Fast matmul formats for ggml weights, keyed by ggml type like the quant table.

`QuantLinear.materialize(dtype, device)` asks `prepare()` for a `Prepared` state and `linear()` runs it.
float32 is the exact reference path: prepare() gives it the dense dequantized weight, as always.

On x86 CPUs with AVX2 (FMA, F16C) and a C compiler, the other dtypes use kind "ggml": the file's own
blocks, read in place by apr.quant.native (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K). Decode steps
(few rows) run its int8-activation matvec; prefill (many rows) dequantizes row tiles for a float32
GEMM (bf16 where the CPU has bf16 GEMM hardware). Nothing is packed, so a load maps the file and is done.
Everything below is the torch-only path, used where the native kernel is not (no compiler, another
CPU, CUDA, APR_NATIVE=0, or a type it lacks).

Representations for bf16 compute. err: relative Frobenius error of the weight each representation
computes with, against the exact float32 dequantization (random ggml blocks); us: median of one matvec
(T=1, bf16 activations, 1 thread, interleaved rounds) on the 2-core AMD EPYC dev box (AVX2, no AVX-512,
no AMX) at load average 2.9; `benchmarks/kernel_table.py` reprints it.

    type  shape     chosen  B/w   err      bf16 dense err  int8/row err | us chosen  bf16 dense  int8/row
    Q4_0  4864x896  int4    0.625 1.69e-3  1.69e-3         6.27e-3      |  911       1305        1153
    Q4_1  4864x896  int4    0.625 2.17e-3  1.69e-3         6.15e-3      | 1151       1526        1291
    Q4_K  896x4864  int4    0.625 2.32e-3  1.66e-3         1.05e-2      | 1133       1585         895
    Q5_0  4864x896  int4x2  1.25  1.68e-3  1.69e-3         6.36e-3      | 2019       1516        1355
    Q5_1  4864x896  int4x2  1.25  1.80e-3  1.69e-3         6.27e-3      | 1884       1633        1349
    Q5_K  896x4864  int4x2  1.25  1.88e-3  1.66e-3         1.04e-2      | 2141       1776        1016
    Q8_0  4864x896  int4x2  1.25  1.69e-3  1.69e-3         6.32e-3      | 1780       1593        1253
    Q6_K  896x4864  dense   2     1.67e-3  1.67e-3         1.02e-2      | 1594       1311         770
    Q3_K, Q2_K, F16, BF16, F32: dense bf16 (Q3_K 1.68e-3, Q2_K 1.65e-3: the bf16 rounding itself)

Why: int8 weight-only (`_weight_int8pack_mm`) is fast but holds one scale per row; ggml's per-block
scales do not fit it, and the best per-row int8 is 4-6x less precise than the source, so it is never
used. On this AVX2 box torch's int4 kernel is slow (~5 G weights/s per core): a two-plane matvec is
~1.2-1.3x slower than a dense bf16 one. On the AMX box the issue measured (int4 123 us vs bf16 388 us
for 4864x896) it is ~1.6x faster. Either way it holds the weights at 1.25 bytes instead of 2,
which is what keeps peak RSS near 2x the file (0.5B: 0.59 GB prepared vs 0.85 GB all-dense). Q4_1/Q4_K are 1.3-1.4x the bf16-dense error (their zero point
is rounded to bf16 on its own), still 3-5x better than int8/row.
Model level (teacher-forced over 400 tokens, bf16 fast path vs float32): qwen2.5-coder-0.5b Q4_K_M
top-1 98.5%, mean KL 0.0005; see benchmarks/README.md for the rest.

int4 is torch's tinygemm: w = (q - 8) * scale + zero per group of 32 along K, scale/zero in bf16 (the
activation dtype). "int4x2" splits a 5- or 8-bit quant into two 4-bit planes (q = lo + 16 * hi) stacked
along N, so one kernel call gives [x @ W_lo.T, x @ W_hi.T] and one add sums them. (Stacking along K with
[x, x] as input computes the same, but its matvec measured 3x slower in median on this box while stacking
along N costs the expected 2x of one plane, 1.93 ms vs 5.9 ms for 2 x 4864x896.) Both planes use the *same*
bf16-rounded block scale, so the weight error is the bf16 rounding of the scale (2^-9 relative), the same
as bf16 dense weights (table above). Q6_K/Q3_K/Q2_K have 16-value sub-blocks with their own
scales, which group-32 int4 cannot hold without doubling K, so they stay dense bf16.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
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

# Rows of x from which a CPU int4 matmul dequantizes weight tiles and runs a dense GEMM instead of the
# int4 kernel (env APR_PREFILL_ROWS overrides). Measured on the AVX2 box (1 thread, ms, Q5_0 4864x896 /
# Q4_K 896x4864): T=128 kernel 107 / 51 vs tiles 174 / 79; T=256 kernel 220 / 151 vs tiles 149 / 124;
# T=512 kernel 467 / 223 vs tiles 210 / 170. With AMX or AVX512-BF16 the tiles are bf16 and the GEMM
# several times faster, so the crossover is far lower (not measured here: no such CPU on this box).
PREFILL_ROWS_FP32_GEMM = 192
PREFILL_ROWS_BF16_GEMM = 32
# A dense bf16 weight is widened to float32 per call from this many rows on (no bf16 GEMM hardware):
# Q6_K 896x4864 at T=128: bf16 GEMM 196 ms vs widen + float32 GEMM 49 ms.
WIDEN_ROWS = 16


def prefill_rows() -> int:
    default = PREFILL_ROWS_BF16_GEMM if native_bf16_gemm() else PREFILL_ROWS_FP32_GEMM
    return int(os.environ.get("APR_PREFILL_ROWS", default))


# ---- int4 planes: each type as (q, scale, zero) with w = (q - 8) * scale + zero, exactly ----
# A plane function maps uint8 blocks (n, type_size) to one list per field, one entry per plane:
# q uint8 (n, bs), scale and zero float32 (n, bs // 32). Planes stay separate tensors: each plane of
# (N*B) blocks is then a plain view (N, K) of the rows, with no stacking or transposing copies.
# `r` rounds a scale to the kernel's scale dtype (kept float32), so every plane derived from one block
# scale uses the same rounded value.

Planes = tuple[list, list, list]


def _nib(b: torch.Tensor) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_x quants: low nibbles are values 0..15 of the block, high nibbles 16..31."""
    return torch.cat([b & 15, b >> 4], dim=1)  # (n, 16) -> (n, 32)


def _q4_0(b: torch.Tensor, r) -> Planes:
    d = r(dq._f16(b, 0))  # (n, 1)
    return [_nib(b[:, 2:])], [d], [torch.zeros_like(d)]  # d (q - 8)


def _q4_1(b: torch.Tensor, r) -> Planes:
    d, m = r(dq._f16(b, 0)), dq._f16(b, 2)
    return [_nib(b[:, 4:])], [d], [8 * d + m]  # d q + m


def _split5(lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor, z_lo: torch.Tensor) -> Planes:
    """5-bit q = lo + 16 hi as two planes: (lo - 8) s + z_lo and (hi - 8) 16 s + 128 s = 16 s hi."""
    return [lo, hi], [s, 16 * s], [z_lo, 128 * s]


def _q5_0(b: torch.Tensor, r) -> Planes:
    d = r(dq._f16(b, 0))
    return _split5(_nib(b[:, 6:]), dq._high_bit(b[:, 2:6], b.shape[0]), d, -8 * d)  # d (q - 16)


def _q5_1(b: torch.Tensor, r) -> Planes:
    d, m = r(dq._f16(b, 0)), dq._f16(b, 2)
    return _split5(_nib(b[:, 8:]), dq._high_bit(b[:, 4:8], b.shape[0]), d, 8 * d + m)  # d q + m


def _q8_0(b: torch.Tensor, r) -> Planes:
    """int8 q = lo + 16 hi (lo 0..15, hi -8..7): planes d lo and 16 d hi."""
    d = r(dq._f16(b, 0))
    q = b[:, 2:].view(torch.int8)
    lo, hi = (q & 15).view(torch.uint8), ((q >> 4) + 8).view(torch.uint8)  # int8 bits reread as 0..15
    return [lo, hi], [d, 16 * d], [8 * d, torch.zeros_like(d)]


def _k_scales(b: torch.Tensor, r) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: per 32-value sub-block scale d sc (rounded) and offset dmin m, each (n, 8)."""
    sc, mn = dq._k_scale_min(b[:, 4:16])
    return r(dq._f16(b, 0) * sc.float()), dq._f16(b, 2) * mn.float()


def _q4_k(b: torch.Tensor, r) -> Planes:
    n = b.shape[0]
    s, off = _k_scales(b, r)
    q = dq._bits(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 256)  # (n, 4, 2, 32) -> (n, 256)
    return [q], [s], [8 * s - off]  # s q - dmin m


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


def int4_planes(raw2d: torch.Tensor, qtype: int, scale_dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """ggml rows (N, row_bytes) -> per plane (q uint8 (N, K), scale float32 (N, K/32), zero float32 (N, K/32))."""
    qt = _lookup(qtype)
    n_rows = raw2d.shape[0]
    blocks = raw2d.reshape(-1, qt.type_size)  # (N, row_bytes) -> (N*B, type_size)
    qs, ss, zs = PLANES[qt.type_id](blocks, lambda t: t.to(scale_dtype).float())
    # (N*B, c) -> (N, B*c): the blocks of a row are consecutive, so each plane is a view of its rows
    return [(q.reshape(n_rows, -1), s.reshape(n_rows, -1), z.reshape(n_rows, -1)) for q, s, z in zip(qs, ss, zs)]


# ---- Prepared: what forward needs after materialize ----

@dataclass
class Prepared:
    """kind "dense": tensors {weight}; kind "ggml": {raw} (the file's blocks, apr.quant.native);
    kind "int4": {packed, sz} (+ `parts` planes stacked along N, each padded to `packed rows / parts`; `rows` is the real N).

    `layout` names the packed layout (device and packer block), so a stored state is only reused where
    it matches (see QuantLinear.load_prepared)."""

    kind: str
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: int = 1
    rows: int = 0
    layout: str = "dense"
    qtype: int = -1  # kind "ggml": the ggml type of tensors["raw"], read in place by apr.quant.native


def supports_int4(qtype: int, device: torch.device) -> bool:
    if os.environ.get("APR_INT4", "1") == "0":  # a diagnostic switch: dense weights in the compute dtype
        return False
    if device.type == "cpu":
        return int(qtype) in PLANES and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return device.type == "cuda" and int(qtype) in PLANES


def prepare(raw2d: torch.Tensor, qtype: int, out_features: int, in_features: int, dtype: torch.dtype,
            device: torch.device | str = "cpu") -> Prepared:
    """Pack ggml rows for `dtype` compute on `device`: int4 where the type has an exact form, else dense."""
    device = torch.device(device)
    if dtype != torch.float32 and uses_native(qtype, device):
        return ggml_prepared(raw2d, qtype, out_features, dtype)
    if dtype == torch.float32 or not supports_int4(qtype, device) or in_features % GROUP:
        w = dequantize(raw2d, qtype, (out_features, in_features))
        return Prepared("dense", dtype, {"weight": w.to(device=device, dtype=dtype)})
    from apr.quant import kernels_int4 as k4

    packer = k4.pack_cpu if device.type == "cpu" else k4.pack_cuda
    return packer(raw2d, qtype, out_features, dtype, device)


def ggml_prepared(raw2d: torch.Tensor, qtype: int, out_features: int, dtype: torch.dtype) -> Prepared:
    """The native kernel's state: the ggml rows themselves (nothing is packed or copied)."""
    return Prepared("ggml", dtype, {"raw": raw2d}, 1, out_features, "ggml", int(qtype))


def uses_native(qtype: int, device: torch.device | str) -> bool:
    """Whether non-float32 compute of this type on `device` reads the ggml blocks in place (AVX2 kernel)."""
    from apr.quant import native

    return torch.device(device).type == "cpu" and native.supports(qtype)


def linear(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b for x (..., K) in the compute dtype."""
    if p.kind == "ggml":
        return ggml_tile_linear(x, p, bias)
    if p.kind == "dense":
        return _dense_linear(x, p.tensors["weight"], bias)
    from apr.quant import kernels_int4 as k4

    return k4.int4_linear(x, p, bias)


def ggml_tile_linear(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None,
                     tile_dtype: torch.dtype | None = None, groups: list[int] | None = None) -> torch.Tensor:
    """Many rows (prefill): dequantized tiles and a GEMM, whose arithmetic intensity the per-row kernel
    cannot match. Few rows never come here: QuantLinear sends them to the native kernel (linear.fused).
    `tile_dtype` float32 (with float32 x): a float32 GEMM whatever the CPU has (QuantLinear.forward_float32).
    `groups`: x's rows are several sequences' (see chunked_gemm)."""
    from apr.quant import native

    k = x.shape[-1]
    tile_dtype = tile_dtype or (torch.bfloat16 if native_bf16_gemm() else torch.float32)
    raw = p.tensors["raw"]
    reuse = not (torch.is_grad_enabled() and x.requires_grad)  # autograd keeps each tile for backward

    def tile(r0: int, r1: int) -> torch.Tensor:
        # one pass from the ggml blocks into a reused buffer: no fresh pages per tile, no float32 tile to convert
        buf = _tile_buffer(tile_dtype, (r1 - r0) * k).view(r1 - r0, k) if reuse else None  # (n,) -> (rows, K)
        return native.dequantize(raw[r0:r1], p.qtype, k, tile_dtype, out=buf)

    return chunked_gemm(x, tile, p.rows, bias, groups)


_tiles = threading.local()


def _tile_buffer(dtype: torch.dtype, n: int) -> torch.Tensor:
    """This thread's prefill tile buffer of `dtype`, at least n values (a tile is used before the next is made)."""
    bufs = _tiles.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < n:
        buf = bufs[dtype] = torch.empty(max(n, _DEQUANT_VALUES), dtype=dtype)
    return buf[:n]


def _dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and w.dtype == torch.bfloat16 and rows >= WIDEN_ROWS and not native_bf16_gemm():
        # without AMX/AVX512-BF16 a bf16 GEMM is several times slower than float32: widen the weight per call
        return chunked_gemm(x, lambda r0, r1: w[r0:r1].float(), w.shape[0], bias)
    return F.linear(x, w, bias)


@functools.lru_cache(maxsize=None)
def native_bf16_gemm() -> bool:
    """Whether this CPU has bf16 GEMM hardware (AMX or AVX512-BF16); without it prefill runs in float32."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def chunked_gemm(x: torch.Tensor, tile: Callable[[int, int], torch.Tensor], n_out: int,
                 bias: torch.Tensor | None, groups: list[int] | None = None) -> torch.Tensor:
    """x (..., K) @ W.T with W made tile by tile (rows [r0, r1) of W, dense) so no whole dense W is held.
    `groups`: row counts of the sequences x holds; each tile is made once and multiplied with each sequence's
    rows on their own (a GEMM's sums depend on its row count: so each sequence's are those it gets alone)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (..., K) -> (T, K)
    step = max(_TILE_ROWS, _DEQUANT_VALUES // k // _TILE_ROWS * _TILE_ROWS)
    out = torch.empty(x2.shape[0], n_out, dtype=x.dtype, device=x.device)
    ends = list(itertools.accumulate(groups or [x2.shape[0]]))
    for r0 in range(0, n_out, step):  # a few tiles per weight; each tile's GEMM does the real work
        w = tile(r0, min(n_out, r0 + step))
        xt = x2 if x2.dtype == w.dtype else x2.to(w.dtype)
        for a, b in zip([0] + ends[:-1], ends):
            out[a:b, r0 : r0 + w.shape[0]] = F.linear(xt[a:b], w)
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n_out)  # (T, N) -> (..., N)
