""".apr: apr's native model file, a safetensors container (spec: docs/format.md).

One file holds the tensors in the layout the kernels consume (raw ggml blocks, memory-mapped, no copy)
and, in the safetensors `__metadata__` (str -> str), the model config, the source GGUF's typed key/value
metadata (tokenizer, chat template, ...), licence, provenance, and a crc32 per tensor and of the header.
Header parsing and checksums live in apr_header.py, writing in apr_write.py, GGUF export in apr_export.py.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType

from apr.errors import BadModelFile
from apr.formats.apr_header import (  # noqa: F401  (re-exported: the format's names live on apr.formats.apr)
    DATA_ALIGN, DTYPE_SIZES, FORMAT, FORMAT_VERSION, HEADER_CRC_KEY, TORCH_DTYPES, _json, byte_shape,
    check_header_crc, crc_hex, header_crc, kv_type_name, parse_header, parse_kv_type, stored_shape,
)
from apr.formats.gguf import GGUFFile, RawTensor, config_from_gguf
from apr.model.config import ModelConfig

class AprTensor(RawTensor):
    """A RawTensor of a .apr file. With background verification its bytes (`data`, `prepared`) are handed out
    only after the checksums have been checked, so no code ever computes with an unverified tensor."""

    def __init__(self, name: str, qtype: int, shape: tuple[int, ...], data: np.ndarray, layout: str = "ggml",
                 wait: Callable[[], None] | None = None):
        self.name, self.qtype, self.shape, self.layout = name, qtype, shape, layout
        self._data, self._wait = data, wait
        self._prepared: dict[str, dict[str, Any]] = {}  # dtype name -> kernel-packed state (if stored)

    @property
    def data(self) -> np.ndarray:
        if self._wait is not None:
            self._wait()
        return self._data

    @property
    def prepared(self) -> dict[str, dict[str, Any]]:
        if self._wait is not None:
            self._wait()
        return self._prepared

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)


class _Background:
    """Runs the checksums on a thread; calling it waits and re-raises their error (as a fresh BadModelFile).

    It fails closed: the tensors count as verified only if the check ran to its end, so any other error
    on the thread (an I/O error on the mapping, MemoryError, a bug) refuses the file too."""

    def __init__(self, fn: Callable[[], None], path: Path | None = None):
        self._error: str | None = None
        self._passed = False
        self._path = path
        self._thread = threading.Thread(target=self._run, args=(fn,), name="apr-verify", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
            self._passed = True
        except BadModelFile as e:
            self._error = str(e)
        except BaseException as e:  # noqa: BLE001  (reported to the reader of the tensors, never swallowed)
            self._error = f"{self._path}: checksum verification failed: {type(e).__name__}: {' '.join(str(e).split())}"

    def __call__(self) -> None:
        self._thread.join()
        if self._error or not self._passed:
            raise BadModelFile(self._error or f"{self._path}: checksum verification did not finish")


@dataclass
class AprFile:
    path: Path
    config: ModelConfig
    metadata: dict[str, Any]  # GGUF-style keys -> plain values, plus apr.* (licence, provenance)
    kv_types: dict[str, tuple[int, int | None]]  # GGUF key -> (value type, array item type)
    tensors: dict[str, AprTensor]  # GGUF name -> tensor, in the source GGUF's order
    header: dict[str, str]  # the raw __metadata__
    verified: bool


# ---- typed GGUF key/values: {key: [type, value]} (apr_header.kv_type_name) ----

def decode_kv(text: str, path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
    kv = _json(text, path, "apr.gguf_kv")
    if not isinstance(kv, dict):
        raise BadModelFile(f"{path}: apr.gguf_kv is not a JSON object")
    values, types = {}, {}
    for key, item in kv.items():
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise BadModelFile(f"{path}: metadata key {key!r} is not a [type, value] pair")
        types[key], values[key] = parse_kv_type(item[0]), item[1]
    return values, types


# ---- reading ----

def read_apr(path: str | Path, verify: str = "background") -> tuple[ModelConfig, dict, dict]:
    """(config, metadata, tensors) like the GGUF path of runtime.read_model_file.

    The checksums run in the background by default: a load spends the next seconds building the tokenizer,
    so they cost nothing there, and a tensor's bytes are only handed out once they have passed."""
    f = open_apr(path, verify=verify)
    return f.config, f.metadata, f.tensors


def open_apr(path: str | Path, verify: str | bool = True) -> AprFile:
    """verify: True/"eager" (check every tensor now), "background" (see read_apr), False (never)."""
    if verify not in (True, False, "eager", "background"):
        raise ValueError(f"verify must be True, False, 'eager' or 'background', not {verify!r}")
    path = Path(path)
    data = _map(path)
    entries, header, start = parse_header(data, path)
    check_header_crc(header, path)
    described = _json(header.get("apr.tensors", ""), path, "apr.tensors")
    if not isinstance(described, dict):
        raise BadModelFile(f"{path}: apr.tensors is not a JSON object")
    jobs = crc_jobs(data, entries, described, start, path)
    wait = None
    if verify == "background":
        wait = _Background(lambda: verify_tensors(jobs, path), path)
    elif verify:
        verify_tensors(jobs, path)
    tensors = _tensors(data, entries, described, start, path, wait)
    values, types = decode_kv(header.get("apr.gguf_kv", ""), path)
    metadata = dict(values)
    metadata["apr.format_version"] = int(header.get("apr.format_version", 0))
    metadata["apr.license"] = header.get("apr.license", "unknown")
    metadata["apr.provenance"] = _json(header.get("apr.provenance", "{}"), path, "apr.provenance")
    config = _config(path, metadata, tensors, header)
    return AprFile(path, config, metadata, types, tensors, header, bool(verify))


def _map(path: Path) -> np.ndarray:
    try:
        if os.path.getsize(path) == 0:
            raise BadModelFile(f"{path} is empty (truncated?)")
        return np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable views, file never touched
    except (OSError, ValueError) as e:
        raise BadModelFile(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


# ---- checksums ----

def crc_jobs(data: np.ndarray, entries: dict, described: dict, start: int, path: Path) -> list[tuple]:
    """(name, stored crc32, bytes) of every tensor; a tensor without a checksum is refused up front."""
    jobs = []
    for name, e in entries.items():
        d = described.get(name)
        crc = d.get("crc32") if isinstance(d, dict) else None
        if not (isinstance(crc, str) and len(crc) == 8):
            raise BadModelFile(f"{path}: tensor {name!r} has no checksum in apr.tensors")
        begin, end = e["data_offsets"]
        jobs.append((name, crc, data[start + begin : start + end]))
    return jobs


def verify_tensors(jobs: list[tuple], path: Path) -> None:
    """crc32 of every tensor; zlib releases the GIL, so threads overlap on multi-core machines."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        got = list(pool.map(lambda j: crc_hex(j[2]), jobs))
    for (name, want, _), have in zip(jobs, got):
        if have != want:
            raise BadModelFile(f"{path}: tensor {name!r} fails its checksum (crc32 {have}, stored {want}): "
                               "corrupt file")


# ---- tensors and config ----

def ggml_type_id(name: Any, path: Path, tensor: str) -> int:
    try:
        return int(GGMLQuantizationType[name])
    except (KeyError, TypeError):
        raise BadModelFile(f"{path}: tensor {tensor!r} has unknown ggml type {name!r}") from None


def _raw_tensor(name: str, d: dict, e: dict, buf: np.ndarray, path: Path, wait) -> AprTensor:
    qtype = ggml_type_id(d.get("ggml_type"), path, name)
    shape = d.get("shape")
    if not (isinstance(shape, list) and shape and all(type(x) is int and x > 0 for x in shape)):
        raise BadModelFile(f"{path}: tensor {name!r} has a bad logical shape {shape!r}")
    dtype, stored = stored_shape(qtype, tuple(shape))
    if (dtype, list(stored)) != (e["dtype"], e["shape"]):
        raise BadModelFile(f"{path}: tensor {name!r} is stored as {e['dtype']} {e['shape']}, "
                           f"but {d['ggml_type']} {shape} needs {dtype} {list(stored)}")
    return AprTensor(name, qtype, tuple(shape), buf, "ggml", wait)


def _tensors(data: np.ndarray, entries: dict, described: dict, start: int, path: Path, wait) -> dict[str, AprTensor]:
    tensors: dict[str, AprTensor] = {}
    prepared = []
    for name, d in described.items():  # described is in the source GGUF's tensor order
        if name not in entries or not isinstance(d, dict):
            raise BadModelFile(f"{path}: apr.tensors names {name!r}, which the file does not store")
        begin, end = entries[name]["data_offsets"]
        buf = data[start + begin : start + end]
        layout = d.get("layout", "ggml")
        if layout == "ggml":
            tensors[d.get("of", name)] = _raw_tensor(name, d, entries[name], buf, path, wait)
        elif isinstance(layout, str) and layout.startswith("prepared:"):
            prepared.append((d, entries[name], buf))
        else:
            raise BadModelFile(f"{path}: tensor {name!r} has unknown layout {layout!r}")
    if set(entries) - set(described):
        raise BadModelFile(f"{path}: tensors missing from apr.tensors: {sorted(set(entries) - set(described))[:3]}")
    for d, e, buf in prepared:
        _attach_prepared(tensors, d, e, buf, path)
    return tensors


def _attach_prepared(tensors: dict, d: dict, e: dict, buf: np.ndarray, path: Path) -> None:
    """A kernel-packed tensor (layout "prepared:<dtype>") joins the state of the ggml tensor it was made from."""
    import torch

    owner = tensors.get(d.get("of"))
    if owner is None or not isinstance(d.get("key"), str):
        raise BadModelFile(f"{path}: a prepared tensor names no stored ggml tensor ({d.get('of')!r})")
    dtype = getattr(torch, TORCH_DTYPES[e["dtype"]])
    t = torch.from_numpy(buf).view(dtype).reshape(e["shape"])  # a zero-copy view of the map
    owner._prepared.setdefault(d["layout"].split(":", 1)[1], {})[d["key"]] = t


def _config(path: Path, metadata: dict, tensors: dict, header: dict) -> ModelConfig:
    """Derived from the metadata exactly as for a GGUF (with its checks); the stored copy must agree."""
    cfg = config_from_gguf(GGUFFile(path, metadata, tensors))
    stored = _json(header.get("apr.config", "{}"), path, "apr.config")
    mine = cfg.to_dict()
    diff = [k for k in stored if k in mine and stored[k] != mine[k]] if isinstance(stored, dict) else ["(all)"]
    if diff:
        raise BadModelFile(f"{path}: stored config disagrees with the metadata on {', '.join(diff)}")
    return cfg
