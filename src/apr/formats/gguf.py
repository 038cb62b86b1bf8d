"""GGUF reading: metadata as plain Python, ModelConfig, raw tensors (the `gguf` package gives the type table).

Tensors are returned raw (quantized blocks, memory-mapped); `apr.quant` turns them into weights.
Every way a file can be broken ends in BadModelFile with one line, never a numpy/struct traceback.
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr.errors import AprError, BadModelFile
from apr.model.config import SUPPORTED_ARCHITECTURES, ModelConfig

GGUF_MAGIC = b"GGUF"


@dataclass
class RawTensor:
    name: str
    qtype: int  # ggml type id (gguf.GGMLQuantizationType)
    shape: tuple[int, ...]  # torch order: (rows, cols) = reversed GGUF ne
    data: np.ndarray  # uint8 (or float) view of the stored bytes, memory-mapped

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, RawTensor]


# GGUF value types -> struct format (gguf.GGUFValueType ids)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 28  # no honest GGUF has more entries than this; a hostile count must not allocate
_MAX_DEPTH = 4  # arrays of arrays nest this deep at most (GGUF writers emit one level)


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over the file's bytes (an mmap: slicing it gives bytes).

    The `gguf` package's reader builds a numpy object per string (about 17 s for a 150k-token vocabulary);
    this reads the same header in 0.35-0.45 s.
    """

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.end = buf, 0, path, len(buf)

    def _need(self, n: int, pos: int) -> None:
        if n < 0 or pos + n > self.end:
            raise BadModelFile(f"{self.path}: truncated GGUF header (wanted {n} bytes at offset {pos})")

    def take(self, n: int) -> bytes:
        self._need(n, self.pos)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def scalar(self, fmt: str):
        st = _struct(fmt)
        self._need(st.size, self.pos)
        self.pos += st.size
        return st.unpack_from(self.buf, self.pos - st.size)[0]

    def count(self) -> int:
        n = self.scalar("<Q")
        if n > _MAX_COUNT:
            raise BadModelFile(f"{self.path}: implausible count {n} at offset {self.pos - 8}")
        return n

    def string(self) -> str:
        return self.take(self.count()).decode("utf-8", errors="replace")

    def strings(self, n: int) -> list[str]:
        """n strings: one tight loop, as a vocabulary and its merges are 300k of them."""
        if 8 * n > self.end - self.pos:  # each string takes its 8-byte length at least: fail before looping
            raise BadModelFile(f"{self.path}: implausible count {n} of strings at offset {self.pos - 8}")
        buf, pos, out = self.buf, self.pos, []
        unpack, add = _U64.unpack_from, out.append
        try:
            for _ in range(n):
                size = unpack(buf, pos)[0]  # struct.error past the end
                pos += 8 + size
                if pos > self.end:  # a hostile size fails here, before anything is allocated
                    break
                add(buf[pos - size : pos].decode("utf-8", errors="replace"))
        except struct.error:
            pass
        if len(out) < n:
            raise BadModelFile(f"{self.path}: truncated GGUF header (string {len(out)} of {n} runs past the end)")
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= _MAX_DEPTH:  # the recursion below must end in BadModelFile, not RecursionError
                raise BadModelFile(f"{self.path}: arrays nested more than {_MAX_DEPTH} deep at offset {self.pos}")
            sub, n = self.scalar("<I"), self.count()
            if sub == _STRING:
                return self.strings(n)
            if sub in _NUMPY:
                dt = np.dtype(_NUMPY[sub])
                return np.frombuffer(self.take(n * dt.itemsize), dtype=dt).tolist()
            if sub == _ARRAY and 12 * n > self.end - self.pos:  # each inner array takes 12 bytes at least
                raise BadModelFile(f"{self.path}: implausible count {n} of arrays at offset {self.pos - 8}")
            return [self.value(sub, depth + 1) for _ in range(n)]
        raise BadModelFile(f"{self.path}: unknown GGUF value type {vtype} at offset {self.pos}")


@functools.lru_cache(maxsize=None)
def _struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


def map_file(path: Path) -> mmap.mmap:
    """The whole file, mapped copy-on-write: writable views, the file itself is never touched."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise BadModelFile(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def read_gguf(path: str | Path) -> GGUFFile:
    path = Path(path)
    mm = map_file(path)
    data = np.frombuffer(mm, dtype=np.uint8)  # the tensors: views of the mapping
    if mm[:4] != GGUF_MAGIC:
        raise BadModelFile(f"{path} is not a GGUF file (magic {mm[:4]!r})")
    key = _header_key(path, len(mm))
    header = _cached_header(key) if key else None
    if header is None:
        header = _parse_header(mm, path)
        if key:
            _store_header(key, header)
    metadata, infos, start = header
    return GGUFFile(path, metadata, _tensors(data, infos, start, path))


def _parse_header(mm, path: Path) -> tuple[dict, list, int]:
    cur = _Cursor(mm, path)
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise BadModelFile(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.count(), cur.count()
    metadata: dict[str, Any] = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise BadModelFile(f"{path}: tensor {name} has {n_dims} dimensions")
        ne = [cur.scalar("<Q") for _ in range(n_dims)]
        infos.append((name, ne, cur.scalar("<I"), cur.scalar("<Q")))
    align = metadata.get("general.alignment", 32)
    if type(align) is not int or not 1 <= align <= 1 << 30:  # bool, float, string, list: all lies
        raise BadModelFile(f"{path}: general.alignment {align!r} is not a positive integer")
    return metadata, infos, (cur.pos + align - 1) // align * align


# ---- header cache: a real model's vocabulary and merges (300k strings) take 0.35-0.45 s to parse, a third of
# the load before the first token; the parsed header of a large file is kept, keyed by the file's identity
# (path, size, mtime, inode) and this module's source, so an edited file or parser never reads a stale one.
# The tensor table is still checked against the file on every load (_tensors).

_CACHE_MIN_BYTES = 64 << 20  # small files parse in milliseconds: not worth a cache entry


def _header_key(path: Path, size: int) -> str | None:
    import hashlib

    if size < _CACHE_MIN_BYTES:
        return None
    try:
        st = path.stat()
        code = Path(__file__).read_bytes()
    except OSError:
        return None
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}\0".encode()
    return hashlib.sha256(ident + code).hexdigest()[:32]


def _header_path(key: str) -> Path:
    from apr.hub import apr_home

    return apr_home() / "cache" / "gguf-header" / f"{key}.marshal"


def _cached_header(key: str):
    import marshal

    try:
        metadata, infos, start = marshal.loads(_header_path(key).read_bytes())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return (metadata, infos, start) if isinstance(metadata, dict) and isinstance(start, int) else None


def _store_header(key: str, header) -> None:
    """Atomic (a reader sees the whole entry or none); a cache that cannot be written is only slower."""
    import marshal
    import os
    import tempfile

    dst = _header_path(key)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(marshal.dumps(header))
        os.replace(tmp, dst)
    except (OSError, ValueError):
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


def _tensors(data: np.ndarray, infos: list, start: int, path: Path) -> dict[str, RawTensor]:
    from gguf import GGML_QUANT_SIZES

    tensors = {}
    for name, ne, qtype, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise BadModelFile(f"{path}: tensor {name} has unknown ggml type {qtype}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if any(d <= 0 or d > _MAX_COUNT for d in ne) or ne[0] % block:
            raise BadModelFile(f"{path}: tensor {name} has a bad shape {ne} for its type")
        n_bytes = ne[0] // block * type_size * math.prod(ne[1:])  # Python ints: 4-D shapes cannot wrap to 0
        begin = start + offset
        if begin + n_bytes > len(data):
            raise BadModelFile(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        shape = tuple(int(d) for d in reversed(ne))  # torch order: rows first
        tensors[name] = RawTensor(name, int(qtype), shape, data[begin : begin + n_bytes])
    return tensors


TRAINING_KEY = "apr.training"  # what a student exported by `apr export --lora` was trained on (JSON)


def training_record(metadata: dict, path, strict: bool = True) -> dict | None:
    """The parsed apr.training record; a missing or malformed one raises (strict) or gives None."""
    import json

    raw = metadata.get(TRAINING_KEY)
    try:
        if not raw:
            raise AprError(f"{path}: no {TRAINING_KEY} metadata; this is not a student exported by `apr export --lora`")
        try:
            rec = json.loads(raw)
            rec["split"]["seed"], rec["split"]["val_files"], rec["data"]["seq_len"]
        except (ValueError, KeyError, TypeError) as e:
            raise AprError(f"{path}: {TRAINING_KEY} metadata is malformed ({e})") from None
    except AprError:
        if strict:
            raise
        return None
    return rec


def _get(meta: dict, key: str, default: Any = ..., kind=None):
    if key not in meta:
        if default is ...:
            raise BadModelFile(f"GGUF metadata lacks '{key}'")
        return default
    value = meta[key]
    if kind is not None:
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise BadModelFile(f"GGUF metadata '{key}' has a bad value: {value!r}") from None
    return value


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    meta = g.metadata
    arch = _get(meta, "general.architecture", kind=str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BadModelFile(f"unsupported architecture '{arch}' (apr runs: {', '.join(SUPPORTED_ARCHITECTURES)})")
    n_heads = _get(meta, f"{arch}.attention.head_count", kind=int)
    dim = _get(meta, f"{arch}.embedding_length", kind=int)
    if n_heads <= 0 or dim <= 0 or dim % n_heads:
        raise BadModelFile(f"bad head count {n_heads} for embedding length {dim}")
    n_kv = _get(meta, f"{arch}.attention.head_count_kv", n_heads, kind=int)
    if n_kv <= 0 or n_heads % n_kv:
        raise BadModelFile(f"bad kv head count {n_kv} for {n_heads} heads")
    head_dim = _get(meta, f"{arch}.attention.key_length", dim // n_heads, kind=int)
    if "token_embd.weight" not in g.tensors:
        raise BadModelFile("GGUF has no token_embd.weight tensor")
    vocab = g.tensors["token_embd.weight"].shape[0]
    cfg = ModelConfig(
        architecture=arch,
        n_layers=_get(meta, f"{arch}.block_count", kind=int),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=_get(meta, f"{arch}.feed_forward_length", kind=int),
        vocab_size=vocab,
        context_length=_get(meta, f"{arch}.context_length", 2048, kind=int),
        rope_theta=_get(meta, f"{arch}.rope.freq_base", 10000.0, kind=float),
        norm_eps=_get(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, kind=float),
        rope_interleaved=arch == "llama",
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        tied_embeddings="output.weight" not in g.tensors,
    )
    if cfg.n_layers <= 0 or cfg.ffn_dim <= 0:
        raise BadModelFile(f"bad layer count {cfg.n_layers} or ffn size {cfg.ffn_dim}")
    return cfg
