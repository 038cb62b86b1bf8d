"""Requantization for `apr convert --quantize`: which type each tensor gets, and the bytes.

The bytes come from apr's own quantizer (apr.quant.quantize, the one `apr export` uses: ggml's layout and
reference algorithms) for every type it writes: Q4_K, Q8_0, the Q5_0/F16 fallbacks and F32. Its Q8_0 and
Q5_0 are byte-identical to gguf-py's (tests/test_quantize.py), so only BF16, which it does not write, still
goes through gguf-py's `gguf.quants.quantize`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from apr.errors import AprError
from apr.quant import dequantize
from apr.quant.quantize import SUPPORTED, quantize

MODES = {"keep": None, "f32": T.F32, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_k": T.Q4_K}
# llama.cpp's own fallbacks when a row is not a whole number of the target's blocks
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_0: T.F16, T.Q8_0: T.F16}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.BF16: LlamaFileType.MOSTLY_BF16, T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
              T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S}


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
    if T(target) in SUPPORTED:  # one quantizer for convert and export: the same bytes from the same weights
        q = quantize(x.reshape(-1, shape[-1]), target)  # (..., cols) -> (rows, cols): rows of whole blocks
    else:
        import gguf.quants

        q = gguf.quants.quantize(x.numpy(), T(target))
    return np.ascontiguousarray(q).view(np.uint8).reshape(-1)
