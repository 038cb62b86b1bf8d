""".apr -> GGUF with gguf-py's GGUFWriter: the source's metadata keys with their exact value types (llama.cpp
rejects a key of the wrong type), and the raw ggml tensors in the source's order, streamed one at a time."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter

from apr.errors import AprError
from apr.formats.apr import AprFile, byte_shape, open_apr
from apr.formats.apr_write import publish


def export_gguf(src: Path, dst: Path, progress: bool = True) -> dict:
    f = open_apr(src)  # checksums verified: a corrupt .apr is never exported
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write(f, Path(tmp), progress, dst.name)
        publish(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"output": str(dst), "tensors": len(f.tensors), "bytes": dst.stat().st_size}


def _write(f: AprFile, tmp: Path, progress: bool, label: str = "gguf") -> None:
    from tqdm import tqdm

    w = GGUFWriter(tmp, str(f.metadata["general.architecture"]))  # writes general.architecture itself
    _add_kv(w, f)
    for name, t in f.tensors.items():
        qtype = GGMLQuantizationType(t.qtype)
        w.add_tensor_info(name, byte_shape(t.qtype, t.shape), np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with tqdm(total=sum(t.nbytes for t in f.tensors.values()), desc=f"write {label}", unit="B",
              unit_scale=True, file=sys.stderr, disable=not progress) as bar:
        for t in f.tensors.values():
            w.write_tensor_data(np.asarray(t.data).reshape(-1))
            bar.update(t.nbytes)
    w.close()


def _add_kv(w: GGUFWriter, f: AprFile) -> None:
    add_kv(w, ((key, f.metadata[key], *f.kv_types[key]) for key in f.kv_types))


def add_kv(w: GGUFWriter, items: Iterable[tuple[str, Any, int, int | None]]) -> None:
    """(key, value, value type, array item type) -> the writer, with the exact types; also `apr export`'s."""
    for key, value, vtype, sub in items:
        if key == "general.architecture":  # GGUFWriter wrote it itself
            continue
        if key == "general.alignment":  # the writer must also pad the data to it
            w.add_custom_alignment(int(value))
            continue
        if vtype == GGUFValueType.ARRAY and not value:
            raise AprError(f"metadata key {key!r} is an empty array, which gguf-py cannot write")
        w.add_key_value(key, value, GGUFValueType(vtype), GGUFValueType(sub) if sub is not None else None)
