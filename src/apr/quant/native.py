"""The native kernels that read ggml blocks in place (csrc/*.c), built on first use.

Decode steps multiply one row of activations by every weight: memory-bound work where torch's int4
kernel is compute-bound on AVX2 CPUs. The C kernel dots int8-quantized activations with the raw
blocks (see the file's header for the arithmetic), so a weight is read once, in the file's own bytes.

It is compiled with the system C compiler into `$APR_HOME/kernels/` (plain C files, a few seconds)
and loaded with ctypes. Where there is no compiler, no AVX2/FMA/F16C, or `APR_NATIVE=0`, `available()`
is False with a reason and apr runs its torch kernels instead: slower, same results within rounding.
OpenMP comes from torch's own libgomp (same soname, already loaded), so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from apr import hub
from apr.provenance import cpu_flags

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / f for f in ("ggml_matvec.c", "matmul_multi.c", "decode_layer.c")]
HEADERS = [CSRC / "ggml_blocks.h"]  # not compiled on their own; part of the build's hash
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# ISA variants, best first: (extra flags, /proc/cpuinfo flags the CPU needs to run it). Each is its own .so
# built with FLAGS + its flags (any x86 compiler builds every variant, whatever CPU it runs on); the first
# the CPU can run is loaded at first use, or the one APR_KERNEL_ISA names. csrc/ggml_blocks.h (dot_us) and
# matmul_multi.c say what differs.
VARIANTS = {
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    "avx2": ([], set()),
}
# Rows of activations up to which the kernel beats dequantized tiles + GEMM (longer prompts go to the GEMM).
# Measured on the 2-core AVX2 box, whole 0.5B forward: T=16 kernel 333 ms vs tiles 786; T=32 908 vs 1152;
# T=64 1156 vs 1126; T=128 2664 vs 1504.
MAX_ROWS = 48


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(cc: str, isa: str = "avx2") -> Path:
    """Compile once per (source, flags, compiler): the name carries their hash, and a sidecar the sha256
    of the .so itself, written at build time and checked before every load, so a library that is not the
    one apr built (replaced, truncated, left by another version) is rebuilt, never loaded. Both files appear
    atomically; a racing build at worst sees a pair in mid-swap and builds again."""
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    flags = FLAGS + VARIANTS[isa][0]
    key = hashlib.sha256(src + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = hub.apr_home() / "kernels" / f"ggml_matvec-{key}.so"
    if _verified(out):
        return out
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        r = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(so), "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        sidecar = so.with_name(so.name + ".sha256")
        sidecar.write_text(hashlib.sha256(so.read_bytes()).hexdigest() + "\n")
        os.replace(sidecar, _sidecar(out))
        os.replace(so, out)
    if not _verified(out):
        raise OSError(f"{out} does not match its sha256 right after the build")
    return out


def _sidecar(so: Path) -> Path:
    return so.with_name(so.name + ".sha256")


def _verified(so: Path) -> bool:
    """True when `so` exists and its bytes hash to the sha256 recorded when apr built it."""
    try:
        want = _sidecar(so).read_text().strip()
        return hashlib.sha256(so.read_bytes()).hexdigest() == want
    except OSError:
        return False


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("APR_NATIVE", "1") == "0":  # read at every call: tests and users switch it per run
        return None, "disabled by APR_NATIVE=0"
    return _build_and_load(os.environ.get("APR_KERNEL_ISA") or (runnable_isas() or ["avx2"])[0])


def runnable_isas() -> list[str]:
    """The variants this CPU can run, best first (empty without AVX2/FMA/F16C)."""
    flags = cpu_flags()
    if {"avx2", "fma", "f16c"} - flags:
        return []
    return [isa for isa, (_, need) in VARIANTS.items() if need <= flags]


def isa() -> str | None:
    """The variant of the loaded kernels ("avx512", "avx2"), None when they are not used."""
    lib = _load()[0]
    return None if lib is None else lib.apr_isa().decode()


@functools.lru_cache(maxsize=None)
def _build_and_load(isa: str) -> tuple[ctypes.CDLL | None, str]:
    missing = {"avx2", "fma", "f16c"} - cpu_flags()
    if missing:
        return None, f"CPU lacks {', '.join(sorted(missing))}"
    if isa not in runnable_isas():
        return None, f"APR_KERNEL_ISA={isa}: not one of this CPU's variants {runnable_isas()}"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc/gcc) found"
    try:
        lib = ctypes.CDLL(str(_build(cc, isa)))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"native kernel build failed: {e}"
    lib.apr_supports.argtypes = [ctypes.c_int]
    lib.apr_set_row_tile.argtypes = [ctypes.c_int]
    lib.apr_isa.restype = ctypes.c_char_p
    p = ctypes.c_void_p
    lib.apr_decode_layer.argtypes = [p, p, ctypes.c_int64, p, p, p, p, ctypes.c_int]  # (layer, x, M, pos, slot, cos, sin, threads)
    lib.apr_dequant.argtypes = [ctypes.c_int, p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, ctypes.c_int]
    lib.apr_dequant_bf16.argtypes = lib.apr_dequant.argtypes
    lib.apr_matmul_multi.argtypes = [ctypes.c_int, p, p, p, p, p, ctypes.c_int64, p, ctypes.c_int, ctypes.c_int64,
                                     p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib, "ok"


def lib() -> ctypes.CDLL | None:
    return _load()[0]


def set_row_tile(rows: int) -> int:
    """How many rows of x apr_matmul_multi dots with one unpacked weight block (0: the variant's default; 1:
    each row through the one-row dot). The results are the same bits for every setting: this exists for tests
    and for benchmarks/batch.py's A/B in one process. Returns the previous setting."""
    return _load()[0].apr_set_row_tile(int(rows))


def available() -> bool:
    return _load()[0] is not None


def status() -> str:
    """'ok', or why the native kernel is not used."""
    return _load()[1]


def supports(qtype: int) -> bool:
    lib = _load()[0]
    return lib is not None and bool(lib.apr_supports(int(qtype)))


def _check_rows(raw2d: torch.Tensor, qtype: int, n: int, bias: torch.Tensor | None) -> int:
    """Row bytes of a weight the kernels may read: (n, row_bytes) uint8 rows on the CPU, rows contiguous."""
    from gguf import GGML_QUANT_SIZES

    if int(qtype) not in GGML_QUANT_SIZES:
        raise ValueError(f"native kernels: unknown ggml type {qtype}")
    if (raw2d.dim() != 2 or raw2d.dtype != torch.uint8 or raw2d.device.type != "cpu" or raw2d.stride(1) != 1
            or not 0 < n <= raw2d.shape[0]):
        raise ValueError(f"native kernels: weight rows must be (>= {n}, row_bytes) uint8 on the CPU with "
                         f"contiguous rows, got {tuple(raw2d.shape)} {raw2d.dtype} strides {raw2d.stride()}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"native kernels: bias has {bias.numel()} values for {n} outputs")
    return int(raw2d.shape[1])


def _check_k(qtype: int, k: int, row_bytes: int, what: str = "native matmul failed") -> None:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[int(qtype)]
    if k <= 0 or k % block or k // block * type_size > row_bytes:
        raise RuntimeError(f"{what}: K={k} does not fit a row of {row_bytes} bytes of ggml type {qtype} "
                         f"({block} values per {type_size}-byte block)")


def _ptrs(ctype, values) -> ctypes.Array:
    return (ctype * len(values))(*values)


class Group:
    """Weights that read the same x, as ctypes arrays built once: (raw2d (N, row_bytes) uint8 ggml rows on
    the CPU, ggml type, N, float32 bias (N,) or None) each. `__call__` is one native call. `split`: x is
    rounded to two int8 rows instead of one (quantize_rows in matmul_multi.c: ~250x less activation error)."""

    def __init__(self, weights: list[tuple[torch.Tensor, int, int, torch.Tensor | None]], split: bool = False):
        self.split = int(bool(split))
        self.row_bytes = [_check_rows(r, t, n, b) for r, t, n, b in weights]
        self.biases = [None if b is None else b.float().contiguous() for *_, b in weights]  # kept alive
        self.sizes = [n for _, _, n, _ in weights]
        self.n_out = sum(self.sizes)
        self.args = (len(weights), _ptrs(ctypes.c_int, [int(t) for _, t, _, _ in weights]),
                     _ptrs(ctypes.c_void_p, [r.data_ptr() for r, _, _, _ in weights]),
                     _ptrs(ctypes.c_int64, [r.stride(0) for r, _, _, _ in weights]),
                     _ptrs(ctypes.c_int64, self.sizes),
                     _ptrs(ctypes.c_void_p, [None if b is None else b.data_ptr() for b in self.biases]))
        self.raws = [r for r, *_ in weights]  # the pointers above stay valid while these live
        self.types = [int(t) for _, t, _, _ in weights]
        self._k_checked = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float32 or bfloat16 -> (..., N_0 + N_1 + ...) in x's dtype: each weight's outputs side by side."""
        k = x.shape[-1]
        if k != self._k_checked:  # the kernel reads K // block blocks of every row: never past one
            for qtype, row_bytes in zip(self.types, self.row_bytes):
                _check_k(qtype, k, row_bytes)
            self._k_checked = k
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        x2 = x.reshape(-1, k).contiguous()  # (..., K) -> (M, K)
        y = torch.empty(x2.shape[0], self.n_out, dtype=x.dtype)
        bf16 = int(x.dtype == torch.bfloat16)
        rc = _load()[0].apr_matmul_multi(*self.args, k, x2.data_ptr(), bf16, x2.shape[0], y.data_ptr(), bf16,
                                        torch.get_num_threads(), self.split)
        if rc:
            raise RuntimeError(f"native matmul failed ({rc}) for types {list(self.args[1])}, K={k}")
        return y.reshape(*x.shape[:-1], self.n_out)  # (M, N) -> (..., N)


def matmul(x: torch.Tensor, raw2d: torch.Tensor, qtype: int, n_out: int, bias: torch.Tensor | None = None,
           split: bool = False) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) for one weight given as ggml rows (see Group)."""
    return Group([(raw2d, qtype, n_out, bias)], split)(x)


def dequantize(raw2d: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """ggml rows raw2d (N, row_bytes) uint8 on the CPU -> float32 (N, cols), bit-identical to
    apr.quant.table.dequantize (same operations in the same order), several times faster (prefill tiles).
    dtype bfloat16: those values rounded to bf16 as `.to(torch.bfloat16)` rounds them, in one pass.
    `out`: a contiguous (N, cols) tensor of that dtype to write into (a reused prefill tile)."""
    _check_k(qtype, cols, _check_rows(raw2d, qtype, raw2d.shape[0] if raw2d.dim() == 2 else 0, None),
             "native dequantize failed")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native dequantize writes float32 or bfloat16, not {dtype}")
    if out is None:
        out = torch.empty(raw2d.shape[0], cols, dtype=dtype)
    elif out.dtype != dtype or tuple(out.shape) != (raw2d.shape[0], cols) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {(raw2d.shape[0], cols)}")
    fn = _load()[0].apr_dequant_bf16 if dtype == torch.bfloat16 else _load()[0].apr_dequant
    rc = fn(int(qtype), raw2d.data_ptr(), raw2d.stride(0), raw2d.shape[0], cols, out.data_ptr(),
            torch.get_num_threads())
    if rc:
        raise RuntimeError(f"native dequantize failed ({rc}) for type {qtype}, K={cols}")
    return out
