"""apr eval perplexity vs llama.cpp (llama-cpp-python, logits_all) on the same GGUF, windows and text, in one run.

For each model: (optionally) apr float32 (dequantized reference path) saves its top-k log-probs as the KL base;
apr's default path (bf16 + native kernels) scores the text, against that base when --kl is given; then
llama-cpp-python, in its own venv as a subprocess, evaluates the SAME token windows (apr's ids) with
`Llama(..., logits_all=True, n_ctx=ctx, n_threads=T)` and the same second-half scoring. Prints both
perplexities, their ratio, and both throughputs (tokens evaluated / seconds) and their ratio, as JSON lines.

    python benchmarks/perplexity.py --text code --kl
    python benchmarks/perplexity.py --model qwen2.5-coder-1.5b-instruct --text prose
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).parent / "data"
TEXTS = {"code": DATA / "textwrap-3.11.7.py.txt", "prose": DATA / "python-reference-3.11.7.txt"}
PEER_PYTHON = "/tmp/venv-llamacpp/bin/python"

PEER = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
job = json.load(open(sys.argv[1]))
ctx, first = job["ctx"], job["ctx"] // 2
llm = Llama(model_path=job["model"], logits_all=True, n_ctx=ctx, n_batch=ctx, n_threads=job["threads"],
            n_threads_batch=job["threads"], verbose=False)
own = llm.tokenize(job["text"].encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true",
                   special=False)
nll, eval_s = [], 0.0
for w in job["windows"]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(w)
    eval_s += time.perf_counter() - t0
    rows = np.asarray(llm.scores[first:ctx - 1], dtype=np.float64)  # (n, vocab): row j predicts w[first+1+j]
    m = rows.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(rows - m).sum(-1)))
    nll += list(lse - rows[np.arange(len(rows)), w[first + 1:]])
print(json.dumps({"nll": nll, "eval_s": eval_s, "same_tokens": own[:len(job["ids"])] == job["ids"],
                  "n_tokens_own": len(own)}))
"""


def _stats(nll):
    import numpy as np

    from apr.evals.perplexity import perplexity_stats

    return perplexity_stats(np.asarray(nll))


def run_apr(lm, text, ctx, batch, chunks, save=None, base=None):
    from apr.evals import perplexity_run

    return perplexity_run.run(lm, text, ctx, batch, save_logits=save, kl_base=base, progress=False, chunks=chunks)


def peer(model_path: Path, text: str, ids: list[int], wins, ctx: int, threads: int, python: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        job = Path(d) / "job.json"
        job.write_text(json.dumps({"model": str(model_path), "text": text, "ids": ids, "ctx": ctx, "threads": threads,
                                   "windows": [list(w.ids) for w in wins]}))
        script = Path(d) / "peer.py"
        script.write_text(PEER)
        p = subprocess.run([python, str(script), str(job)], capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"llama-cpp-python failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench(name: str, text_name: str, args) -> dict:
    import torch

    from apr.evals import perplexity as ppl
    from apr.runtime import load_model

    torch.set_num_threads(args.threads)
    text = TEXTS[text_name].read_bytes().decode("utf-8") if text_name in TEXTS else Path(text_name).read_text()
    out = {"model": name, "text": text_name, "ctx": args.ctx, "threads": args.threads,
           "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as d:
        base = None
        if args.kl:
            ref = load_model(name, dtype="float32", quiet=True)
            base = str(Path(d) / "f32.npz")
            r32 = run_apr(ref, text, args.ctx, args.batch, args.chunks, save=base)
            out["apr_float32"] = {"ppl": r32["ppl"], "ppl_error": r32["ppl_error"], "tok_s": r32["tok_s"]}
            del ref
        lm = load_model(name, quiet=True)
        r = run_apr(lm, text, args.ctx, args.batch, args.chunks, base=base)
    out["apr"] = {"dtype": lm.dtype, "ppl": r["ppl"], "ppl_error": r["ppl_error"], "tok_s": r["tok_s"],
                  "n_windows": r["n_windows"], "n_tokens_scored": r["n_tokens_scored"], "batch": r["batch"]}
    if "kl" in r:
        out["kl_bf16_vs_float32"] = {k: v for k, v in r["kl"].items() if k not in ("base",)}
    if not args.skip_peer:
        ids = ppl.tokenize(lm.tokenizer, text)
        wins = ppl.windows(ids, args.ctx, lm.tokenizer.bos_id if lm.tokenizer.add_bos else None)[:args.chunks]
        t0 = time.perf_counter()
        p = peer(lm.path, text, ids, wins, args.ctx, args.threads, args.peer_python)
        s = _stats(p["nll"])
        tokens = len(wins) * args.ctx
        out["llama_cpp"] = {"ppl": s["ppl"], "ppl_error": s["ppl_error"], "tok_s": round(tokens / p["eval_s"], 2),
                            "same_tokenization": p["same_tokens"], "wall_s": round(time.perf_counter() - t0, 1)}
        out["ppl_rel_diff"] = r["ppl"] / s["ppl"] - 1
        out["throughput_ratio"] = r["tok_s"] / out["llama_cpp"]["tok_s"]
    out["load_avg_end"] = os.getloadavg()[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="registry name or GGUF (repeatable; default both Qwen models)")
    ap.add_argument("--text", action="append", help="code, prose or a path (repeatable; default code)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="apr's windows per forward (default 2048 // ctx)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=None, help="only the first N windows (default all)")
    ap.add_argument("--kl", action="store_true", help="also apr float32 as the KL base of the bf16 run")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peer-python", default=PEER_PYTHON)
    args = ap.parse_args()
    for name in args.model or ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]:
        for text in args.text or ["code"]:
            print(json.dumps(bench(name, text, args)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
