"""GGUF -> .apr: plan every stored tensor, then stream them into a safetensors container.

The header must precede the data but holds each tensor's crc32, known only once the bytes are produced
(requantized tensors are produced once, never held all in memory). So the header is written first with
fixed-width placeholder checksums, the tensors are streamed after it, and the same-length header with the
real checksums is written over the placeholder at the end; the file appears (os.replace) only when whole.
"""

from __future__ import annotations

import datetime
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from apr import __version__
from apr.errors import AprError, BadModelFile
from apr.formats import apr as fmt
from apr.formats.apr_quant import FILE_TYPES, MODES, requantize, target_type
from apr.formats.gguf import _ARRAY, _Cursor, config_from_gguf, map_file, read_gguf


@dataclass
class Entry:
    """One stored tensor: its safetensors entry, its apr.tensors description, and how to make its bytes."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]  # stored shape
    describe: dict[str, Any]  # the apr.tensors record (crc32 filled in while writing)
    produce: Callable[[], np.ndarray]  # -> the bytes (any dtype, C-contiguous)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * fmt.DTYPE_SIZES[self.dtype]


# ---- GGUF key/value types (read_gguf keeps only the values; export needs the exact types back) ----

def gguf_kv_types(path: Path) -> dict[str, tuple[int, int | None]]:
    cur = _Cursor(map_file(path), path)
    cur.take(4)
    cur.scalar("<I")  # version: read_gguf has checked it
    cur.count()
    types = {}
    for _ in range(cur.count()):
        key, vtype, sub = cur.string(), cur.scalar("<I"), None
        if vtype == _ARRAY:
            sub = struct.unpack_from("<I", cur.buf, cur.pos)[0]  # peek the item type; value() rereads it
            if sub == _ARRAY:
                raise BadModelFile(f"{path}: metadata key {key!r} is a nested array, which .apr does not carry")
        cur.value(vtype)
        types[key] = (vtype, sub)
    return types


def encode_kv(metadata: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> str:
    kv = {k: [fmt.kv_type_name(*types[k]), v] for k, v in metadata.items() if k in types}
    return json.dumps(kv, ensure_ascii=False, separators=(",", ":"))


# ---- the plan ----

def plan_tensors(tensors: dict, mode: str) -> list[Entry]:
    entries = []
    for name, t in tensors.items():
        target = target_type(t.qtype, t.shape, mode)
        dtype, stored = fmt.stored_shape(target, t.shape)
        describe = {"layout": "ggml", "ggml_type": _type_name(target), "shape": list(t.shape),
                    "source_type": _type_name(t.qtype), "crc32": "0" * 8}
        entries.append(Entry(name, dtype, stored, describe,
                             lambda t=t, target=target: requantize(t.data, t.qtype, t.shape, target)))
    return entries


def prepared_entries(tensors: dict, dtype_name: str) -> list[Entry]:
    """QuantLinear.prepared_state() for `dtype_name` of every weight a QuantLinear is built from (layout
    "prepared:<dtype>", docs/format.md), so a load in that dtype skips dequantizing/packing.

    The states are all computed before the header is written (their sizes are the kernels' business) and
    held until written: peak memory is their total size. The raw ggml blocks are stored too."""
    import torch

    from apr.quant import QuantLinear, row_bytes

    if not hasattr(QuantLinear, "prepared_state"):
        return []
    dtype = getattr(torch, dtype_name)
    entries = []
    for name, t in tensors.items():
        if name not in _linear_weights(tensors):
            continue
        rows, cols = t.shape
        ql = QuantLinear(torch.from_numpy(t.data).view(rows, row_bytes(t.qtype, cols)), t.qtype, cols, rows)
        ql.materialize(dtype)
        for key, value in ql.prepared_state().items():
            value = value.detach().contiguous().cpu()
            st = next(k for k, v in fmt.TORCH_DTYPES.items() if getattr(torch, v) == value.dtype)
            describe = {"layout": f"prepared:{dtype_name}", "of": name, "key": key, "crc32": "0" * 8}
            entries.append(Entry(f"{name}@{dtype_name}.{key}", st, tuple(value.shape), describe,
                                 lambda v=value: v.reshape(-1).view(torch.uint8).numpy()))
    return entries


def _as_stored(entries: list[Entry], tensors: dict, mode: str) -> dict:
    """The linear weights as they will be stored: requantized ones are produced now, once, and kept for writing."""
    if mode == "keep":
        return tensors
    from gguf import GGMLQuantizationType

    from apr.formats.gguf import RawTensor

    out = {}
    for e in entries:
        if e.name in _linear_weights(tensors):
            data = e.produce()
            e.produce = lambda data=data: data
            qtype = int(GGMLQuantizationType[e.describe["ggml_type"]])
            out[e.name] = RawTensor(e.name, qtype, tensors[e.name].shape, data)
    return out


def _linear_weights(tensors: dict) -> set[str]:
    """The tensors model/load.py builds a QuantLinear from (token_embd doubles as the output when tied)."""
    from apr.model.load import LINEARS

    names = {n for n in tensors if n.endswith(".weight") and n.split(".")[-2] in LINEARS}
    names.add("output.weight" if "output.weight" in tensors else "token_embd.weight")
    return names


def _type_name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name


# ---- the container ----

def _header_bytes(entries: list[Entry], meta: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    pad = -(8 + len(raw)) % fmt.DATA_ALIGN  # spaces: valid JSON whitespace, as safetensors itself pads
    return struct.pack("<Q", len(raw) + pad) + raw + b" " * pad


def _finish_meta(meta: dict[str, str], entries: list[Entry]) -> dict[str, str]:
    meta = dict(meta)
    meta["apr.tensors"] = json.dumps({e.name: e.describe for e in entries}, separators=(",", ":"))
    meta[fmt.HEADER_CRC_KEY] = fmt.header_crc(meta)
    return meta


def write_container(dst: Path, entries: list[Entry], meta: dict[str, str], progress: bool = True) -> None:
    """Stream `entries` (in apr.tensors order) into `dst` atomically; data ordered widest element first."""
    from tqdm import tqdm

    # widest elements first keep every tensor naturally aligned (the data starts 64-byte aligned)
    order = sorted(entries, key=lambda e: -fmt.DTYPE_SIZES[e.dtype])
    first = _header_bytes(order, _finish_meta(meta, entries))
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=sum(e.nbytes for e in entries), desc=f"write {dst.name}",
                                              unit="B", unit_scale=True, file=sys.stderr, disable=not progress) as bar:
            out.write(first)
            for e in order:
                _write_entry(out, e)
                bar.update(e.nbytes)
            final = _header_bytes(order, _finish_meta(meta, entries))
            if len(final) != len(first):  # cannot happen: checksums are fixed-width hex
                raise AprError("internal error: .apr header changed length while writing")
            out.seek(0)
            out.write(final)
            out.flush()
            os.fsync(out.fileno())
        publish(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(tmp: str, dst: Path) -> None:
    """Give the finished temp file the usual permissions (mkstemp makes it 0600) and move it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dst)


def _write_entry(out, e: Entry) -> None:
    data = np.ascontiguousarray(e.produce())
    buf = memoryview(data).cast("B")
    if len(buf) != e.nbytes:
        raise AprError(f"internal error: tensor {e.name} produced {len(buf)} bytes, expected {e.nbytes}")
    e.describe["crc32"] = fmt.crc_hex(buf)
    out.write(buf)


# ---- GGUF -> .apr ----

def _license(metadata: dict, source_sha: str) -> tuple[str, str]:
    """The licence and where it came from: the GGUF's general.license, else apr's registry entry for a file
    with this exact sha256 (from the upstream model card), else "unknown" (said so, never guessed)."""
    from apr.hub import registry_entry_for_sha256

    if metadata.get("general.license"):
        return str(metadata["general.license"]), "from general.license"
    entry = registry_entry_for_sha256(source_sha)
    if entry is not None:
        return entry.license, f"from apr's registry entry {entry.name} (the source GGUF has no general.license key)"
    return "unknown", "the source GGUF has no general.license key"


def convert_gguf(src: Path, dst: Path, mode: str = "keep", progress: bool = True,
                 prepare_dtype: str | None = None) -> dict[str, Any]:
    """Write `dst` (.apr) from the GGUF `src`; returns a summary for the command to print."""
    from apr.hub import sha256_file

    if mode not in MODES:
        raise AprError(f"unknown --quantize '{mode}' (choose from {', '.join(MODES)})")
    g = read_gguf(src)
    config = config_from_gguf(g)  # refuse what apr cannot run: an .apr is a runnable model
    metadata = {k: v for k, v in g.metadata.items() if k != "GGUF.version"}
    entries = plan_tensors(g.tensors, mode)
    if mode != "keep":
        metadata["general.file_type"] = int(FILE_TYPES[MODES[mode]])
    if prepare_dtype:
        entries += prepared_entries(_as_stored(entries, g.tensors, mode), prepare_dtype)
    types = gguf_kv_types(src)
    types.setdefault("general.file_type", (4, None))  # UINT32, as llama.cpp writes it
    source_sha = sha256_file(src)
    license_, license_note = _license(metadata, source_sha)
    provenance = {
        "source": {"file": src.name, "sha256": source_sha, "size": src.stat().st_size, "format": "gguf",
                   "gguf_version": g.metadata.get("GGUF.version")},
        "apr_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": "apr convert", "quantize": mode, "prepared": prepare_dtype,
    }
    meta = {
        "format": fmt.FORMAT, "apr.format_version": str(fmt.FORMAT_VERSION),
        "apr.config": json.dumps(config.to_dict()),
        "apr.license": license_,
        "apr.license_note": license_note,
        "apr.provenance": json.dumps(provenance),
        "apr.gguf_kv": encode_kv(metadata, types),
    }
    write_container(dst, entries, meta, progress)
    return {"output": str(dst), "tensors": len(entries), "bytes": dst.stat().st_size, "quantize": mode,
            "license": meta["apr.license"], "source_sha256": provenance["source"]["sha256"]}
