"""Modules that hold ggml blocks: QuantLinear (packed or dense weight made on demand) and QuantEmbedding.

Both keep the raw blocks as a buffer named `raw`. `materialize(dtype, device)` prepares what forward
runs: float32 is the exact reference (dense dequantized weight in `weight`); other dtypes get the fastest
faithful kernel format for the ggml type (apr.quant.kernels: packed int4, or dense).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from apr.errors import BadModelFile
from apr.quant import kernels, native
from apr.quant.pages import release_file_pages, trim_heap
from apr.quant.table import dequantize_rows, row_bytes, type_name


# Bumped whenever any QuantLinear gets a new prepared state: native call groups and the C decode block
# hold raw pointers, so they are rebuilt after any change (a materialize, a load, a test swapping rows).
_VERSION = [0]


def prepared_version() -> int:
    return _VERSION[0]


def _check_raw(raw: torch.Tensor, qtype: int, rows: int, cols: int, what: str) -> None:
    want = (rows, row_bytes(qtype, cols))
    if raw.dtype != torch.uint8 or tuple(raw.shape) != want:
        raise BadModelFile(
            f"{what}: {type_name(qtype)} blocks for ({rows}, {cols}) must be uint8 {list(want)}, "
            f"got {raw.dtype} {list(raw.shape)}"
        )


def _tag(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("ascii")), dtype=torch.uint8)


def _untag(t: torch.Tensor) -> str:
    return bytes(t.to(torch.uint8).tolist()).decode("ascii", "replace")


class QuantLinear(nn.Module):
    """y = x @ W.T + b, with W kept as ggml blocks in `raw` and prepared once per (dtype, device)."""

    def __init__(self, raw: torch.Tensor, qtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        _check_raw(raw, qtype, out_features, in_features, "QuantLinear")
        self.qtype, self.in_features, self.out_features = int(qtype), in_features, out_features
        self.register_buffer("raw", raw)
        # derived from raw, so not saved in state_dict
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self._bias32 = self.bias  # the exact bias: every dtype's copy is made from it, never from another copy
        self.prepared: kernels.Prepared | None = None
        self._groups: dict = {}  # fused native calls led by this module (see `fused`)
        self.act_split = False  # native kernels round x to two int8 rows (native.Group); the model decides

    @property
    def kind(self) -> str:
        return self.prepared.kind if self.prepared else "none"

    def materialize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | None:
        """Prepare for compute in `dtype` on `device` (default: where `raw` is) into `self.prepared`.

        float32 -> dense exact `weight`; other dtypes -> apr.quant.kernels' format for this ggml type.
        Returns the dense `weight` (None when the format is packed int4: see `prepared`).
        `raw` is kept (its file pages are released: they are read again only if asked for another dtype).
        """
        device = torch.device(device) if device is not None else self.raw.device
        p = self.prepared
        if p is None or p.dtype != dtype or self._device(p) != device:
            # from raw, not from an existing weight: a bf16 -> f32 round trip would lose bits
            p = kernels.prepare(self.raw, self.qtype, self.out_features, self.in_features, dtype, device)
            self._set(p, device)
            if p.kind != "ggml":  # the kernel reads the blocks in place: their pages stay
                release_file_pages(self.raw)
                trim_heap()
        return self.weight

    def _set(self, p: kernels.Prepared, device: torch.device) -> None:
        self.prepared, self._groups = p, {}
        _VERSION[0] += 1
        self.weight = p.tensors.get("weight")
        if self._bias32 is not None:
            self.bias = self._bias32.to(device=device, dtype=p.dtype)

    @staticmethod
    def _device(p: kernels.Prepared) -> torch.device:
        return next(iter(p.tensors.values())).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prepared
        if p is None or p.dtype != x.dtype:
            self.materialize(x.dtype, x.device)
            p = self.prepared
        if p.dtype == torch.float32:  # the reference path, exactly as it always was (per sequence)
            return per_sequence(x, lambda xs: F.linear(xs, self.weight, self.bias))
        if p.kind == "ggml":
            return _ggml([self], x)[0]
        return per_sequence(x, lambda xs: kernels.linear(xs, p, self.bias))

    def forward_float32(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> float32 (..., N) computed from float32 x, whatever the compute dtype: the output head.
        Near-tied logits differ by less than a bf16 step (0.0625 for a logit of 8-16), so a head whose input or
        output is rounded to bf16 makes exact ties that argmax breaks by token id. The C decode step's head is
        float32 in and out for the same reason; this is the same head for the torch block (prefill, scoring)."""
        p = self.prepared
        if p is None or p.kind != "ggml" or p.dtype == torch.float32:
            return self(x if p is None else x.to(p.dtype)).float()
        x = x.float()
        sizes = row_groups(x)
        if max(sizes) <= native.MAX_ROWS:  # float32 tiles: the crossover measured on the AVX2 box (only there)
            return _native_group([self])(x)  # the decode head's own call: (M, N) float32
        return kernels.ggml_tile_linear(x, p, self._bias32, torch.float32, sizes)

    def prepared_state(self) -> dict[str, torch.Tensor]:
        """The buffers forward needs after `materialize`, for storing in a .apr file.

        Keys: "kind" is a uint8 tensor of ASCII text "<kind>;<layout>;parts=<P>;rows=<N>;dtype=<dtype>"
        (kind "ggml", "dense" or "int4"; "ggml" stores nothing else: its kernel reads `raw`; layout e.g. "int4-cpu-bn32", which depends on the CPU packer's build);
        "weight" (dense: (N, K) in dtype) or "packed" + "sz" (int4: the tinygemm buffers, see
        apr.quant.kernels_int4). The bias is not included: it is a GGUF tensor of its own.
        """
        if self.prepared is None:
            self.materialize(torch.float32)
        p = self.prepared
        text = f"{p.kind};{p.layout};parts={p.parts};rows={p.rows};dtype={str(p.dtype).removeprefix('torch.')}"
        return {"kind": _tag(text), **({} if p.kind == "ggml" else p.tensors)}

    def load_prepared(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
        """Use a stored `prepared_state()` for `dtype` without repacking; True if it was used.

        A state made for another dtype, shape or packed layout (another CPU build or device) is not
        usable here: then this packs from `raw` as `materialize(dtype)` does and returns False.
        """
        if dtype != torch.float32 and kernels.uses_native(self.qtype, self.raw.device):
            # the blocks are the native kernel's layout: nothing to pack or load
            self._set(kernels.ggml_prepared(self.raw, self.qtype, self.out_features, dtype), self.raw.device)
            return True
        p = self._parse(state, dtype)
        if p is None:
            self.materialize(dtype)
            return False
        self._set(p, self._device(p))
        return True

    def _parse(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> kernels.Prepared | None:
        try:
            kind, layout, *fields = _untag(state["kind"]).split(";")
            info = dict(f.split("=", 1) for f in fields)
            tensors = {k: v for k, v in state.items() if k != "kind"}
            if info["dtype"] != str(dtype).removeprefix("torch."):
                return None
            if kind == "dense" and tuple(tensors["weight"].shape) == (self.out_features, self.in_features):
                return kernels.Prepared("dense", dtype, {"weight": tensors["weight"].to(dtype)})
            from apr.quant import kernels_int4 as k4

            ok = kind == "int4" and layout == k4.cpu_layout() and int(info["rows"]) == self.out_features
            ok = ok and tensors["sz"].dtype == dtype and tensors["packed"].dtype == torch.uint8
            return kernels.Prepared("int4", dtype, tensors, int(info["parts"]), self.out_features, layout) if ok else None
        except (KeyError, ValueError):
            return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={type_name(self.qtype)}, bias={self.bias is not None}, kind={self.kind}")


# Rows (of one sequence) up to which the native row kernel beats dequantized tiles + GEMM. native.MAX_ROWS was
# measured with float32 tiles (AVX2 box); with bf16 GEMM hardware the tiles win from fewer rows. Whole forward,
# benchmarks/prefill_batch.py, AMX-class Xeon, 2 threads, kernel vs tiles (ms): 0.5B T=24 162/155, T=40 243/168;
# 1.5B T=24 418/430, T=28 489/423, T=48 750/496. 24 is the 1.5B's crossover; the 0.5B's lies a little lower.
FEW_ROWS_BF16_GEMM = 24

_rows = threading.local()


@contextlib.contextmanager
def sequence_rows(sizes: list[int]):
    """The linears inside run over the rows of several sequences side by side (a batched prefill), `sizes`
    rows each. A GEMM's sums depend on its row count, and which kernel wins depends on it too, so each
    sequence's rows get the kernel and the GEMM shape they would get alone: a prompt prefilled beside others
    gives bit for bit the logits it gives alone (the weights are still dequantized once for all of them)."""
    prev = getattr(_rows, "sizes", None)
    _rows.sizes = list(sizes)
    try:
        yield
    finally:
        _rows.sizes = prev


def row_groups(x: torch.Tensor) -> list[int]:
    """The sequences' row counts in x (..., K); one group of all rows outside sequence_rows, or when x's rows
    are not those sequences' rows (the head over each sequence's last row)."""
    t = x.numel() // x.shape[-1]
    sizes = getattr(_rows, "sizes", None)
    return sizes if sizes and sum(sizes) == t else [t]


def per_sequence(x: torch.Tensor, fn) -> torch.Tensor:
    """fn over each sequence's rows of x (..., K), joined; fn(x) itself for one sequence."""
    sizes = row_groups(x)
    if len(sizes) == 1:
        return fn(x)
    x2 = x.reshape(-1, x.shape[-1])  # (..., K) -> (T, K)
    return torch.cat([fn(part) for part in x2.split(sizes)]).reshape(*x.shape[:-1], -1)  # (T, N) -> (..., N)


def few_rows_max() -> int:
    return FEW_ROWS_BF16_GEMM if kernels.native_bf16_gemm() else native.MAX_ROWS


def fused(mods: list[QuantLinear], x: torch.Tensor) -> list[torch.Tensor]:
    """[m(x) for m in mods]; for linears reading ggml blocks in place, sequences with few rows (decode, a
    short prompt) go to one native call for all of them: x is quantized once and one parallel region covers
    every row of every module (q, k, v; gate, up), the results column slices of one (..., N_0 + N_1 + ...)
    tensor. Sequences with many rows get dequantized tiles and a GEMM of their own rows."""
    if not all(m.kind == "ggml" and m.prepared.dtype == x.dtype for m in mods):
        return [m(x) for m in mods]
    return _ggml(mods, x)


def _ggml(mods: list[QuantLinear], x: torch.Tensor) -> list[torch.Tensor]:
    sizes, few = row_groups(x), few_rows_max()
    if max(sizes) <= few:
        group = _native_group(mods)
        return list(group(x).split(group.sizes, dim=-1))
    if min(sizes) > few:
        return [kernels.ggml_tile_linear(x, m.prepared, m._bias32, groups=sizes) for m in mods]
    x2 = x.reshape(-1, x.shape[-1])  # (..., K) -> (T, K): the few-row sequences' rows and the others'
    small, large, large_sizes = _split_rows(tuple(sizes), few)
    group = _native_group(mods)
    outs = []
    for m, y_small in zip(mods, group(x2[small]).split(group.sizes, dim=-1)):
        y = x2.new_empty(x2.shape[0], m.out_features)  # (T, N)
        y[small] = y_small
        y[large] = kernels.ggml_tile_linear(x2[large], m.prepared, m._bias32, groups=list(large_sizes))
        outs.append(y.reshape(*x.shape[:-1], m.out_features))  # (T, N) -> (..., N)
    return outs


@functools.lru_cache(maxsize=64)
def _split_rows(sizes: tuple[int, ...], few: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Row indices of the sequences of at most `few` rows, of the others, and the others' sizes: made once per
    batch shape, not once per linear (a forward asks for them at every linear of every block)."""
    ends = list(itertools.accumulate(sizes))
    spans = [(e - n, e, n <= few) for n, e in zip(sizes, ends)]
    small = torch.cat([torch.arange(a, b) for a, b, short in spans if short])
    large = torch.cat([torch.arange(a, b) for a, b, short in spans if not short])
    return small, large, tuple(n for n in sizes if n > few)


def _native_group(mods: list[QuantLinear]) -> native.Group:
    """The one native call over `mods`' ggml blocks, built once per set of prepared states (see _VERSION)."""
    first, key = mods[0], tuple(map(id, mods))
    version, group = first._groups.get(key, (None, None))
    if version != _VERSION[0]:
        group = native.Group([(m.raw, m.qtype, m.out_features, m._bias32) for m in mods], first.act_split)
        first._groups[key] = (_VERSION[0], group)
    return group


class QuantEmbedding(nn.Module):
    """Token embedding whose table stays quantized; each lookup dequantizes only the rows it needs.

    The lookup runs where `raw` lives (the memory-mapped file on the host) and the (T, dim) rows move to
    `device`: a few KiB per step, instead of a second copy of the vocabulary table on the accelerator.
    """

    def __init__(self, raw: torch.Tensor, qtype: int, dim: int):
        super().__init__()
        _check_raw(raw, qtype, raw.shape[0], dim, "QuantEmbedding")
        self.qtype, self.dim, self.num_embeddings = int(qtype), dim, raw.shape[0]
        self.register_buffer("raw", raw)
        self.dtype = torch.float32
        self.device = raw.device

    def materialize(self, dtype: torch.dtype = torch.float32, device=None) -> None:
        """Set the output dtype and device; the table itself is never densified."""
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else self.raw.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.raw, self.qtype, ids.to(self.raw.device))  # (*ids.shape, dim) float32
        return rows.to(device=self.device, dtype=self.dtype)

    def prepared_state(self) -> dict[str, torch.Tensor]:
        """Nothing is packed for lookups: {"kind": ASCII "rows;ggml;dtype=<dtype>"} (see QuantLinear)."""
        return {"kind": _tag(f"rows;ggml;dtype={str(self.dtype).removeprefix('torch.')}")}

    def load_prepared(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
        """Set the dtype; the ggml rows in `raw` are the lookup format, so there is nothing to load."""
        self.materialize(dtype)
        return True

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, qtype={type_name(self.qtype)}"
