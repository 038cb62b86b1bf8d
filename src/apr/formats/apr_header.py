"""The .apr header: constants, strict parsing and bounds checks, checksums, typed GGUF values (docs/format.md).

The safetensors header is parsed here rather than by the safetensors library so that every broken or
lying file (truncated, offsets past the end, overlapping, negative, a huge length field) ends in one
BadModelFile line naming what is wrong.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from apr.errors import BadModelFile

FORMAT = "apr"
FORMAT_VERSION = 1
MAX_HEADER = 100_000_000  # the safetensors library's own limit; a longer length field is a lie
DATA_ALIGN = 64  # the header is space-padded so tensor data starts on a cache line
HEADER_CRC_KEY = "apr.header_crc32"
# safetensors dtype -> bytes per element
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {"F64": "float64", "I64": "int64", "U64": "uint64", "F32": "float32", "I32": "int32", "U32": "uint32",
                "F16": "float16", "BF16": "bfloat16", "I16": "int16", "U16": "uint16", "I8": "int8", "U8": "uint8",
                "BOOL": "bool"}
# ggml float types are stored as their safetensors dtype (readable by any safetensors tool);
# every block-quantized type as U8 rows of ggml blocks
FLOAT_DTYPES = {int(GGMLQuantizationType.F32): "F32", int(GGMLQuantizationType.F16): "F16",
                int(GGMLQuantizationType.BF16): "BF16"}


# ---- typed GGUF key/values as JSON: {key: [type, value]}, type "UINT32" or "ARRAY[STRING]" ----

def kv_type_name(vtype: int, sub: int | None) -> str:
    name = GGUFValueType(vtype).name
    return f"{name}[{GGUFValueType(sub).name}]" if sub is not None else name


def parse_kv_type(name: str) -> tuple[int, int | None]:
    try:
        if name.endswith("]") and "[" in name:
            outer, inner = name[:-1].split("[", 1)
            return int(GGUFValueType[outer]), int(GGUFValueType[inner])
        return int(GGUFValueType[name]), None
    except KeyError:
        raise BadModelFile(f"unknown GGUF value type '{name}' in .apr metadata") from None


def _json(text: str, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        raise BadModelFile(f"{path}: {what} in the header is not valid JSON (corrupt file)") from None


def parse_header(data: np.ndarray, path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validated (tensor entries, __metadata__, data start); entries' offsets are relative to the start."""
    size = len(data)
    if size < 8:
        raise BadModelFile(f"{path}: {size} bytes is too short for a .apr header (truncated?)")
    n = int.from_bytes(data[:8].tobytes(), "little")
    if n > MAX_HEADER:
        raise BadModelFile(f"{path}: header length {n} is implausible (limit {MAX_HEADER}); not a .apr file or corrupt")
    if 8 + n > size:
        raise BadModelFile(f"{path}: header of {n} bytes runs past the end of the {size}-byte file (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n].tobytes())
    except (ValueError, UnicodeDecodeError):
        raise BadModelFile(f"{path}: header is not valid JSON (not a .apr file, or corrupt)") from None
    if not isinstance(header, dict):
        raise BadModelFile(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadModelFile(f"{path}: not a .apr file (a safetensors header without apr metadata)")
    if not all(isinstance(v, str) for v in meta.values()):
        raise BadModelFile(f"{path}: header metadata values must be strings")
    version = meta.get("apr.format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise BadModelFile(f"{path}: .apr format version {version!r} is not supported "
                           f"(this apr reads <= {FORMAT_VERSION})")
    start = 8 + n
    _check_offsets(header, size - start, path)
    return header, meta, start


def _check_entry(name: str, e: Any, data_len: int, path: Path) -> tuple[int, int]:
    if not isinstance(e, dict) or e.get("dtype") not in DTYPE_SIZES:
        raise BadModelFile(f"{path}: tensor {name!r} has a bad header entry")
    shape, offs = e.get("shape"), e.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
        raise BadModelFile(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise BadModelFile(f"{path}: tensor {name!r} has bad data_offsets {offs!r}")
    begin, end = offs
    if begin < 0 or end < begin:
        raise BadModelFile(f"{path}: tensor {name!r} has impossible data_offsets [{begin}, {end}]")
    if end > data_len:
        raise BadModelFile(f"{path}: tensor {name!r} ends at byte {end} of a {data_len}-byte data region (truncated?)")
    want = math.prod(shape) * DTYPE_SIZES[e["dtype"]]
    if end - begin != want:
        raise BadModelFile(f"{path}: tensor {name!r} spans {end - begin} bytes but {e['dtype']} {shape} needs {want}")
    return begin, end


def _check_offsets(entries: dict, data_len: int, path: Path) -> None:
    """Tensors must tile the data region exactly: no overlap, no gap, nothing past the end."""
    spans = sorted((*_check_entry(name, e, data_len, path), name) for name, e in entries.items())
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise BadModelFile(f"{path}: tensor {name!r} overlaps the tensor before it (offset {begin} < {pos})")
        if begin > pos:
            raise BadModelFile(f"{path}: {begin - pos} unaccounted bytes before tensor {name!r}")
        pos = end
    if pos != data_len:
        raise BadModelFile(f"{path}: {data_len - pos} bytes after the last tensor (not a .apr file, or corrupt)")


# ---- checksums ----

def crc_hex(buf) -> str:
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


def header_crc(meta: dict[str, str]) -> str:
    """crc32 over every metadata key and value except the crc itself, in sorted key order."""
    crc = 0
    for key in sorted(meta):
        if key != HEADER_CRC_KEY:
            crc = zlib.crc32(f"{key}\0{meta[key]}\0".encode("utf-8", "surrogatepass"), crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def check_header_crc(meta: dict[str, str], path: Path) -> None:
    want = meta.get(HEADER_CRC_KEY)
    if want != header_crc(meta):
        raise BadModelFile(f"{path}: header checksum mismatch (stored {want}, computed {header_crc(meta)}): "
                           "corrupt file")


def stored_shape(qtype: int, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, stored shape) of a ggml tensor of torch-order `shape`."""
    if qtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[qtype], tuple(shape)
    block = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]
    if not shape or shape[-1] % block:
        raise BadModelFile(f"a {GGMLQuantizationType(qtype).name} tensor of shape {list(shape)} is not whole blocks")
    return "U8", byte_shape(qtype, shape)


def byte_shape(qtype: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """(rows..., row_bytes): the ggml bytes of any type as a uint8 array (what gguf-py's writer takes)."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return (*shape[:-1], shape[-1] // block * type_size)
