"""Valid random ggml blocks, for tests and fixtures."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from apr.quant.table import _lookup

# Byte offsets of the fp16 scale fields (d, dmin, m) inside each block. Random bytes there could be NaN/Inf
# or huge, so they are overwritten with small finite scales; every other byte of a block is valid as is.
_FP16_FIELDS: dict[int, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (hi - lo) + lo  # (n,) float32


def random_blocks(qtype: int, n_blocks: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (n_blocks, type_size): random quants with fp16 scales drawn from uniform(0.001, 0.05)."""
    qt = _lookup(qtype)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if qt.type_id in _FLOATS:  # plain floats: finite values in [-1, 1)
        values = _uniform(n_blocks, -1.0, 1.0, generator).to(_FLOATS[qt.type_id])
        return values.view(torch.uint8).reshape(n_blocks, qt.type_size)  # (n * size,) -> (n, size)
    blocks = torch.randint(0, 256, (n_blocks, qt.type_size), dtype=torch.uint8, generator=generator)
    for off in _FP16_FIELDS[qt.type_id]:
        scale = _uniform(n_blocks, 0.001, 0.05, generator).half()
        blocks[:, off : off + 2] = scale.view(torch.uint8).reshape(n_blocks, 2)  # (n * 2,) -> (n, 2)
    return blocks
