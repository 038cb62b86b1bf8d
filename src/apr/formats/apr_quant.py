"""Requantization for `apr convert --quantize`: which type each tensor gets, and the bytes.

Q8_0, BF16, F16 and F32 use gguf-py's `gguf.quants.quantize` (it also does Q4_0/1, Q5_0/1, but no K-quant),
so Q4_K is written here: a vectorized port of ggml's `quantize_row_q4_K_ref` (weighted min/scale search per
32-value sub-block, 6-bit sub-scales under fp16 super-block scales).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from apr.errors import AprError
from apr.quant import dequantize

MODES = {"keep": None, "f32": T.F32, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_k": T.Q4_K}
# llama.cpp's own fallbacks when a row is not a whole number of the target's blocks
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_0: T.F16, T.Q8_0: T.F16}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.BF16: LlamaFileType.MOSTLY_BF16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
              T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S}
_BLOCKS_PER_STEP = 1 << 14  # Q4_K super-blocks quantized per step: temporaries of a few MiB


def target_type(qtype: int, shape: tuple[int, ...], mode: str) -> int:
    """The ggml type a tensor gets under `mode`; 1-D tensors (norms, biases) stay/become F32 as in llama.cpp."""
    if mode not in MODES:
        raise AprError(f"unknown --quantize '{mode}' (choose from {', '.join(MODES)})")
    want = MODES[mode]
    if want is None:
        return int(qtype)
    if len(shape) < 2:
        return int(T.F32)
    while shape[-1] % GGML_QUANT_SIZES[want][0]:
        want = _FALLBACK[want]
    return int(want)


def requantize(data: np.ndarray, qtype: int, shape: tuple[int, ...], target: int) -> np.ndarray:
    """Raw ggml bytes of type `qtype` -> flat uint8 bytes of type `target` (the same bytes if equal)."""
    if int(target) == int(qtype):
        return data
    x = dequantize(data, qtype, shape)  # float32, torch order
    if target == T.Q4_K:
        q = quantize_q4_k(x.reshape(-1, shape[-1])).numpy()
    else:
        import gguf.quants

        q = gguf.quants.quantize(x.numpy(), T(target))
    return np.ascontiguousarray(q).view(np.uint8).reshape(-1)


# ---- Q4_K ----

def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """float32 (rows, cols), cols a multiple of 256 -> uint8 (rows, cols // 256 * 144) Q4_K blocks."""
    rows, cols = x.shape
    blocks = x.reshape(-1, 8, 32)  # (n_blocks, 8 sub-blocks, 32 values)
    out = [_q4_k_blocks(b) for b in blocks.split(_BLOCKS_PER_STEP)]
    return torch.cat(out).reshape(rows, cols // 256 * 144)


def _q4_k_blocks(x: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) float32 -> (n, 144) uint8: d fp16 | dmin fp16 | 12 bytes 6-bit scales/mins | 128 bytes nibbles."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    weights = sub.pow(2).mean(1, keepdim=True).sqrt() + sub.abs()  # ggml: av_x + |x|
    scales, mins = (v.reshape(n, 8) for v in _qkx2(sub, weights))
    max_scale, max_min = scales.amax(1, keepdim=True), mins.amax(1, keepdim=True)
    inv_s = torch.where(max_scale > 0, 63 / max_scale.clamp_min(1e-30), 0)
    inv_m = torch.where(max_min > 0, 63 / max_min.clamp_min(1e-30), 0)
    ls = (inv_s * scales).round().clamp(0, 63).to(torch.uint8)  # (n, 8)
    lm = (inv_m * mins).round().clamp(0, 63).to(torch.uint8)
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()  # (n, 1)
    # the quants are fitted to the scales as stored (fp16 times 6-bit), not to the exact ones
    dl = (d.float() * ls.float()).unsqueeze(-1)  # (n, 8, 1)
    ml = (dmin.float() * lm.float()).unsqueeze(-1)
    q = torch.where(dl > 0, (x + ml) / dl.clamp_min(1e-30), 0).round().clamp(0, 15).to(torch.uint8)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), _pack_scales(ls, lm), _pack_nibbles(q)], dim=1)


def _pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Inverse of dequant._k_scale_min: 8 scales + 8 mins (6 bits each) -> 12 bytes."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], 1)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 8, 32) 4-bit values -> (n, 128): sub-block 2j in the low nibbles of bytes 32j.., 2j+1 in the high."""
    pairs = q.reshape(q.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int = 15, nstep: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qkx2_quants(rmin=-1, rdelta=0.1) over rows of x: (scale, -min) minimizing weighted error."""
    mn = x.amin(1).clamp(max=0)
    rng = x.amax(1) - mn
    flat = rng == 0
    rng = torch.where(flat, 1.0, rng)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    scale = rng / nmax
    best = _err(x, w, scale, mn, _levels(x, mn, nmax / rng, nmax))
    for step in range(nstep + 1):  # 21 candidate grids, each over all sub-blocks at once
        lv = _levels(x, mn, (nmax - 1.0 + 0.1 * step) / rng, nmax)
        sl, sl2, sxl = (w * lv).sum(1), (w * lv * lv).sum(1), (w * lv * x).sum(1)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s, m = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
        pos = m > 0  # a positive minimum is not allowed: refit the scale with min = 0
        s = torch.where(pos, sxl / sl2.clamp_min(1e-30), s)
        m = torch.where(pos, 0.0, m)
        err = _err(x, w, s, m, lv)
        better = ok & (err < best)
        best, scale, mn = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, m, mn)
    return torch.where(flat, 0.0, scale), -mn


def _levels(x: torch.Tensor, mn: torch.Tensor, iscale: torch.Tensor, nmax: int) -> torch.Tensor:
    return (iscale[:, None] * (x - mn[:, None])).round().clamp(0, nmax)


def _err(x, w, scale, mn, lv) -> torch.Tensor:
    return (w * (scale[:, None] * lv + mn[:, None] - x).pow(2)).sum(1)
