"""GPU benchmark: a random-weight Qwen2.5-Coder-7B-shaped Q4_K_M GGUF, made on the GPU machine itself.

    python benchmarks/gpu_7b.py [--out /tmp/apr-7b] [--layers 28] [--gen-tokens 256] [--hbm-tbps 4.8]

1. correctness first (small, fast): tiny random models of several ggml types, bf16 on CUDA (int4 tinygemm
   + CUDA-graph decode) against the CPU float32 reference path: logits cosine and top-1 agreement per
   position, and graph decode == eager decode; then the backend chain with its parity gate (load_model).
2. writes a random GGUF with the 7B's shapes and llama.cpp's Q4_K_M type layout (Q4_K, with Q6_K for
   attn_v/ffn_down on the "more bits" layers and for output), nothing large travels;
3. loads it through apr on CUDA, measures decode tok/s with `apr bench`'s measure() (the engine), with
   and without CUDA graphs, and the fraction of the HBM roofline: weight bytes read per token x tok/s.
Prints one JSON object at the end. Random weights make the text meaningless, not the speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_gguf: the vocabulary helpers

HBM_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "A10": 0.6, "RTX 4090": 1.0}
SHAPES_7B = dict(n_layers=28, dim=3584, n_heads=28, n_kv_heads=4, ffn=18944, vocab=152064)


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits(): the layers Q4_K_M gives Q6_K for attn_v and ffn_down."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_7b(path: Path, layers: int) -> Path:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter
    from tiny_gguf import CHATML, MERGES, SPECIALS, vocab

    from apr.quant.testing import random_blocks

    s, tokens = SHAPES_7B, vocab()
    hd = s["dim"] // s["n_heads"]
    w = GGUFWriter(str(path), "qwen2")
    for key, val in (("block_count", layers), ("context_length", 32768), ("embedding_length", s["dim"]),
                     ("feed_forward_length", s["ffn"]), ("head_count", s["n_heads"]), ("head_count_kv", s["n_kv_heads"])):
        getattr(w, f"add_{key}")(val)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    made: dict = {}  # one random matrix per (type, shape), reused: the speed does not depend on the values

    def add(name: str, rows: int, cols: int, qt) -> None:
        if (qt, rows, cols) not in made:
            block, size = GGML_QUANT_SIZES[qt]
            raw = random_blocks(qt, rows * cols // block, torch.Generator().manual_seed(rows + cols))
            made[(qt, rows, cols)] = raw.numpy().reshape(rows, cols // block * size)
        w.add_tensor(name, made[(qt, rows, cols)], raw_dtype=qt)

    def vec(name: str, n: int, base: float) -> None:
        w.add_tensor(name, np.full(n, base, dtype=np.float32))

    kv = s["n_kv_heads"] * hd
    add("token_embd.weight", s["vocab"], s["dim"], Q.Q4_K)
    for i in range(layers):
        p, big = f"blk.{i}.", Q.Q6_K if more_bits(i, layers) else Q.Q4_K
        vec(p + "attn_norm.weight", s["dim"], 1.0)
        vec(p + "ffn_norm.weight", s["dim"], 1.0)
        for name, rows, cols, qt in (("attn_q", s["dim"], s["dim"], Q.Q4_K), ("attn_k", kv, s["dim"], Q.Q4_K),
                                     ("attn_v", kv, s["dim"], big), ("attn_output", s["dim"], s["dim"], Q.Q4_K),
                                     ("ffn_gate", s["ffn"], s["dim"], Q.Q4_K), ("ffn_up", s["ffn"], s["dim"], Q.Q4_K),
                                     ("ffn_down", s["dim"], s["ffn"], big)):
            add(p + name + ".weight", rows, cols, qt)
        for name, n in (("attn_q", s["dim"]), ("attn_k", kv), ("attn_v", kv)):
            vec(p + name + ".bias", n, 0.0)
    vec("output_norm.weight", s["dim"], 1.0)
    add("output.weight", s["vocab"], s["dim"], Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- 1. correctness on small random models ----

def check_small(out: Path) -> dict:
    from gguf import GGMLQuantizationType as Q
    from tiny_gguf import write_tiny_gguf

    from apr.runtime import load_model

    results = {}
    ids = torch.tensor([5, 77, 200, 3, 99, 260, 1, 42, 17, 8])
    for qt in (Q.Q4_K, Q.Q5_0, Q.Q8_0, Q.Q6_K, Q.Q4_0):
        path = write_tiny_gguf(out / f"small-{Q(qt).name}.gguf", "qwen2", qt, seed=int(qt))
        ref = load_model(path, dtype="float32", backend="cpu", quiet=True).model
        gpu = load_model(path, dtype="bfloat16", backend="cuda", quiet=True)
        results[Q(qt).name] = {**compare(ref, gpu.model, ids), "chain": gpu.backend_chain[-1]["reason"]}
    return results


def compare(ref, gpu, ids: torch.Tensor) -> dict:
    ref.setup_cache(32)
    gpu.setup_cache(32)
    a = ref(ids[:6], 0, all_logits=True)
    b = gpu(ids[:6], 0, all_logits=True).cpu()
    graph, eager = [], []
    for i in range(6, len(ids)):  # decode: graph replay (default) vs the eager path on the same cache
        a = torch.cat([a, ref(ids[i : i + 1], i)])
        graph.append(gpu(ids[i : i + 1], i).cpu())
    os.environ["APR_CUDA_GRAPHS"] = "0"
    for i in range(6, len(ids)):
        eager.append(gpu(ids[i : i + 1], i).cpu())
    del os.environ["APR_CUDA_GRAPHS"]
    b = torch.cat([b, *graph])
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return {"min_cosine": round(float(cos.min()), 5), "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "graph_vs_eager_max_abs": float((torch.cat(graph) - torch.cat(eager)).abs().max())}


# ---- 3. speed ----

def weight_bytes(model) -> int:
    from apr.quant import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in m.prepared.tensors.values())
    return total


def bench(path: Path, prompt: int, gen: int, iterations: int) -> dict:
    from apr.commands.bench import measure
    from apr.runtime import load_model

    t0 = time.perf_counter()
    lm = load_model(path, dtype="bfloat16", backend="cuda", quiet=True)
    load_s = time.perf_counter() - t0
    out = {"load_s": round(load_s, 1), "weight_gb": round(weight_bytes(lm.model) / 1e9, 3), "chain": lm.backend_chain}
    for graphs in ("1", "0"):
        os.environ["APR_CUDA_GRAPHS"] = graphs
        m = measure(lm, prompt, gen, iterations, 1, time.time())
        out["graphs" if graphs == "1" else "eager"] = {"decode_tok_s": round(m["decode"]["median"], 2),
                                                       "prefill_tok_s": round(m["prefill"]["median"], 1)}
    os.environ.pop("APR_CUDA_GRAPHS", None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/apr-7b"))
    ap.add_argument("--layers", type=int, default=SHAPES_7B["n_layers"])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--hbm-tbps", type=float, default=None, help="peak HBM bandwidth (default: by device name)")
    ap.add_argument("--skip-small", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_7b.py needs a CUDA device")
    os.environ.setdefault("APR_HOME", str(a.out / "home"))  # gate cache and the like stay in the scratch dir
    a.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0)
    report: dict = {"device": name, "torch": torch.__version__}
    if not a.skip_small:
        report["small"] = check_small(a.out)
        print(json.dumps(report["small"]), flush=True)
    t0 = time.perf_counter()
    path = write_7b(a.out / f"random-7b-{a.layers}l-q4_k_m.gguf", a.layers)
    report["gguf_gb"], report["write_s"] = round(path.stat().st_size / 1e9, 2), round(time.perf_counter() - t0, 1)
    report["bench"] = bench(path, a.prompt_tokens, a.gen_tokens, a.iterations)
    tbps = a.hbm_tbps or next((v for k, v in HBM_TBPS.items() if k in name), math.nan)
    tok_s = report["bench"]["graphs"]["decode_tok_s"]
    report["hbm_tbps"] = tbps
    report["roofline_tok_s"] = round(tbps * 1e12 / (report["bench"]["weight_gb"] * 1e9), 1)
    report["roofline_fraction"] = round(tok_s / report["roofline_tok_s"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
