"""tinygemm int4 packing and matmul for CPU and CUDA (the `int4` kind of apr.quant.kernels.Prepared).

Both torch kernels compute w = (q - 8) * scale + zero per group of 32 along K, with `sz` of shape
(K/32, N, 2) holding (scale, zero) in the activation dtype. Their packed layouts differ:
- CPU (`_convert_weight_to_int4pack_for_cpu`): int32 q (N, K) in -> uint8 (N, K/2), rows in blocks of
  BN (32 on AVX2 builds, 64 on AVX-512): byte [block, k, i] = q[block*BN + i, k] | q[block*BN + BN/2 + i, k] << 4.
- CUDA (`_convert_weight_to_int4pack`): uint8 (N, K/2) with q[:, 2j] << 4 | q[:, 2j+1] in -> int32 tiles.
"""

from __future__ import annotations

import functools

import torch

from apr.quant import kernels as kn

_mm_cpu = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


def _pad_rows(t: torch.Tensor, multiple: int, value: int | float = 0) -> torch.Tensor:
    """Append rows so the row count is a multiple of `multiple` (the padded rows give zero outputs)."""
    extra = -t.shape[0] % multiple
    if not extra:
        return t
    return torch.cat([t, t.new_full((extra, *t.shape[1:]), value)])


def _pack(raw2d, qtype: int, dtype: torch.dtype, multiple: int, pack_plane) -> tuple[dict, int]:
    """Pack every plane of every row step; planes are stacked along N: [plane 0 rows; plane 1 rows].

    The outputs are allocated once and filled step by step: collecting chunks and concatenating them
    left the heap fragmented (1.2 GB peak for the 151936-row vocabulary head, vs 170 MB of output)."""
    n_rows = raw2d.shape[0]
    n_pad = n_rows + (-n_rows % multiple)
    parts = kn.PARTS[int(qtype)]
    out: dict[str, torch.Tensor] = {}
    for r0 in range(0, n_rows, kn._PACK_ROWS):  # _PACK_ROWS is a multiple of every packer's row block
        for p, (q, s, z) in enumerate(kn.int4_planes(raw2d[r0 : r0 + kn._PACK_ROWS], qtype, dtype)):
            if r0 + q.shape[0] == n_rows:  # the last step: zero rows up to the packer's multiple
                q, s, z = _pad_rows(q, multiple, 8), _pad_rows(s, multiple), _pad_rows(z, multiple)
            n = q.shape[0]
            chunk, sz_chunk = pack_plane(q), _sz(s, z, dtype)  # (n * f, ...), (G, n, 2)
            f = chunk.shape[0] / n  # packed rows per weight row: 1 on CPU, 1/8 on CUDA (tiles of 8 rows)
            if not out:
                out["packed"] = chunk.new_empty((int(parts * n_pad * f), *chunk.shape[1:]))
                out["sz"] = sz_chunk.new_empty((sz_chunk.shape[0], parts * n_pad, 2))
            at = p * n_pad + r0
            out["packed"][int(at * f) : int((at + n) * f)] = chunk
            out["sz"][:, at : at + n] = sz_chunk
    return out, parts


def _sz(s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([s, z], -1).to(dtype).transpose(0, 1).contiguous()  # (N, G, 2) -> (G, N, 2)


def pack_cpu(raw2d, qtype: int, n_out: int, dtype: torch.dtype, device) -> kn.Prepared:
    bn = cpu_block_n()

    def plane(q: torch.Tensor) -> torch.Tensor:  # (n, K) values 0..15 -> (n, K/2) uint8
        if bn:  # the layout the probe confirmed, built with byte ops: 4x faster than the int32 op
            return pack_cpu_direct(q, bn)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)

    tensors, parts = _pack(raw2d, qtype, dtype, kn._CPU_ROW_MULTIPLE, plane)
    return kn.Prepared("int4", dtype, tensors, parts, n_out, cpu_layout())


def pack_cuda(raw2d, qtype: int, n_out: int, dtype: torch.dtype, device) -> kn.Prepared:
    tiles = inner_k_tiles(raw_cols(raw2d, qtype))

    def plane(q: torch.Tensor) -> torch.Tensor:  # (n, K) values 0..15 -> CUDA tiles
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(device)  # (n, K) -> (n, K/2): even column in the high nibble
        return torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)

    tensors, parts = _pack(raw2d, qtype, dtype, kn._CUDA_ROW_MULTIPLE, plane)
    tensors["sz"] = tensors["sz"].to(device)  # built on the host next to the planes
    return kn.Prepared("int4", dtype, tensors, parts, n_out, f"int4-cuda-ikt{tiles}")


def raw_cols(raw2d: torch.Tensor, qtype: int) -> int:
    qt = kn._lookup(qtype)
    return raw2d.shape[1] // qt.type_size * qt.block_size


def inner_k_tiles(k: int) -> int:
    """The widest CUDA inner K tiling that divides K (K is a multiple of 32, so 2 always does)."""
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


# ---- matmul ----

def int4_linear(x: torch.Tensor, p: kn.Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # (..., K) -> (T, K)
    if x2.device.type == "cpu" and x2.shape[0] >= kn.prefill_rows() and cpu_block_n():
        y = kn.chunked_gemm(x2, lambda r0, r1: dequant_rows(p, r0, r1, k), p.rows, None)
    else:
        y = _mm(x2, p)  # (T, P * N_pad)
        if p.parts == 2:  # the planes add up: (T, 2 * N_pad) -> (T, N_pad); an add measured 3x cheaper than sum(1)
            n_pad = y.shape[1] // 2
            y = y[:, :n_pad] + y[:, n_pad:]
        y = y[:, : p.rows]  # padded rows dropped
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], p.rows)  # (T, N) -> (..., N)


def _mm(x2: torch.Tensor, p: kn.Prepared) -> torch.Tensor:
    if x2.device.type == "cpu":
        return _mm_cpu(x2, p.tensors["packed"], kn.GROUP, p.tensors["sz"])
    return torch.ops.aten._weight_int4pack_mm(x2, p.tensors["packed"], kn.GROUP, p.tensors["sz"])


# ---- CPU layout: the probe that finds BN, and dequantizing packed rows for prefill GEMMs ----

@functools.lru_cache(maxsize=None)
def cpu_block_n() -> int:
    """The CPU packer's row block (0 when the layout is not the documented one: prefill then uses the kernel)."""
    n, k = 128, 64
    q = ((torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :] * 3) % 16).to(torch.int32)  # (N, K) pattern
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, AttributeError):
        return 0
    for bn in (16, 32, 64, 128):
        if torch.equal(unpack_cpu(packed, bn).int(), q) and torch.equal(pack_cpu_direct(q.to(torch.uint8), bn), packed):
            return bn
    return 0


def cpu_layout() -> str:
    return f"int4-cpu-bn{cpu_block_n()}"


def pack_cpu_direct(q: torch.Tensor, bn: int) -> torch.Tensor:
    """q uint8 (N, K) -> the CPU packer's uint8 (N, K/2) for row block `bn` (the inverse of unpack_cpu)."""
    n, k = q.shape
    qv = q.contiguous().view(n // bn, 2, bn // 2, k)  # (N, K) -> (N/bn, 2, bn/2, K): first and second half of each block
    out = torch.empty(n // bn, k, bn // 2, dtype=torch.uint8)
    out.copy_((qv[:, 1] << 4 | qv[:, 0]).transpose(1, 2))  # (N/bn, bn/2, K) -> (N/bn, K, bn/2)
    return out.view(n, k // 2)


def unpack_cpu(packed: torch.Tensor, bn: int) -> torch.Tensor:
    """Packed uint8 (N, K/2) -> q uint8 (N, K), inverting the CPU packer's row blocks of `bn`."""
    n, k = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n // bn, k, bn // 2).transpose(1, 2)  # (N/bn, bn/2, K): byte i of column k
    q = torch.empty(n // bn, 2, bn // 2, k, dtype=torch.uint8)
    torch.bitwise_and(b, 15, out=q[:, 0])  # rows i of each block
    torch.bitwise_right_shift(b, 4, out=q[:, 1])  # rows bn/2 + i
    return q.view(n, k)  # (N/bn, 2, bn/2, K) -> (N, K)


def dequant_rows(p: kn.Prepared, r0: int, r1: int, k: int) -> torch.Tensor:
    """Rows [r0, r1) of the dense weight (r1 - r0, K), planes summed, in the prefill GEMM dtype."""
    dt = torch.bfloat16 if kn.native_bf16_gemm() else torch.float32
    n_pad = p.tensors["packed"].shape[0] // p.parts
    w = _dequant_plane(p, r0, r1)
    for plane in range(1, p.parts):
        w += _dequant_plane(p, plane * n_pad + r0, plane * n_pad + r1)
    return w.view(r1 - r0, k).to(dt)  # (n, G, 32) -> (n, K)


def _dequant_plane(p: kn.Prepared, r0: int, r1: int) -> torch.Tensor:
    """Packed rows [r0, r1) -> float32 (n, G, 32); r0 is a multiple of the CPU row block."""
    bn = cpu_block_n()
    end = -(-r1 // bn) * bn  # the last tile may end inside a block (or in the padding)
    q = unpack_cpu(p.tensors["packed"][r0:end], bn)[: r1 - r0]  # (n, K)
    n, g = q.shape[0], q.shape[1] // kn.GROUP
    sz = p.tensors["sz"][:, r0:r1].float()  # (G, n, 2)
    s, z = sz[..., 0].t().contiguous().unsqueeze(-1), sz[..., 1].t().contiguous().unsqueeze(-1)  # (n, G, 1) each
    return torch.addcmul(z - 8 * s, q.view(n, g, kn.GROUP).float(), s)  # (q - 8) s + z
