"""The decode roofline: this machine's read bandwidth, each model's bytes per token, and each engine's share of it.

    python benchmarks/roofline.py [MODEL ...] [--threads 2] [--gen-tokens 64] [--iterations 3]
                                  [--llamacpp-venv /tmp/venv-llamacpp] [--skip-llama] [--json]

A decode step reads every weight once (at short contexts the KV cache adds little), so bandwidth / bytes per
token bounds decode tok/s. Bandwidth: a C read loop (AVX2 loads into 4 accumulators, OpenMP over --threads
threads) over a 1 GiB buffer, far beyond any L3, best of 5. Bytes per token: every tensor of the GGUF except the
token embedding table, which a step reads only a row of, unless the model has no output.weight (tied: the
table is then the output head, read in full). apr's decode is `apr bench` (the one inference path); llama.cpp's
is llama-cpp-python's eval loop as in compare.py, run by the venv's own Python. The box's load average is printed:
on a shared box every figure here is under that load.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402  (same folder: model_path, prompt_ids, run_apr, child_llama)

READ_LOOP = r"""
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>
/* sum of n bytes read as 256-bit vectors; the result is returned so the loads cannot be dropped */
double apr_read(const uint8_t *p, int64_t n, int threads) {
    double total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
    for (int64_t c = 0; c < n / 4096; c++) {
        const __m256i *v = (const __m256i *)(p + c * 4096);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < 128; i += 4) {
            a0 = _mm256_add_epi64(a0, _mm256_load_si256(v + i));
            a1 = _mm256_add_epi64(a1, _mm256_load_si256(v + i + 1));
            a2 = _mm256_add_epi64(a2, _mm256_load_si256(v + i + 2));
            a3 = _mm256_add_epi64(a3, _mm256_load_si256(v + i + 3));
        }
        __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
        int64_t out[4];
        _mm256_storeu_si256((__m256i *)out, s);
        total += (double)(out[0] + out[1] + out[2] + out[3]);
    }
    return total;
}
"""


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best GB/s of a `threads`-thread read over a buffer of `gib` GiB (pages touched first)."""
    import time

    import numpy as np

    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src, so = Path(tmp) / "read.c", Path(tmp) / "read.so"
        src.write_text(READ_LOOP)
        subprocess.run([cc, "-O2", "-mavx2", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
        lib = ctypes.CDLL(str(so))
    lib.apr_read.restype = ctypes.c_double
    lib.apr_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    n = int(gib * 2**30)
    raw = np.ones(n + 64, dtype=np.uint8)  # written once: every page is resident before timing
    start = (-raw.ctypes.data) % 64  # 64-byte aligned view for the aligned loads
    buf = raw[start:start + n]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib.apr_read(buf.ctypes.data, n, threads)
        best = min(best, time.perf_counter() - t0)
    return n / best / 1e9


def bytes_per_token(path: str) -> dict:
    """Bytes a decode step reads from the GGUF's tensors (see the module docstring) and what was left out."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    skipped = [] if tied else ["token_embd.weight"]
    read = sum(b for name, b in tensors.items() if name not in skipped)
    return {"bytes": read, "tied": tied, "embedding_bytes": tensors.get("token_embd.weight", 0)}


def llama_decode(path: str, ids: list[int], a) -> dict:
    """llama-cpp-python's decode tok/s, in the venv's Python (compare.child_llama's loop)."""
    py = Path(a.llamacpp_venv) / "bin" / "python"
    job = {"path": path, "ids": ids, "gen": a.gen_tokens, "threads": a.threads, "iterations": a.iterations}
    code = ("import json, sys; sys.path.insert(0, %r); import compare; "
            "print(json.dumps(compare.child_llama(json.loads(sys.argv[1]))))" % str(Path(__file__).parent))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    r = subprocess.run([str(py), "-c", code, json.dumps(job)], capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=compare.DEFAULT_MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--llamacpp-venv", default="/tmp/venv-llamacpp")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    bw = read_bandwidth(a.threads)
    rows = []
    for spec in a.models:
        path = compare.model_path(spec)
        b = bytes_per_token(path)
        ceiling = bw * 1e9 / b["bytes"]
        row = {"model": spec, "gb_per_token": b["bytes"] / 1e9, "tied_embedding": b["tied"], "ceiling_tok_s": ceiling}
        apr_args = types.SimpleNamespace(threads=a.threads, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                                         iterations=a.iterations, apr_dtype=None)
        row["apr"] = compare.run_apr(path, apr_args)
        if not a.skip_llama:
            row["llama.cpp"] = llama_decode(path, compare.prompt_ids(path, a.prompt_tokens), a)
        rows.append(row)
    doc = {"threads": a.threads, "read_gb_s": bw, "load_before": load0, "load_after": os.getloadavg()[0], "rows": rows}
    if a.json:
        json.dump(doc, sys.stdout, indent=1)
        return
    print(f"# {a.threads}-thread read loop over 1 GiB: {bw:.1f} GB/s (best of 5); {a.prompt_tokens}-token prompt, "
          f"{a.gen_tokens} generated, medians of {a.iterations}; load average {load0:.1f} before, "
          f"{doc['load_after']:.1f} after\n")
    print("| model | GB read per token | decode ceiling tok/s | engine | decode tok/s | fraction of ceiling |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for engine in ("apr", "llama.cpp"):
            e = r.get(engine)
            if e is None:
                continue
            got = f"{e['decode']:.2f} | {e['decode'] / r['ceiling_tok_s']:.0%}" if "error" not in e else f"- | {e['error']}"
            print(f"| {r['model']} | {r['gb_per_token']:.3f}{' (tied)' if r['tied_embedding'] else ''} | "
                  f"{r['ceiling_tok_s']:.1f} | {engine} | {got} |")


if __name__ == "__main__":
    main()
