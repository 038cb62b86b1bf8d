"""apr's quantizer against llama.cpp's, and the exported GGUF in both engines, in one run.

1. BASE -> F32 GGUF with `apr export --quant f32` (the source weights: BASE dequantized).
2. F32 -> Q4_K_M twice: `apr export` (apr's quantizer) and llama.cpp's `llama_model_quantize`; wall time of each.
3. Per-type weight error of both against F32 (relative RMSE over all tensors of a type), and the same on
   off-grid data (Gaussian, and real tensors quantized to a type they were not stored in) through ggml's own
   `ggml_quantize_chunk` (libggml-base from llama-cpp-python) — also the share of bytes identical to ggml's.
4. Both Q4_K_M models in apr (float32), teacher-forced over a code text: top-1 agreement with the F32 model
   and mean KL(F32 || Q).
5. apr's Q4_K_M GGUF in llama-cpp-python: identical tokenization, and top-1 agreement between the engines.

    python benchmarks/quantize.py --tokens 512 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

VENV = "/tmp/venv-llamacpp"

CHILD = r"""
import json, sys, time
import numpy as np
a = json.loads(sys.argv[1])
import llama_cpp
if a["job"] == "quantize":
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = 15, a["threads"]  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(a["src"].encode(), a["dst"].encode(), p)
    print(json.dumps({"rc": rc, "s": time.perf_counter() - t}))
else:
    llm = llama_cpp.Llama(a["model"], n_ctx=len(a["ids"]) + 8, logits_all=True, n_threads=a["threads"],
                          n_batch=512, verbose=False)
    toks = llm.tokenize(a["text"].encode(), add_bos=False, special=False)
    llm.eval(a["ids"])
    top = np.asarray(llm.scores[: len(a["ids"])]).argmax(-1)
    print(json.dumps({"tokens": toks, "top1": top.tolist()}))
"""


def child(venv: str, job: dict) -> dict:
    r = subprocess.run([f"{venv}/bin/python", "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"llama-cpp-python child failed: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def apr_export(*argv) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "apr.cli", "export", *argv, "--quiet"], check=True)
    return time.perf_counter() - t


# ---- weights ----

def weight_errors(f32: Path, files: dict[str, Path]) -> dict:
    from apr.formats.gguf import read_gguf
    from apr.quant import dequantize
    from apr.quant.table import type_name

    ref = read_gguf(f32)
    quant = {k: read_gguf(p) for k, p in files.items()}
    acc: dict = {}
    same_mix = all(q.tensors[n].qtype == quant["apr"].tensors[n].qtype for q in quant.values() for n in ref.tensors)
    for name, t in ref.tensors.items():
        if len(t.shape) < 2:
            continue
        x = dequantize(t.data, t.qtype, t.shape)
        for k, q in quant.items():
            qt = q.tensors[name]
            y = dequantize(qt.data, qt.qtype, qt.shape)
            e = acc.setdefault(type_name(qt.qtype), {}).setdefault(k, [0.0, 0.0, 0, 0])
            e[0] += (y - x).pow(2).sum().item()
            e[1] += x.pow(2).sum().item()
            e[2] += 1
        a, b = quant["apr"].tensors[name], quant["llama.cpp"].tensors[name]
        if a.qtype == b.qtype:
            acc[type_name(a.qtype)]["apr"][3] += int(np.array_equal(a.data, b.data))
    out = {ty: {k: {"rel_rmse": (v[0] / v[1]) ** 0.5, "tensors": v[2]} for k, v in d.items()} for ty, d in acc.items()}
    for ty in out:
        out[ty]["bytes_identical_tensors"] = acc[ty]["apr"][3]
    return {"same_mix": same_mix, "types": out}


def ggml_lib(venv: str):
    libs = glob.glob(f"{venv}/lib/python3*/site-packages/llama_cpp/lib/libggml-base.so")
    if not libs:
        return None
    lib = ctypes.CDLL(libs[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(lib, x: torch.Tensor, qtype: int) -> np.ndarray:
    from apr.quant import row_bytes

    x = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, row_bytes(qtype, cols)), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


def off_grid(lib, base: Path) -> dict:
    """Per type: rel RMSE of apr's and ggml's quantizer on data not already on that type's grid."""
    from gguf import GGMLQuantizationType as T

    from apr.formats.gguf import read_gguf
    from apr.quant import dequantize
    from apr.quant.quantize import quantize

    g = read_gguf(base)
    gauss = torch.randn(256, 4864, generator=torch.Generator().manual_seed(0)) * 0.02

    def real(name):
        t = g.tensors[name]
        return dequantize(t.data, t.qtype, t.shape)

    cases = {  # (data, what it is)
        T.Q4_K: [(gauss, "gaussian"), (real("blk.0.ffn_down.weight"), "blk.0.ffn_down (stored Q6_K)")],
        T.Q6_K: [(gauss, "gaussian"), (real("blk.2.ffn_down.weight"), "blk.2.ffn_down (stored Q4_K)")],
        T.Q5_0: [(gauss, "gaussian"), (real("blk.0.attn_v.weight"), "blk.0.attn_v (stored Q8_0)")],
        T.Q8_0: [(gauss, "gaussian"), (real("blk.0.attn_q.weight"), "blk.0.attn_q (stored Q5_0)")],
    }
    out = []
    for qt, items in cases.items():
        for x, what in items:
            row = {"type": qt.name, "data": what}
            for k, fn in (("apr", lambda v: quantize(v, qt)), ("ggml", lambda v: ggml_quantize(lib, v, qt))):
                t = time.perf_counter()
                b = fn(x)
                row[k + "_s"] = round(time.perf_counter() - t, 3)
                y = dequantize(b, qt, x.shape)
                row[k + "_rel_rmse"] = ((y - x).pow(2).sum() / x.pow(2).sum()).sqrt().item()
                row.setdefault("bytes", {})[k] = b
            row["bytes_identical"] = float((row["bytes"]["apr"] == row["bytes"]["ggml"]).mean())
            del row["bytes"]
            out.append(row)
    return {"cases": out}


# ---- models ----

def logits(path: Path, ids: list[int]) -> torch.Tensor:
    from apr.runtime import load_model

    lm = load_model(path, dtype="float32", backend="cpu", quiet=True)
    lm.model.setup_cache(len(ids))
    out = lm.model.forward(torch.tensor(ids), 0, all_logits=True)  # (T, vocab)
    del lm
    return out


def code_text() -> str:
    import json.decoder

    return Path(json.decoder.__file__).read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/apr-quantize-bench")
    ap.add_argument("--llamacpp-venv", default=VENV)
    ap.add_argument("--imatrix", action="store_true",
                    help="also apr with importance weights from Lib/json/encoder.py (the evaluation text is decoder.py)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from apr.hub import resolve_model

    base = resolve_model(a.model, quiet=True)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f32, aprq, llq = work / "f32.gguf", work / "apr-q4_k_m.gguf", work / "llamacpp-q4_k_m.gguf"
    report: dict = {"model": base.name, "source_weights": f"{base.name} dequantized to F32 (a round trip for "
                    "tensors re-quantized to the type they were stored in)", "load_avg": os.getloadavg()}
    if not f32.exists():
        apr_export(str(base), "--quant", "f32", "-o", str(f32))
    report["apr_quantize_s"] = apr_export(str(f32), "--quant", "q4_k_m", "--requantize", "-o", str(aprq))
    variants = {"apr": aprq, "llama.cpp": llq}
    if a.imatrix:
        import importlib

        calib = importlib.import_module("json.encoder").__file__  # not `import json.encoder`: json stays global here
        variants["apr+imatrix"] = work / "apr-imatrix-q4_k_m.gguf"
        report["apr_imatrix_quantize_s"] = apr_export(str(f32), "--quant", "q4_k_m", "--requantize", "--imatrix-text",
                                                      calib, "-o", str(variants["apr+imatrix"]))
    q = child(a.llamacpp_venv, {"job": "quantize", "src": str(f32), "dst": str(llq), "threads": a.threads})
    report["llamacpp_quantize_s"] = q["s"]
    report["quantize_time_ratio_apr_over_llamacpp"] = report["apr_quantize_s"] / q["s"]
    report["weights"] = weight_errors(f32, variants)
    lib = ggml_lib(a.llamacpp_venv)
    if lib is not None:
        report["off_grid"] = off_grid(lib, base)
    text = code_text()
    from apr.formats.gguf import read_gguf
    from apr.tokenizer import Tokenizer

    apr_tok = Tokenizer.from_metadata(read_gguf(aprq).metadata).encode(text)
    ids = apr_tok[: a.tokens]
    ref = torch.log_softmax(logits(f32, ids), -1)
    for k, path in variants.items():
        lq = torch.log_softmax(logits(path, ids), -1)
        report.setdefault("model_vs_f32", {})[k] = {
            "top1_agreement": (lq.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "mean_kl": (ref.exp() * (ref - lq)).sum(-1).mean().item()}
        if k == "apr":
            apr_top = lq.argmax(-1)
    peer = child(a.llamacpp_venv, {"job": "eval", "model": str(aprq), "ids": ids, "text": text, "threads": a.threads})
    report["cross_engine"] = {"text": "Lib/json/decoder.py", "tokens": len(ids),
                              "tokenization_identical": peer["tokens"] == apr_tok,
                              "top1_agreement": float(np.mean(np.asarray(peer["top1"]) == apr_top.numpy()))}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
