"""A disk cache of packed weights, so a GGUF is packed once per (file, layout, dtype), not at every start.

Packing the 0.5B model takes seconds; reading the packed state back through a memory map takes a
fraction of one, which is what makes the first token arrive within ~3 s of `apr run`. The files live
in $APR_HOME/prepared/<sha256>/<layout>-<dtype>.{bin,json}: `bin` holds every QuantLinear's
`prepared_state()` tensors back to back (64-byte aligned), `json` indexes them. Any mismatch (another
packer layout, a missing module, a truncated file) means a miss, and the model is packed from the GGUF.
APR_PREPARED_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from apr.quant.linear import QuantLinear

FORMAT = 1
_ALIGN = 64
_DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "int32": torch.int32}


def enabled() -> bool:
    return os.environ.get("APR_PREPARED_CACHE", "1") != "0"


def _paths(sha256: str, dtype: torch.dtype) -> tuple[Path, Path]:
    from apr.hub import apr_home
    from apr.quant.kernels_int4 import cpu_layout

    stem = apr_home() / "prepared" / sha256 / f"{cpu_layout()}-{str(dtype).removeprefix('torch.')}-v{FORMAT}"
    return stem.with_suffix(".json"), stem.with_suffix(".bin")


def _linears(model) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def load(model, sha256: str, dtype: torch.dtype) -> bool:
    """Set every QuantLinear from the cache (True), or change nothing (False)."""
    index_path, bin_path = _paths(sha256, dtype)
    try:
        index = json.loads(index_path.read_text())
        data = np.memmap(bin_path, dtype=np.uint8, mode="r")
    except (OSError, ValueError):
        return False
    linears = _linears(model)
    if set(index.get("modules", {})) != set(linears) or index.get("bytes") != data.size:
        return False
    states = {name: _states(data, entry) for name, entry in index["modules"].items()}
    for name, module in linears.items():
        if not module.load_prepared(states[name], dtype):  # a stale entry: that module was packed anew
            return False
    return True


def _states(data: np.ndarray, entry: dict) -> dict[str, torch.Tensor]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only map: torch warns it is not writable
        for key, (dt, shape, offset, nbytes) in entry.items():
            t = torch.from_numpy(data[offset : offset + nbytes])  # zero-copy view of the map
            out[key] = t.view(_DTYPES[dt]).reshape(shape)
    return out


def store(model, sha256: str, dtype: torch.dtype) -> bool:
    """Write every QuantLinear's prepared state; False if the cache cannot be written (no error)."""
    index_path, bin_path = _paths(sha256, dtype)
    modules, offset = {}, 0
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = bin_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for name, module in _linears(model).items():
                entry = {}
                for key, t in module.prepared_state().items():
                    raw = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
                    pad = -offset % _ALIGN
                    f.write(b"\0" * pad)
                    offset += pad
                    f.write(memoryview(raw))
                    entry[key] = [str(t.dtype).removeprefix("torch."), list(t.shape), offset, raw.size]
                    offset += raw.size
                modules[name] = entry
        tmp.replace(bin_path)
        index_path.write_text(json.dumps({"format": FORMAT, "bytes": offset, "modules": modules}))
        return True
    except OSError:
        return False
