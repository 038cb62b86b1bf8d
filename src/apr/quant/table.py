"""The quantization table (keyed by ggml type id) and whole-tensor / row-wise dequantization."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from apr.errors import BadModelFile
from apr.quant import dequant as dq


@dataclass(frozen=True)
class QuantType:
    name: str
    type_id: int
    block_size: int  # values per block
    type_size: int  # bytes per block
    dequant: Callable[[torch.Tensor], torch.Tensor]  # uint8 (n, type_size) -> float32 (n, block_size)


def _entry(qt: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantType:
    block_size, type_size = GGML_QUANT_SIZES[qt]
    return QuantType(qt.name, int(qt), block_size, type_size, fn)


QUANT_TYPES: dict[int, QuantType] = {
    q.type_id: q
    for q in (
        _entry(T.F32, dq.f32), _entry(T.F16, dq.f16), _entry(T.BF16, dq.bf16),
        _entry(T.Q4_0, dq.q4_0), _entry(T.Q4_1, dq.q4_1), _entry(T.Q5_0, dq.q5_0),
        _entry(T.Q5_1, dq.q5_1), _entry(T.Q8_0, dq.q8_0),
        _entry(T.Q2_K, dq.q2_k), _entry(T.Q3_K, dq.q3_k), _entry(T.Q4_K, dq.q4_k),
        _entry(T.Q5_K, dq.q5_k), _entry(T.Q6_K, dq.q6_k),
    )
}

# Values dequantized per step: each float temporary is then 1 MiB and stays in L2 cache, which measured
# 2-5x faster than whole-tensor ops (and peak memory is the output plus a few MiB).
_CHUNK_VALUES = 1 << 18


def is_supported(qtype: int) -> bool:
    return int(qtype) in QUANT_TYPES


def type_name(qtype: int) -> str:
    """The ggml name of any type id ("Q4_K", "IQ2_XXS"), or "type <id>" for ids ggml does not know."""
    try:
        return T(int(qtype)).name
    except ValueError:
        return f"type {int(qtype)}"


def _lookup(qtype: int) -> QuantType:
    qt = QUANT_TYPES.get(int(qtype))
    if qt is None:
        known = ", ".join(q.name for q in QUANT_TYPES.values())
        raise BadModelFile(f"unsupported tensor type {type_name(qtype)} (ggml id {int(qtype)}); apr supports {known}")
    return qt


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` values; `cols` must be a whole number of blocks."""
    qt = _lookup(qtype)
    if cols <= 0 or cols % qt.block_size:
        raise BadModelFile(f"a {qt.name} row of {cols} values is not a whole number of {qt.block_size}-value blocks")
    return cols // qt.block_size * qt.type_size


def _as_bytes(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A uint8 tensor over the same memory (no copy), whatever raw's dtype."""
    if isinstance(raw, torch.Tensor):
        return raw if raw.dtype == torch.uint8 else raw.contiguous().view(torch.uint8)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        arr = np.ascontiguousarray(arr).view(np.uint8)
    with warnings.catch_warnings():
        # a read-only memory map: torch warns it cannot be written; we only ever read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _run(qt: QuantType, blocks: torch.Tensor) -> torch.Tensor:
    """Dequantize (n, type_size) blocks to (n, block_size) in cache-sized steps."""
    n, step = blocks.shape[0], max(1, _CHUNK_VALUES // qt.block_size)
    if n <= step:
        return qt.dequant(blocks)
    out = torch.empty(n, qt.block_size, dtype=torch.float32, device=blocks.device)
    for start in range(0, n, step):  # a handful of steps per tensor, never one per block
        out[start : start + step] = qt.dequant(blocks[start : start + step])
    return out


def dequantize(raw: torch.Tensor | np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw ggml bytes (any shape) -> float32 tensor of `shape` (torch order, last dim contiguous)."""
    qt = _lookup(qtype)
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise BadModelFile(f"a {qt.name} tensor needs at least one dimension")
    data = _as_bytes(raw).reshape(-1)  # any shape -> (n_bytes,)
    want = math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])
    if data.numel() != want:
        raise BadModelFile(f"a {qt.name} tensor of shape {list(shape)} needs {want} bytes, got {data.numel()}")
    if data.device.type == "cpu" and _native_supports(qt.type_id):  # same values, bit for bit, faster
        from apr.quant import native

        rows = math.prod(shape[:-1])
        return native.dequantize(data.view(rows, -1), qt.type_id, shape[-1]).reshape(shape)  # (rows, K) -> shape
    blocks = data.reshape(-1, qt.type_size)  # (n_bytes,) -> (n_blocks, type_size)
    return _run(qt, blocks).reshape(shape)  # (n_blocks, block_size) -> shape


def _native_supports(qtype: int) -> bool:
    from apr.quant import native

    return native.supports(qtype)


def dequantize_rows(raw2d: torch.Tensor | np.ndarray, qtype: int, ids: torch.Tensor) -> torch.Tensor:
    """Dequantize only rows `ids` of a (rows, row_bytes) matrix -> float32 (*ids.shape, cols).

    For 1-D ids that is (len(ids), cols): an embedding lookup without materialising the whole table.
    """
    qt = _lookup(qtype)
    data = _as_bytes(raw2d)
    if data.dim() != 2 or data.shape[1] % qt.type_size:
        raise BadModelFile(f"{qt.name} rows need shape (rows, k * {qt.type_size}), got {list(data.shape)}")
    cols = data.shape[1] // qt.type_size * qt.block_size
    picked = data[ids.reshape(-1).to(data.device)]  # (k, row_bytes): copies only the chosen rows
    blocks = picked.reshape(-1, qt.type_size)  # (k, row_bytes) -> (k * blocks_per_row, type_size)
    return _run(qt, blocks).reshape(*ids.shape, cols)  # -> (*ids.shape, cols)
