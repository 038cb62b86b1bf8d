"""Modules that hold ggml blocks: QuantLinear (dense weight made on demand) and QuantEmbedding (stays quantized).

Both keep the raw blocks as a buffer named `raw`, so a faster kernel (packed int4/int8 matmul) can later
replace `forward` without the model code changing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apr.errors import BadModelFile
from apr.quant.table import dequantize, dequantize_rows, row_bytes, type_name


def _check_raw(raw: torch.Tensor, qtype: int, rows: int, cols: int, what: str) -> None:
    want = (rows, row_bytes(qtype, cols))
    if raw.dtype != torch.uint8 or tuple(raw.shape) != want:
        raise BadModelFile(
            f"{what}: {type_name(qtype)} blocks for ({rows}, {cols}) must be uint8 {list(want)}, "
            f"got {raw.dtype} {list(raw.shape)}"
        )


class QuantLinear(nn.Module):
    """y = x @ W.T + b, with W kept as ggml blocks in `raw` and dequantized once into `weight`."""

    def __init__(self, raw: torch.Tensor, qtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        _check_raw(raw, qtype, out_features, in_features, "QuantLinear")
        self.qtype, self.in_features, self.out_features = int(qtype), in_features, out_features
        self.register_buffer("raw", raw)
        # derived from raw, so not saved in state_dict
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize into a dense `weight` of `dtype` (once per dtype); `raw` is kept."""
        if self.weight is None or self.weight.dtype != dtype:
            # from raw, not from an existing weight: a bf16 -> f32 round trip would lose bits
            w = dequantize(self.raw, self.qtype, (self.out_features, self.in_features))
            self.weight = w.to(dtype)
        if self.bias is not None and self.bias.dtype != dtype:
            self.bias = self.bias.to(dtype)
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.weight.dtype != x.dtype:
            self.materialize(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={type_name(self.qtype)}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """Token embedding whose table stays quantized; each lookup dequantizes only the rows it needs."""

    def __init__(self, raw: torch.Tensor, qtype: int, dim: int):
        super().__init__()
        _check_raw(raw, qtype, raw.shape[0], dim, "QuantEmbedding")
        self.qtype, self.dim, self.num_embeddings = int(qtype), dim, raw.shape[0]
        self.register_buffer("raw", raw)
        self.dtype = torch.float32

    def materialize(self, dtype: torch.dtype = torch.float32) -> None:
        """Set the output dtype; the table itself is never densified."""
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.raw, self.qtype, ids).to(self.dtype)  # (*ids.shape, dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, qtype={type_name(self.qtype)}"
