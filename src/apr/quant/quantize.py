"""float32 -> ggml blocks (Q8_0, Q5_0, Q4_K, Q6_K), byte for byte in ggml's layout (ggml-common.h), so
`apr.quant.dequantize` reads them back. Vectorised over all blocks of a chunk (no Python loop per block).

The algorithms follow ggml's reference quantizers:
- Q8_0: d = amax / 127, q = round(x / d) (half away from zero, as C's roundf).
- Q5_0: d = max / -16 with `max` the signed value of largest magnitude, q = min(31, trunc(x / d + 16.5)).
- Q6_K: 16 groups of 16 with a searched scale each (19 candidate grids, the one maximising the
  weighted fit (sum w x l)^2 / sum w l^2), the group scales then quantized to int8 under one fp16 scale.
- Q4_K: 8 sub-blocks of 32 with an asymmetric scale/min fitted by weighted least squares over 21 grids,
  the scales and mins quantized to 6 bits under fp16 super-scales, then the 4-bit levels refitted to the
  scales as stored.
Optional importance weights (one per column: the mean squared activation entering that column, as an
imatrix has) change every search's weights to `w_col * sqrt(sigma^2 + x^2)`; Q8_0 ignores them.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from apr.errors import AprError

QK_K = 256
_CHUNK_VALUES = 1 << 20  # values per step: temporaries of a few MiB each, and few Python steps per tensor
_EPS = 1e-15  # ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zeros

SUPPORTED = (T.F32, T.F16, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K)


def quantize(x: torch.Tensor, qtype: int, weights: torch.Tensor | None = None) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes) in ggml type `qtype`.

    `weights`: optional (cols,) importance of each column (non-negative), used by Q5_0/Q4_K/Q6_K."""
    qtype = T(int(qtype))
    if qtype not in SUPPORTED:
        raise AprError(f"apr cannot quantize to {qtype.name} (it writes {', '.join(t.name for t in SUPPORTED)})")
    x = torch.as_tensor(x).float()
    if x.dim() == 1:
        x = x.reshape(1, -1)
    rows, cols = x.shape
    if qtype == T.F32:
        return x.contiguous().numpy().view(np.uint8).reshape(rows, cols * 4)
    if qtype == T.F16:
        return x.half().contiguous().numpy().view(np.uint8).reshape(rows, cols * 2)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise AprError(f"a {qtype.name} row needs a multiple of {block} values, got {cols}")
    if not torch.isfinite(x).all():
        raise AprError(f"cannot quantize to {qtype.name}: the tensor has NaN or infinite values")
    if weights is not None:
        weights = torch.as_tensor(weights).float().reshape(-1)
        if weights.numel() != cols or (weights < 0).any() or not torch.isfinite(weights).all():
            raise AprError(f"importance weights need {cols} finite non-negative values, got {weights.numel()}")
    fn = _BLOCK_FNS[qtype]
    per_row = cols // block
    step = max(1, _CHUNK_VALUES // cols)  # whole rows per step: a row's column weights line up with its blocks
    out = np.empty((rows, per_row * type_size), dtype=np.uint8)
    for r in range(0, rows, step):
        chunk = x[r : r + step]
        w = None if weights is None else weights.expand(chunk.shape[0], cols).reshape(-1, block)
        blocks = fn(chunk.reshape(-1, block), w)  # (n_blocks, type_size)
        out[r : r + step] = blocks.numpy().reshape(-1, per_row * type_size)
    return out


def _rowsum(v: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n,), k a power of two, summed as a fixed pairwise tree of elementwise adds. A library
    reduction (sum, bmm) orders its adds by the CPU's vector width and BLAS kernel, so the same weights could
    quantize to other bytes on an AVX2 and an AVX-512 machine; elementwise adds round the same on every CPU,
    so the bytes `apr export` writes do not depend on the machine."""
    k = v.shape[1]
    if k & (k - 1):
        raise ValueError(f"_rowsum needs a power-of-two row length, got {k}")
    while k > 1:
        k //= 2
        v = v[:, :k] + v[:, k:]  # (n, 2k) -> (n, k)
    return v[:, 0]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products (n, k) x (n, k) -> (n,), in a fixed order (see _rowsum)."""
    return _rowsum(a * b)


def _rowmean(v: torch.Tensor) -> torch.Tensor:
    """(n, k) -> (n, 1): the mean of each row, in a fixed order (k is a power of two: the division is exact)."""
    return (_rowsum(v) / v.shape[1])[:, None]


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """The IEEE (correctly rounded) square root on every CPU. torch.sqrt on a large CPU tensor goes through
    MKL's vector math, whose AVX-512 code path on Intel is not correctly rounded (71,881 of 10 M float32 roots
    differed from IEEE on an AMX-class Xeon; none on its AVX2 path), so the exported bytes depended on the
    CPU. numpy's sqrt is the hardware instruction, which IEEE 754 requires to round correctly."""
    return torch.from_numpy(np.sqrt(v.contiguous().numpy()))


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ggml's Q8_0 uses; torch.round rounds half to even."""
    a = v.abs()
    fl = a.floor()
    return torch.copysign(fl + (2 * (a - fl)).floor(), v)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8: the little-endian fp16."""
    return v.half().reshape(-1, 1).contiguous().view(torch.uint8)


def _recip(v: torch.Tensor) -> torch.Tensor:
    """1 / v where v != 0, else 0 (ggml's `d ? 1/d : 0`)."""
    return torch.where(v != 0, 1.0 / torch.where(v != 0, v, 1.0), 0.0)


# ---- 32-value blocks ----

def _q8_0(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(n, 32) -> (n, 34): d fp16 | 32 int8."""
    d = x.abs().amax(1) / 127
    q = _roundf(x * _recip(d)[:, None]).to(torch.int8)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], 1)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's value of largest magnitude, sign kept (the first one on ties, as ggml's scan)."""
    return x.gather(1, x.abs().argmax(1, keepdim=True)).squeeze(1)


def _q5_0(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(n, 32) -> (n, 22): d fp16 | qh (bit j = 5th bit of value j) | 16 bytes: value j low, j+16 high nibble."""
    if w is None:
        d = _signed_max(x) / -16
        q = (x * _recip(d)[:, None] + 16.5).trunc().clamp(max=31).to(torch.int32)
    else:
        sigma2 = _rowmean(x * x)
        d, q = _qx_search(x, w * _sqrt(sigma2 + x * x), 16)
    bit = torch.arange(32, dtype=torch.int64)
    qh = _rowsum((q.long() >> 4) << bit)  # distinct bits: the sum is their OR, at most 32 bits
    qh_bytes = qh.to(torch.int32).reshape(-1, 1).view(torch.uint8)  # (n, 1) int32 -> (n, 4), little-endian
    nib = q.to(torch.uint8) & 0x0F
    qs = nib[:, :16] | (nib[:, 16:] << 4)
    return torch.cat([_fp16_bytes(d), qh_bytes, qs], 1)


def _qx_search(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants (symmetric, levels -nmax..nmax-1) over rows: (scale (n,), levels + nmax (n, k)).

    Tries the grids -(nmax + 0.1 i) / max for i in -9..9 and keeps the one with the largest
    (sum w x l)^2 / sum w l^2, i.e. the smallest weighted error once the scale is refitted."""
    mx = _signed_max(x)
    zero = mx.abs() < _EPS
    mx = torch.where(zero, 1.0, mx)

    wx = w * x

    def fit(iscale):
        lv = (iscale[:, None] * x).round().clamp(-nmax, nmax - 1)
        return lv, _dot(wx, lv), _dot(w * lv, lv)

    lv, sumlx, suml2 = fit(-nmax / mx)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best, levels = scale * sumlx, lv
    for i in range(-9, 10):
        if i == 0:
            continue
        lv, sumlx, suml2 = fit(-(nmax + 0.1 * i) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
        levels = torch.where(better[:, None], lv, levels)
    scale = torch.where(zero, 0.0, scale)
    levels = torch.where(zero[:, None], 0.0, levels + nmax)
    return scale, levels.to(torch.int32)


# ---- 256-value super-blocks ----

def _q6_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(n, 256) -> (n, 210): ql 128 | qh 64 | 16 int8 scales | d fp16."""
    n = x.shape[0]
    groups = x.reshape(n * 16, 16)  # (n, 256) -> (n * 16 groups, 16)
    if w is None:
        gw = groups * groups  # ggml's rmse_type 1
    else:
        sigma2 = _rowmean(x * x).repeat_interleave(16, 0)  # (n * 16, 1)
        gw = w.reshape(n * 16, 16) * _sqrt(sigma2 + groups * groups)
    scales, levels = _qx_search(groups, gw, 32)
    scales, levels = scales.reshape(n, 16), levels.reshape(n, 16, 16)
    max_scale = _signed_max(scales)
    empty = max_scale.abs() < _EPS  # ggml writes such a block as all zero bytes
    levels = torch.where(empty[:, None, None], 0, levels)
    iscale = -128.0 / torch.where(empty, 1.0, max_scale)
    d = torch.where(empty, 0.0, 1.0 / iscale)  # (n,)
    sc = (iscale[:, None] * scales).round().clamp(max=127)
    sc = torch.where(empty[:, None], 0.0, sc).to(torch.int8)  # (n, 16)
    dl = (d.half().float()[:, None] * sc.float())[:, :, None]  # the scales as stored: (n, 16, 1)
    # refit the levels to the stored scales; a group whose scale rounded to 0 keeps the search's levels
    refit = ((x.reshape(n, 16, 16) / torch.where(dl != 0, dl, 1.0)).round().clamp(-32, 31) + 32).to(torch.int32)
    q = torch.where(dl != 0, refit, levels).to(torch.uint8).reshape(n, 2, 4, 32)  # 2 halves x 4 quarters x 32
    ql = torch.cat([q[:, :, 0] & 0x0F | ((q[:, :, 2] & 0x0F) << 4),
                    q[:, :, 1] & 0x0F | ((q[:, :, 3] & 0x0F) << 4)], 2)  # (n, 2, 64)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8), _fp16_bytes(d)], 1)


def _q4_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """(n, 256) -> (n, 144): d fp16 | dmin fp16 | 12 bytes of 6-bit scales and mins | 128 bytes of nibbles."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)  # (n, 256) -> (n * 8 sub-blocks, 32)
    if w is None:
        sw = _sqrt(_rowmean(sub * sub)) + sub.abs()  # ggml: rms of the sub-block + |x|
        scales, mins, levels = _qkx_search(sub, sw, 15, -1.0, 0.1, 20)
    else:
        sigma2 = 2 * _rowmean(x * x).repeat_interleave(8, 0)  # (n * 8, 1)
        sw = w.reshape(n * 8, 32) * _sqrt(sigma2 + sub * sub)
        scales, mins, levels = _qkx_search(sub, sw, 15, -0.9, 0.05, 36)  # a finer search, as with an imatrix
    scales, mins, levels = scales.reshape(n, 8), mins.reshape(n, 8), levels.reshape(n, 8, 32)
    max_scale, max_min = scales.amax(1), mins.amax(1)
    ls = (_recip_pos(max_scale, 63)[:, None] * scales).round().clamp(0, 63).to(torch.uint8)  # (n, 8)
    lm = (_recip_pos(max_min, 63)[:, None] * mins).round().clamp(0, 63).to(torch.uint8)
    d, dmin = (max_scale / 63).half().float(), (max_min / 63).half().float()
    dl = (d[:, None] * ls.float())[:, :, None]  # (n, 8, 1): the scales as stored
    ml = (dmin[:, None] * lm.float())[:, :, None]
    refit = ((x.reshape(n, 8, 32) + ml) / torch.where(dl != 0, dl, 1.0)).round().clamp(0, 15).to(torch.int32)
    q = torch.where(dl != 0, refit, levels).to(torch.uint8)
    pairs = q.reshape(n, 4, 2, 32)  # sub-block 2j in the low nibbles of bytes 32j.., 2j+1 in the high ones
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_k_scales(ls, lm), qs], 1)


def _recip_pos(v: torch.Tensor, top: float) -> torch.Tensor:
    """top / v where v > 0, else 0."""
    return torch.where(v > 0, top / torch.where(v > 0, v, 1.0), 0.0)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 scales + 8 mins of 6 bits -> 12 bytes (the inverse of dequant._k_scale_min)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], 1)


def _qkx_search(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over rows: x ~ scale * l - m, l in 0..nmax, m >= 0, fitted by weighted least
    squares on each of nstep + 1 grids (rmin + rdelta * i + nmax) / (max - min), min being the best minimum so
    far (as in ggml, so the bytes match its quantizer on 98% of blocks); the grid with the smallest
    weighted squared error wins. Returns (scale (n,), m (n,), levels (n, k) int32)."""
    mn = x.amin(1).clamp(max=0)
    mx = x.amax(1)
    flat = mx == mn
    wx = w * x
    sum_w, sum_x = _rowsum(w), _rowsum(wx)

    def levels_at(top, m):
        rng = mx - m
        rng = torch.where(rng > 0, rng, 1.0)
        return ((top / rng)[:, None] * (x - m[:, None])).round().clamp(0, nmax)

    sum_x2 = _dot(wx, x).double()

    def fit(lv):
        """Weighted sums of the levels, in float64: the error below is their combination, which cancels."""
        return _dot(w, lv).double(), _dot(w * lv, lv).double(), _dot(wx, lv).double()

    def error(s, m, sl, sl2, sxl):
        # sum w (s l + m - x)^2, expanded so that no per-value pass is needed
        s, m = s.double(), m.double()
        return s * s * sl2 + 2 * s * m * sl - 2 * s * sxl + m * m * sw64 - 2 * m * sx64 + sum_x2

    sw64, sx64 = sum_w.double(), sum_x.double()
    levels = levels_at(torch.full_like(mx, float(nmax)), mn)
    scale, the_min = torch.where(flat, 1.0, mx - mn) / nmax, mn
    best = error(scale, the_min, *fit(levels))
    for i in range(nstep + 1):  # each grid over all sub-blocks at once
        # as in ggml, each grid starts from the best minimum found so far, not the block's own minimum
        lv = levels_at(torch.full_like(mx, rmin + rdelta * i + nmax), the_min)
        sl, sl2, sxl = fit(lv)
        det = sw64 * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s, m = (sw64 * sxl - sx64 * sl) / det, (sl2 * sx64 - sl * sxl) / det
        pos = m > 0  # a positive minimum is not representable: refit the scale with the minimum at 0
        s = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, 1.0), s).float()
        m = torch.where(pos, 0.0, m).float()
        err = error(s, m, sl, sl2, sxl)
        better = ok & (err < best)
        best, scale, the_min = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, m, the_min)
        levels = torch.where(better[:, None], lv, levels)
    scale = torch.where(flat, 0.0, scale)
    levels = torch.where(flat[:, None], 0.0, levels)
    return scale, -the_min, levels.to(torch.int32)


_BLOCK_FNS = {T.Q8_0: _q8_0, T.Q5_0: _q5_0, T.Q4_K: _q4_k, T.Q6_K: _q6_k}


# ---- which type each tensor gets ----

# llama.cpp's fallbacks when a row is not a whole number of the chosen type's blocks
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0, T.Q5_0: T.F16, T.Q8_0: T.F16}
MIXES = ("q4_k_m", "q8_0", "f16", "f32")
# general.file_type (llama_ftype) of each mix
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def plan_types(tensors: dict[str, tuple[int, ...]], mix: str) -> dict[str, int]:
    """{name: shape} in file order -> {name: ggml type} under `mix`, as llama.cpp's quantizer picks them.

    Q4_K_M: the output head Q6_K (the tied embedding when there is no head), attn_v and ffn_down Q6_K in
    the layers `_more_bits` picks, everything else Q4_K; the layer index counts tensors in file order (as
    llama.cpp does, so blk.10 comes before blk.2 in a lexically sorted file). 1-D tensors stay F32."""
    if mix not in MIXES:
        raise AprError(f"unknown quantization '{mix}' (choose from {', '.join(MIXES)})")
    n_v = sum(1 for n in tensors if n.endswith("attn_v.weight"))
    n_down = sum(1 for n in tensors if n.endswith("ffn_down.weight"))
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    i_v = i_down = 0
    out = {}
    for name, shape in tensors.items():
        if len(shape) < 2 or not name.endswith(".weight") or mix == "f32":
            out[name] = int(T.F32)
            continue
        want = {"f16": T.F16, "q8_0": T.Q8_0}.get(mix, T.Q4_K)
        if mix == "q4_k_m":
            if name == head:
                want = T.Q6_K
            elif name.endswith("attn_v.weight"):
                want, i_v = (T.Q6_K if _more_bits(i_v, n_v) else T.Q4_K), i_v + 1
            elif name.endswith("ffn_down.weight"):
                want, i_down = (T.Q6_K if _more_bits(i_down, n_down) else T.Q4_K), i_down + 1
        while want in _FALLBACK and shape[-1] % GGML_QUANT_SIZES[want][0]:
            want = _FALLBACK[want]
        out[name] = int(want)
    return out
