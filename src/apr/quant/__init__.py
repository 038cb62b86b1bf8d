"""Quantized ggml tensors in torch: the type table, dequantization, and modules that keep raw blocks.

`random_blocks` (test fixtures) lives in `apr.quant.testing`.
"""

from apr.quant.linear import QuantEmbedding, QuantLinear
from apr.quant.table import (
    QUANT_TYPES,
    QuantType,
    dequantize,
    dequantize_rows,
    is_supported,
    row_bytes,
    type_name,
)

__all__ = [
    "QUANT_TYPES",
    "QuantEmbedding",
    "QuantLinear",
    "QuantType",
    "dequantize",
    "dequantize_rows",
    "is_supported",
    "row_bytes",
    "type_name",
]
