"""apr vs llama.cpp (llama-cpp-python) vs transformers on the same GGUF files, in one run, side by side.

    python benchmarks/compare.py [MODEL ...] [--threads 2] [--prompt-tokens 512] [--gen-tokens 128]
                                 [--iterations 3] [--skip-transformers] [--hf-prompt-tokens 32 --hf-tokens 8]

MODEL is a registry name or a .gguf path (default: the 0.5B and 1.5B Qwen2.5-Coder). Every engine runs in
its own process (its own peak RSS, its own threads) on the same prompt token ids, greedy, and is timed
the same way from Python: prefill = time to the first token, decode = the remaining steps / their time.
apr runs through `apr bench` (the one inference path); transformers is slow (~1 tok/s here), so it gets
its own smaller token counts. The machine's load average is printed with every row: the box is shared.
llama-cpp-python is a benchmark tool, not a dependency (see README.md for the build line).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_MODELS = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]


def model_path(spec: str) -> str:
    from apr import hub

    return str(hub.resolve_model(spec, quiet=True))


def prompt_ids(path: str, n: int) -> list[int]:
    from apr.commands.bench import bench_prompt
    from apr.runtime import read_model_file
    from apr.tokenizer import Tokenizer

    return bench_prompt(Tokenizer.from_metadata(read_model_file(__import__("pathlib").Path(path))[1]), n)


def _child(engine: str, job: dict) -> dict:
    return subprocess_json([sys.executable, os.path.abspath(__file__), "--child", engine, json.dumps(job)], job)


def subprocess_json(cmd: list[str], job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    load = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=job.get("timeout", 3600))
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1][:200], "load": load}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load"] = round((load + os.getloadavg()[0]) / 2, 1)
    return out


def run_apr(path: str, a) -> dict:
    cmd = [sys.executable, "-m", "apr.cli", "bench", path, "--json", "--threads", str(a.threads),
           "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
           "--iterations", str(a.iterations)] + (["--dtype", a.apr_dtype] if a.apr_dtype else [])
    doc = subprocess_json(cmd, {"threads": a.threads})
    if "error" in doc:
        return doc
    return {"prefill": doc["prefill_tok_s"], "decode": doc["decode_tok_s"], "first_token_s": doc["first_token_s"],
            "rss_mb": doc["peak_rss_mb"], "load": doc["load"], "note": f"{doc['backend']} {doc['dtype']}"}


# ---- children: one engine each, timed alike ----

def _timed_loop(prefill, step, ids: list[int], gen: int, iterations: int) -> dict:
    """prefill(ids) -> first token; step(token, pos) -> next token. Medians over iterations.

    First a 16-token warm-up prefill, as `apr bench` does: its first token is the first-token latency."""
    prefill(ids[:16])
    pre, dec, first = [], [], time.time()
    for _ in range(iterations):
        t0 = time.perf_counter()
        tok = prefill(ids)
        t1 = time.perf_counter()
        for i in range(gen - 1):
            tok = step(tok, len(ids) + i)
        t2 = time.perf_counter()
        pre.append(len(ids) / (t1 - t0))
        dec.append((gen - 1) / (t2 - t1) if gen > 1 else 0.0)
    return {"prefill": statistics.median(pre), "decode": statistics.median(dec), "first": first}


def child_llama(job: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    ids, gen = job["ids"], job["gen"]
    llm = Llama(model_path=job["path"], n_ctx=len(ids) + gen + 8, n_batch=max(len(ids), 8), n_ubatch=512,
                n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)

    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # eval() keeps no logits without logits_all: read the context's last row
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def prefill(toks):
        llm.reset()
        llm.eval(toks)
        return last_argmax()

    def step(tok, pos):
        llm.eval([tok])
        return last_argmax()

    return _timed_loop(prefill, step, ids, gen, job["iterations"])


def child_transformers(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    folder, name = os.path.split(job["path"])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    state = {}

    @torch.inference_mode()
    def prefill(toks):
        out = model(torch.tensor([toks]), use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def step(tok, pos):
        out = model(torch.tensor([[tok]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return int(out.logits[0, -1].argmax())

    return _timed_loop(prefill, step, job["ids"], job["gen"], job["iterations"])


def child_main(engine: str, job: dict) -> None:
    import resource

    from apr.commands.bench import process_start

    t0 = process_start()
    out = {"llama": child_llama, "transformers": child_transformers}[engine](job)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"prefill": out["prefill"], "decode": out["decode"], "first_token_s": out["first"] - t0,
                      "rss_mb": rss}))


# ---- the table ----

def run_model(spec: str, a) -> list[dict]:
    path = model_path(spec)
    ids = prompt_ids(path, a.prompt_tokens)
    rows = [{"model": spec, "engine": "apr", **run_apr(path, a)}]
    base = {"path": path, "threads": a.threads, "iterations": a.iterations}
    if not a.skip_llama:
        job = {**base, "ids": ids, "gen": a.gen_tokens}
        rows.append({"model": spec, "engine": "llama.cpp", **_child("llama", job)})
    if not a.skip_transformers:
        job = {**base, "ids": ids[: a.hf_prompt_tokens], "gen": a.hf_tokens, "iterations": 1}
        rows.append({"model": spec, "engine": "transformers", "note": f"{a.hf_prompt_tokens}+{a.hf_tokens} tokens",
                     **_child("transformers", job)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | engine | prefill tok/s | decode tok/s | prefill vs llama.cpp | decode vs llama.cpp "
             "| first token s | peak RSS MB | load avg | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    ref = {r["model"]: r for r in rows if r["engine"] == "llama.cpp" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['engine']} | - | - | - | - | - | - | {r.get('load', '')} | {r['error']} |")
            continue
        base = ref.get(r["model"])
        ratio = (lambda k: f"{r[k] / base[k]:.2f}x" if base and base[k] else "-")
        lines.append(f"| {r['model']} | {r['engine']} | {r['prefill']:.1f} | {r['decode']:.2f} | {ratio('prefill')} | "
                     f"{ratio('decode')} | {r['first_token_s']:.2f} | {r['rss_mb']:.0f} | {r['load']} | {r.get('note', '')} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--apr-dtype", default=None, help="apr's --dtype (default: apr's default)")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--hf-prompt-tokens", type=int, default=32)
    ap.add_argument("--hf-tokens", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args()
    print(f"# {a.threads} threads, {a.prompt_tokens}-token prompt, {a.gen_tokens} generated, "
          f"{a.iterations} iterations (medians); load average at start {os.getloadavg()}", flush=True)
    rows = []
    for spec in a.models:
        rows += run_model(spec, a)
        print(table(rows), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
