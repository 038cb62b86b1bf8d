"""`apr export`'s pipeline: a base model (GGUF or .apr), optionally LoRA adapters merged into its weights,
re-quantized with apr's own quantizer (apr.quant.quantize) to a mix, written as GGUF with every metadata
key of the source (exact value types) and the tokenizer; tensors are produced and written one at a time.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as T, GGUFValueType, GGUFWriter

from apr.errors import AprError
from apr.formats.gguf import TRAINING_KEY
from apr.formats.apr_export import add_kv
from apr.formats.apr_header import byte_shape
from apr.quant import dequantize
from apr.quant.quantize import FILE_TYPES, plan_types, quantize

_UINT32 = int(GGUFValueType.UINT32)


@dataclass
class Source:
    path: Path
    metadata: dict[str, Any]
    kv_types: dict[str, tuple[int, int | None]]
    tensors: dict  # name -> RawTensor-like (qtype, shape, data), in file order


def open_source(path: Path) -> Source:
    if path.suffix == ".apr":
        from apr.formats.apr import open_apr

        f = open_apr(path)
        meta = {k: v for k, v in f.metadata.items() if k in f.kv_types}
        return Source(path, meta, dict(f.kv_types), f.tensors)
    from apr.formats.apr_write import gguf_kv_types
    from apr.formats.gguf import config_from_gguf, read_gguf

    g = read_gguf(path)
    config_from_gguf(g)  # refuse what apr cannot run
    meta = {k: v for k, v in g.metadata.items() if k != "GGUF.version"}
    return Source(path, meta, gguf_kv_types(path), g.tensors)


# ---- LoRA ----

def load_adapter(adapter: Path, src: Source) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict]:
    """{weight name: (A (r, in), B (out, r))} and alpha / rank, checked against the base."""
    from apr.hub import sha256_file
    from apr.train.lora import read_adapter

    if not adapter.is_file():
        raise AprError(f"{adapter}: no such adapter file")
    try:
        tensors, meta = read_adapter(adapter)
        rank, alpha, want_sha = int(meta["rank"]), float(meta["alpha"]), str(meta.get("base_sha256", ""))
    except (KeyError, ValueError, TypeError) as e:
        raise AprError(f"{adapter}: adapter header is incomplete or malformed ({e})") from None
    base_sha = _base_sha(src, sha256_file)
    if want_sha and base_sha and want_sha != base_sha:
        raise AprError(f"{adapter}: adapter was trained on another base (sha256 {want_sha[:12]}…, "
                       f"{src.path.name} is {base_sha[:12]}…)")
    if rank <= 0:
        raise AprError(f"{adapter}: adapter rank {rank} is not positive")
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        stem, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise AprError(f"{adapter}: unexpected tensor {key!r} (an adapter holds .lora_a / .lora_b only)")
        name = stem + ".weight"
        if name not in src.tensors:
            raise AprError(f"{adapter}: {key} adapts {name}, which {src.path.name} does not have")
        if stem + ".lora_a" not in tensors or stem + ".lora_b" not in tensors:
            raise AprError(f"{adapter}: {stem} has only one of lora_a / lora_b")
        a, b = tensors[stem + ".lora_a"].float(), tensors[stem + ".lora_b"].float()
        out_f, in_f = src.tensors[name].shape
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise AprError(f"{adapter}: {stem} has A {list(a.shape)} and B {list(b.shape)}, but {name} is "
                           f"{[out_f, in_f]} at rank {rank} (want A {[rank, in_f]}, B {[out_f, rank]})")
        pairs[name] = (a, b)
    if not pairs:
        raise AprError(f"{adapter}: the adapter has no tensors")
    return pairs, alpha / rank, meta


def _base_sha(src: Source, sha256_file) -> str:
    """The sha256 an adapter names: the GGUF's own, or for a .apr the GGUF it was converted from."""
    if src.path.suffix != ".apr":
        return sha256_file(src.path)
    import json

    from apr.formats.apr import open_apr

    prov = json.loads(open_apr(src.path).metadata.get("apr.provenance") or "{}")
    return prov.get("source", {}).get("sha256", "")


def merged_weight(t, lora: tuple[torch.Tensor, torch.Tensor] | None, scale: float) -> torch.Tensor:
    """W (out, in) float32, plus scale * B @ A when adapted."""
    w = dequantize(t.data, t.qtype, t.shape)
    if lora is not None:
        w = (w.double() + lora_delta(*lora) * scale).float()
        if not torch.isfinite(w).all():
            raise AprError(f"{t.name}: the merged weight has NaN or infinite values (a diverged adapter?)")
    return w


def lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A (out, r) @ (r, in) -> (out, in) float64, as r elementwise outer products added in rank order.
    A BLAS GEMM picks its summation order by CPU, so the merged bits could differ between machines; a
    float32 x float32 product is exact in float64 and the adds are elementwise, so this is the same on every
    machine, and the merged weight rounds to float32 once."""
    a64, b64 = a.double(), b.double()
    delta = b64[:, :1] * a64[:1]  # (out, 1) * (1, in) -> (out, in)
    for r in range(1, a64.shape[0]):
        delta += b64[:, r:r + 1] * a64[r:r + 1]
    return delta


# ---- writing ----

def export_model(src: Source, dst: Path, mix: str, lora: dict | None = None, scale: float = 1.0,
                 requantize: bool = False, imatrix: dict | None = None, progress: bool = True,
                 training: dict | None = None) -> dict:
    """Write `dst` (GGUF); returns a summary. Tensors whose type does not change and that no adapter touches
    are copied byte for byte unless `requantize` (a dequantize/quantize round trip only loses precision)."""
    lora, imatrix = lora or {}, imatrix or {}
    plan = plan_types({n: t.shape for n, t in src.tensors.items()}, mix)
    sizes = {n: int(np.prod(byte_shape(q, src.tensors[n].shape))) for n, q in plan.items()}
    _check_space(dst, sum(sizes.values()))
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        _write(src, Path(tmp), mix, plan, sizes, lora, scale, requantize, imatrix, progress, counts, training)
        from apr.formats.apr_write import publish

        publish(tmp, dst)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise AprError(f"{dst.parent}: no space left on the device while writing {dst.name}") from None
        raise AprError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    types: dict[str, int] = {}
    for q in plan.values():
        types[T(q).name] = types.get(T(q).name, 0) + 1
    return {"output": str(dst), "tensors": len(plan), "bytes": dst.stat().st_size, "quant": mix,
            "types": types, "merged": len(lora), "requantized": counts.get("requantized", 0),
            "copied": counts.get("copied", 0), "imatrix": bool(imatrix)}


def _check_space(dst: Path, need: int) -> None:
    free = shutil.disk_usage(dst.parent).free
    if free < need + (1 << 20):
        raise AprError(f"{dst.parent}: {need / 2**20:,.0f} MiB needed for {dst.name}, {free / 2**20:,.0f} MiB free")


def _write(src: Source, tmp: Path, mix: str, plan: dict, sizes: dict, lora: dict, scale: float, requantize: bool,
           imatrix: dict, progress: bool, counts: dict, training: dict | None) -> None:
    import json

    from tqdm import tqdm

    w = GGUFWriter(tmp, str(src.metadata["general.architecture"]))
    _add_kv(w, src, FILE_TYPES[mix], drop={TRAINING_KEY} if training is not None else set())
    if training is not None:  # a merged student says what it was trained on (apr eval heldout reads it)
        w.add_key_value(TRAINING_KEY, json.dumps(training, sort_keys=True), GGUFValueType.STRING)
    for name, q in plan.items():
        w.add_tensor_info(name, byte_shape(q, src.tensors[name].shape), np.dtype(np.uint8), sizes[name], raw_dtype=T(q))
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with tqdm(total=len(plan), desc="quantize", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        for name, q in plan.items():
            t = src.tensors[name]
            if t.qtype == q and name not in lora and not requantize:
                data = np.asarray(t.data).reshape(-1).view(np.uint8)
                counts["copied"] = counts.get("copied", 0) + 1
            else:
                x = merged_weight(t, lora.get(name), scale)
                x = x.reshape(-1, t.shape[-1])  # (..., cols) -> (rows, cols)
                data = quantize(x, q, imatrix.get(name)).reshape(-1)
                counts["requantized"] = counts.get("requantized", 0) + 1
            w.write_tensor_data(data)
            bar.update(1)
    w.close()


def _add_kv(w: GGUFWriter, src: Source, mix_type: int, drop: set[str]) -> None:
    """The source's metadata, but `drop` (keys the writer sets anew: a re-exported student's old apr.training)."""
    def items():
        for key, value in src.metadata.items():
            if key in src.kv_types and key not in drop:
                # the source's general.file_type is wrong after re-quantization
                yield key, (mix_type if key == "general.file_type" else value), *src.kv_types[key]

    add_kv(w, items())
    if "general.file_type" not in src.kv_types:
        w.add_key_value("general.file_type", mix_type, GGUFValueType.UINT32)


# ---- importance weights ----

_CALIB_CHUNK = 512  # tokens per forward: each chunk is its own sequence from position 0


def collect_imatrix(path: Path, text: str, n_tokens: int, quiet: bool = True) -> dict[str, torch.Tensor]:
    """{weight name: (in,) mean squared input activation} of every linear over `text`, from the base model
    in float32 (an imatrix): the columns that carry large activations get more careful rounding."""
    from apr.errors import AprError
    from apr.quant import QuantLinear
    from apr.runtime import load_model

    lm = load_model(path, dtype="float32", backend="cpu", quiet=True)
    ids = lm.tokenizer.encode(text)[:n_tokens]
    if len(ids) < 16:
        raise AprError(f"the calibration text has {len(ids)} tokens; it needs at least 16")
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantLinear) and name.startswith("blk."):
            def hook(_m, inputs, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (..., in) -> (T, in)
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        chunk = min(_CALIB_CHUNK, lm.config.context_length)
        lm.model.setup_cache(chunk)
        for start in range(0, len(ids), chunk):
            lm.model.forward(torch.tensor(ids[start : start + chunk]), 0)
    finally:
        for h in hooks:
            h.remove()
    return {name + ".weight": s / len(ids) for name, s in sums.items()}
